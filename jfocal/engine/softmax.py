r"""The softmax family's engine: inputs, the log-normaliser, the class sum and the reduction.

A softmax loss is a *term* ``t(n)`` of the negative log-probability
``n_c = -log p_c >= 0`` of a class (``n`` for cross-entropy,
``(1 - e^{-n})^gamma n`` for focal loss), summed over the classes with the
target mass: ``sum_c alpha_c y_c t(n_c)``, which for a class id ``k`` is
``alpha_k t(n_k)`` (no one-hot is ever built). The steps:

1. `prepare` turns ``(logits, labels)``, ``axis`` (an int or a tuple of class
   axes, flattened as optax does) and the common keywords into
   `SoftmaxInputs`.
2. `example_loss` computes the log-normaliser once (`log_normalizer`), the
   terms, alpha, label smoothing, the class sum (`class_sum`, whose
   derivative with respect to the targets is exact, also where a target is 0)
   and the family's z-loss.
3. `reduce` applies NaN for invalid ids, the weights and the mask, then
   reduces.

Two kinds of ``where``: a mask with the logits' rank is *per logit* (optax's):
masked classes leave the softmax and the class sum (their probability is 0,
their target mass is dropped, label smoothing spreads over the remaining
classes) and get zero gradients; a row with no class left is masked. A mask
of lower rank broadcasts against the loss (one entry per example) and masks
whole examples.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jfocal.engine import checks, numerics, reduce as reducing


class SoftmaxInputs(NamedTuple):
  """The inputs of a softmax loss, with the classes along one axis."""
  x: jax.Array                 # logits, compute dtype; 0 in masked rows, -inf at masked classes
  axis: int                    # the class axis of x
  ids: jax.Array | None        # class ids (out-of-range ones as 0), loss-shaped
  targets: jax.Array | None    # dense targets, 0 where masked, x's shape
  classes: jax.Array | None    # the per-logit mask, broadcast to x's shape
  kept: jax.Array | None       # with ids and a per-logit mask: the target class is unmasked
  mask: jax.Array | None       # loss-shaped: rows that count
  invalid: jax.Array | None    # loss-shaped: out-of-range ids (NaN)
  weights: jax.Array | None
  positives: jax.Array         # unmasked examples with target mass
  label_smoothing: float
  dtype: np.dtype
  out_dtype: np.dtype

  @property
  def num_classes(self) -> int:
    return self.x.shape[self.axis]


def _class_axes(axis: Any, ndim: int) -> tuple[int, ...]:
  if ndim == 0:
    raise ValueError("softmax losses need logits with a class axis; got scalar logits")
  axes = axis if isinstance(axis, tuple) else (axis,)
  if not axes or any(isinstance(a, bool) or not isinstance(a, int) for a in axes):
    raise TypeError(f"axis must be an int or a tuple of ints (the class axes); got {axis!r}")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for logits of rank {ndim}")
  canonical = tuple(a % ndim for a in axes)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"axis {axis!r} names an axis twice")
  return canonical


def _classes_last(array: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``array`` with the class axes moved to the end (in the given order) and flattened."""
  batch = [d for d in range(array.ndim) if d not in axes]
  moved = jnp.transpose(array, batch + list(axes))
  return moved.reshape(moved.shape[:len(batch)] + (math.prod(array.shape[a] for a in axes),))


def prepare(logits: Any, labels: Any, *, axis: Any, weights: Any, where: Any,
            ignore_index: Any, label_smoothing: Any) -> SoftmaxInputs:
  """The label handling every softmax loss shares (see the module docstring).

  Labels are integer class ids with the logits' shape without the class
  axes (flat indices into them, for several axes, as optax's), or dense
  float or bool targets with the logits' shape.
  """
  logits = checks.as_array(logits, "logits")
  labels = checks.as_array(labels, "labels")
  dtype = checks.compute_dtype(logits)
  checks.check_labels_dtype(labels)
  ignore_index = checks.check_ignore_index(ignore_index, labels)
  label_smoothing = checks.check_label_smoothing(label_smoothing)
  axes = _class_axes(axis, logits.ndim)
  integer = jnp.issubdtype(labels.dtype, jnp.integer)
  if not integer:
    checks.check_same_shape(labels, logits, "float or bool")
  classes = mask = None
  if where is not None:
    where = checks.as_array(where, "where")
    if where.ndim == logits.ndim:
      classes = jnp.broadcast_to(checks.check_mask(where, logits.shape, "the logits' shape"),
                                 logits.shape)
  num_classes = math.prod(logits.shape[a] for a in axes)
  if num_classes == 0 and integer:
    raise ValueError(f"class ids need at least one class; logits of shape {logits.shape} "
                     f"have none along axis {axis}, so no id is valid (dense targets of "
                     "no class give the empty sum, 0)")
  if len(axes) == 1:  # `_class_axes` names at least one axis
    axis = axes[0]
  else:
    logits = _classes_last(logits, axes)
    labels = labels if integer else _classes_last(labels, axes)
    classes = None if classes is None else _classes_last(classes, axes)
    axis = logits.ndim - 1
  shape = logits.shape[:axis] + logits.shape[axis + 1:]
  if where is not None and classes is None:
    mask = jnp.broadcast_to(checks.check_mask(where, shape), shape)
  if num_classes == 0:
    # As optax: the loss over no classes is the empty sum; such a row counts as
    # masked, as one whose classes a per-logit mask removes all of.
    mask = jnp.zeros(shape, bool)

  x = logits.astype(dtype)
  ids = targets = kept = invalid = None
  if integer:
    checks.check_class_id_shape(labels, shape, "logits.shape without the class axis")
    ids, in_range, invalid, mask = class_ids(labels, ignore_index, num_classes, mask)
    ids = jnp.where(in_range, ids, 0)
    positive = in_range
    if classes is not None:
      kept = jnp.squeeze(jnp.take_along_axis(classes, jnp.expand_dims(ids, axis), axis), axis)
      positive = positive & kept
  else:
    targets = labels.astype(dtype)
    if classes is not None:
      targets = jnp.where(classes, targets, 0)
    positive = jnp.sum(targets, axis=axis) > 0
  if classes is not None:
    mask = reducing.both(mask, jnp.any(classes, axis=axis))
  if mask is not None:
    # Masked rows may hold anything (padding, NaN): replace them so that
    # neither their value nor their gradient can leak through the mask.
    expanded = jnp.expand_dims(mask, axis)
    x = jnp.where(expanded, x, 0)
    if targets is not None:
      targets = jnp.where(expanded, targets, 0)
    invalid = None if invalid is None else invalid & mask
    positive = positive & mask
  if classes is not None:
    x = jnp.where(classes, x, -jnp.inf)  # probability 0, whatever the logit held
  weights = None if weights is None else checks.check_weights(weights, shape)
  return SoftmaxInputs(x, axis, ids, targets, classes, kept, mask, invalid, weights,
                       jnp.sum(positive), label_smoothing, dtype, logits.dtype)


def class_ids(labels: jax.Array, ignore_index: int | None, num_classes: Any,
              mask: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """``(ids, in_range, invalid, mask)`` of integer class ids in ``[0, num_classes)``.

  ``ids`` are the labels widened (`checks.wide_ids`); ``invalid`` marks the
  out-of-range ids that are not ``ignore_index`` (their loss is NaN), and the
  ignored ones leave ``mask``.
  """
  ids, ignore_index = checks.wide_ids(labels, ignore_index)
  in_range = (ids >= 0) & (ids < num_classes)
  invalid = ~in_range
  if ignore_index is not None:
    ignored = ids == ignore_index
    invalid = invalid & ~ignored
    mask = reducing.both(mask, ~ignored)
  return ids, in_range, invalid, mask


# Up to this many classes the target's 0 in the exp sum is set by a select
# against the class index, in the loop that computes exp; above it, it is
# scattered (one entry per row) into the materialised exp, so that this loop
# has no select. The numbers are the same; the speed is not. On the CPU,
# value-and-grad of softmax CE with class ids at 4M logits took 0.8-1.0x
# optax's CE time at C = 16 to 40 with the select against 1.05-1.15x with the
# scatter, and 1.0-1.2x from C = 64 on with the scatter against 1.1-1.4x with
# the select (benchmarks/run.py's softmax sweep, docs/performance.md). Other
# platforms select at every class count: on an H200 (benchmarks/gpu.py, 2**27
# logits, softmax focal loss with class ids) the scatter took 1.46 ms at C = 81
# against 0.86 ms with the select (optax's CE: 0.80 ms) and 0.79 against 0.54 ms
# at C = 1000 (optax: 0.53 ms), and in bfloat16 at C = 81 it kept a temporary of
# 2.1x the logits' bytes against 0.15x.
SMALL_CLASSES = 32


@jax.custom_jvp
def _shift(x: jax.Array, top: jax.Array) -> jax.Array:
  """``x - top``, with 0 instead of ``inf - inf`` in a row whose maximum is infinite.

  Then the +inf logits of a row share its probability (a +inf target has
  loss 0, a finite one +inf) and a row of -inf logits is uniform. ``pinned``,
  the row's maximum where it is infinite and NaN where it is not, equals no
  logit of a finite row (not even a NaN one): a compare with a per-row
  float, which XLA compiles faster than a per-row predicate
  (``(x == top) & isinf(top)``) broadcast across the classes (0.6-1.0x
  against 1.2-1.7x optax's CE time from 16 to 40 classes, the same from 48 on).
  """
  pinned = jnp.where(jnp.isinf(top), top, jnp.nan)
  return jnp.where(x == pinned, 0, x - top)


@_shift.defjvp
def _shift_jvp(primals, tangents):
  # d(x - top)/dx = 1 also where the value is pinned to 0, so an infinite logit
  # keeps the limit of its gradient; top is a constant (stop_gradient).
  return _shift(*primals), tangents[0]


def _selected_at_excluded(values: jax.Array, excluded: jax.Array, fill: jax.Array | float,
                          axis: int) -> jax.Array:
  """``values`` with ``fill`` at each row's excluded class, by a select against the class index."""
  column = jax.lax.broadcasted_iota(excluded.dtype, values.shape, axis)
  return jnp.where(column == excluded, fill, values)


def _at_excluded(values: jax.Array, excluded: jax.Array, axis: int, small: bool) -> jax.Array:
  """``values`` with 0 at each row's excluded class.

  Above `SMALL_CLASSES` the CPU scatters it; other platforms select at every
  class count (chosen per platform inside the program, as
  `jfocal.engine.numerics.fence`).
  """
  def select(values, excluded):
    return _selected_at_excluded(values, excluded, 0, axis)

  def scatter(values, excluded):
    return jnp.put_along_axis(values, excluded, jnp.zeros((), values.dtype), axis=axis,
                              inplace=False)

  if small:
    return select(values, excluded)
  return jax.lax.platform_dependent(values, excluded, cpu=scatter, default=select)


def _dot_with_excluded(others: jax.Array, fill: jax.Array, tangent: jax.Array,
                       excluded: jax.Array, axis: int) -> jax.Array:
  """``sum_c v_c tangent_c`` for ``v = others`` (0 at the excluded class) with ``fill`` there.

  A select against the class index, at every class count: its transpose
  writes the gradient in one elementwise loop, where a gathered tangent
  would add a scatter over the rows (slower from 40 to 256 classes and no
  faster above).
  """
  return jnp.sum(_selected_at_excluded(others, excluded, fill, axis) * tangent, axis=axis,
                 keepdims=True)


class _Parts(NamedTuple):
  """The pieces of the log-normaliser for one excluded class ``k`` per row (class axis kept)."""
  others: jax.Array     # exp(shifted), 0 at k
  rest: jax.Array       # the sum of others
  shifted_k: jax.Array
  exp_k: jax.Array      # exp(shifted_k)
  excess: jax.Array     # rest + expm1(shifted_k) = sum_c exp(shifted_c) - 1, without its rounding


def _normalizer_parts(shifted: jax.Array, excluded: jax.Array, axis: int, small: bool,
                      at_maximum: bool) -> _Parts:
  """`_Parts`, so that ``log_sum = log1p(excess)``.

  The derivative rules reuse ``others``: XLA on the CPU writes it to memory
  for its reduction kernel anyway, and the gradient then costs one
  multiplication per logit.
  """
  others = _at_excluded(jnp.exp(shifted), excluded, axis, small)
  rest = jnp.sum(others, axis=axis, keepdims=True)
  shifted_k = jnp.take_along_axis(shifted, excluded, axis=axis)
  if at_maximum:
    # shifted_k is 0 (NaN in a row with a NaN): exp and expm1 are exactly
    # 1 + shifted_k and shifted_k there, with the same first derivatives, so
    # the derivative rules (and the Hessian) are unchanged.
    return _Parts(others, rest, shifted_k, 1 + shifted_k, rest + shifted_k)
  return _Parts(others, rest, shifted_k, jnp.exp(shifted_k), rest + jnp.expm1(shifted_k))


def _log1p_of(excess: jax.Array) -> jax.Array:
  """``log_sum = log1p(excess)``, on XLA's vectorising CPU emitter (excess >= 0)."""
  return jnp.log1p(numerics.vectorising(excess, never=excess < 0))


def _inverse_sum(excess: jax.Array) -> jax.Array:
  """``1 / sum_c exp(shifted_c)``, the softmax's denominator, from ``excess`` (>= 0).

  A division, not ``exp(-log_sum)``: one transcendental less per row took
  softmax CE's value-and-grad from 1.26x to 1.14x optax's CE time at 51781 x 81
  (median of 80 paired rounds on the CPU).
  """
  return 1 / (1 + excess)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _log_sum(shifted: jax.Array, excluded: jax.Array, axis: int, small: bool,
             at_maximum: bool) -> jax.Array:
  """``log sum_c exp(shifted_c)``, as ``log1p(sum_{c != k} exp(shifted_c) + expm1(shifted_k))``."""
  return _log1p_of(_normalizer_parts(shifted, excluded, axis, small, at_maximum).excess)


@_log_sum.defjvp
def _log_sum_jvp(axis, small, at_maximum, primals, tangents):
  shifted, excluded = primals
  parts = _normalizer_parts(shifted, excluded, axis, small, at_maximum)
  # The softmax's numerators, with the excluded class's put back.
  tangent = _dot_with_excluded(parts.others, parts.exp_k, tangents[0], excluded, axis)
  return _log1p_of(parts.excess), tangent * _inverse_sum(parts.excess)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _excluded_nll(shifted: jax.Array, excluded: jax.Array, axis: int, small: bool,
                  at_maximum: bool) -> jax.Array:
  """``-log p_k = log_sum - shifted_k`` of the excluded class, with the class axis kept."""
  parts = _normalizer_parts(shifted, excluded, axis, small, at_maximum)
  return _log1p_of(parts.excess) - parts.shifted_k


@_excluded_nll.defjvp
def _excluded_nll_jvp(axis, small, at_maximum, primals, tangents):
  shifted, excluded = primals
  parts = _normalizer_parts(shifted, excluded, axis, small, at_maximum)
  # d(-log p_k) = sum_c p_c ds_c - ds_k. The coefficient of ds_k, p_k - 1, is
  # -rest / S: exact as p_k -> 1.
  tangent = _dot_with_excluded(parts.others, -parts.rest, tangents[0], excluded, axis)
  return _log1p_of(parts.excess) - parts.shifted_k, tangent * _inverse_sum(parts.excess)


class LogNormalizer(NamedTuple):
  """The negative log-probabilities of a row: ``-log p_c = log_sum - shifted_c``."""
  top: jax.Array        # max(x), a constant of the derivatives, the class axis kept
  shifted: jax.Array    # x - max(x), x's shape
  log_sum: jax.Array    # log sum_c exp(shifted_c), the class axis kept
  excluded: jax.Array   # -log p_k of the excluded class (the target id), the class axis kept


def log_normalizer(inputs: SoftmaxInputs) -> LogNormalizer:
  """The log-normaliser, computed so that ``-log p`` keeps its relative precision.

  ``shifted = x - max(x)`` and ``log_sum = log sum_c exp(shifted_c)``,
  computed as ``log1p(sum_{c != k} exp(shifted_c) + expm1(shifted_k))`` for
  one excluded class ``k`` per row: the target (class ids) or the row's
  maximum (dense targets). Where ``p_k -> 1`` the loss
  ``-log p_k = log1p(small) - shifted_k`` then keeps its relative precision
  instead of rounding ``log(1 + small)``; the sum of the other classes never
  cancels (with ``k`` the maximum, ``expm1(0) = 0``; otherwise it holds the
  maximum's 1). Both have analytic derivatives (the softmax, and the softmax
  minus the one-hot at ``k``); XLA removes whichever a loss does not use.
  """
  x, axis = inputs.x, inputs.axis
  small = inputs.num_classes <= SMALL_CLASSES
  top = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  shifted = _shift(x, top)
  excluded = inputs.ids if inputs.ids is not None else jnp.argmax(x, axis=axis)
  excluded = jnp.expand_dims(excluded, axis)
  at_maximum = inputs.ids is None
  return LogNormalizer(top, shifted, _log_sum(shifted, excluded, axis, small, at_maximum),
                       _excluded_nll(shifted, excluded, axis, small, at_maximum))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def class_sum(targets: jax.Array, terms: jax.Array, axis: int) -> jax.Array:
  """``sum_c targets_c terms_c``, where a class without target mass adds 0 even if its term is +inf.

  The derivative is the product rule's: with respect to a target it is the
  class's term, also where the target is 0 (the guard of the value, which
  keeps ``0 * inf`` out, does not cut it).
  """
  return jnp.sum(jnp.where(targets == 0, 0, targets * terms), axis=axis)


@functools.partial(class_sum.defjvp, symbolic_zeros=True)
def _class_sum_jvp(axis, primals, tangents):
  targets, terms = primals
  targets_dot, terms_dot = tangents
  value = class_sum(targets, terms, axis)
  tangent = jnp.zeros_like(value)
  if not isinstance(terms_dot, SymbolicZero):
    tangent = tangent + jnp.sum(targets * terms_dot, axis=axis)
  if not isinstance(targets_dot, SymbolicZero):
    tangent = tangent + jnp.sum(terms * targets_dot, axis=axis)
  return value, tangent


def checked_alpha(alpha: Any, inputs: SoftmaxInputs) -> jax.Array | None:
  """A per-class vector of shape ``(C,)`` in the compute dtype (values checked by `program`)."""
  if alpha is None:
    return None
  if np.ndim(alpha) == 0:
    raise ValueError(
        "alpha of a softmax loss must be a per-class vector of shape "
        f"({inputs.num_classes},); got a number. For the background-style vector "
        "[alpha, 1 - alpha, ...] use jfocal.background_alpha(alpha, num_classes)")
  return checks.check_alpha(alpha, inputs.num_classes, allow_scalar=False).astype(inputs.dtype)


def along_classes(values: jax.Array, inputs: SoftmaxInputs) -> jax.Array:
  """A per-class vector of shape ``(C,)`` shaped to broadcast along the class axis of ``x``."""
  return jnp.expand_dims(values, tuple(range(1, inputs.x.ndim - inputs.axis)))


def example_loss(inputs: SoftmaxInputs, term: Callable[[jax.Array], jax.Array], *,
                 alpha: Any = None, z_loss: Any = 0.0) -> jax.Array:
  """``sum_c alpha_c y_c term(-log p_c) + z_loss lse**2`` per example, before weights and masks.

  ``term`` maps negative log-probabilities (>= 0, +inf for a class of
  probability 0) to the loss of a class, elementwise. With class ids the
  target's term is gathered, and label smoothing adds ``eps / K`` of every
  class's term (``K`` the number of classes, or of unmasked classes).
  ``z_loss`` (a number >= 0 or a traced scalar) adds the square of the
  log-normaliser ``lse = log sum_c exp(x_c)``, from the same pass: its
  derivative ``2 z_loss lse softmax(x)`` reuses the softmax's numerators.
  """
  z_loss = checks.parameter(z_loss, "z_loss")
  if inputs.num_classes == 0:  # every row is masked (see `prepare`)
    checked_alpha(alpha, inputs)
    return jnp.zeros(inputs.x.shape[:inputs.axis] + inputs.x.shape[inputs.axis + 1:],
                     inputs.dtype)
  normalizer = log_normalizer(inputs)
  loss = _class_terms(inputs, normalizer, term, alpha)
  if numerics.is_static_zero(z_loss):
    return loss
  lse = jnp.squeeze(normalizer.top + normalizer.log_sum, inputs.axis)
  if inputs.mask is not None:  # a row without classes has lse = -inf, and 0 * inf gradients
    lse = jnp.where(inputs.mask, lse, 0)
  z = z_loss if isinstance(z_loss, float) else z_loss.astype(inputs.dtype)
  # lse * (z lse) rather than z lse**2: its derivative never forms 2 lse, which
  # overflows for logits near the largest float.
  return loss + lse * (z * lse)


def _class_terms(inputs: SoftmaxInputs, normalizer: LogNormalizer,
                 term: Callable[[jax.Array], jax.Array], alpha: Any) -> jax.Array:
  axis, classes, eps = inputs.axis, inputs.classes, inputs.label_smoothing
  alpha = checked_alpha(alpha, inputs)
  class_weights = None if alpha is None else along_classes(alpha, inputs)
  # The classes label smoothing spreads over, per example.
  choices: Any = inputs.num_classes
  if classes is not None:
    choices = jnp.maximum(jnp.sum(classes, axis=axis, dtype=inputs.dtype), 1)

  def all_terms() -> jax.Array:
    n = normalizer.log_sum - normalizer.shifted
    if classes is not None:  # masked classes: term(0) = 0, with finite derivatives
      n = jnp.where(classes, n, 0)
    return term(n)

  if inputs.ids is None:
    targets = inputs.targets
    assert targets is not None  # `prepare` gives dense targets where there are no ids
    if eps:
      targets = reducing.smooth(targets, eps, choices if classes is None
                                else jnp.expand_dims(choices, axis))
      if classes is not None:
        targets = jnp.where(classes, targets, 0)
    if class_weights is not None:
      targets = targets * class_weights
    return class_sum(targets, all_terms(), axis)

  n = jnp.squeeze(normalizer.excluded, axis)
  if inputs.kept is not None:  # a masked target class adds nothing
    n = jnp.where(inputs.kept, n, 0)
  loss = term(n)
  if alpha is not None:
    loss = reducing.scale(loss, reducing.per_class_values(alpha, inputs.ids))
  if eps:
    # (1 - eps) one_hot + eps / K, expanded so that the one-hot never exists.
    uniform = jnp.ones((), inputs.dtype) if class_weights is None else class_weights
    if classes is not None:
      uniform = jnp.where(classes, uniform, 0)
    spread = class_sum(uniform, all_terms(), axis)
    loss = reducing.scale(loss, 1 - eps) + eps / choices * spread
  return loss


def reduce(loss: jax.Array, inputs: SoftmaxInputs, *, reduction: Any, normalizer: Any,
           axis_name: Any) -> jax.Array:
  """NaN for invalid ids, the weights, the mask, then the reduction."""
  loss = reducing.weigh(loss, weights=inputs.weights, mask=inputs.mask, invalid=inputs.invalid)
  return reducing.reduce(loss, mask=inputs.mask, positives=inputs.positives,
                         reduction=reduction, normalizer=normalizer,
                         out_dtype=inputs.out_dtype, axis_name=axis_name)
