"""RetinaNet's loss: a per-image jfocal loss vmapped over the batch, normalised by positives.

The classification loss of one image is a jfocal sigmoid loss summed over its
anchors and classes, with integer class targets (``C`` is background and
`boxes.IGNORE_CLASS` marks anchors between the IoU thresholds). `detection_loss`
vmaps it over the images and divides the batch's sum by the batch's number of
positive anchors, as in the paper (section 3.3 and 4.1): normalising by all
anchors would make the loss vanish under the flood of easy negatives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jfocal
from examples.retinanet.boxes import IGNORE_CLASS

# (class logits (A, C), class targets (A,)) -> the image's summed classification loss.
ClassificationLoss = Callable[[jax.Array, jax.Array], jax.Array]

# The keys of `classification_losses`, in the demo's order.
LOSS_KEYS = ("ce", "balanced", "focal")

# detectron2's RetinaNet default; torchvision's RetinaNet uses plain L1.
SMOOTH_L1_BETA = 0.1


def classification_losses(*, focal_alpha: float = 0.25, gamma: float = 2.0,
                          balanced_alpha: float = 0.25
                          ) -> dict[str, tuple[str, ClassificationLoss]]:
  """The three losses the demo compares: key -> (label, loss summed over one image).

  Keys are ``"ce"``, ``"balanced"`` and ``"focal"``. ``balanced_alpha``
  defaults to the focal loss's 0.25 so that balanced CE and focal loss differ
  only by the modulating factor; the paper's best α for balanced CE alone is
  0.75 (Table 1a).
  """
  common = dict(ignore_index=IGNORE_CLASS, reduction="sum")
  return {
      "ce": ("cross-entropy", functools.partial(jfocal.sigmoid_cross_entropy, **common)),
      "balanced": (f"balanced CE (α={balanced_alpha:g})", functools.partial(
          jfocal.sigmoid_balanced_cross_entropy, alpha=balanced_alpha, **common)),
      "focal": (f"focal (γ={gamma:g}, α={focal_alpha:g})", functools.partial(
          jfocal.sigmoid_focal_loss, alpha=focal_alpha, gamma=gamma, **common)),
  }


def smooth_l1(x: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
  absolute = jnp.abs(x)
  return jnp.where(absolute < beta, 0.5 * x * x / beta, absolute - 0.5 * beta)


def image_loss(class_logits: jax.Array, box_deltas: jax.Array, class_targets: jax.Array,
               box_targets: jax.Array, classification_loss: ClassificationLoss
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Summed classification loss, summed box loss and number of positive anchors of one image.

  Shapes: ``(A, C)``, ``(A, 4)``, ``(A,)``, ``(A, 4)``. The box loss counts
  foreground anchors only.
  """
  num_classes = class_logits.shape[-1]
  positive = (class_targets >= 0) & (class_targets < num_classes)
  box = jnp.sum(jnp.where(positive[:, None], smooth_l1(box_deltas - box_targets), 0))
  return classification_loss(class_logits, class_targets), box, jnp.sum(positive)


def detection_loss(class_logits: jax.Array, box_deltas: jax.Array, class_targets: jax.Array,
                   box_targets: jax.Array, classification_loss: ClassificationLoss
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch's loss: `image_loss` vmapped over ``B`` images, divided by the positives.

  Shapes: ``(B, A, C)``, ``(B, A, 4)``, ``(B, A)``, ``(B, A, 4)``. Returns the
  total and its parts ``{"classification", "box", "positives"}``.
  """
  per_image = jax.vmap(functools.partial(image_loss, classification_loss=classification_loss))
  classification, box, positives = per_image(class_logits, box_deltas, class_targets, box_targets)
  normalizer = jnp.maximum(jnp.sum(positives), 1).astype(classification.dtype)
  parts = {"classification": jnp.sum(classification) / normalizer,
           "box": jnp.sum(box) / normalizer, "positives": jnp.sum(positives)}
  return parts["classification"] + parts["box"], parts
