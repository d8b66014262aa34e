"""Quality focal loss (GFL) and varifocal loss: focal losses with soft IoU targets.

Both work on the folded frame of `jfocal.engine.sigmoid`: with ``z = |x|``, the
target mass ``u`` on the side the logit favours and ``v = 1 - u``,
``e = exp(-z)``,

    CE             = log1p(e) + v z,            d CE / dz = sigma(z) - u = delta,
    delta          = sigma(z) - u = (v - u e) sigma(z),

and in the original frame ``sigma(x) - y = sign(x) delta``.

QFL is ``|delta|**beta * CE``. Its derivatives are

    d/dz    = beta sign(delta) |delta|**(beta - 1) sigma(z) sigma(-z) CE + |delta|**beta delta
    d/du    = -beta sign(delta) |delta|**(beta - 1) CE - |delta|**beta z
    d/dbeta = |delta|**beta log|delta| CE

For a static integer ``beta`` (2 is the paper's) ``sign(delta) |delta|**(beta - 1)``
is the polynomial ``delta**(beta - 1)`` (times ``sign(delta)`` for odd
``beta``), so that second derivatives are exact also at ``delta = 0``.
For a static ``k + 1/2`` above 1 (1.5, 2.5, ...) it is ``|delta|**(k - 1)
sqrt|delta|``, with no logarithm (the derivatives' ``|delta|**beta`` is that
times ``|delta|``). Otherwise ``|delta|**(beta - 1) sigma(z) sigma(-z)`` is
evaluated as one exponential of ``(beta - 1) log|delta| + log sigma(z) + log
sigma(-z)``, all three logarithms exact (``log|delta| = log|v - u e| -
log1p(e)``, or ``-z - log1p(e)`` for a certain target where ``u e`` may
underflow): it never overflows where ``delta`` is tiny. At ``delta = 0`` (the prediction equals a
soft target) QFL has its minimum 0 and a cusp for ``beta < 1`` (a kink for
``beta = 1``); the derivative there is taken as 0, a subgradient.

VFL is ``q CE`` (``CE`` alone without ``iou_weighted``) for a target
``q > 0`` and ``alpha p**gamma CE`` for ``q = 0``: the latter is the focal
term of a negative, whose derivative is the sigmoid focal core's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, sigmoid
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction

# Dense quality targets, class ids, or a (class_ids, scores) pair.
Targets = ArrayLike | tuple[ArrayLike, ArrayLike]


def _quality_parts(x: jax.Array, y: jax.Array, beta: Parameter):
  f = sigmoid.folded(x, y)
  scaled_delta = f.v - f.u * f.e      # delta / sigma(z), exact where either term is 0
  delta = scaled_delta * f.sigmoid_z
  matched = delta == 0
  safe_abs = jnp.where(matched | f.certain, 1, jnp.abs(scaled_delta))
  log_abs_delta = jnp.where(matched, -jnp.inf,
                            jnp.where(f.certain, -f.z, jnp.log(safe_abs)) - f.log1p_e)
  weight = numerics.power(jnp.abs(delta), beta, log_abs_delta)
  return f, delta, matched, log_abs_delta, weight


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def quality_focal_term(x: jax.Array, y: jax.Array, factor: jax.Array, beta: jax.Array,
                       static_beta: float | None, summed: bool) -> jax.Array:
  """``factor |y - sigmoid(x)|**beta * CE(x, y)`` elementwise, for targets y in [0, 1].

  ``summed`` is `jfocal.engine.sigmoid.summed`.
  """
  return numerics.fence(_quality_value(x, y, factor, numerics.pick(beta, static_beta)))


def _quality_value(x: jax.Array, y: jax.Array, factor: jax.Array, beta: Parameter) -> jax.Array:
  f, _, _, _, weight = _quality_parts(x, y, beta)
  return factor * weight * f.cross_entropy


@functools.partial(quality_focal_term.defjvp, symbolic_zeros=True)
def _quality_focal_term_jvp(static_beta, summed, primals, tangents):
  x, y, factor, beta_array = primals
  x_dot, y_dot, factor_dot, beta_dot = tangents
  beta = numerics.pick(beta_array, static_beta)
  value = _quality_value(x, y, factor, beta)
  f, delta, matched, log_abs_delta, weight = _quality_parts(
      numerics.derivative_logits(x), numerics.fence(y), beta)
  cross_entropy = f.cross_entropy
  direction = jnp.sign(delta)
  exponent = numerics.integer_exponent(beta)
  half = numerics.half_integer_exponent(beta)
  focusing = not numerics.is_static_zero(beta)
  # Read only where focusing (an integer exponent is a positive beta).
  slope_z: jax.Array | float = 0.0
  slope_u: jax.Array | float = 0.0
  if exponent is not None:
    # beta sign(delta) |delta|**(beta - 1) is the polynomial beta delta**(beta - 1)
    # (times sign(delta) for odd beta): exact second derivatives, also at delta = 0.
    power = lax.integer_pow(delta, exponent - 1) if exponent > 1 else jnp.ones_like(delta)
    slope_u = beta * (power if exponent % 2 == 0 else power * direction)
    slope_z = slope_u * (f.sigmoid_z * f.sigmoid_minus_z)
    slope_u = slope_u * cross_entropy
  elif half is not None:
    # beta = k + 1/2: |delta|**(beta - 1) is |delta|**(k - 1) sqrt|delta|, no logarithm.
    # From delta itself, as the value's weight: delta underflows only where y and sigma
    # are both below 1e-30 or within e**-100 of 1, and there both of the slope's
    # products below (with sigma sigma' and with CE) underflow too.
    abs_delta = jnp.abs(delta)
    root = numerics.half_power(abs_delta, half - 1)
    weight = root * abs_delta  # |delta|**beta from the same square root
    slope_u = beta * direction * root
    slope_z = slope_u * (f.sigmoid_z * f.sigmoid_minus_z)
    slope_u = slope_u * cross_entropy
  elif focusing:
    # beta |delta|**(beta - 1), with sigma(z) sigma(-z) or with CE, as one
    # exponential each, so that a tiny delta cannot overflow it; 0 where
    # delta = 0 (the minimum; see the module docstring) and where a traced
    # beta is 0, with the exponent kept finite there for the derivatives.
    flat = matched if isinstance(beta, float) else matched | (beta == 0)
    safe_log = jnp.where(flat, 0, log_abs_delta)
    log_pq = -f.z - 2 * f.log1p_e
    ce_positive = cross_entropy > 0
    log_ce = jnp.log(jnp.where(ce_positive, cross_entropy, 1))
    slope_z = jnp.where(flat, 0, beta * direction * jnp.exp(
        jnp.where(flat, 0, (beta - 1) * safe_log + log_pq)))
    slope_u = jnp.where(flat | ~ce_positive, 0, beta * direction * jnp.exp(
        jnp.where(flat, 0, (beta - 1) * safe_log + log_ce)))
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    if summed and half is not None:
      # As the focal core's rule: factor slope_z CE = beta pq value / delta reads the
      # loss (whose only other reader is its sum) instead of recomputing log1p; 0 at
      # delta = 0, as slope_z, and where pq underflows (the value may be inf there).
      pq = f.sigmoid_z * f.sigmoid_minus_z
      flat = matched | (pq == 0)
      d_z = factor * weight * delta + jnp.where(
          flat, 0, beta * pq * (value / jnp.where(flat, 1, delta)))
    else:
      d_dz = weight * delta
      if focusing:
        d_dz = d_dz + slope_z * cross_entropy
      d_z = factor * d_dz
    tangent = tangent + numerics.reads(value, f.signed(d_z)) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    d_du = -weight * f.z
    if focusing:
      d_du = d_du - slope_u
    tangent = tangent + f.signed(factor * d_du) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + weight * cross_entropy * factor_dot
  if not isinstance(beta_dot, SymbolicZero):
    tangent = tangent + factor * numerics.times_log(weight, log_abs_delta) * cross_entropy * beta_dot
  return value, tangent


def _varifocal_value(f: sigmoid.Folded, q: jax.Array, factor: jax.Array | float,
                     alpha: jax.Array, weight: jax.Array, iou_weighted: bool) -> jax.Array:
  positive = q * f.cross_entropy if iou_weighted else f.cross_entropy
  # With q = 0 the folded weight is sigmoid(x)**gamma; a zero alpha removes an
  # infinite negative but keeps a NaN.
  negative = numerics.zero_removes(alpha, weight * f.cross_entropy)
  return factor * jnp.where(q > 0, positive, negative)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def varifocal_term(x: jax.Array, q: jax.Array, factor: jax.Array, alpha: jax.Array,
                   gamma: jax.Array, static_gamma: float | None,
                   iou_weighted: bool, summed: bool) -> jax.Array:
  """``factor q CE(x, q)`` (or ``CE``) where ``q > 0``, ``factor alpha sigmoid(x)**gamma CE(x, 0)`` where 0."""
  return numerics.fence(_varifocal_term_value(x, q, factor, alpha,
                                             numerics.pick(gamma, static_gamma), iou_weighted))


def _varifocal_term_value(x: jax.Array, q: jax.Array, factor: jax.Array, alpha: jax.Array,
                          gamma: Parameter, iou_weighted: bool) -> jax.Array:
  f = sigmoid.folded(x, q)
  weight = numerics.power(f.one_minus_p_t, gamma, f.log_m)
  return numerics.materialised(_varifocal_value(f, q, factor, alpha, weight, iou_weighted), f.e)


@functools.partial(varifocal_term.defjvp, symbolic_zeros=True)
def _varifocal_term_jvp(static_gamma, iou_weighted, summed, primals, tangents):
  x, q, factor, alpha, gamma_array = primals
  x_dot, q_dot, factor_dot, alpha_dot, gamma_dot = tangents
  gamma = numerics.pick(gamma_array, static_gamma)
  value = _varifocal_term_value(x, q, factor, alpha, gamma, iou_weighted)
  f = sigmoid.folded(numerics.derivative_logits(x), numerics.fence(q))
  weight = numerics.power(f.one_minus_p_t, gamma, f.log_m)
  positive = q > 0
  cross_entropy = f.cross_entropy
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    d_ce = f.v - f.sigmoid_minus_z
    d_positive = q * d_ce if iou_weighted else d_ce
    d_negative = d_ce
    focusing = not numerics.is_static_zero(gamma)
    # Summed, with a weight that needs no logarithm, the focusing term reads the
    # value (factor alpha weight CE on the negatives) instead of recomputing
    # log1p, as the sigmoid focal core does.
    shares_value = focusing and summed and numerics.is_algebraic(gamma)
    if focusing and not shares_value:
      # The sigmoid focal core's derivative at target 0 (there u - v = +-1).
      d_negative = d_negative + gamma * (f.pq_over_m() * cross_entropy) * (f.v - f.u)
    d_negative = alpha * (weight * d_negative)
    d_dz = factor * jnp.where(positive, d_positive, d_negative)
    if shares_value:
      pq_over_m = f.pq_over_m()  # it vanishes where the value is infinite
      d_focus = jnp.where(pq_over_m == 0, 0, pq_over_m * value)
      d_dz = d_dz + jnp.where(positive, 0, gamma * d_focus * (f.v - f.u))
    tangent = tangent + numerics.reads(value, f.signed(d_dz)) * x_dot
  if not isinstance(q_dot, SymbolicZero):
    # Only the positive branch depends on q: d(q CE)/dq = CE + q dCE/dq, dCE/dq = -x.
    d_ce_dq = -f.signed(f.z)
    d_q = cross_entropy + q * d_ce_dq if iou_weighted else d_ce_dq
    tangent = tangent + factor * jnp.where(positive, d_q, 0) * q_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + _varifocal_value(f, q, 1, alpha, weight, iou_weighted) * factor_dot
  if not isinstance(alpha_dot, SymbolicZero):
    tangent = tangent + factor * jnp.where(positive, 0, weight * cross_entropy) * alpha_dot
  if not isinstance(gamma_dot, SymbolicZero):
    d_gamma = alpha * numerics.times_log(weight, f.log_m) * cross_entropy
    tangent = tangent + factor * jnp.where(positive, 0, d_gamma) * gamma_dot
  return value, tangent


def split_targets(targets: Any, name: str) -> tuple[Any, Any]:
  """``(labels, scores)``: a ``(class_ids, scores)`` tuple split, anything else with no scores.

  Only a tuple is a pair; a list is an array of labels, as everywhere in JAX.
  """
  if not isinstance(targets, tuple):
    return targets, None
  if len(targets) != 2:
    raise ValueError(f"{name} given as a tuple must be the pair (class_ids, scores); "
                     f"got {len(targets)} items")
  ids = checks.as_array(targets[0], f"{name}[0]")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name}[0] must hold integer class ids (id C is background); "
                    f"got dtype {ids.dtype}")
  return ids, targets[1]


@program(family="sigmoid", specialising=("beta",), bounds={"beta": checks.NON_NEGATIVE})
def quality_focal_loss(logits: ArrayLike, scores: Targets, *, beta: Parameter = 2.0,
                       weights: ArrayLike | None = None, where: ArrayLike | None = None,
                       ignore_index: int | None = None, reduction: Reduction = "none",
                       normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Quality focal loss (QFL): focal loss with soft IoU targets, from Generalized Focal Loss.

  With :math:`\sigma = \sigma(x)` and a quality target :math:`y \in [0, 1]`
  (the IoU of the predicted box for its class, 0 for other classes and
  background),

  .. math::
    \mathrm{QFL}(x, y) = -|y - \sigma|^\beta
      \left[(1 - y) \log(1 - \sigma) + y \log \sigma\right].

  For hard targets this is the focal loss with ``gamma = beta`` and no alpha.
  As in mmdetection, negatives are supervised by the score 0. At
  :math:`\sigma = y` the loss has its minimum 0, a cusp for ``beta < 1``;
  the gradient there is 0, and finite everywhere else for every ``beta >= 0``.
  QFL takes no label smoothing: it would make every IoU target positive.

  Args:
    logits: float array of shape ``[..., C]`` (a scalar with dense targets).
      bfloat16 and float16 are computed in float32.
    scores: the quality targets, in one of three forms: float (or bool)
      targets in [0, 1] with the shape of ``logits`` (the IoU of the matched
      box in its class's column, 0 elsewhere); a pair ``(class_ids, scores)``
      of integer ids of shape ``logits.shape[:-1]`` (id ``C`` is background,
      ids outside ``[0, C]`` other than ``ignore_index`` make the row NaN) and
      float scores in [0, 1] of the same shape, as mmdetection's heads produce
      them; or integer ids alone, which mean score 1. With ids,
      ``normalizer="num_positives"`` counts foreground anchors (also those
      whose score is 0), otherwise targets > 0.
    beta: focusing parameter >= 0 (default 2, the paper's). A Python number
      specialises the program (integers become multiplications, and 1.5,
      2.5, ... a square root as well); an array is
      traced (a ``jax.jit`` argument, vmappable, differentiable).
    weights: per-element weights broadcastable to the unreduced loss.
    where: boolean mask broadcastable to the unreduced loss; masked entries
      are 0 with zero gradient and leave the mean.
    ignore_index: integer labels equal to it are masked like ``where``.
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
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> ious = jnp.array([0.8, 0.0])
    >>> print(jfocal.quality_focal_loss(logits, (class_ids, ious)))
    [[0.0034 0.0227 0.3774]
     [0.0001 0.1733 3.8749]]

  References:
    Li et al., `Generalized Focal Loss: Learning Qualified and Distributed
    Bounding Boxes for Dense Object Detection <https://arxiv.org/abs/2006.04388>`_,
    NeurIPS 2020.
  """
  labels, quality = split_targets(scores, "scores")
  inputs = sigmoid.prepare(logits, labels, scores=quality, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=0.0, name="scores")
  x, factor = sigmoid.fold(inputs)
  beta = checks.parameter(beta, "beta")
  value = quality_focal_term(x, inputs.y, factor, *numerics.split(beta, inputs.dtype),
                             sigmoid.summed(reduction))
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)


@program(family="sigmoid", static=("iou_weighted",), specialising=("gamma",),
         bounds={"alpha": checks.UNIT, "gamma": checks.NON_NEGATIVE})
def varifocal_loss(logits: ArrayLike, targets: Targets, *, alpha: ArrayLike | None = 0.75,
                   gamma: Parameter = 2.0, iou_weighted: bool = True,
                   weights: ArrayLike | None = None, where: ArrayLike | None = None,
                   ignore_index: int | None = None, reduction: Reduction = "none",
                   normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Varifocal loss (VFL): IoU-weighted BCE for positives, focal down-weighting of negatives.

  With :math:`p = \sigma(x)` and an IoU-aware target :math:`q \in [0, 1]`
  (the IoU with the ground-truth box for its class, 0 otherwise),

  .. math::
    \mathrm{VFL}(x, q) = \begin{cases}
      -q \left[q \log p + (1 - q) \log(1 - p)\right] & q > 0 \\
      -\alpha \, p^\gamma \log(1 - p) & q = 0.
    \end{cases}

  Positives keep their full (IoU-weighted) BCE, only negatives are focused.
  With ``iou_weighted=False`` the positive weight :math:`q` becomes 1 (as in
  mmdetection). The loss is discontinuous in :math:`q` at 0; its derivative
  in :math:`q` is that of the active branch (0 for negatives). VFL takes no
  label smoothing: it would make every IoU target positive.

  Args:
    logits: float array of shape ``[..., C]`` (a scalar with dense targets).
      bfloat16 and float16 are computed in float32.
    targets: the IoU-aware targets, as dense floats in [0, 1] with the shape
      of ``logits``, a pair ``(class_ids, scores)`` (integer ids of shape
      ``logits.shape[:-1]``, id ``C`` background, and one float score per
      anchor), or integer ids alone (score 1); see
      :func:`jfocal.quality_focal_loss`.
    alpha: weight of the negatives, a number in [0, 1] or a per-class vector
      of shape ``(C,)`` (default 0.75, the paper's); may be traced. None means 1.
    gamma: focusing parameter of the negatives, >= 0. A Python number
      specialises the program; an array is traced (a ``jax.jit`` argument,
      vmappable, differentiable).
    iou_weighted: a static bool: weight each positive by its target ``q``
      (default True, the paper's).
    weights: per-element weights broadcastable to the unreduced loss.
    where: boolean mask broadcastable to the unreduced loss; masked entries
      are 0 with zero gradient and leave the mean.
    ignore_index: integer labels equal to it are masked like ``where``.
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
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> targets = jnp.array([[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])  # IoU 0.8, class 0
    >>> print(jfocal.varifocal_loss(logits, targets))
    [[0.4215 0.017  0.2831]
     [0.0001 0.13   2.9062]]

  References:
    Zhang et al., `VarifocalNet: An IoU-aware Dense Object Detector
    <https://arxiv.org/abs/2008.13367>`_, CVPR 2021.
  """
  if not isinstance(iou_weighted, (bool, np.bool_)):
    raise TypeError(f"iou_weighted must be a Python bool; got {iou_weighted!r}")
  labels, quality = split_targets(targets, "targets")
  inputs = sigmoid.prepare(logits, labels, scores=quality, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=0.0, name="targets")
  x, factor = sigmoid.fold(inputs)
  alpha = sigmoid.checked_alpha(alpha, inputs)
  alpha = jnp.ones((), inputs.dtype) if alpha is None else alpha
  gamma = checks.parameter(gamma, "gamma")
  value = varifocal_term(x, inputs.y, factor, alpha, *numerics.split(gamma, inputs.dtype),
                         bool(iou_weighted), sigmoid.summed(reduction))
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)
