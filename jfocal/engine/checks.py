"""Trace-time argument checks shared by every loss.

Everything here looks only at Python values, shapes and dtypes, so it runs the
same way eagerly and while `jax.jit` traces. Values are checked only where
they are concrete (`check_bounds`, called by `jfocal.engine.program` before
the program is traced); traced values are left to `jfocal.checked`.

chex does the shape and dtype assertions; its `AssertionError` is turned into
the `ValueError` or `TypeError` a user expects, with a sentence naming the
argument, what was seen and what was expected in front of chex's own detail.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

REDUCTIONS = ("none", "sum", "mean")
NUM_POSITIVES = "num_positives"


class Bound(NamedTuple):
  """The interval a hyper-parameter's values must lie in (every entry, for a vector)."""
  low: float = 0.0
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False

  def holds(self, values: Any, xp: Any = np) -> Any:
    """Where ``values`` lie in the interval, with NumPy or (``xp=jnp``) traced."""
    above = values > self.low if self.low_open else values >= self.low
    below = values < self.high if self.high_open else values <= self.high
    return xp.isfinite(values) & above & below

  def describe(self) -> str:
    if not math.isfinite(self.low) and not math.isfinite(self.high):
      return "be finite"
    if math.isfinite(self.high):
      return (f"lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
              f"{')' if self.high_open else ']'}")
    return f"be finite and {'>' if self.low_open else '>='} {self.low:g}"


FINITE = Bound(-math.inf)
NON_NEGATIVE = Bound()
POSITIVE = Bound(low_open=True)
UNIT = Bound(0.0, 1.0)


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


def result_float(dtype: Any) -> np.dtype:
  """The dtype of a helper's result: a float input's compute dtype, else JAX's default float."""
  if jnp.issubdtype(dtype, jnp.floating):
    return wide_float(dtype)
  return np.dtype(jnp.asarray(0.0).dtype)  # float64 under jax_enable_x64, else float32


def is_concrete(value: Any) -> bool:
  return not isinstance(value, Tracer)


def check_bounds(value: Any, name: str, bound: Bound) -> None:
  """Checks that a concrete value (every entry of an array) lies in `bound`.

  Traced arrays, None and non-real dtypes are left alone (the latter for the
  checks of the argument's kind). Takes the caller's object rather than a
  `jnp` array made from it: under `jax.jit` even a Python constant becomes a
  tracer once converted.
  """
  if value is None or not is_concrete(value) or isinstance(value, (str, tuple, list)):
    return
  if isinstance(value, (bool, np.bool_)):
    return
  dtype = np.asarray(value).dtype
  if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
          or dtype == jnp.bfloat16):
    return
  host = np.asarray(value, dtype=np.float64)
  bad = ~bound.holds(host)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0]) if host.ndim else ()
    where = f" at index {index}" if host.ndim else ""
    raise ValueError(f"{name} must {bound.describe()}; got {host[index]!r}{where}")


def static_number(value: Any, name: str, bound: Bound = FINITE) -> float:
  """A Python float from a static number, checked against `bound`."""
  require_static(value, name)
  if isinstance(value, (bool, np.bool_)) or not (
      isinstance(value, numbers.Real) or (hasattr(value, "shape") and np.shape(value) == ())):
    raise TypeError(f"{name} must be a real number; got {value!r}")
  number = float(value)
  check_bounds(number, name, bound)
  return number


def require_static(value: Any, name: str) -> None:
  if isinstance(value, Tracer):
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


def scalar(value: Any, name: str) -> jax.Array:
  """A real scalar that may be traced (a hyper-parameter such as epsilon), as an array."""
  if isinstance(value, (str, bool, np.bool_)) or value is None:
    raise TypeError(f"{name} must be a real number or a scalar array; got {value!r}")
  array = as_array(value, name)
  require_kind(array, (float, int), message=f"{name} must be a real number; got dtype {array.dtype}")
  require(chex.assert_rank, array, 0,
          message=f"{name} must be a scalar (a number or a 0-d array); got shape {array.shape}")
  return array


def is_traced(value: Any) -> bool:
  """Whether a hyper-parameter is traced: a JAX or NumPy array (as under a caller's
  `jax.jit`, where both are tracers). Python and NumPy scalar numbers are static and
  specialise the program."""
  return isinstance(value, (jax.Array, np.ndarray))


def parameter(value: Any, name: str) -> float | jax.Array:
  """A hyper-parameter as a core takes it: a static Python float, or a traced scalar array
  (`is_traced`). Bounds are checked by `program` before tracing, where values are concrete.
  """
  if is_traced(value):
    array = scalar(value, name)
    return array if jnp.issubdtype(array.dtype, jnp.floating) else array.astype(float)
  return static_number(value, name)


def check_label_smoothing(label_smoothing: Any) -> float:
  return static_number(label_smoothing, "label_smoothing", UNIT)


def check_alpha(alpha: Any, num_classes: int | None, *, allow_scalar: bool,
                name: str = "alpha") -> jax.Array:
  """A number (if allowed) or a per-class vector of length `num_classes` (shape and dtype only).

  `num_classes` is None for logits without a class axis, where only a number fits.
  `name` is the argument's name (``alpha``, ``class_priors``), for error messages.
  """
  alpha = as_array(alpha, name)
  require_kind(alpha, (float, int),
               message=f"{name} must hold real numbers; got dtype {alpha.dtype}")
  expected = f"a per-class vector of shape ({num_classes},)"
  if allow_scalar:
    if alpha.ndim == 0:
      return alpha
    if num_classes is None:
      raise ValueError(f"{name} must be a number for logits without a class axis; "
                       f"got shape {alpha.shape}")
    expected = f"a number or {expected}"
  require(chex.assert_rank, alpha, 1,
          message=f"{name} must be {expected}; got shape {alpha.shape}")
  require(chex.assert_shape, alpha, (num_classes,),
          message=f"{name} must have one entry per class, shape ({num_classes},); "
          f"got shape {alpha.shape}")
  return alpha


def class_counts(counts: Any) -> jax.Array:
  """A vector of per-class counts, shape ``(C,)`` with ``C >= 1`` (shape and dtype only)."""
  array = as_array(counts, "counts")
  require_kind(array, (int, float), message=f"counts must be real numbers; got dtype {array.dtype}")
  if array.ndim != 1 or array.shape[0] == 0:
    raise ValueError(f"counts must be a vector with one count per class, shape (C,) with "
                     f"C >= 1; got shape {array.shape}")
  return array


def check_per_class(value: Any, name: str, num_classes: int | None) -> jax.Array:
  """A real number or a per-class vector of shape ``(C,)`` (``pos_weight``)."""
  array = as_array(value, name)
  require_kind(array, (float, int), message=f"{name} must hold real numbers; got dtype "
               f"{array.dtype}")
  if array.ndim == 0:
    return array
  if num_classes is None or array.shape != (num_classes,):
    raise ValueError(f"{name} must be a number or a per-class vector of shape "
                     f"({num_classes},); got shape {array.shape}")
  return array


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


def check_broadcastable(value: jax.Array, shape: tuple[int, ...], name: str, target: str) -> None:
  require(chex.assert_is_broadcastable, value.shape, shape,
          message=f"{name} of shape {value.shape} must broadcast to {target} {shape}")


def check_mask(where: Any, shape: tuple[int, ...], target: str = "the unreduced loss shape"
               ) -> jax.Array:
  where = as_array(where, "where")
  require(chex.assert_type, where, bool, error=TypeError,
          message=f"where must be a boolean mask; got dtype {where.dtype}")
  check_broadcastable(where, shape, "where", target)
  return where


def check_weights(weights: Any, shape: tuple[int, ...]) -> jax.Array:
  weights = as_array(weights, "weights")
  require_kind(weights, (float, int),
               message=f"weights must hold real numbers; got dtype {weights.dtype}")
  check_broadcastable(weights, shape, "weights", "the unreduced loss shape")
  return weights


def check_ignore_index(ignore_index: Any, labels: jax.Array, name: str = "labels") -> int | None:
  if ignore_index is None:
    return None
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f"ignore_index applies to integer labels; got {name} of dtype {labels.dtype}. "
        "Use where= to mask float labels")
  if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
    raise TypeError(f"ignore_index must be a Python int; got {ignore_index!r}")
  return int(ignore_index)


def check_labels_dtype(labels: jax.Array, name: str = "labels") -> None:
  require_kind(labels, (float, int, bool),
               message=f"{name} must be integer class ids, or float or bool targets; "
               f"got dtype {labels.dtype}")


def check_same_shape(labels: jax.Array, logits: jax.Array, what: str,
                     name: str = "labels") -> None:
  require(chex.assert_equal_shape, [labels, logits],
          message=f"{what} {name} must have the shape of logits {logits.shape}; "
          f"got {labels.shape}")


def check_class_id_shape(labels: jax.Array, expected: tuple[int, ...], hint: str,
                         name: str = "labels") -> None:
  require(chex.assert_shape, labels, expected,
          message=f"integer class ids ({name}) must have shape {expected} ({hint}); "
          f"got {labels.shape}")


def check_scores(scores: Any, shape: tuple[int, ...]) -> jax.Array:
  """Per-anchor quality scores: floats with the shape of the class ids."""
  scores = as_array(scores, "scores")
  require_kind(scores, (float,), message=f"scores must be float quality targets in [0, 1]; "
               f"got dtype {scores.dtype}")
  if scores.shape != shape:
    raise ValueError(f"scores must have the shape of the class ids {shape}, one score per "
                     f"anchor; got shape {scores.shape}")
  return scores


def wide_ids(labels: jax.Array, ignore_index: int | None) -> tuple[jax.Array, int | None]:
  """Integer labels of any integer dtype as one signed dtype, and the ignore_index it can hold.

  Ids that do not fit wrap to negative values, which are out of range (NaN),
  never a valid class; an ignore_index no label can equal becomes None.
  """
  wide = jnp.int64 if labels.dtype.itemsize == 8 or labels.dtype == jnp.uint32 else jnp.int32
  labels = labels.astype(wide if jax.config.read("jax_enable_x64") else jnp.int32)
  info = jnp.iinfo(labels.dtype)
  if ignore_index is not None and not info.min <= ignore_index <= info.max:
    ignore_index = None
  return labels, ignore_index
