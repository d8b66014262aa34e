"""Independent float64 references: textbook formulas and the papers' closed-form gradients.

Nothing here imports jfocal. Textbook formulas are written as a reader of the
paper would write them (sigmoid, log, pow) and are only trusted where float64
keeps them finite (moderate logits); the closed forms are written with
log-sigmoid so that they hold at any logit. Every formula takes dense targets
``y`` (one-hot for class ids, classes last for the softmax family) and returns
the unreduced loss.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _sigmoid(x):
  return 1 / (1 + jnp.exp(-x))


def binary_cross_entropy(x, y, pos_weight=None):
  """-[w y log p + (1 - y) log(1 - p)], PyTorch's BCEWithLogitsLoss with pos_weight w."""
  p = _sigmoid(x)
  w = 1.0 if pos_weight is None else pos_weight
  return -(w * y * jnp.log(p) + (1 - y) * jnp.log(1 - p))


def sigmoid_alpha_t(y, alpha):
  if alpha is None:
    return jnp.ones_like(y)
  return alpha * y + (1 - alpha) * (1 - y)


def sigmoid_focal(x, y, alpha=None, gamma=0.0):
  """-alpha_t (1 - p_t)^gamma [y log p + (1 - y) log(1 - p)], p = 1 / (1 + exp(-x))."""
  p = _sigmoid(x)
  p_t = y * p + (1 - y) * (1 - p)
  return sigmoid_alpha_t(y, alpha) * (1 - p_t) ** gamma * binary_cross_entropy(x, y)


def sigmoid_focal_grad_paper(x, y, alpha, gamma):
  """Lin et al. 2017, appendix: dFL/dx = y_s (1 - p_t)^g (g p_t log p_t + p_t - 1) for hard y.

  y_s = +1 for positives, -1 for negatives, x_t = y_s x; times alpha_t.
  Written in numpy float64 with log p_t = -softplus(-x_t), exact at any logit.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  sign = 2 * y - 1
  x_t = sign * x
  log_p_t = -np.logaddexp(0, -x_t)
  p_t = np.exp(log_p_t)
  one_minus_p_t = np.exp(-np.logaddexp(0, x_t))
  weight = np.ones_like(x) if gamma == 0 else one_minus_p_t ** gamma
  alpha_t = np.ones_like(x) if alpha is None else np.where(y == 1, alpha, 1 - alpha)
  return alpha_t * sign * weight * (gamma * p_t * log_p_t - one_minus_p_t)


def focal_star(x, y, alpha=None, gamma=1.0, beta=0.0):
  """Lin et al. 2017, appendix A: FL* = -log sigma(gamma x_t + beta) / gamma, times alpha_t.

  x_t = x for a positive and -x for a negative; a soft target mixes the two.
  """
  positive = -jnp.log(_sigmoid(gamma * x + beta)) / gamma
  negative = -jnp.log(_sigmoid(-gamma * x + beta)) / gamma
  return sigmoid_alpha_t(y, alpha) * (y * positive + (1 - y) * negative)


def poly1_focal(x, y, alpha=None, gamma=0.0, epsilon=1.0):
  """Leng et al. 2022: FL + eps (1 - p_t)^(gamma + 1); alpha_t weights FL only."""
  p = _sigmoid(x)
  p_t = y * p + (1 - y) * (1 - p)
  return sigmoid_focal(x, y, alpha, gamma) + epsilon * (1 - p_t) ** (gamma + 1)


def quality_focal(x, y, beta=2.0):
  """Li et al. 2020, eq. 5: QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)."""
  return jnp.abs(y - _sigmoid(x)) ** beta * binary_cross_entropy(x, y)


def varifocal(x, q, alpha=None, gamma=2.0, iou_weighted=True):
  """Zhang et al. 2021, eq. 2: -q (q log p + (1 - q) log(1 - p)) if q > 0, -alpha p^gamma log(1 - p)."""
  p = _sigmoid(x)
  positive = (q if iou_weighted else 1.0) * binary_cross_entropy(x, q)
  negative = -(1.0 if alpha is None else alpha) * p ** gamma * jnp.log(1 - p)
  return jnp.where(q > 0, positive, negative)


def ghmc(x, y, bins=10, momentum=0.0, state=None):
  """mmdetection's GHMC.forward without masks, from a fresh state (``state=None``), in jnp.

  g = |sigma(x) - y| (no gradient) in bins edges[i] <= g < edges[i + 1] (the last
  one closed by mmdetection's + 1e-6); each element's weight is
  N / (count of its bin * non-empty bins); the loss is weight * BCE. With
  momentum > 0 and a fresh (zero) state, the first step's moving average is
  (1 - momentum) * count.
  """
  g = jax.lax.stop_gradient(jnp.abs(_sigmoid(x) - y))
  edges = jnp.arange(bins + 1) / bins
  edges = edges.at[-1].add(1e-6)
  inside = (g[..., None] >= edges[:-1]) & (g[..., None] < edges[1:])
  counts = jnp.sum(inside, axis=tuple(range(g.ndim)), dtype=x.dtype)
  counts = jnp.where(momentum > 0, (1 - momentum) * counts, counts)
  populated = jnp.sum(counts > 0, dtype=x.dtype)
  per_bin = jnp.where(counts > 0, g.size / jnp.where(counts > 0, counts, 1), 0) / populated
  weights = jnp.sum(jnp.where(inside, per_bin, 0), axis=-1)
  return jax.lax.stop_gradient(weights) * binary_cross_entropy(x, y)


def ghmc_mmdetection(x, y, valid, bins, momentum, acc_sum, g=None):
  """mmdetection's GHMC.forward (ghm_loss.py) transcribed to numpy: weights, mean and new acc_sum.

  `g`, the gradient norms, default to float64 ones; a float32 run passes its own
  (a sigmoid one ulp off moves an element that sits on an edge to the next bin).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if g is None:
    g = np.abs(1 / (1 + np.exp(-x)) - y)
  edges = np.arange(bins + 1) / bins
  edges[-1] += 1e-6
  acc_sum = np.array(acc_sum, np.float64)
  weights = np.zeros_like(x)
  total = max(valid.sum(), 1.0)
  n = 0
  for i in range(bins):
    inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
    num_in_bin = inds.sum()
    if num_in_bin > 0:
      if momentum > 0:
        acc_sum[i] = momentum * acc_sum[i] + (1 - momentum) * num_in_bin
        weights[inds] = total / acc_sum[i]
      else:
        weights[inds] = total / num_in_bin
      n += 1
  if n > 0:
    weights = weights / n
  cross_entropy = np.logaddexp(0, x) - x * y
  return weights, np.sum(weights * cross_entropy) / total, acc_sum


def asymmetric(x, y, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, detach_focusing=False):
  """Ridnik et al. 2021, eq. 3-5 with the authors' soft-target form: p_m = max(p - clip, 0),
  p_t = y p + (1 - y)(1 - p_m),
  ASL = -(1 - p_t)^(g+ y + g- (1 - y)) [y log p + (1 - y) log(1 - p_m)]."""
  p = _sigmoid(x)
  p_m = jnp.maximum(p - clip, 0.0)
  p_t = y * p + (1 - y) * (1 - p_m)
  weight = (1 - p_t) ** (gamma_pos * y + gamma_neg * (1 - y))
  if detach_focusing:
    weight = jax.lax.stop_gradient(weight)
  return -weight * (y * jnp.log(p) + (1 - y) * jnp.log(1 - p_m))


def asymmetric_authors_code(x, y, gamma_pos, gamma_neg, clip, eps=1e-8):
  """The authors' AsymmetricLoss.forward (and timm's AsymmetricLossMultiLabel) in numpy:
  the shifted negative probability min(1 - p + clip, 1), logarithms clamped at eps, the
  negated sum."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  p = 1 / (1 + np.exp(-x))
  p_negative = np.minimum(1 - p + clip, 1.0) if clip > 0 else 1 - p
  log_likelihood = y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(p_negative, eps))
  p_t = p * y + p_negative * (1 - y)
  return -np.sum(log_likelihood * (1 - p_t) ** (gamma_pos * y + gamma_neg * (1 - y)))


def softmax(x):
  p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return p / jnp.sum(p, axis=-1, keepdims=True)


def softmax_focal(x, y, alpha=None, gamma=0.0):
  """-sum_c alpha_c y_c (1 - p_c)^gamma log p_c, p = exp(x) / sum exp(x); y a distribution."""
  p = softmax(x)
  terms = -y * (1 - p) ** gamma * jnp.log(p)
  if alpha is not None:
    terms = terms * alpha
  return jnp.sum(terms, axis=-1)


def poly1_cross_entropy(x, y, epsilon=1.0):
  """Leng et al. 2022: CE + eps (1 - p_t), with 1 - p_t = sum_c y_c (1 - p_c) (the paper's code)."""
  return softmax_focal(x, y) + epsilon * jnp.sum(y * (1 - softmax(x)), axis=-1)


def softmax_focal_grad_paper(x, t, alpha, gamma):
  """Closed-form gradient of -alpha_t (1 - p_t)^g log p_t for class ids t, classes last.

  dL/dx_k = alpha_t [g p_t (1 - p_t)^(g - 1) log p_t - (1 - p_t)^g] (delta_kt - p_k),
  with 1 - p_t summed from the other classes' probabilities and log p_t from log1p,
  so that both keep their relative precision when p_t rounds to 1.
  """
  x = np.asarray(x, np.float64)
  t = np.asarray(t)
  one_hot = np.arange(x.shape[-1]) == t[..., None]
  x_t = np.take_along_axis(x, t[..., None], -1)
  others = np.where(one_hot, 0.0, np.exp(np.minimum(x - x_t, 700.0)))
  log_p_t = -np.log1p(np.sum(others, -1, keepdims=True))
  p = np.exp(x - np.max(x, -1, keepdims=True))
  p = p / np.sum(p, -1, keepdims=True)
  one_minus = np.sum(np.where(one_hot, 0.0, p), -1, keepdims=True)
  p_t = np.exp(log_p_t)
  slope = gamma * p_t * one_minus ** (gamma - 1) * log_p_t - one_minus ** gamma
  alpha_t = 1.0 if alpha is None else np.asarray(alpha, np.float64)[t][..., None]
  return alpha_t * slope * (one_hot - p)


def binary_focal_with_pos_weight(x, y, alpha, gamma, pos_weight):
  """kornia's binary focal loss with ``pos_weight`` for hard targets:
  -alpha w (1 - p)^gamma y log p - (1 - alpha) p^gamma (1 - y) log(1 - p)."""
  p = _sigmoid(x)
  return (-alpha * pos_weight * (1 - p) ** gamma * y * jnp.log(p)
          - (1 - alpha) * p ** gamma * (1 - y) * jnp.log(1 - p))


def log_sum_exp(x):
  """log sum_c exp(x_c), the softmax's log-normaliser."""
  top = jnp.max(x, axis=-1)
  return top + jnp.log(jnp.sum(jnp.exp(x - top[..., None]), axis=-1))


def logit_adjusted(x, y, class_priors, tau=1.0):
  """Menon et al. 2021, eq. 11: the softmax cross-entropy of x + tau log(pi)."""
  return softmax_focal(x + tau * jnp.log(class_priors), y)


def cross_entropy_with_z_loss_t5x(x, ids, z_loss):
  """T5X's cross_entropy_with_logits (of the one-hot targets) in numpy: -sum y log_softmax +
  z_loss log(Z)**2, log Z the logsumexp of the logits."""
  x = np.asarray(x, np.float64)
  log_z = np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1)) + x.max(-1)
  log_softmax = x - log_z[..., None]
  targets = np.arange(x.shape[-1]) == np.asarray(ids)[..., None]
  return -np.sum(targets * log_softmax, -1) + z_loss * log_z ** 2
