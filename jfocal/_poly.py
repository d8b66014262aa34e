"""Poly-1 losses (Leng et al., PolyLoss, ICLR 2022): CE or focal loss plus eps (1 - p_t)**(gamma + 1).

Sigmoid: ``alpha_t (1 - p_t)**gamma CE + eps (1 - p_t)**(gamma + 1)``, one core
on the sigmoid core's folded frame (see ``jfocal._sigmoid``), where
``m = 1 - p_t = (u e + v) sigma(z)`` and, with ``pq = sigma(z) sigma(-z)``,

    d m / dz = (v - u) pq,                 d m / du = (e - 1) sigma(z),
    d/dz = m**gamma [alpha_t (v - sigma(-z) + gamma (v - u) (pq / m) CE)
                     + eps (gamma + 1) (v - u) pq],
    d/du = m**gamma [alpha_t (-z + gamma (e - 1) CE / (u e + v))
                     + eps (gamma + 1) (e - 1) sigma(z)],

the focal core's derivative (the ``alpha_t`` part, with its guarded ratios)
plus a bounded polynomial part. As in the PolyLoss paper's code, ``alpha_t``
weights the focal term only.

Softmax: ``-log p_t + eps (1 - p_t)`` on the log-probability ``l`` of a class,
with ``1 - p = -expm1(l)`` (no cancellation as ``p -> 1``) and the derivative
``d/dl = -1 - eps exp(l)``. Soft targets sum the per-class terms,
``sum_c y_c (-log p_c + eps (1 - p_c))``, which equals the paper's
``CE + eps (1 - sum_c y_c p_c)`` for targets that sum to 1.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal import _common, _math, _sigmoid, _softmax, _validation


def _weighted(alpha_t: jax.Array, loss: jax.Array) -> jax.Array:
  # A zero alpha_t removes an infinite loss but keeps a NaN (as _common.scale).
  return jnp.where((alpha_t == 0) & ~jnp.isnan(loss), 0, loss * alpha_t)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def poly1_focal_term(x: jax.Array, y: jax.Array, alpha_t: jax.Array, epsilon: jax.Array,
                     gamma: float) -> jax.Array:
  """``alpha_t (1 - p_t)**gamma CE(x, y) + epsilon (1 - p_t)**(gamma + 1)`` elementwise."""
  f = _sigmoid._folded(x, y, gamma)
  one_minus_p_t = f["scaled_m"] * f["sigmoid_z"]
  focal = _weighted(alpha_t, f["weight"] * f["cross_entropy"])
  return focal + epsilon * (f["weight"] * one_minus_p_t)


@functools.partial(poly1_focal_term.defjvp, symbolic_zeros=True)
def _poly1_focal_term_jvp(gamma, primals, tangents):
  x, y, alpha_t, epsilon = primals
  x_dot, y_dot, alpha_dot, epsilon_dot = tangents
  value = poly1_focal_term.fun(x, y, alpha_t, epsilon, gamma)
  f = _sigmoid._folded(_math.derivative_logits(x), _math.fence(y), gamma)
  weight, cross_entropy, likely_side = f["weight"], f["cross_entropy"], f["likely_side"]
  u, v, e, sigmoid_z = f["u"], f["v"], f["e"], f["sigmoid_z"]
  poly_power = gamma + 1
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    pq = f["sigmoid_minus_z"] * sigmoid_z
    focal_dz = v - f["sigmoid_minus_z"]
    if gamma:
      pq_over_m = jnp.where(f["certain"], sigmoid_z, f["sigmoid_minus_z"] / f["safe_scaled_m"])
      focal_dz = focal_dz + gamma * (pq_over_m * cross_entropy) * (v - u)
    d_dz = weight * (_weighted(alpha_t, focal_dz) + epsilon * poly_power * (v - u) * pq)
    tangent = tangent + jnp.where(likely_side, d_dz, -d_dz) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    focal_du = -f["z"]
    if gamma:
      nonzero_e = e > 0
      log1p_e_over_e = jnp.where(nonzero_e, f["log1p_e"] / jnp.where(nonzero_e, e, 1), 1)
      ce_over_scaled_m = jnp.where(f["certain"], log1p_e_over_e,
                                   cross_entropy / f["safe_scaled_m"])
      focal_du = focal_du + gamma * (e - 1) * ce_over_scaled_m
    d_du = weight * (_weighted(alpha_t, focal_du) + epsilon * poly_power * (e - 1) * sigmoid_z)
    tangent = tangent + jnp.where(likely_side, d_du, -d_du) * y_dot
  if not isinstance(alpha_dot, SymbolicZero):
    tangent = tangent + weight * cross_entropy * alpha_dot
  if not isinstance(epsilon_dot, SymbolicZero):
    tangent = tangent + weight * (f["scaled_m"] * sigmoid_z) * epsilon_dot
  return value, tangent


@jax.custom_jvp
def poly1_softmax_term(l: jax.Array, epsilon: jax.Array) -> jax.Array:
  """``-l + epsilon (1 - exp(l))`` elementwise, for log-probabilities l <= 0."""
  return -l - epsilon * jnp.expm1(l)


@functools.partial(poly1_softmax_term.defjvp, symbolic_zeros=True)
def _poly1_softmax_term_jvp(primals, tangents):
  l, epsilon = primals
  l_dot, epsilon_dot = tangents
  value = poly1_softmax_term(l, epsilon)
  l = _math.fence(l)
  tangent = jnp.zeros_like(value)
  if not isinstance(l_dot, SymbolicZero):
    tangent = tangent - (1 + epsilon * jnp.exp(l)) * l_dot
  if not isinstance(epsilon_dot, SymbolicZero):
    tangent = tangent - jnp.expm1(l) * epsilon_dot
  return value, tangent


@_common.one_program("gamma", "ignore_index", "label_smoothing", "reduction", "axis_name")
def _poly1_focal_loss(logits: Any, labels: Any, *, epsilon: Any, alpha: Any, gamma: Any,
                      weights: Any, where: Any, ignore_index: Any, label_smoothing: Any,
                      reduction: Any, normalizer: Any, axis_name: Any) -> jax.Array:
  inputs = _sigmoid.sigmoid_inputs(
      logits, labels, gamma=gamma, weights=weights, where=where, ignore_index=ignore_index,
      label_smoothing=label_smoothing, reduction=reduction, normalizer=normalizer)
  epsilon = epsilon.astype(inputs.dtype)
  alpha_t = _sigmoid.alpha_t(alpha, inputs)
  if alpha_t is None:
    alpha_t = jnp.ones((), inputs.dtype)
  loss = poly1_focal_term(inputs.x, inputs.y, alpha_t, epsilon, inputs.gamma)
  return _sigmoid.sigmoid_reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                                 axis_name=axis_name)


_EPSILON = """
    epsilon: coefficient of the first polynomial term, a number >= -1 or a
      scalar array (default 1); may be traced, and the loss is differentiable
      in it. ``epsilon = 0`` is the plain loss, ``-1`` removes the leading
      term of its Taylor series; values >= -1 keep the loss non-negative."""

_POLY_REFERENCE = """    Leng et al., `PolyLoss: A Polynomial Expansion Perspective of
    Classification Loss Functions <https://arxiv.org/abs/2204.12511>`_, ICLR 2022.
"""


@_common.document_loss(
    "Poly-1 focal loss: sigmoid focal loss plus a first polynomial term.",
    r"""
  With :math:`p_t` and :math:`\alpha_t` as in :func:`jfocal.sigmoid_focal_loss`,

  .. math::
    \mathrm{Poly1FL}(x, y) = -\alpha_t (1 - p_t)^\gamma \log p_t
      + \epsilon (1 - p_t)^{\gamma + 1},

  (soft targets use the cross-entropy form of the focal term). As in the
  paper's code, :math:`\alpha_t` weights the focal term only. ``epsilon = 0``
  is the focal loss. One analytic core computes both terms; loss, gradient
  and Hessian are finite for every finite logit, every ``gamma >= 0`` and
  every ``epsilon``.
""",
    _sigmoid._SHAPES + _EPSILON + _sigmoid._ALPHA + """
    gamma: focusing parameter, a static Python number >= 0.""",
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> print(jfocal.poly1_focal_loss(logits, class_ids, epsilon=1.0))
    [[0.0021 0.0364 0.5242]
     [0.0002 0.255  3.8532]]""",
    references=_POLY_REFERENCE)
def poly1_focal_loss(logits: Any, labels: Any, *, epsilon: Any = 1.0, alpha: Any = 0.25,
                     gamma: float = 2.0, weights: Any = None, where: Any = None,
                     ignore_index: int | None = None, label_smoothing: float = 0.0,
                     reduction: str = "none", normalizer: Any = None,
                     axis_name: Any = None) -> jax.Array:
  epsilon = _validation.check_scalar_parameter(epsilon, "epsilon", minimum=-1.0)
  return _poly1_focal_loss(logits, labels, epsilon=epsilon, alpha=alpha, gamma=gamma,
                           weights=weights, where=where, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction,
                           normalizer=normalizer, axis_name=axis_name)


@_common.document_loss(
    "Poly-1 cross-entropy: softmax cross-entropy plus a first polynomial term.",
    r"""
  With :math:`p = \mathrm{softmax}(x)`,

  .. math::
    \mathrm{Poly1}(x, y) = \sum_c y_c \left[-\log p_c + \epsilon (1 - p_c)\right],

  which for a class id ``t`` is :math:`-\log p_t + \epsilon (1 - p_t)` and for
  a target distribution the paper's :math:`\mathrm{CE} + \epsilon (1 - \sum_c y_c p_c)`
  (the per-class form is the paper's code for smoothed labels; the two agree
  for targets that sum to 1). ``epsilon = 0`` is the cross-entropy.
  :math:`1 - p` is computed as ``-expm1(log p)``, exact as :math:`p \to 1`.
""",
    _softmax._SHAPES + _EPSILON + _softmax._AXIS,
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jfocal.poly1_cross_entropy(logits, jnp.array([0, 1]), epsilon=1.0))
    [0.5174 3.8996]""", _softmax._UNREDUCED_SHAPE,
    references=_POLY_REFERENCE)
def poly1_cross_entropy(logits: Any, labels: Any, *, epsilon: Any = 1.0, axis: int = -1,
                        weights: Any = None, where: Any = None,
                        ignore_index: int | None = None, label_smoothing: float = 0.0,
                        reduction: str = "none", normalizer: Any = None,
                        axis_name: Any = None) -> jax.Array:
  epsilon = _validation.check_scalar_parameter(epsilon, "epsilon", minimum=-1.0)
  return _softmax._softmax_loss(
      logits, labels, alpha=None, gamma=0.0, axis=axis, weights=weights, where=where,
      ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
      normalizer=normalizer, axis_name=axis_name, core=poly1_softmax_term,
      core_parameter=epsilon)
