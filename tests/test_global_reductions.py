"""axis_name on one device (vmap's named axes) and the EMA normaliser.

The same on 8 devices and two processes: tests/test_multidevice.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
from conftest import assert_close
from test_common import NUM_CLASSES, _batch, loss  # noqa: F401  (loss is a fixture)


@pytest.mark.parametrize("reduction, normalizer",
                         [("sum", None), ("mean", None), ("mean", "num_positives")])
def test_axis_name_reduces_over_a_named_vmap_axis(loss, reduction, normalizer, transform):
  """vmap over images with axis_name: every image gets the loss of the whole batch."""
  fn, family = loss
  logits, ids = _batch(family)
  expected = fn(logits, ids, reduction=reduction, normalizer=normalizer)
  per_image = jax.vmap(
      lambda x, y: fn(x, y, reduction=reduction, normalizer=normalizer, axis_name="images"),
      axis_name="images")
  assert_close(transform(per_image)(logits, ids), np.full(len(ids), expected), jnp.float32)


def test_axis_name_is_static_and_checked():
  with pytest.raises(TypeError, match="axis_name must be"):
    jfocal.sigmoid_focal_loss(jnp.zeros((2, 3)), jnp.array([0, 3]), reduction="sum",
                              axis_name=["images"])


def test_ema_normalizer_follows_detectron2():
  state = jfocal.ema_normalizer_init(100.0)
  for count, expected in ((20, 92.0), (0, 82.9), (40.0, 78.61)):
    state = jax.jit(jfocal.ema_normalizer)(jnp.asarray(count), state)
    assert state.dtype == jnp.float32 and state.shape == ()
    # max(count, 1): a batch without positives moves the average towards 1, not 0.
    assert_close(state, expected, jnp.float32)
  assert_close(jfocal.ema_normalizer(3, state, momentum=0.0), 3.0, jnp.float32)


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
