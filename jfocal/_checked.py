"""Run-time validation of values, for the first steps of a training run."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jfocal import _sigmoid, _softmax


def checked(loss_fn: Callable[..., jax.Array], *,
            finite_logits: bool = False) -> Callable[..., jax.Array]:
  """Wraps a jfocal loss so that bad *values* raise instead of training a broken model.

  Shapes and dtypes are checked at trace time by every loss; values cannot be,
  because under ``jax.jit`` they are unknown. The returned function has the
  same signature and results as ``loss_fn`` and, with
  ``jax.experimental.checkify``, checks at run time that

  - integer labels are class ids (``[0, C)``; ``[0, C]`` for the sigmoid
    family, where ``C`` is background) or equal ``ignore_index``;
  - float labels lie in [0, 1];
  - ``weights`` are finite and >= 0, ``alpha`` lies in [0, 1] (sigmoid) or is
    finite and >= 0 (softmax), an array or
    number ``normalizer`` is finite and > 0;
  - with ``finite_logits=True``, every logit is finite.

  Entries masked by ``where`` are not checked. A failing check raises an
  exception whose message names the argument, the first offending index and
  its value: eagerly a ``checkify`` ``JaxRuntimeError``, under ``jax.jit`` the
  runtime error of a host callback that carries the same message. Works under
  ``jax.jit``, ``jax.vmap`` and ``jax.grad``.

  The checks read every label, weight and (optionally) logit once more and add
  a host callback per call: on the 2-core CPU of ``make bench`` they added
  10-40% to a value-and-grad step of 4M logits (see README). Use it for the first steps of a
  run or while debugging a data pipeline, then drop the wrapper.

  Args:
    loss_fn: one of the six jfocal losses.
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
  family = _FAMILIES.get(loss_fn)
  if family is None:
    raise TypeError(f"checked() wraps one of the jfocal losses; got {loss_fn!r}")

  @functools.wraps(loss_fn)
  def checked_loss(logits: Any, labels: Any, **options: Any) -> jax.Array:
    def checked_call():
      _check_values(family, logits, labels, options, finite_logits)
      return loss_fn(logits, labels, **options)

    error, loss = checkify.checkify(checked_call)()
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(error)):
      jax.debug.callback(lambda concrete: concrete.throw(), error)
    else:
      error.throw()
    return loss

  return checked_loss


_FAMILIES = {
    _sigmoid.sigmoid_cross_entropy: "sigmoid",
    _sigmoid.sigmoid_balanced_cross_entropy: "sigmoid",
    _sigmoid.sigmoid_focal_loss: "sigmoid",
    _softmax.softmax_cross_entropy: "softmax",
    _softmax.softmax_balanced_cross_entropy: "softmax",
    _softmax.softmax_focal_loss: "softmax",
}


def _require(ok: jax.Array, values: jax.Array, name: str, expected: str) -> None:
  """checkify.check that `ok` holds everywhere, reporting the first offending entry."""
  ok, values = jnp.broadcast_arrays(ok, values)
  first = jnp.argmax(~ok.ravel())
  index = jnp.stack(jnp.unravel_index(first, ok.shape)) if ok.ndim else jnp.zeros((0,), int)
  checkify.check(jnp.all(ok), f"{name}: {expected}; first offending index {{index}} holds "
                 "{value}", index=index, value=values.ravel()[first] if ok.ndim else values)


def _check_values(family: str, logits: Any, labels: Any, options: dict[str, Any],
                  finite_logits: bool) -> None:
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  where = options.get("where")
  if family == "sigmoid":
    axis = logits.ndim - 1
    loss_shape = logits.shape
  else:
    axis = options.get("axis", -1) % max(logits.ndim, 1)
    loss_shape = logits.shape[:axis] + logits.shape[axis + 1:]
  checked_entries = True if where is None else jnp.broadcast_to(jnp.asarray(where), loss_shape)

  if jnp.issubdtype(labels.dtype, jnp.integer):
    num_classes = logits.shape[axis]
    top = num_classes if family == "sigmoid" else num_classes - 1
    ok = (labels >= 0) & (labels <= top)
    expected = f"integer labels must be class ids in [0, {top}]"
    if options.get("ignore_index") is not None:
      ok = ok | (labels == options["ignore_index"])
      expected += f" or ignore_index={options['ignore_index']}"
    if family == "sigmoid" and where is not None:
      checked_entries = jnp.any(checked_entries, axis=-1)
    _require(ok | ~jnp.asarray(checked_entries), labels, "labels", expected)
  else:
    if family == "softmax" and where is not None:
      checked_entries = jnp.expand_dims(checked_entries, axis)
    ok = (labels >= 0) & (labels <= 1)
    _require(ok | ~jnp.asarray(checked_entries), labels, "labels",
             "float labels must lie in [0, 1]")
  if options.get("weights") is not None:
    weights = jnp.asarray(options["weights"])
    _require(jnp.isfinite(weights) & (weights >= 0), weights, "weights",
             "weights must be finite and >= 0")
  if options.get("alpha") is not None:
    alpha = jnp.asarray(options["alpha"])
    if family == "sigmoid":  # negatives get 1 - alpha
      _require((alpha >= 0) & (alpha <= 1), alpha, "alpha", "alpha must lie in [0, 1]")
    else:
      _require(jnp.isfinite(alpha) & (alpha >= 0), alpha, "alpha",
               "alpha must be finite and >= 0")
  normalizer = options.get("normalizer")
  if normalizer is not None and not isinstance(normalizer, str):
    normalizer = jnp.asarray(normalizer)
    _require(jnp.isfinite(normalizer) & (normalizer > 0), normalizer, "normalizer",
             "normalizer must be finite and > 0")
  if finite_logits:
    _require(jnp.isfinite(logits), logits, "logits", "logits must be finite")
