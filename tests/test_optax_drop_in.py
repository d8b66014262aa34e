"""optax's own classification tests, run on jfocal as a new user switching over would.

optax ships its tests with the package (``optax/losses/_classification_test.py``).
Its five test classes of the losses jfocal replaces run here unchanged, with
optax's functions swapped for the jfocal calls a user would write: softmax CE
with one-hot or integer labels (``axis`` as an int or a tuple, ``where`` per
example or per logit), sigmoid binary CE, Poly-1 CE and sigmoid focal loss
(``gamma`` traced through ``jax.jit``). The only translations are calling
conventions: optax passes ``axis`` positionally where jfocal's options are
keyword-only, and optax's focal loss defaults to ``alpha=None`` and Poly-1 to
``epsilon=2``, where jfocal follows the papers (0.25 and 1).
"""

import types

import jax
import pytest
from optax.losses import _classification, _classification_test

import jfocal

# The five classes of optax's test module that cover the losses jfocal replaces.
from optax.losses._classification_test import (  # noqa: F401  (collected by pytest)
    PolyLossTest, SigmoidCrossEntropyTest, SigmoidFocalLossTest, SoftmaxCrossEntropyTest,
    SoftmaxCrossEntropyWithIntegerLabelsTest)


def _softmax_cross_entropy(logits, labels, axis=-1, where=None):
  return jfocal.softmax_cross_entropy(logits, labels, axis=axis, where=where)


def _poly_loss_cross_entropy(logits, labels, *, epsilon=2.0, axis=-1, where=None):
  return jfocal.poly1_cross_entropy(logits, labels, epsilon=epsilon, axis=axis, where=where)


def _sigmoid_focal_loss(logits, labels, *, alpha=None, gamma=2.0):
  return jfocal.sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma)


JFOCAL_FOR_OPTAX = types.SimpleNamespace(**{
    **vars(_classification),  # anything else the tests call stays optax's
    "softmax_cross_entropy": _softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels": _softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": jfocal.sigmoid_cross_entropy,
    "poly_loss_cross_entropy": _poly_loss_cross_entropy,
    "sigmoid_focal_loss": _sigmoid_focal_loss,
})


@pytest.fixture(autouse=True)
def jfocal_in_place_of_optax(monkeypatch):
  """The tests' ``_classification.<loss>`` calls reach jfocal, under JAX's defaults
  (float32, standard promotion) for which optax wrote them."""
  monkeypatch.setattr(_classification_test, "_classification", JFOCAL_FOR_OPTAX)
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    yield


def test_all_of_optaxs_68_tests_of_these_losses_are_collected():
  classes = (PolyLossTest, SigmoidCrossEntropyTest, SigmoidFocalLossTest,
             SoftmaxCrossEntropyTest, SoftmaxCrossEntropyWithIntegerLabelsTest)
  count = sum(len([m for m in dir(c) if m.startswith("test")]) for c in classes)
  assert count >= 68, f"optax's test classes have {count} tests"
