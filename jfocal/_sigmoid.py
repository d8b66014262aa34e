"""Sigmoid family: CE, alpha-balanced CE and focal loss over independent classes.

All three share one elementwise core,
``focal_term(x, y, factor) = factor * (1 - p_t)**gamma * CE``, with one analytic
derivative rule; ``factor`` holds alpha_t, the weights and the mask.

The core works in a *folded* frame: with ``z = |x|`` and the target mass ``u``
on the side the logit already favours (``u = y`` for ``x >= 0``, ``1 - y``
otherwise) and ``v = 1 - u`` on the other side, every quantity is a sum of
non-negative terms built from one ``e = exp(-z)`` in (0, 1]:

    CE          = log1p(e) + v z
    1 - p_t = m = (u e + v) / (1 + e)
    d CE / dz   = v - sigma(-z)
    d log m/dz  = (v - u) * sigma(z) sigma(-z) / m
    d log m/du  = (e - 1) / (u e + v)

so nothing overflows, nothing cancels, and the only division, by ``u e + v``,
is by at least ``v`` unless ``v == 0``, where the ratios have the closed forms
``sigma(z)`` and ``log1p(e) / e``. Derivatives in the original frame carry the
sign of ``x``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal import _common, _math, _validation


def _folded(x: jax.Array, y: jax.Array, gamma: float):
  likely_side = x >= 0
  z = jnp.abs(x)
  u = jnp.where(likely_side, y, 1 - y)
  v = jnp.where(likely_side, 1 - y, y)
  e = jnp.exp(-z)
  sigmoid_z = 1 / (1 + e)
  sigmoid_minus_z = e * sigmoid_z
  log1p_e = _math.log1p_of_unit(e)
  # v == 0 is the only place where scaled_m (= e) may underflow to 0; the
  # guarded copy keeps divisions and their derivatives finite elsewhere.
  certain = v == 0
  # 0 * inf would make a confidently right infinite logit NaN instead of 0.
  cross_entropy = log1p_e + jnp.where(certain, 0, v * z)
  scaled_m = u * e + v
  safe_scaled_m = jnp.where(certain, 1, scaled_m)
  log_m = jnp.where(certain, -z, jnp.log(safe_scaled_m)) - log1p_e
  weight = _math.modulating_factor(scaled_m * sigmoid_z, gamma, log_m)
  return locals()


def _weighted_value(x: jax.Array, y: jax.Array, factor: jax.Array, gamma: float) -> jax.Array:
  """``factor * (1 - p_t)**gamma * CE``; see `focal_term`."""
  f = _folded(x, y, gamma)
  exponent = _math.integer_exponent(gamma)
  if exponent is None:
    return factor * f["weight"] * f["cross_entropy"]
  # m**gamma = (u e + v)**gamma / (1 + e)**gamma: ending in a division (an
  # "expensive" op that XLA materialises rather than recomputes in each user)
  # lets the derivative read this value instead of recomputing log1p.
  return ((factor * jax.lax.integer_pow(f["scaled_m"], exponent) * f["cross_entropy"])
          / jax.lax.integer_pow(1 + f["e"], exponent))


def _shares_value(gamma: float) -> bool:
  """Whether the derivative reads the value: integer gamma > 0 (see `_focal_term_jvp`)."""
  return _math.integer_exponent(gamma) is not None


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def focal_term(x: jax.Array, y: jax.Array, factor: jax.Array, gamma: float) -> jax.Array:
  """``factor * (1 - p_t)**gamma * CE(x, y)`` elementwise, for logits x and targets y in [0, 1].

  ``factor`` carries alpha_t, weights and masks (0), and NaN for invalid
  labels (see `weighted_inputs`): folding them in here leaves nothing between
  this value and its sum. Where ``factor`` is 0, ``x`` must not be infinite
  (0 * inf). The value is fenced (`_math.fence`): materialised, then summed.
  """
  return _math.fence(_weighted_value(x, y, factor, gamma))


@functools.partial(focal_term.defjvp, symbolic_zeros=True)
def _focal_term_jvp(gamma, primals, tangents):
  x, y, factor = primals
  x_dot, y_dot, factor_dot = tangents
  shares_value = _shares_value(gamma)
  value = _weighted_value(x, y, factor, gamma)
  if not shares_value:
    value = _math.fence(value)
  # Recomputed from fenced inputs rather than shared with the value: on the
  # CPU, XLA would otherwise write exp, log1p and 1/(1+e) to memory for both.
  # With integer gamma the x-derivative reads the value instead of log1p; the
  # value then has two users (its sum and this rule) and, ending in a division,
  # is materialised once; the gradient is written over it in place, so the
  # loop that computes the loss runs first, with no temporary buffer.
  f = _folded(_math.derivative_logits(x), _math.fence(y), gamma)
  weight, cross_entropy, likely_side = f["weight"], f["cross_entropy"], f["likely_side"]
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    d_dz = f["v"] - f["sigmoid_minus_z"]
    if gamma:
      # sigma(z) sigma(-z) / m; equals sigma(z) exactly where v == 0.
      pq_over_m = jnp.where(f["certain"], f["sigmoid_z"],
                            f["sigmoid_minus_z"] / f["safe_scaled_m"])
    if shares_value:
      # The value is factor * weight * CE; pq_over_m vanishes where it is infinite.
      d_focus = jnp.where(pq_over_m == 0, 0, pq_over_m * value)
      d_dz = factor * weight * d_dz + gamma * d_focus * (f["v"] - f["u"])
    else:
      if gamma:
        # pq_over_m first: it vanishes where CE is huge (clipped infinite logits).
        d_dz = d_dz + gamma * (pq_over_m * cross_entropy) * (f["v"] - f["u"])
      d_dz = factor * weight * d_dz
    tangent = tangent + jnp.where(likely_side, d_dz, -d_dz) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    d_du = -f["z"]
    if gamma:
      # CE / (u e + v); equals log1p(e) / e (limit 1 as e -> 0) where v == 0.
      e, log1p_e = f["e"], f["log1p_e"]
      nonzero_e = e > 0
      log1p_e_over_e = jnp.where(nonzero_e, log1p_e / jnp.where(nonzero_e, e, 1), 1)
      ce_over_scaled_m = jnp.where(f["certain"], log1p_e_over_e,
                                   cross_entropy / f["safe_scaled_m"])
      d_du = d_du + gamma * (e - 1) * ce_over_scaled_m
    d_du = factor * weight * d_du
    tangent = tangent + jnp.where(likely_side, d_du, -d_du) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + weight * cross_entropy * factor_dot
  return value, tangent


class SigmoidInputs(NamedTuple):
  """Checked, masked inputs of a sigmoid-family loss (see `sigmoid_inputs`)."""
  x: jax.Array              # logits in the compute dtype, 0 where masked
  y: jax.Array              # targets (scored, smoothed), 0 where masked
  targets: jax.Array        # hard targets before scores and smoothing: positives are > 0
  mask: jax.Array | None    # where & ignore_index, broadcast to x
  invalid: jax.Array | None  # out-of-range class ids
  weights: jax.Array | None
  gamma: float
  dtype: Any                # compute dtype
  out_dtype: Any            # dtype of the unreduced loss
  # Anchors with a class id in [0, C), unmasked: each holds one positive target.
  # Only for integer ids without `where` (which may mask single classes).
  positive_rows: jax.Array | None = None


def sigmoid_inputs(logits: Any, labels: Any, *, gamma: Any, weights: Any, where: Any,
                   ignore_index: Any, label_smoothing: Any, reduction: Any, normalizer: Any,
                   scores: Any = None) -> SigmoidInputs:
  """The label handling every sigmoid loss shares: class ids or dense targets, masks.

  ``scores`` (float, one per anchor, with integer ids only) replace the 1 of
  each anchor's class column, for the soft-target losses of jfocal._quality.
  """
  logits, labels, dtype, gamma, ignore_index, label_smoothing = _common.prepare_common(
      logits, labels, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
      normalizer=normalizer, label_smoothing=label_smoothing)
  shape = logits.shape
  invalid = ignore_mask = positive_rows = None
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if not shape:
      raise ValueError("integer class-id labels need logits with a class axis (shape (..., C)); "
                       "got scalar logits. Pass binary targets as float or bool labels")
    num_classes = shape[-1]
    _validation.check_class_id_shape(
        labels, shape[:-1],
        f"logits.shape[:-1]; ids 0..{num_classes - 1} are classes, {num_classes} is background. "
        "Binary 0/1 targets with the shape of logits must be float or bool")
    valid = (labels >= 0) & (labels <= num_classes)
    if ignore_index is not None:
      ignored = labels == ignore_index
      valid = valid | ignored
      ignore_mask = ~ignored[..., None]
    invalid = ~valid[..., None]
    positive_rows = (labels >= 0) & (labels < num_classes)
    if ignore_index is not None:
      positive_rows = positive_rows & ~ignored
    class_ids = jnp.arange(num_classes, dtype=labels.dtype)
    hard_targets = labels[..., None] == class_ids
    if scores is not None:
      scores = _validation.check_scores(scores, labels.shape)
  else:
    _validation.check_same_shape(labels, logits, "float or bool")
    hard_targets = labels
    if scores is not None:
      raise ValueError("scores go with integer class ids; dense float targets carry their "
                       "scores themselves")
  mask, weights = _common.user_mask_and_weights(where, weights, shape)
  mask = _common.combine_masks(mask, ignore_mask)

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
  y = _common.smooth(y, label_smoothing, 2)
  if where is not None:
    positive_rows = None
  return SigmoidInputs(x, y, targets, mask, invalid, weights, gamma, dtype, logits.dtype,
                       positive_rows)


def count_positives(inputs: SigmoidInputs) -> jax.Array:
  """The number of unmasked positive targets, from the ids where possible.

  Counting anchors rather than (anchor, class) targets reads C times less and
  writes nothing logits-sized.
  """
  if inputs.positive_rows is not None:
    return jnp.sum(inputs.positive_rows)
  return jnp.sum(inputs.targets > 0)


def checked_alpha(alpha: Any, inputs: SigmoidInputs) -> jax.Array | None:
  """A number or a per-class vector in [0, 1], in the compute dtype, or None."""
  if alpha is None:
    return None
  shape = inputs.x.shape
  return _validation.check_alpha(alpha, shape[-1] if shape else None,
                                 allow_scalar=True).astype(inputs.dtype)


def alpha_t(alpha: Any, inputs: SigmoidInputs) -> jax.Array | None:
  """``alpha y + (1 - alpha)(1 - y)``, or None without alpha."""
  alpha = checked_alpha(alpha, inputs)
  return None if alpha is None else _balance(alpha, inputs.y)


def _balance(alpha: jax.Array, y: jax.Array) -> jax.Array:
  return alpha * y + (1 - alpha) * (1 - y)


def weighted_inputs(alpha: Any, inputs: SigmoidInputs) -> tuple[jax.Array, jax.Array]:
  """The logits and the ``factor`` of `focal_term`: alpha_t, weights, mask, NaN for bad ids.

  All that `sigmoid_reduce` would apply to a loss, as one factor. Infinite
  logits whose factor is 0 become 0, so that they contribute 0 (not
  0 * inf); NaN logits stay NaN, so that zero weight never hides bad input.
  The zeros are found from alpha and the weights, not from the factor, which
  XLA then computes inside the loss's and the gradient's loops instead of
  writing it to memory.
  """
  x, y, dtype = inputs.x, inputs.y, inputs.dtype
  factor, removed = jnp.ones((), dtype), None
  alpha = checked_alpha(alpha, inputs)
  if alpha is not None:
    factor = _balance(alpha, y)
    # Both terms are >= 0, so alpha_t is 0 only at these two corners.
    removed = ((alpha == 0) & (y == 1)) | ((alpha == 1) & (y == 0))
  if inputs.weights is not None:
    weights = inputs.weights.astype(dtype)
    factor = factor * weights
    removed = weights == 0 if removed is None else removed | (weights == 0)
  if inputs.mask is not None:
    factor = jnp.where(inputs.mask, factor, 0)  # sigmoid_inputs zeroed masked logits
  if removed is not None:
    x = jnp.where(removed & jnp.isinf(x), jnp.zeros((), dtype), x)
  return x, _common.invalid_to_nan(factor, inputs.invalid)


def sigmoid_reduce(loss: jax.Array, inputs: SigmoidInputs, *, reduction: Any, normalizer: Any,
                   axis_name: Any) -> jax.Array:
  """NaN for out-of-range ids, then weights, mask and the reduction."""
  loss = _common.invalid_to_nan(loss, inputs.invalid)
  return _common.reduce_loss(
      loss, mask=inputs.mask, weights=inputs.weights, reduction=reduction,
      normalizer=normalizer, positives=lambda: count_positives(inputs),
      out_dtype=inputs.out_dtype, axis_name=axis_name)


@_common.one_program("gamma", "ignore_index", "label_smoothing", "reduction", "axis_name")
def _sigmoid_loss(logits: Any, labels: Any, *, alpha: Any, gamma: Any, weights: Any,
                  where: Any, ignore_index: Any, label_smoothing: Any, reduction: Any,
                  normalizer: Any, axis_name: Any) -> jax.Array:
  inputs = sigmoid_inputs(logits, labels, gamma=gamma, weights=weights, where=where,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction=reduction, normalizer=normalizer)
  x, factor = weighted_inputs(alpha, inputs)
  loss = focal_term(x, inputs.y, factor, inputs.gamma)
  return _common.reduce_materialised(
      loss, mask=inputs.mask, reduction=reduction, normalizer=normalizer,
      positives=lambda: count_positives(inputs), out_dtype=inputs.out_dtype,
      axis_name=axis_name)


_FORMULA = r"""
  With :math:`p = \sigma(x)`, targets :math:`y \in [0, 1]`,
  :math:`p_t = y p + (1 - y)(1 - p)` and
  :math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)`, the loss of each element is

  .. math::
    \mathrm{FL}(x, y) = -\alpha_t (1 - p_t)^\gamma
      \left[y \log p + (1 - y) \log(1 - p)\right],

  which for hard targets is :math:`-\alpha_t (1 - p_t)^\gamma \log p_t`.
"""

_SHAPES = """
    logits: float array of any shape ``[..., C]`` (a scalar is allowed with float
      labels). bfloat16 and float16 are computed in float32.
    labels: either float or bool targets in [0, 1] with the shape of ``logits``
      (soft targets are allowed), or integer class ids of shape ``[...]`` =
      ``logits.shape[:-1]``, where id ``C`` marks a background anchor (all
      classes negative), as detectron2 and mmdetection label anchors. Ids
      outside ``[0, C]`` (other than ``ignore_index``) make that row NaN."""

_ALPHA = """
    alpha: weight of the positive term; the negative term gets ``1 - alpha``.
      A number in [0, 1], a per-class vector of shape ``(C,)``, or None for no
      weighting. See :func:`jfocal.alpha_from_counts`."""

@_common.document_loss(
    "Sigmoid (binary) cross-entropy of independent classes.",
    r"""
  .. math::
    \mathrm{CE}(x, y) = -y \log \sigma(x) - (1 - y) \log(1 - \sigma(x)),

  computed as :math:`\mathrm{softplus}(x) - x y` without cancellation.
""",
    _SHAPES,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0], [0.0, 3.0]])
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    >>> print(jfocal.sigmoid_cross_entropy(logits, labels))
    [[0.1269 0.3133]
     [0.6931 3.0486]]""")
def sigmoid_cross_entropy(logits: Any, labels: Any, *, weights: Any = None, where: Any = None,
                          ignore_index: int | None = None, label_smoothing: float = 0.0,
                          reduction: str = "none", normalizer: Any = None,
                          axis_name: Any = None) -> jax.Array:
  return _sigmoid_loss(logits, labels, alpha=None, gamma=0.0, weights=weights, where=where,
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       reduction=reduction, normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Alpha-balanced sigmoid cross-entropy: the focal loss with ``gamma = 0``.",
    r"""
  .. math::
    \mathrm{CE}_\alpha(x, y) = -\alpha y \log \sigma(x)
      - (1 - \alpha)(1 - y) \log(1 - \sigma(x)).

  With ``m`` positives and ``n`` negatives, ``alpha = n / (n + m)`` (so that
  ``alpha / (1 - alpha) = n / m``) balances their total weights.
""",
    _SHAPES + _ALPHA,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([2.0, -1.0, 0.0])
    >>> labels = jnp.array([1.0, 0.0, 1.0])
    >>> print(jfocal.sigmoid_balanced_cross_entropy(logits, labels, alpha=0.25))
    [0.0317 0.2349 0.1733]""")
def sigmoid_balanced_cross_entropy(logits: Any, labels: Any, *, alpha: Any = 0.25,
                                   weights: Any = None, where: Any = None,
                                   ignore_index: int | None = None,
                                   label_smoothing: float = 0.0, reduction: str = "none",
                                   normalizer: Any = None, axis_name: Any = None) -> jax.Array:
  return _sigmoid_loss(logits, labels, alpha=alpha, gamma=0.0, weights=weights, where=where,
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       reduction=reduction, normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Sigmoid focal loss (RetinaNet's classification loss).",
    _FORMULA + r"""
  ``gamma = 0`` gives the (balanced) cross-entropy exactly. Loss, gradient and
  Hessian are finite for every finite logit and every ``gamma >= 0``
  (including ``0 < gamma < 1``); derivatives come from an analytic rule, not
  from differentiating ``pow``.
""",
    _SHAPES + _ALPHA + """
    gamma: focusing parameter, a static Python number >= 0 (integers become
      multiplications).""",
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> print(jfocal.sigmoid_focal_loss(logits, class_ids))
    [[0.0005 0.017  0.2831]
     [0.0001 0.13   2.9062]]
    >>> mean = jfocal.sigmoid_focal_loss(logits, class_ids, reduction="mean",
    ...                                  normalizer="num_positives")
    >>> round(float(mean), 4)  # the sum over all elements / 1 positive anchor
    3.3367""")
def sigmoid_focal_loss(logits: Any, labels: Any, *, alpha: Any = 0.25, gamma: float = 2.0,
                       weights: Any = None, where: Any = None, ignore_index: int | None = None,
                       label_smoothing: float = 0.0, reduction: str = "none",
                       normalizer: Any = None, axis_name: Any = None) -> jax.Array:
  return _sigmoid_loss(logits, labels, alpha=alpha, gamma=gamma, weights=weights, where=where,
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       reduction=reduction, normalizer=normalizer, axis_name=axis_name)
