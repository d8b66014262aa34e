"""The common keywords: masks, weights, label smoothing and reductions.

Both families turn their arguments into an unreduced loss in the compute dtype
plus an optional boolean mask; everything after that is shared and lives here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jfocal import _math, _validation

COMMON_ARGS_DOC = """
    weights: optional per-element weights, broadcastable (NumPy rules) to the
      unreduced loss; e.g. ``anchor_weights[..., None]`` for a per-anchor weight
      of a sigmoid loss.
    where: optional boolean mask broadcastable to the unreduced loss. Masked
      entries contribute 0, receive a zero gradient (even if their logits hold
      NaN) and leave the mean's denominator.
    ignore_index: optional integer; integer labels equal to it are masked like
      ``where``.
    label_smoothing: ``eps`` in [0, 1]; targets become ``(1 - eps) * y + eps / K``
      with ``K = 2`` for the sigmoid family and ``K = C`` for the softmax family.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: only with ``reduction="mean"``: a number or scalar array that
      divides the sum instead of the count of unmasked entries (mmdetection's
      ``avg_factor``), or ``"num_positives"``: the sum divided by
      ``max(number of positive targets, 1)``, the detector convention.
    axis_name: optional name (or tuple of names) of a mapped axis, inside
      ``shard_map`` or ``pmap``: the sum, the count of unmasked entries and the
      number of positives are summed over it, so every device gets the loss of
      the global batch and gradients equal to a single-device run. Not needed
      under ``jax.jit`` with sharded arrays, which reduce globally by themselves.
"""

COMMON_RETURNS_DOC = """
    With ``reduction="none"``, the loss of every element in the dtype of
    ``logits`` (masked entries are 0). Otherwise a scalar accumulated in
    float32 (float64 for float64 logits).
"""


REFERENCE_DOC = """
  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017.
"""


def document_loss(summary: str, formula: str, args: str, example: str,
                  returns: str = "", references: str = "",
                  common_args: str = COMMON_ARGS_DOC
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Assembles a loss docstring: formula, Args (with the common keywords), Returns, example.

  ``references`` are cited after Lin et al.; ``common_args`` replaces the
  common keywords' entries for a loss that takes only some of them.
  """
  def decorate(fn):
    fn.__doc__ = (f"{summary}\n{formula}\n  Args:{args}{common_args}\n"
                  f"  Returns:{COMMON_RETURNS_DOC}{returns}\n"
                  f"  Examples:\n{example}\n{REFERENCE_DOC}{references}")
    return fn
  return decorate


def one_program(*static: str, bounds: dict[str, float] | None = None):
  """Runs a loss's body as one ``jax.jit`` program, also when it is called eagerly.

  Eagerly, JAX would run every operation as its own kernel, while under a
  caller's ``jax.jit`` XLA fuses them, and fused arithmetic may round
  differently. Compiling the body in both cases makes an eager call return
  what the jitted one does. The options named in ``static`` (and a string or
  absent ``normalizer``) specialise the program and key its cache; every other
  option is traced, so new values of ``alpha``, ``weights`` or ``where`` never
  recompile. Options named in ``bounds`` (default: ``alpha``, bound 1) are
  checked to lie in [0, bound] here, where their concrete values are still
  known.
  """
  static = frozenset(static)
  bounds = {"alpha": 1.0} if bounds is None else bounds

  def decorate(body):
    traced_normalizer = jax.jit(body, static_argnames=tuple(static))
    static_normalizer = jax.jit(body, static_argnames=tuple(static | {"normalizer"}))

    @functools.wraps(body)
    def run(logits: Any, labels: Any, **options: Any) -> jax.Array:
      for name, value in options.items():
        if name in static:
          options[name] = _validation.static_option(value, name)
        elif isinstance(value, (list, tuple)):
          options[name] = _validation.as_array(value, name)
      for name, maximum in bounds.items():
        _validation.check_probabilities(options.get(name), name, maximum=maximum)
      logits = _validation.as_array(logits, "logits")
      labels = _validation.as_array(labels, "labels")
      normalizer = options.get("normalizer")
      program = (static_normalizer if normalizer is None or isinstance(normalizer, str)
                 else traced_normalizer)
      return program(logits, labels, **options)

    return run

  return decorate


def per_class_values(values: jax.Array, class_ids: jax.Array) -> jax.Array:
  """``values[class_ids]``, sharded like ``class_ids``.

  Under a mesh with explicit axes JAX cannot infer the sharding of a gather
  from a replicated table, so it is stated: the table is small, the ids are not.
  """
  return values.at[class_ids].get(out_sharding=jax.typeof(class_ids).sharding)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  present = [mask for mask in masks if mask is not None]
  if not present:
    return None
  combined = present[0]
  for mask in present[1:]:
    combined = combined & mask
  return combined


def smooth(targets: jax.Array, label_smoothing: float, num_choices: int) -> jax.Array:
  if label_smoothing == 0.0:
    return targets
  return targets * (1.0 - label_smoothing) + label_smoothing / num_choices


def invalid_to_nan(loss: jax.Array, invalid: jax.Array | None) -> jax.Array:
  """Multiplies by NaN where labels are out of range, so loss *and* gradient are NaN."""
  if invalid is None:
    return loss
  return loss * jnp.where(invalid, jnp.nan, 1.0).astype(loss.dtype)


def count(mask: jax.Array | None, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  if mask is None:
    return jnp.asarray(int(np.prod(shape)), dtype)
  return jnp.sum(jnp.broadcast_to(mask, shape), dtype=dtype)


def global_sum(value: jax.Array, axis_name: Any) -> jax.Array:
  """``value`` summed over the mapped axis ``axis_name``, differentiated as one device's share.

  Inside ``shard_map``, JAX types the per-device value as varying over the
  axis and transposes ``psum`` exactly: the gradient with respect to local
  inputs is their share of the global gradient, and with respect to
  replicated parameters it is summed over devices by JAX itself. Without that
  typing (``pmap``, ``shard_map(check_vma=False)``) the transpose of ``psum``
  sums the cotangents of all devices, which would scale gradients by the
  device count; there only the local value is differentiated.
  """
  if axis_name is None:
    return value
  total = jax.lax.psum(value, axis_name)
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  if set(names) <= _varying_axes(value):
    return total
  return value + jax.lax.stop_gradient(total - value)


def _varying_axes(value: jax.Array) -> frozenset:
  """The mapped axes over which ``shard_map`` types ``value`` as varying."""
  return jax.typeof(value).manual_axis_type.varying


def reduce_loss(loss: jax.Array, *, mask: jax.Array | None, weights: jax.Array | None,
                reduction: str, normalizer: Any, positives: Callable[[], jax.Array],
                out_dtype: Any, axis_name: Any = None) -> jax.Array:
  """Applies weights and mask, then the reduction.

  Args:
    loss: unreduced loss in the compute dtype.
    mask: boolean mask broadcastable to ``loss`` or None.
    weights: array broadcastable to ``loss`` or None.
    reduction: one of ``"none" | "sum" | "mean"`` (already validated).
    normalizer: None, ``"num_positives"`` or a scalar (already validated).
    positives: returns the count of unmasked positive targets; called only for
      ``normalizer="num_positives"``.
    out_dtype: dtype of the unreduced result.
    axis_name: mapped axis (or axes) over which sums and counts are global.
  """
  if weights is not None:
    loss = scale(loss, weights.astype(loss.dtype))
  if mask is not None:
    loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
  if reduction == "none":
    # Fenced too, so that a caller's own jnp.sum(loss) also reads a materialised array.
    return _math.fence(loss.astype(out_dtype))
  # A plain loop writes the loss, the sum reads it.
  return reduce_materialised(_math.fence(loss), mask=mask, reduction=reduction,
                             normalizer=normalizer, positives=positives, out_dtype=out_dtype,
                             axis_name=axis_name)


def reduce_materialised(loss: jax.Array, *, mask: jax.Array | None, reduction: str,
                        normalizer: Any, positives: Callable[[], jax.Array], out_dtype: Any,
                        axis_name: Any = None) -> jax.Array:
  """The reduction of a loss that already carries its weights and zeros where masked.

  ``loss`` must be materialised on the CPU (fenced, or an op XLA does not
  recompute), as the cores' outputs are; ``mask`` only counts for the mean.
  """
  if reduction == "none":
    return loss.astype(out_dtype)
  total = global_sum(jnp.sum(loss), axis_name)
  if reduction == "sum":
    return total
  if normalizer is None:
    denominator = jnp.maximum(global_sum(count(mask, loss.shape, loss.dtype), axis_name), 1.0)
  elif isinstance(normalizer, str):
    denominator = jnp.maximum(global_sum(positives().astype(loss.dtype), axis_name), 1.0)
  else:
    denominator = jnp.asarray(normalizer).astype(loss.dtype)
  return total / denominator


def prepare_common(logits: Any, labels: Any, *, gamma: Any, ignore_index: Any, reduction: Any,
                   normalizer: Any, label_smoothing: Any):
  """Converts inputs and checks the arguments every loss shares.

  Returns logits, labels, the compute dtype, and the checked gamma, ignore_index
  and label_smoothing.
  """
  logits = _validation.as_array(logits, "logits")
  labels = _validation.as_array(labels, "labels")
  dtype = _validation.compute_dtype(logits)
  _validation.check_labels_dtype(labels)
  _validation.check_reduction(reduction, normalizer)
  ignore_index = _validation.check_ignore_index(ignore_index, labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    # Class ids of any integer dtype become one signed dtype that holds every
    # class count and a negative ignore_index; ids that do not fit wrap to
    # negative values, which are out of range (NaN), never a valid class.
    wide = jnp.int64 if labels.dtype.itemsize == 8 or labels.dtype == jnp.uint32 else jnp.int32
    labels = labels.astype(wide if jax.config.jax_enable_x64 else jnp.int32)
    info = jnp.iinfo(labels.dtype)
    if ignore_index is not None and not info.min <= ignore_index <= info.max:
      ignore_index = None  # no label can equal it
  return (logits, labels, dtype, _validation.check_gamma(gamma), ignore_index,
          _validation.check_label_smoothing(label_smoothing))


def user_mask_and_weights(where: Any, weights: Any, shape: tuple[int, ...]):
  """The checked mask, broadcast to the unreduced shape, and the checked weights."""
  mask = None if where is None else jnp.broadcast_to(_validation.check_mask(where, shape), shape)
  weights = None if weights is None else _validation.check_weights(weights, shape)
  return mask, weights


@jax.custom_jvp
def scale(loss: jax.Array, factor: jax.Array) -> jax.Array:
  """``loss * factor``, where a zero factor removes the entry even if its loss is +inf.

  A NaN loss (a NaN logit, an out-of-range label) stays NaN: zero weight must
  not hide bad input. The derivative is the product rule's: written out, it does
  not need the loss's value for the mask, which would tie the gradient's loop to
  the loss's on the CPU (see _math.fence).
  """
  removed = (factor == 0) & ~jnp.isnan(loss)
  return jnp.where(removed, jnp.zeros((), loss.dtype), loss * factor)


@functools.partial(scale.defjvp, symbolic_zeros=True)
def _scale_jvp(primals, tangents):
  loss, factor = primals
  loss_dot, factor_dot = tangents
  value = scale(loss, factor)
  tangent = jnp.zeros_like(value)
  if not isinstance(loss_dot, SymbolicZero):
    tangent = tangent + loss_dot * factor
  if not isinstance(factor_dot, SymbolicZero):
    tangent = tangent + loss * factor_dot
  return value, tangent
