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
# # Focal loss explained
#
# Lin et al., [*Focal Loss for Dense Object Detection*](https://arxiv.org/abs/1708.02002)
# (2017), write the binary cross-entropy of a prediction $p = \sigma(x)$ for a target $y$ in
# terms of $p_t$, the probability the model gives to the *true* class:
#
# $$p_t = \begin{cases} p & y = 1 \\ 1 - p & y = 0 \end{cases}, \qquad
#   \mathrm{CE}(p_t) = -\log p_t, \qquad
#   \mathrm{FL}(p_t) = -\alpha_t\,(1 - p_t)^\gamma \log p_t .$$
#
# The modulating factor $(1-p_t)^\gamma$ leaves hard examples ($p_t$ small) almost untouched and
# shrinks the loss of easy ones ($p_t \to 1$). A dense detector scores ~$10^4$–$10^5$ anchors per
# image, nearly all of them easy background: under cross-entropy their many small losses add
# up to most of the total. This notebook draws the paper's Figure 1, the gradients, the
# CE/FL ratios, what $\alpha$ does, and compares jfocal with optax on the same inputs.

# %%
import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import jfocal

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
p_t = jnp.linspace(0.001, 0.999, 999)
logit_of_true_class = jnp.log(p_t) - jnp.log1p(-p_t)  # x with sigma(x) = p_t for y = 1
positive = jnp.ones_like(p_t)


def focal(x, y, gamma):
  """Unweighted focal loss (alpha=None) of logits x, elementwise; gamma = 0 is CE."""
  return jfocal.sigmoid_focal_loss(x, y, alpha=None, gamma=gamma)


# %% [markdown]
# ## Figure 1: loss against $p_t$
#
# With $\gamma = 0$ the curve is cross-entropy. Even well-classified examples ($p_t > 0.6$)
# keep a loss of non-trivial size under CE; with $\gamma = 2$ they almost vanish.

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5))
for gamma in GAMMAS:
  ax.plot(p_t, focal(logit_of_true_class, positive, gamma), label=f"γ = {gamma:g}")
ax.axvspan(0.6, 1.0, color="0.92")
ax.text(0.62, 4.2, "well-classified\nexamples")
ax.set(xlabel="probability of ground truth class $p_t$", ylabel="loss", ylim=(0, 5),
       title="FL(p_t) = -(1 - p_t)^γ log p_t  (the paper's Figure 1)")
ax.legend()
plt.show()

# %% [markdown]
# ## Gradients against $p_t$ and against the logit
#
# What training sees is the gradient with respect to the logit $x$. jfocal differentiates its
# loss with an analytic rule; for $y \in \{0, 1\}$ the paper's appendix gives the closed form
# (with $y^\pm = 2y - 1$):
#
# $$\frac{d\,\mathrm{FL}}{dx}
#   = y^\pm (1 - p_t)^\gamma \left(\gamma\, p_t \log p_t + p_t - 1\right).$$

# %%
def focal_grad(x, y, gamma):
  return jax.vmap(jax.grad(lambda xi, yi: focal(xi, yi, gamma)))(x, y)


def paper_grad(x, y, gamma):
  p = jax.nn.sigmoid(x)
  pt = jnp.where(y == 1, p, 1 - p)
  return (2 * y - 1) * (1 - pt) ** gamma * (gamma * pt * jnp.log(pt) + pt - 1)


logits = jnp.linspace(-8, 8, 401)
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for gamma in GAMMAS:
  label = f"γ = {gamma:g}"
  axes[0].plot(p_t, -focal_grad(logit_of_true_class, positive, gamma), label=label)
  axes[1].plot(logits, focal(logits, jnp.ones_like(logits), gamma), label=label)
  axes[2].plot(logits, focal_grad(logits, jnp.ones_like(logits), gamma), label=label)
axes[0].set(xlabel="$p_t$", ylabel="-dFL/dx", title="gradient magnitude against $p_t$")
axes[1].set(xlabel="logit x (target y = 1)", ylabel="loss", title="loss against the logit",
            ylim=(0, 8))
axes[2].set(xlabel="logit x (target y = 1)", ylabel="dFL/dx", title="gradient against the logit")
axes[0].legend()
plt.show()

worst = max(float(jnp.max(jnp.abs(focal_grad(logits, y, g) - paper_grad(logits, y, g))))
            for g in GAMMAS for y in (jnp.zeros_like(logits), jnp.ones_like(logits)))
print(f"largest |jfocal gradient - paper's closed form| over the grid: {worst:.2e}")

# %% [markdown]
# ## How much the modulating factor removes
#
# CE / FL $= 1 / (1 - p_t)^\gamma$: with $\gamma = 2$ an example at $p_t = 0.9$ has 100× less
# loss than under CE, one at $p_t \approx 0.968$ 1000× less (the paper's numbers), while one at
# $p_t = 0.5$ loses only 4×: the loss of hard examples is *relatively* up-weighted.

# %%
rows = [0.5, 0.9, 0.968, 0.99, 0.999]
x = jnp.log(jnp.asarray(rows)) - jnp.log1p(-jnp.asarray(rows))
print("p_t     " + "".join(f"  CE/FL γ={g:<4g}" for g in GAMMAS[1:]))
for i, pt in enumerate(rows):
  ce = focal(x[i], 1.0, 0.0)
  print(f"{pt:<8}" + "".join(f"  {float(ce / focal(x[i], 1.0, g)):>11.4g}" for g in GAMMAS[1:]))

# %% [markdown]
# ## A dense detector's loss budget, and what $\alpha$ does
#
# Take one image of a detector with 100,000 (anchor, class) logits: 100 positives that the
# model finds hard ($p_t = 0.5$) and 99,900 easy negatives it already rejects ($p = 0.01$,
# the prior RetinaNet starts from, i.e. $p_t = 0.99$). Under CE the easy negatives own more
# than 90% of the loss, and of its gradient; focal loss hands the loss back to the positives.
#
# $\alpha$ weights positives by $\alpha$ and negatives by $1-\alpha$. As a class-balancing
# weight one would pick $\alpha$ large (counting, `alpha_from_counts` says 0.999; 0.75 is the
# best for CE in the paper's Table 1a), but once $\gamma = 2$ has removed the easy negatives,
# the paper's best is $\alpha = 0.25$: the positives now own the loss and get weighed *down*.

# %%
num_pos, num_neg = 100, 99_900
logit_pos = jnp.zeros(num_pos)  # p = 0.5
logit_neg = jnp.full(num_neg, jnp.log(0.01 / 0.99))  # p = 0.01
logits_image = jnp.concatenate([logit_pos, logit_neg])
labels_image = jnp.concatenate([jnp.ones(num_pos), jnp.zeros(num_neg)])

cases = {
    "CE": jfocal.sigmoid_cross_entropy(logits_image, labels_image),
    "balanced CE, α=0.75": jfocal.sigmoid_balanced_cross_entropy(logits_image, labels_image,
                                                                 alpha=0.75),
    "FL γ=2, α=0.5 (equal)": jfocal.sigmoid_focal_loss(logits_image, labels_image, alpha=0.5),
    "FL γ=2, α=0.25": jfocal.sigmoid_focal_loss(logits_image, labels_image, alpha=0.25),
}
print(f"{'loss':<22}{'positives':>12}{'negatives':>12}{'share of negatives':>20}")
for name, loss in cases.items():
  pos, neg = float(jnp.sum(loss[:num_pos])), float(jnp.sum(loss[num_pos:]))
  print(f"{name:<22}{pos:>12.2f}{neg:>12.2f}{neg / (pos + neg):>20.1%}")
print("α from the counts (alpha_from_counts):", float(jfocal.alpha_from_counts(num_pos, num_neg)))

# %% [markdown]
# ## jfocal next to optax
#
# `optax.sigmoid_focal_loss` computes the same function from the textbook formula, for float
# targets of the logits' shape. On the same inputs the two agree to float32 rounding, in value
# and gradient, including confidently right and wrong logits far into saturation. jfocal adds
# integer class ids with a background id (no one-hot tensor), masks, `ignore_index`,
# reductions and normalisers; below, the same detector targets given both ways.

# %%
key_x, key_y = jax.random.split(jax.random.key(0))
x = 4 * jax.random.normal(key_x, (1000,))
y = (jax.random.uniform(key_y, (1000,)) < 0.1).astype(jnp.float32)
x = x.at[:4].set(jnp.asarray([-100.0, 100.0, -30.0, 30.0]))  # saturated, right and wrong
y = y.at[:4].set(jnp.asarray([0.0, 0.0, 1.0, 1.0]))
for gamma in (0.5, 2.0):
  losses = {name: functools.partial(fn, alpha=0.25, gamma=gamma)
            for name, fn in (("jfocal", jfocal.sigmoid_focal_loss),
                             ("optax", optax.sigmoid_focal_loss))}
  values = {name: loss(x, y) for name, loss in losses.items()}
  grads = {name: jax.grad(lambda z, loss=loss: jnp.sum(loss(z, y)))(x)
           for name, loss in losses.items()}
  value_gap = jnp.max(jnp.abs(values["jfocal"] - values["optax"]))
  grad_gap = jnp.max(jnp.abs(grads["jfocal"] - grads["optax"]))
  print(f"γ={gamma}: max |loss difference| {float(value_gap):.2e}, "
        f"max |gradient difference| {float(grad_gap):.2e}")

# Detector targets: 6 anchors, 3 classes, class id 3 = background.
anchor_logits = jax.random.normal(jax.random.key(1), (6, 3))
class_ids = jnp.asarray([3, 0, 3, 2, 3, 3])
one_hot = jax.nn.one_hot(class_ids, 4)[:, :3]  # drop the background column
print("integer ids (jfocal):",
      jfocal.sigmoid_focal_loss(anchor_logits, class_ids, alpha=0.25, reduction="sum"))
print("one-hot (optax):     ",
      jnp.sum(optax.sigmoid_focal_loss(anchor_logits, one_hot, alpha=0.25)))

# %% [markdown]
# ## Beyond focal loss: the rest of the family against $p_t$
#
# The same positive ($y = 1$) seen through the losses that followed focal loss, each next to
# CE (grey) and focal loss with $\gamma = 2$ (dashed):
#
# - **FL\*** (appendix of Lin et al.): $-\log\sigma(\gamma x_t + \beta)/\gamma$, a shifted,
#   sharpened softplus that also down-weights easy examples;
# - **Poly-1** (Leng et al., ICLR 2022): focal loss plus $\varepsilon (1 - p_t)^{\gamma + 1}$;
#   $\varepsilon < 0$ flattens the hard end, $\varepsilon > 0$ steepens it;
# - **quality focal loss** (GFL, Li et al., NeurIPS 2020): soft IoU targets $q$, modulated by
#   $|q - \sigma(x)|^\beta$, so its minimum sits at $\sigma(x) = q$, not at 1;
# - **varifocal loss** (Zhang et al., CVPR 2021): positives weighted by their IoU target and
#   only negatives focused;
# - **GHM-C** (Li et al., AAAI 2019): cross-entropy re-weighted by the inverse density of the
#   gradient norm $|\sigma(x) - y|$ in the batch. Here the batch is mostly easy examples, so
#   easy ones are down-weighted and the rare hard ones up-weighted;
# - **asymmetric loss** (ASL, Ridnik et al., ICCV 2021), for multi-label data where negatives
#   dominate: a mild $\gamma_+$ for positives, a strong $\gamma_-$ for negatives, and negatives
#   whose probability is below the clip $m$ discarded ($p_t \ge 1 - m$ costs exactly 0);
# - **logit-adjusted CE** (Menon et al., ICLR 2021), for long-tailed classes: the softmax sees
#   $x + \tau \log \pi$, so an example of a rare class (prior 0.1 here) keeps a loss until its
#   raw probability clears a margin, and one of a frequent class (0.9) is let go earlier.

# %%
probe_p = jnp.linspace(0.005, 0.995, 400)
probe_x = jnp.log(probe_p) - jnp.log1p(-probe_p)
ones = jnp.ones_like(probe_x)
# GHM-C weights depend on the batch: 2000 mostly easy examples plus the probe points.
easy_p = jax.random.beta(jax.random.key(2), 8.0, 1.0, (2000,)).clip(1e-4, 1 - 1e-4)
batch_x = jnp.concatenate([jnp.log(easy_p) - jnp.log1p(-easy_p), probe_x])
ghm, _ = jfocal.ghmc_loss(batch_x, jnp.ones_like(batch_x), bins=10)
# Two classes with raw probability p_t for the true class 0.
two_class_x = jnp.stack([probe_x, jnp.zeros_like(probe_x)], axis=-1)
panels = {
    "FL*": [(jfocal.sigmoid_focal_loss_star(probe_x, ones, alpha=None, gamma=g, beta=b),
             f"γ={g:g}, β={b:g}") for g, b in ((2.0, 1.0), (4.0, 0.0))],
    "Poly-1 focal": [(jfocal.poly1_focal_loss(probe_x, ones, alpha=None, gamma=2.0, epsilon=e),
                      f"ε={e:g}") for e in (-1.0, 1.0, 3.0)],
    "quality focal, IoU target q": [(jfocal.quality_focal_loss(probe_x, q * ones, beta=2.0),
                                     f"β=2, q={q:g} (x axis: σ(x))") for q in (1.0, 0.6)],
    "varifocal": [(jfocal.varifocal_loss(probe_x, q * ones), f"positive, q={q:g}")
                  for q in (1.0, 0.6)]
                 + [(jfocal.varifocal_loss(-probe_x, 0 * ones), "negative (p = 1 − p_t)")],
    "GHM-C, 10 bins": [(ghm[2000:], "β · CE in a batch of easy examples")],
    "asymmetric (ASL)": [(jfocal.asymmetric_loss(probe_x, ones), "positive, γ+=1"),
                         (jfocal.asymmetric_loss(-probe_x, 0 * ones),
                          "negative, γ−=4, clip 0.05")],
    "logit-adjusted CE, τ=1": [
        (jfocal.logit_adjusted_cross_entropy(two_class_x, jnp.full(probe_x.shape, 0),
                                             class_priors=priors), f"class of prior {priors[0]:g}")
        for priors in (jnp.array([0.1, 0.9]), jnp.array([0.9, 0.1]))],
}
fig, axes = plt.subplots(2, 4, figsize=(16.0, 7.4), sharey=True)
axes = axes.ravel()
axes[-1].set_axis_off()
for ax, (title, curves) in zip(axes, panels.items()):
  ax.plot(probe_p, jfocal.sigmoid_cross_entropy(probe_x, ones), color="0.75", lw=1, label="CE")
  ax.plot(probe_p, focal(probe_x, ones, 2.0), color="0.3", ls="--", lw=1.5, label="focal γ=2")
  for values, label in curves:
    ax.plot(probe_p, values, lw=1.8, label=label)
  ax.set(title=title, xlabel="$p_t$", ylim=(0, 5))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
for ax in axes[::4]:
  ax.set_ylabel("loss")
fig.tight_layout()
plt.show()
