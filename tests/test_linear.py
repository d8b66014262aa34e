"""The fused linear + softmax losses: exactly the materialised loss of ``features @ kernel + bias``.

References are float64 autodiff of the materialised computation, written
apart from the implementation: optax's cross-entropy (with label smoothing,
the z-loss, masks, weights and reductions in NumPy-style code here) and
jfocal's own `softmax_focal_loss` for focal loss, itself tested against the
textbook formula. The sharded checks (tokens sharded under `jax.jit`, the
vocabulary sharded with ``vocab_axis_name``) are in
``multidevice/sharding_checks.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import jfocal
from helpers import assert_close, compiled_as_users_get_it, on_reference_device

FUSED = {"cross_entropy": jfocal.linear_softmax_cross_entropy,
         "focal": jfocal.linear_softmax_focal_loss}
IGNORE = -100


def reference_loss(kind, features, kernel, bias, labels, *, alpha=None, gamma=2.0, weights=None,
                   where=None, ignore_index=None, label_smoothing=0.0, z_loss=0.0,
                   reduction="none", normalizer=None):
  """The materialised loss in float64 (call through `on_reference_device` or under x64)."""
  logits = jnp.dot(features, kernel, precision="highest")
  if bias is not None:
    logits = logits + bias
  if kind == "focal":
    return jfocal.softmax_focal_loss(logits, labels, alpha=alpha, gamma=gamma, weights=weights,
                                     where=where, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, z_loss=z_loss,
                                     reduction=reduction, normalizer=normalizer)
  vocab = logits.shape[-1]
  kept = jnp.ones(labels.shape, bool) if where is None else jnp.broadcast_to(where, labels.shape)
  if ignore_index is not None:
    kept = kept & (labels != ignore_index)
  safe = jnp.where(kept, labels, 0)
  targets = optax.smooth_labels(jax.nn.one_hot(safe, vocab, dtype=logits.dtype), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets)
  loss = loss + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
  if weights is not None:
    loss = loss * weights
  loss = jnp.where(kept, loss, 0)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return jnp.sum(loss)
  denominator = (jnp.sum(kept, dtype=loss.dtype) if normalizer in (None, "num_positives")
                 else normalizer)
  return jnp.sum(loss) / jnp.maximum(denominator, 1)


@st.composite
def problems(draw):
  """A shape (V often not a multiple of the block), inputs, and a set of keywords."""
  tokens = draw(st.sampled_from([(1,), (7,), (2, 5), (33,)]))
  d = draw(st.integers(1, 6))
  vocab = draw(st.integers(1, 150))
  block = draw(st.integers(1, vocab + 3))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  features = rng.normal(size=tokens + (d,)) * draw(st.sampled_from([0.5, 3.0]))
  kernel = rng.normal(size=(d, vocab))
  labels = rng.integers(0, vocab, size=tokens)
  keywords = {}
  if draw(st.booleans()):
    labels = np.where(rng.random(tokens) < 0.3, IGNORE, labels)
    keywords["ignore_index"] = IGNORE
  if draw(st.booleans()):
    keywords["where"] = rng.random(tokens) < 0.7
  if draw(st.booleans()):
    keywords["weights"] = rng.random(tokens) * 2
  keywords["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
  keywords["z_loss"] = draw(st.sampled_from([0.0, 1e-2]))
  keywords["reduction"], keywords["normalizer"] = draw(st.sampled_from(
      [("none", None), ("sum", None), ("mean", None), ("mean", "num_positives"), ("mean", 2.5)]))
  bias = rng.normal(size=(vocab,)) if draw(st.booleans()) else None
  return features, kernel, bias, labels, block, keywords


def _cotangent(value):
  """A fixed, uneven cotangent, so that an unreduced loss's gradient checks every token.

  A NumPy constant: computed by XLA it could be constant-folded under `jax.jit` and
  computed at run time eagerly, with different roundings of the cosine.
  """
  return np.cos(np.arange(value.size)).reshape(value.shape).astype(value.dtype)


def value_and_grads(fn, features, kernel, bias, *args, **kwargs):
  """The loss and its gradient in (features, kernel, bias) for the fixed cotangent."""
  def scalar(features, kernel, bias):
    value = fn(features, kernel, bias, *args, **kwargs)
    return jnp.sum(value * _cotangent(value)), value
  (_, value), grads = jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True)(
      features, kernel, bias)
  return value, grads


@pytest.mark.parametrize("kind", FUSED)
@given(problem=problems())
def test_equals_float64_autodiff_of_the_materialised_loss(kind, problem):
  """Values and gradients in the features, kernel and bias, for every keyword, any V and block."""
  features, kernel, bias, labels, block, keywords = problem
  extra = {"gamma": 2.0, "alpha": np.linspace(0.2, 0.9, kernel.shape[1])} if kind == "focal" else {}
  fused = functools.partial(_fused_call, kind, block)
  value, grads = jax.jit(functools.partial(value_and_grads, fused, labels=labels, **extra,
                                           **keywords))(features, kernel, bias)
  expected, expected_grads = on_reference_device(functools.partial(
      value_and_grads, functools.partial(reference_loss, kind), labels=labels, **extra,
      **keywords))(features, kernel, bias)
  assert_close(value, expected, jnp.float64, what="loss")
  for name, got, want in zip(("features", "kernel", "bias"), grads, expected_grads):
    if want is not None:
      assert_close(got, want, jnp.float64, what=f"d/d{name}")


def _fused_call(kind, block, features, kernel, bias, labels, **keywords):
  return FUSED[kind](features, kernel, labels.astype(jnp.int32), bias=bias, block_size=block,
                     **keywords)


def _problem(tokens=64, d=16, vocab=300, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(tokens, d)) * scale, rng.normal(size=(d, vocab)) / np.sqrt(d),
          rng.normal(size=(vocab,)), rng.integers(0, vocab, size=(tokens,)))


@pytest.mark.parametrize("kind", FUSED)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_narrow_inputs_match_the_materialised_loss_and_keep_their_dtypes(kind, dtype):
  """float32 within float32's tolerance of float64; bfloat16 features and kernel are multiplied
  as they are (float32 accumulation) and their gradients come back in bfloat16. Both at
  float32's matmul precision, which a GPU's default (TensorFloat-32) is not: there d/dfeatures
  in float32 was 5e-4 off."""
  features, kernel, bias, labels = _problem()
  features, kernel, bias = (jnp.asarray(a).astype(dtype) for a in (features, kernel, bias))
  keywords = dict(label_smoothing=0.1, z_loss=1e-3, reduction="mean")
  with jax.default_matmul_precision("float32"):
    value, grads = jax.jit(functools.partial(value_and_grads, functools.partial(
        _fused_call, kind, 128), labels=labels, **keywords))(features, kernel, bias)
  expected, expected_grads = on_reference_device(functools.partial(
      value_and_grads, functools.partial(reference_loss, kind), labels=labels, **keywords))(
          features, kernel, bias)
  assert value.dtype == jnp.float32  # a reduced loss is accumulated in float32
  assert_close(value, expected, dtype, what="loss")
  for name, got, want in zip(("features", "kernel", "bias"), grads, expected_grads):
    assert got.dtype == dtype, name
    assert_close(got, want, dtype, what=f"d/d{name}", scale=float(np.max(np.abs(want))))


def test_the_target_loss_keeps_its_relative_precision_as_p_t_tends_to_one():
  """-log p_t ~ 1e-8 in float32, not 0: as `softmax_cross_entropy`, unlike log(sum)."""
  _, kernel, _, _ = _problem(tokens=8, vocab=50)
  labels = np.random.default_rng(1).permutation(50)[:8]
  features = np.eye(8, 16)  # orthonormal rows: token i's target logit alone gains 20
  kernel[:, labels] += 20 * features.T
  features, kernel = features.astype(np.float32), kernel.astype(np.float32)
  got = jfocal.linear_softmax_cross_entropy(features, kernel, labels, block_size=16)
  expected = on_reference_device(functools.partial(reference_loss, "cross_entropy",
                                                   labels=labels))(features, kernel, None)
  assert np.all(np.asarray(expected) > 0) and np.all(np.asarray(expected) < 1e-5)
  assert_close(got, expected, jnp.float32, what="loss")


@pytest.mark.parametrize("kind, label_smoothing", [("cross_entropy", 0.1), ("focal", 0.0),
                                                   ("focal", 0.1)])
def test_jit_equals_eager(kind, label_smoothing):
  """The loss and its gradient as a training step takes them (a mean over the tokens): bitwise,
  except the gradient of focal loss with label smoothing, where the backward pass
  differentiates every class's focal term and XLA was seen to round a few entries an ulp
  apart in the two programs (the eager backward pass is a program of its own)."""
  features, kernel, bias, labels = (jnp.asarray(a) for a in _problem(vocab=100))
  call = jax.value_and_grad(lambda f, w, b: FUSED[kind](
      f, w, labels, bias=b, label_smoothing=label_smoothing, z_loss=1e-3, reduction="mean",
      block_size=32), argnums=(0, 1, 2))
  (eager, eager_grads), (jitted, jitted_grads) = call(features, kernel, bias), jax.jit(call)(
      features, kernel, bias)
  np.testing.assert_array_equal(jitted, eager)
  for got, want in zip(jitted_grads, eager_grads):
    if kind == "focal" and label_smoothing:
      assert_close(got, want, jnp.float64, what="gradient")
    else:
      np.testing.assert_array_equal(got, want)


def test_traced_hyper_parameters_have_the_materialised_derivatives():
  """d/dgamma, d/dalpha and d/dz_loss of a traced gamma, alpha and z_loss, with label smoothing."""
  features, kernel, bias, labels = (jnp.asarray(a) for a in _problem(tokens=16, vocab=70))
  params = (jnp.asarray(1.5), jnp.linspace(0.2, 1.0, 70), jnp.asarray(1e-2))

  def total(fn, gamma, alpha, z):
    return fn(gamma=gamma, alpha=alpha, z_loss=z, label_smoothing=0.2, reduction="sum")

  fused = functools.partial(jfocal.linear_softmax_focal_loss, features, kernel, labels,
                            bias=bias, block_size=32)
  dense = functools.partial(jfocal.softmax_focal_loss, features @ kernel + bias, labels)
  got = jax.jit(jax.grad(functools.partial(total, fused), argnums=(0, 1, 2)))(*params)
  want = jax.grad(functools.partial(total, dense), argnums=(0, 1, 2))(*params)
  for name, g, w in zip(("gamma", "alpha", "z_loss"), got, want):
    assert_close(g, w, jnp.float64, what=f"d/d{name}")


def test_an_all_ignored_batch_has_mean_zero_and_zero_gradients():
  features, kernel, bias, _ = (jnp.asarray(a) for a in _problem(tokens=5, vocab=40))
  labels = jnp.full((5,), IGNORE)
  features = features.at[0].set(jnp.nan)  # a padded row may hold anything
  loss = lambda f, w, b: jfocal.linear_softmax_focal_loss(
      f, w, labels, bias=b, ignore_index=IGNORE, reduction="mean", block_size=16)
  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(features, kernel, bias)
  assert value == 0
  for grad in grads:
    np.testing.assert_array_equal(grad, jnp.zeros_like(grad))


def test_an_id_out_of_range_gives_nan_for_its_token_only():
  features, kernel, _, labels = (jnp.asarray(a) for a in _problem(tokens=4, vocab=30))
  loss = jfocal.linear_softmax_cross_entropy(features, kernel, labels.at[1].set(30))
  assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))


def test_checked_reports_an_id_out_of_range():
  features, kernel, _, labels = (jnp.asarray(a) for a in _problem(tokens=4, vocab=30))
  checked = jfocal.checked(jfocal.linear_softmax_cross_entropy)
  assert checked(features, kernel, labels).shape == (4,)
  with pytest.raises(Exception, match=r"labels: integer labels must be class ids in \[0, 29\]"):
    checked(features, kernel, labels.at[2].set(30))


def _temp_bytes(tokens, d, vocab, block):
  features = jnp.zeros((tokens, d), jnp.float32)
  kernel = jnp.zeros((d, vocab), jnp.float32)
  labels = jnp.zeros((tokens,), jnp.int32)
  step = jax.jit(jax.value_and_grad(lambda f, w: jfocal.linear_softmax_focal_loss(
      f, w, labels, reduction="mean", block_size=block), argnums=(0, 1)))
  memory = compiled_as_users_get_it(step.lower(features, kernel)).memory_analysis()
  if memory is None:
    pytest.skip(f"no memory analysis on {jax.default_backend()}")
  return memory.temp_size_in_bytes


def test_memory_is_two_blocks_of_logits_whatever_the_vocabulary():
  """XLA's temp of value-and-grad: at most two [tokens, block] float32 blocks (a block's logits
  and one use of them, the gradient's block in the backward pass) plus O(tokens), the same at
  V = 4096 and V = 16384, where the logits alone would take 4 MiB and 16 MiB. (A masked sum
  picking the target's logit was once a third block on the CPU.)"""
  tokens, d, block = 256, 16, 128
  blocks = 2 * tokens * block * 4
  small, large = _temp_bytes(tokens, d, 4096, block), _temp_bytes(tokens, d, 16384, block)
  assert small <= blocks + 64 * tokens, (small, blocks)
  assert large == small


def test_forward_mode_raises_and_names_the_materialised_loss():
  features, kernel, _, labels = (jnp.asarray(a) for a in _problem(tokens=4, vocab=30))
  loss = lambda f: jfocal.linear_softmax_cross_entropy(f, kernel, labels, reduction="sum")
  for transform in (lambda: jax.jvp(loss, (features,), (features,)),
                    lambda: jax.jacfwd(loss)(features), lambda: jax.hessian(loss)(features),
                    lambda: jax.linearize(loss, features),
                    lambda: jax.linearize(jax.jit(loss), features),
                    lambda: jax.jit(lambda f: jax.linearize(loss, f)[1](f))(features)):
    with pytest.raises(TypeError, match=r"reverse-mode .*jfocal\.softmax_cross_entropy\(features "
                       r"@ kernel \+ bias"):
      transform()
  # A loss that does not depend on what is linearised is a constant there.
  _, linear = jax.linearize(lambda x: jnp.sum(x) + loss(features), features)
  assert linear(features) == jnp.sum(features)


@pytest.mark.parametrize("call, error, message", [
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w[:-1], y), ValueError,
     r"kernel must have shape \[d, V\] with d = features.shape\[-1\] = 4"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w, y.astype(float)), TypeError,
     r"labels of linear_softmax_cross_entropy must be integer class ids.*softmax_cross_entropy"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w, y[:2]), ValueError, "labels"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f.astype(int), w, y), TypeError,
     "features must be a floating-point array"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w, y, bias=jnp.zeros(3)), ValueError,
     r"bias must have shape \[V\] = \(9,\)"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w, y, where=jnp.ones((5, 9), bool)),
     ValueError, "where of linear_softmax_cross_entropy masks tokens"),
    (lambda f, w, y: jfocal.linear_softmax_cross_entropy(f, w, y, block_size=0), ValueError,
     "block_size must be a positive int"),
    (lambda f, w, y: jfocal.linear_softmax_focal_loss(f, w, y, alpha=0.25), ValueError,
     r"alpha must be a per-class vector of shape \(9,\)"),
    (lambda f, w, y: jfocal.linear_softmax_focal_loss(f, w, y, gamma=-1.0), ValueError, "gamma"),
])
def test_bad_arguments_raise_a_clear_error(call, error, message):
  features, kernel = jnp.ones((5, 4)), jnp.ones((4, 9))
  with pytest.raises(error, match=message):
    call(features, kernel, jnp.zeros((5,), jnp.int32))
