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
# # Data-parallel focal loss: sharded arrays, `shard_map` and a global normaliser
#
# A detector's focal loss is summed over anchors and divided by the number of positive
# anchors. With the batch split over devices, that number has to be the *global* count:
# dividing each device's sum by its own count (what detectron2 does) gives a loss, and
# gradients, that change with the number of devices. This notebook runs on 8 simulated CPU
# devices and shows
#
# 1. `jax.jit` over sharded arrays: nothing to change, and only scalars cross devices;
# 2. `shard_map` with `axis_name`: the global loss on every device, and what per-device
#    normalisation would have given instead;
# 3. a data-parallel optax training step that reproduces single-device training;
# 4. detectron2's moving-average normaliser, made global.

# %%
import os

# Eight CPU devices; must be set before JAX starts.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jfocal

print(jax.device_count(), "devices")

# %% [markdown]
# A batch of 16 images with 512 anchors and 10 classes each; id 10 is background. The number
# of positive anchors differs a lot between images, as it does in detection.

# %%
NUM_CLASSES, IMAGES, ANCHORS = 10, 16, 512
rng = np.random.default_rng(0)
logits = jnp.asarray(rng.normal(size=(IMAGES, ANCHORS, NUM_CLASSES)) * 2 - 3, jnp.float32)
positives_per_image = rng.integers(1, 40, size=IMAGES)
ids = np.full((IMAGES, ANCHORS), NUM_CLASSES)
for image, count in enumerate(positives_per_image):
  ids[image, :count] = rng.integers(0, NUM_CLASSES, size=count)
ids = jnp.asarray(ids, jnp.int32)
print("positives per image:", positives_per_image)


def focal(x, y, **options):
  return jfocal.sigmoid_focal_loss(x, y, reduction="mean", normalizer="num_positives", **options)


single_device = focal(logits, ids)
print(f"one device: {float(single_device):.6f}")

# %% [markdown]
# ## 1. `jax.jit` over sharded arrays
#
# Shard images over 4 devices and anchors over 2. The loss is called exactly as on one
# device; XLA partitions the sums and counts. The compiled program's only collectives are
# all-reduces of scalars (the partial sums and counts), and the gradient stays sharded.

# %%
mesh = jax.make_mesh((4, 2), ("images", "anchors"))
sharding = NamedSharding(mesh, P("images", "anchors"))
sharded_logits, sharded_ids = jax.device_put((logits, ids), sharding)

step = jax.jit(jax.value_and_grad(focal))
value, grad = step(sharded_logits, sharded_ids)
print(f"sharded:    {float(value):.6f}   gradient sharding: {grad.sharding.spec}")
hlo = step.lower(sharded_logits, sharded_ids).compile().as_text()
print("collectives:", sorted({m for m in re.findall(r"= (\S+\[\S*\]) (all-\w+|collective-\w+)", hlo)}))

# %% [markdown]
# ## 2. `shard_map` with `axis_name`
#
# Inside `shard_map` each device sees only its images. With `axis_name`, the loss sums its
# partial sums and positive counts over the named axis, so every device holds the loss of the
# whole batch. Without it, each device normalises by its own count, and the average over
# devices is a different number for every device count.

# %%
def per_device_loss(devices, axis_name):
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
  mapped = jax.shard_map(lambda x, y: focal(x, y, axis_name=axis_name)[None], mesh=mesh,
                         in_specs=(P("data"), P("data")), out_specs=P("data"))
  return np.asarray(jax.jit(mapped)(*jax.device_put((logits, ids), NamedSharding(mesh, P("data")))))


device_counts = [1, 2, 4, 8]
global_losses = [per_device_loss(n, "data").mean() for n in device_counts]
local_losses = [per_device_loss(n, None).mean() for n in device_counts]
for n, g, l in zip(device_counts, global_losses, local_losses):
  print(f"{n} devices: axis_name -> {g:.6f}   own count per device (averaged) -> {l:.6f}")

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.plot(device_counts, global_losses, "o-", label="jfocal, axis_name (global count)")
ax.plot(device_counts, local_losses, "s--", label="each device divides by its own count")
ax.axhline(float(single_device), color="gray", lw=0.8, label="one device")
ax.set(xscale="log", xticks=device_counts, xticklabels=device_counts, xlabel="devices",
       ylabel="focal loss of the same batch", title="The same batch, split over n devices")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. A data-parallel training step
#
# A small per-anchor classifier, trained with AdamW on the same batches three ways: on one
# device, with `jax.jit` over batch-sharded arrays, and with `shard_map` and `axis_name`.
# Inside `shard_map`, parameters are replicated, and JAX sums their per-device gradients
# itself, so every device applies the global gradient.

# %%
class AnchorClassifier(nn.Module):
  @nn.compact
  def __call__(self, features):
    hidden = nn.relu(nn.Dense(32)(features))
    return nn.Dense(NUM_CLASSES, bias_init=jfocal.prior_bias_init(0.01))(hidden)


model = AnchorClassifier()
features = jnp.asarray(rng.normal(size=(IMAGES, ANCHORS, 8)), jnp.float32)
# Class ids depend on the features so that there is something to learn.
learnable_ids = jnp.where(features[..., 0] > 1.0, jnp.argmax(features[..., 1:], -1) % NUM_CLASSES,
                          NUM_CLASSES).astype(jnp.int32)
params = model.init(jax.random.key(0), features)
optimizer = optax.adamw(1e-2)


def objective(params, x, y, **options):
  return focal(model.apply(params, x), y, **options)


def apply(params, opt_state, grads):
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


@jax.jit
def plain_step(params, opt_state, x, y):
  loss, grads = jax.value_and_grad(objective)(params, x, y)
  return *apply(params, opt_state, grads), loss


data_mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@jax.jit
def mapped_step(params, opt_state, x, y):
  loss, grads = jax.shard_map(
      lambda p, x, y: jax.value_and_grad(objective)(p, x, y, axis_name="data"),
      mesh=data_mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())(params, x, y)
  return *apply(params, opt_state, grads), loss


def train(step, place):
  state, losses = (params, optimizer.init(params)), []
  x, y = place(features), place(learnable_ids)
  for _ in range(30):
    *state, loss = step(*state, x, y)
    losses.append(float(loss))
  return losses


batch_sharded = lambda array: jax.device_put(array, NamedSharding(data_mesh, P("data")))
curves = {"one device": train(plain_step, lambda a: a),
          "jit, sharded batch": train(plain_step, batch_sharded),
          "shard_map, axis_name": train(mapped_step, batch_sharded)}
for name, curve in curves.items():
  print(f"{name:22s} loss after 30 steps: {curve[-1]:.6f}  "
        f"max |difference| to one device: {np.max(np.abs(np.subtract(curve, curves['one device']))):.2e}")

fig, ax = plt.subplots(figsize=(5.5, 3.5))
for (name, curve), style in zip(curves.items(), ["-", "--", ":"]):
  ax.plot(curve, style, lw=2, label=name)
ax.set(xlabel="step", ylabel="focal loss / positives", yscale="log",
       title="Data-parallel training = one-device training")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. A global moving-average normaliser
#
# detectron2 divides by a moving average of the positive count, `n ← 0.9 n + 0.1 max(count, 1)`,
# starting at 100, which keeps the loss scale steady between batches. `jfocal.ema_normalizer`
# is the same update as a pure function of an explicit state; with `axis_name` the count is
# global.

# %%
def ema_step(state, y):
  count = jnp.sum(y < NUM_CLASSES)
  return jfocal.ema_normalizer(count, state, momentum=0.9, axis_name="data")


mapped_ema = jax.jit(jax.shard_map(ema_step, mesh=data_mesh, in_specs=(P(), P("data")),
                                   out_specs=P()))
state = single_state = jfocal.ema_normalizer_init()
for _ in range(3):
  state = mapped_ema(state, batch_sharded(ids))
  single_state = jfocal.ema_normalizer(jnp.sum(ids < NUM_CLASSES), single_state)
print(f"8 devices: {float(state):.4f}   one device: {float(single_state):.4f}")
loss = jfocal.sigmoid_focal_loss(logits, ids, reduction="mean", normalizer=state)
print(f"loss with the moving-average normaliser: {float(loss):.6f}")
