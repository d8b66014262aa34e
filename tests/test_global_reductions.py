"""axis_name on one device (vmap's named axes) for every loss, and the EMA normaliser.

The same on 8 devices and two processes: tests/test_multidevice.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
import registry
from helpers import assert_close


@pytest.mark.parametrize("loss", registry.PARAMS)
@pytest.mark.parametrize("reduction, normalizer", [("sum", None), ("mean", "num_positives")])
def test_axis_name_gives_the_global_batchs_loss_and_gradient(loss, reduction, normalizer):
  """vmap over images with axis_name: every image gets the loss of the whole batch, and
  the gradients together are the whole batch's gradient (GHM-C: also its state)."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 6, 3)) * 3, jnp.float32)
  top = 4 if loss.family == "sigmoid" else 3
  ids = jnp.asarray(rng.integers(0, top, size=(2, 6)))
  keep = jnp.asarray(rng.uniform(size=(2, 6)) < 0.8)
  where = keep[..., None] if loss.family == "sigmoid" else keep
  options = dict(loss.options(3), reduction=reduction, normalizer=normalizer)
  whole = lambda x: loss.fn(x.reshape(12, 3), ids.reshape(12),
                            where=where.reshape((12,) + where.shape[2:]), **options)
  split = jax.vmap(lambda x, y, w: loss.fn(x, y, where=w, axis_name="images", **options),
                   axis_name="images")
  first = (lambda result: result[0]) if loss.stateful else (lambda result: result)

  @jax.jit
  def evaluate(x):  # one program for both ways and their gradients
    grad_whole = jax.grad(lambda x: first(whole(x)))(x)
    # Each image differentiates its own copy of the global loss with respect to
    # its own logits (jfocal.engine.reduce.global_sum): together, the global gradient.
    grad_split = jax.grad(lambda x: jnp.sum(first(split(x, ids, where))))(x)
    return whole(x), split(x, ids, where), grad_whole, grad_split

  expected, got, grad_whole, grad_split = evaluate(x)
  if not loss.stateful:
    expected, got = (expected,), (got,)
  for part, (g, e) in enumerate(zip(got, expected)):
    for image in range(2):
      assert_close(g[image], e, jnp.float32, what=f"result {part} of image {image}")
  assert_close(grad_split, grad_whole, jnp.float32)


def test_axis_name_is_static_and_checked():
  with pytest.raises(TypeError, match="axis_name must be"):
    jfocal.sigmoid_focal_loss(jnp.zeros((2, 3)), jnp.array([0, 3]), reduction="sum",
                              axis_name=["images"])


def test_ema_normalizer_follows_detectron2():
  state = jfocal.ema_normalizer_init(100.0)
  for count, expected in ((20, 92.0), (0, 82.9), (40.0, 78.61)):
    state = jax.jit(jfocal.ema_normalizer)(jnp.asarray(count), state)
    assert state.dtype == jnp.float64 and state.shape == ()  # x64: JAX's default float
    # max(count, 1): a batch without positives moves the average towards 1, not 0.
    assert_close(state, expected, jnp.float64)
  assert_close(jfocal.ema_normalizer(3, state, momentum=0.0), 3.0, jnp.float64)
  float32_state = jfocal.ema_normalizer(jnp.asarray(20), jnp.float32(100.0))
  assert float32_state.dtype == jnp.float32 and float(float32_state) == 92.0


@pytest.mark.parametrize("call, error, message", [
    (lambda: jfocal.ema_normalizer_init(0.0), ValueError, "initial must be > 0"),
    (lambda: jfocal.ema_normalizer(1, jnp.float32(1), momentum=1.0), ValueError, "momentum must be < 1"),
    (lambda: jfocal.ema_normalizer(1, jnp.float32(1), momentum=-0.1), ValueError, "momentum"),
    (lambda: jfocal.ema_normalizer(jnp.ones(3), jnp.float32(1)), ValueError,
     r"num_positives must be a scalar; got shape \(3,\)"),
    (lambda: jfocal.ema_normalizer(1, jnp.ones(2)), ValueError, "state must be a scalar"),
    (lambda: jfocal.ema_normalizer(True, jnp.float32(1)), TypeError, "num_positives must be a count"),
    (lambda: jfocal.ema_normalizer(1, jnp.int32(5)), TypeError, "state must be a float"),
])
def test_ema_normalizer_rejects_bad_arguments(call, error, message):
  with pytest.raises(error, match=message):
    call()
