"""The keywords every loss shares, for every loss of the registry.

Reductions, normalisers, masks (``where`` = ``ignore_index`` = slicing),
weights, label forms, label smoothing and transforms (dtypes: the fuzz campaign). The checked calls
run under ``jax.jit``, often in one program with their expected values (one compilation
per test); `test_jit_equals_eager` and the fuzz campaign compare jit and eager directly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import registry
from helpers import assert_close

NUM_CLASSES = 3
PARAMS = registry.PARAMS


def batch(loss, dtype=jnp.float32, seed=0):
  """Logits (images=2, anchors=6, C=3) and class ids per anchor, some positive."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(2, 6, NUM_CLASSES)) * 3).astype(dtype)
  top = NUM_CLASSES + 1 if loss.family == "sigmoid" else NUM_CLASSES  # sigmoid id C: background
  return logits, jnp.asarray(rng.integers(0, top, size=(2, 6)), jnp.int32)


def per_anchor(loss, array):
  """Per-anchor arrays broadcast to the unreduced loss: (2, 6, 1) for sigmoid."""
  return array[..., None] if loss.family == "sigmoid" else array


def dense(loss, ids):
  return jnp.asarray(registry.one_hot(ids, NUM_CLASSES), jnp.float32)


@pytest.mark.parametrize("loss", PARAMS)
def test_sum_and_mean_reduce_the_unreduced_loss(loss):
  logits, ids = batch(loss)
  unreduced = np.asarray(loss(logits, ids), np.float64)
  total = jax.jit(lambda x, y: loss(x, y, reduction="sum"))(logits, ids)
  mean = jax.jit(lambda x, y: loss(x, y, reduction="mean"))(logits, ids)
  assert total.shape == mean.shape == ()
  assert_close(total, unreduced.sum(), jnp.float32)
  assert_close(mean, unreduced.sum() / unreduced.size, jnp.float32)


@pytest.mark.parametrize("loss", PARAMS)
def test_normalizers_divide_the_sum(loss):
  logits, ids = batch(loss)
  total = float(loss(logits, ids, reduction="sum"))
  by_number = loss(logits, ids, reduction="mean", normalizer=7.0)
  by_array = jax.jit(lambda x, y, n: loss(x, y, reduction="mean", normalizer=n))(
      logits, ids, jnp.asarray(7.0))
  assert_close(by_number, total / 7, jnp.float32)
  assert_close(by_array, total / 7, jnp.float32)
  # Positives: foreground anchors for the sigmoid family (id C is background),
  # every labelled example for the softmax family.
  num_positives = int(np.sum(np.asarray(ids) < NUM_CLASSES))
  by_positives = jax.jit(lambda x, y: loss(x, y, reduction="mean", normalizer="num_positives"))(
      logits, ids)
  assert_close(by_positives, total / num_positives, jnp.float32)


@pytest.mark.parametrize("loss", [p for p in PARAMS if p.values[0].family == "sigmoid"])
def test_a_batch_without_positives_is_divided_by_one(loss):
  """Detectors see images with no object every step: sum / max(0 positives, 1) = the sum."""
  logits, _ = batch(loss)
  background = jnp.full(logits.shape[:-1], NUM_CLASSES)
  total = float(loss(logits, background, reduction="sum"))
  assert total > 0
  mean = jax.jit(lambda x: loss(x, background, reduction="mean",
                                normalizer="num_positives"))(logits)
  assert_close(mean, total, jnp.float32)
  # The same with the batch's only positive masked: the positive count is of unmasked targets.
  ids = background.at[0, 0].set(1)
  keep = jnp.ones(ids.shape, bool).at[0, 0].set(False)
  masked = loss(logits, ids, where=per_anchor(loss, keep), reduction="mean",
                normalizer="num_positives")
  assert_close(masked, float(loss(logits, ids, where=per_anchor(loss, keep), reduction="sum")),
               jnp.float32)


@pytest.mark.parametrize("loss", PARAMS)
def test_all_masked_mean_is_zero_with_zero_gradient(loss):
  logits, ids = batch(loss)
  for normalizer in (None, "num_positives"):
    masked = lambda x: loss(x, ids, where=per_anchor(loss, jnp.zeros(ids.shape, bool)),
                            reduction="mean", normalizer=normalizer)
    value, grad = jax.jit(jax.value_and_grad(masked))(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("loss", PARAMS)
def test_where_equals_ignore_index_equals_slicing(loss):
  """Three ways to drop anchors agree, in value and gradient, with NaN in the dropped logits."""
  logits, ids = batch(loss)
  keep = np.array([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 0]], bool)
  poisoned = jnp.where(keep[..., None], logits, jnp.nan)
  ignored_ids = jnp.where(jnp.asarray(keep), ids, -1)
  # The mean needs the sum and the count of what is kept; num_positives the positives kept.
  all_options = (dict(reduction="mean"), dict(reduction="mean", normalizer="num_positives"))
  ways = {"slicing": lambda x, **options: loss(x[keep], ids[keep], **options),
          "where": lambda x, **options: loss(x, ids, where=per_anchor(loss, jnp.asarray(keep)),
                                             **options),
          "ignore_index": lambda x, **options: loss(x, ignored_ids, ignore_index=-1, **options),
          "where, dense targets": lambda x, **options: loss(
              x, dense(loss, ids), where=per_anchor(loss, jnp.asarray(keep)), **options)}

  @jax.jit
  def evaluate(x, poisoned):  # one program for every way and option
    return [{name: jax.value_and_grad(lambda x: fn(x, **options))(
        x if name == "slicing" else poisoned) for name, fn in ways.items()}
            for options in all_options]

  for options, results in zip(all_options, evaluate(logits, poisoned)):
    expected, expected_grad = results.pop("slicing")
    for name, (value, grad) in results.items():
      assert_close(value, expected, jnp.float32, what=f"{name} {options}")
      assert np.all(np.asarray(grad)[~keep] == 0), f"{name}: dropped entries must get 0"
      assert_close(grad[keep], expected_grad[keep], jnp.float32, what=f"{name} gradient")


@pytest.mark.parametrize("loss", PARAMS)
def test_weights_scale_each_entry(loss):
  logits, ids = batch(loss)
  weights = per_anchor(loss, jnp.asarray(np.random.default_rng(3).uniform(size=ids.shape),
                                         jnp.float32))
  weighted = jax.jit(lambda x, w: loss(x, ids, weights=w))(logits, weights)
  assert_close(weighted, np.asarray(loss(logits, ids)) * np.asarray(weights), jnp.float32)
  # A zero weight removes an entry, even one whose loss is infinite.
  # An infinite logit against the target: a +inf other class (softmax), -inf (sigmoid).
  infinite = (logits.at[0, 0, 0].set(jnp.inf) if loss.family == "softmax"
              else logits.at[0, 0].set(-jnp.inf))
  target = ids.at[0, 0].set(1)
  zero = weights.at[0, 0].set(0.0)
  removed = loss(infinite, target, weights=zero)
  assert np.all(np.asarray(removed)[0, 0] == 0) and np.all(np.isfinite(removed))
  # It never hides bad input: a NaN logit stays NaN under a zero weight.
  assert np.all(np.isnan(np.asarray(loss(logits.at[0, 0].set(jnp.nan), ids, weights=zero))[0, 0]))


@pytest.mark.parametrize("loss", registry.ELEMENTWISE_PARAMS)
def test_vmapped_per_anchor_loss_equals_the_batched_call(loss):
  logits, ids = batch(loss)
  per = lambda x, y: loss(x, y)  # x: (C,), y: () class id

  @jax.jit
  def evaluate(x):
    vmapped = lambda x: jax.vmap(jax.vmap(per))(x, ids)
    return (vmapped(x), loss(x, ids), jax.grad(lambda x: jnp.sum(vmapped(x)))(x),
            jax.grad(lambda x: jnp.sum(loss(x, ids)))(x))

  vmapped, batched, grad_vmapped, grad_batched = evaluate(logits)
  assert_close(vmapped, batched, jnp.float32)
  assert_close(grad_vmapped, grad_batched, jnp.float32)


@pytest.mark.parametrize("loss", PARAMS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_jit_equals_eager(loss, reduction):
  logits, ids = batch(loss, seed=5)
  call = lambda x: loss(x, ids, reduction=reduction)
  grad = jax.grad(lambda x: jnp.sum(call(x)))
  eager, eager_grad = call(logits), np.asarray(grad(logits))
  program = jax.jit(lambda x: (call(x), grad(x)))  # one program
  (jitted, jitted_grad), again = program(logits), program(logits)
  for first, second in zip((jitted, jitted_grad), again):  # bit for bit reproducible
    np.testing.assert_array_equal(first, second)
  np.testing.assert_array_max_ulp(np.asarray(jitted), np.asarray(eager), maxulp=1)
  # Eagerly, JAX runs the forward and backward passes as two programs, jit as one,
  # so the gradient may round differently: within one float32 ulp of its scale.
  atol = np.finfo(np.float32).eps * np.max(np.abs(eager_grad))
  np.testing.assert_allclose(jitted_grad, eager_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("loss", PARAMS)
def test_class_ids_equal_their_dense_targets(loss):
  """Ids, bool and (sigmoid) integer 0/1 targets of the logits' shape are all the same targets:
  in the sigmoid family bit for bit (id C is background), in the softmax family to rounding
  (a dense row excludes its largest logit from the log-normaliser's sum, an id its target)."""
  logits, ids = batch(loss)
  targets = dense(loss, ids)
  forms = {"dense": targets, "ids": ids, "bool": targets > 0}
  if loss.family == "sigmoid":
    forms["int8 0/1"] = targets.astype(jnp.int8)
  results = jax.jit(lambda x, forms: {
      name: (loss(x, y), jax.grad(lambda x: jnp.sum(loss(x, y)))(x)) for name, y in forms.items()
  })(logits, forms)
  expected, expected_grad = results.pop("dense")
  for name, (value, grad) in results.items():
    if loss.family == "sigmoid":
      np.testing.assert_array_equal(value, expected, err_msg=name)
      np.testing.assert_array_equal(grad, expected_grad, err_msg=f"{name} gradient")
    else:
      assert_close(value, expected, jnp.float32, what=name)
      assert_close(grad, expected_grad, jnp.float32, what=f"{name} gradient")


@pytest.mark.parametrize("loss", [p for p in PARAMS if p.values[0].takes("label_smoothing")])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_label_smoothing_of_ids_equals_smoothed_dense_targets(loss, eps):
  logits, ids = batch(loss)
  choices = 2 if loss.family == "sigmoid" else NUM_CLASSES
  smoothed = dense(loss, ids) * (1 - eps) + eps / choices
  got, got_dense, expected = jax.jit(lambda x: (
      loss(x, ids, label_smoothing=eps), loss(x, dense(loss, ids), label_smoothing=eps),
      loss(x, smoothed)))(logits)
  assert_close(got, expected, jnp.float32)
  assert_close(got_dense, expected, jnp.float32)


@pytest.mark.parametrize("loss", PARAMS)
def test_python_scalars_lists_and_numpy_arrays_are_accepted(loss):
  x = [[0.5, -1.0, 2.0]]
  ids = [1]
  expected = loss(jnp.asarray(x, jnp.float32), jnp.asarray(ids))
  assert_close(loss(np.asarray(x, np.float32), np.asarray(ids)), expected, jnp.float32)
  with jax.enable_x64(False):
    assert loss(x, ids).dtype == jnp.float32


@pytest.mark.parametrize("loss", PARAMS)
def test_jvp_and_linearize_agree_with_grad(loss):
  logits, ids = batch(loss, jnp.float64, seed=7)
  total = lambda x: jnp.sum(loss(x, ids))
  direction = jnp.asarray(np.random.default_rng(8).normal(size=logits.shape))

  @jax.jit
  def evaluate(x, d):
    return (jnp.vdot(jax.grad(total)(x), d), jax.jvp(total, (x,), (d,))[1],
            jax.linearize(total, x)[1](d))

  expected, forward, linear = evaluate(logits, direction)
  np.testing.assert_allclose(forward, expected, rtol=1e-12)
  np.testing.assert_allclose(linear, expected, rtol=1e-12)
