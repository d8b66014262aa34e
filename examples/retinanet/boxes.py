"""Anchors, IoU matching, the (dx, dy, dw, dh) box coder and class-wise NMS, all in JAX.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates (a box covering
pixels 0..9 is ``(0, 0, 10, 10)``), the convention pycocotools uses for its IoU,
so the IoU that trains the detector is the IoU that scores it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# Values of `match_anchors`' result that are not ground-truth indices.
BACKGROUND = -1
IGNORED = -2

# Class target of an ignored anchor; pass it as `ignore_index` to the jfocal losses.
IGNORE_CLASS = -1

# torchvision's and detectron2's clamp on dw, dh before exp: no box grows past 1000/16 x its anchor.
MAX_LOG_SCALE = math.log(1000.0 / 16)


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """RetinaNet's anchors, scaled down from 800-pixel images to 64-pixel canvases.

  Each pyramid level with stride ``s`` gets anchors of base size ``size`` at
  ``scales`` x ``aspect_ratios`` (height / width), centred on every cell, so
  every level has ``len(scales) * len(aspect_ratios)`` anchors per position.
  The paper uses levels P3-P7 (strides 8-128) with ``size = 4 s``; the digits
  here are 12-30 pixels tall, so the levels are P2 and P3 (strides 4 and 8)
  with ``size = 3 s``, which leaves 99% of the objects an anchor with IoU >= 0.5.
  """

  strides: tuple[int, ...] = (4, 8)
  sizes: tuple[float, ...] = (12.0, 24.0)
  scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

  @property
  def anchors_per_position(self) -> int:
    return len(self.scales) * len(self.aspect_ratios)


def generate_anchors(image_size: int, config: AnchorConfig = AnchorConfig()) -> np.ndarray:
  """All anchors of an ``image_size`` square image, shape ``(A, 4)``, float32.

  Order: level, then row, then column, then scale, then aspect ratio: the order
  in which `RetinaNet` flattens its ``(H, W, anchors x channels)`` head outputs.
  """
  levels = []
  for stride, size in zip(config.strides, config.sizes, strict=True):
    cells = math.ceil(image_size / stride)
    shapes = np.array([(size * scale / math.sqrt(ratio), size * scale * math.sqrt(ratio))
                       for scale in config.scales for ratio in config.aspect_ratios])
    centres = (np.arange(cells) + 0.5) * stride
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    centre = np.stack([cx, cy], -1).reshape(-1, 1, 2)
    half = shapes[None] / 2
    levels.append(np.concatenate([centre - half, centre + half], -1).reshape(-1, 4))
  return np.concatenate(levels).astype(np.float32)


def box_area(boxes: jax.Array) -> jax.Array:
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
  """IoU of every box of ``(N, 4)`` against every box of ``(M, 4)``: shape ``(N, M)``."""
  top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
  bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
  overlap = jnp.clip(bottom_right - top_left, 0)
  intersection = overlap[..., 0] * overlap[..., 1]
  union = box_area(boxes_a)[:, None] + box_area(boxes_b)[None, :] - intersection
  return intersection / jnp.maximum(union, jnp.finfo(intersection.dtype).tiny)


def match_anchors(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *,
                  foreground_iou: float = 0.5, background_iou: float = 0.4,
                  allow_low_quality_matches: bool = True) -> jax.Array:
  """The ground truth each anchor learns from, as in RetinaNet (section 4 of the paper).

  An anchor whose best IoU with a valid ground-truth box is >= ``foreground_iou``
  is matched to that box, one below ``background_iou`` is background, and one in
  between is ignored (it contributes no loss). With ``allow_low_quality_matches``
  (torchvision's and detectron2's RetinaNet default), the anchors with the highest
  IoU for a ground-truth box become foreground too, matched to their own best box,
  so that a small or oddly shaped object whose best IoU is under 0.5 still gets a
  positive anchor; boxes that overlap no anchor at all stay unmatched.

  Args:
    anchors: ``(A, 4)``.
    gt_boxes: ``(G, 4)``, padded to a fixed ``G``.
    gt_valid: ``(G,)`` bool, False on padding.

  Returns:
    ``(A,)`` int32: the matched index into ``gt_boxes``, `BACKGROUND` or `IGNORED`.
  """
  iou = jnp.where(gt_valid[:, None], pairwise_iou(gt_boxes, anchors), -1.0)  # (G, A)
  best_iou = jnp.max(iou, axis=0, initial=-1.0)
  best_gt = jnp.argmax(iou, axis=0).astype(jnp.int32)
  matches = jnp.where(best_iou >= foreground_iou, best_gt,
                      jnp.where(best_iou < background_iou, BACKGROUND, IGNORED))
  if allow_low_quality_matches:
    highest_per_gt = jnp.max(iou, axis=1, keepdims=True)
    is_best_anchor = (iou == highest_per_gt) & (highest_per_gt > 0)
    matches = jnp.where(jnp.any(is_best_anchor, axis=0), best_gt, matches)
  return matches.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class BoxCoder:
  """The standard R-CNN box parametrisation, the one RetinaNet regresses.

  ``dx = wx (x - xa) / wa``, ``dy = wy (y - ya) / ha``, ``dw = ww log(w / wa)``,
  ``dh = wh log(h / ha)`` for centres ``x, y`` and sizes ``w, h``. RetinaNet in
  torchvision and detectron2 uses weights (1, 1, 1, 1); Faster R-CNN's second
  stage uses (10, 10, 5, 5).
  """

  weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

  def encode(self, boxes: jax.Array, anchors: jax.Array) -> jax.Array:
    """Regression targets ``(..., 4)`` that carry ``anchors`` onto ``boxes``."""
    (x, y, w, h), (xa, ya, wa, ha) = _centre_size(boxes), _centre_size(anchors)
    wx, wy, ww, wh = self.weights
    return jnp.stack([wx * (x - xa) / wa, wy * (y - ya) / ha,
                      ww * jnp.log(w / wa), wh * jnp.log(h / ha)], axis=-1)

  def decode(self, deltas: jax.Array, anchors: jax.Array) -> jax.Array:
    """Boxes ``(..., 4)`` from regression outputs; the inverse of `encode`."""
    xa, ya, wa, ha = _centre_size(anchors)
    wx, wy, ww, wh = self.weights
    x = deltas[..., 0] / wx * wa + xa
    y = deltas[..., 1] / wy * ha + ya
    w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, MAX_LOG_SCALE)) * wa
    h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, MAX_LOG_SCALE)) * ha
    return jnp.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=-1)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, ...]:
  width = boxes[..., 2] - boxes[..., 0]
  height = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + width / 2, boxes[..., 1] + height / 2, width, height


def assign_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_classes: jax.Array,
                   num_classes: int, box_coder: BoxCoder = BoxCoder()
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-anchor training targets of one image.

  Args:
    anchors: ``(A, 4)``.
    gt_boxes: ``(G, 4)``, padded.
    gt_classes: ``(G,)`` int, class id in ``[0, num_classes)``, negative on padding.
    num_classes: ``C``.

  Returns:
    ``class_targets`` ``(A,)`` int32: the matched box's class, ``C`` (background,
    as jfocal's sigmoid losses read it) or `IGNORE_CLASS`; and ``box_targets``
    ``(A, 4)``: encoded boxes of the matched ground truth (meaningful on
    foreground anchors only).
  """
  matches = match_anchors(anchors, gt_boxes, gt_classes >= 0)
  matched = jnp.maximum(matches, 0)
  class_targets = jnp.where(
      matches >= 0, gt_classes[matched],
      jnp.where(matches == BACKGROUND, num_classes, IGNORE_CLASS)).astype(jnp.int32)
  # Padded boxes are all-zero; a unit box keeps log(w / wa) finite where the target is unused.
  safe_boxes = jnp.where(matches[:, None] >= 0, gt_boxes[matched],
                         jnp.asarray([0.0, 0.0, 1.0, 1.0], gt_boxes.dtype))
  return class_targets, box_coder.encode(safe_boxes, anchors)


def class_wise_nms(boxes: jax.Array, classes: jax.Array, valid: jax.Array,
                   iou_threshold: float = 0.5) -> jax.Array:
  """Greedy non-maximum suppression within each class, with static shapes (jit, vmap).

  Candidates must be sorted by descending score (as `jax.lax.top_k` returns
  them). A candidate survives if no higher-scoring surviving candidate of the
  same class overlaps it by more than ``iou_threshold``; boxes of different
  classes never suppress each other (torchvision's ``batched_nms``).

  Returns:
    ``(K,)`` bool: which candidates survive.
  """
  overlaps = (pairwise_iou(boxes, boxes) > iou_threshold) & (classes[:, None] == classes[None, :])
  earlier = jnp.arange(boxes.shape[0])

  def visit(i: jax.Array, keep: jax.Array) -> jax.Array:
    suppressed = jnp.any(keep & overlaps[:, i] & (earlier < i))
    return keep.at[i].set(keep[i] & ~suppressed)

  return jax.lax.fori_loop(0, boxes.shape[0], visit, valid)

