"""The one registry of jfocal's losses: every generic test, the fuzz campaign and the benchmark read it.

An entry says what a generic test needs to call a loss and to check it:
its family, the hyper-parameters it passes (always all of them, so that a
default can never differ silently between the loss and its reference), the
values to sweep, which hyper-parameters may be traced, the label forms it
takes, whether it returns a state, and its float64 reference formula
(`references`), written apart from the implementation.

Adding a loss to jfocal adds one entry here (see CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

import jfocal
import references as ref

# Keywords of the engine that every loss of a family may take; the rest of a
# signature is the loss's own hyper-parameters.
COMMON = frozenset({"weights", "where", "ignore_index", "label_smoothing", "reduction",
                    "normalizer", "axis_name", "axis", "pos_weight", "z_loss"})


def per_class(num_classes: int) -> np.ndarray:
  """A per-class vector for alpha: distinct weights in (0, 1)."""
  return np.linspace(0.2, 0.9, num_classes)


def long_tail(num_classes: int) -> np.ndarray:
  """Class priors of a long-tailed (Zipf) label distribution: class c has weight 1 / (c + 1)."""
  priors = 1 / np.arange(1, num_classes + 1)
  return priors / priors.sum()


@dataclasses.dataclass(frozen=True)
class Loss:
  name: str
  family: str                                # "sigmoid" or "softmax"
  reference: Callable[..., Any]              # (x, dense y, **params) -> unreduced float64 loss
  params: Mapping[str, Any]                  # every hyper-parameter, for the generic tests
  grid: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # values to sweep
  traced: tuple[str, ...] = ()               # hyper-parameters that may be traced
  labels: tuple[str, ...] = ("ids", "dense")  # "pairs": (class_ids, scores)
  elementwise: bool = True                   # an entry's loss reads only its own inputs
  stateful: bool = False                     # returns (loss, state)
  label_derivative: bool = True              # differentiable in dense targets everywhere

  @property
  def fn(self) -> Callable[..., Any]:
    return getattr(jfocal, self.name)

  @property
  def keywords(self) -> frozenset[str]:
    return frozenset(inspect.signature(self.fn).parameters) - {"logits"}

  def takes(self, keyword: str) -> bool:
    return keyword in self.keywords

  def resolve(self, params: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """``params`` with per-class values (callables of C) made for ``num_classes`` classes."""
    return {k: v(num_classes) if callable(v) else v for k, v in params.items()}

  def options(self, num_classes: int, **overrides: Any) -> dict[str, Any]:
    return self.resolve({**self.params, **overrides}, num_classes)

  def __call__(self, logits: Any, labels: Any, **kwargs: Any) -> Any:
    """The loss (without the state of a stateful loss) with the registry's hyper-parameters."""
    num_classes = np.shape(logits)[-1] if np.ndim(logits) else 1
    options = {**self.options(num_classes), **kwargs}
    result = self.fn(logits, labels, **options)
    return result[0] if self.stateful else result

  def expected(self, x: Any, y: Any, **params: Any) -> Any:
    """The reference with the registry's hyper-parameters (overridden by ``params``)."""
    num_classes = np.shape(x)[-1] if np.ndim(x) else 1
    return self.reference(x, y, **self.options(num_classes, **params))


GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 4.7)
SIGMOID_ALPHAS = (None, 0.0, 0.25, 1.0, per_class)

LOSSES: dict[str, Loss] = {entry.name: entry for entry in [
    Loss("sigmoid_cross_entropy", "sigmoid", ref.sigmoid_focal, {}),
    Loss("sigmoid_balanced_cross_entropy", "sigmoid", ref.sigmoid_focal, {"alpha": 0.3},
         grid={"alpha": SIGMOID_ALPHAS[1:]}, traced=("alpha",)),
    Loss("sigmoid_focal_loss", "sigmoid", ref.sigmoid_focal, {"alpha": 0.25, "gamma": 1.5},
         grid={"alpha": SIGMOID_ALPHAS, "gamma": GAMMAS}, traced=("alpha", "gamma")),
    Loss("softmax_cross_entropy", "softmax", ref.softmax_focal, {}),
    Loss("softmax_balanced_cross_entropy", "softmax", ref.softmax_focal, {"alpha": per_class},
         grid={"alpha": (per_class,)}, traced=("alpha",)),
    Loss("softmax_focal_loss", "softmax", ref.softmax_focal, {"alpha": per_class, "gamma": 0.5},
         grid={"alpha": (None, per_class), "gamma": GAMMAS}, traced=("alpha", "gamma")),
    Loss("sigmoid_focal_loss_star", "sigmoid", ref.focal_star,
         {"alpha": 0.25, "gamma": 2.0, "beta": 1.0},
         grid={"alpha": SIGMOID_ALPHAS, "gamma": (1.0, 0.25, 2.0, 4.0), "beta": (0.0, 1.0, -2.0)},
         traced=("alpha", "gamma", "beta")),
    Loss("poly1_cross_entropy", "softmax", ref.poly1_cross_entropy, {"epsilon": 1.5},
         grid={"epsilon": (1.0, -1.0, 0.0, 3.0)}, traced=("epsilon",)),
    Loss("poly1_focal_loss", "sigmoid", ref.poly1_focal,
         {"epsilon": 0.5, "alpha": 0.25, "gamma": 1.5},
         grid={"epsilon": (1.0, -1.0, 0.0, 3.0), "alpha": SIGMOID_ALPHAS, "gamma": GAMMAS},
         traced=("epsilon", "alpha", "gamma")),
    Loss("quality_focal_loss", "sigmoid", ref.quality_focal, {"beta": 1.5},
         grid={"beta": (2.0, 0.0, 0.5, 1.0, 1.5, 3.0)}, traced=("beta",),
         labels=("ids", "dense", "pairs")),
    Loss("varifocal_loss", "sigmoid", ref.varifocal,
         {"alpha": 0.75, "gamma": 1.5, "iou_weighted": True},
         grid={"alpha": (0.75, 0.0, 1.0, per_class), "gamma": GAMMAS,
               "iou_weighted": (True, False)},
         traced=("alpha", "gamma"), labels=("ids", "dense", "pairs"),
         # The loss jumps at q = 0 (the negative branch is another function).
         label_derivative=False),
    Loss("asymmetric_loss", "sigmoid", ref.asymmetric,
         {"gamma_pos": 1.0, "gamma_neg": 4.0, "clip": 0.05, "detach_focusing": False},
         # gamma_neg in (0, 1) is left out: the textbook's pow has a NaN derivative at p_m = 0.
         grid={"gamma_pos": (1.0, 0.0, 0.5, 2.0), "gamma_neg": (4.0, 0.0, 1.0, 2.5),
               "clip": (0.05, 0.0, 0.2), "detach_focusing": (False, True)},
         traced=("gamma_pos", "gamma_neg", "clip")),
    Loss("logit_adjusted_cross_entropy", "softmax", ref.logit_adjusted,
         {"class_priors": long_tail, "tau": 1.0},
         grid={"tau": (1.0, 0.0, 2.0, -0.5)}, traced=("class_priors", "tau")),
    Loss("ghmc_loss", "sigmoid", ref.ghmc, {"bins": 5, "momentum": 0.5, "state": None},
         grid={"bins": (10, 1, 3, 30), "momentum": (0.0, 0.75)}, traced=("momentum",),
         elementwise=False, stateful=True,
         # The weights are constants of the derivative (the paper's view).
         label_derivative=False),
]}

NAMES = tuple(LOSSES)
SIGMOID = tuple(n for n in NAMES if LOSSES[n].family == "sigmoid")
SOFTMAX = tuple(n for n in NAMES if LOSSES[n].family == "softmax")
ELEMENTWISE = tuple(n for n in NAMES if LOSSES[n].elementwise)


def one_hot(ids: Any, num_classes: int) -> np.ndarray:
  """Dense targets of class ids: id C of the sigmoid family (background) is all zeros."""
  return (np.asarray(ids)[..., None] == np.arange(num_classes)).astype(np.float64)


# The registry as pytest parameters: `@pytest.mark.parametrize("loss", registry.PARAMS)`.
PARAMS = [pytest.param(LOSSES[name], id=name) for name in NAMES]
ELEMENTWISE_PARAMS = [p for p in PARAMS if p.values[0].elementwise]
