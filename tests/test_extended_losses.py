"""The extended family: FL*, Poly-1, quality focal, varifocal, GHM-C and class-balanced alpha.

Every loss is checked against float64 autodiff of its paper's formula written
plainly below (trusted where float64 keeps it finite: moderate logits), against
the core loss it reduces to, at extreme logits, under jit, vmap and grad, and
for its trace-time validation.
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
from conftest import FLOAT_DTYPES, assert_close

# --------------------------------------------------------------------------------------------
# float64 references, as the papers write them


def _sigmoid(x):
  return 1 / (1 + jnp.exp(-x))


def _binary_cross_entropy(x, y):
  p = _sigmoid(x)
  return -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def focal_star_textbook(x, y, alpha, gamma, beta):
  """Lin et al. 2017, appendix A: FL* = -log sigma(gamma x_t + beta) / gamma, times alpha_t.

  x_t = x for a positive and -x for a negative; a soft target mixes the two.
  """
  positive = -jnp.log(_sigmoid(gamma * x + beta)) / gamma
  negative = -jnp.log(_sigmoid(-gamma * x + beta)) / gamma
  return ref.sigmoid_alpha_t(y, alpha) * (y * positive + (1 - y) * negative)


def poly1_focal_textbook(x, y, alpha, gamma, epsilon):
  """Leng et al. 2022: FL + eps (1 - p_t)^(gamma + 1); alpha_t weights FL only."""
  p = _sigmoid(x)
  p_t = y * p + (1 - y) * (1 - p)
  return ref.sigmoid_focal_textbook(x, y, alpha, gamma) + epsilon * (1 - p_t) ** (gamma + 1)


def poly1_cross_entropy_textbook(x, y, epsilon):
  """Leng et al. 2022: CE + eps (1 - p_t), with 1 - p_t = sum_c y_c (1 - p_c) (the paper's code)."""
  p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  return (ref.softmax_focal_textbook(x, y, None, 0.0)
          + epsilon * jnp.sum(y * (1 - p), axis=-1))


def quality_focal_textbook(x, y, beta):
  """Li et al. 2020, eq. 5: QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)."""
  return jnp.abs(y - _sigmoid(x)) ** beta * _binary_cross_entropy(x, y)


def varifocal_textbook(x, q, alpha, gamma, iou_weighted):
  """Zhang et al. 2021, eq. 2: -q (q log p + (1 - q) log(1 - p)) if q > 0, -alpha p^gamma log(1 - p)."""
  p = _sigmoid(x)
  positive = -(q if iou_weighted else 1.0) * (q * jnp.log(p) + (1 - q) * jnp.log(1 - p))
  negative = -alpha * p ** gamma * jnp.log(1 - p)
  return jnp.where(q > 0, positive, negative)


def ghmc_reference(x, y, valid, bins, momentum, acc_sum, g=None):
  """mmdetection's GHMC.forward (ghm_loss.py) transcribed to numpy: weights, mean and new acc_sum.

  `g`, the gradient norms, default to float64 ones; a float32 run passes its own
  (a sigmoid one ulp off moves an element that sits on an edge to the next bin).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if g is None:
    g = np.abs(1 / (1 + np.exp(-x)) - y)
  edges = np.arange(bins + 1) / bins
  edges[-1] += 1e-6
  acc_sum = np.array(acc_sum, np.float64)
  weights = np.zeros_like(x)
  total = max(valid.sum(), 1.0)
  n = 0
  for i in range(bins):
    inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
    num_in_bin = inds.sum()
    if num_in_bin > 0:
      if momentum > 0:
        acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * num_in_bin
        weights[inds] = total / acc_sum[i]
      else:
        weights[inds] = total / num_in_bin
      n += 1
  if n > 0:
    weights = weights / n
  cross_entropy = np.logaddexp(0, x) - x * y
  return weights, np.sum(weights * cross_entropy) / total, acc_sum


# --------------------------------------------------------------------------------------------
# Strategies


@st.composite
def sigmoid_inputs(draw, bound=12.0, label_kinds=("hard", "soft", "ids"), dtypes=S.dtypes):
  dtype = draw(dtypes)
  num_classes = draw(st.integers(1, 4))
  shape = draw(S.batch_shapes) + (num_classes,)
  kind = draw(st.sampled_from(label_kinds))
  logits, x64 = S.cast(draw(S.logits(shape, bound)), dtype)
  if kind == "ids":
    ids = np.asarray(draw(S.hnp.arrays(np.int32, shape[:-1],
                                       elements=st.integers(0, num_classes))))
    labels, y64 = jnp.asarray(ids), (ids[..., None] == np.arange(num_classes)).astype(np.float64)
  elif kind == "pairs":  # class id and quality score per anchor
    ids = np.asarray(draw(S.hnp.arrays(np.int32, shape[:-1],
                                       elements=st.integers(0, num_classes))))
    scores, scores64 = S.cast(draw(S.probabilities(shape[:-1])), dtype)
    labels = (jnp.asarray(ids), scores)
    y64 = (ids[..., None] == np.arange(num_classes)) * scores64[..., None]
  else:
    if kind == "hard":
      y = draw(S.hard_labels(shape))
    elif kind == "soft":
      y = draw(S.probabilities(shape))
    else:  # "sparse": IoU-like targets, mostly exact zeros
      y = draw(S.hnp.arrays(np.float64, shape,
                            elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0))))
    labels, y64 = S.cast(y, dtype)
  return dict(dtype=dtype, logits=logits, x64=x64, labels=labels, y64=y64, kind=kind,
              num_classes=num_classes)


def _alphas(num_classes):
  return st.one_of(st.none(), st.floats(0.0, 1.0),
                   S.probabilities((num_classes,)).map(np.asarray))


positive_gammas = st.one_of(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0]),
                            st.floats(0.05, 5.0, allow_nan=False))
betas = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.floats(0.0, 4.0))


def _check_against_reference(fn, textbook, case, *, differentiate_labels=True, skip=None):
  """Value and gradients of `fn` against float64 autodiff of `textbook`, at the case's dtype.

  `skip` (a float64 boolean array) marks elements where the textbook formula is
  not differentiable; the implementation must still be finite there.
  """
  dtype = case["dtype"]
  label_grad = differentiate_labels and case["kind"] not in ("ids", "pairs")
  argnums = (0, 1) if label_grad else (0,)
  reference = ref.on_reference_device(
      lambda x, y: (textbook(x, y), jax.grad(lambda x, y: jnp.sum(textbook(x, y)), argnums)(x, y)))
  expected_value, expected_grads = reference(case["x64"], case["y64"])

  @jax.jit
  def evaluate(x, y):  # one program for the loss and its gradients
    def total(x, y):
      loss = fn(x, y)
      return jnp.sum(loss.astype(jnp.float32)), loss
    (_, loss), grads = jax.value_and_grad(total, argnums, has_aux=True)(x, y)
    return loss, grads

  value, grads = evaluate(case["logits"], case["labels"])
  assert value.dtype == dtype
  assert_close(value, expected_value, dtype, what="loss")
  for name, got, want in zip(("d/dlogits", "d/dlabels"), grads, expected_grads):
    assert got.dtype == dtype
    got = np.asarray(got.astype(jnp.float64))
    assert np.all(np.isfinite(got)), f"{name} not finite: {got}"
    if skip is not None:
      got, want = np.where(skip, 0.0, got), np.where(skip, 0.0, want)
    assert_close(got, want, dtype, what=name)


# --------------------------------------------------------------------------------------------
# Agreement with the papers' formulas


@given(case=sigmoid_inputs(), data=st.data(), gamma=positive_gammas,
       beta=st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-3.0, 3.0)))
def test_focal_star_matches_float64_autodiff_of_the_papers_formula(case, data, gamma, beta):
  alpha = data.draw(_alphas(case["num_classes"]))
  fn = lambda x, y: jfocal.sigmoid_focal_loss_star(x, y, alpha=alpha, gamma=gamma, beta=beta)
  _check_against_reference(fn, lambda x, y: focal_star_textbook(x, y, alpha, gamma, beta), case)


@given(case=sigmoid_inputs(), data=st.data(), gamma=S.gammas,
       epsilon=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0]), st.floats(-1.0, 5.0)))
def test_poly1_focal_matches_float64_autodiff_of_the_papers_formula(case, data, gamma, epsilon):
  alpha = data.draw(_alphas(case["num_classes"]))
  fn = lambda x, y: jfocal.poly1_focal_loss(x, y, epsilon=epsilon, alpha=alpha, gamma=gamma)
  _check_against_reference(fn, lambda x, y: poly1_focal_textbook(x, y, alpha, gamma, epsilon),
                           case)


@st.composite
def softmax_inputs(draw, bound=12.0):
  dtype = draw(S.dtypes)
  num_classes = draw(st.integers(2, 5))
  batch = draw(st.sampled_from([(1,), (3,), (2, 3)]))
  shape = batch + (num_classes,)
  kind = draw(st.sampled_from(["ids", "distribution"]))
  logits, x64 = S.cast(draw(S.logits(shape, bound)), dtype)
  if kind == "ids":
    ids = np.asarray(draw(S.hnp.arrays(np.int32, batch,
                                       elements=st.integers(0, num_classes - 1))))
    labels, y64 = jnp.asarray(ids), (ids[..., None] == np.arange(num_classes)).astype(np.float64)
  else:
    weights = np.asarray(draw(S.probabilities(shape))) + 1e-3
    labels, y64 = S.cast(weights / weights.sum(-1, keepdims=True), dtype)
  return dict(dtype=dtype, logits=logits, x64=x64, labels=labels, y64=y64, kind=kind,
              num_classes=num_classes)


@given(case=softmax_inputs(),
       epsilon=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.0]), st.floats(-1.0, 5.0)))
def test_poly1_cross_entropy_matches_float64_autodiff_of_the_papers_formula(case, epsilon):
  fn = lambda x, y: jfocal.poly1_cross_entropy(x, y, epsilon=epsilon)
  _check_against_reference(fn, lambda x, y: poly1_cross_entropy_textbook(x, y, epsilon), case)


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


@given(case=sigmoid_inputs(label_kinds=("hard", "soft", "sparse", "ids", "pairs")),
       beta=betas)
def test_quality_focal_matches_float64_autodiff_of_the_papers_formula(case, beta):
  fn = lambda x, y: jfocal.quality_focal_loss(x, y, beta=beta)
  # Where sigma(x) equals a soft target exactly, |y - sigma|^beta has a cusp
  # (beta < 1) or a kink (beta = 1) at its minimum 0: no derivative to compare.
  matched = np.abs(1 / (1 + np.exp(-case["x64"])) - case["y64"]) < 1e-6
  skip = matched if beta <= 1.0 else None
  _check_against_reference(fn, lambda x, y: quality_focal_textbook(x, y, beta), case, skip=skip)


@given(case=sigmoid_inputs(label_kinds=("sparse", "hard", "soft", "pairs")),
       alpha=st.floats(0.0, 1.0), gamma=S.gammas, iou_weighted=st.booleans())
def test_varifocal_matches_float64_autodiff_of_the_papers_formula(case, alpha, gamma,
                                                                  iou_weighted):
  fn = lambda x, q: jfocal.varifocal_loss(x, q, alpha=alpha, gamma=gamma,
                                          iou_weighted=iou_weighted)
  _check_against_reference(
      fn, lambda x, q: varifocal_textbook(x, q, alpha, gamma, iou_weighted), case)


def _second_derivatives(fn, x, y):
  grad_x = lambda x, y: jax.grad(lambda x: jnp.sum(fn(x, y)))(x)
  ones = jnp.ones_like(x)
  return (jax.jvp(lambda x: grad_x(x, y), (x,), (ones,))[1],
          jax.jvp(lambda y: grad_x(x, y), (y,), (ones,))[1])


SECOND_DERIVATIVE_CASES = {
    "focal_star": (lambda x, y: jfocal.sigmoid_focal_loss_star(x, y, gamma=2.0, beta=1.0),
                   lambda x, y: focal_star_textbook(x, y, 0.25, 2.0, 1.0)),
    "poly1_focal": (lambda x, y: jfocal.poly1_focal_loss(x, y, epsilon=2.0, gamma=0.5),
                    lambda x, y: poly1_focal_textbook(x, y, 0.25, 0.5, 2.0)),
    "quality_focal": (lambda x, y: jfocal.quality_focal_loss(x, y, beta=2.0),
                      lambda x, y: quality_focal_textbook(x, y, 2.0)),
    "varifocal": (lambda x, y: jfocal.varifocal_loss(x, y, gamma=1.5),
                  lambda x, y: varifocal_textbook(x, y, 0.75, 1.5, True)),
}


@pytest.mark.parametrize("name", sorted(SECOND_DERIVATIVE_CASES))
@given(x=S.logits((8,), 10.0), y=S.probabilities((8,), 0.02, 0.98) | S.hard_labels((8,)))
def test_second_derivatives_match_float64_textbook(name, x, y):
  fn, textbook = SECOND_DERIVATIVE_CASES[name]
  got = _second_derivatives(fn, jnp.asarray(x), jnp.asarray(y))
  want = ref.on_reference_device(lambda x, y: _second_derivatives(textbook, x, y))(x, y)
  hard = bool(np.all((y == 0) | (y == 1)))
  names = ("d2/dx2",) if hard else ("d2/dx2", "d2/dxdy")
  for what, g, w in zip(names, got, want):
    assert_close(g, w, jnp.float64, what=what, scale=1e3)


# --------------------------------------------------------------------------------------------
# Reductions to the core losses, where the papers say so


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 20.0), y=S.probabilities((4, 3)) | S.hard_labels((4, 3)),
       alpha=st.none() | st.floats(0.0, 1.0))
def test_focal_star_with_gamma_one_and_beta_zero_is_cross_entropy(dtype, x, y, alpha):
  x, y = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
  star = lambda x: jfocal.sigmoid_focal_loss_star(x, y, alpha=alpha, gamma=1.0, beta=0.0)
  core = lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=alpha, gamma=0.0)
  assert_close(star(x), core(x), dtype)
  assert_close(jax.grad(lambda x: jnp.sum(star(x)))(x), jax.grad(lambda x: jnp.sum(core(x)))(x),
               dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 20.0), ids=S.hnp.arrays(np.int32, (4,), elements=st.integers(0, 3)),
       gamma=st.sampled_from([0.0, 0.5, 2.0]), alpha=st.none() | st.floats(0.0, 1.0))
def test_poly1_with_epsilon_zero_is_cross_entropy_and_focal_loss(dtype, x, ids, gamma, alpha):
  x, ids = jnp.asarray(x).astype(dtype), jnp.asarray(ids)
  pairs = [
      (lambda x: jfocal.poly1_focal_loss(x, ids, epsilon=0.0, alpha=alpha, gamma=gamma),
       lambda x: jfocal.sigmoid_focal_loss(x, ids, alpha=alpha, gamma=gamma)),
      (lambda x: jfocal.poly1_cross_entropy(x, jnp.minimum(ids, 2), epsilon=0.0),
       lambda x: jfocal.softmax_cross_entropy(x, jnp.minimum(ids, 2))),
  ]
  for poly, core in pairs:
    assert_close(poly(x), core(x), dtype)
    assert_close(jax.grad(lambda x: jnp.sum(poly(x)))(x), jax.grad(lambda x: jnp.sum(core(x)))(x),
                 dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(x=S.logits((4, 3), 1e4), y=S.hard_labels((4, 3)),
       beta=st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5]))
def test_quality_focal_with_hard_targets_is_focal_loss_with_gamma_beta_and_no_alpha(
    dtype, x, y, beta):
  x, y = jnp.asarray(x).astype(dtype), jnp.asarray(y).astype(dtype)
  quality = lambda x: jfocal.quality_focal_loss(x, y, beta=beta)
  focal = lambda x: jfocal.sigmoid_focal_loss(x, y, alpha=None, gamma=beta)
  assert_close(quality(x), focal(x), dtype)
  assert_close(jax.grad(lambda x: jnp.sum(quality(x)))(x),
               jax.grad(lambda x: jnp.sum(focal(x)))(x), dtype)


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
  weights, mean, new_acc = ghmc_reference(x64, y64, valid, bins, momentum, acc, g)
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
  state = jfocal.ghmc_init(bins)
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


# --------------------------------------------------------------------------------------------
# axis_name: a batch split over a mapped axis reduces like the whole batch


AXIS_CASES = {
    "ghmc_loss": lambda x, y, **kw: jfocal.ghmc_loss(x, y, bins=5, momentum=0.5, **kw),
    "sigmoid_focal_loss_star": lambda x, y, **kw: (
        jfocal.sigmoid_focal_loss_star(x, y, gamma=2.0, beta=1.0, **kw),),
    "poly1_focal_loss": lambda x, y, **kw: (jfocal.poly1_focal_loss(x, y, **kw),),
    "quality_focal_loss": lambda x, y, **kw: (jfocal.quality_focal_loss(x, y, **kw),),
    "varifocal_loss": lambda x, y, **kw: (jfocal.varifocal_loss(x, y, **kw),),
}


@pytest.mark.parametrize("name", sorted(AXIS_CASES))
@pytest.mark.parametrize("normalizer", [None, "num_positives"])
def test_axis_name_gives_the_global_batchs_loss_and_gradient(name, normalizer):
  fn = AXIS_CASES[name]
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 6, 3)) * 3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=(2, 6)))
  where = jnp.asarray(rng.uniform(size=(2, 6, 1)) < 0.8)
  kw = dict(reduction="mean", normalizer=normalizer)
  whole = lambda x: fn(x.reshape(12, 3), ids.reshape(12), where=where.reshape(12, 1), **kw)
  split = jax.vmap(lambda x, y, w: fn(x, y, where=w, axis_name="devices", **kw),
                   axis_name="devices")
  expected = whole(x)
  got = split(x, ids, where)
  for shard in range(2):
    for g, e in zip(got, expected):
      assert_close(g[shard], e, jnp.float32)
  grad_whole = jax.grad(lambda x: whole(x)[0])(x)
  # Each shard differentiates its own copy of the global loss with respect to
  # its own logits (jfocal._common.global_sum): together, the global gradient.
  grad_split = jax.grad(lambda x: jnp.sum(split(x, ids, where)[0]))(x)
  assert_close(grad_split, grad_whole, jnp.float32)


# --------------------------------------------------------------------------------------------
# Finite everywhere


EXTREME_LOGITS = np.array([-1e4, -1e3, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e3, 1e4])
TARGETS = [0.0, 1.0, 0.3, 0.5, 1e-6, 1 - 1e-6]

# name -> (loss(x, y, parameter), static settings, values of the traced parameter)
FINITE_CASES = {
    "focal_star": (lambda x, y, b, g: jfocal.sigmoid_focal_loss_star(x, y, gamma=g, beta=b),
                   (1.0, 0.1, 2.0, 5.0), (0.0, -2.0, 1.0, 3.0)),
    "poly1_focal": (lambda x, y, e, g: jfocal.poly1_focal_loss(x, y, gamma=g, epsilon=e),
                    (2.0, 0.0, 0.1, 0.5, 4.5), (1.0, -1.0, 0.0, 5.0)),
    "quality_focal": (lambda x, y, _, b: jfocal.quality_focal_loss(x, y, beta=b),
                      (2.0, 0.0, 0.1, 0.5, 1.0, 1.5, 4.5), (0.0,)),
    "varifocal": (lambda x, y, a, g: jfocal.varifocal_loss(x, y, alpha=a, gamma=g[0],
                                                           iou_weighted=g[1]),
                  ((2.0, True), (0.0, False), (0.1, True), (0.5, False)), (0.75, 0.0, 1.0)),
    "ghmc": (lambda x, y, m, bins: jfocal.ghmc_loss(x, y, bins=bins, momentum=m)[0],
             (10, 1), (0.75, 0.0)),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(FINITE_CASES))
def test_loss_gradient_and_hessian_are_finite_at_extreme_logits(name, dtype):
  big = float(jnp.finfo(dtype).max)
  x = jnp.asarray(np.clip(EXTREME_LOGITS, -big, big)).astype(dtype)
  y = jnp.asarray(TARGETS)[:, None].astype(dtype)
  x, y = jnp.broadcast_arrays(x, y)
  loss, settings, parameters = FINITE_CASES[name]
  # Every setting in float32 and bfloat16 (the dtypes), the paper's
  # default in float16 and float64.
  if dtype not in (jnp.float32, jnp.bfloat16):
    settings = settings[:1]

  @functools.partial(jax.jit, static_argnums=3)
  def evaluate(x, y, parameter, setting):  # loss, gradients and the Hessian's diagonal
    total = lambda x, y: jnp.sum(loss(x, y, parameter, setting).astype(jnp.float32))
    grad_x = lambda x: jax.grad(total)(x, y)
    return (loss(x, y, parameter, setting).astype(jnp.float32), *jax.grad(total, (0, 1))(x, y),
            jax.jvp(grad_x, (x,), (jnp.ones_like(x),))[1])

  for setting in settings:
    for parameter in parameters:
      names = ["loss", "d/dx", "d/dy", "d2/dx2"]
      results = list(evaluate(x, y, jnp.float32(parameter), setting))
      if name == "ghmc" and dtype == jnp.float16:
        # d/dy = -beta x: with beta up to N / (n bins) it exceeds float16's range
        # at |x| = 1e4, a property of float16, not of the loss.
        del names[2], results[2]
      for what, array in zip(names, results):
        bad = ~np.isfinite(np.asarray(array, np.float64))
        assert not bad.any(), (f"{what} not finite for {setting}, {parameter} at x={x[bad]}, "
                               f"y={y[bad]}: {array[bad]}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_poly1_cross_entropy_is_finite_at_saturated_logits(dtype):
  x = jnp.asarray([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [100.0, 0.0, 0.0], [-1e3, -1e3, 1e3]])
  x = x.astype(dtype)
  for labels in (jnp.array([0, 0, 1, 2]), jnp.full(x.shape, 1 / 3, dtype)):
    total = lambda x, e: jnp.sum(jfocal.poly1_cross_entropy(x, labels, epsilon=e)
                                 .astype(jnp.float32))
    evaluate = jax.jit(lambda x, e: (total(x, e), jax.grad(total)(x, e),
                                     jax.hessian(total)(x, e)))
    for epsilon in (-1.0, 0.0, 1.0, 5.0):
      for what, array in zip(("loss", "gradient", "hessian"),
                             evaluate(x, jnp.float32(epsilon))):
        assert np.all(np.isfinite(np.asarray(array, np.float64))), f"{what}: {array}"


def test_quality_focal_gradient_at_its_minimum_is_zero():
  # sigma(0) = 0.5 = the target: the loss is 0, its minimum, for every beta.
  for beta in (0.0, 0.5, 1.0, 2.0):
    x = jnp.zeros((1,), jnp.float32)
    y = jnp.full((1,), 0.5, jnp.float32)
    fn = lambda x: jnp.sum(jfocal.quality_focal_loss(x, y, beta=beta))
    expected = 0.0 if beta > 0 else float(np.log(2.0))
    np.testing.assert_allclose(fn(x), expected, atol=1e-7)
    assert float(jax.grad(fn)(x)[0]) == 0.0


# --------------------------------------------------------------------------------------------
# Validation: trace-time errors that name the argument, the value and what was expected


X3 = np.zeros((4, 3), np.float32)
IDS = np.zeros((4,), np.int32)

# Trace-time errors of the extended family; tests/test_validation.py runs them with the core cases.
VALIDATION_CASES = {
    "FL* gamma zero": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, gamma=0.0),
                       ValueError, ["gamma", "0.0", "> 0"]),
    "FL* beta infinite": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, beta=float("inf")),
                          ValueError, ["beta", "inf"]),
    "FL* beta vector": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, beta=np.ones(2)),
                        ValueError, ["beta", "scalar", "(2,)"]),
    "poly epsilon below -1": (lambda: jfocal.poly1_focal_loss(X3, IDS, epsilon=-1.5),
                              ValueError, ["epsilon", "-1.5", ">= -1"]),
    "poly CE epsilon nan": (lambda: jfocal.poly1_cross_entropy(X3, IDS, epsilon=float("nan")),
                            ValueError, ["epsilon", "nan"]),
    "poly CE epsilon string": (lambda: jfocal.poly1_cross_entropy(X3, IDS, epsilon="1"),
                               TypeError, ["epsilon", "'1'"]),
    "QFL negative beta": (lambda: jfocal.quality_focal_loss(X3, IDS, beta=-1.0),
                          ValueError, ["beta", "-1.0", ">= 0"]),
    "QFL scores of the wrong shape": (
        lambda: jfocal.quality_focal_loss(X3, (IDS, np.ones((3,), np.float32))),
        ValueError, ["scores", "(4,)", "(3,)"]),
    "QFL integer scores": (lambda: jfocal.quality_focal_loss(X3, (IDS, IDS)),
                           TypeError, ["scores", "int32", "float"]),
    "QFL pair with float ids": (
        lambda: jfocal.quality_focal_loss(X3, (IDS.astype(np.float32), np.ones(4, np.float32))),
        TypeError, ["class ids", "float32"]),
    "QFL pair of three": (lambda: jfocal.quality_focal_loss(X3, (IDS, IDS, IDS)),
                          ValueError, ["(class_ids, scores)", "3"]),
    "VFL alpha above 1": (lambda: jfocal.varifocal_loss(X3, X3, alpha=1.5),
                          ValueError, ["alpha", "[0, 1]", "1.5"]),
    "VFL negative gamma": (lambda: jfocal.varifocal_loss(X3, X3, gamma=-0.5),
                           ValueError, ["gamma", "-0.5"]),
    "VFL iou_weighted not bool": (lambda: jfocal.varifocal_loss(X3, X3, iou_weighted=1),
                                  TypeError, ["iou_weighted", "bool", "1"]),
    "GHM zero bins": (lambda: jfocal.ghmc_loss(X3, IDS, bins=0), ValueError,
                      ["bins", "0", ">= 1"]),
    "GHM float bins": (lambda: jfocal.ghmc_loss(X3, IDS, bins=2.5), TypeError,
                       ["bins", "2.5", "int"]),
    "GHM momentum 1": (lambda: jfocal.ghmc_loss(X3, IDS, momentum=1.0), ValueError,
                       ["momentum", "1.0", "[0, 1)"]),
    "GHM state of the wrong shape": (
        lambda: jfocal.ghmc_loss(X3, IDS, bins=10, state=jnp.zeros((5,))),
        ValueError, ["state", "(5,)", "(10,)", "ghmc_init"]),
    "GHM integer state": (lambda: jfocal.ghmc_loss(X3, IDS, bins=3, state=np.zeros(3, np.int32)),
                          TypeError, ["state", "int32", "float"]),
    "ghmc_init bins": (lambda: jfocal.ghmc_init(-2), ValueError, ["bins", "-2"]),
    "class_balanced_alpha beta 1": (lambda: jfocal.class_balanced_alpha(np.ones(3), beta=1.0),
                                    ValueError, ["beta", "[0, 1)", "1.0"]),
    "class_balanced_alpha matrix": (lambda: jfocal.class_balanced_alpha(np.ones((2, 3))),
                                    ValueError, ["counts", "(C,)", "(2, 3)"]),
    "class_balanced_alpha negative count": (
        lambda: jfocal.class_balanced_alpha(np.array([3, -1])), ValueError, ["counts", "-1"]),
}


def test_static_and_traced_parameters():
  x = jnp.zeros((4, 3), jnp.float32)
  ids = jnp.zeros((4,), jnp.int32)
  traced = {
      "epsilon": lambda x, p: jfocal.poly1_focal_loss(x, ids, epsilon=p),
      "epsilon (softmax)": lambda x, p: jfocal.poly1_cross_entropy(x, ids, epsilon=p),
      "beta (FL*)": lambda x, p: jfocal.sigmoid_focal_loss_star(x, ids, beta=p),
      "alpha (VFL)": lambda x, p: jfocal.varifocal_loss(x, ids, alpha=p),
      "momentum": lambda x, p: jfocal.ghmc_loss(x, ids, momentum=p)[0],
  }
  for name, fn in traced.items():
    step = jax.jit(fn)
    for value in (0.25, 0.5):
      assert np.all(np.isfinite(step(x, jnp.float32(value)))), name
    assert step._cache_size() == 1, f"{name} is traced: one compilation"
  static = {
      "gamma (FL*)": lambda x, p: jfocal.sigmoid_focal_loss_star(x, ids, gamma=p),
      "beta (QFL)": lambda x, p: jfocal.quality_focal_loss(x, ids, beta=p),
      "gamma (VFL)": lambda x, p: jfocal.varifocal_loss(x, ids, gamma=p),
      "bins": lambda x, p: jfocal.ghmc_loss(x, ids, bins=p)[0],
  }
  for name, fn in static.items():
    with pytest.raises(TypeError, match=re.escape("static")):
      jax.jit(fn)(x, 2)


def test_traced_epsilon_and_momentum_are_differentiable():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 3)), jnp.float64)
  ids = jnp.array([0, 3, 1, 2])
  poly = lambda e: jnp.sum(jfocal.poly1_focal_loss(x, ids, epsilon=e))
  p_t = ref.on_reference_device(lambda x: x)(x)
  y = (np.asarray(ids)[:, None] == np.arange(3)).astype(np.float64)
  p = 1 / (1 + np.exp(-np.asarray(p_t)))
  one_minus_p_t = y * (1 - p) + (1 - y) * p
  np.testing.assert_allclose(jax.grad(poly)(0.5), np.sum(one_minus_p_t ** 3), rtol=1e-12)
  star = lambda b: jnp.sum(jfocal.sigmoid_focal_loss_star(x, ids, alpha=None, gamma=2.0, beta=b))
  expected = ref.on_reference_device(
      jax.grad(lambda b: jnp.sum(focal_star_textbook(x, y, None, 2.0, b))))(0.5)
  np.testing.assert_allclose(jax.grad(star)(0.5), expected, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# class_balanced_alpha


@given(counts=S.hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(0, 10 ** 6)),
       beta=st.sampled_from([0.0, 0.9, 0.99, 0.999, 0.9999]) | st.floats(0.0, 0.99999))
def test_class_balanced_alpha_is_the_normalised_inverse_effective_number(counts, beta):
  got = jfocal.class_balanced_alpha(counts, beta=beta)
  n = np.maximum(counts, 1).astype(np.float64)
  effective = (1 - beta ** n) / (1 - beta) if beta > 0 else np.ones_like(n)
  expected = (1 / effective) / np.sum(1 / effective) * len(n)
  assert got.shape == counts.shape and got.dtype == jnp.float32
  assert_close(got, expected, jnp.float32)
  np.testing.assert_allclose(np.sum(np.asarray(got, np.float64)), len(n), rtol=1e-5)


def test_class_balanced_alpha_limits_and_use_as_class_weights(transform):
  counts = jnp.array([1000, 100, 10])
  np.testing.assert_array_equal(jfocal.class_balanced_alpha(counts, beta=0.0), [1.0, 1.0, 1.0])
  inverse_frequency = 1 / np.array([1000, 100, 10])
  np.testing.assert_allclose(jfocal.class_balanced_alpha(counts, beta=1 - 1e-9),
                             3 * inverse_frequency / inverse_frequency.sum(), rtol=1e-5)
  assert jfocal.class_balanced_alpha(jnp.array([5, 5], jnp.int32), beta=0.99).dtype == jnp.float32
  assert jfocal.class_balanced_alpha(np.array([5.0, 5.0]), beta=0.99).dtype == jnp.float64
  w = jfocal.class_balanced_alpha(counts, beta=0.99)
  assert float(w[2]) > 1  # weights sum to C: the rare class gets more than 1
  traced = jax.jit(jfocal.class_balanced_alpha)(counts)
  assert_close(traced, jfocal.class_balanced_alpha(counts), jnp.float32)
  # Cui et al.: each example weighted by its class's weight.
  x = jnp.asarray(np.random.default_rng(10).normal(size=(4, 3)), jnp.float32)
  ids = jnp.array([0, 1, 2, 2])
  softmax = transform(lambda x, w: jfocal.softmax_focal_loss(x, ids, weights=w[ids]))(x, w)
  assert_close(softmax, w[ids] * jfocal.softmax_focal_loss(x, ids), jnp.float32)
  sigmoid = transform(lambda x, w: jfocal.sigmoid_focal_loss(x, ids, weights=w[ids][:, None]))(
      x, w)
  assert_close(sigmoid, w[ids][:, None] * jfocal.sigmoid_focal_loss(x, ids), jnp.float32)
