"""The softmax family against textbook formulas, the paper's closed forms, optax and itself."""

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


@st.composite
def softmax_cases(draw, bound=12.0, label_kinds=("ids", "distribution")):
  dtype = draw(S.dtypes)
  # One class makes p = 1 exactly, where the textbook's pow has a NaN derivative;
  # that case has its own test below.
  num_classes = draw(st.integers(2, 5))
  batch = draw(st.sampled_from([(1,), (3,), (2, 3)]))
  shape = batch + (num_classes,)
  kind = draw(st.sampled_from(label_kinds))
  logits, x64 = S.cast(draw(S.logits(shape, bound)), dtype)
  if kind == "ids":
    ids = np.asarray(draw(S.hnp.arrays(np.int32, batch, elements=st.integers(0, num_classes - 1))))
    labels = jnp.asarray(ids)
    y64 = (ids[..., None] == np.arange(num_classes)).astype(np.float64)
  else:
    weights = np.asarray(draw(S.probabilities(shape, 0.0, 1.0))) + 1e-3
    labels, y64 = S.cast(weights / weights.sum(-1, keepdims=True), dtype)
  alpha = draw(st.none() | S.probabilities((num_classes,)).map(np.asarray))
  face = draw(st.sampled_from(sorted(FACES)))
  if face == "softmax_cross_entropy":
    alpha = None
  if face == "softmax_balanced_cross_entropy" and alpha is None:
    alpha = np.linspace(0.2, 1.0, num_classes)
  gamma = draw(S.gammas) if face == "softmax_focal_loss" else 0.0
  return dict(dtype=dtype, logits=logits, x64=x64, labels=labels, y64=y64, kind=kind,
              alpha=alpha, gamma=gamma, face=face)


# Each public face and how it calls the shared core; the reference only sees alpha and gamma.
FACES = {
    "softmax_cross_entropy": lambda x, y, alpha, gamma: jfocal.softmax_cross_entropy(x, y),
    "softmax_balanced_cross_entropy": lambda x, y, alpha, gamma:
        jfocal.softmax_balanced_cross_entropy(x, y, alpha=alpha),
    "softmax_focal_loss": lambda x, y, alpha, gamma:
        jfocal.softmax_focal_loss(x, y, alpha=alpha, gamma=gamma),
}


def _loss(case):
  face = FACES[case["face"]]
  return jax.jit(lambda x, y: face(x, y, case["alpha"], case["gamma"]))


@given(case=softmax_cases())
def test_value_and_gradients_match_float64_autodiff_of_the_textbook_formula(case):
  fn = _loss(case)
  textbook = lambda x, y: ref.softmax_focal_textbook(x, y, case["alpha"], case["gamma"])
  argnums = (0,) if case["kind"] == "ids" else (0, 1)
  reference = ref.on_reference_device(
      lambda x, y: (textbook(x, y), jax.grad(lambda x, y: jnp.sum(textbook(x, y)), argnums)(x, y)))
  value = fn(case["logits"], case["labels"])
  expected_value, expected_grads = reference(case["x64"], case["y64"])
  assert value.dtype == case["dtype"]
  assert_close(value, expected_value, case["dtype"], what="loss")
  grads = jax.grad(lambda x, y: jnp.sum(fn(x, y).astype(jnp.float32)), argnums)(
      case["logits"], case["labels"])
  for name, got, want in zip(("d/dlogits", "d/dlabels"), grads, expected_grads):
    assert got.dtype == case["dtype"]
    assert_close(got, want, case["dtype"], what=name)


@given(case=softmax_cases(bound=30.0, label_kinds=("ids",)))
def test_gradient_matches_the_papers_closed_form(case):
  fn = _loss(case)
  grad = jax.grad(lambda x: jnp.sum(fn(x, case["labels"]).astype(jnp.float32)))(case["logits"])
  expected = ref.softmax_focal_grad_paper(case["x64"], np.asarray(case["labels"]), case["alpha"],
                                          case["gamma"])
  assert_close(grad, expected, case["dtype"], what="d/dlogits")


@given(x=S.logits((2, 4), 8.0), ids=S.hnp.arrays(np.int32, (2,), elements=st.integers(0, 3)),
       gamma=S.gammas, alpha=st.none() | S.probabilities((4,)).map(np.asarray))
def test_hessian_matches_float64_textbook(x, ids, gamma, alpha):
  one_hot = (ids[..., None] == np.arange(4)).astype(np.float64)
  fn = lambda x: jnp.sum(jfocal.softmax_focal_loss(x, jnp.asarray(ids), alpha=alpha, gamma=gamma))
  textbook = lambda x, y: jnp.sum(ref.softmax_focal_textbook(x, y, alpha, gamma))
  expected = ref.on_reference_device(lambda x, y: jax.hessian(textbook)(x, y))(x, one_hot)
  assert_close(jax.hessian(fn)(jnp.asarray(x)), expected, jnp.float64, what="hessian", scale=1e3)


SATURATED_LOGITS = [[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [100.0, 0.0, 0.0], [30.0, 0.0, -30.0],
                    [0.0, 0.0, 0.0], [-1e3, -1e3, 1e3]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.5, 1.0, 2.0, 4.5])
def test_loss_gradient_and_hessian_are_finite_at_saturated_logits(dtype, gamma):
  x = jnp.asarray(SATURATED_LOGITS).astype(dtype)
  ids = jnp.array([0, 0, 0, 2, 1, 0])
  distribution = jnp.full(x.shape, 1 / 3, dtype)
  for labels in (ids, distribution):
    fn = jax.jit(lambda x: jnp.sum(jfocal.softmax_focal_loss(x, labels, gamma=gamma)
                                   .astype(jnp.float32)))
    for name, array in [("loss", fn(x)), ("gradient", jax.grad(fn)(x)),
                        ("hessian", jax.hessian(fn)(x))]:
      assert np.all(np.isfinite(np.asarray(array, np.float64))), f"{name}: {array}"


@given(x=S.logits((4, 5), 20.0), ids=S.hnp.arrays(np.int32, (4,), elements=st.integers(0, 4)))
def test_cross_entropy_agrees_with_optax(x, ids):
  x, ids = jnp.asarray(x, jnp.float32), jnp.asarray(ids)
  ours = jax.jit(jfocal.softmax_cross_entropy)
  theirs = optax.softmax_cross_entropy_with_integer_labels
  assert_close(ours(x, ids), theirs(x, ids), jnp.float32, what="loss vs optax")
  assert_close(jax.grad(lambda x: jnp.sum(ours(x, ids)))(x),
               jax.grad(lambda x: jnp.sum(theirs(x, ids)))(x), jnp.float32, what="gradient")
  one_hot = jax.nn.one_hot(ids, 5, dtype=jnp.float32)
  assert_close(ours(x, one_hot), optax.softmax_cross_entropy(x, one_hot), jnp.float32)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_a_single_class_has_zero_loss_and_gradient(gamma, transform):
  x = jnp.array([[-1e4], [0.0], [3.0]], jnp.float32)
  fn = transform(lambda x: jfocal.softmax_focal_loss(x, jnp.zeros((3,), jnp.int32), gamma=gamma))
  np.testing.assert_array_equal(fn(x), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(fn(x)))(x), 0.0)


def test_gamma_zero_is_cross_entropy_and_balanced_is_class_weighted(transform):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)) * 3)
  ids = jnp.array([0, 1, 2, 3, 0, 1])
  alpha = jnp.array([0.1, 0.4, 0.7, 1.0])
  ce = transform(jfocal.softmax_cross_entropy)(x, ids)
  np.testing.assert_array_equal(
      transform(lambda x, y: jfocal.softmax_focal_loss(x, y, gamma=0.0))(x, ids), ce)
  np.testing.assert_allclose(
      transform(lambda x, y: jfocal.softmax_balanced_cross_entropy(x, y, alpha=alpha))(x, ids),
      alpha[ids] * ce, rtol=1e-12)


@given(x=S.logits((3, 4, 2), 6.0), ids=S.hnp.arrays(np.int32, (3, 2), elements=st.integers(0, 3)),
       gamma=S.gammas)
def test_axis_equals_moveaxis(x, ids, gamma):
  x = jnp.asarray(x)
  fn = jax.jit(jfocal.softmax_focal_loss, static_argnames=("gamma", "axis"))
  moved = jnp.moveaxis(x, 1, -1)
  np.testing.assert_allclose(fn(x, jnp.asarray(ids), gamma=gamma, axis=1),
                             fn(moved, jnp.asarray(ids), gamma=gamma), rtol=1e-12)
  one_hot = jax.nn.one_hot(ids, 4, axis=1, dtype=jnp.float64)
  np.testing.assert_allclose(fn(x, one_hot, gamma=gamma, axis=1),
                             fn(moved, jnp.moveaxis(one_hot, 1, -1), gamma=gamma), rtol=1e-12)


@given(x=S.logits((5, 4), 8.0), ids=S.hnp.arrays(np.int32, (5,), elements=st.integers(0, 3)),
       gamma=S.gammas, eps=st.floats(0.0, 1.0),
       alpha=st.none() | S.probabilities((4,)).map(np.asarray))
def test_label_smoothing_of_ids_equals_smoothed_distributions(x, ids, gamma, eps, alpha):
  x = jnp.asarray(x)
  smoothed = (1 - eps) * jax.nn.one_hot(ids, 4, dtype=jnp.float64) + eps / 4
  kw = dict(alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(
      jfocal.softmax_focal_loss(x, jnp.asarray(ids), label_smoothing=eps, **kw),
      jfocal.softmax_focal_loss(x, smoothed, **kw), rtol=1e-10, atol=1e-12)


def test_out_of_range_ids_give_nan_for_their_example_only(transform):
  x = jnp.zeros((4, 3), jnp.float32)
  ids = jnp.array([0, 2, 3, -1])
  loss = transform(jfocal.softmax_focal_loss)(x, ids)
  assert np.all(np.isfinite(loss[:2])) and np.all(np.isnan(loss[2:]))
  grad = jax.grad(lambda x: jnp.sum(jfocal.softmax_focal_loss(x, ids)))(x)
  assert np.all(np.isfinite(grad[:2])) and np.all(np.isnan(grad[2:]))


def test_ignore_index_masks_the_example(transform):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  ids = jnp.array([0, 255, 2, 1])
  fn = transform(lambda x: jfocal.softmax_focal_loss(x, ids, ignore_index=255, reduction="mean"))
  kept = np.array([0, 2, 3])
  np.testing.assert_allclose(fn(x), jfocal.softmax_focal_loss(x[kept], ids[kept],
                                                              reduction="mean"), rtol=1e-6)
  assert np.all(jax.grad(fn)(x)[1] == 0)


def test_integer_labels_build_no_one_hot():
  # The compiled value-and-grad of the integer-label path keeps no (batch, C)
  # temporary: a one-hot (or any logits-sized buffer) would be 20 KiB here.
  x = jnp.zeros((64, 81), jnp.float32)
  ids = jnp.zeros((64,), jnp.int32)
  step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jfocal.softmax_focal_loss(x, ids))))
  memory = step.lower(x).compile().memory_analysis()
  if memory is None:
    pytest.skip(f"no memory analysis on {jax.default_backend()}")
  assert memory.temp_size_in_bytes < x.nbytes / 2, memory
