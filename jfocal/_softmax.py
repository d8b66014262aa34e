"""Softmax family: CE, alpha-balanced CE and focal loss over exclusive classes.

All three are one elementwise core on the negative log-probability
``n = -log p >= 0`` of a class, ``focal_term(n) = (1 - p)**gamma * n``, with the
derivative

    d focal_term / dn = (1 - p)**gamma * (1 + gamma * p * n / (1 - p)).

``n / (1 - p) = n / -expm1(-n)`` tends to 1 as ``p -> 1``; near there it is
evaluated from its Taylor series (the Bernoulli-number series of
``t / (1 - exp(-t))``), so neither ``0 / 0`` nor ``inf * 0`` ever occurs. The
engine (`jfocal.engine.softmax`) computes ``n`` without rounding it to 0 as
``p -> 1``, sums the terms over the target mass and leaves the chain rule
through the log-normaliser to JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, softmax
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction

# Below this n the series of n / -expm1(-n) is used; its first omitted term is
# below 1e-17 there, and above it the direct ratio has no cancellation.
_SERIES_RADIUS = 0.1


def _n_over_one_minus_p_near_one(n: jax.Array) -> jax.Array:
  """``n / (1 - exp(-n))`` for ``0 <= n < _SERIES_RADIUS``, from its Taylor series."""
  n2 = n * n
  return 1 + n / 2 + n2 * (1 / 12 + n2 * (-1 / 720 + n2 * (1 / 30240 - n2 / 1209600)))


def _log_one_minus_p(one_minus_p: jax.Array) -> jax.Array:
  positive = one_minus_p > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, one_minus_p, 1)), -jnp.inf)


def _value(n: jax.Array, gamma: Parameter) -> jax.Array:
  one_minus_p = -jnp.expm1(-n)
  log_base = None if isinstance(gamma, float) else _log_one_minus_p(one_minus_p)
  return numerics.power(one_minus_p, gamma, log_base) * n


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def focal_term(n: jax.Array, gamma: jax.Array, static_gamma: float | None) -> jax.Array:
  """``(1 - exp(-n))**gamma * n`` elementwise, for negative log-probabilities ``n >= 0``.

  ``gamma`` is the array of `jfocal.engine.numerics.split`, ``static_gamma``
  its static value or None.
  """
  return _value(n, numerics.pick(gamma, static_gamma))


@functools.partial(focal_term.defjvp, symbolic_zeros=True)
def _focal_term_jvp(static_gamma, primals, tangents):
  n, gamma_array = primals
  n_dot, gamma_dot = tangents
  gamma = numerics.pick(gamma_array, static_gamma)
  value = _value(n, gamma)
  if numerics.is_static_zero(gamma):
    return value, n_dot
  # Recomputed from a fenced copy rather than shared with the value: XLA on
  # the CPU then emits single loops instead of many small kernels.
  n = numerics.fence(n)
  one_minus_p = -jnp.expm1(-n)
  log_base = None if isinstance(gamma, float) else _log_one_minus_p(one_minus_p)
  weight = numerics.power(one_minus_p, gamma, log_base)
  tangent = jnp.zeros_like(value)
  if not isinstance(n_dot, SymbolicZero):
    # slope = 1 + gamma p n / (1 - p), as one quotient: the derivative then ends
    # in a division, which XLA computes once and stores for both of its users
    # (the log-normaliser's and the target logit's gradients) instead of
    # storing each of its exp, expm1 and division separately.
    near_one = n < _SERIES_RADIUS
    # p n -> 0 as n -> inf (p = 0); the guard keeps 0 * inf out, also of its derivatives.
    finite = n < jnp.inf
    safe_n = jnp.where(finite, n, 1)
    p = jnp.exp(-safe_n)
    p_n = jnp.where(finite, p * safe_n, 0)
    series_slope = 1 + gamma * p * _n_over_one_minus_p_near_one(jnp.where(near_one, n, 0))
    numerator = weight * jnp.where(near_one, series_slope, one_minus_p + gamma * p_n)
    tangent = tangent + numerator / jnp.where(near_one, 1, one_minus_p) * n_dot
  if not isinstance(gamma_dot, SymbolicZero):
    assert log_base is not None  # a tangent for gamma: a traced gamma, with its log_base
    # d/dgamma (1 - p)**gamma = (1 - p)**gamma log(1 - p), 0 where p = 1.
    tangent = tangent + numerics.times_log(weight, log_base) * n * gamma_dot
  return value, tangent


_BOUNDS = {"alpha": checks.NON_NEGATIVE, "gamma": checks.NON_NEGATIVE}


@program(family="softmax", specialising=("gamma",), bounds=_BOUNDS)
def softmax_focal_loss(logits: ArrayLike, labels: ArrayLike, *, alpha: ArrayLike | None = None,
                       gamma: Parameter = 2.0, axis: int | tuple[int, ...] = -1,
                       weights: ArrayLike | None = None, where: ArrayLike | None = None,
                       ignore_index: int | None = None, label_smoothing: float = 0.0,
                       z_loss: Parameter = 0.0, reduction: Reduction = "none",
                       normalizer: Normalizer = None, axis_name: AxisName = None) -> jax.Array:
  r"""Softmax focal loss over mutually exclusive classes.

  With :math:`p = \mathrm{softmax}(x)`,

  .. math::
    \mathrm{FL}(x, y) = -\sum_c \alpha_c\, y_c (1 - p_c)^\gamma \log p_c,

  which for a class id ``t`` is :math:`-\alpha_t (1 - p_t)^\gamma \log p_t`.
  ``gamma = 0`` gives the (balanced) cross-entropy exactly; loss, gradient and
  Hessian stay finite for every finite logit and every ``gamma >= 0``, and
  :math:`-\log p_t` keeps its relative precision as :math:`p_t \to 1`.

  Args:
    logits: float array with the classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids with the shape of ``logits`` without the class
      axes (no one-hot is built; ids outside ``[0, C)`` other than
      ``ignore_index`` give NaN), or float or bool target distributions with
      the shape of ``logits``.
    alpha: per-class weights of shape ``(C,)``, finite and >= 0, weighting each
      target class's term (see :func:`jfocal.background_alpha` and
      :func:`jfocal.class_balanced_alpha`); None (default) is no weighting.
      May be traced.
    gamma: focusing parameter >= 0. A Python number specialises the compiled
      program (integers become multiplications, and 1.5, 2.5, ... a square
      root as well); an array is traced: a ``jax.jit`` argument, vmappable,
      differentiable.
    axis: the class axis of ``logits`` (default -1), or a tuple of class axes,
      flattened in the given order; class ids are then flat indices into them,
      as in optax.
    weights: per-example weights broadcastable to the unreduced loss.
    where: a boolean mask. With the rank of ``logits`` it is per logit:
      masked classes leave the softmax and the class sum and get zero
      gradients (optax's ``where``). With a lower rank it broadcasts against
      the unreduced loss and masks whole examples. Masked entries are 0,
      whatever their logits hold, and leave the mean.
    ignore_index: class ids equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / K``,
      ``K`` the number of (unmasked) classes.
    z_loss: coefficient >= 0 of the z-loss, ``z_loss * logsumexp(logits)**2``
      added to each example's loss (PaLM's 1e-4 keeps the log-normaliser near
      0); 0 (default) adds nothing. A Python number specialises the program, an
      array is traced.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum instead of the count of unmasked examples, or
      ``"num_positives"`` (the sum over ``max(unmasked examples with a target,
      1)``).
    axis_name: name (or tuple of names) of mapped axes of ``shard_map``,
      ``pmap`` or ``vmap`` over which sums and counts are global.

  Returns:
    With ``reduction="none"``, the loss of every example, shape of ``logits``
    without the class axes, in the dtype of ``logits`` (masked entries 0).
    Otherwise a scalar accumulated in float32 (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> print(jfocal.softmax_focal_loss(logits, jnp.array([0, 1])))
    [0.0161 2.6514]

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017.
  """
  inputs = softmax.prepare(logits, labels, axis=axis, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
  gamma_array, static_gamma = numerics.split(checks.parameter(gamma, "gamma"), inputs.dtype)
  loss = softmax.example_loss(inputs, lambda n: focal_term(n, gamma_array, static_gamma),
                              alpha=alpha, z_loss=z_loss)
  return softmax.reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)


@program(family="softmax", bounds=_BOUNDS)
def softmax_balanced_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, alpha: ArrayLike,
                                   axis: int | tuple[int, ...] = -1,
                                   weights: ArrayLike | None = None,
                                   where: ArrayLike | None = None,
                                   ignore_index: int | None = None,
                                   label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                                   reduction: Reduction = "none", normalizer: Normalizer = None,
                                   axis_name: AxisName = None) -> jax.Array:
  r"""Class-weighted (alpha-balanced) softmax cross-entropy.

  .. math::
    \mathrm{CE}_\alpha(x, y) = -\sum_c \alpha_c\, y_c \log \mathrm{softmax}(x)_c,

  which for a class id ``t`` is :math:`-\alpha_t \log p_t` (PyTorch's
  ``CrossEntropyLoss(weight=alpha, reduction="none")``).

  Args:
    logits: float array with the classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids with the shape of ``logits`` without the class
      axes (ids outside ``[0, C)`` other than ``ignore_index`` give NaN), or
      float or bool target distributions with the shape of ``logits``.
    alpha: per-class weights of shape ``(C,)``, finite and >= 0; may be traced.
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
    >>> alpha = jfocal.background_alpha(0.25, 3)  # [0.25, 0.75, 0.75]
    >>> print(jfocal.softmax_balanced_cross_entropy(logits, jnp.array([0, 1]), alpha=alpha))
    [0.069  2.2138]

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017, section 3.1.
  """
  return softmax_focal_loss(logits, labels, alpha=alpha, gamma=0.0, axis=axis, weights=weights,
                            where=where, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                            normalizer=normalizer, axis_name=axis_name)


@program(family="softmax", bounds=_BOUNDS)
def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike, *,
                          axis: int | tuple[int, ...] = -1, weights: ArrayLike | None = None,
                          where: ArrayLike | None = None, ignore_index: int | None = None,
                          label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                          reduction: Reduction = "none", normalizer: Normalizer = None,
                          axis_name: AxisName = None) -> jax.Array:
  r"""Softmax cross-entropy over mutually exclusive classes.

  .. math::
    \mathrm{CE}(x, y) = -\sum_c y_c \log \mathrm{softmax}(x)_c,

  which for a class id ``t`` is :math:`\log\sum_c e^{x_c} - x_t`: optax's
  ``softmax_cross_entropy`` and ``softmax_cross_entropy_with_integer_labels``
  in one function, with masks, weights, label smoothing and reductions, and
  with the relative precision of the loss kept as :math:`p_t \to 1`.

  Args:
    logits: float array with the classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids with the shape of ``logits`` without the class
      axes (ids outside ``[0, C)`` other than ``ignore_index`` give NaN), or
      float or bool target distributions with the shape of ``logits``.
    axis: the class axis (default -1) or a tuple of class axes, flattened in
      the given order (class ids are flat indices into them).
    weights: per-example weights broadcastable to the unreduced loss.
    where: a boolean mask, per logit (the rank of ``logits``: masked classes
      leave the softmax and the sum) or per example (lower rank); see
      :func:`jfocal.softmax_focal_loss`.
    ignore_index: class ids equal to it are masked like ``where`` (PyTorch's
      default is -100).
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
    >>> print(jfocal.softmax_cross_entropy(logits, jnp.array([0, 1])))
    [0.2761 2.9518]
    >>> print(jfocal.softmax_cross_entropy(logits, jnp.array([[1.0, 0, 0], [0, 1, 0]])))
    [0.2761 2.9518]

  References:
    `Cross-entropy <https://en.wikipedia.org/wiki/Cross-entropy>`_, Wikipedia.
  """
  return softmax_focal_loss(logits, labels, alpha=None, gamma=0.0, axis=axis, weights=weights,
                            where=where, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                            normalizer=normalizer, axis_name=axis_name)
