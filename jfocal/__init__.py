"""jfocal: exact, finite and fast cross-entropy, focal and related losses for JAX.

Pure, jittable functions with optax-style signatures ``loss(logits, labels,
*, options)``, unreduced by default. See the README for the guarantees, and
`jfocal.engine` for how a loss is built.
"""

from jfocal._alpha import alpha_from_counts, background_alpha, class_balanced_alpha, prior_bias_init
from jfocal._asymmetric import asymmetric_loss
from jfocal._checked import checked
from jfocal._focal_star import sigmoid_focal_loss_star
from jfocal._ghm import ghmc_init, ghmc_loss
from jfocal._linear import linear_softmax_cross_entropy, linear_softmax_focal_loss
from jfocal._logit_adjusted import class_priors_from_counts, logit_adjusted_cross_entropy
from jfocal._normalizer import ema_normalizer, ema_normalizer_init
from jfocal._poly import poly1_cross_entropy, poly1_focal_loss
from jfocal._quality import quality_focal_loss, varifocal_loss
from jfocal._sigmoid import (
  sigmoid_balanced_cross_entropy,
  sigmoid_cross_entropy,
  sigmoid_focal_loss,
)
from jfocal._softmax import (
  softmax_balanced_cross_entropy,
  softmax_cross_entropy,
  softmax_focal_loss,
)

__version__ = "0.1.0"

__all__ = [
    "alpha_from_counts",
    "asymmetric_loss",
    "background_alpha",
    "checked",
    "class_balanced_alpha",
    "class_priors_from_counts",
    "ema_normalizer",
    "ema_normalizer_init",
    "ghmc_init",
    "ghmc_loss",
    "linear_softmax_cross_entropy",
    "linear_softmax_focal_loss",
    "logit_adjusted_cross_entropy",
    "poly1_cross_entropy",
    "poly1_focal_loss",
    "prior_bias_init",
    "quality_focal_loss",
    "sigmoid_balanced_cross_entropy",
    "sigmoid_cross_entropy",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "softmax_balanced_cross_entropy",
    "softmax_cross_entropy",
    "softmax_focal_loss",
    "varifocal_loss",
]
