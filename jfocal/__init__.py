"""jfocal: exact, finite and fast cross-entropy, balanced cross-entropy and focal losses for JAX.

Pure, jittable functions with optax-style signatures ``loss(logits, labels,
*, options)``, unreduced by default. See the README for the guarantees.
"""

from jfocal._alpha import alpha_from_counts, background_alpha, prior_bias_init
from jfocal._checked import checked
from jfocal._sigmoid import sigmoid_balanced_cross_entropy, sigmoid_cross_entropy, sigmoid_focal_loss
from jfocal._softmax import softmax_balanced_cross_entropy, softmax_cross_entropy, softmax_focal_loss

__version__ = "0.1.0"

__all__ = [
    "alpha_from_counts",
    "background_alpha",
    "checked",
    "prior_bias_init",
    "sigmoid_balanced_cross_entropy",
    "sigmoid_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_balanced_cross_entropy",
    "softmax_cross_entropy",
    "softmax_focal_loss",
]
