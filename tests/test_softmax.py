"""The softmax family against textbook formulas, the paper's closed forms, optax and itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jfocal
from jfocal.engine import softmax as engine
import references as ref
import strategies as S
from helpers import assert_close, compiled_as_users_get_it, on_reference_device, optional_array


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


@given(case=softmax_cases(bound=30.0, label_kinds=("ids",)))
def test_gradient_matches_the_papers_closed_form(case):
  fn = _loss(case)
  grad = jax.grad(lambda x: jnp.sum(fn(x, case["labels"]).astype(jnp.float32)))(case["logits"])
  expected = ref.softmax_focal_grad_paper(case["x64"], np.asarray(case["labels"]), case["alpha"],
                                          case["gamma"])
  assert_close(grad, expected, case["dtype"], what="d/dlogits")


@functools.partial(jax.jit, static_argnames="gamma")
def _focal_hessian(x, ids, alpha, gamma):  # one program for all examples of a gamma
  return jax.hessian(lambda x: jnp.sum(jfocal.softmax_focal_loss(x, ids, alpha=alpha,
                                                                 gamma=gamma)))(x)


@given(x=S.logits((2, 4), 8.0), ids=S.hnp.arrays(np.int32, (2,), elements=st.integers(0, 3)),
       gamma=S.gammas, alpha=st.none() | S.probabilities((4,)).map(np.asarray))
def test_hessian_matches_float64_textbook(x, ids, gamma, alpha):
  one_hot = (ids[..., None] == np.arange(4)).astype(np.float64)
  textbook = lambda x, y: jnp.sum(ref.softmax_focal(x, y, alpha, gamma))
  expected = on_reference_device(lambda x, y: jax.hessian(textbook)(x, y))(x, one_hot)
  got = _focal_hessian(jnp.asarray(x), jnp.asarray(ids), optional_array(alpha), gamma=gamma)
  assert_close(got, expected, jnp.float64, what="hessian", scale=1e3)


_cross_entropy = jax.jit(jfocal.softmax_cross_entropy)  # compiled once for all examples


@given(x=S.logits((4, 5), 20.0), ids=S.hnp.arrays(np.int32, (4,), elements=st.integers(0, 4)))
def test_cross_entropy_agrees_with_optax(x, ids):
  x, ids = jnp.asarray(x, jnp.float32), jnp.asarray(ids)
  ours = _cross_entropy
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


# Compiled once per gamma and axis for all examples.
_focal_with_static_gamma = jax.jit(jfocal.softmax_focal_loss, static_argnames=("gamma", "axis"))


@given(x=S.logits((3, 4, 2), 6.0), ids=S.hnp.arrays(np.int32, (3, 2), elements=st.integers(0, 3)),
       gamma=S.gammas)
def test_axis_equals_moveaxis(x, ids, gamma):
  x = jnp.asarray(x)
  fn = _focal_with_static_gamma
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


def _value_and_grad_temp(loss, shape):
  x = jnp.zeros(shape, jnp.float32)
  ids = jnp.zeros(shape[:1], jnp.int32)
  step = jax.jit(jax.value_and_grad(lambda x: jnp.sum(loss(x, ids))))
  memory = compiled_as_users_get_it(step.lower(x)).memory_analysis()
  if memory is None:
    pytest.skip(f"no memory analysis on {jax.default_backend()}")
  return memory.temp_size_in_bytes


@pytest.mark.parametrize("classes", [16, engine.SMALL_CLASSES, engine.SMALL_CLASSES + 1, 81])
def test_integer_labels_build_no_one_hot(classes):
  # The compiled value-and-grad of the integer-label path keeps no (batch, C)
  # temporary, only row-sized ones: 6 with few classes and 7 with more (the
  # two forms of `jfocal.engine.softmax.SMALL_CLASSES`); a one-hot would add C.
  rows = 1024
  row_buffers = 6 if classes <= engine.SMALL_CLASSES else 7
  scalars = 1024  # XLA's few scalar temporaries (128 bytes measured)
  temp = _value_and_grad_temp(jfocal.softmax_focal_loss, (rows, classes))
  assert temp <= row_buffers * rows * 4 + scalars


@pytest.mark.parametrize("classes", [engine.SMALL_CLASSES + 1, 81])
def test_z_loss_adds_no_logits_sized_temporary(classes):
  # The z-loss's derivative reads the same exp array as the loss's; writing the
  # target's entry into a copy of it would hold one logits-sized buffer more.
  rows = 1024
  loss = functools.partial(jfocal.softmax_cross_entropy, z_loss=1e-4)
  assert _value_and_grad_temp(loss, (rows, classes)) < rows * classes * 4 / 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_the_few_and_the_many_class_forms_agree(dtype):
  # Up to SMALL_CLASSES classes the engine compiles another form of the
  # target's 0 in the exp sum (a select, not a scatter), for speed: the same
  # values bit for bit, also for infinite and NaN rows, and the same derivatives.
  inf, big = np.inf, float(jnp.finfo(dtype).max)
  special = np.array([[inf, 1, -inf, inf], [-inf] * 4, [0, -inf, 2, 3], [inf, -inf, -inf, 5],
                      [big, inf, -big, 0], [-big, -inf, -inf, -big], [np.nan, 1, 2, 3],
                      [1e-30, 0, -0.0, 88]])
  finite = np.random.default_rng(0).normal(size=(8, 4)) * 30
  x = jnp.asarray(np.concatenate([special, finite]), dtype)
  top = jnp.max(x, axis=1, keepdims=True)
  ids = jnp.asarray(np.arange(len(x)) % 4, jnp.int32)[:, None]

  def nll(x, small):  # -log p_k (class ids) and log sum exp (dense targets)
    shifted = engine._shift(x, top)
    return (engine._excluded_nll(shifted, ids, 1, small, False)
            + 0.5 * engine._log_sum(shifted, ids, 1, small, False))

  for run in (lambda f: f, jax.jit):
    values = [run(functools.partial(nll, small=small))(x) for small in (True, False)]
    np.testing.assert_array_equal(*values)
  x = x[len(special):]
  top, ids = top[len(special):], ids[len(special):]
  for derivative in (jax.grad, jax.hessian):
    few, many = (derivative(lambda x: jnp.sum(nll(x, small)))(x) for small in (True, False))
    assert_close(few, many, dtype, what=derivative.__name__)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_excluding_the_maximum_needs_no_exp_and_changes_nothing(dtype):
  # Dense targets exclude each row's maximum, whose shifted logit is 0 (NaN in
  # a NaN row): the engine then takes exp and expm1 of it as 1 + s and s. The
  # values must be those of the general form bit for bit, and the derivatives too.
  inf, big = np.inf, float(jnp.finfo(dtype).max)
  special = np.array([[inf, 1, -inf, inf], [-inf] * 4, [0, -inf, 2, 3], [inf, -inf, -inf, 5],
                      [big, inf, -big, 0], [-big, -inf, -inf, -big], [np.nan, 1, 2, 3],
                      [1, np.nan, 2, 3], [1e-30, 0, -0.0, 88], [0, 200, -200, 0]])
  finite = np.random.default_rng(1).normal(size=(8, 4)) * 30
  x = jnp.asarray(np.concatenate([special, finite]), dtype)

  def both(x, at_maximum):
    top = jax.lax.stop_gradient(jnp.max(x, axis=1, keepdims=True))
    shifted, top_id = engine._shift(x, top), jnp.argmax(x, axis=1)[:, None]
    return (engine._excluded_nll(shifted, top_id, 1, True, at_maximum)
            + 0.5 * engine._log_sum(shifted, top_id, 1, True, at_maximum))

  for run in (lambda f: f, jax.jit):
    shortcut, general = (run(functools.partial(both, at_maximum=flag))(x) for flag in (True, False))
    np.testing.assert_array_equal(shortcut, general)
  for derivative in (jax.grad, jax.hessian):
    shortcut, general = (derivative(lambda x: jnp.sum(both(x, flag)))(x[len(special):])
                         for flag in (True, False))
    assert_close(shortcut, general, dtype, what=derivative.__name__)


@pytest.mark.parametrize("classes", [engine.SMALL_CLASSES + 1, 81, 1000])
def test_other_platforms_than_the_cpu_select_the_targets_zero_at_every_class_count(classes):
  # Above SMALL_CLASSES the CPU's program scatters the target's 0 into the exp array; a
  # GPU's selects it (1.7x faster on an H200 at C = 81: jfocal.engine.softmax). Lowered
  # for each platform without compiling, so it is checked on any machine.
  x = jnp.zeros((64, classes), jnp.float32)
  ids = jnp.zeros((64,), jnp.int32)
  step = jax.jit(jax.value_and_grad(
      lambda x: jfocal.softmax_focal_loss(x, ids, reduction="sum")))

  def scatters(platform):
    lowered = step.trace(x).lower(lowering_platforms=(platform,))
    return "stablehlo.scatter" in lowered.as_text()

  assert scatters("cpu")
  assert not scatters("cuda")


def test_label_derivative_at_one_hot_targets_is_each_class_term():
  """d CE / d y_c = -log p_c, also where y_c = 0 (the guard of 0 * log 0 must not cut it)."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)) * 2)
  y = jax.nn.one_hot(jnp.array([0, 3, 1]), 4, dtype=jnp.float64)
  got = jax.grad(lambda y: jnp.sum(jfocal.softmax_cross_entropy(x, y)))(y)
  np.testing.assert_allclose(got, -jax.nn.log_softmax(x), rtol=1e-12)
  optax_grad = jax.grad(lambda y: jnp.sum(optax.softmax_cross_entropy(x, y)))(y)
  np.testing.assert_allclose(got, optax_grad, rtol=1e-12)
  focal = jax.grad(lambda y: jnp.sum(jfocal.softmax_focal_loss(x, y, gamma=2.0)))(y)
  p = jax.nn.softmax(x)
  np.testing.assert_allclose(focal, (1 - p) ** 2 * -jnp.log(p), rtol=1e-12)


# Adjacent and not, in and out of order, negative, three axes (optax's own cases: the drop-in test).
AXES = [(1, 3), (3, 2), (-1, -2), (0, 1, 3)]


@pytest.mark.parametrize("axis", AXES)
def test_a_tuple_of_class_axes_flattens_them_as_optax_does(axis):
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 3, 4, 5)))
  batch = tuple(d for i, d in enumerate(logits.shape) if i % 4 not in {a % 4 for a in axis})
  num_classes = logits.size // int(np.prod(batch))
  ids = jnp.asarray(rng.integers(0, num_classes, size=batch))
  # Dense targets and the focal loss take the same flattening.
  targets = jnp.moveaxis(jax.nn.one_hot(ids, num_classes, dtype=jnp.float64), -1, 0)
  flat = [a % 4 for a in axis]
  targets = jnp.transpose(targets.reshape(tuple(logits.shape[a] for a in flat) + batch),
                          np.argsort(flat + [i for i in range(4) if i not in flat]))

  @jax.jit
  def evaluate(x):  # one program: optax's and ours, values and gradients
    theirs = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, ids, axis=axis)
    ours = lambda x: jfocal.softmax_cross_entropy(x, ids, axis=axis)
    focal = lambda y: jfocal.softmax_focal_loss(x, y, axis=axis, gamma=2.0)
    gradient = lambda fn: jax.grad(lambda x: jnp.sum(fn(x)))(x)
    return (ours(x), theirs(x), gradient(ours), gradient(theirs),
            jfocal.softmax_cross_entropy(x, targets, axis=axis), focal(ids), focal(targets))

  ours, theirs, our_grad, their_grad, dense, focal, dense_focal = evaluate(logits)
  np.testing.assert_allclose(ours, theirs, rtol=1e-12)
  np.testing.assert_allclose(our_grad, their_grad, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(dense, ours, rtol=1e-12)
  np.testing.assert_allclose(focal, dense_focal, rtol=1e-12)


@given(x=S.logits((3, 5), 8.0), ids=S.hnp.arrays(np.int32, (3,), elements=st.integers(0, 4)),
       keep=S.hnp.arrays(bool, (3, 5)))
def test_a_per_logit_where_is_optaxs(x, ids, keep):
  """Masked logits leave the softmax and the sum: optax's values and gradients, dense or ids."""
  keep[np.arange(3), ids] = True  # optax's integer-label CE keeps the target logit
  x, ids, keep = jnp.asarray(x), jnp.asarray(ids), jnp.asarray(keep)
  dense = jax.nn.one_hot(ids, 5, dtype=jnp.float64)
  pairs = [(lambda x: jfocal.softmax_cross_entropy(x, ids, where=keep),
            lambda x: optax.softmax_cross_entropy_with_integer_labels(x, ids, where=keep)),
           (lambda x: jfocal.softmax_cross_entropy(x, dense, where=keep),
            lambda x: optax.softmax_cross_entropy(x, dense, where=keep))]
  for ours, theirs in pairs:
    assert_close(ours(x), theirs(x), jnp.float64, what="loss vs optax")
    assert_close(jax.grad(lambda x: jnp.sum(ours(x)))(x),
                 jax.grad(lambda x: jnp.sum(theirs(x)))(x), jnp.float64, what="gradient vs optax")


def test_a_per_logit_where_equals_removing_the_masked_classes(transform):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(5, 5)) * 3)
  # Row 3's target class is masked: it leaves the sum like the others (only smoothing is left).
  keep = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  ids = jnp.array([1, 4, 2, 1, 0])
  poisoned = jnp.where(keep, x, jnp.nan)
  settings = [(labels, eps) for labels in (ids, jax.nn.one_hot(ids, 5, dtype=jnp.float64))
              for eps in (0.0, 0.2)]
  kept = lambda labels, row: (jax.nn.one_hot(ids[row], 5)[keep[row]] if jnp.ndim(labels) == 1
                              else labels[row][keep[row]])[None]
  # Each row's kept classes as a softmax of their own: one program for every row and setting.
  removed = jax.jit(lambda x: [[jfocal.softmax_focal_loss(
      x[row][keep[row]][None], kept(labels, row), gamma=1.5, label_smoothing=eps)[0]
      for row in range(4)] for labels, eps in settings])(x)
  for (labels, eps), expected in zip(settings, removed):
    fn = transform(lambda x: jfocal.softmax_focal_loss(x, labels, where=jnp.asarray(keep),
                                                       gamma=1.5, label_smoothing=eps))
    loss = fn(poisoned)
    np.testing.assert_allclose(loss[:4], expected, rtol=1e-12)
    assert loss[4] == 0  # no class left: the row is masked
    mean = jfocal.softmax_focal_loss(poisoned, labels, where=jnp.asarray(keep), gamma=1.5,
                                     label_smoothing=eps, reduction="mean")
    np.testing.assert_allclose(mean, np.sum(loss) / 4, rtol=1e-12)
    grad = jax.grad(lambda x: jnp.sum(fn(x)))(poisoned)
    assert np.all(np.asarray(grad)[~keep] == 0) and np.all(np.isfinite(grad))
  # Dense targets: label gradients at masked classes are 0 as well.
  dense = jax.nn.one_hot(ids, 5, dtype=jnp.float64)
  label_grad = jax.grad(lambda y: jnp.sum(jfocal.softmax_cross_entropy(
      poisoned, y, where=jnp.asarray(keep))))(dense)
  assert np.all(np.asarray(label_grad)[~keep] == 0) and np.all(np.isfinite(label_grad))


def test_the_two_kinds_of_where_are_told_apart_by_rank():
  """The logits' rank: per logit; lower: per example; (B, 1) is both, the same thing."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)))
  ids = jnp.array([0, 1, 2, 1])
  rows = jnp.array([True, False, True, True])
  per_example = jfocal.softmax_cross_entropy(x, ids, where=rows)
  per_logit = jfocal.softmax_cross_entropy(x, ids, where=rows[:, None])
  np.testing.assert_array_equal(per_example, per_logit)
  np.testing.assert_array_equal(per_example, jnp.where(rows, jfocal.softmax_cross_entropy(x, ids),
                                                       0))


MARGINS = [0.0, 0.5, 1.0, 5.0, 10.0, 15.0, 17.0, 20.0, 30.0, 50.0, 80.0, 100.0, 110.0]


def _exact_tail(margin, others, gamma):
  """For logits [m, 0, ...] and target 0, with 40 digits: the loss (1 - p_t)^gamma (-log p_t),
  log(1 - p_t), and d loss / d z_t = -(1 - p_t) t'(-log p_t)."""
  import mpmath
  with mpmath.workdps(40):
    rest = others * mpmath.exp(-mpmath.mpf(margin))
    q = rest / (1 + rest)  # 1 - p_t
    n = mpmath.log1p(rest)
    slope = gamma * q ** (gamma - 1) * (1 - q) * n if gamma else 0  # t' = slope + q^gamma
    gradient = -q * (slope + q ** gamma)
    return float(q ** gamma * n), float(mpmath.log(q)), float(gradient)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_relative_precision_as_p_t_tends_to_one(dtype):
  """A few ulp of the 40-digit value where the loss is representable, +0.0 below, never -0.0.

  8 ulp for integer gamma and for k + 1/2 above 1 (a product and a square root);
  another non-integer power is exp(gamma log(1 - p)), whose exponent carries
  the rounding of a logarithm of size |log(1 - p)|: another gamma |log(1 - p)| ulp.
  """
  tiny, eps = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).eps)
  labels = {"ids": jnp.array([0]), "dense": jnp.asarray([[1.0, 0, 0, 0, 0]], dtype)}
  for gamma in (0.0, 2.0, 0.5, 1.5):
    for name, y in labels.items():
      eager = lambda x: jfocal.softmax_focal_loss(x, y, gamma=gamma)
      for loss in (eager, jax.jit(eager)):
        for margin in MARGINS:
          exact, log_one_minus_p, _ = _exact_tail(margin, 4, gamma)
          algebraic = gamma.is_integer() or (gamma > 1 and (2 * gamma).is_integer())
          ulps = 8 + (0 if algebraic else gamma * abs(log_one_minus_p))
          value = float(loss(jnp.asarray([[margin, 0.0, 0.0, 0.0, 0.0]], dtype))[0])
          assert not np.signbit(value), f"-0.0 at margin {margin} ({name}, gamma {gamma})"
          if exact >= tiny:
            assert abs(value - exact) <= ulps * eps * exact, (
                f"{name}, gamma {gamma}, margin {margin}: {value!r} against {exact!r} "
                f"({abs(value - exact) / exact / eps:.1f} ulp)")
          else:
            assert value <= 2 * tiny, f"{value!r} should underflow like {exact!r}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_target_gradient_keeps_relative_precision_as_p_t_tends_to_one(dtype):
  """With class ids, d loss / d z_t = -(1 - p_t) t'(-log p_t) within 8 ulp of 40 digits.

  ``p_t - 1`` is computed as minus the other classes' share, not by subtracting
  from 1, so it does not round to 0 while the loss is still representable.
  """
  tiny, eps = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).eps)
  for gamma in (0, 2):
    eager = jax.grad(lambda x: jnp.sum(jfocal.softmax_focal_loss(x, jnp.array([0]), gamma=gamma)))
    for grad in (eager, jax.jit(eager)):
      for margin in MARGINS:
        exact = _exact_tail(margin, 4, gamma)[2]
        if -exact < tiny:
          continue
        value = float(grad(jnp.asarray([[margin, 0.0, 0.0, 0.0, 0.0]], dtype))[0, 0])
        assert abs(value - exact) <= 8 * eps * -exact, (
            f"gamma {gamma}, margin {margin}: {value!r} against {exact!r}")


def test_tuple_axes_are_checked():
  x = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match="names an axis twice"):
    jfocal.softmax_cross_entropy(x, np.zeros((2,), np.int32), axis=(1, -2))
  with pytest.raises(ValueError, match="axis 3 is out of range"):
    jfocal.softmax_cross_entropy(x, np.zeros((2,), np.int32), axis=(1, 3))
  with pytest.raises(TypeError, match="axis must be an int or a tuple of ints"):
    jfocal.softmax_cross_entropy(x, np.zeros((2,), np.int32), axis=(1.0, 2))
