"""A moving-average loss normaliser for detectors, global across devices."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from jfocal.engine import checks, reduce as reducing


def ema_normalizer_init(initial: float = 100.0) -> jax.Array:
  """The state of :func:`jfocal.ema_normalizer` before the first step.

  Args:
    initial: starting value, a number > 0; detectron2's RetinaNet starts at 100
      (a typical count of positive anchors per batch), so that the first steps
      are not divided by a noisy count.

  Returns:
    A scalar array of JAX's default float dtype (float32, or float64 under
    ``jax_enable_x64``).

  Examples:
    >>> import jfocal
    >>> float(jfocal.ema_normalizer_init())
    100.0

  References:
    Wu et al., `Detectron2 <https://github.com/facebookresearch/detectron2>`_,
    ``modeling/meta_arch/retinanet.py`` (``loss_normalizer``), 2019.
  """
  initial = checks.static_number(initial, "initial", checks.NON_NEGATIVE)
  if initial == 0.0:
    raise ValueError("initial must be > 0 (it divides the loss); got 0.0")
  return jnp.asarray(initial, checks.result_float(int))


def ema_normalizer(num_positives: Any, state: Any, *, momentum: float = 0.9,
                   axis_name: Any = None) -> jax.Array:
  r"""Updates the moving average of the number of positive anchors.

  .. math::
    n \leftarrow m\,n + (1 - m) \max(\mathrm{num\_positives}, 1),

  detectron2's RetinaNet normaliser: dividing the summed focal loss by ``n``
  instead of this batch's count keeps the loss scale steady when the number of
  positives jumps between batches. The count is the global one: under
  ``jax.jit`` with sharded arrays a ``jnp.sum`` over the batch already is, and
  inside ``shard_map`` or ``pmap`` pass ``axis_name`` to sum the per-device
  counts (detectron2 divides by each worker's own count instead, so its loss
  changes with the number of GPUs). The state is explicit: pass it in, keep
  the result, use the result as ``normalizer=`` of a ``reduction="mean"`` loss.

  Args:
    num_positives: scalar count of positive anchors in this device's batch
      (integer or float), e.g. ``jnp.sum((ids >= 0) & (ids < num_classes))``.
    state: the previous result, or :func:`jfocal.ema_normalizer_init` ``()``.
    momentum: weight of the previous value, a static number in [0, 1).
    axis_name: mapped axis (or axes) over which counts are summed.

  Returns:
    The new state, a scalar in the compute dtype of ``state`` (float32, or
    float64 for a float64 state); it is also the normaliser.

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> state = jfocal.ema_normalizer_init()
    >>> state = jfocal.ema_normalizer(jnp.array(20), state)
    >>> float(state)  # 0.9 * 100 + 0.1 * 20
    92.0
    >>> logits, ids = jnp.zeros((4, 3)), jnp.array([0, 3, 3, 2])
    >>> loss = jfocal.sigmoid_focal_loss(logits, ids, reduction="mean",
    ...                                  normalizer=state)

  References:
    Wu et al., `Detectron2 <https://github.com/facebookresearch/detectron2>`_,
    ``modeling/meta_arch/retinanet.py`` (``loss_normalizer``), 2019.
  """
  momentum = checks.static_number(momentum, "momentum", checks.UNIT)
  if momentum == 1.0:
    raise ValueError("momentum must be < 1 (at 1 the count is never used); got 1.0")
  num_positives = checks.as_array(num_positives, "num_positives")
  state = checks.as_array(state, "state")
  checks.require_kind(num_positives, (int, float),
                           message=f"num_positives must be a count; got dtype {num_positives.dtype}")
  checks.require_kind(state, (float,), message=f"state must be a float scalar from "
                           f"ema_normalizer_init(); got dtype {state.dtype}")
  for value, name in ((num_positives, "num_positives"), (state, "state")):
    checks.require(chex.assert_rank, value, 0,
                        message=f"{name} must be a scalar; got shape {value.shape}")
  dtype = checks.wide_float(state.dtype)
  count = reducing.global_sum(num_positives.astype(dtype), axis_name)
  return momentum * state.astype(dtype) + (1.0 - momentum) * jnp.maximum(count, 1.0)
