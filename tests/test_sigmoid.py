"""The sigmoid family against textbook formulas, the paper's closed forms, optax and itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jfocal
import references as ref
import strategies as S
from helpers import (assert_close, compiled_as_users_get_it, on_reference_device, optional_array,
                     with_grad)

# Central differences in float64 with this step agree to about step**2 * f''' / 6.
FD_STEP = 1e-5
FD_RTOL = 1e-6


def _alpha(draw, kind, num_classes):
  if kind == "none":
    return None
  if kind == "scalar":
    return draw(st.floats(0.0, 1.0))
  return np.asarray(draw(S.probabilities((num_classes,))))


@st.composite
def sigmoid_cases(draw, bound=12.0, label_kinds=("hard", "soft", "ids")):
  dtype = draw(S.dtypes)
  num_classes = draw(st.integers(1, 4))
  shape = draw(S.batch_shapes) + (num_classes,)
  kind = draw(st.sampled_from(label_kinds))
  x = draw(S.logits(shape, bound))
  if kind == "ids":
    ids = np.asarray(draw(S.hnp.arrays(np.int32, shape[:-1],
                                       elements=st.integers(0, num_classes))))
    labels = jnp.asarray(ids)
    y64 = (ids[..., None] == np.arange(num_classes)).astype(np.float64)
  else:
    y = draw(S.hard_labels(shape) if kind == "hard" else S.probabilities(shape))
    labels, y64 = S.cast(y, dtype)
  logits, x64 = S.cast(x, dtype)
  alpha = _alpha(draw, draw(st.sampled_from(["none", "scalar", "vector"])), num_classes)
  face = draw(st.sampled_from(sorted(FACES)))
  if face == "sigmoid_cross_entropy":
    alpha = None
  if face != "sigmoid_focal_loss":
    gamma = 0.0
  else:
    gamma = draw(S.gammas)
  return dict(dtype=dtype, logits=logits, x64=x64, labels=labels, y64=y64, kind=kind,
              alpha=alpha, gamma=gamma, face=face)


# Each public face and how it calls the shared core; the reference only sees alpha and gamma.
FACES = {
    "sigmoid_cross_entropy": lambda x, y, alpha, gamma: jfocal.sigmoid_cross_entropy(x, y),
    "sigmoid_balanced_cross_entropy": lambda x, y, alpha, gamma:
        jfocal.sigmoid_balanced_cross_entropy(x, y, alpha=alpha),
    "sigmoid_focal_loss": lambda x, y, alpha, gamma:
        jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma),
}


def _loss(case):
  face = FACES[case["face"]]
  return jax.jit(lambda x, y: face(x, y, case["alpha"], case["gamma"]))


@given(case=sigmoid_cases(bound=1e4, label_kinds=("hard", "ids")))
def test_gradient_matches_the_papers_closed_form_at_any_logit(case):
  fn = _loss(case)
  grad = jax.grad(lambda x: jnp.sum(fn(x, case["labels"]).astype(jnp.float32)))(case["logits"])
  expected = ref.sigmoid_focal_grad_paper(case["x64"], case["y64"], case["alpha"], case["gamma"])
  assert_close(grad, expected, case["dtype"], what="d/dlogits")


@pytest.mark.parametrize("ignore_index", [None, -1, 0])
@pytest.mark.parametrize("mask_a_positive", [False, True])
def test_num_positives_counts_unmasked_foreground_targets(ignore_index, mask_a_positive):
  """Counted from the ids (anchors in [0, C)), or from the targets when `where` is given."""
  ids = np.array([0, 2, 3, 1, 0, 3, 2])  # C = 3: id 3 is background
  if ignore_index is not None:
    ids[[3, 4]] = ignore_index
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(7, 3)), jnp.float32)
  where = np.ones((7, 3), bool)
  if mask_a_positive:
    where[1, 2] = False  # the target of anchor 1
  options = dict(ignore_index=ignore_index, where=jnp.asarray(where) if mask_a_positive else None)
  one_hot = (ids[:, None] == np.arange(3)) & where
  if ignore_index is not None:
    one_hot &= (ids != ignore_index)[:, None]
  loss = jax.jit(lambda x: jfocal.sigmoid_focal_loss(
      x, jnp.asarray(ids), reduction="mean", normalizer="num_positives", **options))
  total = jfocal.sigmoid_focal_loss(logits, jnp.asarray(ids), reduction="sum", **options)
  assert_close(loss(logits), float(total) / one_hot.sum(), jnp.float32)


@functools.partial(jax.jit, static_argnames="gamma")  # one program per gamma for all examples
def _alpha_and_weights_grads(alpha, weights, x, y, gamma):
  return jax.grad(lambda a, w: jnp.sum(jfocal.sigmoid_focal_loss(
      x, y, alpha=a, weights=w, gamma=gamma)), (0, 1))(alpha, weights)


@given(x=S.logits((3, 4), 12.0), y=S.probabilities((3, 4)), gamma=S.gammas,
       alpha=st.floats(0, 1), weights=S.probabilities((3, 1), high=3.0))
def test_gradients_with_respect_to_alpha_and_weights(x, y, gamma, alpha, weights):
  """alpha and weights are traced and differentiable, like the logits."""
  reference = on_reference_device(jax.grad(lambda a, w, x, y: jnp.sum(
      ref.sigmoid_focal(x, y, a, gamma) * w), (0, 1)))
  got = _alpha_and_weights_grads(jnp.float64(alpha), jnp.asarray(weights), jnp.asarray(x),
                                 jnp.asarray(y), gamma=gamma)
  want = reference(alpha, weights, x, y)
  for name, g, w in zip(("d/dalpha", "d/dweights"), got, want):
    assert_close(g, w, jnp.float64, what=name)


@given(x=S.logits((6,), 8.0), y=S.probabilities((6,)), gamma=S.gammas,
       alpha=st.none() | st.floats(0, 1))
def test_gradients_match_finite_differences(x, y, gamma, alpha):
  loss = lambda x, y: jnp.sum(jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma))
  x, y = jnp.asarray(x), jnp.asarray(y)
  grad_x, grad_y = jax.grad(loss, (0, 1))(x, y)
  for i in range(x.shape[0]):
    step = jnp.zeros_like(x).at[i].set(FD_STEP)
    fd_x = (loss(x + step, y) - loss(x - step, y)) / (2 * FD_STEP)
    np.testing.assert_allclose(grad_x[i], fd_x, rtol=FD_RTOL, atol=FD_RTOL)
    # Keep the label inside [0, 1] so both sides of the difference are valid targets.
    yi = jnp.clip(y[i], FD_STEP, 1 - FD_STEP)
    y_mid = y.at[i].set(yi)
    fd_y = (loss(x, y_mid + step) - loss(x, y_mid - step)) / (2 * FD_STEP)
    np.testing.assert_allclose(jax.grad(loss, 1)(x, y_mid)[i], fd_y, rtol=FD_RTOL, atol=FD_RTOL)


def _elementwise_second_derivatives(fn, x, y):
  """d2/dx2, d2/dxdy, d2/dy2 of an elementwise loss, by forward-over-reverse."""
  grad_x = lambda x, y: jax.grad(lambda x: jnp.sum(fn(x, y)))(x)
  grad_y = lambda x, y: jax.grad(lambda y: jnp.sum(fn(x, y)))(y)
  ones = jnp.ones_like(x)
  return (jax.jvp(lambda x: grad_x(x, y), (x,), (ones,))[1],
          jax.jvp(lambda y: grad_x(x, y), (y,), (ones,))[1],
          jax.jvp(lambda y: grad_y(x, y), (y,), (ones,))[1])


@functools.partial(jax.jit, static_argnames="gamma")
def _focal_second_derivatives(x, y, alpha, gamma):  # one program for all examples of a gamma
  return _elementwise_second_derivatives(
      lambda x, y: jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma), x, y)


@given(x=S.logits((8,), 10.0), y=S.probabilities((8,), 0.02, 0.98) | S.hard_labels((8,)),
       gamma=S.gammas, alpha=st.none() | st.floats(0, 1))
def test_second_derivatives_match_float64_textbook(x, y, gamma, alpha):
  reference = on_reference_device(
      lambda x, y: _elementwise_second_derivatives(
          lambda x, y: ref.sigmoid_focal(x, y, alpha, gamma), x, y))
  hard = bool(np.all((y == 0) | (y == 1)))
  got = _focal_second_derivatives(jnp.asarray(x), jnp.asarray(y), optional_array(alpha),
                                  gamma=gamma)
  want = reference(x, y)
  # Second derivatives that involve labels are only promised strictly inside (0, 1).
  names = ("d2/dx2",) if hard else ("d2/dx2", "d2/dxdy", "d2/dy2")
  for name, g, w in zip(names, got, want):
    assert_close(g, w, jnp.float64, what=name, scale=1e3)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_confidently_wrong_predictions_keep_their_gradient(gamma):
  # keras clips p to [eps, 1 - eps] and loses this gradient beyond |x| ~ 16.
  x = jnp.array([-20.0, -50.0, -1e4], jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(jfocal.sigmoid_focal_loss(x, jnp.ones_like(x),
                                                              alpha=None, gamma=gamma)))(x)
  np.testing.assert_allclose(grad, -1.0, rtol=1e-6)


@functools.partial(jax.jit, static_argnames="gamma")
def _ours_and_optaxs(x, y, gamma):
  return [(with_grad(lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma), x),
           with_grad(lambda x: optax.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma), x))
          for alpha in (None, 0.25)]


@given(x=S.logits((4, 3), 10.0), y=S.probabilities((4, 3)) | S.hard_labels((4, 3)),
       gamma=S.gammas)
def test_agrees_with_optax_sigmoid_focal_loss(x, y, gamma):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  for ours, theirs in _ours_and_optaxs(x, y, gamma=gamma):
    for name, got, expected in zip(("loss", "gradient"), ours, theirs):
      assert_close(got, expected, jnp.float32, what=f"{name} vs optax")


@given(x=S.logits((5, 2), 30.0), y=S.probabilities((5, 2)))
def test_cross_entropy_agrees_with_optax(x, y):
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  assert_close(jfocal.sigmoid_cross_entropy(x, y), optax.sigmoid_binary_cross_entropy(x, y),
               jnp.float32)


def test_balanced_cross_entropy_and_cross_entropy_are_focal_loss_at_gamma_zero(transform):
  x = jnp.linspace(-6.0, 6.0, 12).reshape(4, 3)
  y = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 3)))
  np.testing.assert_array_equal(
      transform(jfocal.sigmoid_balanced_cross_entropy)(x, y),
      transform(lambda x, y: jfocal.sigmoid_focal_loss(x, y, gamma=0.0))(x, y))
  np.testing.assert_array_equal(
      transform(jfocal.sigmoid_cross_entropy)(x, y),
      transform(lambda x, y: jfocal.sigmoid_focal_loss(x, y, alpha=None, gamma=0.0))(x, y))


@pytest.mark.parametrize("p_t, ratio", [(0.9, 100.0), (0.968, 1000.0)])
def test_papers_claimed_reduction_of_easy_examples(p_t, ratio):
  # Section 3.2: with gamma = 2, an example at p_t = 0.9 has 100x lower loss than
  # CE, at p_t ~ 0.968 1000x lower.
  x = jnp.log(p_t / (1 - p_t))
  ce = jfocal.sigmoid_cross_entropy(x, 1.0)
  fl = jfocal.sigmoid_focal_loss(x, 1.0, alpha=None, gamma=2.0)
  np.testing.assert_allclose(ce / fl, ratio, rtol=0.025)


def test_hard_examples_lose_at_most_a_factor_four():
  p_t = jnp.linspace(1e-4, 0.5, 200)
  x = jnp.log(p_t / (1 - p_t))
  ratio = jfocal.sigmoid_cross_entropy(x, jnp.ones_like(x)) / jfocal.sigmoid_focal_loss(
      x, jnp.ones_like(x), alpha=None, gamma=2.0)
  assert np.all(ratio <= 4.0 + 1e-9) and np.all(ratio >= 1.0)


def test_out_of_range_ids_give_nan_for_their_row_only(transform):
  x = jnp.zeros((4, 3), jnp.float32)
  ids = jnp.array([0, 3, 4, -2])  # valid, background, too large, negative
  loss = transform(lambda x, y: jfocal.sigmoid_focal_loss(x, y))(x, ids)
  assert np.all(np.isfinite(loss[:2])) and np.all(np.isnan(loss[2:]))
  assert np.isnan(transform(lambda x, y: jfocal.sigmoid_focal_loss(x, y, reduction="sum"))(x, ids))
  grad = jax.grad(lambda x: jnp.sum(jfocal.sigmoid_focal_loss(x, ids)))(x)
  assert np.all(np.isfinite(grad[:2])) and np.all(np.isnan(grad[2:]))


def test_ignore_index_masks_the_whole_anchor(transform):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  ids = jnp.array([0, -1, 3, 2])
  fn = transform(lambda x: jfocal.sigmoid_focal_loss(x, ids, ignore_index=-1, reduction="mean"))
  kept = np.array([0, 2, 3])
  expected = jfocal.sigmoid_focal_loss(x[kept], ids[kept], reduction="mean")
  np.testing.assert_allclose(fn(x), expected, rtol=1e-6)
  assert np.all(jax.grad(fn)(x)[1] == 0)


# One program per shape of pos_weight for all examples.
_pos_weight_value_and_grads = jax.jit(jax.value_and_grad(
    lambda x, y, w: jnp.sum(jfocal.sigmoid_cross_entropy(x, y, pos_weight=w)), (0, 1, 2)))


@given(x=S.logits((4, 3), 12.0), y=S.probabilities((4, 3)) | S.hard_labels((4, 3)),
       pos_weight=st.sampled_from([1e-3, 0.5, 1.0, 3.0, "vector"]))
def test_pos_weight_is_pytorchs_weight_of_the_positive_term(x, y, pos_weight):
  """-[w y log p + (1 - y) log(1 - p)], BCEWithLogitsLoss(pos_weight=w), for soft targets too;
  the derivatives in the logits, the targets and a traced w are the formula's."""
  w = np.array([0.5, 2.0, 7.0]) if pos_weight == "vector" else np.float64(pos_weight)
  theirs = lambda x, y, w: jnp.sum(ref.binary_cross_entropy(x, y, w))
  value, grads = _pos_weight_value_and_grads(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
  expected, expected_grads = on_reference_device(jax.value_and_grad(theirs, (0, 1, 2)))(x, y, w)
  assert_close(value, expected, jnp.float64, what="loss")
  for name, g, e in zip(("d/dx", "d/dy", "d/dpos_weight"), grads, expected_grads):
    assert_close(g, e, jnp.float64, what=name)


@given(x=S.logits((4, 3), 12.0), y=S.hard_labels((4, 3)), alpha=st.floats(0.0, 1.0),
       gamma=S.gammas, pos_weight=st.sampled_from([0.5, 1.0, 3.0]))
def test_pos_weight_of_the_focal_loss_is_kornias_for_hard_targets(x, y, alpha, gamma,
                                                                  pos_weight):
  got = jfocal.sigmoid_focal_loss(jnp.asarray(x), jnp.asarray(y), alpha=alpha, gamma=gamma,
                                  pos_weight=pos_weight)
  expected = on_reference_device(lambda x, y: ref.binary_focal_with_pos_weight(
      x, y, alpha, gamma, pos_weight))(x, y)
  assert_close(got, expected, jnp.float64)


def test_integer_targets_with_the_logits_shape_are_dense_targets(transform):
  """optax accepts 0/1 integer targets: they are dense targets; other integers are NaN."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 3)), jnp.float32)
  targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], np.int32)
  fn = transform(lambda x, t: jfocal.sigmoid_focal_loss(x, t))
  np.testing.assert_array_equal(fn(x, jnp.asarray(targets)),
                                fn(x, jnp.asarray(targets, jnp.float32)))
  bad = targets.copy()
  bad[1, 2] = 2
  loss = fn(x, jnp.asarray(bad))
  assert np.isnan(loss[1, 2]) and np.sum(np.isnan(loss)) == 1
  ignored = targets.copy()
  ignored[2, 0] = -1
  masked = transform(lambda x, t: jfocal.sigmoid_focal_loss(x, t, ignore_index=-1,
                                                            reduction="sum"))(x, ignored)
  keep = np.ones((4, 3), bool)
  keep[2, 0] = False
  assert_close(masked, jfocal.sigmoid_focal_loss(x, targets, where=keep, reduction="sum"),
               jnp.float32)
  # Scalar logits take a scalar 0/1 target.
  assert_close(jfocal.sigmoid_cross_entropy(jnp.float32(2.0), 1),
               jfocal.sigmoid_cross_entropy(jnp.float32(2.0), 1.0), jnp.float32)
