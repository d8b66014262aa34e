"""GHM-C: the gradient harmonizing classification loss (Li et al., AAAI 2019).

The sigmoid cross-entropy has the gradient ``sigma(x) - y`` per element; its
norm ``g = |sigma(x) - y|`` in [0, 1] tells easy (small g) from hard examples.
GHM-C counts the unmasked elements of ``g`` in ``bins`` equal bins and weights
each element's cross-entropy by ``N / (count of its bin * number of non-empty
bins)``, ``N`` the number of unmasked elements, so that every populated band of
gradient norms contributes the same total weight. The weights are computed
from ``stop_gradient`` values: the derivative is the weighted cross-entropy's,
with the sigmoid core's analytic rule.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfocal._sigmoid import focal_term
from jfocal.engine import checks, numerics, reduce as reducing, sigmoid
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Reduction


def _check_bins(bins: Any) -> int:
  checks.require_static(bins, "bins")
  if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, numbers.Integral):
    raise TypeError(f"bins must be a Python int >= 1; got {bins!r}")
  if bins < 1:
    raise ValueError(f"bins must be an int >= 1; got {bins!r}")
  return int(bins)


def ghmc_init(bins: int = 10, *, dtype: Any = None) -> jax.Array:
  r"""The initial GHM-C state: no gradient norms seen yet.

  The state is the moving average of the number of elements per bin of
  gradient norm that :func:`jfocal.ghmc_loss` keeps with ``momentum > 0``,
  an array of shape ``(bins,)``, all zero at first. It is an ordinary array,
  so it can live in a training state, be carried through ``jax.lax.scan``,
  replicated over devices and checkpointed.

  Args:
    bins: number of bins, a Python int >= 1 (the ``bins`` of the loss).
    dtype: float dtype of the state; None (default) is JAX's default float
      (float32, or float64 under ``jax_enable_x64``). The loss returns the new
      state in the dtype it was given.

  Returns:
    ``jnp.zeros((bins,), dtype)``.

  Examples:
    >>> import jfocal
    >>> jfocal.ghmc_init(4)
    Array([0., 0., 0., 0.], dtype=float32)

  References:
    Li et al., `Gradient Harmonized Single-stage Detector
    <https://arxiv.org/abs/1811.05181>`_, AAAI 2019.
  """
  bins = _check_bins(bins)
  dtype = checks.result_float(int) if dtype is None else dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating-point dtype; got {dtype!r}")
  return jnp.zeros((bins,), dtype)


def _check_state(state: Any, bins: int) -> jax.Array:
  state = checks.as_array(state, "state")
  checks.require_kind(
      state, (float,), message=f"state must be a float array from jfocal.ghmc_init({bins}); "
      f"got dtype {state.dtype}")
  if state.shape != (bins,):
    raise ValueError(f"state must have shape ({bins},), one entry per bin, as "
                     f"jfocal.ghmc_init({bins}) makes it; got shape {state.shape}")
  return state


def harmonizing_weights(x: jax.Array, y: jax.Array, valid: jax.Array, *, bins: int,
                        momentum: jax.Array, state: jax.Array, axis_name: Any):
  """GHM-C's per-element weights beta (constants) and the new state, as mmdetection computes them.

  ``g = |sigma(x) - y|`` falls in bin ``i`` when ``edges[i] <= g < edges[i + 1]``
  with ``edges = arange(bins + 1) / bins`` (the last bin is closed at 1).
  Counts cover the elements in ``valid`` with a number for ``g``; with
  ``axis_name`` they and ``N`` are summed over the mapped axis.
  """
  dtype = x.dtype
  g = jax.lax.stop_gradient(jnp.abs(jax.nn.sigmoid(x) - y))
  counted = valid & ~jnp.isnan(g)
  g = jnp.where(counted, g, 0)  # NaN would make the bin index undefined
  # mmdetection's bin: edges[i] <= g < edges[i + 1] with edges = arange(bins + 1) / bins
  # divided in the compute dtype (float32 for float32 logits, as in mmdetection); the
  # last bin is closed. floor(g bins) is that bin or a neighbour where g bins rounds
  # across an edge; one compare with each of its edges corrects it. The edges are
  # divided here, elementwise (IEEE division rounds correctly, as numpy's on the host):
  # looked up in a table of them, they made XLA on the CPU write two logits-sized
  # arrays for the histogram (a temporary of 4.0x the logits' bytes, 2.0x now).
  index = jnp.clip(jnp.floor(g * bins), 0, bins - 1).astype(jnp.int32)
  position = index.astype(dtype)
  upper = jnp.where(index == bins - 1, jnp.inf, (position + 1) / bins)
  index = index - (g < position / bins).astype(jnp.int32) + (g >= upper).astype(jnp.int32)
  # The histogram is replicated; under a mesh with explicit axes JAX needs to be told.
  replicated = jax.typeof(index).sharding.update(spec=jax.P())
  # Counted in int32: a float32 sum of ones stops growing at 2**24, which a bin of
  # a detector's batch passes (16 images x 120k anchors x 80 classes = 1.5e8 elements).
  counts = jnp.zeros((bins,), jnp.int32).at[index].add(counted.astype(jnp.int32),
                                                         out_sharding=replicated)
  counts = reducing.global_sum(counts.astype(dtype), axis_name)
  total = jnp.sum(valid, dtype=jnp.int32).astype(dtype)
  total = jnp.maximum(reducing.global_sum(total, axis_name), 1)
  populated = counts > 0
  previous = state.astype(dtype)
  # mmdetection's moving average, updated only where this batch has elements;
  # with momentum 0 it is this batch's counts.
  averaged = jnp.where(populated, momentum * previous + (1 - momentum) * counts, previous)
  density = jnp.where(populated, averaged, 1) * jnp.sum(populated, dtype=dtype)
  per_bin = jnp.where(populated, total / density, 0)
  weights = jnp.where(counted, reducing.per_class_values(per_bin, index), 0)
  return jax.lax.stop_gradient(weights), jax.lax.stop_gradient(averaged).astype(state.dtype)


@program(family="sigmoid", static=("bins",), stateful=True,
         bounds={"momentum": checks.Bound(0.0, 1.0, high_open=True)})
def ghmc_loss(logits: ArrayLike, labels: ArrayLike, *, bins: int = 10,
              momentum: ArrayLike = 0.0, state: ArrayLike | None = None,
              weights: ArrayLike | None = None, where: ArrayLike | None = None,
              ignore_index: int | None = None, label_smoothing: float = 0.0,
              reduction: Reduction = "none", normalizer: Normalizer = None,
              axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
  r"""GHM-C: cross-entropy harmonised by the density of gradient norms (sigmoid).

  With the gradient norm :math:`g = |\sigma(x) - y|` of each element, the
  counts :math:`R_i` of unmasked elements in ``bins`` equal bins of [0, 1], the
  number :math:`n` of non-empty bins and :math:`N` unmasked elements,

  .. math::
    \beta = \frac{N}{R_{\mathrm{bin}(g)} \, n}, \qquad
    \mathrm{GHMC}(x, y) = \beta \cdot \mathrm{CE}(x, y),

  so ``reduction="mean"`` gives :math:`\sum \beta \, \mathrm{CE} / N`. The
  weights :math:`\beta` are constants for the derivative (the paper's
  gradient-harmonising view): the gradient is :math:`\beta (\sigma(x) - y)`.
  With ``momentum`` :math:`\mu > 0` the counts are the moving average
  :math:`A_i \leftarrow \mu A_i + (1 - \mu) R_i` of non-empty bins, kept in
  ``state``. One bin (and no momentum) is the cross-entropy.

  This follows mmdetection's GHMC, the authors' reference implementation:
  :math:`n` is the number of *non-empty* bins, where the paper's gradient
  density :math:`GD(g) = R_{\mathrm{bin}(g)} / \epsilon` divides by the bin
  width :math:`\epsilon = 1 / \mathrm{bins}`. With :math:`n` the weights of
  every element average 1, so the loss keeps the scale of the cross-entropy
  whatever the number of empty bins, and published GHM-C results used it.
  Same edges (``edges[i] <= g < edges[i + 1]``, the last bin closed), same
  moving average (no bias correction), same mean. Differences: masked
  elements (``where``, ``ignore_index``) play mmdetection's
  ``label_weight == 0``; ``weights`` multiply the harmonised loss afterwards
  and do not change the histogram; NaN gradient norms (NaN logits) and
  out-of-range ids are not counted.

  Args:
    logits: float array of any shape ``[..., C]`` (a scalar with dense labels).
      bfloat16 and float16 are computed in float32.
    labels: integer class ids of shape ``logits.shape[:-1]`` (id ``C`` is
      background, ids outside ``[0, C]`` other than ``ignore_index`` give NaN
      and stay out of the histogram), or dense float, bool or integer 0/1
      targets with the shape of ``logits``.
    bins: number of bins, a static Python int >= 1 (default 10; mmdetection's
      RetinaNet config uses 30).
    momentum: moving-average factor in [0, 1), a number or scalar array
      (traced; default 0, no memory: the histogram of this batch alone).
    state: the moving-average counts from the previous step, shape
      ``(bins,)``, from :func:`jfocal.ghmc_init` at first; None means
      ``ghmc_init(bins)``. With ``momentum = 0`` the weights do not depend on
      it; the new state then holds this batch's counts in its non-empty bins.
    weights: per-element weights broadcastable to the unreduced loss; they
      multiply the harmonised loss and do not change the histogram.
    where: boolean mask broadcastable to the unreduced loss; masked elements
      are 0 with zero gradient, leave the mean and the histogram.
    ignore_index: integer labels equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / 2``.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum instead of ``N``, or ``"num_positives"``.
    axis_name: name (or tuple of names) of mapped axes over which sums,
      counts and the histogram are global.

  Returns:
    The pair ``(loss, new_state)``: the loss as for every jfocal loss (the
    unreduced loss in the dtype of ``logits``, or a float32 scalar), and the
    moving-average counts of shape ``(bins,)`` in the dtype of ``state``
    (JAX's default float when ``state`` is None), with no gradient.

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    >>> class_ids = jnp.array([0, 3])  # anchor 0 is class 0, anchor 1 background
    >>> state = jfocal.ghmc_init(bins=5)
    >>> loss, state = jfocal.ghmc_loss(logits, class_ids, bins=5, momentum=0.75,
    ...                                state=state, reduction="mean")
    >>> round(float(loss), 4)
    4.8691
    >>> print(state)  # 0.25 x the counts of this first batch
    [0.5  0.25 0.25 0.25 0.25]

  References:
    Li et al., `Gradient Harmonized Single-stage Detector
    <https://arxiv.org/abs/1811.05181>`_, AAAI 2019; mmdetection's
    ``mmdet/models/losses/ghm_loss.py``.
  """
  bins = _check_bins(bins)
  inputs = sigmoid.prepare(logits, labels, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
  state = ghmc_init(bins) if state is None else _check_state(state, bins)
  momentum = checks.scalar(momentum, "momentum").astype(inputs.dtype)
  valid = jnp.ones(inputs.x.shape, bool) if inputs.mask is None else inputs.mask
  if inputs.invalid is not None:
    valid = valid & ~inputs.invalid  # out-of-range ids (NaN rows) stay out of the histogram
  harmonizer, new_state = harmonizing_weights(inputs.x, inputs.y, valid, bins=bins,
                                              momentum=momentum, state=state,
                                              axis_name=axis_name)
  x, factor = sigmoid.fold(inputs, weight=harmonizer)
  value = focal_term(x, inputs.y, factor, *numerics.split(0.0, inputs.dtype), False)
  return sigmoid.reduce(value, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name), new_state
