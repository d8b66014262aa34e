"""The keywords every loss shares: reductions, masks, weights, normalisers, dtypes, transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
from conftest import FLOAT_DTYPES, assert_close

NUM_CLASSES = 3
SOFTMAX_ALPHA = np.array([0.2, 0.5, 0.9])

# name -> (function, family, keywords beyond the common ones)
LOSSES = {
    "sigmoid_cross_entropy": (jfocal.sigmoid_cross_entropy, "sigmoid", {}),
    "sigmoid_balanced_cross_entropy": (jfocal.sigmoid_balanced_cross_entropy, "sigmoid",
                                       {"alpha": 0.3}),
    "sigmoid_focal_loss": (jfocal.sigmoid_focal_loss, "sigmoid", {"gamma": 1.5}),
    "softmax_cross_entropy": (jfocal.softmax_cross_entropy, "softmax", {}),
    "softmax_balanced_cross_entropy": (jfocal.softmax_balanced_cross_entropy, "softmax",
                                       {"alpha": SOFTMAX_ALPHA}),
    "softmax_focal_loss": (jfocal.softmax_focal_loss, "softmax",
                           {"gamma": 0.5, "alpha": SOFTMAX_ALPHA}),
    # The extended family (tests/test_extended_losses.py); ghmc_loss returns
    # (loss, state) and has its own tests of the common keywords there.
    "poly1_cross_entropy": (jfocal.poly1_cross_entropy, "softmax", {"epsilon": 1.5}),
    "poly1_focal_loss": (jfocal.poly1_focal_loss, "sigmoid", {"epsilon": 0.5, "gamma": 1.5}),
    "quality_focal_loss": (jfocal.quality_focal_loss, "sigmoid", {"beta": 1.5}),
    "sigmoid_focal_loss_star": (jfocal.sigmoid_focal_loss_star, "sigmoid",
                                {"gamma": 2.0, "beta": 1.0}),
    "varifocal_loss": (jfocal.varifocal_loss, "sigmoid", {"gamma": 1.5}),
}


@pytest.fixture(params=sorted(LOSSES))
def loss(request):
  fn, family, options = LOSSES[request.param]
  return lambda *args, **kw: fn(*args, **options, **kw), family


def _batch(family, dtype=jnp.float32, seed=0):
  """Logits (images=2, anchors=6, C=3) and class ids per anchor, some positive."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(2, 6, NUM_CLASSES)) * 3).astype(dtype)
  top = NUM_CLASSES + 1 if family == "sigmoid" else NUM_CLASSES  # sigmoid id C = background
  ids = jnp.asarray(rng.integers(0, top, size=(2, 6)), jnp.int32)
  return logits, ids


def _anchor_shaped(family, array):
  """Per-anchor arrays broadcast to the unreduced loss: (2, 6, 1) for sigmoid."""
  return array[..., None] if family == "sigmoid" else array


def test_sum_and_mean_reduce_the_unreduced_loss(loss, transform):
  fn, family = loss
  logits, ids = _batch(family)
  unreduced = np.asarray(fn(logits, ids), np.float64)
  total = transform(lambda x, y: fn(x, y, reduction="sum"))(logits, ids)
  mean = transform(lambda x, y: fn(x, y, reduction="mean"))(logits, ids)
  assert total.shape == mean.shape == ()
  assert_close(total, unreduced.sum(), jnp.float32)
  assert_close(mean, unreduced.sum() / unreduced.size, jnp.float32)


def test_normalizers_divide_the_sum(loss, transform):
  fn, family = loss
  logits, ids = _batch(family)
  total = float(fn(logits, ids, reduction="sum"))
  by_number = transform(lambda x, y: fn(x, y, reduction="mean", normalizer=7.0))(logits, ids)
  by_array = transform(lambda x, y, n: fn(x, y, reduction="mean", normalizer=n))(
      logits, ids, jnp.asarray(7.0))
  assert_close(by_number, total / 7, jnp.float32)
  assert_close(by_array, total / 7, jnp.float32)
  # Positives: foreground anchors for the sigmoid family (id C is background),
  # every labelled example for the softmax family.
  num_positives = int(np.sum(np.asarray(ids) < NUM_CLASSES))
  by_positives = transform(lambda x, y: fn(x, y, reduction="mean", normalizer="num_positives"))(
      logits, ids)
  assert_close(by_positives, total / max(num_positives, 1), jnp.float32)


def test_num_positives_never_divides_by_zero(loss):
  fn, family = loss
  logits, _ = _batch(family)
  background = jnp.full(logits.shape[:-1], NUM_CLASSES if family == "sigmoid" else 0)
  mask = jnp.zeros(_anchor_shaped(family, background).shape, bool)
  value = fn(logits, background, where=mask, reduction="mean", normalizer="num_positives")
  assert float(value) == 0.0


def test_masked_call_equals_sliced_call_even_with_nan_in_masked_logits(loss, transform):
  fn, family = loss
  logits, ids = _batch(family)
  keep = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 0]], bool)
  poisoned = jnp.where(keep[..., None], logits, jnp.nan)
  mask = _anchor_shaped(family, jnp.asarray(keep))
  for reduction in ("sum", "mean"):
    masked = transform(lambda x: fn(x, ids, where=mask, reduction=reduction))
    sliced = lambda x: fn(x[keep], ids[keep], reduction=reduction)
    assert_close(masked(poisoned), sliced(logits), jnp.float32, what=reduction)
    grad = jax.grad(masked)(poisoned)
    assert np.all(np.asarray(grad)[~keep] == 0), "masked entries must get a zero gradient"
    assert_close(grad[keep], jax.grad(sliced)(logits)[keep], jnp.float32, what="gradient")


def test_all_masked_mean_is_zero_with_zero_gradient(loss, transform):
  fn, family = loss
  logits, ids = _batch(family)
  mask = _anchor_shaped(family, jnp.zeros(ids.shape, bool))
  masked = transform(lambda x: fn(x, ids, where=mask, reduction="mean"))
  assert float(masked(logits)) == 0.0
  assert np.all(np.asarray(jax.grad(masked)(logits)) == 0)


def test_weights_scale_each_element(loss, transform):
  fn, family = loss
  logits, ids = _batch(family)
  weights = jnp.asarray(np.random.default_rng(3).uniform(size=ids.shape), jnp.float32)
  weighted = transform(lambda x, w: fn(x, ids, weights=w))(logits, _anchor_shaped(family, weights))
  assert_close(weighted, np.asarray(fn(logits, ids)) * np.asarray(_anchor_shaped(family, weights)),
               jnp.float32)


def test_vmapped_per_anchor_loss_equals_the_batched_call(loss):
  fn, family = loss
  logits, ids = _batch(family)
  per_anchor = lambda x, y: fn(x, y)  # x: (C,), y: () class id
  vmapped = jax.jit(jax.vmap(jax.vmap(per_anchor)))(logits, ids)
  assert_close(vmapped, fn(logits, ids), jnp.float32)
  grad_batched = jax.grad(lambda x: jnp.sum(fn(x, ids)))(logits)
  grad_vmapped = jax.grad(lambda x: jnp.sum(jax.vmap(jax.vmap(per_anchor))(x, ids)))(logits)
  assert_close(grad_vmapped, grad_batched, jnp.float32)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_jit_equals_eager(loss, reduction):
  fn, family = loss
  logits, ids = _batch(family, seed=5)
  eager = fn(logits, ids, reduction=reduction)
  jitted = jax.jit(lambda x, y: fn(x, y, reduction=reduction))(logits, ids)
  np.testing.assert_array_max_ulp(np.asarray(jitted), np.asarray(eager), maxulp=1)
  # Eagerly, JAX runs the forward and backward passes as two programs, jit as one,
  # so the gradient may round differently: within one float32 ulp of its scale.
  grad = lambda x: jax.grad(lambda x: jnp.sum(fn(x, ids, reduction=reduction)))(x)
  eager_grad = np.asarray(grad(logits))
  atol = np.finfo(np.float32).eps * np.max(np.abs(eager_grad))
  np.testing.assert_allclose(jax.jit(grad)(logits), eager_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes_unreduced_in_logits_dtype_reduced_in_float32(loss, dtype, transform):
  fn, family = loss
  logits, ids = _batch(family, dtype)
  wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
  assert transform(lambda x: fn(x, ids))(logits).dtype == dtype
  for reduction in ("sum", "mean"):
    assert transform(lambda x: fn(x, ids, reduction=reduction))(logits).dtype == wide
  assert jax.grad(lambda x: fn(x, ids, reduction="sum"))(logits).dtype == dtype
  # Half-precision inputs are computed in float32: only the final rounding differs.
  assert_close(fn(logits, ids), fn(logits.astype(wide), ids), dtype)


def test_label_smoothing_equals_smoothed_float_targets(transform):
  logits, ids = _batch("sigmoid")
  one_hot = (np.asarray(ids)[..., None] == np.arange(NUM_CLASSES)).astype(np.float32)
  for eps in (0.0, 0.1, 0.5):
    smoothed = jnp.asarray(one_hot * (1 - eps) + eps / 2)
    got = transform(lambda x: jfocal.sigmoid_focal_loss(x, ids, label_smoothing=eps))(logits)
    assert_close(got, jfocal.sigmoid_focal_loss(logits, smoothed), jnp.float32)


def test_python_scalars_lists_and_numpy_arrays_are_accepted():
  assert jfocal.sigmoid_focal_loss(0.5, 1.0).shape == ()
  assert jfocal.sigmoid_cross_entropy([0.5, -1.0], [True, False]).shape == (2,)
  np.testing.assert_allclose(
      jfocal.softmax_cross_entropy(np.array([[1.0, 2.0]]), np.array([1])),
      np.log1p(np.exp(-1.0)), rtol=1e-12)


def test_bool_labels_equal_float_labels(transform):
  logits, _ = _batch("sigmoid")
  labels = np.random.default_rng(2).uniform(size=logits.shape) > 0.7
  fn = transform(jfocal.sigmoid_focal_loss)
  np.testing.assert_array_equal(fn(logits, jnp.asarray(labels)),
                                fn(logits, jnp.asarray(labels, jnp.float32)))


def test_jvp_and_linearize_agree_with_grad(loss):
  fn, family = loss
  logits, ids = _batch(family, jnp.float64, seed=7)
  total = lambda x: jnp.sum(fn(x, ids))
  direction = jnp.asarray(np.random.default_rng(8).normal(size=logits.shape))
  expected = jnp.vdot(jax.grad(total)(logits), direction)
  _, forward = jax.jvp(total, (logits,), (direction,))
  _, linear = jax.linearize(total, logits)
  np.testing.assert_allclose(forward, expected, rtol=1e-12)
  np.testing.assert_allclose(linear(direction), expected, rtol=1e-12)
