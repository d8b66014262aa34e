"""The alpha recipes and the prior initialiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypothesis import given, strategies as st

import jfocal
import strategies as S
from helpers import assert_close


def test_alpha_from_counts_balances_total_weights(transform):
  positives = jnp.array([10.0, 3.0, 500.0])
  negatives = jnp.array([990.0, 3.0, 20.0])
  alpha = transform(jfocal.alpha_from_counts)(positives, negatives)
  np.testing.assert_allclose(alpha / (1 - alpha), negatives / positives, rtol=1e-6)
  np.testing.assert_allclose(alpha * positives, (1 - alpha) * negatives, rtol=1e-5)


def test_alpha_from_counts_without_samples_is_neutral():
  assert float(jfocal.alpha_from_counts(0, 0)) == 0.5


def test_alpha_from_counts_rejects_negative_counts():
  with pytest.raises(ValueError, match="num_negatives"):
    jfocal.alpha_from_counts(3, -1)


def test_background_alpha_matches_the_seed_recipe():
  np.testing.assert_array_equal(jfocal.background_alpha(0.25, 4), [0.25, 0.75, 0.75, 0.75])
  np.testing.assert_array_equal(jfocal.background_alpha(0.1, 3, background_index=-1),
                                np.array([0.9, 0.9, 0.1]))
  np.testing.assert_array_equal(jfocal.background_alpha(0.1, 3, dtype=jnp.float32),
                                np.array([0.1, 0.9, 0.9], np.float32))


def test_helpers_return_jaxs_default_float():
  """float64 under jax_enable_x64 (as here), float32 otherwise; float inputs keep their precision."""
  for mode, expected in ((True, jnp.float64), (False, jnp.float32)):
    with jax.enable_x64(mode):
      assert jfocal.alpha_from_counts(3, 7).dtype == expected
      assert jfocal.class_balanced_alpha(np.array([3, 7])).dtype == expected
      assert jfocal.background_alpha(0.25, 3).dtype == expected
      assert jfocal.ghmc_init(4).dtype == expected
      assert jfocal.ema_normalizer_init().dtype == expected
      assert jfocal.prior_bias_init(0.01)(None, (2,)).dtype == expected
  assert jfocal.alpha_from_counts(np.float32(3), 7).dtype == jnp.float32
  assert jfocal.alpha_from_counts(3.0, np.float64(7)).dtype == jnp.float64


@pytest.mark.parametrize("kwargs, word", [
    (dict(alpha=1.2, num_classes=3), "alpha"),
    (dict(alpha=0.2, num_classes=0), "num_classes"),
    (dict(alpha=0.2, num_classes=3, background_index=3), "background_index"),
])
def test_background_alpha_rejects_bad_arguments(kwargs, word):
  with pytest.raises(ValueError, match=word):
    jfocal.background_alpha(**kwargs)


@pytest.mark.parametrize("prior", [0.01, 0.5, 0.9])
def test_prior_bias_init_gives_sigmoid_of_bias_equal_to_prior(prior):
  bias = jfocal.prior_bias_init(prior)(jax.random.key(0), (5,), jnp.float64)
  assert bias.shape == (5,) and bias.dtype == jnp.float64
  np.testing.assert_allclose(jax.nn.sigmoid(bias), prior, rtol=1e-12)


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.5, 2.0])
def test_prior_bias_init_rejects_degenerate_priors(prior):
  with pytest.raises(ValueError, match="prior"):
    jfocal.prior_bias_init(prior)


def test_class_balanced_weights_are_a_softmax_alpha(transform):
  """Weights summing to C (some above 1) weight each target class's term, as weights= would."""
  alpha = jfocal.class_balanced_alpha(jnp.array([900, 90, 9]), beta=0.99)
  assert float(jnp.max(alpha)) > 1
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  ids = jnp.array([0, 1, 2, 2, 1, 0])
  for loss in (jfocal.softmax_balanced_cross_entropy, jfocal.softmax_focal_loss):
    weighted = transform(lambda x, a: loss(x, ids, alpha=a, reduction="sum"))(logits, alpha)
    expected = jnp.sum(loss(logits, ids, alpha=jnp.ones(3)) * np.asarray(alpha, np.float32)[ids])
    assert_close(weighted, expected, jnp.float32)


# --------------------------------------------------------------------------------------------
# class_balanced_alpha


@given(counts=S.hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(0, 10 ** 6)),
       beta=st.sampled_from([0.0, 0.9, 0.99, 0.999, 0.9999]) | st.floats(0.0, 0.99999))
def test_class_balanced_alpha_is_the_normalised_inverse_effective_number(counts, beta):
  got = jfocal.class_balanced_alpha(counts, beta=beta)
  n = np.maximum(counts, 1).astype(np.float64)
  effective = (1 - beta ** n) / (1 - beta) if beta > 0 else np.ones_like(n)
  expected = (1 / effective) / np.sum(1 / effective) * len(n)
  assert got.shape == counts.shape and got.dtype == jnp.float64  # x64: JAX's default float
  assert_close(got, expected, jnp.float64)
  np.testing.assert_allclose(np.sum(np.asarray(got, np.float64)), len(n), rtol=1e-12)


def test_class_balanced_alpha_limits_and_use_as_class_weights(transform):
  counts = jnp.array([1000, 100, 10])
  np.testing.assert_array_equal(jfocal.class_balanced_alpha(counts, beta=0.0), [1.0, 1.0, 1.0])
  inverse_frequency = 1 / np.array([1000, 100, 10])
  np.testing.assert_allclose(jfocal.class_balanced_alpha(counts, beta=1 - 1e-9),
                             3 * inverse_frequency / inverse_frequency.sum(), rtol=1e-5)
  # Integer counts give JAX's default float (float64 here, under x64); floats keep theirs.
  assert jfocal.class_balanced_alpha(jnp.array([5, 5], jnp.int32), beta=0.99).dtype == jnp.float64
  assert jfocal.class_balanced_alpha(np.array([5.0, 5.0], np.float32), beta=0.99).dtype == jnp.float32
  with jax.enable_x64(False):
    assert jfocal.class_balanced_alpha(np.array([5, 5]), beta=0.99).dtype == jnp.float32
  w = jfocal.class_balanced_alpha(counts.astype(jnp.float32), beta=0.99)
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
