r"""The large-vocabulary engine: a linear layer and a softmax loss, streamed over vocabulary blocks.

A softmax loss of ``x = f W + b`` needs only a few numbers per token: the
log-normaliser ``lse = log sum_c exp(x_c)``, the target's negative
log-probability ``n_t = lse - x_t``, and, for label smoothing, the sums
``sum_c a_c T(n_c)`` and ``sum_c a_c T'(n_c)`` of the per-class term ``T``
(``T(n) = n`` for cross-entropy, the focal term for focal loss). `loss`
computes them in passes over blocks of ``block`` vocabulary columns: each
pass multiplies the features by one block of the kernel, uses that
``[tokens, block]`` block of logits and drops it, so no ``[tokens, V]`` array
ever exists.

- Forward, pass 1: an online log-sum-exp (running maximum ``M`` and the sum
  of ``exp(x_c - M)`` over the classes *other than the target*), so that
  ``n_t = log1p(rest + expm1(x_t - M)) - (x_t - M)`` keeps its relative
  precision as ``p_t -> 1``, exactly as `jfocal.engine.softmax`; for a term
  linear in ``n`` (cross-entropy) also ``sum_c a_c (M - x_c)``, whose terms are
  all >= 0 (no cancellation), which gives label smoothing's sum in the same
  pass, and the target's logit, picked from its block.
- Forward, pass 2 (label smoothing of a non-linear term only): the two sums
  of ``T`` and ``T'`` over the classes, now that ``lse`` is known.
- Backward (`jax.custom_vjp`): from the O(tokens) residuals, one more pass
  recomputes each block of logits and its gradient
  ``dL/dx_j = p_j K - dL/dn_j`` (``K`` the sum of all ``dL/dn_c`` plus the
  z-loss's ``2 z lse``; at the target, ``p_t - 1 = expm1(-n_t)`` exactly),
  and accumulates ``df = dx W^T``, writes ``dW = f^T dx`` and ``db`` block by
  block. ``T'`` and the derivatives with respect to traced hyper-parameters
  come from the elementwise core's own derivative rule (``jax.vjp`` of the
  term), so a loss brings no derivative code of its own.

A vocabulary that is not a multiple of the block is covered by clamping the
last block's start to ``V - block``; its columns already seen are masked.

With ``vocab_axis_name`` the kernel (and the bias and ``alpha``) hold this
device's share of the vocabulary inside ``shard_map``: the per-token
statistics are combined across devices (``pmax`` of the maxima, ``psum`` of
the rescaled sums and of the target logit, which one device holds), and every
device's gradient is exact for its columns. Inputs that do not vary over an
axis that others vary over are cast with `jax.lax.pvary` before the
`custom_vjp`, so that JAX's own transpose of that cast sums their gradients
over the devices (the features' over the vocabulary axis, the kernel's over a
data-parallel axis).

Forward-mode differentiation (``jax.jvp``, ``jax.hessian``, ``jax.linearize``)
is not defined: the materialised ``softmax_*`` losses of ``f @ W + b`` have it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jfocal.engine import reduce as reducing
from jfocal.engine.types import AxisName

# A term T(n, params) of the negative log-probability, elementwise, with a derivative rule.
Term = Callable[[jax.Array, jax.Array], jax.Array]

FORWARD_MODE = ("{name} streams the vocabulary under jax.custom_vjp and has reverse-mode "
                "derivatives only (jax.grad, jax.vjp), not the forward mode of jax.jvp, "
                "jax.jacfwd, jax.hessian or jax.linearize. For those, materialise "
                "the logits: "
                "jfocal.{materialised}(features @ kernel + bias, labels, ...), which has exact "
                "derivatives of every order")


class Config(NamedTuple):
  """The static part of a streamed loss (hashable: it keys the `custom_vjp`)."""
  term: Term
  linear: bool                  # term(n) = n: label smoothing's sum comes from pass 1
  traced: bool                  # the term's parameters are traced (differentiated)
  label_smoothing: float
  block: int
  vocab_axis_name: AxisName
  name: str                     # the public function, for error messages
  materialised: str


class Operands(NamedTuple):
  """The differentiable inputs of the streamed loss (None where absent)."""
  features: jax.Array           # [N, d], zero in masked rows
  kernel: jax.Array             # [d, V_local]
  bias: jax.Array | None        # [V_local]
  alpha: jax.Array | None       # [V_local], per-class weights
  params: jax.Array             # the term's traced hyper-parameters (a scalar, may be unused)
  z_loss: jax.Array             # scalar


class Residuals(NamedTuple):
  lse: jax.Array                # [N]
  nll: jax.Array                # n_t, [N]
  value: jax.Array              # T(n_t), [N]
  slope: jax.Array              # T'(n_t), [N]
  target_weight: jax.Array      # alpha_t (1 without alpha), [N]
  spread_slope: jax.Array       # sum_c a_c T'(n_c), [N] (0 without label smoothing)


def _shards(config: Config) -> tuple[Any, int]:
  """(this device's index, number of devices) along the vocabulary axis."""
  if config.vocab_axis_name is None:
    return 0, 1
  return lax.axis_index(config.vocab_axis_name), lax.axis_size(config.vocab_axis_name)


def _varying(value: jax.Array) -> frozenset[str]:
  return jax.typeof(value).manual_axis_type.varying


def _sum_to(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """``cotangent`` summed over the mapped axes it varies over and ``primal`` does not."""
  extra = tuple(sorted(_varying(cotangent) - _varying(primal)))
  return lax.psum(cotangent, extra) if extra else cotangent


def _psum(value: jax.Array, config: Config) -> jax.Array:
  return value if config.vocab_axis_name is None else lax.psum(value, config.vocab_axis_name)


def _blocks(local_vocab: int, block: int) -> tuple[int, int]:
  """(number of blocks, block size): a block never exceeds the vocabulary."""
  size = min(block, local_vocab)
  return math.ceil(local_vocab / size), size


class _Block(NamedTuple):
  x: jax.Array          # [N, size] logits in the compute dtype
  kernel: jax.Array     # [d, size]
  start: jax.Array      # first column
  fresh: jax.Array      # [size]: columns this block is the first to cover
  column: jax.Array     # [1, size]: local column indices


def _block(ops: Operands, i: jax.Array, size: int, dtype: Any) -> _Block:
  local_vocab = ops.kernel.shape[1]
  start = jnp.minimum(i * size, local_vocab - size)
  kernel = lax.dynamic_slice_in_dim(ops.kernel, start, size, axis=1)
  x = jnp.dot(ops.features, kernel, preferred_element_type=dtype)
  if ops.bias is not None:
    x = x + lax.dynamic_slice_in_dim(ops.bias, start, size).astype(dtype)
  column = start + lax.iota(jnp.int32, size)
  return _Block(x, kernel, start, column >= i * size, column[None, :])


def _block_alpha(ops: Operands, block: _Block, dtype: Any) -> Any:
  if ops.alpha is None:
    return jnp.ones((), dtype)
  return lax.dynamic_slice_in_dim(ops.alpha, block.start, block.x.shape[1]).astype(dtype)


def _target_weight(ops: Operands, local_ids: jax.Array, owned: jax.Array, dtype: Any,
                   config: Config) -> jax.Array:
  """``alpha_t``, from the device holding ``t`` (1 without alpha)."""
  if ops.alpha is None:
    return jnp.ones(local_ids.shape, dtype)
  weight = reducing.per_class_values(ops.alpha, jnp.where(owned, local_ids, 0)).astype(dtype)
  return _psum(jnp.where(owned, weight, jnp.zeros((), dtype)), config)


def _vary(value: Any, axes: frozenset[str]) -> Any:
  """``value`` cast (`jax.lax.pcast`) to vary over ``axes`` too; None stays None."""
  missing = () if value is None else tuple(sorted(axes - _varying(value)))
  return lax.pcast(value, missing, to="varying") if missing else value


def _loop(count: int, body: Callable[[jax.Array, Any], Any], init: Any, ops: Operands) -> Any:
  """``lax.fori_loop`` over the blocks, its carry cast to the mapped axes the blocks vary
  over (inside ``shard_map``, a loop's carry must keep its type)."""
  axes = _varying(ops.features)  # every array operand varies alike (`_vary_alike`)
  return lax.fori_loop(0, count, body, jax.tree.map(lambda leaf: _vary(leaf, axes), init))


def _pull(config: Config, n: jax.Array, params: jax.Array,
          cotangent: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(T(n), cotangent . dT/dn, cotangent . dT/dparams)`` from the term's derivative rule."""
  n = _vary(n, _varying(cotangent))
  if not config.traced:
    value, pull = jax.vjp(lambda n: config.term(n, params), n)
    return value, pull(cotangent)[0], jnp.zeros_like(params)
  value, pull = jax.vjp(config.term, n, params)
  return (value, *pull(cotangent))


def _slope(config: Config, n: jax.Array, params: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(T(n), T'(n))`` elementwise: `_pull` with unit cotangents."""
  value, slope, _ = _pull(config, n, params, jnp.ones_like(n))
  return value, slope


def _statistics(ops: Operands, local_ids: jax.Array, owned: jax.Array, config: Config,
                dtype: Any) -> tuple[jax.Array, Residuals]:
  """The per-token loss and the residuals of the backward pass (passes 1 and 2)."""
  count, size = _blocks(ops.kernel.shape[1], config.block)
  tokens = ops.features.shape[0]
  eps = config.label_smoothing
  smooth_linear = bool(eps) and config.linear

  def pass1(i, carry):
    top, rest, target, below, seen = carry
    block = _block(ops, i, size, dtype)
    # Each use reads the block's logits itself: a masked copy shared by two reductions
    # would be a second [tokens, block] array.
    new_top = jnp.maximum(top, jnp.max(jnp.where(block.fresh, block.x, -jnp.inf), axis=1))
    is_target = (block.column == local_ids[:, None]) & block.fresh
    rest = rest * jnp.exp(top - new_top) + jnp.sum(
        jnp.where(is_target | ~block.fresh, 0, jnp.exp(block.x - new_top[:, None])), axis=1)
    # The target's logit as this block computed it, gathered: a masked sum would be one
    # more [tokens, block] array on the CPU, a gather of kernel columns one more matmul.
    hit = (local_ids >= i * size) & (local_ids < block.start + size)
    column = jnp.clip(local_ids - block.start, 0, size - 1)[:, None]
    target = target + jnp.where(hit, jnp.take_along_axis(block.x, column, axis=1)[:, 0], 0)
    if smooth_linear:  # sum_c a_c (M - x_c), rescaled to the new maximum: every term >= 0
      a = jnp.where(block.fresh, _block_alpha(ops, block, dtype), 0)
      below = (below + jnp.where(seen > 0, seen * (new_top - top), 0)
               + jnp.sum(a * jnp.where(block.fresh, new_top[:, None] - block.x, 0), axis=1))
      seen = seen + jnp.sum(a)
    return new_top, rest, target, below, seen

  zeros = jnp.zeros((tokens,), dtype)
  init = (jnp.full((tokens,), -jnp.inf, dtype), zeros, zeros, zeros, jnp.zeros((), dtype))
  top, rest, x_t, below, seen = _loop(count, pass1, init, ops)
  x_t = _psum(x_t, config)
  if config.vocab_axis_name is not None:
    local_top = top
    top = lax.pmax(top, config.vocab_axis_name)
    rest = _psum(rest * jnp.exp(local_top - top), config)
    if smooth_linear:
      below = _psum(below + seen * (top - local_top), config)
      seen = _psum(seen, config)
  target_weight = _target_weight(ops, local_ids, owned, dtype, config)
  shift = jnp.maximum(top, x_t)
  log_sum = jnp.log1p(rest * jnp.exp(top - shift) + jnp.expm1(x_t - shift))
  nll = log_sum - (x_t - shift)
  lse = shift + log_sum
  value, slope = _slope(config, nll, ops.params)
  loss = target_weight * value
  spread = spread_slope = zeros
  if eps:
    if config.linear:  # sum_c a_c (lse - x_c) = sum_c a_c (M - x_c) + A (lse - M)
      spread, spread_slope = below + seen * (lse - top), jnp.broadcast_to(seen, (tokens,))
    else:
      def pass2(i, carry):
        block = _block(ops, i, size, dtype)
        a = jnp.where(block.fresh, _block_alpha(ops, block, dtype), 0)
        t, slope = _slope(config, lse[:, None] - block.x, ops.params)
        return carry[0] + jnp.sum(a * t, axis=1), carry[1] + jnp.sum(a * slope, axis=1)
      spread, spread_slope = _loop(count, pass2, (zeros, zeros), ops)
      spread, spread_slope = _psum(spread, config), _psum(spread_slope, config)
    loss = (1 - eps) * loss + eps / (ops.kernel.shape[1] * _shards(config)[1]) * spread
  z = ops.z_loss.astype(dtype)
  loss = loss + lse * (z * lse)
  return loss, Residuals(lse, nll, value, slope, target_weight, spread_slope)


def _ids(ids: jax.Array, ops: Operands, config: Config) -> tuple[jax.Array, jax.Array]:
  """This device's column of each target (-1 where another device holds it) and ownership."""
  offset = jnp.asarray(_shards(config)[0], ids.dtype) * ops.kernel.shape[1]
  local = ids - offset
  owned = (local >= 0) & (local < ops.kernel.shape[1])
  return jnp.where(owned, local, -1).astype(jnp.int32), owned  # the columns' iota is int32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _streamed(config: Config, dtype: Any, ops: Operands, ids: jax.Array) -> jax.Array:
  local_ids, owned = _ids(ids, ops, config)
  return _statistics(ops, local_ids, owned, config, dtype)[0]


def _streamed_fwd(config, dtype, ops, ids):
  ops = _reverse_mode_only(ops)  # jax.hessian would differentiate this rule in forward mode
  local_ids, owned = _ids(ids, ops, config)
  loss, residuals = _statistics(ops, local_ids, owned, config, dtype)
  return loss, (ops, ids, residuals)


def _over_tokens(subscripts: str, *operands: jax.Array, like: jax.Array) -> jax.Array:
  """An einsum that sums over the tokens, placed like ``like`` (a slice of the gradient it
  adds to): with the tokens sharded over an explicit mesh axis JAX cannot infer that."""
  return jnp.einsum(subscripts, *operands, out_sharding=jax.typeof(like).sharding)


def _streamed_bwd(config, dtype, saved, g):
  ops, ids, res = saved
  local_ids, owned = _ids(ids, ops, config)
  count, size = _blocks(ops.kernel.shape[1], config.block)
  eps = config.label_smoothing
  spread_scale = eps / (ops.kernel.shape[1] * _shards(config)[1])
  g = g.astype(dtype)
  params = ops.params
  # The target's term: (1 - eps) alpha_t T(n_t); its derivatives in n and in the parameters.
  target_coef = g * (1 - eps) * res.target_weight
  # d/dparams counted once, by the device holding the target; d/dn is c_t below.
  value_t = res.value  # T(n_t) and T'(n_t) saved in the forward pass
  d_params = jnp.zeros_like(params)
  if config.traced:
    d_params = _pull(config, res.nll, params, jnp.where(owned, target_coef, 0))[2]
  c_t = target_coef * res.slope
  z = ops.z_loss.astype(dtype)
  coef = c_t + g * spread_scale * res.spread_slope + g * (2 * (z * res.lse))
  exact_target = c_t * jnp.expm1(-res.nll)     # c_t (p_t - 1), exact as p_t -> 1
  # The gradient's products take dx as it is, in the compute dtype: half-precision
  # features and kernel convert exactly, where rounding dx to them would not.
  features = ops.features.astype(dtype)

  def backward(i, carry):
    d_features, d_kernel, d_bias, d_alpha, d_params = carry
    block = _block(ops, i, size, dtype)
    p = jnp.exp(block.x - res.lse[:, None])
    target = block.column == local_ids[:, None]
    dx = jnp.where(target, exact_target[:, None] + p * (coef - c_t)[:, None], p * coef[:, None])
    if eps:
      a = _block_alpha(ops, block, dtype)
      spread_coef = jnp.where(block.fresh, g[:, None] * spread_scale * a, 0)
      t, d_n, d_p = _pull(config, res.lse[:, None] - block.x, params, spread_coef)
      dx = dx - d_n
      d_params = d_params + d_p
      if d_alpha is not None:
        old = lax.dynamic_slice_in_dim(d_alpha, block.start, size)
        d_a = _over_tokens("n,nb->b", g * spread_scale, jnp.where(block.fresh, t, 0), like=old)
        d_alpha = lax.dynamic_update_slice_in_dim(d_alpha, jnp.where(block.fresh, old + d_a,
                                                                     old), block.start, 0)
    dx = jnp.where(block.fresh, dx, 0)
    d_features = d_features + jnp.dot(dx, block.kernel.astype(dtype).T)
    old = lax.dynamic_slice_in_dim(d_kernel, block.start, size, axis=1)
    d_w = _over_tokens("nd,nb->db", features, dx, like=old)
    d_kernel = lax.dynamic_update_slice_in_dim(
        d_kernel, jnp.where(block.fresh, d_w.astype(d_kernel.dtype), old), block.start, 1)
    if d_bias is not None:
      old = lax.dynamic_slice_in_dim(d_bias, block.start, size)
      d_bias = lax.dynamic_update_slice_in_dim(
          d_bias, jnp.where(block.fresh, _over_tokens("nb->b", dx, like=old).astype(d_bias.dtype),
                            old),
          block.start, 0)
    return d_features, d_kernel, d_bias, d_alpha, d_params

  init = (jnp.zeros_like(features), jnp.zeros_like(ops.kernel),  # placed as their operands
          None if ops.bias is None else jnp.zeros_like(ops.bias),
          None if ops.alpha is None else jnp.zeros_like(ops.alpha, dtype=dtype), d_params)
  d_features, d_kernel, d_bias, d_alpha, d_params = _loop(count, backward, init, ops)
  if d_alpha is not None:  # the target's (1 - eps) g T(n_t), at its column
    assert ops.alpha is not None  # d_alpha is the gradient of ops.alpha
    d_alpha = d_alpha.at[jnp.where(owned, local_ids, 0)].add(
        jnp.where(owned, g * (1 - eps) * value_t, 0),
        out_sharding=jax.typeof(d_alpha).sharding).astype(ops.alpha.dtype)
  d_z = jnp.sum(jnp.where(owned, g * res.lse * res.lse, 0))
  grads = Operands(d_features.astype(ops.features.dtype), d_kernel, d_bias, d_alpha,
                   _sum_to(d_params.astype(params.dtype), params),
                   _sum_to(d_z.astype(ops.z_loss.dtype), ops.z_loss))
  return grads, None


_streamed.defvjp(_streamed_fwd, _streamed_bwd)


@jax.custom_jvp
def _reverse_mode_only(ops: Operands) -> Operands:
  """The identity; differentiating it in forward mode raises (program turns that into
  the loss's own message, `FORWARD_MODE`)."""
  return ops


@_reverse_mode_only.defjvp
def _reverse_mode_only_jvp(primals, tangents):
  raise TypeError("forward-mode differentiation of a streamed loss")


def _vary_alike(ops: Operands) -> Operands:
  """The arrays cast (`jax.lax.pcast`) to the mapped axes any of them varies over.

  JAX's transpose of the cast then sums their gradients over the devices that
  share them; the scalars' gradients are summed in the rule (`_sum_to`), so
  that the loss stays invariant where its inputs are.
  """
  arrays = ops.features, ops.kernel, ops.bias, ops.alpha
  axes = frozenset().union(*(_varying(a) for a in arrays if a is not None))

  return ops._replace(**{name: _vary(getattr(ops, name), axes)
                         for name in ("features", "kernel", "bias", "alpha")})


def loss(ops: Operands, ids: jax.Array, *, config: Config, dtype: Any) -> jax.Array:
  """The per-token loss ``(1 - eps) alpha_t T(n_t) + eps / V sum_c alpha_c T(n_c) + z lse**2``.

  ``ops.features`` is ``[N, d]`` with masked rows zeroed, ``ids`` the ``[N]``
  target ids (in range, 0 where masked); the caller masks, weighs and reduces.
  """
  return _streamed(config, np.dtype(dtype), _vary_alike(ops), ids)
