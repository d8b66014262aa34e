"""Defined answers at the edges of the domain: infinite, NaN, odd dtypes, recompilation.

Empty and all-masked inputs are properties of the fuzz campaign (tests/test_fuzz.py);
a softmax over no classes is here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
import registry

INF = np.inf
NUM_CLASSES = 3
PARAMS = registry.PARAMS


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_infinite_logits_give_the_limits(gamma, transform):
  x = jnp.array([INF, -INF, INF, -INF, INF], jnp.float32)
  y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.3], jnp.float32)
  fn = transform(lambda x: jfocal.sigmoid_focal_loss(x, y, gamma=gamma))
  np.testing.assert_array_equal(fn(x), [0.0, 0.0, INF, INF, INF])
  grad = jax.grad(lambda x: jnp.sum(fn(x)))(x)
  # d/dx -> alpha_t * (sigma(x) - y) * (1 - p_t)**gamma, the limits of the finite formula.
  y_soft = 0.3
  soft = (0.25 * y_soft + 0.75 * (1 - y_soft)) * (1 - y_soft) * (1 - y_soft) ** gamma
  np.testing.assert_allclose(grad, [0.0, 0.0, 0.75, -0.25, soft], rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_infinite_logits_give_the_limits(gamma, transform):
  x = jnp.array([[INF, 0.0, 1.0],     # target is the only +inf: certain and right
                 [0.0, INF, 1.0],     # another class is +inf: certain and wrong
                 [-INF, 0.0, 1.0],    # target impossible
                 [0.0, -INF, -INF],   # the others impossible
                 [-INF, -INF, -INF]], jnp.float32)  # no information: uniform
  ids = jnp.array([0, 0, 0, 0, 1])
  fn = transform(lambda x: jfocal.softmax_focal_loss(x, ids, gamma=gamma))
  uniform = (2 / 3) ** gamma * np.log(3)
  np.testing.assert_allclose(fn(x), [0.0, INF, INF, 0.0, uniform], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(fn(x)))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad[1], [-1.0, 1.0, 0.0])  # d(x_k - x_t): as for a huge finite gap
  # One-hot targets: an impossible class without target mass adds 0, not 0 * inf.
  targets = jax.nn.one_hot(ids, 3, dtype=jnp.float32)
  dense = transform(lambda x: jfocal.softmax_focal_loss(x, targets, gamma=gamma))
  np.testing.assert_allclose(dense(x), [0.0, INF, INF, 0.0, uniform], rtol=1e-6)
  assert np.all(np.isfinite(jax.grad(lambda x: jnp.sum(dense(x)))(x)))


@pytest.mark.parametrize("family", ["sigmoid", "softmax"])
def test_nan_logits_poison_only_their_own_entry(family):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  logits = logits.at[2, 1].set(jnp.nan)
  if family == "sigmoid":
    fn = lambda x: jfocal.sigmoid_focal_loss(x, jnp.array([0, 1, 2, 3]))
    bad = np.zeros((4, 3), bool)
    bad[2, 1] = True
  else:
    fn = lambda x: jfocal.softmax_focal_loss(x, jnp.array([0, 1, 2, 0]))
    bad = np.array([False, False, True, False])
  assert np.array_equal(np.isnan(fn(logits)), bad)
  grad = jax.grad(lambda x: jnp.sum(jnp.where(jnp.asarray(bad), 0, fn(x))))(logits)
  rows = np.arange(4) != 2
  assert np.all(np.isfinite(grad[rows]))


INTEGER_DTYPES = (jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.int32, jnp.uint32, jnp.int64)


@pytest.mark.parametrize("loss", PARAMS)
def test_integer_labels_of_every_integer_dtype(loss):
  """Each family converts ids once (`checks.wide_ids`): every dtype for the first loss of a
  family, uint8 and int64 for the others."""
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, NUM_CLASSES)), jnp.float32)
  ids = np.array([0, 1, 2, 1, 0])
  expected = loss(logits, jnp.asarray(ids, jnp.int32))
  first = loss.name in (registry.SIGMOID[0], registry.SOFTMAX[0])
  for dtype in INTEGER_DTYPES if first else (jnp.uint8, jnp.int64):
    np.testing.assert_array_equal(loss(logits, jnp.asarray(ids).astype(dtype)), expected,
                                  err_msg=str(dtype))


def test_many_classes_with_narrow_label_dtypes():
  logits = jnp.zeros((2, 300), jnp.float32)
  ids = jnp.array([250, 100], jnp.uint8)
  np.testing.assert_array_equal(jfocal.softmax_cross_entropy(logits, ids),
                                jfocal.softmax_cross_entropy(logits, ids.astype(jnp.int32)))
  # 300 (background) does not fit uint8: such ids cannot be expressed, 255 is a class.
  assert np.all(np.isfinite(jfocal.sigmoid_focal_loss(logits, jnp.array([255], jnp.uint8)
                                                       .repeat(2))))


def test_weakly_typed_python_scalars_compute_in_float32():
  with jax.enable_x64(False):
    value = jfocal.sigmoid_focal_loss(2.0, 1.0)
    assert value.dtype == jnp.float32 and value.shape == ()


def test_an_array_gamma_is_traced_eagerly_as_under_jit():
  """A 0-d NumPy array is an array: traced eagerly too, so the eager call runs the program
  of a jitted call with it as an argument (a Python 2.0 selects the integer power instead,
  which here rounds 2 ulp apart). Found by the fuzz campaign at the largest float32 logit."""
  x = jnp.full((3,), jnp.finfo(jnp.float32).max, jnp.float32)
  y = jnp.full((3,), 0.44566312, jnp.float32)
  loss = lambda x, y, gamma: jfocal.poly1_focal_loss(x, y, epsilon=1.0, gamma=gamma)
  jitted = jax.jit(loss)(x, y, np.array(2.0, np.float32))
  for gamma in (np.array(2.0, np.float32), jnp.asarray(2.0, jnp.float32)):
    np.testing.assert_array_equal(loss(x, y, gamma), jitted)


def test_traced_arguments_do_not_recompile_and_a_python_gamma_does():
  traces = []

  @jax.jit
  def step(x, alpha, weights):
    traces.append(1)
    return jfocal.sigmoid_focal_loss(x, jnp.array([0, 1]), alpha=alpha, weights=weights,
                                     reduction="sum")

  x = jnp.zeros((2, 3), jnp.float32)
  for alpha, scale in [(0.25, 1.0), (0.5, 2.0), (0.9, 0.5)]:
    step(x, jnp.float32(alpha), jnp.full((2, 1), scale, jnp.float32))
  assert len(traces) == 1, "changing alpha or weights must not retrace"

  static = jax.jit(lambda x, gamma: jfocal.sigmoid_focal_loss(x, jnp.array([0, 1]), gamma=gamma),
                   static_argnames="gamma")
  before = static._cache_size()
  static(x, gamma=2.0)
  static(x, gamma=2.0)
  static(x, gamma=0.5)
  assert static._cache_size() - before == 2, "gamma is static: one compilation per value"
  traced = jax.jit(lambda x, gamma: jfocal.sigmoid_focal_loss(x, jnp.array([0, 1]), gamma=gamma))
  for gamma in (2.0, 0.5, 0.0):
    traced(x, jnp.float32(gamma))
  assert traced._cache_size() == 1, "an array gamma is traced: one compilation for all"


def test_eager_calls_compile_once_per_static_configuration():
  """Eager calls run a cached program: new traced values reuse it, a new gamma compiles."""
  compiles = []

  def count_backend_compiles(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration_secs)

  x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)), jnp.float32)
  ids = jnp.array([0, 1, 2, 3, 1])
  call = lambda alpha, weights, gamma=1.5: jfocal.sigmoid_focal_loss(
      x, ids, alpha=alpha, weights=weights, gamma=gamma, reduction="sum")
  # Built before counting: creating them may compile small programs of its own.
  doubled, halved, ones = (jnp.full((5, 1), value, jnp.float32) for value in (2.0, 0.5, 1.0))
  call(0.25, ones)
  jax.monitoring.register_event_duration_secs_listener(count_backend_compiles)
  try:
    call(0.5, doubled)
    call(0.9, halved)
    assert compiles == [], "new alpha or weights values must reuse the compiled program"
    call(0.5, ones, gamma=2.5)
    assert len(compiles) == 1, "a new gamma specialises the program: one compilation"
  finally:
    jax.monitoring.unregister_event_duration_listener(count_backend_compiles)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", registry.SOFTMAX)
def test_softmax_over_no_classes_is_the_empty_sum(name, mode):
  """Dense targets over zero classes: the loss is the empty sum, 0 (as optax's, whose own
  test reaches it when a random mask keeps no class), and such rows count as masked, so
  every reduction is 0 and the gradient is empty; class ids cannot be valid and raise."""
  loss = registry.LOSSES[name]
  logits, targets = np.zeros((3, 0), np.float32), np.zeros((3, 0), np.float32)
  def call(x, y, reduction="none"):
    run = (lambda x, y: loss(x, y, reduction=reduction))
    return (run if mode == "eager" else jax.jit(run))(x, y)

  np.testing.assert_array_equal(call(logits, targets), np.zeros(3, np.float32))
  for reduction in ("sum", "mean"):
    assert call(logits, targets, reduction=reduction) == 0
  grad = jax.grad(lambda x: call(x, targets, reduction="mean"))(logits)
  assert grad.shape == (3, 0)
  with pytest.raises(ValueError, match=r"class ids need at least one class.*\(3, 0\)"):
    call(logits, np.zeros(3, np.int32))
