"""FL*, the focal-loss variant of the appendix of Lin et al. 2017.

With the signed logit ``x_t = x`` for a positive and ``-x`` for a negative,

    FL*(x_t) = -log sigma(gamma x_t + beta) / gamma = softplus(-(gamma x_t + beta)) / gamma,

and for a target ``y`` in [0, 1] the mixture ``y A + (1 - y) B`` of the two
hard cases ``A = softplus(-a) / gamma``, ``B = softplus(b) / gamma`` with
``a = gamma x + beta`` and ``b = gamma x - beta``, which is the sigmoid
cross-entropy at ``gamma = 1, beta = 0``. Each softplus is split as
``softplus(t) / gamma = relu(t) / gamma + log1p(exp(-|t|)) / gamma`` with the
ReLU part written as ``relu(-x - c)`` or ``relu(x - c)``, ``c = beta / gamma``,
so that neither ``gamma x`` overflowing nor ``exp`` of a large argument can
turn a finite loss infinite. Targets known to be 0 or 1 (class ids, integer or bool
labels) compute only their side's softplus and sigmoid, with the same bits. The
derivatives are

    d/dx     = -y sigma(-a) + (1 - y) sigma(b)
    d/dy     = A - B
    d/dbeta  = -(y sigma(-a) + (1 - y) sigma(b)) / gamma
    d/dgamma = (beta (y sigma(-a) + (1 - y) sigma(b)) - y H(a) - (1 - y) H(b)) / gamma**2,

with ``H(t) = |t| sigma(-|t|) + log1p(exp(-|t|))`` the binary entropy of
``sigma(t)`` in nats, all bounded; the second derivative in ``x``,
``gamma (y sigma(a) sigma(-a) + (1 - y) sigma(b) sigma(-b))``, is too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, sigmoid
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction


def _parts(x: jax.Array, beta: jax.Array, gamma: Parameter):
  shift = beta / gamma
  a = gamma * (x + shift)
  b = gamma * (x - shift)
  positive = (jnp.maximum(-(x + shift), 0)
              + numerics.log1p_of_unit(jnp.exp(-jnp.abs(a))) / gamma)
  negative = jnp.maximum(x - shift, 0) + numerics.log1p_of_unit(jnp.exp(-jnp.abs(b))) / gamma
  return a, b, positive, negative


def _side(x: jax.Array, y: jax.Array, beta: jax.Array, gamma: Parameter) -> jax.Array:
  """`_parts`'s term of the side a 0/1 target is on, to the bit: one ``exp`` and one ``log1p``."""
  shift = beta / gamma
  pulled = y == 1
  t = gamma * jnp.where(pulled, x + shift, x - shift)  # a or b
  return (jnp.maximum(jnp.where(pulled, -(x + shift), x - shift), 0)
          + numerics.log1p_of_unit(jnp.exp(-jnp.abs(t))) / gamma)


def _entropy(t: jax.Array) -> jax.Array:
  """``H(t) = t sigma(-t) + softplus(-t)``, symmetric in ``t`` and bounded by log 2."""
  z = jnp.abs(t)
  e = jnp.exp(-z)
  return z * e / (1 + e) + numerics.log1p_of_unit(e)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def focal_star_term(x: jax.Array, y: jax.Array, factor: jax.Array, beta: jax.Array,
                    gamma: jax.Array, static_gamma: float | None, hard: bool) -> jax.Array:
  """``factor [y softplus(-(gamma x + beta)) + (1 - y) softplus(gamma x - beta)] / gamma``.

  ``hard``: every target is 0 or 1 (`jfocal.engine.sigmoid.SigmoidInputs`), so that the
  loss and its x-derivative take the target's side only (`_side`), with the same bits.
  """
  return numerics.fence(_value(x, y, factor, beta, numerics.pick(gamma, static_gamma), hard))


def _value(x: jax.Array, y: jax.Array, factor: jax.Array, beta: jax.Array,
           gamma: Parameter, hard: bool) -> jax.Array:
  if hard:
    return factor * _side(x, y, beta, gamma)
  _, _, positive, negative = _parts(x, beta, gamma)
  return factor * sigmoid.mix(y, positive, negative)


@functools.partial(focal_star_term.defjvp, symbolic_zeros=True)
def _focal_star_term_jvp(static_gamma, hard, primals, tangents):
  x, y, factor, beta, gamma_array = primals
  x_dot, y_dot, factor_dot, beta_dot, gamma_dot = tangents
  gamma = numerics.pick(gamma_array, static_gamma)
  value = _value(x, y, factor, beta, gamma, hard)
  x = numerics.derivative_logits(x)
  a, b, positive, negative = _parts(x, beta, gamma)
  pull_up = y * jax.nn.sigmoid(-a)            # from the positive side
  push_down = (1 - y) * jax.nn.sigmoid(b)     # from the negative side
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    if hard:  # sigma(b) - 0 or 0 - sigma(-a), one sigmoid
      pulled = y == 1
      pull = jax.nn.sigmoid(jnp.where(pulled, -a, b))
      d_dx = jnp.where(pulled, -pull, pull)
    else:
      d_dx = push_down - pull_up
    tangent = tangent + numerics.reads(value, factor * d_dx) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    tangent = tangent + factor * (positive - negative) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + sigmoid.mix(y, positive, negative) * factor_dot
  if not isinstance(beta_dot, SymbolicZero):
    tangent = tangent - factor * (pull_up + push_down) / gamma * beta_dot
  if not isinstance(gamma_dot, SymbolicZero):
    d_gamma = (beta * (pull_up + push_down) - y * _entropy(a) - (1 - y) * _entropy(b))
    tangent = tangent + factor * d_gamma / (gamma * gamma) * gamma_dot
  return value, tangent


@program(family="sigmoid", specialising=("gamma",),
         bounds={"alpha": checks.UNIT, "gamma": checks.Bound(low_open=True),
                 "beta": checks.FINITE, "pos_weight": checks.POSITIVE})
def sigmoid_focal_loss_star(logits: ArrayLike, labels: ArrayLike, *,
                            alpha: ArrayLike | None = 0.25, gamma: Parameter = 1.0,
                            beta: ArrayLike = 0.0, pos_weight: ArrayLike | None = None,
                            weights: ArrayLike | None = None, where: ArrayLike | None = None,
                            ignore_index: int | None = None, label_smoothing: float = 0.0,
                            reduction: Reduction = "none", normalizer: Normalizer = None,
                            axis_name: AxisName = None) -> jax.Array:
  r"""FL*, the focal-loss alternative of Lin et al.'s appendix, on sigmoid logits.

  With the signed logit :math:`x_t = x` for a positive and :math:`-x` for a
  negative and :math:`\alpha_t` as in :func:`jfocal.sigmoid_focal_loss`,

  .. math::
    \mathrm{FL}^*(x, y) = -\alpha_t \, \frac{\log \sigma(\gamma x_t + \beta)}{\gamma},

  and for a soft target :math:`y \in [0, 1]` the mixture
  :math:`-\alpha_t [y \log \sigma(\gamma x + \beta)
  + (1 - y) \log \sigma(-\gamma x + \beta)] / \gamma`. ``gamma`` sets the
  steepness and ``beta`` the shift of the loss in :math:`x_t`; ``gamma = 1,
  beta = 0`` is the (balanced) cross-entropy. Computed with softplus split
  into a ReLU and ``log1p(exp(-|t|))`` so that the loss, its gradient (bounded
  by 1 in :math:`x`) and its Hessian are finite at every finite logit.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN),
      or dense float, bool or integer 0/1 targets with the shape of ``logits``.
    alpha: weight of the positive term (the negative term gets ``1 - alpha``),
      a number in [0, 1], a per-class vector of shape ``(C,)`` or None; may be
      traced.
    gamma: steepness > 0 (default 1). A Python number specialises the
      program; an array is traced (a ``jax.jit`` argument, vmappable,
      differentiable).
    beta: shift, a finite number or scalar array (default 0); traced, and the
      loss is differentiable in it.
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
    >>> print(jfocal.sigmoid_focal_loss_star(logits, class_ids, gamma=2.0, beta=1.0))
    [[0.0008 0.0182 0.2599]
     [0.0003 0.1175 2.6253]]

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017, appendix A (FL*).
  """
  inputs = sigmoid.prepare(logits, labels, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing,
                           pos_weight=pos_weight)
  x, factor = sigmoid.fold(inputs, alpha=alpha)
  gamma = checks.parameter(gamma, "gamma")
  beta = checks.scalar(beta, "beta").astype(inputs.dtype)
  value = focal_star_term(x, inputs.y, factor, beta, *numerics.split(gamma, inputs.dtype),
                          inputs.hard)
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)
