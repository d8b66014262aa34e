"""Softmax family: CE, alpha-balanced CE and focal loss over exclusive classes.

All three share one elementwise core on the log-probability ``l = log p`` of a
class, ``focal_term(l) = (1 - p)**gamma * (-l)``, with the derivative

    d focal_term / dl = (1 - p)**gamma * (gamma * p * l / (1 - p) - 1).

``l / (1 - p) = l / -expm1(l)`` tends to -1 as ``p -> 1``; near there it is
evaluated from its Taylor series (the Bernoulli-number series of
``t / (exp(t) - 1)``), so neither ``0 / 0`` nor ``inf * 0`` ever occurs, and
the chain rule through ``log_softmax`` is left to JAX. Integer labels gather the
target logit and subtract ``logsumexp``: no one-hot tensor is ever built.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfocal import _common, _math, _validation

# Below this |l| the series of l / -expm1(l) is used; its first omitted term is
# below 1e-17 there, and outside it the direct ratio has no cancellation.
_SERIES_RADIUS = 0.1


def _log_p_over_one_minus_p_near_one(l: jax.Array) -> jax.Array:
  """``l / (1 - exp(l))`` for ``|l| < _SERIES_RADIUS``, from its Taylor series."""
  l2 = l * l
  return -(1 - l / 2 + l2 * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 - l2 / 1209600))))


def _log_softmax_parts(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """``(shifted, log_normalizer)`` with ``log softmax(x) = shifted - log_normalizer``.

  ``shifted = x - max(x)`` as in any stable log-softmax, except in a row whose
  maximum is infinite: there the logits equal to it get 0 instead of
  ``inf - inf``, so that the +inf logits share the probability (a +inf target
  has loss 0, a finite one +inf) and a row of -inf logits is uniform.
  """
  top = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  shifted = _shift(x, top)
  return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


@jax.custom_jvp
def _shift(x: jax.Array, top: jax.Array) -> jax.Array:
  return jnp.where((x == top) & jnp.isinf(top), 0, x - top)


@_shift.defjvp
def _shift_jvp(primals, tangents):
  # d(x - top)/dx = 1 also where the value is pinned to 0, so an infinite logit
  # keeps the limit of its gradient; top is a constant (stop_gradient).
  return _shift(*primals), tangents[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def focal_term(l: jax.Array, gamma: float) -> jax.Array:
  """``(1 - exp(l))**gamma * (-l)`` elementwise, for log-probabilities l <= 0."""
  return _math.modulating_factor(-jnp.expm1(l), gamma) * -l


@focal_term.defjvp
def _focal_term_jvp(gamma, primals, tangents):
  (l,), (l_dot,) = primals, tangents
  value = focal_term.fun(l, gamma)
  if not gamma:
    return value, -l_dot
  # Recomputed from a fenced copy rather than shared with the value: XLA on
  # the CPU then emits single loops instead of many small kernels.
  l = _math.fence(l)
  one_minus_p = -jnp.expm1(l)
  weight = _math.modulating_factor(one_minus_p, gamma)
  # slope = gamma p l / (1 - p) - 1, as one quotient: the derivative then ends
  # in a division, which XLA computes once and stores for both of its users
  # (the log-normaliser's and the target logit's gradients) instead of
  # storing each of its exp, expm1 and division separately.
  near_one = l > -_SERIES_RADIUS
  # p l -> 0 as l -> -inf (p = 0); the guard keeps 0 * inf out, also of its derivatives.
  finite = l > -jnp.inf
  safe_l = jnp.where(finite, l, -1)
  p = jnp.exp(safe_l)
  p_l = jnp.where(finite, p * safe_l, 0)
  series_slope = gamma * p * _log_p_over_one_minus_p_near_one(jnp.where(near_one, l, 0)) - 1
  numerator = weight * jnp.where(near_one, series_slope, gamma * p_l - one_minus_p)
  return value, numerator / jnp.where(near_one, 1, one_minus_p) * l_dot


def _class_axis(axis: Any, shape: tuple[int, ...]) -> int:
  ndim = len(shape)
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f"axis must be an int; got {axis!r}")
  if ndim == 0:
    raise ValueError("softmax losses need logits with a class axis; got scalar logits")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for logits of rank {ndim}")
  if shape[axis] == 0:
    raise ValueError(f"softmax losses need at least one class; logits of shape {shape} have "
                     f"none along axis {axis}")
  return axis % ndim


# Softmax alpha weights only the target class's term, so any finite weight >= 0
# is meaningful (e.g. class_balanced_alpha's, which sum to C).
@_common.one_program("gamma", "axis", "ignore_index", "label_smoothing", "reduction",
                     "axis_name", "core", bounds={"alpha": math.inf})
def _softmax_loss(logits: Any, labels: Any, *, alpha: Any, gamma: Any, axis: Any, weights: Any,
                  where: Any, ignore_index: Any, label_smoothing: Any, reduction: Any,
                  normalizer: Any, axis_name: Any, core: Any = None,
                  core_parameter: Any = None) -> jax.Array:
  """The softmax family; ``core(l, core_parameter)`` (a module-level function, static)
  replaces the focal term, as jfocal._poly does."""
  logits, labels, dtype, gamma, ignore_index, label_smoothing = _common.prepare_common(
      logits, labels, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
      normalizer=normalizer, label_smoothing=label_smoothing)
  if core is None:
    term = lambda l: focal_term(l, gamma)
  else:
    parameter = core_parameter.astype(dtype)
    term = lambda l: core(l, parameter)
  axis = _class_axis(axis, logits.shape)
  num_classes = logits.shape[axis]
  shape = logits.shape[:axis] + logits.shape[axis + 1:]
  if alpha is not None:
    if np.ndim(alpha) == 0:
      raise ValueError(
          "alpha of a softmax loss must be a per-class vector of shape "
          f"({num_classes},); got a number. For the background-style vector "
          "[alpha, 1 - alpha, ...] use jfocal.background_alpha(alpha, num_classes)")
    alpha = _validation.check_alpha(alpha, num_classes, allow_scalar=False,
                                    maximum=math.inf).astype(dtype)
  mask, weights = _common.user_mask_and_weights(where, weights, shape)
  x = logits.astype(dtype)

  def per_class(terms: jax.Array, targets: jax.Array) -> jax.Array:
    if alpha is not None:
      targets = targets * jnp.expand_dims(alpha, tuple(range(1, x.ndim - axis)))
    # A class without target mass adds 0, even where its term is +inf (p = 0).
    return jnp.sum(jnp.where(targets == 0, 0, targets * terms), axis=axis)

  if jnp.issubdtype(labels.dtype, jnp.integer):
    _validation.check_class_id_shape(labels, shape, "logits.shape without the class axis")
    in_range = (labels >= 0) & (labels < num_classes)
    invalid = ~in_range
    if ignore_index is not None:
      ignored = labels == ignore_index
      invalid = invalid & ~ignored
      mask = _common.combine_masks(mask, ~ignored)
    if mask is not None:
      x = jnp.where(jnp.expand_dims(mask, axis), x, 0)
      invalid = invalid & mask
    class_ids = jnp.where(in_range, labels, 0)
    positives = in_range if mask is None else in_range & mask
    shifted, log_normalizer = _log_softmax_parts(x, axis)
    target_logit = jnp.take_along_axis(shifted, jnp.expand_dims(class_ids, axis), axis=axis)
    loss = term(jnp.squeeze(target_logit - log_normalizer, axis))
    if alpha is not None:
      loss = _common.scale(loss, _common.per_class_values(alpha, class_ids))
    if label_smoothing:
      # (1 - eps) one_hot + eps / C, expanded so that the one-hot never exists.
      uniform = per_class(term(shifted - log_normalizer), jnp.ones((), dtype))
      loss = _common.scale(loss, 1 - label_smoothing) + label_smoothing / num_classes * uniform
    loss = _common.invalid_to_nan(loss, invalid)
  else:
    _validation.check_same_shape(labels, logits, "float or bool")
    targets = labels.astype(dtype)
    if mask is not None:
      expanded = jnp.expand_dims(mask, axis)
      x = jnp.where(expanded, x, 0)
      targets = jnp.where(expanded, targets, 0)
    positives = jnp.sum(targets, axis=axis) > 0
    targets = _common.smooth(targets, label_smoothing, num_classes)
    shifted, log_normalizer = _log_softmax_parts(x, axis)
    loss = per_class(term(shifted - log_normalizer), targets)
  return _common.reduce_loss(
      loss, mask=mask, weights=weights, reduction=reduction, normalizer=normalizer,
      positives=lambda: jnp.sum(positives), out_dtype=logits.dtype,
      axis_name=axis_name)


_SHAPES = """
    logits: float array with classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of ``logits.shape`` without ``axis`` (no one-hot
      is built; ids outside ``[0, C)`` other than ``ignore_index`` give NaN),
      or float or bool target distributions with the shape of ``logits``."""

_AXIS = """
    axis: the class axis of ``logits`` (default -1)."""

_UNREDUCED_SHAPE = """    The unreduced loss has the shape of ``logits`` without ``axis``.
"""

_ALPHA = """
    alpha: per-class weights of shape ``(C,)``, finite and >= 0, weighting
      each target class's term (see :func:`jfocal.background_alpha` and
      :func:`jfocal.class_balanced_alpha`)."""

_GAMMA = """
    gamma: focusing parameter, a static Python number >= 0 (integers become
      multiplications)."""


@_common.document_loss(
    "Softmax cross-entropy over mutually exclusive classes.",
    r"""
  .. math::
    \mathrm{CE}(x, y) = -\sum_c y_c \log \mathrm{softmax}(x)_c,

  which for a class id ``t`` is :math:`\log\sum_c e^{x_c} - x_t`.
""",
    _SHAPES + _AXIS,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jfocal.softmax_cross_entropy(logits, jnp.array([0, 1])))
    [0.2761 2.9518]""", _UNREDUCED_SHAPE)
def softmax_cross_entropy(logits: Any, labels: Any, *, axis: int = -1, weights: Any = None,
                          where: Any = None, ignore_index: int | None = None,
                          label_smoothing: float = 0.0, reduction: str = "none",
                          normalizer: Any = None, axis_name: Any = None) -> jax.Array:
  return _softmax_loss(logits, labels, alpha=None, gamma=0.0, axis=axis, weights=weights,
                       where=where, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, reduction=reduction,
                       normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Class-weighted (alpha-balanced) softmax cross-entropy.",
    r"""
  .. math::
    \mathrm{CE}_\alpha(x, y) = -\sum_c \alpha_c\, y_c \log \mathrm{softmax}(x)_c,

  which for a class id ``t`` is :math:`-\alpha_t \log p_t`.
""",
    _SHAPES + _ALPHA + _AXIS,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> alpha = jfocal.background_alpha(0.25, 3)  # [0.25, 0.75, 0.75]
    >>> print(jfocal.softmax_balanced_cross_entropy(logits, jnp.array([0, 1]), alpha=alpha))
    [0.069  2.2138]""", _UNREDUCED_SHAPE)
def softmax_balanced_cross_entropy(logits: Any, labels: Any, *, alpha: Any, axis: int = -1,
                                   weights: Any = None, where: Any = None,
                                   ignore_index: int | None = None,
                                   label_smoothing: float = 0.0, reduction: str = "none",
                                   normalizer: Any = None, axis_name: Any = None) -> jax.Array:
  return _softmax_loss(logits, labels, alpha=alpha, gamma=0.0, axis=axis, weights=weights,
                       where=where, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, reduction=reduction,
                       normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Softmax focal loss over mutually exclusive classes.",
    r"""
  With :math:`p = \mathrm{softmax}(x)`,

  .. math::
    \mathrm{FL}(x, y) = -\sum_c \alpha_c\, y_c (1 - p_c)^\gamma \log p_c,

  which for a class id ``t`` is :math:`-\alpha_t (1 - p_t)^\gamma \log p_t`.
  ``gamma = 0`` gives the (balanced) cross-entropy exactly; loss, gradient and
  Hessian stay finite for every finite logit and every ``gamma >= 0``.
""",
    _SHAPES + _ALPHA + "\n      None (default) means no class weighting." + _GAMMA + _AXIS,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jfocal.softmax_focal_loss(logits, jnp.array([0, 1])))
    [0.0161 2.6514]""", _UNREDUCED_SHAPE)
def softmax_focal_loss(logits: Any, labels: Any, *, alpha: Any = None, gamma: float = 2.0,
                       axis: int = -1, weights: Any = None, where: Any = None,
                       ignore_index: int | None = None, label_smoothing: float = 0.0,
                       reduction: str = "none", normalizer: Any = None,
                       axis_name: Any = None) -> jax.Array:
  return _softmax_loss(logits, labels, alpha=alpha, gamma=gamma, axis=axis, weights=weights,
                       where=where, ignore_index=ignore_index,
                       label_smoothing=label_smoothing, reduction=reduction,
                       normalizer=normalizer, axis_name=axis_name)
