"""Shared test helpers: the float dtypes, their tolerances, and float64 references on the host CPU.

The implementation under test runs on whatever `jax.devices()` offers (CPU
here, GPU or TPU elsewhere); float64 references run on the host CPU backend,
which every JAX installation has.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import SUITE_XLA_OPTIONS, XLA_DEFAULTS, cpu_compiler_options

FLOAT_DTYPES = (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16)

# One tolerance per dtype for every comparison against a float64 reference.
# Half-precision inputs are computed in float32 and rounded once at the end,
# so their error is that rounding: a few units of 2**-8 (bfloat16) and 2**-11
# (float16) relative. `atol` covers results that underflow in float16.
TOLERANCES = {
    np.dtype(jnp.float64): dict(rtol=1e-9, atol=1e-12),
    np.dtype(jnp.float32): dict(rtol=5e-5, atol=1e-6),
    np.dtype(jnp.bfloat16): dict(rtol=1.6e-2, atol=1e-5),
    np.dtype(jnp.float16): dict(rtol=2e-3, atol=2e-7),
}

REFERENCE_DEVICE = jax.devices("cpu")[0]
# A reference program runs once, on a few numbers: LLVM's optimisations take longer than
# they save (XLA's graph passes still run; the results are IEEE float64). On top of the
# suite's faster CPU settings (conftest.py), kept here also under
# JFOCAL_TEST_DEFAULT_COMPILER. Only the oracle is compiled at -O0, which rounds
# differently from -O2: the implementation under test gets the suite's settings, which
# give XLA's default results (bitwise, but for 1 ulp on AVX-512 CPUs: test_references.py).
REFERENCE_COMPILER_OPTIONS = cpu_compiler_options(
    {**SUITE_XLA_OPTIONS, "xla_backend_optimization_level": 0,
     "xla_llvm_disable_expensive_passes": True})


def compiled_as_users_get_it(lowered):
  """`lowered.compile()` with XLA's default CPU code generator rather than the suite's
  faster one (`conftest.py`): for tests of the compiled program itself, its memory."""
  return lowered.compile(XLA_DEFAULTS if jax.default_backend() == "cpu" else None)


def assert_close(actual, expected, dtype, *, what="value", scale=1.0):
  """Elementwise |actual - expected| <= atol*scale + rtol*|expected| at `dtype`'s tolerance.

  `scale` widens only the absolute part, for results that are differences of
  terms of size `scale` (a gradient that is a small difference of O(1) terms).
  """
  tolerance = TOLERANCES[np.dtype(dtype)]
  actual = np.asarray(jnp.asarray(actual).astype(jnp.float64))
  expected = np.asarray(expected, dtype=np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  bound = tolerance["atol"] * scale + tolerance["rtol"] * np.abs(expected)
  error = np.abs(actual - expected)
  bad = ~(error <= bound)
  if bad.any():
    index = tuple(np.argwhere(bad)[0])
    raise AssertionError(
        f"{what} differs at {index} for {np.dtype(dtype).name}: got {actual[index]!r}, "
        f"expected {expected[index]!r} (|error| {error[index]:.3g} > bound {bound[index]:.3g}); "
        f"{int(bad.sum())} of {bad.size} elements outside tolerance {tolerance}")


def on_reference_device(fn):
  """Runs `fn` in float64 on the host CPU, whatever the default device is, as one program.

  One cheaply compiled program (`REFERENCE_COMPILER_OPTIONS`) costs less than running
  op by op, which compiles each operation once per shape.
  """
  def wrapped(*args, **kwargs):
    with jax.default_device(REFERENCE_DEVICE):
      args = [None if a is None else jnp.asarray(a).astype(jnp.float64) for a in args]
      call = functools.partial(fn, **kwargs)
      return jax.jit(call).lower(*args).compile(REFERENCE_COMPILER_OPTIONS)(*args)
  return wrapped


def host(array):
  """A result as a float64 NumPy array (bfloat16 included)."""
  return np.asarray(jnp.asarray(array).astype(jnp.float64))


def all_finite(**arrays):
  """Asserts that every named array is finite, naming the first that is not."""
  for name, array in arrays.items():
    values = host(array)
    bad = ~np.isfinite(values)
    assert not bad.any(), f"{name} not finite at {tuple(np.argwhere(bad)[0])}: {values[bad][:5]}"


def with_grad(fn, x):
  """``(fn(x), d sum(fn(x)) / dx)``: a loss and its gradient, to put several in one program."""
  return fn(x), jax.grad(lambda x: jnp.sum(fn(x)))(x)


def optional_array(value, dtype=None):
  """A drawn option (alpha) as an array, to pass to a jitted test program; None stays None."""
  return None if value is None else jnp.asarray(value, dtype)
