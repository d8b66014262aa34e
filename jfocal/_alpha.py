"""Class-weight recipes and the RetinaNet prior initialiser."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfocal.engine import checks


def alpha_from_counts(num_positives: Any, num_negatives: Any) -> jax.Array:
  r"""The alpha that balances positives against negatives by their counts.

  Chooses :math:`\alpha` with :math:`\alpha / (1 - \alpha) = n / m` for ``m``
  positives and ``n`` negatives, i.e. :math:`\alpha = n / (m + n)`, so that the
  total weights :math:`\alpha m` and :math:`(1 - \alpha) n` are equal. Use it as
  ``alpha`` of the sigmoid losses (a per-class vector if the counts are).

  Args:
    num_positives: count ``m`` of positive targets, a number or array >= 0.
    num_negatives: count ``n`` of negative targets, broadcastable with ``m``.

  Returns:
    ``n / (m + n)``, 0.5 where both counts are 0, in JAX's default float
    dtype for integer counts (float32, or float64 under ``jax_enable_x64``),
    else in the counts' compute dtype (float64 for float64 counts).

  Examples:
    >>> import jfocal
    >>> jfocal.alpha_from_counts(10, 990)
    Array(0.99, dtype=float32)

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017, section 3.1.
  """
  counts = []
  for name, value in (("num_positives", num_positives), ("num_negatives", num_negatives)):
    if checks.is_concrete(value) and np.any(np.asarray(value) < 0):
      raise ValueError(f"{name} must be >= 0; got {value}")
    value = checks.as_array(value, name)
    checks.require_kind(value, (int, float),
                             message=f"{name} must be a real count; got dtype {value.dtype}")
    counts.append(value)
  m, n = counts
  floats = [c.dtype for c in counts if jnp.issubdtype(c.dtype, jnp.floating)]
  dtype = checks.result_float(max(floats, key=lambda d: np.dtype(d).itemsize) if floats else int)
  m, n = m.astype(dtype), n.astype(dtype)
  total = m + n
  return jnp.where(total > 0, n / jnp.where(total > 0, total, 1), 0.5)


def class_balanced_alpha(counts: Any, *, beta: float = 0.999) -> jax.Array:
  r"""Per-class weights from the effective number of samples (class-balanced loss).

  A class with :math:`n` samples has the effective number
  :math:`E_n = (1 - \beta^n) / (1 - \beta)`; its weight is proportional to
  :math:`1 / E_n`, and the weights are scaled to sum to the number of classes
  ``C``:

  .. math::
    w_c = C \, \frac{1 / E_{n_c}}{\sum_k 1 / E_{n_k}}.

  ``beta = 0`` gives equal weights (1 each), ``beta -> 1`` inverse class
  frequency. :math:`1 - \beta^n` is computed as ``-expm1(n log beta)``, exact
  for ``beta`` close to 1 and for any count; the common factor ``1 - beta``
  cancels. A class with no samples is weighted as if it had one.

  Use them as ``alpha`` of the softmax family (``alpha=w``; for integer
  labels the same as ``weights=w[class_ids]``). Cui et al. weight every term
  of an example by the weight of its ground-truth class, which for the
  sigmoid family is ``weights=w[class_ids][..., None]`` (give background
  anchors, id ``C``, a weight of their own, e.g. by appending 1 to ``w``): a
  per-class ``alpha`` of the sigmoid family must lie in [0, 1], as negatives
  get ``1 - alpha``, and weights summing to ``C`` exceed 1 unless all classes
  are equally frequent.

  Args:
    counts: number of training samples per class, a vector of shape ``(C,)``
      of integers or floats >= 0.
    beta: a static Python number in [0, 1); the paper uses 0.9, 0.99, 0.999 or
      0.9999.

  Returns:
    Weights of shape ``(C,)`` summing to ``C``, in JAX's default float dtype
    for integer counts (float32, or float64 under ``jax_enable_x64``), else
    in the counts' compute dtype.

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> w = jfocal.class_balanced_alpha(jnp.array([1000, 100, 10]), beta=0.99)
    >>> [round(float(v), 4) for v in w]  # sums to 3
    [0.2301, 0.363, 2.4068]
    >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 1.5]])
    >>> class_ids = jnp.array([0, 2])
    >>> loss = jfocal.softmax_balanced_cross_entropy(logits, class_ids, alpha=w)
    >>> [round(float(v), 4) for v in loss]
    [0.0555, 1.0064]

  References:
    Cui et al., `Class-Balanced Loss Based on Effective Number of Samples
    <https://arxiv.org/abs/1901.05555>`_, CVPR 2019.
  """
  beta = checks.static_number(beta, "beta", checks.UNIT)
  if beta == 1.0:
    raise ValueError("beta must lie in [0, 1) (beta = 1 would make every effective number "
                     "0); got 1.0. For inverse class frequency use a beta close to 1, "
                     "e.g. 0.9999")
  if checks.is_concrete(counts) and np.any(np.asarray(counts) < 0):
    raise ValueError(f"counts must be >= 0; got {counts}")
  counts = checks.class_counts(counts)
  dtype = checks.result_float(counts.dtype)
  counts = jnp.maximum(counts.astype(dtype), 1)
  if beta == 0.0:
    inverse_effective = jnp.ones_like(counts)
  else:
    # 1 / E_n up to the common factor 1 - beta; log(beta) in double precision.
    inverse_effective = 1 / -jnp.expm1(counts * math.log(beta))
  return counts.shape[0] * inverse_effective / jnp.sum(inverse_effective)


def background_alpha(alpha: float, num_classes: int, *, background_index: int = 0,
                     dtype: Any = None) -> jax.Array:
  r"""Per-class alpha ``[alpha, 1 - alpha, ..., 1 - alpha]`` for a softmax detector.

  The background class gets ``alpha`` and every object class ``1 - alpha``: the
  background-suppressing vector of many RetinaNet ports (0.25 in the paper).
  Pass it as ``alpha`` of :func:`jfocal.softmax_focal_loss`.

  Args:
    alpha: weight of the background class, in [0, 1].
    num_classes: number of classes ``C`` including the background.
    background_index: position of the background class (default 0, negative
      indices count from the end).
    dtype: dtype of the result; None (default) is JAX's default float dtype.

  Returns:
    Array of shape ``(num_classes,)``.

  Examples:
    >>> import jfocal
    >>> jfocal.background_alpha(0.25, 4)
    Array([0.25, 0.75, 0.75, 0.75], dtype=float32)

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017.
  """
  alpha = checks.static_number(alpha, "alpha", checks.UNIT)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
  if not isinstance(background_index, int) or not -num_classes <= background_index < num_classes:
    raise ValueError(f"background_index must be an int in [{-num_classes}, {num_classes}); "
                     f"got {background_index!r}")
  dtype = checks.result_float(int) if dtype is None else dtype
  return jnp.full((num_classes,), 1.0 - alpha, dtype).at[background_index].set(alpha)


def prior_bias_init(prior: float = 0.01) -> Callable[..., jax.Array]:
  r"""Flax initializer for a classification bias that starts at probability ``prior``.

  Returns an initializer ``init(key, shape, dtype)`` filling the bias with
  :math:`b = -\log((1 - \pi) / \pi)`, so that :math:`\sigma(b) = \pi`. RetinaNet
  uses :math:`\pi = 0.01` so that the many background anchors do not swamp
  the first steps of training with a large loss.

  Args:
    prior: the initial foreground probability :math:`\pi`, in (0, 1).

  Returns:
    A function ``(key, shape, dtype=None) -> Array`` (None is JAX's default
    float dtype) usable as
    ``bias_init`` of ``flax.linen.Conv`` or ``flax.linen.Dense``.

  Examples:
    >>> import jax, jfocal
    >>> init = jfocal.prior_bias_init(0.01)
    >>> init(jax.random.key(0), (3,))
    Array([-4.59512, -4.59512, -4.59512], dtype=float32)

  References:
    Lin et al., `Focal Loss for Dense Object Detection
    <https://arxiv.org/abs/1708.02002>`_, ICCV 2017, section 4.1.
  """
  prior = checks.static_number(prior, "prior", checks.UNIT)
  if not 0.0 < prior < 1.0:
    raise ValueError(f"prior must lie strictly inside (0, 1); got {prior!r}")
  bias = -math.log((1.0 - prior) / prior)

  def init(key: Any, shape: Any, dtype: Any = None) -> jax.Array:
    del key  # deterministic
    return jnp.full(shape, bias, checks.result_float(int) if dtype is None else dtype)

  return init
