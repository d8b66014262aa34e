"""Trace-time problems raise ValueError or TypeError that name the argument, eagerly and under jit."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
from test_extended_losses import VALIDATION_CASES

X3 = np.zeros((4, 3), np.float32)
IDS = np.zeros((4,), np.int32)

# (call, exception, words the message must contain)
CASES = {
    "int logits": (lambda: jfocal.sigmoid_focal_loss(IDS, IDS.astype(np.float32)),
                   TypeError, ["logits", "int32", "floating"]),
    "float labels of another shape": (
        lambda: jfocal.sigmoid_focal_loss(X3, np.zeros((4, 1), np.float32)),
        ValueError, ["labels", "(4, 3)", "(4, 1)"]),
    "class ids of the wrong shape": (lambda: jfocal.sigmoid_focal_loss(X3, np.zeros((3,), np.int32)),
                                     ValueError, ["labels", "(4,)", "(3,)"]),
    "binary int labels with the logits' shape": (
        lambda: jfocal.sigmoid_focal_loss(X3, np.zeros((4, 3), np.int32)),
        ValueError, ["labels", "float or bool"]),
    "complex labels": (lambda: jfocal.sigmoid_focal_loss(X3, np.zeros((4, 3), np.complex64)),
                       TypeError, ["labels", "complex64"]),
    "alpha above 1": (lambda: jfocal.sigmoid_focal_loss(X3, IDS, alpha=1.5),
                      ValueError, ["alpha", "[0, 1]", "1.5"]),
    "alpha vector of the wrong length": (
        lambda: jfocal.sigmoid_focal_loss(X3, IDS, alpha=np.array([0.2, 0.3])),
        ValueError, ["alpha", "(3,)", "(2,)"]),
    "negative entry in an alpha vector": (
        lambda: jfocal.softmax_focal_loss(X3, IDS, alpha=np.array([0.2, -0.3, 0.1])),
        ValueError, ["alpha", "-0.3", "(1,)"]),
    "infinite entry in a softmax alpha vector": (
        lambda: jfocal.softmax_focal_loss(X3, IDS, alpha=np.array([0.2, 3.0, np.inf])),
        ValueError, ["alpha", "finite and >= 0", "inf", "(2,)"]),
    "scalar alpha for softmax": (lambda: jfocal.softmax_focal_loss(X3, IDS, alpha=0.25),
                                 ValueError, ["alpha", "per-class", "background_alpha"]),
    "negative gamma": (lambda: jfocal.sigmoid_focal_loss(X3, IDS, gamma=-1.0),
                       ValueError, ["gamma", "-1.0", ">= 0"]),
    "nan gamma": (lambda: jfocal.softmax_focal_loss(X3, IDS, gamma=float("nan")),
                  ValueError, ["gamma", "nan"]),
    "unknown reduction": (lambda: jfocal.softmax_cross_entropy(X3, IDS, reduction="avg"),
                          ValueError, ["reduction", "'avg'", "'mean'"]),
    "normalizer without mean": (
        lambda: jfocal.sigmoid_cross_entropy(X3, IDS, reduction="sum", normalizer=3.0),
        ValueError, ["normalizer", "reduction='mean'", "'sum'"]),
    "unknown normalizer string": (
        lambda: jfocal.sigmoid_cross_entropy(X3, IDS, reduction="mean", normalizer="positives"),
        ValueError, ["normalizer", "'positives'", "num_positives"]),
    "non-scalar normalizer": (
        lambda: jfocal.sigmoid_cross_entropy(X3, IDS, reduction="mean", normalizer=np.ones(2)),
        ValueError, ["normalizer", "scalar", "(2,)"]),
    "float mask": (lambda: jfocal.softmax_focal_loss(X3, IDS, where=np.ones(4, np.float32)),
                   TypeError, ["where", "bool", "float32"]),
    "mask of the wrong shape": (lambda: jfocal.sigmoid_focal_loss(X3, IDS, where=np.ones(4, bool)),
                                ValueError, ["where", "(4,)", "(4, 3)", "broadcast"]),
    "weights of the wrong shape": (
        lambda: jfocal.softmax_focal_loss(X3, IDS, weights=np.ones(3, np.float32)),
        ValueError, ["weights", "(3,)", "(4,)"]),
    "ignore_index with float labels": (
        lambda: jfocal.sigmoid_focal_loss(X3, X3, ignore_index=-1),
        TypeError, ["ignore_index", "integer", "float32"]),
    "label_smoothing above 1": (
        lambda: jfocal.softmax_cross_entropy(X3, IDS, label_smoothing=1.5),
        ValueError, ["label_smoothing", "1.5"]),
    "axis out of range": (lambda: jfocal.softmax_cross_entropy(X3, IDS, axis=2),
                          ValueError, ["axis", "2", "rank 2"]),
    "softmax without classes": (lambda: jfocal.softmax_focal_loss(np.zeros((3, 0), np.float32),
                                                                   np.zeros((3,), np.int32)),
                                ValueError, ["at least one class", "(3, 0)"]),
    "scalar logits for softmax": (lambda: jfocal.softmax_cross_entropy(np.float32(1.0), 0),
                                  ValueError, ["class axis"]),
    **VALIDATION_CASES,
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_trace_time_errors_are_explained(name, mode):
  call, error, words = CASES[name]
  run = call if mode == "eager" else jax.jit(call)
  with pytest.raises(error) as info:
    run()
  assert type(info.value) is error  # not an AssertionError wrapped or re-raised
  for word in words:
    assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_traced_gamma_is_a_type_error_that_says_how_to_fix_it():
  step = jax.jit(lambda x, gamma: jfocal.sigmoid_focal_loss(x, IDS, gamma=gamma))
  with pytest.raises(TypeError, match=re.escape("static")):
    step(X3, 2.0)
  static = jax.jit(lambda x, gamma: jfocal.sigmoid_focal_loss(x, IDS, gamma=gamma),
                   static_argnames="gamma")
  assert static(X3, gamma=2.0).shape == (4, 3)


def test_traced_alpha_and_weights_are_accepted_without_value_checks():
  step = jax.jit(lambda x, alpha, w: jfocal.sigmoid_focal_loss(x, IDS, alpha=alpha, weights=w))
  assert step(X3, jnp.float32(0.25), jnp.ones((4, 1))).shape == (4, 3)
