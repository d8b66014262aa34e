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
# # Large vocabularies: a fused linear + softmax loss
#
# A language model's last layer maps each token's hidden state $h$ ($d$ numbers) to $V$
# logits, $x = h W + b$, and the loss is a softmax over them. With $T$ tokens in a batch the
# logits are a $[T, V]$ array: in float32, $T \times V \times 4$ bytes, i.e. 128 KiB per token
# for $V = 32768$, whereas $h$ is $4d$ bytes per token. Reverse-mode autodiff then builds
# their gradient, a second $[T, V]$ array, so a training step holds about
# $2 \times T \times V \times 4$ bytes for the logits alone: more than the kernel itself
# ($d \times V \times 4$ bytes) as soon as $2T > d$, and far more than the features.
#
# `jfocal.linear_softmax_cross_entropy(h, W, labels, bias=b)` computes exactly
# `jfocal.softmax_cross_entropy(h @ W + b, labels)`, but takes the features and the kernel
# instead of the logits. It multiplies $h$ by one block of `block_size` columns of $W$ at a
# time, keeps a running log-sum-exp and the target's logit, and drops the block. What it keeps
# for the backward pass is a few numbers per token; the backward pass (`jax.custom_vjp`)
# recomputes each block of logits, forms its gradient and accumulates the gradients of $h$,
# $W$ and $b$ block by block. The $[T, V]$ logits never exist; the price is one more matrix
# product (the recomputation). `jfocal.linear_softmax_focal_loss` does the same for the
# softmax focal loss. Both have reverse-mode derivatives only (`jax.grad`,
# `jax.value_and_grad`, `jax.vjp`).
#
# This notebook trains a small next-token model in Flax NNX with $V = 32768$ word tokens of
# the Python standard library's own source code, once with the fused loss and once with the
# materialised one, from the same initialisation and on the same batches, and compares
#
# 1. the loss curves,
# 2. the temporary memory of the compiled training step (XLA's memory analysis),
#    at the training batch and at larger ones,
# 3. the step time;
#
# then the focal variant, label smoothing and the z-loss. Everything runs on the CPU.
# Set `JFOCAL_NOTEBOOK_BUDGET=small` for the test suite's quick run (a few steps; the numbers
# are then those of a barely trained model).

# %%
import collections
import os
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jfocal

SMALL = os.environ.get("JFOCAL_NOTEBOOK_BUDGET") == "small"
STEPS = 4 if SMALL else 150          # training steps of each run
FOCAL_STEPS = 2 if SMALL else 20     # steps of the focal-loss runs
BATCH = 512                          # tokens per training step
HELD_OUT = 1024 if SMALL else 8192   # held-out tokens scored after training
MEMORY_TOKENS = (512, 8192) if SMALL else (512, 2048, 8192, 32768)
TIMING_TOKENS = BATCH if SMALL else 4096
TIMING_REPEATS = 2 if SMALL else 4
print(jax.devices(), "| budget:", "small" if SMALL else "full")

# %% [markdown]
# ## Data: the standard library's source, as words
#
# Every `.py` file of the standard library (the directory of `os.py`, without
# `site-packages`), in sorted order, is split into words and single punctuation characters by
# the regular expression `\w+|[^\w\s]`. The 32767 most frequent tokens get ids 1 to 32767;
# every other token is `<unk>`, id 0, so $V = 32768$. The last 5% of the token stream is held
# out. Nothing is downloaded.

# %%
VOCAB = 32768
UNK = 0
source_dir = pathlib.Path(os.__file__).parent
files = sorted(p for p in source_dir.rglob("*.py") if "site-packages" not in p.parts)
text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
words = re.findall(r"\w+|[^\w\s]", text)
counts = collections.Counter(words)
itos = ["<unk>"] + [word for word, _ in counts.most_common(VOCAB - 1)]
stoi = {word: i for i, word in enumerate(itos)}
ids = np.fromiter((stoi.get(word, UNK) for word in words), np.int32, len(words))
split = int(0.95 * len(ids))
train_ids, held_out_ids = ids[:split], ids[split:]
print(f"{len(files)} files from {source_dir}, {len(words):,} tokens, {len(counts):,} distinct")
print(f"vocabulary {len(itos):,}; <unk> is {np.mean(ids == UNK):.1%} of the tokens")
print("most frequent:", itos[1:21])
print("least frequent kept:", itos[-5:], f"({counts[itos[-1]]} occurrences)")

# %% [markdown]
# ## The model
#
# The previous `CONTEXT = 4` tokens are embedded (64 numbers each), concatenated and passed
# through a two-layer MLP to the features $h$ ($d = 64$); the head is an `nnx.Linear(64, V)`
# whose kernel has the $[d, V]$ layout the fused losses take. `model(context)` returns the
# logits, `model.features(context)` the features. The two losses:
#
# * materialised: `jfocal.softmax_cross_entropy(model(context), targets, reduction="mean")`,
#   the usual way, which builds the $[T, V]$ logits;
# * fused: `jfocal.linear_softmax_cross_entropy(model.features(context),
#   model.head.kernel[...], targets, bias=model.head.bias[...], reduction="mean")`, which
#   never calls the head.
#
# The training step is a pure function of the NNX state (`nnx.split` / `nnx.merge`) under
# `jax.jit`, so that both runs start from the very same arrays and the compiled step can be
# asked for its memory analysis. Inside, it is `nnx.value_and_grad` and
# `nnx.Optimizer.update` with Adam.

# %%
CONTEXT, EMBED, HIDDEN, D = 4, 64, 256, 64


class NextToken(nnx.Module):
  """Next-token model: the previous CONTEXT tokens' embeddings, concatenated, then an MLP."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
    self.hidden = nnx.Linear(CONTEXT * EMBED, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, D, rngs=rngs)
    self.head = nnx.Linear(D, VOCAB, rngs=rngs)

  def features(self, context):  # [..., CONTEXT] ids -> [..., D]
    x = self.embed(context).reshape(*context.shape[:-1], CONTEXT * EMBED)
    return self.out(nnx.gelu(self.hidden(x)))

  def __call__(self, context):  # [..., CONTEXT] ids -> [..., V] logits
    return self.head(self.features(context))


def materialised_loss(model, context, targets):
  return jfocal.softmax_cross_entropy(model(context), targets, reduction="mean")


def fused_loss(model, context, targets):
  return jfocal.linear_softmax_cross_entropy(
      model.features(context), model.head.kernel[...], targets, bias=model.head.bias[...],
      reduction="mean")


model = NextToken(rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
graphdef, initial_state = nnx.split((model, optimizer))


def make_train_step(loss_fn):
  def train_step(state, context, targets):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, context, targets)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss
  return jax.jit(train_step)


def batch(rng, data, tokens):
  """`tokens` random positions of `data`: their CONTEXT previous ids and their own id."""
  positions = rng.integers(CONTEXT, len(data), tokens)
  context = data[positions[:, None] + np.arange(-CONTEXT, 0)]
  return jnp.asarray(context), jnp.asarray(data[positions])


parameters = nnx.state(model, nnx.Param)
print(f"{sum(p.size for p in jax.tree.leaves(parameters)):,} parameters, of which the head "
      f"{model.head.kernel.size + model.head.bias.size:,}")

# %% [markdown]
# Before training: on one batch, the two losses and their gradients with respect to every
# parameter, from `nnx.value_and_grad` of each.

# %%
context, targets = batch(np.random.default_rng(1), train_ids, BATCH)


@jax.jit
def both_gradients(state, context, targets):
  model, _ = nnx.merge(graphdef, state)
  return (nnx.value_and_grad(materialised_loss)(model, context, targets),
          nnx.value_and_grad(fused_loss)(model, context, targets))


(loss_m, grads_m), (loss_f, grads_f) = both_gradients(initial_state, context, targets)
print(f"loss: materialised {float(loss_m):.6f}, fused {float(loss_f):.6f}, "
      f"log V = {np.log(VOCAB):.6f}")
fused_by_path = dict(grads_f.flat_state())
for path, g_m in grads_m.flat_state():
  g_m, g_f = g_m[...], fused_by_path[path][...]
  print(f"d loss / d {'.'.join(map(str, path)):<16} max |difference| "
        f"{float(jnp.max(jnp.abs(g_m - g_f))):.1e} (max |gradient| {float(jnp.max(jnp.abs(g_m))):.1e})")

# %% [markdown]
# ## 1. The same training, twice
#
# Both runs start from `initial_state` and see the same batches of 512 tokens; the steps of
# the two runs alternate, so that their times are measured side by side. The first step of
# each includes the compilation and is left out of the times.

# %%
steps = {"materialised": make_train_step(materialised_loss), "fused": make_train_step(fused_loss)}
states = {name: initial_state for name in steps}
losses = {name: [] for name in steps}
seconds = {name: [] for name in steps}
rng = np.random.default_rng(0)
for _ in range(STEPS):
  context, targets = batch(rng, train_ids, BATCH)
  for name, step in steps.items():
    start = time.perf_counter()
    states[name], loss = step(states[name], context, targets)
    losses[name].append(float(loss))  # waits for the step
    seconds[name].append(time.perf_counter() - start)

signed_difference = np.array(losses["fused"]) - np.array(losses["materialised"])
difference = np.abs(signed_difference)
print(f"loss {losses['materialised'][0]:.4f} -> {losses['materialised'][-1]:.4f} (materialised), "
      f"{losses['fused'][0]:.4f} -> {losses['fused'][-1]:.4f} (fused)")
print(f"max |fused - materialised| over the {STEPS} steps: {difference.max():.2e} "
      f"(at step {difference.argmax()}); relative {np.max(difference / np.array(losses['materialised'])):.1e}; "
      f"bitwise equal at {np.sum(difference == 0)} of the {STEPS} steps")
for name in steps:
  print(f"{name:>12}: median step {1e3 * np.median(seconds[name][1:]):.0f} ms at {BATCH} tokens "
        f"(first step, with compilation: {seconds[name][0]:.1f} s)")

fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(10, 3.2))
ax.plot(losses["materialised"], lw=3, alpha=0.5, label="materialised logits")
ax.plot(losses["fused"], lw=1, color="k", label="fused (linear_softmax_cross_entropy)")
ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title="training loss")
ax.legend()
ax_diff.plot(signed_difference, ".")
ax_diff.set(xlabel="step", ylabel="fused - materialised", title="difference of the losses")
plt.tight_layout()
plt.show()

# %% [markdown]
# The two curves coincide: the largest difference over the run, printed above, is a few
# units of float32 rounding relative to the loss, although each run's rounding errors feed
# into its next parameters. The two computations sum the same terms in a different order
# (blocks of 1024 columns with a running maximum, against one pass over all $V$ columns);
# nothing else differs, and the gradients at the initialisation (above) agree to about
# $10^{-8}$ or better, against gradients of $10^{-3}$ to $10^{-1}$.
#
# The trained models on held-out tokens (random positions in the last 5% of the stream),
# scored with the fused loss, and the most likely next tokens after a few contexts:

# %%
held_out_context, held_out_targets = batch(np.random.default_rng(2), held_out_ids, HELD_OUT)


@jax.jit
def held_out_loss(state):
  model, _ = nnx.merge(graphdef, state)
  return fused_loss(model, held_out_context, held_out_targets)


for name in steps:
  value = float(held_out_loss(states[name]))
  print(f"{name:>12}: held-out loss {value:.4f} nats/token, perplexity {np.exp(value):,.0f}")
trained, _ = nnx.merge(graphdef, states["fused"])
for prompt in ("def __init__ ( self", "import os . path", "for i in range ("):
  context = jnp.asarray([[stoi.get(w, UNK) for w in prompt.split()[-CONTEXT:]]])
  best = jnp.argsort(-trained(context)[0])[:5]
  print(f"{prompt!r:>24} -> {[itos[int(i)] for i in best]}")

# %% [markdown]
# ## 2. Memory
#
# `jax.jit(train_step).lower(...).compile().memory_analysis()` reports what XLA allocates for
# the compiled step. Its `temp_size_in_bytes` is the scratch memory of the step: everything
# but the arguments (the parameters, Adam's moments and the batch, printed below) and the
# outputs. Only shapes are needed (`jax.ShapeDtypeStruct`), so the step is compiled, never
# run, also at batches far larger than the training one. Next to the measurements are the
# two estimates: $2 \times T \times V \times 4$ bytes for the logits and their gradient, and
# $2 \times T \times \text{block} \times 4$ bytes for one block of each (`block_size` 1024,
# the default).

# %%
BLOCK = 1024  # jfocal's default block_size
memory = {name: [] for name in steps}
for tokens in MEMORY_TOKENS:
  shapes = (jax.ShapeDtypeStruct((tokens, CONTEXT), jnp.int32),
            jax.ShapeDtypeStruct((tokens,), jnp.int32))
  for name, step in steps.items():
    analysis = step.lower(initial_state, *shapes).compile().memory_analysis()
    memory[name].append(analysis.temp_size_in_bytes)
print(f"arguments of the step: {analysis.argument_size_in_bytes / 2**20:.0f} MiB")
MiB = 2**20
print(f"{'tokens':>7} | {'materialised':>12} {'2 T V 4':>9} | {'fused':>9} {'2 T block 4':>11} |"
      f" {'ratio':>5}")
for i, tokens in enumerate(MEMORY_TOKENS):
  m, f = memory["materialised"][i], memory["fused"][i]
  print(f"{tokens:>7} | {m / MiB:>8.0f} MiB {2 * tokens * VOCAB * 4 / MiB:>5.0f} MiB |"
        f" {f / MiB:>5.0f} MiB {2 * tokens * BLOCK * 4 / MiB:>7.0f} MiB | {m / f:>5.0f}")
extra = MEMORY_TOKENS[-1] - MEMORY_TOKENS[-2]
for name in steps:
  growth = (memory[name][-1] - memory[name][-2]) / extra
  print(f"{name}: {growth / 1024:.1f} KiB more per extra token from {MEMORY_TOKENS[-2]} to "
        f"{MEMORY_TOKENS[-1]} tokens")
print(f"for comparison: 2 V 4 bytes = {2 * VOCAB * 4 / 1024:.0f} KiB, "
      f"2 block 4 bytes = {2 * BLOCK * 4 / 1024:.0f} KiB")

fig, ax = plt.subplots(figsize=(5.5, 3.6))
tokens = np.array(MEMORY_TOKENS)
ax.loglog(tokens, np.array(memory["materialised"]) / MiB, "o-", label="materialised: measured")
ax.loglog(tokens, 2 * tokens * VOCAB * 4 / MiB, "--", color="C0", label="2 T V 4 bytes")
ax.loglog(tokens, np.array(memory["fused"]) / MiB, "s-", color="C1", label="fused: measured")
ax.loglog(tokens, 2 * tokens * BLOCK * 4 / MiB, "--", color="C1", label="2 T block 4 bytes")
ax.set(xlabel="tokens per step T", ylabel="temporary memory of the step (MiB)",
       title=f"training step, V = {VOCAB}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The materialised step's temporary memory is $2 \times T \times V \times 4$ bytes plus a
# little, at every batch: the logits and their gradient are nearly all of it. The fused
# step's is smaller by the printed ratio. It too grows in proportion to $T$, but by a few
# blocks' worth of bytes per token instead of two rows of $V$ (the last two printed lines):
# its size is set by `block_size`, not by the vocabulary. The estimate
# $2 \times T \times \text{block} \times 4$ is only a guide to it: XLA's buffer assignment
# decides the rest, and the measured column, not the estimate, is what this backend
# allocates.
#
# ## 3. Step time
#
# The medians of section 1 are at 512 tokens. Here both steps run again side by side at a
# larger batch, after one call that compiles them.

# %%
context, targets = batch(np.random.default_rng(3), train_ids, TIMING_TOKENS)
timings = {name: [] for name in steps}
for name, step in steps.items():
  jax.block_until_ready(step(initial_state, context, targets))  # compile
for _ in range(TIMING_REPEATS):
  for name, step in steps.items():
    start = time.perf_counter()
    jax.block_until_ready(step(initial_state, context, targets))
    timings[name].append(time.perf_counter() - start)
medians = {BATCH: {name: np.median(seconds[name][1:]) for name in steps},
           TIMING_TOKENS: {name: np.median(timings[name]) for name in steps}}
for tokens, median in medians.items():
  print(f"{tokens:>5} tokens: materialised {1e3 * median['materialised']:.0f} ms, "
        f"fused {1e3 * median['fused']:.0f} ms per step "
        f"(fused / materialised = {median['fused'] / median['materialised']:.2f})")

fig, ax = plt.subplots(figsize=(5, 3))
x = np.arange(len(medians))
for k, name in enumerate(steps):
  ax.bar(x + 0.4 * k - 0.2, [1e3 * m[name] for m in medians.values()], width=0.4, label=name)
ax.set_xticks(x, [f"{t} tokens" for t in medians])
ax.set(ylabel="median step time (ms)", title=f"training step on {jax.devices()[0].platform}")
ax.legend()
plt.show()

# %% [markdown]
# On this CPU the fused step is the faster one (a ratio below 1), despite its extra matrix
# product: the materialised step writes and reads $[T, V]$ arrays several times (the logits,
# the softmax, their gradient), which costs memory traffic, while the fused one works on one
# $[T, \text{block}]$ block at a time. How the two compare depends on the hardware, on the
# load of the machine and on `block_size`; these are the numbers of this run only.
#
# ## The focal loss, label smoothing and the z-loss
#
# `jfocal.linear_softmax_focal_loss(h, W, labels, bias=b, gamma=2.0)` is the fused
# `jfocal.softmax_focal_loss(h @ W + b, labels, gamma=2.0)`: $-(1 - p_t)^\gamma \log p_t$,
# which weighs down the tokens the model already predicts well. A few steps of each, again
# from the same initialisation and on the same batches:

# %%
def materialised_focal(model, context, targets):
  return jfocal.softmax_focal_loss(model(context), targets, gamma=2.0, reduction="mean")


def fused_focal(model, context, targets):
  return jfocal.linear_softmax_focal_loss(
      model.features(context), model.head.kernel[...], targets, bias=model.head.bias[...],
      gamma=2.0, reduction="mean")


focal_steps = {"materialised": make_train_step(materialised_focal),
               "fused": make_train_step(fused_focal)}
focal_states = {name: initial_state for name in focal_steps}
focal_losses = {name: [] for name in focal_steps}
rng = np.random.default_rng(0)
for _ in range(FOCAL_STEPS):
  context, targets = batch(rng, train_ids, BATCH)
  for name, step in focal_steps.items():
    focal_states[name], loss = step(focal_states[name], context, targets)
    focal_losses[name].append(float(loss))
focal_difference = np.abs(np.array(focal_losses["fused"]) - np.array(focal_losses["materialised"]))
print(f"focal loss {focal_losses['fused'][0]:.4f} -> {focal_losses['fused'][-1]:.4f} in "
      f"{FOCAL_STEPS} steps; max |fused - materialised| {focal_difference.max():.2e}")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(focal_losses["materialised"], lw=3, alpha=0.5, label="softmax_focal_loss of the logits")
ax.plot(focal_losses["fused"], "k", lw=1, label="linear_softmax_focal_loss")
ax.set(xlabel="step", ylabel="focal loss, γ = 2", title="focal-loss training")
ax.legend()
plt.show()

# %% [markdown]
# `label_smoothing` (targets $(1 - \varepsilon)\,\mathrm{onehot}(t) + \varepsilon / V$) and
# `z_loss` (adds $z \cdot \mathrm{logsumexp}(x)^2$ per token, as in PaLM) are arguments of
# both fused losses and come out of the same pass over the vocabulary. On one batch, at the
# trained parameters:

# %%
context, targets = batch(np.random.default_rng(4), train_ids, BATCH)
options = {"label_smoothing": 0.1, "z_loss": 1e-4}


@jax.jit
def with_options(state, context, targets):
  model, _ = nnx.merge(graphdef, state)
  h, kernel, bias = model.features(context), model.head.kernel[...], model.head.bias[...]
  return {"cross-entropy": (
              jfocal.softmax_cross_entropy(h @ kernel + bias, targets, reduction="mean",
                                           **options),
              jfocal.linear_softmax_cross_entropy(h, kernel, targets, bias=bias,
                                                  reduction="mean", **options)),
          "focal, γ = 2": (
              jfocal.softmax_focal_loss(h @ kernel + bias, targets, gamma=2.0,
                                        reduction="mean", **options),
              jfocal.linear_softmax_focal_loss(h, kernel, targets, bias=bias, gamma=2.0,
                                               reduction="mean", **options))}


print(options)
for name, (materialised, fused) in with_options(states["fused"], context, targets).items():
  print(f"{name:<14} materialised {float(materialised):.6f}  fused {float(fused):.6f}")

# %% [markdown]
# Forward-mode derivatives (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) are not defined for the
# fused losses, which are built on `jax.custom_vjp`; they raise a `TypeError` that points to
# the materialised loss, which has them:

# %%
h, kernel = trained.features(context), trained.head.kernel[...]
try:
  jax.jvp(lambda h: jfocal.linear_softmax_cross_entropy(h, kernel, targets, reduction="sum"),
          (h,), (jnp.ones_like(h),))
except TypeError as error:
  print("TypeError:", str(error)[:300], "...")
