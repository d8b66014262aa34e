r"""The sigmoid family's engine: inputs, the folded frame, the folded factor and the reduction.

A sigmoid loss is three steps:

1. `prepare` turns ``(logits, labels)`` and the common keywords into
   `SigmoidInputs`: logits in the compute dtype, targets in [0, 1] (class ids,
   dense float, bool or integer 0/1 targets, quality scores, label smoothing
   and ``pos_weight`` already applied), the element mask, the invalid labels
   and the number of positives.
2. `fold` gives the logits and the *factor* every core multiplies its value
   by: alpha_t (or another per-element weight), the ``pos_weight`` mass, the
   ``weights``, 0 where masked and NaN for invalid labels. Folding them into
   the core's value leaves nothing between that value and its sum, and the
   core's derivative rule covers all of them.
3. The loss's elementwise core (a ``jax.custom_jvp`` function of
   ``(x, y, factor, ...)``) computes the weighted, fenced value, and `reduce`
   sums or averages it.

The cores share the *folded frame* of `Folded`: with ``z = |x|`` and the target
mass ``u`` on the side the logit already favours (``u = y`` for ``x >= 0``,
``1 - y`` otherwise) and ``v = 1 - u`` on the other side, every quantity is a
sum of non-negative terms built from one ``e = exp(-z)`` in (0, 1]:

    CE          = log1p(e) + v z
    1 - p_t = m = (u e + v) / (1 + e)
    d CE / dz   = v - sigma(-z)
    d log m/dz  = (v - u) * sigma(z) sigma(-z) / m
    d log m/du  = (e - 1) / (u e + v)

so nothing overflows, nothing cancels, and the only division, by ``u e + v``,
is by at least ``v`` unless ``v == 0``, where the ratios have the closed forms
``sigma(z)`` and ``log1p(e) / e`` (`Folded.pq_over_m`, `Folded.ce_over_scaled_m`).
Derivatives in the original frame carry the sign of ``x`` (`Folded.signed`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jfocal.engine import checks, numerics, reduce as reducing


class SigmoidInputs(NamedTuple):
  """The elementwise inputs of a sigmoid loss, all of the logits' shape (or broadcastable)."""
  x: jax.Array                 # logits in the compute dtype, 0 where masked
  y: jax.Array                 # targets in [0, 1] after scores, smoothing, pos_weight; 0 where masked
  mass: jax.Array | None       # pos_weight's mass w y + 1 - y of each target, or None
  mask: jax.Array | None       # where & ignore_index, broadcast to x.shape
  invalid: jax.Array | None    # labels out of range (NaN), broadcastable to x.shape
  weights: jax.Array | None    # the checked user weights, broadcastable to x.shape
  positives: jax.Array         # the number of unmasked positive targets (for num_positives)
  dtype: np.dtype              # compute dtype
  out_dtype: np.dtype          # dtype of the unreduced loss
  hard: bool                   # every target is 0 or 1: integer or bool labels, no smoothing

  @property
  def num_classes(self) -> int | None:
    return self.x.shape[-1] if self.x.ndim else None


def prepare(logits: Any, labels: Any, *, weights: Any, where: Any, ignore_index: Any,
            label_smoothing: Any, pos_weight: Any = None, scores: Any = None,
            name: str = "labels") -> SigmoidInputs:
  """The label handling every sigmoid loss shares.

  Labels are integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
  background; ids outside ``[0, C]`` other than ``ignore_index`` make their
  row NaN), or dense targets of the logits' shape: float or bool in [0, 1], or
  integers 0 and 1 (other values NaN, ``ignore_index`` masked). ``scores``
  (float, one per anchor, with class ids only) replace the 1 of each anchor's
  class column, for the quality losses. ``pos_weight`` ``w`` turns a target
  ``y`` into the masses ``(w y, 1 - y)``: the target ``w y / (w y + 1 - y)``
  carrying the weight ``w y + 1 - y`` (`SigmoidInputs.mass`). ``name`` is the
  labels' argument name, for error messages.
  """
  logits = checks.as_array(logits, "logits")
  labels = checks.as_array(labels, name)
  dtype = checks.compute_dtype(logits)
  checks.check_labels_dtype(labels, name)
  hard = not jnp.issubdtype(labels.dtype, jnp.floating) and scores is None
  ignore_index = checks.check_ignore_index(ignore_index, labels, name)
  label_smoothing = checks.check_label_smoothing(label_smoothing)
  shape = logits.shape
  invalid = ignored = positive_rows = None
  if jnp.issubdtype(labels.dtype, jnp.integer):
    labels, ignore_index = checks.wide_ids(labels, ignore_index)
    if labels.shape == shape:  # dense 0/1 targets
      valid = (labels == 0) | (labels == 1)
      hard_targets = labels == 1
      if ignore_index is not None:
        ignored = labels == ignore_index
        valid = valid | ignored
      invalid = ~valid
    else:
      if not shape:
        raise ValueError(f"integer labels of scalar logits must be a scalar 0/1 target; got "
                         f"labels of shape {labels.shape}")
      num_classes = shape[-1]
      checks.check_class_id_shape(
          labels, shape[:-1],
          f"logits.shape[:-1]; ids 0..{num_classes - 1} are classes, {num_classes} is "
          "background. Dense 0/1 targets have the shape of logits", name)
      valid = (labels >= 0) & (labels <= num_classes)
      positive_rows = (labels >= 0) & (labels < num_classes)
      if ignore_index is not None:
        ignored_rows = labels == ignore_index
        valid = valid | ignored_rows
        positive_rows = positive_rows & ~ignored_rows
        ignored = ignored_rows[..., None]
      invalid = ~valid[..., None]
      hard_targets = labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)
      if scores is not None:
        scores = checks.check_scores(scores, labels.shape)
  else:
    checks.check_same_shape(labels, logits, "float or bool", name)
    hard_targets = labels
  if scores is not None and positive_rows is None:
    raise ValueError("scores go with integer class ids; dense targets carry their scores "
                     "themselves")
  mask = None
  if where is not None:
    mask = jnp.broadcast_to(checks.check_mask(where, shape), shape)
    positive_rows = None  # `where` may mask single classes: count the targets
  if ignored is not None:
    mask = reducing.both(mask, jnp.broadcast_to(~ignored, shape))

  x = logits.astype(dtype)
  targets = hard_targets.astype(dtype)
  if mask is not None:
    # Masked entries may hold anything (padding, NaN): replace them so that
    # neither their value nor their gradient can leak through the mask.
    x = jnp.where(mask, x, 0)
    targets = jnp.where(mask, targets, 0)
    invalid = None if invalid is None else invalid & mask
  y = targets
  if scores is not None:
    # Selected by the (masked) class column, so a masked anchor's score never reaches the loss.
    y = jnp.where(targets > 0, scores.astype(dtype)[..., None], 0)
  y = reducing.smooth(y, label_smoothing, 2)
  mass = None
  if pos_weight is not None:
    w = checks.check_per_class(pos_weight, "pos_weight",
                               shape[-1] if shape else None).astype(dtype)
    # With w > 0 the mass is at least min(w, 1): the target and its derivatives are smooth.
    mass = w * y + (1 - y)
    y = jnp.where(mass > 0, w * y / jnp.where(mass > 0, mass, 1), y)
  # Counting anchors rather than (anchor, class) targets reads C times less
  # and writes nothing logits-sized.
  positives = jnp.sum(positive_rows) if positive_rows is not None else jnp.sum(targets > 0)
  weights = None if weights is None else checks.check_weights(weights, shape)
  return SigmoidInputs(x, y, mass, mask, invalid, weights, positives, dtype, logits.dtype,
                       hard and label_smoothing == 0)


class Folded(NamedTuple):
  """The folded frame of a logit ``x`` and a target ``y`` (see the module docstring)."""
  likely_side: jax.Array       # x >= 0
  z: jax.Array                 # |x|
  u: jax.Array                 # target mass on the side x favours
  v: jax.Array                 # 1 - u
  e: jax.Array                 # exp(-z), in (0, 1]
  sigmoid_z: jax.Array         # 1 / (1 + e)
  sigmoid_minus_z: jax.Array   # e / (1 + e)
  log1p_e: jax.Array
  certain: jax.Array           # v == 0: the only place where scaled_m (= u e) may underflow
  cross_entropy: jax.Array     # log1p(e) + v z
  scaled_m: jax.Array          # u e + v = (1 - p_t)(1 + e)
  safe_scaled_m: jax.Array     # scaled_m, 1 where certain
  log_m: jax.Array             # log(1 - p_t), exact also where 1 - p_t underflows

  @property
  def one_minus_p_t(self) -> jax.Array:
    return self.scaled_m * self.sigmoid_z

  @property
  def p(self) -> jax.Array:
    """``sigma(x)``, exact at every logit (no ``1 - sigma`` cancellation)."""
    return jnp.where(self.likely_side, self.sigmoid_z, self.sigmoid_minus_z)

  @property
  def one_minus_p(self) -> jax.Array:
    """``sigma(-x)``."""
    return jnp.where(self.likely_side, self.sigmoid_minus_z, self.sigmoid_z)

  @property
  def neg_log_p(self) -> jax.Array:
    """``-log sigma(x) = softplus(-x)``."""
    return self.log1p_e + jnp.where(self.likely_side, 0, self.z)

  @property
  def neg_log_one_minus_p(self) -> jax.Array:
    """``-log sigma(-x) = softplus(x)``."""
    return self.log1p_e + jnp.where(self.likely_side, self.z, 0)

  def pq_over_m(self) -> jax.Array:
    """``sigma(z) sigma(-z) / m``; ``sigma(z)`` exactly where ``v == 0``."""
    return jnp.where(self.certain, self.sigmoid_z, self.sigmoid_minus_z / self.safe_scaled_m)

  def ce_over_scaled_m(self) -> jax.Array:
    """``CE / (u e + v)``; ``log1p(e) / e`` (limit 1 as ``e -> 0``) where ``v == 0``."""
    nonzero_e = self.e > 0
    log1p_e_over_e = jnp.where(nonzero_e, self.log1p_e / jnp.where(nonzero_e, self.e, 1), 1)
    return jnp.where(self.certain, log1p_e_over_e, self.cross_entropy / self.safe_scaled_m)

  def signed(self, derivative: jax.Array) -> jax.Array:
    """A derivative with respect to ``z`` (or ``u``) in the original frame (``x``, ``y``)."""
    return jnp.where(self.likely_side, derivative, -derivative)


def folded(x: jax.Array, y: jax.Array) -> Folded:
  likely_side = x >= 0
  z = jnp.abs(x)
  u = jnp.where(likely_side, y, 1 - y)
  v = jnp.where(likely_side, 1 - y, y)
  e = jnp.exp(-z)
  sigmoid_z = 1 / (1 + e)
  log1p_e = numerics.log1p_of_unit(e)
  certain = v == 0
  # 0 * inf would make a confidently right infinite logit NaN instead of 0.
  cross_entropy = log1p_e + jnp.where(certain, 0, v * z)
  scaled_m = u * e + v
  safe_scaled_m = jnp.where(certain, 1, scaled_m)
  log_m = jnp.where(certain, -z, jnp.log(safe_scaled_m)) - log1p_e
  return Folded(likely_side, z, u, v, e, sigmoid_z, e * sigmoid_z, log1p_e, certain,
                cross_entropy, scaled_m, safe_scaled_m, log_m)


def mix(y: jax.Array, positive: jax.Array, negative: jax.Array) -> jax.Array:
  """``y positive + (1 - y) negative``; a side without target mass adds 0, even where it is +inf."""
  return (jnp.where(y == 0, 0, y * positive)
          + jnp.where(y == 1, 0, (1 - y) * negative))


def balance(alpha: jax.Array, y: jax.Array) -> jax.Array:
  """``alpha_t = alpha y + (1 - alpha)(1 - y)``."""
  return alpha * y + (1 - alpha) * (1 - y)


def checked_alpha(alpha: Any, inputs: SigmoidInputs) -> jax.Array | None:
  """A number or a per-class vector (its values are checked by `program`), or None."""
  if alpha is None:
    return None
  return checks.check_alpha(alpha, inputs.num_classes, allow_scalar=True).astype(inputs.dtype)


def fold(inputs: SigmoidInputs, *, alpha: Any = None,
         weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The logits and the factor of a core: alpha_t, ``weight``, mass, weights, mask, NaN.

  ``alpha`` (a number or per-class vector) contributes alpha_t, ``weight`` any
  other per-element weight (GHM-C's harmonising weights). Infinite logits
  whose factor is 0 become 0, so that they contribute 0 (not 0 * inf); NaN
  logits stay NaN, so that zero weight never hides bad input. The zeros are
  found from the small inputs (alpha, the weights), not from the factor,
  which XLA then computes inside the loss's and the gradient's loops instead
  of writing it to memory.
  """
  x, y, dtype = inputs.x, inputs.y, inputs.dtype
  factor, removed = jnp.ones((), dtype), None
  alpha = checked_alpha(alpha, inputs)
  if alpha is not None:
    factor = balance(alpha, y)
    # Both terms are >= 0, so alpha_t is 0 only at these two corners.
    removed = ((alpha == 0) & (y == 1)) | ((alpha == 1) & (y == 0))
  for part in (weight, inputs.mass, inputs.weights):
    if part is not None:
      part = part.astype(dtype)
      factor = factor * part
      removed = part == 0 if removed is None else removed | (part == 0)
  if inputs.mask is not None:
    factor = jnp.where(inputs.mask, factor, 0)  # prepare zeroed the masked logits
  if removed is not None:
    x = jnp.where(removed & jnp.isinf(x), jnp.zeros((), dtype), x)
  return x, reducing.invalid_to_nan(factor, inputs.invalid)


def summed(reduction: Any) -> bool:
  """Whether `reduce` sums the value (``"sum"``, ``"mean"``): then its sum is its only reader.

  A core's derivative rule may then read the value instead of recomputing its
  logarithms at no memory cost; under a caller's ``jnp.sum`` of the unreduced
  loss, XLA would keep the value alive beside the gradient.
  """
  return reduction in ("sum", "mean")


def reduce(value: jax.Array, inputs: SigmoidInputs, *, reduction: Any, normalizer: Any,
           axis_name: Any) -> jax.Array:
  """The reduction of a core's value (which carries the folded factor)."""
  return reducing.reduce(value, mask=inputs.mask, positives=inputs.positives,
                         reduction=reduction, normalizer=normalizer,
                         out_dtype=inputs.out_dtype, axis_name=axis_name)
