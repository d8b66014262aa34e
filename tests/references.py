"""Independent float64 references: textbook formulas and the paper's closed-form gradients.

Nothing here imports jfocal. Textbook formulas are written as a reader of the
paper would write them (sigmoid, log, pow) and are only trusted where float64
keeps them finite (moderate logits); the closed forms are written with
log-sigmoid so that they hold at any logit.
"""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REFERENCE_DEVICE


def on_reference_device(fn):
  """Runs `fn` in float64 on the host CPU, whatever the default device is."""
  def wrapped(*args, **kwargs):
    with jax.default_device(REFERENCE_DEVICE):
      args = [None if a is None else jnp.asarray(a).astype(jnp.float64) for a in args]
      return fn(*args, **kwargs)
  return wrapped


def sigmoid_alpha_t(y, alpha):
  if alpha is None:
    return jnp.ones_like(y)
  return alpha * y + (1 - alpha) * (1 - y)


def sigmoid_focal_textbook(x, y, alpha, gamma):
  """-alpha_t (1 - p_t)^gamma [y log p + (1 - y) log(1 - p)], p = 1 / (1 + exp(-x))."""
  p = 1 / (1 + jnp.exp(-x))
  p_t = y * p + (1 - y) * (1 - p)
  cross_entropy = -(y * jnp.log(p) + (1 - y) * jnp.log(1 - p))
  return sigmoid_alpha_t(y, alpha) * (1 - p_t) ** gamma * cross_entropy


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


def softmax_focal_textbook(x, y, alpha, gamma, axis=-1):
  """-sum_c alpha_c y_c (1 - p_c)^gamma log p_c, p = exp(x) / sum exp(x); y a distribution."""
  p = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
  p = p / jnp.sum(p, axis=axis, keepdims=True)
  terms = -y * (1 - p) ** gamma * jnp.log(p)
  if alpha is not None:
    shape = [1] * x.ndim
    shape[axis] = -1
    terms = terms * jnp.reshape(alpha, shape)
  return jnp.sum(terms, axis=axis)


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
