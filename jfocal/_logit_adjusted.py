"""Logit-adjusted softmax cross-entropy (Menon et al., ICLR 2021) for long-tailed labels.

The loss is the softmax cross-entropy of the logits shifted per class by
``tau log pi_c``. The shift is a constant of each class: the engine's CE term,
its derivative rule and its label handling apply unchanged to the shifted
logits (masked classes stay at ``-inf``), and the derivatives with respect to
``tau`` and the priors follow from ``d/dshift_c = p_c - y_c``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfocal.engine import checks, softmax
from jfocal.engine.program import program
from jfocal.engine.types import ArrayLike, AxisName, Normalizer, Parameter, Reduction


def _identity(n: Any) -> Any:
  """The cross-entropy's term of a class: its negative log-probability itself."""
  return n


def class_priors_from_counts(counts: ArrayLike) -> jax.Array:
  r"""Class priors :math:`\pi_c = n_c / \sum_k n_k` from the training set's class counts.

  For ``class_priors`` of :func:`jfocal.logit_adjusted_cross_entropy`. Every
  count must be positive: a class of prior 0 would get the logit ``-inf``,
  so that its targets (and label smoothing's share of it) cost ``+inf``. Add
  a pseudo-count (``counts + 1``) for classes the training set lacks.

  Args:
    counts: number of training examples of each class, shape ``(C,)``, > 0.

  Returns:
    The priors, shape ``(C,)``, summing to 1, in JAX's default float dtype for
    integer counts, else in the counts' dtype (float32 for half precision).

  Examples:
    >>> import jfocal
    >>> print(jfocal.class_priors_from_counts([600, 300, 100]))
    [0.6 0.3 0.1]

  References:
    Menon et al., `Long-tail learning via logit adjustment
    <https://arxiv.org/abs/2007.07314>`_, ICLR 2021.
  """
  array = checks.class_counts(counts)
  if checks.is_concrete(counts):
    values = np.asarray(counts, np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
      raise ValueError(
          f"counts must be finite and > 0 (a class of prior 0 has the logit -inf); "
          f"got {values[bad[0]]:g} at index {bad[0]}. Add a pseudo-count, e.g. counts + 1")
  array = array.astype(checks.result_float(array.dtype))
  return array / jnp.sum(array)


@program(family="softmax", bounds={"class_priors": checks.POSITIVE, "tau": checks.FINITE})
def logit_adjusted_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, class_priors: ArrayLike,
                                 tau: ArrayLike = 1.0, axis: int | tuple[int, ...] = -1,
                                 weights: ArrayLike | None = None,
                                 where: ArrayLike | None = None,
                                 ignore_index: int | None = None,
                                 label_smoothing: float = 0.0, z_loss: Parameter = 0.0,
                                 reduction: Reduction = "none", normalizer: Normalizer = None,
                                 axis_name: AxisName = None) -> jax.Array:
  r"""Logit-adjusted softmax cross-entropy, for training on long-tailed labels.

  With the class priors :math:`\pi` (the training set's label frequencies),

  .. math::
    \ell(x, y) = -\sum_c y_c \log \mathrm{softmax}(x + \tau \log \pi)_c,

  which for a class id ``t`` is
  :math:`\log \sum_c \pi_c^\tau e^{x_c} - x_t - \tau \log \pi_t`: a larger margin
  for the rare classes. Its minimiser estimates :math:`\log P(y \mid x) - \tau
  \log \pi_y`, so the model's own ``argmax(logits)`` is the balanced-error
  classifier (for ``tau = 1``); no adjustment is applied at test time.
  ``tau = 0`` and uniform priors are the plain cross-entropy. The priors are
  normalised to sum to 1, so counts work as well as frequencies.

  Args:
    logits: float array with the classes along ``axis``, e.g. ``[batch, C]``.
      bfloat16 and float16 are computed in float32.
    labels: integer class ids with the shape of ``logits`` without the class
      axes (ids outside ``[0, C)`` other than ``ignore_index`` give NaN), or
      float or bool target distributions with the shape of ``logits``.
    class_priors: per-class priors (or counts) of shape ``(C,)``, finite and
      > 0; see :func:`jfocal.class_priors_from_counts`. May be traced.
    tau: the adjustment's temperature, a finite number or scalar array
      (default 1, the paper's choice); traced, and the loss is differentiable
      in it.
    axis: the class axis (default -1) or a tuple of class axes.
    weights: per-example weights broadcastable to the unreduced loss.
    where: a boolean mask, per logit (the rank of ``logits``) or per example
      (lower rank); see :func:`jfocal.softmax_focal_loss`.
    ignore_index: class ids equal to it are masked like ``where``.
    label_smoothing: ``eps`` in [0, 1]: targets become ``(1 - eps) y + eps / K``.
    z_loss: coefficient >= 0 of the z-loss ``z_loss * logsumexp(logits + tau
      log(class_priors))**2``, of the adjusted logits the softmax sees, added
      to each example's loss; 0 (default) adds nothing. A Python number
      specialises the program, an array is traced.
    reduction: ``"none"`` (default), ``"sum"`` or ``"mean"``.
    normalizer: with ``reduction="mean"``: a number or scalar array dividing
      the sum, or ``"num_positives"``.
    axis_name: name (or tuple of names) of mapped axes over which sums and
      counts are global.

  Returns:
    With ``reduction="none"``, the loss of every example in the dtype of
    ``logits``; otherwise a float32 scalar (float64 for float64 logits).

  Examples:
    >>> import jax.numpy as jnp, jfocal
    >>> jnp.set_printoptions(precision=4, suppress=True)
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> priors = jfocal.class_priors_from_counts(jnp.array([600, 300, 100]))
    >>> print(jfocal.logit_adjusted_cross_entropy(logits, jnp.array([0, 1]),
    ...                                           class_priors=priors))
    [0.0936 3.0281]

  References:
    Menon et al., `Long-tail learning via logit adjustment
    <https://arxiv.org/abs/2007.07314>`_, ICLR 2021.
  """
  inputs = softmax.prepare(logits, labels, axis=axis, weights=weights, where=where,
                           ignore_index=ignore_index, label_smoothing=label_smoothing)
  priors = checks.check_alpha(class_priors, inputs.num_classes, allow_scalar=False,
                              name="class_priors")
  # Normalised, so that counts and frequencies are the same priors (also for the z-loss),
  # and in their own precision: tiny float64 priors would round to 0 first.
  priors = priors.astype(checks.result_float(priors.dtype))
  log_priors = (jnp.log(priors) - jnp.log(jnp.sum(priors))).astype(inputs.dtype)
  tau = checks.scalar(tau, "tau").astype(inputs.dtype)
  shift = softmax.along_classes(tau * log_priors, inputs)
  inputs = inputs._replace(x=inputs.x + shift)
  loss = softmax.example_loss(inputs, _identity, z_loss=z_loss)
  return softmax.reduce(loss, inputs, reduction=reduction, normalizer=normalizer,
                        axis_name=axis_name)
