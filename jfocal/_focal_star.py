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
turn a finite loss infinite. The derivatives are

    d/dx    = -y sigma(-a) + (1 - y) sigma(b)
    d/dy    = A - B
    d/dbeta = -(y sigma(-a) + (1 - y) sigma(b)) / gamma,

all bounded; the second derivative
``gamma (y sigma(a) sigma(-a) + (1 - y) sigma(b) sigma(-b))`` is too.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal import _common, _math, _sigmoid, _validation


def _parts(x: jax.Array, beta: jax.Array, gamma: float):
  shift = beta / gamma
  a = gamma * (x + shift)
  b = gamma * (x - shift)
  positive = jnp.maximum(-(x + shift), 0) + _math.log1p_of_unit(jnp.exp(-jnp.abs(a))) / gamma
  negative = jnp.maximum(x - shift, 0) + _math.log1p_of_unit(jnp.exp(-jnp.abs(b))) / gamma
  return a, b, positive, negative


def _mix(y: jax.Array, positive: jax.Array, negative: jax.Array) -> jax.Array:
  # A target without mass on a side adds 0 there, even where that side is +inf.
  return (jnp.where(y == 0, 0, y * positive)
          + jnp.where(y == 1, 0, (1 - y) * negative))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def focal_star_term(x: jax.Array, y: jax.Array, beta: jax.Array, gamma: float) -> jax.Array:
  """``y softplus(-(gamma x + beta)) / gamma + (1 - y) softplus(gamma x - beta) / gamma``."""
  _, _, positive, negative = _parts(x, beta, gamma)
  return _mix(y, positive, negative)


@functools.partial(focal_star_term.defjvp, symbolic_zeros=True)
def _focal_star_term_jvp(gamma, primals, tangents):
  x, y, beta = primals
  x_dot, y_dot, beta_dot = tangents
  value = focal_star_term.fun(x, y, beta, gamma)
  x = _math.derivative_logits(x)
  a, b, positive, negative = _parts(x, beta, gamma)
  pull_up = y * jax.nn.sigmoid(-a)            # from the positive side
  push_down = (1 - y) * jax.nn.sigmoid(b)     # from the negative side
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    tangent = tangent + (push_down - pull_up) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    tangent = tangent + (positive - negative) * y_dot
  if not isinstance(beta_dot, SymbolicZero):
    tangent = tangent - (pull_up + push_down) / gamma * beta_dot
  return value, tangent


@_common.one_program("gamma", "ignore_index", "label_smoothing", "reduction", "axis_name")
def _focal_star_loss(logits: Any, labels: Any, *, alpha: Any, gamma: Any, beta: Any,
                     weights: Any, where: Any, ignore_index: Any, label_smoothing: Any,
                     reduction: Any, normalizer: Any, axis_name: Any) -> jax.Array:
  inputs = _sigmoid.sigmoid_inputs(
      logits, labels, gamma=gamma, weights=weights, where=where, ignore_index=ignore_index,
      label_smoothing=label_smoothing, reduction=reduction, normalizer=normalizer)
  beta = beta.astype(inputs.dtype)
  loss = focal_star_term(inputs.x, inputs.y, beta, inputs.gamma)
  alpha_t = _sigmoid.alpha_t(alpha, inputs)
  if alpha_t is not None:
    loss = _common.scale(loss, alpha_t)
  return _sigmoid.sigmoid_reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                                 axis_name=axis_name)


@_common.document_loss(
    "FL*, the focal-loss alternative of Lin et al.'s appendix, on sigmoid logits.",
    r"""
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
""",
    _sigmoid._SHAPES + _sigmoid._ALPHA + """
    gamma: steepness, a static Python number > 0 (default 1).
    beta: shift, a finite number or scalar array (default 0); may be traced,
      and the loss is differentiable in it.""",
    """    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> print(jfocal.sigmoid_focal_loss_star(logits, class_ids, gamma=2.0, beta=1.0))
    [[0.0008 0.0182 0.2599]
     [0.0003 0.1175 2.6253]]""",
    references="""    Lin et al., appendix A of the paper above (FL*).
""")
def sigmoid_focal_loss_star(logits: Any, labels: Any, *, alpha: Any = 0.25, gamma: float = 1.0,
                            beta: Any = 0.0, weights: Any = None, where: Any = None,
                            ignore_index: int | None = None, label_smoothing: float = 0.0,
                            reduction: str = "none", normalizer: Any = None,
                            axis_name: Any = None) -> jax.Array:
  gamma = _validation.static_number(gamma, "gamma", minimum=0.0)
  if gamma == 0.0:
    raise ValueError("gamma of FL* must be > 0 (the loss divides by it); got 0.0. "
                     "gamma = 1 with beta = 0 is the cross-entropy")
  beta = _validation.check_scalar_parameter(beta, "beta")
  return _focal_star_loss(logits, labels, alpha=alpha, gamma=gamma, beta=beta, weights=weights,
                          where=where, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction,
                          normalizer=normalizer, axis_name=axis_name)
