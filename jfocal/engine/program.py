"""`program`: how a public loss function is called, and the registry of public losses.

Every public loss is a plain function of its documented arguments, written in
terms of its family's engine (`jfocal.engine.sigmoid`, `jfocal.engine.softmax`),
and decorated with `program`. The decorator

- binds the call to the function's own signature (so keywords, defaults and
  positional use behave as the signature says);
- sorts the options into *static* ones, whose values specialise the compiled
  program and key its cache (``reduction``, ``ignore_index``,
  ``label_smoothing``, ``axis``, ``axis_name``, a string ``normalizer``, the
  names in ``static``, and the names in ``specialising`` and in
  `COMMON_SPECIALISING` (the softmax family's ``z_loss``) when they are Python
  or NumPy scalar numbers), and *traced* ones (JAX and NumPy arrays, as under a
  caller's `jax.jit`: `checks.is_traced`; and every other number), whose new
  values never recompile;
- checks the concrete values of the options in ``bounds`` (for an array,
  every entry), which under `jax.jit` would be tracers;
- runs the body as one `jax.jit` program, also when called eagerly. Eagerly,
  JAX would run every operation as its own kernel, while under a caller's
  `jax.jit` XLA fuses them, and fused arithmetic may round differently:
  compiling the body in both cases makes an eager call return what the jitted
  one does;
- records the loss in `REGISTRY` (its family, its label argument and its
  bounds), which `jfocal.checked` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal, ParamSpec, TypeVar

import jax
from jax.core import Tracer

from jfocal.engine import checks

P = ParamSpec("P")
R = TypeVar("R")

# Options whose values specialise every loss's program.
COMMON_STATIC = frozenset({"ignore_index", "label_smoothing", "reduction", "axis", "axis_name"})

# Hyper-parameters common to a family (the softmax family's z_loss), with their bounds:
# specialising, as a loss's own, in every signature that has them.
COMMON_SPECIALISING: Mapping[str, checks.Bound] = {"z_loss": checks.NON_NEGATIVE}


# "linear_softmax": a softmax loss of features @ kernel (features, kernel, labels).
Family = Literal["sigmoid", "softmax", "linear_softmax"]


@dataclasses.dataclass(frozen=True)
class LossInfo:
  """What `jfocal.checked` needs to know about a public loss."""
  name: str
  family: Family
  labels: str                     # the name of the labels argument (labels, scores, targets)
  bounds: Mapping[str, checks.Bound]
  stateful: bool                  # returns (loss, state)
  specialising: frozenset[str]    # hyper-parameters whose Python numbers specialise the program


REGISTRY: dict[Callable[..., Any], LossInfo] = {}

# `jax.linearize` traces a function exactly as `jax.vjp` does, and JAX reports a custom_vjp
# under it only when the linear map is applied, from outside any jfocal frame; finding
# jax.linearize's own frame on the stack is the one way to say so while tracing.
_LINEARIZE_CODE = getattr(jax.linearize, "__wrapped__", jax.linearize).__code__


def _inside_linearize() -> bool:
  frame = sys._getframe(1)
  while frame is not None:
    if frame.f_code is _LINEARIZE_CODE:
      return True
    frame = frame.f_back
  return False


def program(*, family: Family, static: tuple[str, ...] = (),
            specialising: tuple[str, ...] = (),
            bounds: Mapping[str, checks.Bound] | None = None, stateful: bool = False,
            labels: str | None = None, forward_mode_error: str | None = None
            ) -> Callable[[Callable[P, R]], Callable[P, R]]:
  """Makes ``fn`` a public loss; see the module docstring.

  ``labels`` names the labels argument (default: the second parameter; the
  first is always the one converted to an array, the logits or features).
  ``forward_mode_error``, for a loss with reverse-mode derivatives only,
  replaces JAX's error under forward-mode differentiation, and is raised
  under `jax.linearize` too (where JAX would raise only on applying the
  linear map).
  """
  static_names = COMMON_STATIC | frozenset(static)

  def decorate(fn: Callable[P, R]) -> Callable[P, R]:
    signature = inspect.signature(fn)
    logits_name = next(iter(signature.parameters))
    labels_name = labels or list(signature.parameters)[1]
    common = {name: bound for name, bound in COMMON_SPECIALISING.items()
              if name in signature.parameters}
    all_bounds = {**common, **(bounds or {})}
    all_specialising = frozenset(specialising) | frozenset(common)

    def body(arrays: dict[str, Any], static_items: tuple[tuple[str, Any], ...]) -> Any:
      return fn(**arrays, **dict(static_items))  # type: ignore[call-arg]

    compiled = jax.jit(body, static_argnames="static_items")

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
      call = signature.bind(*args, **kwargs)
      call.apply_defaults()
      arrays: dict[str, Any] = {}
      static_items = []
      for name, value in call.arguments.items():
        if name == logits_name:
          arrays[name] = checks.as_array(value, name)
        elif name == labels_name:
          arrays[name] = value  # may be a (class_ids, scores) pair
        elif name in static_names or (name == "normalizer" and (value is None
                                                                or isinstance(value, str))):
          static_items.append((name, checks.static_option(value, name)))
        elif name in all_specialising and not checks.is_traced(value):
          bound = all_bounds.get(name, checks.FINITE)
          static_items.append((name, checks.static_number(value, name, bound)))
        else:
          if isinstance(value, str):
            raise TypeError(f"{name} must be a number or an array; got {value!r}")
          if isinstance(value, (list, tuple)):
            value = checks.as_array(value, name)
          if name in all_bounds:
            checks.check_bounds(value, name, all_bounds[name])
          arrays[name] = value
      if forward_mode_error is None:
        return compiled(arrays, tuple(static_items))
      # The stack is walked only while tracing, not on every eager call.
      if any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(arrays)) and _inside_linearize():
        raise TypeError(forward_mode_error)
      try:
        return compiled(arrays, tuple(static_items))
      except TypeError as error:
        if "forward-mode" not in str(error):
          raise
        raise TypeError(forward_mode_error) from None

    REGISTRY[run] = LossInfo(fn.__name__, family, labels_name, all_bounds, stateful,
                             all_specialising)
    return run

  return decorate
