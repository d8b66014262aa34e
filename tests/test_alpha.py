"""The alpha recipes and the prior initialiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
from conftest import assert_close


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
                                np.array([0.9, 0.9, 0.1], np.float32))


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
    expected = jnp.sum(loss(logits, ids, alpha=jnp.ones(3)) * np.asarray(alpha)[ids])
    assert_close(weighted, expected, jnp.float32)
