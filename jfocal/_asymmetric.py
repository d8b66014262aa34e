r"""Asymmetric loss (ASL; Ridnik et al., ICCV 2021) for multi-label classification.

With ``p = sigma(x)``, ``q = 1 - p = sigma(-x)``, a clip ``c`` in [0, 1], the
shifted probability of the negatives ``p_m = max(p - c, 0)`` and targets ``y``
in [0, 1],

    m    = 1 - p_t = y q + (1 - y) p_m,        g = gamma_pos y + gamma_neg (1 - y),
    CE_a = y A + (1 - y) B,   A = -log p = softplus(-x),   B = -log(1 - p_m),
    ASL  = m**g CE_a,

so a positive costs ``q**gamma_pos (-log p)`` and a negative
``p_m**gamma_neg (-log(1 - p_m))``, exactly 0 where ``p <= c``. ``A`` is
exact at every logit. ``B`` takes one logarithm: ``-log(u)`` of ``u = q + c``
(``1 - p_m`` in ``R``, rounded once from the exact ``q``) for ``p_m > 1/2``
(``softplus(x)`` for ``c = 0``, where ``q`` underflows), and Goldberg's
``-log(u) p_m / (1 - u)`` below, exact as ``p_m -> 0`` at the clip. With
``s = p``, the region ``R = [p > c]`` and ``r = CE_a / m``, the derivatives are

    dm/dx    = s q ((1 - y) R - y),              dm/dy = q - p_m,
    dCE_a/dx = -y q + (1 - y) R s q / (q + c),   dCE_a/dy = A - B,
    d/dx     = m**g (dCE_a/dx + g r dm/dx),
    d/dy     = m**g (dCE_a/dy + g r dm/dy + (gamma_pos - gamma_neg) CE_a log m),
    d/dgamma_pos = m**g log m y CE_a,            d/dgamma_neg = m**g log m (1 - y) CE_a,
    d/dc     = -(1 - y) R m**g (1 / (q + c) + g r).

The ratio ``r`` is bounded: outside ``R`` and for ``y = 1`` it is ``A / q``
(``m = y q``, ``CE_a = y A`` there), for ``y = 0`` it is ``B / p_m``; both are
``-log(1 - t) / t`` of a ``t`` in [0, 1] whose ``-log(1 - t)`` is known exactly,
which tends to 1 as ``t -> 0`` and is taken from its series there. With
``detach_focusing`` the weight ``m**g`` is a constant of every derivative, as
in the reference code's ``disable_torch_grad_focal_loss``.

At the clip (``p = c``) the negative's loss starts as ``p_m**(gamma_neg + 1)``:
for ``gamma_neg = 0`` its gradient jumps there (a kink), and for
``0 < gamma_neg < 1`` its second derivative in ``x`` is unbounded near it (a
cusp, as the loss itself is), although finite at every representable logit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, sigmoid
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction

# Below this t the series of -log(1 - t) / t is used: its first omitted term is
# below 2e-16 there, and above it the direct ratio divides by at least 1e-3.
_SERIES_RADIUS = 1e-3


def _ratio(t: jax.Array, numerator: jax.Array, series: jax.Array) -> jax.Array:
  """``numerator / t``; where ``series`` holds, ``numerator = -log(1 - t)`` exactly and the
  ratio (1 at ``t = 0``) is taken from its series below `_SERIES_RADIUS`. One division
  for every case of `asymmetric_term`'s ratio."""
  near = series & (t < _SERIES_RADIUS)
  s = jnp.where(near, t, 0)
  expansion = 1 + s * (1 / 2 + s * (1 / 3 + s * (1 / 4 + s / 5)))
  return jnp.where(near, expansion, numerator / jnp.where(near, 1, t))


class _Shifted(NamedTuple):
  """ASL's quantities at a logit ``x``, a target ``y`` and a clip ``c`` (module docstring)."""
  p: jax.Array            # sigma(x)
  q: jax.Array            # sigma(-x)
  a: jax.Array            # -log p
  b: jax.Array            # -log(1 - p_m)
  p_m: jax.Array          # max(p - c, 0); NaN for a NaN logit
  u: jax.Array            # q + c, rounded: 1 - p_m in R
  shifted: jax.Array      # p > c: the negative's loss is not 0
  m: jax.Array            # 1 - p_t
  log_m: jax.Array        # log m, exact where y = 1 (where q may underflow)
  ce: jax.Array           # y A + (1 - y) B


def _shifted(x: jax.Array, y: jax.Array, clip: Parameter) -> _Shifted:
  # The folded frame's exact sigmoids and softplus; ASL's own p_m sits next to them.
  f = sigmoid.folded(x, y)
  p, q, a = f.p, f.one_minus_p, f.neg_log_p
  p_m = jnp.maximum(p - clip, 0)  # keeps a NaN
  # Goldberg's -log(u) p_m / (1 - u) keeps the relative precision of a small p_m:
  # log(u) / (u - 1) varies slowly and is evaluated at the u it was rounded to. One log
  # where log1p(-p_m) and log(q + c), both evaluated by the select, took two (21% of
  # the value-and-grad); where u rounds to 1, -log(1 - p_m) is p_m to the last bit.
  u = q + clip
  near = p_m <= 0.5
  goldberg = near & (u < 1)
  scale = jnp.where(goldberg, p_m / jnp.where(goldberg, 1 - u, 1), 1)
  safe_u = jnp.where(near | (clip > 0), u, 1)
  b = jnp.where(near & ~goldberg, p_m,
                jnp.where(near | (clip > 0), -jnp.log(safe_u) * scale, f.neg_log_one_minus_p))
  m = y * q + (1 - y) * p_m
  positive = m > 0
  log_m = jnp.where(y == 1, -f.neg_log_one_minus_p,
                    jnp.where(positive, jnp.log(jnp.where(positive, m, 1)), -jnp.inf))
  return _Shifted(p, q, a, b, p_m, u, p_m > 0, m, log_m, sigmoid.mix(y, a, b))


def _exponent(y: jax.Array, gamma_pos: Parameter, gamma_neg: Parameter) -> Parameter:
  """``gamma_pos y + gamma_neg (1 - y)``: a static number where both are the same number."""
  if isinstance(gamma_pos, float) and isinstance(gamma_neg, float) and gamma_pos == gamma_neg:
    return gamma_pos
  return gamma_pos * y + gamma_neg * (1 - y)


def _weight(a: _Shifted, y: jax.Array, gamma_pos: Parameter, gamma_neg: Parameter,
            hard: bool) -> jax.Array:
  """``m**g``, with the exponent of `_exponent`.

  For gammas that are static integers or ``k + 1/2``, a 0/1 target's ``m`` is ``q``
  or ``p_m`` and each side takes its own power without ``log m`` and ``exp``: with
  ``hard`` targets (all 0/1) that saves two of the five transcendentals of each pass,
  and float targets take the same powers where they are 0 or 1, so that their bits
  are those of class ids. (Any other gamma takes the logarithm anyway, and two such
  powers would take two ``exp``.)
  """
  g = _exponent(y, gamma_pos, gamma_neg)
  if isinstance(g, float) or not all(numerics.is_static_zero(gamma) or numerics.is_algebraic(gamma)
                                     for gamma in (gamma_pos, gamma_neg)):
    return numerics.power(a.m, g, a.log_m)
  sides = jnp.where(y == 1, numerics.power(a.m, gamma_pos, a.log_m),
                    numerics.power(a.m, gamma_neg, a.log_m))
  if hard:
    return sides
  # A soft target's log m is log(m) (only y = 1 needs softplus, for an underflowing q),
  # so the derivative pass, which reads the loss for CE_a, needs no log1p.
  positive = a.m > 0
  log_m = jnp.where(positive, jnp.log(jnp.where(positive, a.m, 1)), -jnp.inf)
  return jnp.where((y == 0) | (y == 1), sides, numerics.power(a.m, g, log_m))


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def asymmetric_term(x: jax.Array, y: jax.Array, factor: jax.Array, gamma_pos: jax.Array,
                    gamma_neg: jax.Array, clip: jax.Array, static_gamma_pos: float | None,
                    static_gamma_neg: float | None, static_clip: float | None,
                    detach_focusing: bool, hard: bool, summed: bool) -> jax.Array:
  """``factor m**g CE_a`` elementwise (see the module docstring), fenced.

  The hyper-parameters are the arrays of `jfocal.engine.numerics.split` and
  their static values (or None); ``detach_focusing`` only changes the derivatives;
  ``hard`` says that every target is 0 or 1 (`jfocal.engine.sigmoid.SigmoidInputs`),
  ``summed`` that the value's only other reader is its sum (`jfocal.engine.sigmoid.summed`).
  """
  return numerics.fence(_value(x, y, factor, numerics.pick(gamma_pos, static_gamma_pos),
                               numerics.pick(gamma_neg, static_gamma_neg),
                               numerics.pick(clip, static_clip), hard))


def _value(x: jax.Array, y: jax.Array, factor: jax.Array, gamma_pos: Parameter,
           gamma_neg: Parameter, clip: Parameter, hard: bool) -> jax.Array:
  a = _shifted(x, y, clip)
  return factor * _weight(a, y, gamma_pos, gamma_neg, hard) * a.ce


@functools.partial(asymmetric_term.defjvp, symbolic_zeros=True)
def _asymmetric_term_jvp(static_gamma_pos, static_gamma_neg, static_clip, detach_focusing,
                         hard, summed, primals, tangents):
  x, y, factor, gamma_pos_array, gamma_neg_array, clip_array = primals
  x_dot, y_dot, factor_dot, gamma_pos_dot, gamma_neg_dot, clip_dot = tangents
  gamma_pos = numerics.pick(gamma_pos_array, static_gamma_pos)
  gamma_neg = numerics.pick(gamma_neg_array, static_gamma_neg)
  clip = numerics.pick(clip_array, static_clip)
  value = _value(x, y, factor, gamma_pos, gamma_neg, clip, hard)
  # Recomputed from fenced inputs rather than shared with the value (see numerics.fence).
  y = numerics.fence(y)
  a = _shifted(numerics.derivative_logits(x), y, clip)
  g = _exponent(y, gamma_pos, gamma_neg)
  weight = _weight(a, y, gamma_pos, gamma_neg, hard)
  if detach_focusing:  # a constant of the derivatives of every order
    weight = jax.lax.stop_gradient(weight)
  focusing = not detach_focusing and not (numerics.is_static_zero(gamma_pos)
                                          and numerics.is_static_zero(gamma_neg))
  ratio: jax.Array | float = 0.0  # read only where focusing
  if focusing:
    # A / q outside R and for y = 1, B / p_m for y = 0, CE_a / m for soft targets.
    first = ~a.shifted | (y == 1)
    ratio = _ratio(jnp.where(first, a.q, jnp.where(y == 0, a.p_m, jnp.where(a.m > 0, a.m, 1))),
                   jnp.where(first, a.a, jnp.where(y == 0, a.b, a.ce)), first | (y == 0))
  tangent = jnp.zeros_like(value)
  if not isinstance(x_dot, SymbolicZero):
    pq = a.p * a.q
    # q / (q + c), 1 for c = 0 where q may underflow.
    kept = jnp.where(clip > 0, a.q / jnp.where(clip > 0, a.u, 1), 1)
    d_dx = -y * a.q + jnp.where(a.shifted, (1 - y) * a.p * kept, 0)
    dm_dx = pq * (jnp.where(a.shifted, 1 - y, 0) - y)
    if focusing and summed:
      # factor m**g g r dm/dx = g (value / m) dm/dx: the loss, whose only other reader is
      # its sum, in place of A's and B's logarithms. value / m = factor m**g r is
      # bounded; where p q underflows the value may be inf (a clipped infinite logit).
      # (Not where dm/dx is 0: at y = 1/2 and p = 1/2 it is, but not its y-derivative.)
      positive = a.m > 0
      over_m = jnp.where(positive, value / jnp.where(positive, a.m, 1), 0)
      d_x = factor * weight * d_dx + g * jnp.where(pq == 0, 0, over_m * dm_dx)
    else:
      if focusing:
        # ratio (up to |x|) times d m/dx (down to |x| e^-|x|) first: bounded at every logit.
        d_dx = d_dx + g * (ratio * dm_dx)
      d_x = factor * weight * d_dx
    tangent = tangent + numerics.reads(value, d_x) * x_dot
  if not isinstance(y_dot, SymbolicZero):
    d_dy = a.a - a.b
    if focusing:
      d_dy = d_dy + g * (ratio * (a.q - a.p_m))
      if not isinstance(g, float):
        d_dy = d_dy + (gamma_pos - gamma_neg) * numerics.times_log(a.ce, a.log_m)
    # A zero weight (m = 0, where the loss vanishes with all its y-derivatives) removes
    # a d/dy that overflowed at the largest logits.
    tangent = tangent + factor * numerics.zero_removes(weight, d_dy) * y_dot
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + weight * a.ce * factor_dot
  if not detach_focusing:
    d_dgamma = factor * numerics.times_log(weight, a.log_m) * a.ce
    if not isinstance(gamma_pos_dot, SymbolicZero):
      tangent = tangent + d_dgamma * y * gamma_pos_dot
    if not isinstance(gamma_neg_dot, SymbolicZero):
      tangent = tangent + d_dgamma * (1 - y) * gamma_neg_dot
  if not isinstance(clip_dot, SymbolicZero):
    # dB/dc = 1 / (1 - p_m) = 1 / (q + c) in R.
    active = a.shifted & (y < 1)
    d_dc = 1 / jnp.where(active, a.u, 1) + (g * ratio if focusing else 0)
    tangent = tangent - factor * weight * jnp.where(active, (1 - y) * d_dc, 0) * clip_dot
  return value, tangent


@program(family="sigmoid", specialising=("gamma_pos", "gamma_neg", "clip"),
         static=("detach_focusing",),
         bounds={"gamma_pos": checks.NON_NEGATIVE, "gamma_neg": checks.NON_NEGATIVE,
                 "clip": checks.UNIT, "pos_weight": checks.POSITIVE})
def asymmetric_loss(logits: ArrayLike, labels: ArrayLike, *, gamma_pos: Parameter = 1.0,
                    gamma_neg: Parameter = 4.0, clip: Parameter = 0.05,
                    detach_focusing: bool = False, pos_weight: ArrayLike | None = None,
                    weights: ArrayLike | None = None, where: ArrayLike | None = None,
                    ignore_index: int | None = None, label_smoothing: float = 0.0,
                    reduction: Reduction = "none", normalizer: Normalizer = None,
                    axis_name: AxisName = None) -> jax.Array:
  r"""Asymmetric loss (ASL) for multi-label classification, on sigmoid logits.

  With :math:`p = \sigma(x)`, the shifted probability of the negatives
  :math:`p_m = \max(p - c, 0)` (``c`` is ``clip``), targets :math:`y \in [0, 1]`,
  :math:`p_t = y p + (1 - y)(1 - p_m)` and the exponent
  :math:`\gamma_y = \gamma_+ y + \gamma_- (1 - y)`, the loss of each element is

  .. math::
    \mathrm{ASL}(x, y) = -(1 - p_t)^{\gamma_y}
      \left[y \log p + (1 - y) \log(1 - p_m)\right],

  which is :math:`-(1 - p)^{\gamma_+} \log p` for a positive and
  :math:`-p_m^{\gamma_-} \log(1 - p_m)` for a negative: easy negatives are
  down-weighted by the larger :math:`\gamma_-` and those with :math:`p \le c`
  are discarded (the probability shift), which also rejects mislabelled
  negatives with a large :math:`p`. The soft-target form and the defaults
  are those of the authors' code and of timm's ``AsymmetricLossMultiLabel``
  (which sum the loss; here it is unreduced by default). ``gamma_pos =
  gamma_neg = gamma, clip = 0`` is the focal loss without ``alpha``, and all
  three 0 the cross-entropy. Loss, gradient and Hessian are finite at every
  finite logit; unlike the reference code, no ``eps`` clamps the logarithms,
  so the loss of a confident mistake keeps growing.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN),
      or dense float, bool or integer 0/1 targets with the shape of ``logits``
      (the multi-label case).
    gamma_pos: focusing parameter of the positives, >= 0 (default 1).
    gamma_neg: focusing parameter of the negatives, >= 0 (default 4). A
      Python number specialises the program; an array is traced (a
      ``jax.jit`` argument, vmappable, differentiable), for both gammas.
    clip: the probability margin ``c`` in [0, 1] (default 0.05) by which the
      negatives' probabilities are shifted; 0 turns the shift off. A number
      or a traced scalar array, differentiable.
    detach_focusing: if True, the weight :math:`(1 - p_t)^{\gamma_y}` is a
      constant of the derivatives (the reference code's
      ``disable_torch_grad_focal_loss``); by default the derivatives are exact.
    pos_weight: weight ``w > 0`` of the positive term, a number or a vector of
      shape ``(C,)``: a target ``y`` becomes ``w y / (w y + 1 - y)`` with the
      weight ``w y + 1 - y``. None is 1.
    weights: per-element weights broadcastable to the unreduced loss.
    where: boolean mask broadcastable to the unreduced loss; masked entries
      are 0 with zero gradient and leave the mean.
    ignore_index: integer labels equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / 2``.
    reduction: ``"none"`` (default), ``"sum"`` (the reference code's
      reduction, without its minus sign) or ``"mean"``.
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
    >>> logits = jnp.array([[2.0, -1.0, -4.0], [-3.0, 0.0, 4.0]])
    >>> targets = jnp.array([[1, 0, 0], [0, 1, 1]])  # multi-label 0/1 targets
    >>> print(jfocal.asymmetric_loss(logits, targets))
    [[0.0151 0.0006 0.    ]
     [0.     0.3466 0.0003]]

  References:
    Ridnik et al., `Asymmetric Loss For Multi-Label Classification
    <https://arxiv.org/abs/2009.14119>`_, ICCV 2021.
  """
  inputs = sigmoid.prepare(logits, labels, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing,
                           pos_weight=pos_weight)
  x, factor = sigmoid.fold(inputs)
  parameters = [numerics.split(checks.parameter(value, name), inputs.dtype)
                for name, value in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg),
                                    ("clip", clip))]
  arrays, statics = zip(*parameters, strict=True)
  value = asymmetric_term(x, inputs.y, factor, *arrays, *statics, bool(detach_focusing),
                          inputs.hard, sigmoid.summed(reduction))
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)
