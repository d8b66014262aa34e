"""The CPU-only fences are chosen per platform inside the program, so exports are right everywhere.

`jfocal.engine.numerics.fence` and the fast log1p use `jax.lax.platform_dependent`:
a program lowered for one platform keeps that platform's branch only, and one
exported for several carries both and picks at run time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jfocal

X = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)) * 3, jnp.float32)
IDS = jnp.array([0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2, 3])

STEPS = {
    "sigmoid": jax.jit(jax.value_and_grad(
        lambda x: jfocal.sigmoid_focal_loss(x, IDS, reduction="sum"))),
    "softmax": jax.jit(jax.value_and_grad(
        lambda x: jfocal.softmax_focal_loss(x, jnp.minimum(IDS, 4), reduction="sum"))),
}


@pytest.mark.parametrize("family", sorted(STEPS))
def test_the_fence_is_lowered_for_the_cpu_only(family):
  for platforms, fenced in ((["cpu"], True), (["cuda"], False), (["tpu"], False),
                            (["cpu", "cuda"], True)):
    text = export.export(STEPS[family], platforms=platforms)(X).mlir_module()
    assert ("reduce_precision" in text) == fenced, f"{platforms}: fenced should be {fenced}"


@pytest.mark.parametrize("family", sorted(STEPS))
def test_a_program_exported_for_several_platforms_computes_the_loss_on_this_one(family):
  platforms = ["cpu", "cuda", "rocm", "tpu"]
  exported = export.export(STEPS[family], platforms=platforms)(X)
  assert exported.platforms == tuple(platforms)
  value, grad = exported.call(X)
  expected_value, expected_grad = STEPS[family](X)
  np.testing.assert_array_equal(value, expected_value)
  np.testing.assert_array_equal(grad, expected_grad)
