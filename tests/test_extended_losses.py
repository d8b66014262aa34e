"""The extended family: FL*, Poly-1, quality focal, varifocal and GHM-C, beyond the generic tests.

tests/test_references.py checks every loss against float64 autodiff of its
paper's formula; here are each loss's own properties: the core losses they
reduce to, second derivatives, (class_ids, scores) pairs, GHM-C's histogram,
state and mmdetection's numbers, and agreement with optax.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jfocal
import references as ref
import strategies as S
from helpers import assert_close, on_reference_device, optional_array, with_grad

@given(x=S.logits((4, 5), 20.0), y=S.probabilities((4, 5), 0.01, 1.0),
       epsilon=st.sampled_from([-1.0, 1.0, 2.0]))
def test_poly1_cross_entropy_agrees_with_optax(x, y, epsilon):
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y / y.sum(-1, keepdims=True), jnp.float32)
  ours = lambda x: jfocal.poly1_cross_entropy(x, y, epsilon=epsilon)
  theirs = lambda x: optax.losses.poly_loss_cross_entropy(x, y, epsilon=epsilon)
  assert_close(ours(x), theirs(x), jnp.float32, what="loss vs optax")
  assert_close(jax.grad(lambda x: jnp.sum(ours(x)))(x), jax.grad(lambda x: jnp.sum(theirs(x)))(x),
               jnp.float32, what="gradient vs optax")


def _second_derivatives(fn, x, y):
  grad_x = lambda x, y: jax.grad(lambda x: jnp.sum(fn(x, y)))(x)
  ones = jnp.ones_like(x)
  return (jax.jvp(lambda x: grad_x(x, y), (x,), (ones,))[1],
          jax.jvp(lambda y: grad_x(x, y), (y,), (ones,))[1])


SECOND_DERIVATIVE_CASES = {
    "focal_star": (lambda x, y: jfocal.sigmoid_focal_loss_star(x, y, gamma=2.0, beta=1.0),
                   lambda x, y: ref.focal_star(x, y, 0.25, 2.0, 1.0)),
    "poly1_focal": (lambda x, y: jfocal.poly1_focal_loss(x, y, epsilon=2.0, gamma=0.5),
                    lambda x, y: ref.poly1_focal(x, y, 0.25, 0.5, 2.0)),
    # A summed loss's derivative may read its value (an algebraic gamma): its own rule.
    "poly1_focal, sum": (
        lambda x, y: jfocal.poly1_focal_loss(x, y, epsilon=2.0, gamma=1.5, reduction="sum"),
        lambda x, y: ref.poly1_focal(x, y, 0.25, 1.5, 2.0)),
    "quality_focal 2.5, sum": (
        lambda x, y: jfocal.quality_focal_loss(x, y, beta=2.5, reduction="sum"),
        lambda x, y: ref.quality_focal(x, y, 2.5)),
    "asymmetric": (lambda x, y: jfocal.asymmetric_loss(x, y),
                   lambda x, y: ref.asymmetric(x, y, 1.0, 4.0, 0.05)),
    "asymmetric, sum": (lambda x, y: jfocal.asymmetric_loss(x, y, reduction="sum"),
                        lambda x, y: ref.asymmetric(x, y, 1.0, 4.0, 0.05)),
    "quality_focal": (lambda x, y: jfocal.quality_focal_loss(x, y, beta=2.0),
                      lambda x, y: ref.quality_focal(x, y, 2.0)),
    "varifocal": (lambda x, y: jfocal.varifocal_loss(x, y, gamma=1.5),
                  lambda x, y: ref.varifocal(x, y, 0.75, 1.5, True)),
}


# One program per loss for all examples.
_SECOND_DERIVATIVES = {name: jax.jit(functools.partial(_second_derivatives, fn))
                       for name, (fn, _) in SECOND_DERIVATIVE_CASES.items()}


@pytest.mark.parametrize("name", sorted(SECOND_DERIVATIVE_CASES))
@given(x=S.logits((8,), 10.0), y=S.probabilities((8,), 0.02, 0.98) | S.hard_labels((8,)))
def test_second_derivatives_match_float64_textbook(name, x, y):
  textbook = SECOND_DERIVATIVE_CASES[name][1]
  got = _SECOND_DERIVATIVES[name](jnp.asarray(x), jnp.asarray(y))
  want = on_reference_device(lambda x, y: _second_derivatives(textbook, x, y))(x, y)
  hard = bool(np.all((y == 0) | (y == 1)))
  names = ("d2/dx2",) if hard else ("d2/dx2", "d2/dxdy")
  for what, g, w in zip(names, got, want):
    assert_close(g, w, jnp.float64, what=what, scale=1e3)


# --------------------------------------------------------------------------------------------
# Reductions to the core losses, where the papers say so


# One program per label form, dtype and static option, for every example: the drawn
# arrays, alpha included, are its arguments.
@jax.jit
def _star_and_cross_entropy(x, y, alpha):
  star = lambda x: jfocal.sigmoid_focal_loss_star(x, y, alpha=alpha, gamma=1.0, beta=0.0)
  core = lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=0.0)
  return with_grad(star, x), with_grad(core, x)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 20.0), y=S.probabilities((4, 3)) | S.hard_labels((4, 3)),
       alpha=st.none() | st.floats(0.0, 1.0))
def test_focal_star_with_gamma_one_and_beta_zero_is_cross_entropy(dtype, x, y, alpha):
  x, y = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
  got, expected = _star_and_cross_entropy(x, y, optional_array(alpha, dtype))
  for g, e in zip(got, expected):
    assert_close(g, e, dtype)


@functools.partial(jax.jit, static_argnames="gamma")
def _poly1_and_core(x, ids, alpha, gamma):
  pairs = [
      (lambda x: jfocal.poly1_focal_loss(x, ids, epsilon=0.0, alpha=alpha, gamma=gamma),
       lambda x: jfocal.sigmoid_focal_loss(x, ids, alpha=alpha, gamma=gamma)),
      (lambda x: jfocal.poly1_cross_entropy(x, jnp.minimum(ids, 2), epsilon=0.0),
       lambda x: jfocal.softmax_cross_entropy(x, jnp.minimum(ids, 2))),
  ]
  return [(with_grad(poly, x), with_grad(core, x)) for poly, core in pairs]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 20.0), ids=S.hnp.arrays(np.int32, (4,), elements=st.integers(0, 3)),
       gamma=st.sampled_from([0.0, 0.5, 2.0]), alpha=st.none() | st.floats(0.0, 1.0))
def test_poly1_with_epsilon_zero_is_cross_entropy_and_focal_loss(dtype, x, ids, gamma, alpha):
  x, ids = jnp.asarray(x).astype(dtype), jnp.asarray(ids)
  for got, expected in _poly1_and_core(x, ids, optional_array(alpha, dtype), gamma=gamma):
    for g, e in zip(got, expected):
      assert_close(g, e, dtype)


@functools.partial(jax.jit, static_argnames="beta")
def _quality_and_focal(x, y, beta):
  quality = lambda x: jfocal.quality_focal_loss(x, y, beta=beta)
  focal = lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=None, gamma=beta)
  return with_grad(quality, x), with_grad(focal, x)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 1e4), y=S.hard_labels((4, 3)),
       beta=st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5]))
def test_quality_focal_with_hard_targets_is_focal_loss_with_gamma_beta_and_no_alpha(
    dtype, x, y, beta):
  x, y = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
  got, expected = _quality_and_focal(x, y, beta=beta)
  for g, e in zip(got, expected):
    assert_close(g, e, dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_quality_focal_with_beta_zero_is_cross_entropy_also_where_sigma_equals_the_score(dtype):
  # |y - sigma|**0 = 1, also at sigma = y exactly (x = 0, y = 1/2), for a static and for a
  # traced beta.
  x = jnp.asarray([0.0, 0.0, 5.0, -4.0, 2.0, -3.0], dtype)
  y = jnp.asarray([0.5, 0.25, 1.0, 0.0, 0.5, 0.9], dtype)
  expected = on_reference_device(lambda x, y: (ref.binary_cross_entropy(x, y), jax.grad(
      lambda x: jnp.sum(ref.binary_cross_entropy(x, y)))(x)))(
          np.asarray(x, np.float64), np.asarray(y, np.float64))
  traced = jax.jit(lambda x, beta: jfocal.quality_focal_loss(x, y, beta=beta))
  for beta, fn in ((0.0, lambda x: jfocal.quality_focal_loss(x, y, beta=0.0)),
                   ("traced", lambda x: traced(x, jnp.asarray(0.0, dtype)))):
    got = (fn(x), jax.grad(lambda x: jnp.sum(fn(x)))(x))
    for name, g, e in zip(("loss", "d/dlogits"), got, expected):
      assert_close(g, e, dtype, what=f"{name}, beta {beta}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ghmc_with_one_bin_is_cross_entropy(reduction, transform):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 4)) * 4, jnp.float32)
  ids = jnp.array([0, 4, 2, 3, 4])
  ghm = transform(lambda x: jfocal.ghmc_loss(x, ids, bins=1, reduction=reduction)[0])
  core = lambda x: jfocal.sigmoid_cross_entropy(x, ids, reduction=reduction)
  assert_close(ghm(x), core(x), jnp.float32)
  assert_close(jax.grad(lambda x: jnp.sum(ghm(x)))(x), jax.grad(lambda x: jnp.sum(core(x)))(x),
               jnp.float32)


def test_varifocal_with_hard_targets_is_cross_entropy_on_positives_and_focal_on_negatives():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)) * 4, jnp.float32)
  q = jnp.asarray(np.random.default_rng(2).uniform(size=(6, 3)) < 0.3, jnp.float32)
  got = jfocal.varifocal_loss(x, q, alpha=0.75, gamma=2.0)
  ce = jfocal.sigmoid_cross_entropy(x, q)
  focal_negative = 0.75 * jfocal.sigmoid_focal_loss(x, jnp.zeros_like(q), alpha=None)
  assert_close(got, jnp.where(q > 0, ce, focal_negative), jnp.float32)


# --------------------------------------------------------------------------------------------
# Labels: integer ids, (ids, scores) pairs, masks


LABELLED = {
    "quality_focal_loss": lambda x, y, **kw: jfocal.quality_focal_loss(x, y, beta=1.5, **kw),
    "varifocal_loss": lambda x, y, **kw: jfocal.varifocal_loss(x, y, gamma=1.5, **kw),
}


@pytest.mark.parametrize("name", sorted(LABELLED))
def test_ids_and_scores_equal_their_dense_targets(name, transform):
  fn = LABELLED[name]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 3)) * 3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=(2, 5)))  # 3 is background
  scores = jnp.asarray(rng.uniform(size=(2, 5)), jnp.float32).at[0, 0].set(0.0)
  dense = jnp.where(ids[..., None] == jnp.arange(3), scores[..., None], 0)
  got = transform(lambda x, i, s: fn(x, (i, s)))(x, ids, scores)
  np.testing.assert_array_equal(got, fn(x, dense))
  grad = lambda labels: jax.grad(lambda x: jnp.sum(fn(x, labels)))(x)
  np.testing.assert_array_equal(grad((ids, scores)), grad(dense))
  # Plain ids are score 1; num_positives counts foreground anchors, even at score 0.
  np.testing.assert_array_equal(fn(x, ids), fn(x, (ids, jnp.ones_like(scores))))
  total = float(fn(x, (ids, scores), reduction="sum"))
  by_positives = fn(x, (ids, scores), reduction="mean", normalizer="num_positives")
  assert_close(by_positives, total / int(np.sum(np.asarray(ids) < 3)), jnp.float32)


@pytest.mark.parametrize("name", sorted(LABELLED))
def test_ignore_index_and_masked_nan_scores(name, transform):
  fn = LABELLED[name]
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)), jnp.float32)
  ids = jnp.array([0, -1, 3, 2])
  scores = jnp.array([0.7, jnp.nan, 0.2, 0.9], jnp.float32)
  masked = transform(lambda x: fn(x, (ids, scores), ignore_index=-1, reduction="mean"))
  kept = np.array([0, 2, 3])
  np.testing.assert_allclose(masked(x), fn(x[kept], (ids[kept], scores[kept]), reduction="mean"),
                             rtol=1e-6)
  grad = jax.grad(masked)(x)
  assert np.all(grad[1] == 0) and np.all(np.isfinite(grad))


def test_ghmc_masks_leave_the_histogram():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(6, 3)) * 3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=6))
  keep = np.array([1, 1, 0, 1, 0, 1], bool)
  poisoned = jnp.where(keep[:, None], x, jnp.nan)
  masked, state = jfocal.ghmc_loss(poisoned, ids, where=jnp.asarray(keep)[:, None], bins=5,
                                   reduction="mean")
  sliced, sliced_state = jfocal.ghmc_loss(x[keep], ids[keep], bins=5, reduction="mean")
  assert_close(masked, sliced, jnp.float32)
  np.testing.assert_array_equal(state, sliced_state)
  grad = jax.grad(lambda x: jfocal.ghmc_loss(x, ids, where=jnp.asarray(keep)[:, None], bins=5,
                                             reduction="mean")[0])(poisoned)
  assert np.all(grad[~keep] == 0) and np.all(np.isfinite(grad))


# --------------------------------------------------------------------------------------------
# GHM-C: the histogram, the weights and the state


@functools.partial(jax.jit, static_argnames="bins")
def _ghmc_evaluate(x, y, where, state, momentum, *, bins):
  """Mean, new state, gradient and unreduced loss of GHM-C in one program."""
  loss = lambda x, reduction: jfocal.ghmc_loss(x, y, bins=bins, momentum=momentum, where=where,
                                               state=state, reduction=reduction)
  (value, new_state), grad = jax.value_and_grad(lambda x: loss(x, "mean"), has_aux=True)(x)
  return value, new_state, grad, loss(x, "none")[0]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(data=st.data(), bins=st.sampled_from([1, 2, 5, 10, 30]),
       momentum=st.sampled_from([0.0, 0.5, 0.75]))
def test_ghmc_matches_mmdetection(dtype, data, bins, momentum):
  shape = data.draw(st.sampled_from([(7,), (3, 4)]))
  x = data.draw(S.logits(shape, 8.0))
  y = data.draw(S.hard_labels(shape) | S.probabilities(shape))
  valid = np.asarray(data.draw(S.hnp.arrays(bool, shape)))
  acc = np.asarray(data.draw(S.hnp.arrays(np.float64, (bins,), elements=st.floats(0.0, 20.0))))
  logits, labels = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
  x64, y64 = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
  g = np.asarray(jnp.abs(jax.nn.sigmoid(logits) - labels), np.float64)
  weights, mean, new_acc = ref.ghmc_mmdetection(x64, y64, valid, bins, momentum, acc, g)
  state = jnp.asarray(acc, dtype)
  value, new_state, grad, unreduced = _ghmc_evaluate(logits, labels, jnp.asarray(valid), state,
                                                     jnp.asarray(momentum, dtype), bins=bins)
  assert_close(value, mean, dtype, what="mean")
  if momentum > 0:  # mmdetection keeps no state without momentum
    assert_close(new_state, new_acc, dtype, what="state")
  cross_entropy = np.logaddexp(0, x64) - x64 * y64
  assert_close(unreduced, np.where(valid, weights * cross_entropy, 0), dtype, what="unreduced")
  # The weights are constants for the derivative: d/dx = beta * (sigma(x) - y).
  total = max(valid.sum(), 1)
  assert_close(grad, np.where(valid, weights * (1 / (1 + np.exp(-x64)) - y64), 0) / total, dtype,
               what="gradient")


def _logit(p):
  return math.log(p / (1 - p))


def test_ghmc_state_over_three_steps_against_a_hand_computed_histogram():
  # bins=4: edges 0, .25, .5, .75, 1. Negatives (y = 0) have g = sigma(x) = p.
  bins, momentum = 4, 0.5
  steps = [
      [0.1, 0.2, 0.3, 0.6, 0.9, 0.95],  # counts [2, 1, 1, 2]
      [0.05, 0.1, 0.15, 0.8, 0.85, 0.9],  # counts [3, 0, 0, 3]
      [0.3, 0.4, 0.45, 0.55, 0.6, 0.7],  # counts [0, 3, 3, 0]
  ]
  # acc <- momentum * acc + (1 - momentum) * count, only in non-empty bins:
  expected_states = [[1.0, 0.5, 0.5, 1.0], [2.0, 0.5, 0.5, 2.0], [2.0, 1.75, 1.75, 2.0]]
  # beta = N / (acc of the element's bin * non-empty bins), N = 6:
  expected_betas = [
      [6 / 4, 6 / 4, 6 / 2, 6 / 2, 6 / 4, 6 / 4],
      [6 / 4] * 6,
      [6 / 3.5] * 6,
  ]
  step = jax.jit(lambda x, y, s: jfocal.ghmc_loss(x, y, bins=bins, momentum=momentum, state=s))
  state = jfocal.ghmc_init(bins, dtype=jnp.float32)
  assert state.shape == (bins,) and state.dtype == jnp.float32 and np.all(state == 0)
  zeros = jnp.zeros((6,), jnp.float32)
  for probabilities, expected_state, expected_beta in zip(steps, expected_states,
                                                          expected_betas):
    x = jnp.asarray([_logit(p) for p in probabilities], jnp.float32)
    loss, state = step(x, zeros, state)
    np.testing.assert_allclose(state, expected_state, rtol=1e-6)
    np.testing.assert_allclose(loss, np.array(expected_beta) * np.log1p(np.exp(np.asarray(x))),
                               rtol=1e-5)
    assert state.dtype == jnp.float32


def test_ghmc_without_momentum_weights_by_this_batch_only():
  x = jnp.asarray([_logit(p) for p in (0.1, 0.2, 0.3, 0.6, 0.9, 0.95)], jnp.float32)
  y = jnp.zeros((6,), jnp.float32)
  stale = jnp.array([100.0, 100.0, 100.0, 100.0], jnp.float32)
  loss, state = jfocal.ghmc_loss(x, y, bins=4, state=stale)
  np.testing.assert_allclose(loss / np.log1p(np.exp(np.asarray(x))),
                             [0.75, 0.75, 1.5, 1.5, 0.75, 0.75], rtol=1e-5)
  np.testing.assert_array_equal(state, [2.0, 1.0, 1.0, 2.0])


def test_ghmc_counts_a_bin_past_float32s_integers():
  """A detector's batch puts more than 2**24 elements in the easy bin, where a float32
  running count of ones stops at 2**24 (and the weights grow by N / 2**24): 2e7 easy
  negatives and 4 hard ones, in float32, with integer class ids."""
  anchors, classes = 250_000, 80
  x = jnp.full((anchors, classes), -20.0, jnp.float32).at[0, :4].set(20.0)
  ids = jnp.full((anchors,), classes, jnp.int32)  # every anchor background
  loss, state = jax.jit(lambda x, ids: jfocal.ghmc_loss(x, ids, bins=2, reduction="sum"))(x, ids)
  np.testing.assert_array_equal(state, [anchors * classes - 4, 4])
  # beta = N / (count * 2 populated bins): N / 2 in total for each bin.
  n = anchors * classes
  expected = n / 2 * float(jax.nn.softplus(-20.0)) + n / 2 * float(jax.nn.softplus(20.0))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_ghmc_in_a_scanned_training_loop_equals_a_python_loop():
  rng = np.random.default_rng(6)
  xs = jnp.asarray(rng.normal(size=(5, 8, 3)) * 3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=(5, 8)))
  fn = lambda s, x, y: jfocal.ghmc_loss(x, y, bins=6, momentum=0.75, state=s, reduction="mean")

  def body(state, batch):
    loss, state = fn(state, *batch)
    return state, loss

  final, losses = jax.jit(lambda s: jax.lax.scan(body, s, (xs, ids)))(jfocal.ghmc_init(6))
  state = jfocal.ghmc_init(6)
  for i in range(5):
    loss, state = fn(state, xs[i], ids[i])
    assert_close(losses[i], loss, jnp.float32)
  assert_close(final, state, jnp.float32)


def test_ghmc_vmap_over_independent_batches_and_grad(transform):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, 8, 2)) * 3, jnp.float32)
  y = jnp.asarray(rng.uniform(size=(3, 8, 2)) < 0.3, jnp.float32)
  fn = lambda x, y: jfocal.ghmc_loss(x, y, bins=5, reduction="mean")
  batched, states = transform(jax.vmap(fn))(x, y)
  for i in range(3):
    loss, state = fn(x[i], y[i])
    assert_close(batched[i], loss, jnp.float32)
    np.testing.assert_array_equal(states[i], state)
  grads = jax.grad(lambda x: jnp.sum(jax.vmap(fn)(x, y)[0]))(x)
  assert_close(grads[1], jax.grad(lambda x: fn(x, y[1])[0])(x[1]), jnp.float32)


def test_quality_focal_gradient_at_its_minimum_is_zero():
  # sigma(0) = 0.5 = the target: the loss is 0, its minimum, for every beta.
  for beta in (0.0, 0.5, 1.0, 2.0):
    x = jnp.zeros((1,), jnp.float32)
    y = jnp.full((1,), 0.5, jnp.float32)
    fn = lambda x: jnp.sum(jfocal.quality_focal_loss(x, y, beta=beta))
    expected = 0.0 if beta > 0 else float(np.log(2.0))
    np.testing.assert_allclose(fn(x), expected, atol=1e-7)
    assert float(jax.grad(fn)(x)[0]) == 0.0



def test_static_options_refuse_tracers_and_say_how_to_fix_it():
  """bins sets the histogram's shape and iou_weighted the program; every other option may be traced
  (tests/test_references.py)."""
  x = jnp.zeros((4, 3), jnp.float32)
  ids = jnp.zeros((4,), jnp.int32)
  static = {
      "bins": lambda x, p: jfocal.ghmc_loss(x, ids, bins=p)[0],
      "iou_weighted": lambda x, p: jfocal.varifocal_loss(x, ids, iou_weighted=p),
      "label_smoothing": lambda x, p: jfocal.sigmoid_focal_loss(x, ids, label_smoothing=p),
  }
  for name, fn in static.items():
    with pytest.raises(TypeError, match=f"{name} must be a static Python value"):
      jax.jit(fn)(x, 1)


# --------------------------------------------------------------------------------------------
# Asymmetric loss, logit-adjusted cross-entropy and the z-loss


@functools.partial(jax.jit, static_argnames="gamma")
def _asymmetric_and_core(x, y, gamma):
  """ASL without the clip and with one gamma, beside the loss it is: CE (gamma = 0) or focal."""
  asymmetric = lambda x: jfocal.asymmetric_loss(x, y, gamma_pos=gamma, gamma_neg=gamma, clip=0.0)
  core = lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=None, gamma=gamma)
  return with_grad(asymmetric, x), with_grad(core, x)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 1e4), y=S.probabilities((4, 3)) | S.hard_labels((4, 3)),
       gamma=st.sampled_from([0.0, 0.5, 2.0]))
def test_asymmetric_loss_without_clip_and_asymmetry_is_focal_loss_and_cross_entropy(
    dtype, x, y, gamma):
  (value, grad), (core_value, core_grad) = _asymmetric_and_core(
      jnp.asarray(x, dtype), jnp.asarray(y, dtype), gamma)
  assert_close(value, core_value, dtype, what=f"ASL with gamma {gamma}, clip 0")
  assert_close(grad, core_grad, dtype, what="its gradient", scale=1 + float(np.abs(x).max()))


@pytest.mark.parametrize("params", [
    dict(gamma_pos=1.0, gamma_neg=4.0, clip=0.05),   # the authors' and timm's defaults
    dict(gamma_pos=0.0, gamma_neg=2.0, clip=0.2),
    dict(gamma_pos=0.5, gamma_neg=1.5, clip=0.0)])
def test_asymmetric_loss_agrees_with_the_authors_code(params):
  """The authors' forward (timm's AsymmetricLossMultiLabel) on multi-label 0/1 targets:
  its negated sum; its eps clamp never acts at these logits."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 9)) * 4
  y = (rng.uniform(size=(6, 9)) < 0.3).astype(np.float64)
  ours = jfocal.asymmetric_loss(x, y.astype(np.int32), **params, reduction="sum")
  assert_close(ours, ref.asymmetric_authors_code(x, y, **params), jnp.float64,
               what="sum vs the authors' code")


def test_asymmetric_probability_shift_discards_easy_negatives_and_has_the_papers_gradient():
  """Negatives with p <= clip cost exactly 0 with exactly zero gradient (the hard
  threshold); above it, the gradient is the paper's
  dL-/dx = p (1 - p) p_m**g [1 / (1 - p_m) - g log(1 - p_m) / p_m], here in float64 from
  log1p at logits up to 30, and positives keep the focal gradient of gamma_pos."""
  clip, gamma_neg, gamma_pos = 0.05, 4.0, 1.0
  easy = np.log(clip / (1 - clip)) - np.array([1e-9, 1e-6, 1.0, 1e4])  # p < clip
  hard = np.array([-2.9, -1.0, 0.0, 3.0, 30.0])
  x = np.concatenate([easy, hard])
  value, grad = with_grad(lambda x: jfocal.asymmetric_loss(
      x, np.zeros(x.shape, np.int32), gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip), x)
  assert (np.asarray(value[:4]) == 0).all() and (np.asarray(grad[:4]) == 0).all()
  p = 1 / (1 + np.exp(-hard))
  p_m = p - clip
  log1m = np.log1p(-p_m)
  paper = p * (1 - p) * p_m ** gamma_neg * (1 / (1 - p_m) - gamma_neg * log1m / p_m)
  assert_close(grad[4:], paper, jnp.float64, what="negatives' gradient vs the paper")
  positive = with_grad(lambda x: jfocal.asymmetric_loss(
      x, np.ones(x.shape, np.int32), gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip), hard)
  assert_close(positive[1], ref.sigmoid_focal_grad_paper(hard, np.ones(5), None, gamma_pos),
               jnp.float64, what="positives' gradient vs the focal paper")


@pytest.mark.parametrize("clip", [0.05, 0.2, 0.7, 1e-6])
def test_asymmetric_loss_of_a_negative_near_the_clip_keeps_the_precision_of_p_m(clip):
  """-log(1 - p_m) for p_m from 1e-7 to 0.95 (1 - c) is exact up to the rounding of p (its part
  ~eps c) and a few ulps of its own, in float32 against float64 from the same logits: a
  small p_m is carried by p - c, not by the rounded 1 - p_m, whose error (~eps) would be
  up to 10**6 times p_m."""
  c = float(np.float32(clip))
  logit = lambda p: np.log(p) - np.log1p(-p)
  p_m = np.concatenate([np.geomspace(1e-7, 0.5 * (1 - c), 400),
                        np.linspace(0.5 * (1 - c), 0.95 * (1 - c), 100)])
  x = logit(c + p_m).astype(np.float32)
  x = x[jax.nn.sigmoid(x.astype(np.float64)) > c]
  value = jax.jit(lambda x: jfocal.asymmetric_loss(x, jnp.zeros(x.shape, jnp.int32),
                                                   gamma_pos=0.0, gamma_neg=0.0, clip=c))(x)
  b = -np.log1p(-(1 / (1 + np.exp(-x.astype(np.float64))) - c))
  eps = np.finfo(np.float32).eps
  error = np.abs(np.asarray(value, np.float64) - b)
  assert (error <= 4 * eps * (c + b)).all(), np.max(error / (eps * (c + b)))


TRANSCENDENTALS = re.compile(r"= \S+ (exponential|log|log-plus-one|power|logistic)\(")


# Losses with a program of their own for 0/1 targets known as such (integer or bool), and
# the transcendentals (per pass: value and derivative) it saves against float targets.
ONE_SIDE = {
    # m is q or p_m, and each side takes its own power: no log m, no exp(g log m).
    "ASL, gammas 1 and 4": (functools.partial(jfocal.asymmetric_loss, gamma_pos=1.0,
                                              gamma_neg=4.0), 2),
    "ASL, gammas 0 and 2.5": (functools.partial(jfocal.asymmetric_loss, gamma_pos=0.0,
                                                gamma_neg=2.5), 2),
    "ASL, gammas 2 and 0": (functools.partial(jfocal.asymmetric_loss, gamma_pos=2.0,
                                              gamma_neg=0.0), 2),
    # Other gammas keep the general m**g, which two powers would only double.
    "ASL, gammas 0.5 and 4.7": (functools.partial(jfocal.asymmetric_loss, gamma_pos=0.5,
                                                  gamma_neg=4.7), 0),
    # One softplus, of the target's side, instead of both.
    "FL*": (functools.partial(jfocal.sigmoid_focal_loss_star, gamma=2.0, beta=1.0), 2),
}


@pytest.mark.parametrize("name", list(ONE_SIDE))
def test_0_1_integer_targets_take_their_own_program(name):
  """Integer 0/1 targets: the loss, gradient and Hessian of the same targets as floats
  (the general form), with fewer transcendentals in value-and-grad."""
  fn, saved = ONE_SIDE[name]
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(8, 5)) * 4, jnp.float32)
  y = rng.uniform(size=(8, 5)) < 0.4
  loss = lambda x, y: fn(x, y, reduction="sum")
  derivatives = jax.jit(lambda x, y: (loss(x, y), jax.grad(loss)(x, y),
                                      jax.hessian(loss)(x, y)))
  hard, soft = (jnp.asarray(y, jnp.int32), jnp.asarray(y, jnp.float32))
  for got, want, what in zip(derivatives(x, hard), derivatives(x, soft),
                             ("value", "gradient", "Hessian"), strict=True):
    assert_close(got, want, jnp.float32, what=what)
  count = lambda y: len(TRANSCENDENTALS.findall(
      jax.jit(jax.value_and_grad(loss)).lower(x, y).compile().as_text()))
  # Where XLA does not fence, value and derivative share them: count one pass.
  assert count(hard) <= count(soft) - saved, (count(hard), count(soft))


def test_asymmetric_loss_detached_focusing_weights_the_cross_entropy_gradient():
  """detach_focusing: the same loss; its gradient is the weight (1 - p_t)**g times the
  gradient of the shifted cross-entropy, in the logits and in soft targets."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 4)) * 3
  y = rng.uniform(size=(5, 4))
  call = lambda detach: lambda x, y: jfocal.asymmetric_loss(
      x, y, gamma_pos=2.0, gamma_neg=3.0, clip=0.1, detach_focusing=detach)
  total = lambda fn: lambda x, y: jnp.sum(fn(x, y))
  exact, detached = call(False), call(True)
  assert_close(detached(x, y), exact(x, y), jnp.float64, what="the value")
  p = 1 / (1 + np.exp(-x))
  p_m = np.maximum(p - 0.1, 0)
  weight = (y * (1 - p) + (1 - y) * p_m) ** (2.0 * y + 3.0 * (1 - y))
  d_dx = weight * (-y * (1 - p) + (1 - y) * np.where(p > 0.1, p * (1 - p) / (1 - p_m), 0))
  d_dy = weight * (np.log1p(np.exp(-x)) + np.log1p(-p_m))
  got_dx, got_dy = jax.grad(total(detached), (0, 1))(x, y)
  assert_close(got_dx, d_dx, jnp.float64, what="detached d/dx")
  assert_close(got_dy, d_dy, jnp.float64, what="detached d/dy")
  assert not np.allclose(jax.grad(total(exact))(x, y), got_dx)


def test_logit_adjusted_cross_entropy_reduces_to_cross_entropy():
  """tau = 0 and uniform priors are the cross-entropy; counts and their frequencies give
  the same loss; otherwise it is the cross-entropy of logits + tau log(priors), also with
  label smoothing, a per-logit mask and a tuple of class axes; the z-loss is of those
  adjusted logits."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 2, 3)) * 3)
  ids = jnp.asarray(rng.integers(0, 6, size=(4,)))
  counts = jnp.asarray([500, 200, 100, 50, 20, 5])
  priors = jfocal.class_priors_from_counts(counts)
  mask = jnp.asarray(rng.uniform(size=(4, 2, 3)) < 0.8).at[:, 0, 0].set(True)
  options = dict(axis=(1, 2), label_smoothing=0.1, where=mask)
  adjusted = lambda **kw: jfocal.logit_adjusted_cross_entropy(x, ids, **options, **kw)
  plain = lambda x, **kw: jfocal.softmax_cross_entropy(x, ids, **options, **kw)
  assert_close(adjusted(class_priors=priors, tau=0.0, z_loss=1e-3), plain(x, z_loss=1e-3),
               jnp.float64, what="tau = 0")
  assert_close(adjusted(class_priors=jnp.full(6, 0.2)), plain(x), jnp.float64,
               what="uniform priors")
  assert_close(adjusted(class_priors=counts, tau=1.5, z_loss=1e-3),
               adjusted(class_priors=priors, tau=1.5, z_loss=1e-3), jnp.float64,
               what="counts as priors")
  shifted = x + 1.5 * jnp.log(priors).reshape(2, 3)
  assert_close(adjusted(class_priors=priors, tau=1.5, z_loss=1e-3), plain(shifted, z_loss=1e-3),
               jnp.float64, what="CE of the shifted logits")


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.0])
def test_logit_adjusted_expected_loss_is_minimal_at_the_adjusted_prior(tau):
  """Menon et al.'s consistency: with targets distributed as the priors pi, the expected
  loss is minimal (zero gradient) at logits (1 - tau) log pi, so for tau = 1 the trained
  logits carry no prior (the balanced classifier)."""
  priors = np.array([0.6, 0.25, 0.1, 0.05])
  x = (1 - tau) * np.log(priors)
  grad = jax.grad(lambda x: jfocal.logit_adjusted_cross_entropy(
      x, priors, class_priors=priors, tau=tau))(x)
  assert_close(grad, np.zeros(4), jnp.float64, what="gradient at the minimiser")
  moved = jax.grad(lambda x: jfocal.logit_adjusted_cross_entropy(
      x, priors, class_priors=priors, tau=tau))(x + np.array([0.1, 0, 0, 0]))
  assert np.abs(moved).max() > 1e-3


@given(x=S.logits((3, 5), 30.0), ids=S.hnp.arrays(np.int32, (3,), elements=st.integers(0, 4)),
       z_loss=st.sampled_from([1e-4, 0.1]))
def test_z_loss_agrees_with_t5x_and_has_gradient_two_z_lse_softmax(x, ids, z_loss):
  """T5X's cross_entropy_with_logits(z_loss) and PaLM's z-loss: CE + z log(Z)**2, with the
  gradient softmax(x) - onehot + 2 z log(Z) softmax(x), in float64."""
  value, grad = with_grad(lambda x: jfocal.softmax_cross_entropy(x, ids, z_loss=z_loss), x)
  assert_close(value, ref.cross_entropy_with_z_loss_t5x(x, ids, z_loss), jnp.float64,
               what="loss vs T5X")
  top = x.max(-1, keepdims=True)
  log_z = top + np.log(np.exp(x - top).sum(-1, keepdims=True))
  p = np.exp(x - log_z)
  expected = p - (np.arange(5) == ids[:, None]) + 2 * z_loss * log_z * p
  assert_close(grad, expected, jnp.float64, what="gradient", scale=30.0)


def test_class_priors_from_counts():
  priors = jfocal.class_priors_from_counts(np.array([30, 10, 60]))
  np.testing.assert_allclose(np.asarray(priors), [0.3, 0.1, 0.6], rtol=1e-15)
  assert priors.dtype == jnp.float64  # the suite's x64 mode: JAX's default float
  assert jfocal.class_priors_from_counts(np.ones(2, np.float32)).dtype == jnp.float32
