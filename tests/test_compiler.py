"""The suite's CPU compiler settings give users' numbers: every loss, bit for bit.

`conftest.py` compiles the suite with XLA's elemental CPU emitters, in one part
(`SUITE_XLA_OPTIONS`), which build a program about twice as fast as XLA's
defaults (`XLA_DEFAULTS`: the MLIR fusion emitters, in 32 parts); compiling is
most of the suite's time. That is sound only while both emit the same arithmetic
for the losses' programs. Here each loss's value, gradients and Hessian diagonal
at the extreme-logit inputs, in every float dtype and label form, compile both
ways and must agree bit for bit (LLVM at -O0, for comparison, changes the bits of
most losses' derivatives). If they ever differ, drop the settings, or run the suite
with XLA's defaults (`JFOCAL_TEST_DEFAULT_COMPILER=1`).
"""

import jax
import numpy as np
import pytest

import registry
from conftest import SUITE_XLA_OPTIONS, XLA_DEFAULTS
from helpers import FLOAT_DTYPES, host
from test_references import _derivatives, _extreme_inputs

CPU = jax.devices("cpu")[0]


@pytest.mark.parametrize("loss", registry.PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_the_suites_cpu_compiler_gives_the_default_compilers_bits(loss, dtype):
  with jax.default_device(CPU):
    x, label_sets = _extreme_inputs(loss, dtype)
    params = loss.options(x.shape[-1])
    lowered = jax.jit(lambda x, labels: [_derivatives(loss, x, y, **params)
                                         for y in labels]).lower(x, label_sets)
    default, suites = (lowered.compile(options)(x, label_sets)
                       for options in (XLA_DEFAULTS, SUITE_XLA_OPTIONS))
    for label_set, (want, got) in enumerate(zip(default, suites)):
      for name in want:
        np.testing.assert_array_equal(
            host(got[name]), host(want[name]),
            err_msg=f"{name} (label set {label_set}): the compiler settings differ")
