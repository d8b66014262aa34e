"""Run-time validation of values, for the first steps of a training run."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
from jax.core import Tracer
from jax.experimental import checkify

from jfocal.engine.program import REGISTRY, LossInfo

P = ParamSpec("P")
R = TypeVar("R")


def checked(loss_fn: Callable[P, R], *, finite_logits: bool = False) -> Callable[P, R]:
  """Wraps a jfocal loss so that bad *values* raise instead of training a broken model.

  Shapes and dtypes are checked at trace time by every loss; values cannot be,
  because under ``jax.jit`` they are unknown. The returned function has the
  same signature and results as ``loss_fn`` and, with
  ``jax.experimental.checkify``, checks at run time that

  - integer labels are class ids (``[0, C)``; ``[0, C]`` for the sigmoid
    family, where ``C`` is background), dense integer targets are 0 or 1, or
    they equal ``ignore_index``;
  - float labels (and quality scores) lie in [0, 1];
  - ``weights`` are finite and >= 0, an array or number ``normalizer`` is
    finite and > 0;
  - every hyper-parameter lies in its range, also when it is traced:
    ``alpha`` in [0, 1] (sigmoid) or finite and >= 0 (softmax), ``gamma``,
    ``beta`` >= 0, ``pos_weight`` > 0, ``epsilon`` >= -1, ``momentum`` in
    [0, 1), as each loss documents;
  - with ``finite_logits=True``, every logit is finite.

  Entries masked by ``where`` are not checked. A failing check raises an
  exception whose message names the argument, the first offending index and
  its value: eagerly a ``checkify`` ``JaxRuntimeError``, under ``jax.jit`` the
  runtime error of a host callback that carries the same message. Works under
  ``jax.jit``, ``jax.vmap`` and ``jax.grad``, for every jfocal loss.

  The checks read every label, weight and (optionally) logit once more and add
  a host callback per call: on the 2-core CPU of ``make bench`` they added
  10-40% to a value-and-grad step of 4M logits (see README). Use it for the first steps of a
  run or while debugging a data pipeline, then drop the wrapper.

  Args:
    loss_fn: a jfocal loss, e.g. ``jfocal.sigmoid_focal_loss``.
    finite_logits: also require finite logits.

  Returns:
    A function with the signature of ``loss_fn``.

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> loss = jfocal.checked(jfocal.softmax_focal_loss)
    >>> logits = jnp.zeros((3, 4))
    >>> float(loss(logits, jnp.array([0, 3, 1]), reduction="sum")) > 0
    True
    >>> loss(logits, jnp.array([0, 4, 1]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    jax...JaxRuntimeError: labels: integer labels must be class ids in [0, 3]; first offending index [1] holds 4...

  References:
    JAX, `checkify <https://docs.jax.dev/en/latest/debugging/checkify_guide.html>`_.
  """
  info = REGISTRY.get(loss_fn)
  if info is None:
    raise TypeError(f"checked() wraps one of the jfocal losses; got {loss_fn!r}")
  signature = inspect.signature(loss_fn)

  @functools.wraps(loss_fn)
  def checked_loss(*args: P.args, **kwargs: P.kwargs) -> R:
    call = signature.bind(*args, **kwargs)
    call.apply_defaults()

    def checked_call():
      _check_values(info, call.arguments, finite_logits)
      return loss_fn(*args, **kwargs)

    error, loss = checkify.checkify(checked_call)()
    if any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(error)):
      jax.debug.callback(lambda concrete: concrete.throw(), error)
    else:
      error.throw()
    return loss

  return checked_loss


def _require(ok: jax.Array, values: jax.Array, name: str, expected: str) -> None:
  """checkify.check that `ok` holds everywhere, reporting the first offending entry."""
  ok, values = jnp.broadcast_arrays(ok, values)
  if ok.size == 0:  # nothing to check (an empty batch, or no classes)
    return
  first = jnp.argmax(~ok.ravel())
  index = jnp.stack(jnp.unravel_index(first, ok.shape)) if ok.ndim else jnp.zeros((0,), int)
  checkify.check(jnp.all(ok), f"{name}: {expected}; first offending index {{index}} holds "
                 "{value}", index=index, value=values.ravel()[first] if ok.ndim else values)


def _class_axes(info: LossInfo, arguments: dict[str, Any], ndim: int) -> tuple[int, ...]:
  if info.family != "softmax":  # sigmoid: the class axis; linear_softmax: the feature axis
    return (ndim - 1,) if ndim else ()
  axis = arguments.get("axis", -1)
  return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _check_values(info: LossInfo, arguments: dict[str, Any], finite_logits: bool) -> None:
  logits_name = next(iter(arguments))
  logits = jnp.asarray(arguments[logits_name])
  labels, scores = arguments[info.labels], None
  if isinstance(labels, tuple):  # (class_ids, scores)
    labels, scores = labels
  labels = jnp.asarray(labels)
  axes = _class_axes(info, arguments, logits.ndim)
  num_classes = math.prod(logits.shape[a] for a in axes)
  if info.family == "linear_softmax":  # the kernel's columns, on every device of the vocabulary
    vocab_axis = arguments.get("vocab_axis_name")
    shards = 1 if vocab_axis is None else jax.lax.axis_size(vocab_axis)
    num_classes = jnp.shape(arguments["kernel"])[1] * shards
  where = arguments.get("where")
  where = None if where is None else jnp.asarray(where)
  per_logit = where is not None and where.ndim == logits.ndim
  ids = jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape != logits.shape
  # Which labels are checked: those of unmasked rows (ids) or entries (dense).
  checked_labels: Any = True
  if where is not None:
    if per_logit or info.family == "sigmoid":
      full = jnp.broadcast_to(where, logits.shape)
      checked_labels = jnp.any(full, axis=axes) if ids else full
    else:
      loss_shape = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
      rows = jnp.broadcast_to(where, loss_shape)
      checked_labels = rows if ids else jnp.expand_dims(rows, axes)
  ignore_index = arguments.get("ignore_index")

  if jnp.issubdtype(labels.dtype, jnp.integer):
    if ids:
      top = num_classes if info.family == "sigmoid" else num_classes - 1
      ok = (labels >= 0) & (labels <= top)
      expected = f"integer labels must be class ids in [0, {top}]"
    else:
      ok = (labels == 0) | (labels == 1)
      expected = "integer targets with the shape of logits must be 0 or 1"
    if ignore_index is not None:
      ok = ok | (labels == ignore_index)
      expected += f" or ignore_index={ignore_index}"
    _require(ok | ~jnp.asarray(checked_labels), labels, info.labels, expected)
  else:
    ok = (labels >= 0) & (labels <= 1)
    _require(ok | ~jnp.asarray(checked_labels), labels, info.labels,
             "float labels must lie in [0, 1]")
  if scores is not None:
    scores = jnp.asarray(scores)
    _require(((scores >= 0) & (scores <= 1)) | ~jnp.asarray(checked_labels), scores, "scores",
             "scores must lie in [0, 1]")
  if arguments.get("weights") is not None:
    weights = jnp.asarray(arguments["weights"])
    _require(jnp.isfinite(weights) & (weights >= 0), weights, "weights",
             "weights must be finite and >= 0")
  for name, bound in info.bounds.items():
    value = arguments.get(name)
    if value is not None:
      value = jnp.asarray(value)
      _require(bound.holds(value, jnp), value, name, f"{name} must {bound.describe()}")
  normalizer = arguments.get("normalizer")
  if normalizer is not None and not isinstance(normalizer, str):
    normalizer = jnp.asarray(normalizer)
    _require(jnp.isfinite(normalizer) & (normalizer > 0), normalizer, "normalizer",
             "normalizer must be finite and > 0")
  if finite_logits:
    _require(jnp.isfinite(logits), logits, logits_name, f"{logits_name} must be finite")

