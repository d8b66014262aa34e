"""Numerical building blocks of the elementwise cores.

Hyper-parameters such as ``gamma`` come in two forms. A Python number is
*static*: it specialises the compiled program (``gamma = 2`` becomes one
multiplication, ``gamma = 1.5`` a multiplication and a square root,
``gamma = 0`` removes the modulating factor). An array or a
tracer is *traced*: one program serves every value, it can be a `jax.jit`
argument, be vmapped over, and be differentiated. A core takes both as
``(array, static)``: `split` makes the pair, `pick` reads it, and a derivative
rule gets a tangent for the array only when it is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jfocal.engine.types import Parameter

# Integer gamma (2 is the paper's default) becomes repeated multiplication, and
# k + 1/2 (1.5 is YOLO's) a square root as well; beyond this exponent the
# exp/log form is as cheap and just as exact.
_MAX_INTEGER_POWER = 64


def split(value: Parameter, dtype: jnp.dtype) -> tuple[jax.Array, float | None]:
  """``(array, static)``: the value as an array of ``dtype``, and as a Python float when static."""
  if isinstance(value, jax.Array):
    return value.astype(dtype), None
  return jnp.asarray(value, dtype), float(value)


def pick(array: jax.Array, static: float | None) -> Parameter:
  """The static Python float where there is one, else the traced array."""
  return array if static is None else static


def is_static_zero(value: Parameter) -> bool:
  return isinstance(value, float) and value == 0.0


def integer_exponent(value: Parameter) -> int | None:
  """A static, positive, small integer exponent, or None."""
  if isinstance(value, float) and value.is_integer() and 0 < value <= _MAX_INTEGER_POWER:
    return int(value)
  return None


def half_integer_exponent(value: Parameter) -> int | None:
  """``k`` of a static exponent ``k + 1/2`` with ``k >= 1`` (1.5, 2.5, ...), or None."""
  if (isinstance(value, float) and not value.is_integer() and (2 * value).is_integer()
      and 1 < value <= _MAX_INTEGER_POWER):
    return int(value)
  return None


def is_algebraic(value: Parameter) -> bool:
  """Whether `power` takes no logarithm: a static exponent that is an integer or ``k + 1/2``."""
  return integer_exponent(value) is not None or half_integer_exponent(value) is not None


def half_power(base: jax.Array, k: int) -> jax.Array:
  """``base**(k + 1/2)`` for ``base >= 0`` and an integer ``k >= 0``: ``base**k sqrt(base)``.

  The select keeps the square root's infinite slope at 0 out of the derivatives.
  """
  positive = base > 0
  safe = jnp.where(positive, base, 1)
  return jnp.where(positive, lax.integer_pow(safe, k) * jnp.sqrt(safe), 0)


def power(base: jax.Array, exponent: Parameter, log_base: jax.Array | None = None) -> jax.Array:
  """``base ** exponent`` for ``base`` in [0, 1] and ``exponent >= 0``, with finite derivatives.

  ``jnp.power`` differentiates to ``exponent * base ** (exponent - 1)``, which
  is ``inf * 0 = nan`` at ``base = 0`` for ``exponent < 1`` (and ``0 * log 0`` at
  ``exponent = 0``). Here a static integer exponent is a multiplication, a
  static ``k + 1/2`` (``k >= 1``) is ``base**k sqrt(base)``, and any other
  exponent goes through a logarithm: ``log_base`` when the caller
  has it exactly (also where ``base`` underflows), or a guarded ``log``. Where
  the logarithm is ``-inf`` (``base = 0``) the result is its limit, 0 (1 for
  a zero exponent), a constant whose derivatives are 0: the tangent of
  ``base`` vanishes at least as fast there in every core.
  """
  if is_static_zero(exponent):
    return jnp.ones_like(base)
  integer = integer_exponent(exponent)
  if integer is not None:
    return lax.integer_pow(base, integer)
  half = half_integer_exponent(exponent)
  if half is not None:
    # One square root in place of an exp and a log, and two roundings where
    # exp(exponent log base) errs by |exponent log base| ulps. With exponent > 1
    # the power is below base, so it underflows wherever base does and needs no
    # log_base.
    return half_power(base, half)
  static = isinstance(exponent, float)
  if log_base is None:
    positive = base > 0
    safe_log = jnp.log(jnp.where(positive, base, 1))
    if static:
      return jnp.where(positive, jnp.exp(exponent * safe_log), 0)
    vanishes = ~positive
  elif static:
    return jnp.exp(exponent * log_base)  # exp(-inf) = 0, with derivative 0
  else:
    vanishes = log_base == -jnp.inf
    safe_log = jnp.where(vanishes, 0, log_base)
  # A traced exponent may be 0, where 0 * log 0 would be NaN: there the limit is 1.
  return jnp.where(vanishes, jnp.where(exponent == 0, 1.0, 0.0), jnp.exp(exponent * safe_log))


def times_log(value: jax.Array, log_base: jax.Array) -> jax.Array:
  """``value * log_base``, 0 where ``log_base`` is ``-inf``: d(b**g)/dg = b**g log b at b = 0.

  The limit for an exponent > 0, and the value every core needs there, where
  ``value`` (the loss or its modulating factor) vanishes.
  """
  vanishes = log_base == -jnp.inf
  return jnp.where(vanishes, 0, value * jnp.where(vanishes, 0, log_base))


def zero_removes(weight: jax.Array, value: jax.Array) -> jax.Array:
  """``weight * value``, 0 where the weight is 0 even if the value is +inf; NaN stays NaN.

  Zero weight removes an entry (0 * inf would be NaN), but never hides bad
  input: a NaN value (a NaN logit) stays NaN.
  """
  removed = (weight == 0) & ~jnp.isnan(value)
  return jnp.where(removed, jnp.zeros((), value.dtype), weight * value)


def vectorising(operand: jax.Array, never: jax.Array) -> jax.Array:
  """``operand`` of a transcendental, through a select against a broadcast 0 on ``never``.

  ``never`` is a predicate that never holds, so no value changes. XLA on the
  CPU (jaxlib 0.10) compiles a loop fusion that holds no broadcast with its
  newer emitter, which writes scalar code, and a transcendental whose result
  has several users gets a loop of its own: without a broadcast there it ran
  4-7x slower (log1p over the rows took 0.9-1.1 ms of the softmax focal
  loss's 7 ms value-and-grad at 4M logits and C = 16, 0.1-0.3 ms vectorised).
  A select on the operand, used by the transcendental alone, is fused into its
  loop; one on the result would be copied into each user instead.
  ``tests/test_memory.py`` guards the rule for every loss.
  """
  return jnp.where(never, jnp.zeros((), operand.dtype), operand)


def _reduce_precision_to_own(x: jax.Array) -> jax.Array:
  info = jnp.finfo(x.dtype)
  return lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def fence(x: jax.Array) -> jax.Array:
  """The identity, as an XLA op that CPU fusion treats as a boundary.

  XLA on the CPU (a) shares every expensive intermediate (exp, log1p, divide)
  between the loss and its gradient by writing it to memory, and (b) hands a
  sum over a long elementwise chain to a reduction kernel that runs it several
  times slower than a plain loop. A ``reduce_precision`` to the array's own
  precision changes no bit, survives XLA's simplifier, and is neither merged
  by common-subexpression elimination nor pulled into that reduction: the
  loss and the gradient become two single-pass loops and the sum reads one
  materialised array.

  The choice is made per platform inside the program
  (`jax.lax.platform_dependent`): a program lowered for one platform keeps
  only that platform's branch, and one exported for several
  (``jax.export(..., platforms=["cpu", "cuda"])``) fences on the CPU only.
  Other backends fuse well on their own and get ``x`` as is.
  """
  return lax.platform_dependent(x, cpu=_reduce_precision_to_own, default=lambda x: x)


def reads(value: jax.Array, derivative: jax.Array) -> jax.Array:
  """``derivative``, NaN where ``value`` (the loss) is NaN, as it already is there.

  A gradient loop that reads the loss lets XLA write the gradient over the
  materialised loss in place: value-and-grad of the summed loss then holds no
  logits-sized temporary (`value` must be the unfenced loss, so that it stays
  one materialised array instead of being recomputed in each of its users).
  """
  return jnp.where(jnp.isnan(value), value, derivative)


def _divide_by_exact_one(value: jax.Array, finite: jax.Array) -> jax.Array:
  return value / (1 + 0 * finite)


def materialised(value: jax.Array, finite: jax.Array) -> jax.Array:
  """``value``, ending (on the CPU) in a division by an exact 1 that XLA cannot fold.

  XLA on the CPU recomputes a fusion that ends in a cheap op (a multiply by
  the weights, an add) inside each of its users, and then writes the
  expensive intermediates it shares (exp, log1p, 1/(1+e)) to memory: with a
  per-row weight or class-id labels, value-and-grad of such a loss keeps
  three logits-sized temporaries. A fusion ending in a division is
  materialised once, and `reads` then writes the gradient over it in place.
  ``finite`` is any finite array of the value's shape (``0 * inf`` would be
  NaN): ``1 + 0 * finite`` is exactly 1, so no bit changes. Other backends
  get ``value`` as is (see `fence`).
  """
  return lax.platform_dependent(value, finite, cpu=_divide_by_exact_one,
                                default=lambda value, _: value)


def derivative_logits(x: jax.Array) -> jax.Array:
  """Logits as a derivative rule reads them: clipped to the finite range, then fenced.

  Clipping infinite logits to the largest float gives the limits of the
  derivatives (every term that should vanish underflows to 0) without
  ``inf * 0``; the fence makes the rule recompute its intermediates instead of
  sharing them with the value, so that the value and the derivative are two
  single-pass loops on the CPU (see `fence`).
  """
  big = jnp.finfo(x.dtype).max
  return fence(jnp.clip(x, -big, big))


def _goldberg_log1p(e: jax.Array) -> jax.Array:
  # Goldberg's identity log1p(e) = log(u) * e / (u - 1) with u = 1 + e rounded:
  # the rounding of u cancels between log(u) and u - 1. The fence keeps XLA
  # from simplifying (1 + e) - 1 back to e, which would void that cancellation.
  u = _reduce_precision_to_own(1 + e)
  u_minus_one = u - 1
  rounds_to_one = u_minus_one == 0
  return jnp.where(rounds_to_one, e,
                   jnp.log(u) * (e / jnp.where(rounds_to_one, 1, u_minus_one)))


def log1p_of_unit(e: jax.Array) -> jax.Array:
  """``log1p(e)`` for ``e`` in [0, 1]: exact to a few ulps, about 1.5x faster than XLA's on the CPU.

  The CPU gets Goldberg's ``log(u) * e / (u - 1)``; other platforms keep
  ``jnp.log1p`` (chosen per platform inside the program, as `fence`).
  """
  return lax.platform_dependent(e, cpu=_goldberg_log1p, default=jnp.log1p)
