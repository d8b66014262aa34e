r"""Fused linear + softmax losses for large vocabularies: the logits ``features @ kernel + bias``
are streamed over vocabulary blocks and never held whole (`jfocal.engine.vocab`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfocal._softmax import focal_term
from jfocal.engine import checks, numerics, reduce as reducing, softmax, vocab
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction

# Vocabulary columns per block. Measured on the 2-core CPU at 2048 tokens x 128 features
# -> 32768 classes, value-and-grad of fused CE against the dense path: 256: 0.83x, 512:
# 0.78x, 1024: 0.80x, 2048: 0.77x, 4096: 0.88x (+-10% run to run); XLA's temp is about two
# [tokens, block] float32 blocks, so 512 keeps it at 1/32 of the logits at V = 32768.
DEFAULT_BLOCK_SIZE = 512


def _cross_entropy_term(n: jax.Array, params: jax.Array) -> jax.Array:
  del params
  return n


def _check_float(value: jax.Array, name: str) -> None:
  checks.require_kind(value, (float,), message=f"{name} must be a floating-point array; got "
                      f"dtype {value.dtype}. Cast it, e.g. {name}.astype(jnp.float32)")


def _streamed_loss(features: Any, kernel: Any, labels: Any, *, bias: Any, alpha: Any,
                   gamma: Parameter, weights: Any, where: Any, ignore_index: Any,
                   label_smoothing: Any, z_loss: Any, reduction: Any, normalizer: Any,
                   axis_name: Any, vocab_axis_name: Any, block_size: Any, name: str,
                   materialised: str) -> jax.Array:
  """The fused losses' shared body: checks, masks, the streamed per-token loss, reduction."""
  features = checks.as_array(features, "features")
  kernel = checks.as_array(kernel, "kernel")
  labels = checks.as_array(labels, "labels")
  _check_float(features, "features")
  _check_float(kernel, "kernel")
  if features.ndim == 0:
    raise ValueError("features must have a feature axis, shape [..., d]; got a scalar")
  if kernel.ndim != 2 or kernel.shape[0] != features.shape[-1]:
    raise ValueError(f"kernel must have shape [d, V] with d = features.shape[-1] = "
                     f"{features.shape[-1]} (a Flax Dense/nnx.Linear kernel); got {kernel.shape}")
  if kernel.shape[1] == 0:
    raise ValueError("kernel must have at least one vocabulary column; got shape "
                     f"{kernel.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels of {name} must be integer class ids; got dtype {labels.dtype}. "
                    f"Dense targets need the [tokens, V] logits: use jfocal.{materialised}")
  tokens = features.shape[:-1]
  checks.check_class_id_shape(labels, tokens, "features.shape[:-1]")
  if block_size is None:
    block_size = DEFAULT_BLOCK_SIZE
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size must be a positive int (vocabulary columns per block); got "
                     f"{block_size!r}")
  local_vocab = kernel.shape[1]
  if bias is not None:
    bias = checks.as_array(bias, "bias")
    _check_float(bias, "bias")
    if bias.shape != (local_vocab,):
      raise ValueError(f"bias must have shape [V] = ({local_vocab},), the kernel's columns; "
                       f"got {bias.shape}")
  if alpha is not None:
    if np.ndim(alpha) == 0:
      raise ValueError(f"alpha must be a per-class vector of shape ({local_vocab},); got a "
                       "number")
    alpha = checks.check_alpha(alpha, local_vocab, allow_scalar=False)
  ignore_index = checks.check_ignore_index(ignore_index, labels)
  label_smoothing = checks.check_label_smoothing(label_smoothing)
  out_dtype = jnp.promote_types(features.dtype, kernel.dtype)
  dtype = checks.wide_float(out_dtype)
  mask = None
  if where is not None:
    where = checks.as_array(where, "where")
    if where.ndim > len(tokens):
      raise ValueError(f"where of {name} masks tokens, shape {tokens}; got shape "
                       f"{where.shape}. A per-logit mask needs the logits: use "
                       f"jfocal.{materialised}")
    mask = jnp.broadcast_to(checks.check_mask(where, tokens), tokens)
  weights = None if weights is None else checks.check_weights(weights, tokens)

  shards = 1 if vocab_axis_name is None else jax.lax.axis_size(vocab_axis_name)
  ids, in_range, invalid, mask = softmax.class_ids(labels, ignore_index, local_vocab * shards,
                                                   mask)
  if mask is not None:
    invalid = invalid & mask
  counted = in_range if mask is None else in_range & mask
  # Masked and invalid tokens get zero features and class 0, so that whatever
  # their rows held (padding, NaN) reaches neither the loss nor the gradients.
  features = jnp.where(counted[..., None], features, jnp.zeros((), features.dtype))
  ids = jnp.where(counted, ids, 0)
  gamma_array, static_gamma = numerics.split(checks.parameter(gamma, "gamma"), dtype)
  linear = numerics.is_static_zero(numerics.pick(gamma_array, static_gamma))
  term = (_cross_entropy_term if linear
          else functools.partial(focal_term, static_gamma=static_gamma))
  z_loss = checks.parameter(z_loss, "z_loss")
  ops = vocab.Operands(features.reshape(-1, features.shape[-1]), kernel, bias, alpha,
                       gamma_array, jnp.asarray(z_loss, dtype))
  config = vocab.Config(term, linear, static_gamma is None, label_smoothing, block_size,
                        vocab_axis_name, name, materialised)
  loss = vocab.loss(ops, ids.reshape(-1), config=config, dtype=dtype).reshape(tokens)
  loss = reducing.weigh(loss, weights=weights, mask=mask, invalid=invalid)
  return reducing.reduce(loss, mask=mask, positives=jnp.sum(counted), reduction=reduction,
                         normalizer=normalizer, out_dtype=out_dtype, axis_name=axis_name)


_BOUNDS = {"alpha": checks.NON_NEGATIVE, "gamma": checks.NON_NEGATIVE}
_STATIC = ("vocab_axis_name", "block_size")


@program(family="linear_softmax", static=_STATIC, bounds=_BOUNDS, labels="labels",
         forward_mode_error=vocab.FORWARD_MODE.format(name="linear_softmax_cross_entropy",
                                                      materialised="softmax_cross_entropy"))
def linear_softmax_cross_entropy(features: ArrayLike, kernel: ArrayLike, labels: ArrayLike, *,
                                 bias: ArrayLike | None = None, weights: ArrayLike | None = None,
                                 where: ArrayLike | None = None, ignore_index: int | None = None,
                                 label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                                 reduction: Reduction = "none", normalizer: Normalizer = None,
                                 axis_name: AxisName = None, vocab_axis_name: AxisName = None,
                                 block_size: int | None = None) -> jax.Array:
  r"""Softmax cross-entropy of a linear layer's logits, without ever building them.

  With :math:`x = f W + b` (one row of logits per token),

  .. math::
    \mathrm{CE}(f, t) = \log \sum_{c=1}^{V} e^{x_c} - x_t,

  exactly :func:`jfocal.softmax_cross_entropy` of ``features @ kernel + bias``,
  computed over blocks of ``block_size`` vocabulary columns: the logits
  exist one ``[tokens, block_size]`` block at a time in the forward and the
  backward pass (XLA's temporary memory is about two such float32 blocks),
  and what is kept for the backward pass is O(tokens) (the log-normaliser
  and the target's loss). The backward pass recomputes each block's logits
  (``jax.custom_vjp``); it costs one more matrix product than the
  materialised loss and saves the ``[tokens, V]`` logits and their gradient.
  Label smoothing and the z-loss come from the same pass.

  Args:
    features: float array of shape ``[..., d]`` (e.g. ``[batch, seq, d]``), the
      last hidden states. bfloat16 and float16 are multiplied as they are,
      with float32 accumulation (``preferred_element_type``); the loss is
      computed in float32 (float64 for float64 inputs). The products take
      JAX's matmul precision, as ``features @ kernel`` does: on a GPU or TPU
      float32 may be multiplied as TensorFloat-32 or bfloat16 unless
      ``jax.default_matmul_precision("float32")`` is set.
    kernel: float array of shape ``[d, V]``, the layout of a Flax ``nn.Dense``
      or ``nnx.Linear`` kernel (its vocabulary shard, with ``vocab_axis_name``).
    labels: integer class ids of shape ``[...]`` (``features.shape[:-1]``);
      ids outside ``[0, V)`` other than ``ignore_index`` give NaN.
    bias: optional float array of shape ``[V]``.
    weights: per-token weights broadcastable to ``labels.shape``.
    where: a boolean mask broadcastable to ``labels.shape``: masked tokens
      are 0 and leave the mean, whatever their features hold.
    ignore_index: ids equal to it are masked like ``where`` (PyTorch's and
      Hugging Face's convention is -100).
    label_smoothing: ``eps`` in [0, 1]: targets become
      ``(1 - eps) one_hot(t) + eps / V``.
    z_loss: coefficient >= 0 of ``z_loss * logsumexp(x)**2`` added per token
      (PaLM uses 1e-4). A Python number specialises the program, an array is
      traced and differentiable.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"`` (over the
      unmasked tokens: the language-model default).
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum instead of the count of unmasked tokens, or ``"num_positives"``.
    axis_name: mapped axes over which tokens are sharded (``shard_map``,
      ``pmap``): sums and counts are global.
    vocab_axis_name: the mapped axis of ``shard_map`` over which ``kernel``
      and ``bias`` are sharded by vocabulary columns (tensor parallelism);
      ``labels`` hold global ids and ``features`` are the same on every
      device of the axis. Each device's kernel gradient is exact for its
      columns.
    block_size: vocabulary columns per block (default
      ``jfocal._linear.DEFAULT_BLOCK_SIZE``); the last block may overlap the
      one before it, so any ``V`` works.

  Returns:
    With ``reduction="none"``, the loss of every token, shape ``labels.shape``,
    in the dtype of ``features @ kernel`` (masked tokens 0). Otherwise a
    float32 scalar (float64 for float64 inputs).

  Raises:
    TypeError: under ``jax.jvp``, ``jax.jacfwd``, ``jax.hessian`` or
      ``jax.linearize``: the derivatives are reverse-mode only (``jax.grad``,
      ``jax.vjp``). Use :func:`jfocal.softmax_cross_entropy` of
      ``features @ kernel + bias`` for forward mode.

  Examples:
    >>> import jax, jax.numpy as jnp, jfocal
    >>> features = jax.random.normal(jax.random.key(0), (4, 8))
    >>> kernel = jax.random.normal(jax.random.key(1), (8, 1000)) / 8
    >>> labels = jnp.array([3, 141, 592, 653])
    >>> fused = jfocal.linear_softmax_cross_entropy(features, kernel, labels,
    ...                                             reduction="mean", block_size=256)
    >>> dense = jfocal.softmax_cross_entropy(features @ kernel, labels, reduction="mean")
    >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
    True

  References:
    Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, ICLR 2025; Hsu et al., `Liger Kernel
    <https://arxiv.org/abs/2410.10989>`_, 2024 (``FusedLinearCrossEntropy``);
    Milakov and Gimelshein, `Online normalizer calculation for softmax
    <https://arxiv.org/abs/1805.02867>`_, 2018.
  """
  return _streamed_loss(features, kernel, labels, bias=bias, alpha=None, gamma=0.0,
                        weights=weights, where=where, ignore_index=ignore_index,
                        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                        normalizer=normalizer, axis_name=axis_name,
                        vocab_axis_name=vocab_axis_name, block_size=block_size,
                        name="linear_softmax_cross_entropy", materialised="softmax_cross_entropy")


@program(family="linear_softmax", static=_STATIC, specialising=("gamma",), bounds=_BOUNDS,
         labels="labels",
         forward_mode_error=vocab.FORWARD_MODE.format(name="linear_softmax_focal_loss",
                                                      materialised="softmax_focal_loss"))
def linear_softmax_focal_loss(features: ArrayLike, kernel: ArrayLike, labels: ArrayLike, *,
                              bias: ArrayLike | None = None, alpha: ArrayLike | None = None,
                              gamma: Parameter = 2.0, weights: ArrayLike | None = None,
                              where: ArrayLike | None = None, ignore_index: int | None = None,
                              label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                              reduction: Reduction = "none", normalizer: Normalizer = None,
                              axis_name: AxisName = None, vocab_axis_name: AxisName = None,
                              block_size: int | None = None) -> jax.Array:
  r"""Softmax focal loss of a linear layer's logits, without ever building them.

  With :math:`x = f W + b` and :math:`p = \mathrm{softmax}(x)`,

  .. math::
    \mathrm{FL}(f, t) = -\alpha_t (1 - p_t)^\gamma \log p_t,

  exactly :func:`jfocal.softmax_focal_loss` of ``features @ kernel + bias``
  (with label smoothing, ``(1 - eps)`` of it plus ``eps / V`` of every
  class's term), streamed over vocabulary blocks as
  :func:`jfocal.linear_softmax_cross_entropy`. Without label smoothing the
  loss needs only the log-normaliser and the target's logit, so it costs what
  cross-entropy costs; label smoothing adds one pass over the vocabulary in
  the forward pass, since every class's focal term needs the normaliser.
  ``gamma = 0`` is the cross-entropy's program.

  Args:
    features: float array of shape ``[..., d]``; see
      :func:`jfocal.linear_softmax_cross_entropy`.
    kernel: float array of shape ``[d, V]`` (its vocabulary shard, with
      ``vocab_axis_name``).
    labels: integer class ids of shape ``features.shape[:-1]``.
    bias: optional float array of shape ``[V]``.
    alpha: optional per-class weights of shape ``[V]`` (sharded as the
      kernel's columns), finite and >= 0; may be traced and differentiated.
    gamma: focusing parameter >= 0. A Python number specialises the program
      (integers become multiplications, and 1.5, 2.5, ... a square root as
      well); an array is traced and differentiable.
    weights: per-token weights broadcastable to ``labels.shape``.
    where: a boolean per-token mask broadcastable to ``labels.shape``.
    ignore_index: ids equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1].
    z_loss: coefficient >= 0 of ``z_loss * logsumexp(x)**2`` per token.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number, a scalar array or
      ``"num_positives"``.
    axis_name: mapped axes over which tokens are sharded.
    vocab_axis_name: the mapped axis over which ``kernel``, ``bias`` and
      ``alpha`` are sharded by vocabulary columns.
    block_size: vocabulary columns per block.

  Returns:
    As :func:`jfocal.linear_softmax_cross_entropy`.

  Raises:
    TypeError: under forward-mode differentiation (``jax.jvp``,
      ``jax.jacfwd``, ``jax.hessian``, ``jax.linearize``); use
      :func:`jfocal.softmax_focal_loss` of ``features @ kernel + bias``.

  Examples:
    >>> import jax, jax.numpy as jnp, jfocal
    >>> features = jax.random.normal(jax.random.key(0), (4, 8))
    >>> kernel = jax.random.normal(jax.random.key(1), (8, 1000)) / 8
    >>> labels = jnp.array([3, 141, 592, 653])
    >>> fused = jfocal.linear_softmax_focal_loss(features, kernel, labels, gamma=2.0)
    >>> dense = jfocal.softmax_focal_loss(features @ kernel, labels, gamma=2.0)
    >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
    True

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017; Wijmans et al., `Cut Your
    Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, ICLR 2025.
  """
  return _streamed_loss(features, kernel, labels, bias=bias, alpha=alpha, gamma=gamma,
                        weights=weights, where=where, ignore_index=ignore_index,
                        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
                        normalizer=normalizer, axis_name=axis_name,
                        vocab_axis_name=vocab_axis_name, block_size=block_size,
                        name="linear_softmax_focal_loss", materialised="softmax_focal_loss")
