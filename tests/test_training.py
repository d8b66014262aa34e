"""jfocal inside optax training steps and Flax modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfocal


pytestmark = pytest.mark.usefixtures("standard_promotion")


def _imbalanced_problem(seed=0, n=512, positive_fraction=0.05):
  rng = np.random.default_rng(seed)
  labels = (rng.uniform(size=n) < positive_fraction).astype(np.float32)
  features = rng.normal(size=(n, 4)).astype(np.float32) + labels[:, None] * 1.5
  return jnp.asarray(features), jnp.asarray(labels)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_an_optax_adam_step_with_focal_loss_lowers_the_loss(gamma):
  features, labels = _imbalanced_problem()
  params = {"w": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def loss_fn(params):
    logits = features @ params["w"] + params["b"]
    return jfocal.sigmoid_focal_loss(logits, labels, gamma=gamma, reduction="mean",
                                     normalizer="num_positives")

  optimizer = optax.adam(0.05)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = optimizer.init(params)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


class _Classifier(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(self.num_classes, bias_init=jfocal.prior_bias_init(0.01))(x)


def test_flax_head_with_prior_bias_starts_at_the_prior_and_trains_with_softmax_focal():
  features, labels = _imbalanced_problem(seed=1)
  ids = labels.astype(jnp.int32)
  model = _Classifier(num_classes=2)
  params = model.init(jax.random.key(0), features)
  np.testing.assert_allclose(jax.nn.sigmoid(params["params"]["Dense_1"]["bias"]), 0.01, rtol=1e-5)

  alpha = jfocal.background_alpha(0.25, 2)
  optimizer = optax.sgd(0.5)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(params):
      return jfocal.softmax_focal_loss(model.apply(params, features), ids, alpha=alpha,
                                       reduction="mean")
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for _ in range(20):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  assert float(loss) < first
