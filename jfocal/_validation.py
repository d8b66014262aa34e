"""Trace-time argument checks shared by every loss.

Everything here looks only at Python values, shapes and dtypes, so it runs the
same way eagerly and while `jax.jit` traces. Values that are only known at run
time (traced alpha, weights, labels) are left to the caller.

chex does the shape and dtype assertions; its `AssertionError` is turned into
the `ValueError` or `TypeError` a user expects, with a sentence naming the
argument, what was seen and what was expected in front of chex's own detail.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")
NUM_POSITIVES = "num_positives"


def require(assertion: Callable[..., Any], *args: Any, error: type[Exception] = ValueError,
            message: str, **kwargs: Any) -> None:
  """Runs a chex assertion and re-raises its failure as `error(message)`."""
  try:
    assertion(*args, **kwargs)
  except AssertionError as chex_error:
    raise error(f"{message} [{chex_error}]") from None


_KINDS = {float: jnp.floating, int: jnp.integer, bool: jnp.bool_}


def require_kind(value: jax.Array, kinds: tuple[type, ...], message: str) -> None:
  """TypeError(message) unless `value`'s dtype is one of `kinds` (float, int, bool)."""
  if len(kinds) == 1:
    require(chex.assert_type, value, kinds[0], error=TypeError, message=message)
  elif not any(jnp.issubdtype(value.dtype, _KINDS[kind]) for kind in kinds):
    raise TypeError(message)


def as_array(value: Any, name: str) -> jax.Array:
  try:
    return jnp.asarray(value)
  except TypeError as err:
    raise TypeError(f"{name} must be an array or a number; got {type(value).__name__}") from err


def compute_dtype(logits: jax.Array) -> np.dtype:
  """float32 for half-precision logits, their own dtype otherwise."""
  require(chex.assert_type, logits, float, error=TypeError,
          message=f"logits must be a floating-point array; got dtype {logits.dtype}. "
          "Cast them, e.g. logits.astype(jnp.float32)")
  return wide_float(logits.dtype)


def wide_float(dtype: Any) -> np.dtype:
  """The dtype to compute in: float64 stays, every narrower float becomes float32."""
  return np.dtype(jnp.float64) if np.dtype(dtype) == np.dtype(jnp.float64) else np.dtype(jnp.float32)


def is_concrete(value: Any) -> bool:
  return not isinstance(value, jax.core.Tracer)


def static_number(value: Any, name: str, *, minimum: float = -math.inf,
                  maximum: float = math.inf) -> float:
  """A Python float from a static number, checked against [minimum, maximum]."""
  require_static(value, name)
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, numbers.Real) or (hasattr(value, "shape") and np.shape(value) == ())):
    raise TypeError(f"{name} must be a real number; got {value!r}")
  number = float(value)
  if not (math.isfinite(number) and minimum <= number <= maximum):
    bounds = f"[{minimum:g}, {maximum:g}]" if math.isfinite(maximum) else f">= {minimum:g}"
    raise ValueError(f"{name} must be a finite number {bounds}; got {number!r}")
  return number


def require_static(value: Any, name: str) -> None:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a static Python value because it specialises the compiled "
        f"code; got a traced array {value.aval}. Pass it as a Python value, or mark it "
        f"static (jax.jit(..., static_argnames=...))")


def static_option(value: Any, name: str) -> Any:
  """A hashable Python value for an option that specialises the compiled code."""
  require_static(value, name)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
    return value.item()
  try:
    hash(value)
  except TypeError:
    raise TypeError(f"{name} must be a static Python value (a number, string, tuple or "
                    f"None); got {value!r}") from None
  return value


def check_gamma(gamma: Any) -> float:
  return static_number(gamma, "gamma", minimum=0.0)


def check_label_smoothing(label_smoothing: Any) -> float:
  return static_number(label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0)


def check_probabilities(values: Any, name: str, *, maximum: float = 1.0) -> None:
  """Checks that concrete values lie in [0, maximum] (finite and >= 0 for an infinite maximum).

  Traced arrays are left alone. Takes the caller's object rather than a `jnp`
  array made from it: under `jax.jit` even a Python constant becomes a tracer
  once converted. None and non-real dtypes are left to the checks of the
  argument's kind.
  """
  if values is None or not is_concrete(values):
    return
  dtype = as_array(values, name).dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    return
  host = np.asarray(values, dtype=np.float64)
  bad = ~((host >= 0.0) & (host <= maximum) & np.isfinite(host))
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0]) if host.ndim else ()
    expected = f"lie in [0, {maximum:g}]" if math.isfinite(maximum) else "be finite and >= 0"
    raise ValueError(f"{name} must {expected}; got {host[index]!r} at index {index}")


def check_alpha(alpha: Any, num_classes: int | None, *, allow_scalar: bool,
                maximum: float = 1.0) -> jax.Array:
  """A number (if allowed) or a per-class vector of length `num_classes`, in [0, maximum].

  `num_classes` is None for logits without a class axis, where only a number fits.
  """
  raw, alpha = alpha, as_array(alpha, "alpha")
  require_kind(alpha, (float, int),
               message=f"alpha must hold real numbers; got dtype {alpha.dtype}")
  expected = f"a per-class vector of shape ({num_classes},)"
  if allow_scalar:
    if alpha.ndim == 0:
      check_probabilities(raw, "alpha", maximum=maximum)
      return alpha
    if num_classes is None:
      raise ValueError(f"alpha must be a number for logits without a class axis; "
                       f"got shape {alpha.shape}")
    expected = f"a number or {expected}"
  require(chex.assert_rank, alpha, 1,
          message=f"alpha must be {expected}; got shape {alpha.shape}")
  require(chex.assert_shape, alpha, (num_classes,),
          message=f"alpha must have one entry per class, shape ({num_classes},); "
          f"got shape {alpha.shape}")
  check_probabilities(raw, "alpha", maximum=maximum)
  return alpha


def check_reduction(reduction: Any, normalizer: Any) -> None:
  if not isinstance(reduction, str) or reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
  if normalizer is None:
    return
  if reduction != "mean":
    raise ValueError(
        f"normalizer is only used with reduction='mean' (it replaces the mean's "
        f"denominator); got normalizer={normalizer!r} with reduction={reduction!r}")
  if isinstance(normalizer, str):
    if normalizer != NUM_POSITIVES:
      raise ValueError(f"normalizer must be a number, a scalar array or "
                       f"{NUM_POSITIVES!r}; got the string {normalizer!r}")
    return
  array = as_array(normalizer, "normalizer")
  require_kind(array, (float, int),
               message=f"normalizer must be a real number; got dtype {array.dtype}")
  require(chex.assert_rank, array, 0,
          message=f"normalizer must be a scalar (it divides the summed loss); "
          f"got shape {array.shape}")


def check_broadcastable(value: jax.Array, shape: tuple[int, ...], name: str) -> None:
  require(chex.assert_is_broadcastable, value.shape, shape,
          message=f"{name} of shape {value.shape} must broadcast to the unreduced loss "
          f"shape {shape}")


def check_mask(where: Any, shape: tuple[int, ...]) -> jax.Array:
  where = as_array(where, "where")
  require(chex.assert_type, where, bool, error=TypeError,
          message=f"where must be a boolean mask; got dtype {where.dtype}")
  check_broadcastable(where, shape, "where")
  return where


def check_weights(weights: Any, shape: tuple[int, ...]) -> jax.Array:
  weights = as_array(weights, "weights")
  require_kind(weights, (float, int),
               message=f"weights must hold real numbers; got dtype {weights.dtype}")
  check_broadcastable(weights, shape, "weights")
  return weights


def check_ignore_index(ignore_index: Any, labels: jax.Array) -> int | None:
  if ignore_index is None:
    return None
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f"ignore_index applies to integer class labels; got labels of dtype {labels.dtype}. "
        "Use where= to mask float labels")
  if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
    raise TypeError(f"ignore_index must be a Python int; got {ignore_index!r}")
  return int(ignore_index)


def check_labels_dtype(labels: jax.Array) -> None:
  require_kind(labels, (float, int, bool),
               message=f"labels must be integer class ids, or float or bool targets; "
          f"got dtype {labels.dtype}")


def check_same_shape(labels: jax.Array, logits: jax.Array, what: str) -> None:
  require(chex.assert_equal_shape, [labels, logits],
          message=f"{what} labels must have the shape of logits {logits.shape}; "
          f"got {labels.shape}")


def check_class_id_shape(labels: jax.Array, expected: tuple[int, ...], hint: str) -> None:
  require(chex.assert_shape, labels, expected,
          message=f"integer class-id labels must have shape {expected} ({hint}); "
          f"got {labels.shape}")


def check_scalar_parameter(value: Any, name: str, *, minimum: float = -math.inf,
                           maximum: float = math.inf, open_maximum: bool = False) -> jax.Array:
  """A real scalar that may be traced, as an array; its value is checked when concrete."""
  if isinstance(value, (str, bool, np.bool_)) or value is None:
    raise TypeError(f"{name} must be a real number or a scalar array; got {value!r}")
  array = as_array(value, name)
  require_kind(array, (float, int), message=f"{name} must be a real number; got dtype {array.dtype}")
  require(chex.assert_rank, array, 0,
          message=f"{name} must be a scalar (a number or a 0-d array); got shape {array.shape}")
  if is_concrete(value):
    number = float(np.asarray(value))
    above = number < maximum if open_maximum else number <= maximum
    if not (math.isfinite(number) and minimum <= number and above):
      if math.isfinite(minimum) and math.isfinite(maximum):
        bounds = f" in [{minimum:g}, {maximum:g}{')' if open_maximum else ']'}"
      elif math.isfinite(minimum):
        bounds = f" >= {minimum:g}"
      else:
        bounds = ""
      raise ValueError(f"{name} must be a finite number{bounds}; got {number!r}")
  return array


def check_scores(scores: Any, shape: tuple[int, ...]) -> jax.Array:
  """Per-anchor quality scores: floats with the shape of the class ids."""
  scores = as_array(scores, "scores")
  require_kind(scores, (float,), message=f"scores must be float quality targets in [0, 1]; "
               f"got dtype {scores.dtype}")
  if scores.shape != shape:
    raise ValueError(f"scores must have the shape of the class ids {shape}, one score per "
                     f"anchor; got shape {scores.shape}")
  return scores
