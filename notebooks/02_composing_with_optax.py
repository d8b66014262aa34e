# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Composing jfocal with optax and `jax.vmap`
#
# jfocal's losses are pure functions of arrays, unreduced by default like optax's, so they go
# wherever a loss goes: inside `jax.value_and_grad` in an optax training step, inside
# `jax.vmap` over anchors and images, under `jax.jit`. This notebook shows
#
# 1. a jitted optax training step (clipping, AdamW, warm-up) with a focal loss,
# 2. the same step in Flax, written with `flax.nnx` and with `flax.linen`,
# 3. a per-anchor loss vmapped over anchors and images, and why it equals the batched call,
# 4. masks (`where`, `ignore_index`) for padding and ignored anchors,
# 5. the normalisers: mean over elements, `normalizer="num_positives"`, a fixed number.

# %%
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jfocal

# %% [markdown]
# ## 1. A training step
#
# A toy dense problem: 64 "images" of 500 "anchors" with 8 features each; an anchor is an
# object of class $c \in \{0, 1, 2\}$ with probability 2% and background (class id 3 = C)
# otherwise. A linear classifier with the prior bias of RetinaNet learns it with a focal loss
# normalised by the number of positive anchors.

# %%
NUM_CLASSES, IMAGES, ANCHORS, FEATURES = 3, 64, 500, 8
rng = np.random.default_rng(0)
class_ids = np.where(rng.uniform(size=(IMAGES, ANCHORS)) < 0.02,
                     rng.integers(0, NUM_CLASSES, (IMAGES, ANCHORS)), NUM_CLASSES)
centres = rng.normal(0, 1.5, (NUM_CLASSES + 1, FEATURES))
centres[NUM_CLASSES] = 0
features = jnp.asarray(centres[class_ids] + rng.normal(size=(IMAGES, ANCHORS, FEATURES)),
                       jnp.float32)
class_ids = jnp.asarray(class_ids, jnp.int32)
print(f"positives: {int(jnp.sum(class_ids < NUM_CLASSES))} of {IMAGES * ANCHORS} anchors")

params = {"w": jnp.zeros((FEATURES, NUM_CLASSES)),
          "b": jfocal.prior_bias_init(0.01)(None, (NUM_CLASSES,))}
schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=10, decay_steps=200)
optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def loss_fn(params, features, class_ids):
  logits = features @ params["w"] + params["b"]
  return jfocal.sigmoid_focal_loss(logits, class_ids, alpha=0.25, gamma=2.0,
                                   reduction="mean", normalizer="num_positives")


@jax.jit
def train_step(params, state, features, class_ids):
  loss, grads = jax.value_and_grad(loss_fn)(params, features, class_ids)
  updates, state = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


state = optimizer.init(params)
losses = []
for _ in range(200):
  params, state, loss = train_step(params, state, features, class_ids)
  losses.append(float(loss))
predicted = jnp.argmax(features @ params["w"] + params["b"], -1)
found = (jax.nn.sigmoid(jnp.max(features @ params["w"] + params["b"], -1)) > 0.5)
is_object = class_ids < NUM_CLASSES
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
      f"objects found {float(jnp.mean(found[is_object])):.1%}, "
      f"with the right class {float(jnp.mean((predicted == class_ids)[is_object & found])):.1%}; "
      f"background flagged {float(jnp.mean(found[~is_object])):.2%}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(losses)
ax.set(xlabel="step", ylabel="focal loss / #positives", yscale="log")
plt.show()

# %% [markdown]
# ## 2. The same step in Flax NNX and in Flax linen
#
# In Flax the jfocal call does not change; what changes is who holds the parameters and the
# optimiser state. The classifier gets a hidden layer of 16 ReLU units and is written twice,
# trained on the same data with the same optax chain:
#
# * **NNX** (`flax.nnx`, which `examples/retinanet` uses): the model is an object that owns its
#   parameters, `nnx.Optimizer(model, optimizer, wrt=nnx.Param)` owns the optax state, and
#   under `nnx.jit` the step takes `nnx.value_and_grad` with respect to the model's
#   `nnx.Param`s and calls `optimizer.update(model, grads)`, which updates both in place;
# * **linen** (`flax.linen`, still what many codebases use): the module is a stateless
#   description, `init` returns the parameters as a nested dict, `apply` runs the network, and
#   the step is the one of section 1 with `apply` in place of the matrix product.
#
# The two APIs have the same default initialisers (LeCun normal kernels, zero biases; here the
# output bias at the prior), but they draw different numbers from the same seed. So that both
# runs start from the same point, the NNX model takes linen's initial parameters:
# `nnx.update` accepts linen's nested dict as it is, since the attribute names of the NNX
# model are the names of the linen submodules.

# %%
HIDDEN = 16


def focal_loss(logits, class_ids):
  return jfocal.sigmoid_focal_loss(logits, class_ids, alpha=0.25, gamma=2.0,
                                   reduction="mean", normalizer="num_positives")


# %% [markdown]
# ### NNX

# %%
class NNXClassifier(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, NUM_CLASSES, bias_init=jfocal.prior_bias_init(0.01),
                          rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def nnx_train_step(model, nnx_optimizer, features, class_ids):
  loss, grads = nnx.value_and_grad(lambda model: focal_loss(model(features), class_ids))(model)
  nnx_optimizer.update(model, grads)  # the new parameters and optax state, in place
  return loss


# %% [markdown]
# ### linen

# %%
class LinenClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(HIDDEN, name="hidden")(x))
    return nn.Dense(NUM_CLASSES, bias_init=jfocal.prior_bias_init(0.01), name="out")(x)


linen_model = LinenClassifier()


@jax.jit
def linen_train_step(params, state, features, class_ids):
  def loss_of(params):
    return focal_loss(linen_model.apply({"params": params}, features), class_ids)

  loss, grads = jax.value_and_grad(loss_of)(params)
  updates, state = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


# %% [markdown]
# ### Both, from the same start

# %%
linen_params = linen_model.init(jax.random.key(0), features[:1])["params"]
nnx_model = NNXClassifier(rngs=nnx.Rngs(0))
print("same seed, same initial kernels:",
      bool(jnp.array_equal(nnx_model.hidden.kernel[...], linen_params["hidden"]["kernel"])))
nnx.update(nnx_model, linen_params)
nnx_optimizer = nnx.Optimizer(nnx_model, optimizer, wrt=nnx.Param)
linen_state = optimizer.init(linen_params)
trajectories = {"NNX": [], "linen": []}
for _ in range(200):
  trajectories["NNX"].append(float(nnx_train_step(nnx_model, nnx_optimizer, features, class_ids)))
  linen_params, linen_state, linen_loss = linen_train_step(linen_params, linen_state, features,
                                                           class_ids)
  trajectories["linen"].append(float(linen_loss))
nnx_losses, linen_losses = np.asarray(trajectories["NNX"]), np.asarray(trajectories["linen"])
print(f"NNX   loss {nnx_losses[0]:.4f} -> {nnx_losses[-1]:.4f}\n"
      f"linen loss {linen_losses[0]:.4f} -> {linen_losses[-1]:.4f}\n"
      f"max relative difference over the 200 steps: "
      f"{np.max(np.abs(nnx_losses - linen_losses) / linen_losses):.1e}")
trained = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))  # linen's layout: nested dicts
print("max |parameter difference| after training:", max(jax.tree.leaves(jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), trained, linen_params))))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(nnx_losses, label="NNX")
ax.plot(linen_losses, "--", label="linen")
ax.set(xlabel="step", ylabel="focal loss / #positives", yscale="log")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Vmapped per-anchor losses
#
# Detectors are often written per image (matching, targets and loss for one image) and
# `jax.vmap`ped over the batch; some write the loss per anchor. With integer class ids a
# single anchor is `logits` of shape `(C,)` and a scalar id, so the same jfocal call works at
# every level. What must not be vmapped is the **normaliser**: RetinaNet divides the batch's
# summed loss by the batch's number of positive anchors, so each image returns a *sum*
# (`reduction="sum"`) and the division happens once, outside.

# %%
logits = features @ params["w"] + params["b"]  # (images, anchors, classes)
focal_sum = functools.partial(jfocal.sigmoid_focal_loss, alpha=0.25, gamma=2.0, reduction="sum")

per_anchor = jax.vmap(jax.vmap(focal_sum))(logits, class_ids)  # (images, anchors)
per_image = jax.vmap(focal_sum)(logits, class_ids)  # (images,)
num_positives = jnp.maximum(jnp.sum(class_ids < NUM_CLASSES), 1)
batched = jfocal.sigmoid_focal_loss(logits, class_ids, alpha=0.25, gamma=2.0,
                                    reduction="mean", normalizer="num_positives")
print("per anchor, vmapped twice :", float(jnp.sum(per_anchor) / num_positives))
print("per image, vmapped        :", float(jnp.sum(per_image) / num_positives))
print("whole batch, one call     :", float(batched))
wrong = jnp.mean(jax.vmap(functools.partial(focal_sum.func, alpha=0.25, gamma=2.0, reduction="mean",
                                            normalizer="num_positives"))(logits, class_ids))
print("mean of per-image normalised losses (not the same):", float(wrong))

# %% [markdown]
# Gradients flow through the vmaps the same way; `jax.grad` of the vmapped version equals the
# gradient of the batched call:

# %%
def vmapped_loss(params):
  logits = features @ params["w"] + params["b"]
  return jnp.sum(jax.vmap(focal_sum)(logits, class_ids)) / num_positives


grad_vmapped = jax.grad(vmapped_loss)(params)
grad_batched = jax.grad(loss_fn)(params, features, class_ids)
print("max |gradient difference|:", max(float(jnp.max(jnp.abs(grad_vmapped[k] - grad_batched[k])))
                                      for k in params))

# %% [markdown]
# ## 4. Masks: ignored anchors and padding
#
# Anchors between the IoU thresholds are *ignored*: they contribute neither loss nor gradient.
# Mark them with an id and pass it as `ignore_index`, or pass a boolean mask as `where` (a
# per-anchor mask of a sigmoid loss is `mask[..., None]`, broadcast over the classes). Masked
# entries may hold anything, even NaN logits from padding, without leaking into the loss or
# its gradient.

# %%
IGNORE = -1
ignored = jnp.zeros((IMAGES, ANCHORS), bool).at[:, :50].set(True)
ids_with_ignore = jnp.where(ignored, IGNORE, class_ids)
padded_logits = jnp.where(ignored[..., None], jnp.nan, logits)  # garbage in ignored anchors

by_index = jfocal.sigmoid_focal_loss(padded_logits, ids_with_ignore, ignore_index=IGNORE,
                                     reduction="sum")
by_where = jfocal.sigmoid_focal_loss(padded_logits, class_ids, where=~ignored[..., None],
                                     reduction="sum")
by_slicing = jfocal.sigmoid_focal_loss(logits[:, 50:], class_ids[:, 50:], reduction="sum")
print(float(by_index), float(by_where), float(by_slicing))
grad_masked = jax.grad(lambda z: jfocal.sigmoid_focal_loss(z, ids_with_ignore, ignore_index=IGNORE,
                                                           reduction="sum"))(padded_logits)
print("gradient on ignored anchors:", float(jnp.max(jnp.abs(grad_masked[:, :50]))),
      "| finite elsewhere:", bool(jnp.all(jnp.isfinite(grad_masked[:, 50:]))))

# %% [markdown]
# ## 5. Normalisers
#
# `reduction="mean"` divides the (weighted, masked) sum by a normaliser:
#
# * by default the number of unmasked elements, anchors × classes: with 2% positives and
#   3 classes that is ~150 times the number of positives, so the loss (and its gradient)
#   shrinks with the background flood and with the image size;
# * `normalizer="num_positives"`: the number of positive targets (at least 1), RetinaNet's
#   choice, which keeps the scale of the loss independent of how many anchors are background;
# * a number or scalar array (mmdetection's `avg_factor`), e.g. a running average of the
#   positive count for a smoother scale across batches.

# %%
for name, kwargs in (("mean over elements", {}),
                     ("num_positives", {"normalizer": "num_positives"}),
                     ("fixed 100.0", {"normalizer": 100.0})):
  value = jfocal.sigmoid_focal_loss(logits, class_ids, reduction="mean", **kwargs)
  print(f"{name:<20} {float(value):.5f}")
print("positives:", int(jnp.sum(class_ids < NUM_CLASSES)), "| elements:", logits.size)
print("everything masked, mean:",
      float(jfocal.sigmoid_focal_loss(logits, class_ids, where=jnp.zeros_like(logits, bool),
                                      reduction="mean")))
