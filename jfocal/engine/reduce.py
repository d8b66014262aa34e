"""The one place that masks, weights and reduces a loss.

A family's engine hands over the unreduced loss in the compute dtype, already
carrying its weights and zeros where masked (the sigmoid cores fold them into
their value; the softmax engine applies them per example with `weigh`), plus
the boolean mask and the count of positives. `reduce` does the rest:
``"none"``, ``"sum"``, or ``"mean"`` over the unmasked entries, a number, or the
positives, globally over ``axis_name``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics


def per_class_values(values: jax.Array, class_ids: jax.Array) -> jax.Array:
  """``values[class_ids]``, sharded like ``class_ids``.

  Under a mesh with explicit axes JAX cannot infer the sharding of a gather
  from a replicated table, so it is stated: the table is small, the ids are not.
  """
  return values.at[class_ids].get(out_sharding=jax.typeof(class_ids).sharding)


def both(first: jax.Array | None, second: jax.Array | None) -> jax.Array | None:
  """The conjunction of two optional masks."""
  if first is None:
    return second
  return first if second is None else first & second


def smooth(targets: jax.Array, label_smoothing: float, num_choices: Any) -> jax.Array:
  """``(1 - eps) y + eps / K``: the target mass spread over ``K`` choices."""
  if label_smoothing == 0.0:
    return targets
  return targets * (1.0 - label_smoothing) + label_smoothing / num_choices


def invalid_to_nan(value: jax.Array, invalid: jax.Array | None) -> jax.Array:
  """Multiplies by NaN where labels are out of range, so the value *and* its gradient are NaN."""
  if invalid is None:
    return value
  return value * jnp.where(invalid, jnp.nan, 1.0).astype(value.dtype)


def count(mask: jax.Array | None, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """The number of entries of a loss of ``shape`` that ``mask`` (broadcast to it) keeps."""
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
  if set(names) <= jax.typeof(value).manual_axis_type.varying:
    return total
  return value + jax.lax.stop_gradient(total - value)


@jax.custom_jvp
def scale(loss: jax.Array, factor: jax.Array) -> jax.Array:
  """``loss * factor`` with `numerics.zero_removes`'s rule: zero removes +inf, NaN stays.

  The derivative is the product rule's: written out, it does not need the
  loss's value for the mask, which would tie the gradient's loop to the loss's
  on the CPU (see `numerics.fence`).
  """
  return numerics.zero_removes(factor, loss)


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


def weigh(loss: jax.Array, *, weights: jax.Array | None, mask: jax.Array | None,
          invalid: jax.Array | None) -> jax.Array:
  """A per-example loss with NaN for invalid labels, its weights and 0 where masked, fenced.

  The fence materialises it: a plain loop writes the loss, the sum reads it,
  and a caller's own ``jnp.sum`` of the unreduced loss gets the same layout.
  """
  loss = invalid_to_nan(loss, invalid)
  if weights is not None:
    loss = scale(loss, weights.astype(loss.dtype))
  if mask is not None:
    loss = jnp.where(mask, loss, jnp.zeros((), loss.dtype))
  return numerics.fence(loss)


def reduce(loss: jax.Array, *, mask: jax.Array | None, positives: jax.Array, reduction: str,
           normalizer: Any, out_dtype: Any, axis_name: Any = None) -> jax.Array:
  """The reduction of a loss that already carries its weights and zeros where masked.

  Args:
    loss: the unreduced loss in the compute dtype, materialised (fenced, as
      the cores' outputs and `weigh`'s are).
    mask: boolean mask of ``loss``'s shape, or None; only counts for the mean.
    positives: the number of unmasked positive targets (a scalar), read only
      for ``normalizer="num_positives"``; XLA removes it otherwise.
    reduction: ``"none"``, ``"sum"`` or ``"mean"``.
    normalizer: None, ``"num_positives"`` or a scalar that divides the sum.
    out_dtype: the dtype of the unreduced result (the logits' dtype).
    axis_name: mapped axis (or axes) over which sums and counts are global.

  The mean's denominator is at least 1, so an all-masked mean is 0, and a
  batch without positives divides by 1, not 0.
  """
  checks.check_reduction(reduction, normalizer)
  if reduction == "none":
    return loss.astype(out_dtype)
  total = global_sum(jnp.sum(loss), axis_name)
  if reduction == "sum":
    return total
  if normalizer is None:
    denominator = jnp.maximum(global_sum(count(mask, loss.shape, loss.dtype), axis_name), 1.0)
  elif isinstance(normalizer, str):
    denominator = jnp.maximum(global_sum(positives.astype(loss.dtype), axis_name), 1.0)
  else:
    denominator = checks.as_array(normalizer, "normalizer").astype(loss.dtype)
  return total / denominator
