"""Sigmoid family: CE, alpha-balanced CE and focal loss over independent classes.

All three are one elementwise core, ``focal_term(x, y, factor) = factor * (1 -
p_t)**gamma * CE``, with one analytic derivative rule on the folded frame of
`jfocal.engine.sigmoid`; ``factor`` holds alpha_t, the ``pos_weight`` mass, the
weights and the mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, sigmoid
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction


def _weighted_value(x: jax.Array, y: jax.Array, factor: jax.Array,
                    gamma: Parameter) -> jax.Array:
  """``factor * (1 - p_t)**gamma * CE``; see `focal_term`."""
  f = sigmoid.folded(x, y)
  exponent = numerics.integer_exponent(gamma)
  if exponent is None:
    value = factor * numerics.power(f.one_minus_p_t, gamma, f.log_m) * f.cross_entropy
    return numerics.materialised(value, f.e)
  # m**gamma = (u e + v)**gamma / (1 + e)**gamma: ending in a division, the
  # value is materialised (see numerics.materialised) and the derivative reads
  # it instead of recomputing log1p.
  return ((factor * jax.lax.integer_pow(f.scaled_m, exponent) * f.cross_entropy)
          / jax.lax.integer_pow(1 + f.e, exponent))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def focal_term(x: jax.Array, y: jax.Array, factor: jax.Array, gamma: jax.Array,
               static_gamma: float | None, summed: bool) -> jax.Array:
  """``factor * (1 - p_t)**gamma * CE(x, y)`` elementwise, for logits x and targets y in [0, 1].

  ``factor`` comes from `jfocal.engine.sigmoid.fold`: where it is 0, ``x`` is
  not infinite. ``gamma`` is the array of `jfocal.engine.numerics.split`,
  ``static_gamma`` its static value or None; ``summed`` is
  `jfocal.engine.sigmoid.summed`. The value is fenced
  (`jfocal.engine.numerics.fence`): materialised, then summed.
  """
  return numerics.fence(_weighted_value(x, y, factor, numerics.pick(gamma, static_gamma)))


@functools.partial(focal_term.defjvp, symbolic_zeros=True)
def _focal_term_jvp(static_gamma, summed, primals, tangents):
  x, y, factor, gamma_array = primals
  x_dot, y_dot, factor_dot, gamma_dot = tangents
  gamma = numerics.pick(gamma_array, static_gamma)
  # Where the weight needs no logarithm (an integer or k + 1/2 gamma), the
  # x-derivative reads the value instead of recomputing log1p. The value then
  # has two users (its sum and this rule) and, ending in a division, is
  # materialised once; the gradient is written over it in place, so the loop
  # that computes the loss runs first, with no temporary buffer. Under a
  # caller's jnp.sum of the unreduced loss XLA keeps the value alive beside
  # the gradient instead: k + 1/2 then recomputes (no temporary), while an
  # integer gamma keeps the documented trade of one temporary for speed.
  shares_value = numerics.integer_exponent(gamma) is not None or (
      summed and numerics.is_algebraic(gamma))
  focusing = not numerics.is_static_zero(gamma)
  value = _weighted_value(x, y, factor, gamma)
  # Recomputed from fenced inputs rather than shared with the value: on the
  # CPU, XLA would otherwise write exp, log1p and 1/(1+e) to memory for both.
  f = sigmoid.folded(numerics.derivative_logits(x), numerics.fence(y))
  weight = numerics.power(f.one_minus_p_t, gamma, f.log_m)
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    d_dz = f.v - f.sigmoid_minus_z
    if shares_value:
      # The value is factor * weight * CE; pq_over_m vanishes where it is infinite.
      pq_over_m = f.pq_over_m()
      d_focus = jnp.where(pq_over_m == 0, 0, pq_over_m * value)
      d_dz = factor * weight * d_dz + gamma * d_focus * (f.v - f.u)
    else:
      if focusing:
        # pq_over_m first: it vanishes where CE is huge (clipped infinite logits).
        d_dz = d_dz + gamma * (f.pq_over_m() * f.cross_entropy) * (f.v - f.u)
      d_dz = factor * weight * d_dz
    tangent = tangent + numerics.reads(value, f.signed(d_dz)) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    d_du = -f.z
    if focusing:
      d_du = d_du + gamma * (f.e - 1) * f.ce_over_scaled_m()
    tangent = tangent + f.signed(factor * weight * d_du) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + weight * f.cross_entropy * factor_dot
  if not isinstance(gamma_dot, SymbolicZero):
    # d/dgamma of m**gamma is m**gamma log m, 0 where m = 0.
    tangent = tangent + factor * numerics.times_log(weight, f.log_m) * f.cross_entropy * gamma_dot
  return value, tangent


_BOUNDS = {"alpha": checks.UNIT, "gamma": checks.NON_NEGATIVE, "pos_weight": checks.POSITIVE}


@program(family="sigmoid", specialising=("gamma",), bounds=_BOUNDS)
def sigmoid_focal_loss(logits: ArrayLike, labels: ArrayLike, *,
                       alpha: ArrayLike | None = 0.25, gamma: Parameter = 2.0,
                       pos_weight: ArrayLike | None = None, weights: ArrayLike | None = None,
                       where: ArrayLike | None = None, ignore_index: int | None = None,
                       label_smoothing: float = 0.0, reduction: Reduction = "none",
                       normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Sigmoid focal loss (RetinaNet's classification loss).

  With :math:`p = \sigma(x)`, targets :math:`y \in [0, 1]`,
  :math:`p_t = y p + (1 - y)(1 - p)` and
  :math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)`, the loss of each element is

  .. math::
    \mathrm{FL}(x, y) = -\alpha_t (1 - p_t)^\gamma
      \left[y \log p + (1 - y) \log(1 - p)\right],

  which for hard targets is :math:`-\alpha_t (1 - p_t)^\gamma \log p_t`.
  ``gamma = 0`` gives the (balanced) cross-entropy exactly. Loss, gradient and
  Hessian are finite for every finite logit and every ``gamma >= 0``
  (including ``0 < gamma < 1``); derivatives, with respect to the logits, the
  labels, ``alpha``, ``weights``, ``pos_weight`` and a traced ``gamma``, come
  from an analytic rule, not from differentiating ``pow``.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``[...]`` = ``logits.shape[:-1]``, where
      id ``C`` marks a background anchor (all classes negative) and ids
      outside ``[0, C]`` other than ``ignore_index`` make their row NaN; or
      dense targets with the shape of ``logits``: floats in [0, 1] (soft
      targets allowed), bools, or integers 0 and 1.
    alpha: weight of the positive term, the negative term gets ``1 - alpha``:
      a number in [0, 1], a per-class vector of shape ``(C,)``, or None for no
      weighting. May be traced. See :func:`jfocal.alpha_from_counts`.
    gamma: focusing parameter >= 0. A Python number specialises the compiled
      program (integers become multiplications, and 1.5, 2.5, ... a square
      root as well); an array is traced: a ``jax.jit`` argument, vmappable,
      differentiable.
    pos_weight: weight ``w > 0`` of the positive term of the cross-entropy, a
      number or a per-class vector of shape ``(C,)``, as in PyTorch's
      ``BCEWithLogitsLoss``: a target ``y`` becomes the target
      ``w y / (w y + 1 - y)`` with the weight ``w y + 1 - y``. None is 1.
    weights: per-element weights broadcastable to the unreduced loss, e.g.
      ``anchor_weights[..., None]``; a zero weight removes an entry even where
      its loss is infinite.
    where: boolean mask broadcastable to the unreduced loss: masked entries
      are 0, get a zero gradient whatever their logits hold, and leave the
      mean.
    ignore_index: integer labels equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / 2``.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum instead of the count of unmasked entries (mmdetection's
      ``avg_factor``), or ``"num_positives"``: the sum over ``max(number of
      unmasked positive targets, 1)``, the detector convention.
    axis_name: name (or tuple of names) of mapped axes of ``shard_map``,
      ``pmap`` or ``vmap`` over which sums and counts are global.

  Returns:
    With ``reduction="none"``, the loss of every element, shape of ``logits``,
    in the dtype of ``logits`` (masked entries 0). Otherwise a scalar
    accumulated in float32 (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> print(jfocal.sigmoid_focal_loss(logits, class_ids))
    [[0.0005 0.017  0.2831]
     [0.0001 0.13   2.9062]]
    >>> mean = jfocal.sigmoid_focal_loss(logits, class_ids, reduction="mean",
    ...                                  normalizer="num_positives")
    >>> round(float(mean), 4)  # the sum over all elements / 1 positive anchor
    3.3367

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017.
  """
  inputs = sigmoid.prepare(logits, labels, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing,
                           pos_weight=pos_weight)
  x, factor = sigmoid.fold(inputs, alpha=alpha)
  gamma = checks.parameter(gamma, "gamma")
  value = focal_term(x, inputs.y, factor, *numerics.split(gamma, inputs.dtype),
                     sigmoid.summed(reduction))
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)


@program(family="sigmoid", bounds=_BOUNDS)
def sigmoid_balanced_cross_entropy(logits: ArrayLike, labels: ArrayLike, *,
                                   alpha: ArrayLike = 0.25, pos_weight: ArrayLike | None = None,
                                   weights: ArrayLike | None = None,
                                   where: ArrayLike | None = None,
                                   ignore_index: int | None = None,
                                   label_smoothing: float = 0.0, reduction: Reduction = "none",
                                   normalizer: Normalizer = None,
                                   axis_name: AxisName = None) -> jax.Array:
  r"""Alpha-balanced sigmoid cross-entropy: the focal loss with ``gamma = 0``.

  .. math::
    \mathrm{CE}_\alpha(x, y) = -\alpha y \log \sigma(x)
      - (1 - \alpha)(1 - y) \log(1 - \sigma(x)).

  With ``m`` positives and ``n`` negatives, ``alpha = n / (n + m)`` (so that
  ``alpha / (1 - alpha) = n / m``) balances their total weights
  (:func:`jfocal.alpha_from_counts`).

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN),
      or dense float, bool or integer 0/1 targets with the shape of ``logits``.
    alpha: weight of the positive term (the negative term gets ``1 - alpha``),
      a number in [0, 1] or a per-class vector of shape ``(C,)``; may be traced.
    pos_weight: weight ``w > 0`` of the positive term, a number or a vector of
      shape ``(C,)``, as in PyTorch's ``BCEWithLogitsLoss``; None is 1.
    weights: per-element weights broadcastable to the unreduced loss.
    where: boolean mask broadcastable to the unreduced loss; masked entries
      are 0 with zero gradient and leave the mean.
    ignore_index: integer labels equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / 2``.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum, or ``"num_positives"`` (the sum over ``max(positives, 1)``).
    axis_name: name (or tuple of names) of mapped axes over which sums and
      counts are global.

  Returns:
    With ``reduction="none"``, the loss of every element in the dtype of
    ``logits``; otherwise a float32 scalar (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([2.0, -1.0, 0.0])
    >>> labels = jnp.array([1.0, 0.0, 1.0])
    >>> print(jfocal.sigmoid_balanced_cross_entropy(logits, labels, alpha=0.25))
    [0.0317 0.2349 0.1733]

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017, section 3.1.
  """
  return sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=0.0, pos_weight=pos_weight,
                            weights=weights, where=where, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction,
                            normalizer=normalizer, axis_name=axis_name)


@program(family="sigmoid", bounds=_BOUNDS)
def sigmoid_cross_entropy(logits: ArrayLike, labels: ArrayLike, *,
                          pos_weight: ArrayLike | None = None, weights: ArrayLike | None = None,
                          where: ArrayLike | None = None, ignore_index: int | None = None,
                          label_smoothing: float = 0.0, reduction: Reduction = "none",
                          normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Sigmoid (binary) cross-entropy of independent classes.

  .. math::
    \mathrm{CE}(x, y) = -w y \log \sigma(x) - (1 - y) \log(1 - \sigma(x)),

  (``w`` is ``pos_weight``, 1 by default) computed as
  :math:`\mathrm{softplus}(x) - x y` without cancellation. This is optax's
  ``sigmoid_binary_cross_entropy`` and PyTorch's ``BCEWithLogitsLoss``, with
  class ids, masks, weights and reductions.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN),
      or dense float, bool or integer 0/1 targets with the shape of ``logits``.
    pos_weight: weight ``w > 0`` of the positive term, a number or a vector of
      shape ``(C,)``, as in PyTorch's ``BCEWithLogitsLoss``; None is 1.
    weights: per-element weights broadcastable to the unreduced loss.
    where: boolean mask broadcastable to the unreduced loss; masked entries
      are 0 with zero gradient and leave the mean.
    ignore_index: integer labels equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / 2``.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum, or ``"num_positives"`` (the sum over ``max(positives, 1)``).
    axis_name: name (or tuple of names) of mapped axes over which sums and
      counts are global.

  Returns:
    With ``reduction="none"``, the loss of every element in the dtype of
    ``logits``; otherwise a float32 scalar (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0], [0.0, 3.0]])
    >>> labels = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    >>> print(jfocal.sigmoid_cross_entropy(logits, labels))
    [[0.1269 0.3133]
     [0.6931 3.0486]]
    >>> print(jfocal.sigmoid_cross_entropy(logits, labels, pos_weight=3.0))
    [[0.3808 0.3133]
     [2.0794 3.0486]]

  References:
    Goodfellow et al., `Deep Learning
    <http://www.deeplearningbook.org/contents/prob.html>`_, 2016, section 3.13.
  """
  return sigmoid_focal_loss(logits, labels, alpha=None, gamma=0.0, pos_weight=pos_weight,
                            weights=weights, where=where, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction,
                            normalizer=normalizer, axis_name=axis_name)
