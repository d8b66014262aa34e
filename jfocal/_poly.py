"""Poly-1 losses (Leng et al., PolyLoss, ICLR 2022): CE or focal loss plus eps (1 - p_t)**(gamma + 1).

Sigmoid: ``factor [alpha_t (1 - p_t)**gamma CE + eps (1 - p_t)**(gamma + 1)]``,
one core on the folded frame of `jfocal.engine.sigmoid`, where
``m = 1 - p_t = (u e + v) sigma(z)`` and, with ``pq = sigma(z) sigma(-z)``,

    d m / dz = (v - u) pq,                 d m / du = (e - 1) sigma(z),
    d/dz = m**gamma [alpha_t (v - sigma(-z) + gamma (v - u) (pq / m) CE)
                     + eps (gamma + 1) (v - u) pq],
    d/du = m**gamma [alpha_t (-z + gamma (e - 1) CE / (u e + v))
                     + eps (gamma + 1) (e - 1) sigma(z)],
    d/dgamma = m**gamma log m (alpha_t CE + eps m),

the focal core's derivative (the ``alpha_t`` part, with its guarded ratios)
plus a bounded polynomial part. As in the PolyLoss paper's code, ``alpha_t``
weights the focal term only; ``factor`` (weights, mask, NaN) weights both.

Softmax: ``n + eps (1 - p)`` on the negative log-probability ``n = -log p`` of
a class, with ``1 - p = -expm1(-n)`` (no cancellation as ``p -> 1``) and the
derivative ``d/dn = 1 + eps p``. Soft targets sum the per-class terms,
``sum_c y_c (-log p_c + eps (1 - p_c))``, which equals the paper's
``CE + eps (1 - sum_c y_c p_c)`` for targets that sum to 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, sigmoid, softmax
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction


def _poly1_value(f: sigmoid.Folded, factor: jax.Array | float, alpha_t: jax.Array,
                 epsilon: jax.Array, weight: jax.Array) -> jax.Array:
  focal = numerics.zero_removes(alpha_t, weight * f.cross_entropy)
  return factor * (focal + epsilon * (weight * f.one_minus_p_t))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def poly1_focal_term(x: jax.Array, y: jax.Array, factor: jax.Array, alpha_t: jax.Array,
                     epsilon: jax.Array, gamma: jax.Array,
                     static_gamma: float | None, summed: bool) -> jax.Array:
  """``factor [alpha_t (1 - p_t)**gamma CE(x, y) + epsilon (1 - p_t)**(gamma + 1)]`` elementwise.

  ``summed`` is `jfocal.engine.sigmoid.summed`.
  """
  return numerics.fence(_poly1_focal_value(x, y, factor, alpha_t, epsilon,
                                           numerics.pick(gamma, static_gamma)))


def _poly1_focal_value(x: jax.Array, y: jax.Array, factor: jax.Array, alpha_t: jax.Array,
                       epsilon: jax.Array, gamma: Parameter) -> jax.Array:
  f = sigmoid.folded(x, y)
  weight = numerics.power(f.one_minus_p_t, gamma, f.log_m)
  return numerics.materialised(_poly1_value(f, factor, alpha_t, epsilon, weight), f.e)


@functools.partial(poly1_focal_term.defjvp, symbolic_zeros=True)
def _poly1_focal_term_jvp(static_gamma, summed, primals, tangents):
  x, y, factor, alpha_t, epsilon, gamma_array = primals
  x_dot, y_dot, factor_dot, alpha_dot, epsilon_dot, gamma_dot = tangents
  gamma = numerics.pick(gamma_array, static_gamma)
  focusing = not numerics.is_static_zero(gamma)
  value = _poly1_focal_value(x, y, factor, alpha_t, epsilon, gamma)
  f = sigmoid.folded(numerics.derivative_logits(x), numerics.fence(y))
  weight = numerics.power(f.one_minus_p_t, gamma, f.log_m)
  poly_power = gamma + 1
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    pq = f.sigmoid_minus_z * f.sigmoid_z
    focal_dz = f.v - f.sigmoid_minus_z
    poly_dz = epsilon * poly_power * (f.v - f.u) * pq
    if focusing and summed and numerics.is_algebraic(gamma):
      # As the focal core's rule: the focusing term reads the focal part of the loss,
      # value - factor eps m**(gamma + 1) (|eps| m <= |eps| CE bounds the cancellation
      # by 1 + |eps| / alpha_t ulps), instead of recomputing log1p. 0 where pq / m is
      # (the value may be inf there).
      pq_over_m = f.pq_over_m()
      focal = jnp.where(alpha_t == 0, 0,
                        value - factor * (epsilon * (weight * f.one_minus_p_t)))
      d_focus = jnp.where(pq_over_m == 0, 0, pq_over_m * focal)
      d_z = (factor * weight * (numerics.zero_removes(alpha_t, focal_dz) + poly_dz)
             + gamma * d_focus * (f.v - f.u))
    else:
      if focusing:
        focal_dz = focal_dz + gamma * (f.pq_over_m() * f.cross_entropy) * (f.v - f.u)
      d_z = factor * weight * (numerics.zero_removes(alpha_t, focal_dz) + poly_dz)
    tangent = tangent + numerics.reads(value, f.signed(d_z)) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    focal_du = -f.z
    if focusing:
      focal_du = focal_du + gamma * (f.e - 1) * f.ce_over_scaled_m()
    d_du = weight * (numerics.zero_removes(alpha_t, focal_du)
                     + epsilon * poly_power * (f.e - 1) * f.sigmoid_z)
    tangent = tangent + f.signed(factor * d_du) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + _poly1_value(f, 1, alpha_t, epsilon, weight) * factor_dot
  if not isinstance(alpha_dot, SymbolicZero):
    tangent = tangent + factor * weight * f.cross_entropy * alpha_dot
  if not isinstance(epsilon_dot, SymbolicZero):
    tangent = tangent + factor * weight * f.one_minus_p_t * epsilon_dot
  if not isinstance(gamma_dot, SymbolicZero):
    d_gamma = numerics.times_log(weight, f.log_m) * (
        numerics.zero_removes(alpha_t, f.cross_entropy) + epsilon * f.one_minus_p_t)
    tangent = tangent + factor * d_gamma * gamma_dot
  return value, tangent


@jax.custom_jvp
def poly1_softmax_term(n: jax.Array, epsilon: jax.Array) -> jax.Array:
  """``n + epsilon (1 - exp(-n))`` elementwise, for negative log-probabilities ``n >= 0``."""
  return n - epsilon * jnp.expm1(-n)


@functools.partial(poly1_softmax_term.defjvp, symbolic_zeros=True)
def _poly1_softmax_term_jvp(primals, tangents):
  n, epsilon = primals
  n_dot, epsilon_dot = tangents
  value = poly1_softmax_term(n, epsilon)
  n = numerics.fence(n)
  tangent = jnp.zeros_like(value)
  if not isinstance(n_dot, SymbolicZero):
    tangent = tangent + (1 + epsilon * jnp.exp(-n)) * n_dot
  if not isinstance(epsilon_dot, SymbolicZero):
    tangent = tangent - jnp.expm1(-n) * epsilon_dot
  return value, tangent


_EPSILON_BOUND = checks.Bound(-1.0)


@program(family="sigmoid", specialising=("gamma",),
         bounds={"alpha": checks.UNIT, "gamma": checks.NON_NEGATIVE, "epsilon": _EPSILON_BOUND,
                 "pos_weight": checks.POSITIVE})
def poly1_focal_loss(logits: ArrayLike, labels: ArrayLike, *, epsilon: ArrayLike = 1.0,
                     alpha: ArrayLike | None = 0.25, gamma: Parameter = 2.0,
                     pos_weight: ArrayLike | None = None, weights: ArrayLike | None = None,
                     where: ArrayLike | None = None, ignore_index: int | None = None,
                     label_smoothing: float = 0.0, reduction: Reduction = "none",
                     normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Poly-1 focal loss: sigmoid focal loss plus a first polynomial term.

  With :math:`p_t` and :math:`\alpha_t` as in :func:`jfocal.sigmoid_focal_loss`,

  .. math::
    \mathrm{Poly1FL}(x, y) = -\alpha_t (1 - p_t)^\gamma \log p_t
      + \epsilon (1 - p_t)^{\gamma + 1},

  (soft targets use the cross-entropy form of the focal term). As in the
  paper's code, :math:`\alpha_t` weights the focal term only. ``epsilon = 0``
  is the focal loss. One analytic core computes both terms; loss, gradient
  and Hessian are finite for every finite logit, every ``gamma >= 0`` and
  every ``epsilon``.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN),
      or dense float, bool or integer 0/1 targets with the shape of ``logits``.
    epsilon: coefficient of the first polynomial term, a number >= -1 or a
      scalar array (default 1); traced, and the loss is differentiable in it.
      ``epsilon = 0`` is the plain loss, ``-1`` removes the leading term of
      its Taylor series; values >= -1 keep the loss non-negative.
    alpha: weight of the positive focal term (the negative one gets
      ``1 - alpha``), a number in [0, 1], a vector of shape ``(C,)`` or None.
    gamma: focusing parameter >= 0. A Python number specialises the program;
      an array is traced (a ``jax.jit`` argument, vmappable, differentiable).
    pos_weight: weight ``w > 0`` of the positive term, a number or a vector of
      shape ``(C,)``: a target ``y`` becomes ``w y / (w y + 1 - y)`` with the
      weight ``w y + 1 - y``. None is 1.
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
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> print(jfocal.poly1_focal_loss(logits, class_ids, epsilon=1.0))
    [[0.0021 0.0364 0.5242]
     [0.0002 0.255  3.8532]]

  References:
    Leng et al., `PolyLoss: A Polynomial Expansion Perspective of
    Classification Loss Functions <https://arxiv.org/abs/2204.12511>`_, ICLR 2022.
  """
  inputs = sigmoid.prepare(logits, labels, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing,
                           pos_weight=pos_weight)
  x, factor = sigmoid.fold(inputs)
  alpha = sigmoid.checked_alpha(alpha, inputs)
  alpha_t = jnp.ones((), inputs.dtype) if alpha is None else sigmoid.balance(alpha, inputs.y)
  epsilon = checks.scalar(epsilon, "epsilon").astype(inputs.dtype)
  gamma = checks.parameter(gamma, "gamma")
  value = poly1_focal_term(x, inputs.y, factor, alpha_t, epsilon,
                           *numerics.split(gamma, inputs.dtype), sigmoid.summed(reduction))
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)


@program(family="softmax", bounds={"epsilon": _EPSILON_BOUND})
def poly1_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, epsilon: ArrayLike = 1.0,
                        axis: int | tuple[int, ...] = -1, weights: ArrayLike | None = None,
                        where: ArrayLike | None = None, ignore_index: int | None = None,
                        label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                        reduction: Reduction = "none", normalizer: Normalizer = None,
                        axis_name: AxisName = None) -> jax.Array:
  r"""Poly-1 cross-entropy: softmax cross-entropy plus a first polynomial term.

  With :math:`p = \mathrm{softmax}(x)`,

  .. math::
    \mathrm{Poly1}(x, y) = \sum_c y_c \left[-\log p_c + \epsilon (1 - p_c)\right],

  which for a class id ``t`` is :math:`-\log p_t + \epsilon (1 - p_t)` and for
  a target distribution the paper's :math:`\mathrm{CE} + \epsilon (1 - \sum_c y_c p_c)`
  (the per-class form is the paper's code for smoothed labels; the two agree
  for targets that sum to 1). ``epsilon = 0`` is the cross-entropy.
  :math:`1 - p` is computed as ``-expm1(log p)``, exact as :math:`p \to 1`.
  optax's ``poly_loss_cross_entropy`` (whose default ``epsilon`` is 2) with
  class ids, masks, weights and reductions.

  Args:
    logits: float array with the classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids with the shape of ``logits`` without the class
      axes (ids outside ``[0, C)`` other than ``ignore_index`` give NaN), or
      float or bool target distributions with the shape of ``logits``.
    epsilon: coefficient of the first polynomial term, a number >= -1 or a
      scalar array (default 1); traced, and the loss is differentiable in it.
    axis: the class axis (default -1) or a tuple of class axes.
    weights: per-example weights broadcastable to the unreduced loss.
    where: a boolean mask, per logit (the rank of ``logits``) or per example
      (lower rank); see :func:`jfocal.softmax_focal_loss`.
    ignore_index: class ids equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / K``.
    z_loss: coefficient >= 0 of the z-loss, ``z_loss * logsumexp(logits)**2``
      added to each example's loss (PaLM's 1e-4 keeps the log-normaliser near
      0); 0 (default) adds nothing. A Python number specialises the program, an
      array is traced.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum, or ``"num_positives"``.
    axis_name: name (or tuple of names) of mapped axes over which sums and
      counts are global.

  Returns:
    With ``reduction="none"``, the loss of every example in the dtype of
    ``logits``; otherwise a float32 scalar (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jfocal.poly1_cross_entropy(logits, jnp.array([0, 1]), epsilon=1.0))
    [0.5174 3.8996]

  References:
    Leng et al., `PolyLoss: A Polynomial Expansion Perspective of
    Classification Loss Functions <https://arxiv.org/abs/2204.12511>`_, ICLR 2022.
  """
  inputs = softmax.prepare(logits, labels, axis=axis, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
  epsilon = checks.scalar(epsilon, "epsilon").astype(inputs.dtype)
  loss = softmax.example_loss(inputs, lambda n: poly1_softmax_term(n, epsilon), z_loss=z_loss)
  return softmax.reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)
