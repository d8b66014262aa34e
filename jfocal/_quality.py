"""Quality focal loss (GFL) and varifocal loss: focal losses with soft IoU targets.

Both work on the sigmoid core's folded frame (see ``jfocal._sigmoid``): with
``z = |x|``, the target mass ``u`` on the side the logit favours and
``v = 1 - u``, ``e = exp(-z)``,

    CE             = log1p(e) + v z,            d CE / dz = sigma(z) - u = delta,
    delta          = sigma(z) - u = (v - u e) sigma(z),

and in the original frame ``sigma(x) - y = sign(x) delta``.

QFL is ``|delta|**beta * CE``. Its derivatives are

    d/dz = beta sign(delta) |delta|**(beta - 1) sigma(z) sigma(-z) CE + |delta|**beta delta
    d/du = -beta sign(delta) |delta|**(beta - 1) CE - |delta|**beta z

For integer ``beta`` (2 is the paper's) ``sign(delta) |delta|**(beta - 1)`` is
the polynomial ``delta**(beta - 1)`` (times ``sign(delta)`` for odd ``beta``),
so that second derivatives are exact also at ``delta = 0``. Otherwise
``|delta|**(beta - 1) sigma(z) sigma(-z)`` is evaluated as one exponential of
``(beta - 1) log|delta| + log sigma(z) + log sigma(-z)``, all three logarithms
exact (``log|delta| = log|v - u e| - log1p(e)``, or ``-z - log1p(e)`` for a
certain target where ``u e`` may underflow): it never overflows where
``delta`` is tiny. At ``delta = 0`` (the prediction equals a soft target) QFL
has its minimum 0 and a cusp for ``beta < 1`` (a kink for ``beta = 1``); the
derivative there is taken as 0, a subgradient.

VFL is ``q CE`` (``CE`` alone without ``iou_weighted``) for a target
``q > 0`` and ``alpha p**gamma CE`` for ``q = 0``: the latter is the focal
term of a negative, whose derivative is the sigmoid core's.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jfocal import _common, _math, _sigmoid, _validation


def _quality_parts(x: jax.Array, y: jax.Array, beta: float):
  f = _sigmoid._folded(x, y, 0.0)
  z, u, v, e, log1p_e, certain = f["z"], f["u"], f["v"], f["e"], f["log1p_e"], f["certain"]
  scaled_delta = v - u * e           # delta / sigma(z), exact where either term is 0
  delta = scaled_delta * f["sigmoid_z"]
  matched = delta == 0
  safe_abs = jnp.where(matched | certain, 1, jnp.abs(scaled_delta))
  log_abs_delta = jnp.where(matched, -jnp.inf,
                            jnp.where(certain, -z, jnp.log(safe_abs)) - log1p_e)
  weight = _math.modulating_factor(jnp.abs(delta), beta, log_abs_delta)
  return f, delta, matched, log_abs_delta, weight


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def quality_focal_term(x: jax.Array, y: jax.Array, beta: float) -> jax.Array:
  """``|y - sigmoid(x)|**beta * CE(x, y)`` elementwise, for targets y in [0, 1]."""
  f, _, _, _, weight = _quality_parts(x, y, beta)
  return weight * f["cross_entropy"]


@functools.partial(quality_focal_term.defjvp, symbolic_zeros=True)
def _quality_focal_term_jvp(beta, primals, tangents):
  x, y = primals
  x_dot, y_dot = tangents
  value = quality_focal_term.fun(x, y, beta)
  f, delta, matched, log_abs_delta, weight = _quality_parts(
      _math.derivative_logits(x), _math.fence(y), beta)
  cross_entropy, z, log1p_e = f["cross_entropy"], f["z"], f["log1p_e"]
  sign = jnp.where(f["likely_side"], 1, -1).astype(value.dtype)
  direction = jnp.sign(delta)
  tangent = jnp.zeros_like(value)
  exponent = _math.integer_exponent(beta)
  if exponent is not None:
    # beta sign(delta) |delta|**(beta - 1) is the polynomial beta delta**(beta - 1)
    # (times sign(delta) for odd beta): exact second derivatives, also at delta = 0.
    power = lax.integer_pow(delta, exponent - 1) if exponent > 1 else jnp.ones_like(delta)
    slope_u = beta * (power if exponent % 2 == 0 else power * direction)
    slope_z = slope_u * (f["sigmoid_z"] * f["sigmoid_minus_z"])
    slope_u = slope_u * cross_entropy
  elif beta:
    # beta |delta|**(beta - 1), with sigma(z) sigma(-z) or with CE, as one
    # exponential each, so that a tiny delta cannot overflow it; 0 where
    # delta = 0 (the minimum; see the module docstring).
    safe_log = jnp.where(matched, 0, log_abs_delta)
    log_pq = -z - 2 * log1p_e
    ce_positive = cross_entropy > 0
    log_ce = jnp.log(jnp.where(ce_positive, cross_entropy, 1))
    slope_z = jnp.where(matched, 0, beta * direction * jnp.exp((beta - 1) * safe_log + log_pq))
    slope_u = jnp.where(matched | ~ce_positive, 0,
                        beta * direction * jnp.exp((beta - 1) * safe_log + log_ce))
  if not isinstance(x_dot, SymbolicZero):
    d_dz = weight * delta
    if beta:
      d_dz = d_dz + slope_z * cross_entropy
    tangent = tangent + sign * d_dz * x_dot
  if not isinstance(y_dot, SymbolicZero):
    d_du = -weight * z
    if beta:
      d_du = d_du - slope_u
    tangent = tangent + sign * d_du * y_dot
  return value, tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def varifocal_term(x: jax.Array, q: jax.Array, alpha: jax.Array, gamma: float,
                   iou_weighted: bool) -> jax.Array:
  """``q CE(x, q)`` (or ``CE``) where ``q > 0``, ``alpha sigmoid(x)**gamma CE(x, 0)`` where 0."""
  f = _sigmoid._folded(x, q, gamma)
  return _varifocal_value(f, q, alpha, iou_weighted)


def _varifocal_value(f, q, alpha, iou_weighted):
  cross_entropy = f["cross_entropy"]
  positive = q * cross_entropy if iou_weighted else cross_entropy
  # With q = 0 the folded weight is sigmoid(x)**gamma; a zero alpha removes an
  # infinite negative (as jfocal._common.scale does) but keeps a NaN.
  negative = f["weight"] * cross_entropy
  negative = jnp.where((alpha == 0) & ~jnp.isnan(negative), 0, alpha * negative)
  return jnp.where(q > 0, positive, negative)


@functools.partial(varifocal_term.defjvp, symbolic_zeros=True)
def _varifocal_term_jvp(gamma, iou_weighted, primals, tangents):
  x, q, alpha = primals
  x_dot, q_dot, alpha_dot = tangents
  value = varifocal_term.fun(x, q, alpha, gamma, iou_weighted)
  f = _sigmoid._folded(_math.derivative_logits(x), _math.fence(q), gamma)
  positive = q > 0
  cross_entropy, weight = f["cross_entropy"], f["weight"]
  sign = jnp.where(f["likely_side"], 1, -1).astype(value.dtype)
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    d_ce = f["v"] - f["sigmoid_minus_z"]
    d_positive = q * d_ce if iou_weighted else d_ce
    d_negative = d_ce
    if gamma:
      # The sigmoid focal core's derivative at target 0 (there u - v = +-1).
      pq_over_m = jnp.where(f["certain"], f["sigmoid_z"],
                            f["sigmoid_minus_z"] / f["safe_scaled_m"])
      d_negative = d_negative + gamma * (pq_over_m * cross_entropy) * (f["v"] - f["u"])
    d_negative = alpha * (weight * d_negative)
    tangent = tangent + sign * jnp.where(positive, d_positive, d_negative) * x_dot
  if not isinstance(q_dot, SymbolicZero):
    # Only the positive branch depends on q: d(q CE)/dq = CE + q dCE/dq, dCE/dq = -x.
    d_ce_dq = -sign * f["z"]
    d_q = cross_entropy + q * d_ce_dq if iou_weighted else d_ce_dq
    tangent = tangent + jnp.where(positive, d_q, 0) * q_dot
  if not isinstance(alpha_dot, SymbolicZero):
    tangent = tangent + jnp.where(positive, 0, weight * cross_entropy) * alpha_dot
  return value, tangent


def split_targets(targets: Any, name: str) -> tuple[Any, Any]:
  """``(labels, scores)``: a ``(class_ids, scores)`` pair split, anything else with no scores."""
  if not isinstance(targets, (tuple, list)):
    return targets, None
  if len(targets) != 2:
    raise ValueError(f"{name} given as a sequence must be the pair (class_ids, scores); "
                     f"got {len(targets)} items")
  ids = _validation.as_array(targets[0], f"{name}[0]")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name}[0] must hold integer class ids (id C is background); "
                    f"got dtype {ids.dtype}")
  return ids, targets[1]


@_common.one_program("beta", "ignore_index", "reduction", "axis_name")
def _quality_focal_loss(logits: Any, labels: Any, *, scores: Any, beta: Any, weights: Any,
                        where: Any, ignore_index: Any, reduction: Any, normalizer: Any,
                        axis_name: Any) -> jax.Array:
  inputs = _sigmoid.sigmoid_inputs(
      logits, labels, scores=scores, gamma=beta, weights=weights, where=where,
      ignore_index=ignore_index, label_smoothing=0.0, reduction=reduction,
      normalizer=normalizer)
  loss = quality_focal_term(inputs.x, inputs.y, inputs.gamma)
  return _sigmoid.sigmoid_reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                                 axis_name=axis_name)


@_common.one_program("gamma", "iou_weighted", "ignore_index", "reduction", "axis_name")
def _varifocal_loss(logits: Any, labels: Any, *, scores: Any, alpha: Any, gamma: Any,
                    iou_weighted: Any, weights: Any, where: Any, ignore_index: Any,
                    reduction: Any, normalizer: Any, axis_name: Any) -> jax.Array:
  inputs = _sigmoid.sigmoid_inputs(
      logits, labels, scores=scores, gamma=gamma, weights=weights, where=where,
      ignore_index=ignore_index, label_smoothing=0.0, reduction=reduction,
      normalizer=normalizer)
  alpha = _sigmoid.checked_alpha(alpha, inputs)
  if alpha is None:
    alpha = jnp.ones((), inputs.dtype)
  loss = varifocal_term(inputs.x, inputs.y, alpha, inputs.gamma, iou_weighted)
  return _sigmoid.sigmoid_reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                                 axis_name=axis_name)


_TARGETS = """
      Soft targets come in one of three forms:

      - float (or bool) targets in [0, 1] with the shape of ``logits``: the
        IoU of the matched box in its class's column, 0 elsewhere;
      - a pair ``(class_ids, scores)``: integer ids of shape
        ``logits.shape[:-1]`` (id ``C`` is background, ids outside ``[0, C]``
        other than ``ignore_index`` make the row NaN) and float scores in
        [0, 1] of the same shape, as mmdetection's heads produce them;
      - integer ids alone, which mean score 1 (hard targets).

      With ids, ``normalizer="num_positives"`` counts foreground anchors (also
      those whose score is 0), otherwise targets > 0."""

# QFL and VFL take no label smoothing: it would make every IoU target > 0.
_COMMON_ARGS = re.sub(r"\n    label_smoothing:.*?(?=\n    reduction:)", "", _common.COMMON_ARGS_DOC,
                      flags=re.S)

_SHAPES = """
    logits: float array of shape ``[..., C]`` (a scalar is allowed with dense
      targets). bfloat16 and float16 are computed in float32."""

_GFL_REFERENCE = """    Li et al., `Generalized Focal Loss: Learning Qualified and Distributed
    Bounding Boxes for Dense Object Detection <https://arxiv.org/abs/2006.04388>`_,
    NeurIPS 2020.
"""

_VFL_REFERENCE = """    Zhang et al., `VarifocalNet: An IoU-aware Dense Object Detector
    <https://arxiv.org/abs/2008.13367>`_, CVPR 2021.
"""


@_common.document_loss(
    "Quality focal loss (QFL): focal loss with soft IoU targets, from Generalized Focal Loss.",
    r"""
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
""",
    _SHAPES + """
    scores: the quality targets.""" + _TARGETS + """
    beta: focusing parameter, a static Python number >= 0 (default 2, the
      paper's; integers become multiplications).""",
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> ious = jnp.array([0.8, 0.0])
    >>> print(jfocal.quality_focal_loss(logits, (class_ids, ious)))
    [[0.0034 0.0227 0.3774]
     [0.0001 0.1733 3.8749]]""",
    references=_GFL_REFERENCE, common_args=_COMMON_ARGS)
def quality_focal_loss(logits: Any, scores: Any, *, beta: float = 2.0, weights: Any = None,
                       where: Any = None, ignore_index: int | None = None,
                       reduction: str = "none", normalizer: Any = None,
                       axis_name: Any = None) -> jax.Array:
  labels, quality = split_targets(scores, "scores")
  beta = _validation.static_number(beta, "beta", minimum=0.0)
  return _quality_focal_loss(logits, labels, scores=quality, beta=beta, weights=weights,
                             where=where, ignore_index=ignore_index, reduction=reduction,
                             normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Varifocal loss (VFL): IoU-weighted BCE for positives, focal down-weighting of negatives.",
    r"""
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
  in :math:`q` is that of the active branch (0 for negatives).
""",
    _SHAPES + """
    targets: the IoU-aware targets.""" + _TARGETS + """
    alpha: weight of the negatives, a number in [0, 1] or a per-class vector
      of shape ``(C,)`` (default 0.75, the paper's); may be traced. None means 1.
    gamma: focusing parameter of the negatives, a static Python number >= 0.
    iou_weighted: a static bool: weight each positive by its target ``q``
      (default True, the paper's).""",
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> targets = jnp.array([[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])  # IoU 0.8, class 0
    >>> print(jfocal.varifocal_loss(logits, targets))
    [[0.4215 0.017  0.2831]
     [0.0001 0.13   2.9062]]""",
    references=_VFL_REFERENCE, common_args=_COMMON_ARGS)
def varifocal_loss(logits: Any, targets: Any, *, alpha: Any = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True, weights: Any = None, where: Any = None,
                   ignore_index: int | None = None, reduction: str = "none",
                   normalizer: Any = None, axis_name: Any = None) -> jax.Array:
  labels, quality = split_targets(targets, "targets")
  if not isinstance(iou_weighted, (bool, np.bool_)):
    raise TypeError(f"iou_weighted must be a Python bool; got {iou_weighted!r}")
  return _varifocal_loss(logits, labels, scores=quality, alpha=alpha, gamma=gamma,
                         iou_weighted=bool(iou_weighted), weights=weights, where=where,
                         ignore_index=ignore_index, reduction=reduction,
                         normalizer=normalizer, axis_name=axis_name)
