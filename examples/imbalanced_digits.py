"""CE vs alpha-balanced CE vs focal loss on a long-tailed version of scikit-learn's digits.

Real 8x8 handwritten digits (bundled with scikit-learn, no download). The
training split is made long-tailed: class k keeps a fraction rho**k of its
images, so the rarest digit has about 2% of the most common one. The test split
stays balanced, so macro metrics show how each loss treats the rare classes.

A small Flax MLP is trained full-batch with optax.adam, the same budget and
seeds for every loss; the table reports means over seeds.

    python examples/imbalanced_digits.py --steps 300 --seeds 3
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score
from sklearn.model_selection import train_test_split

import jfocal

NUM_CLASSES = 10


def long_tailed_split(rho: float, seed: int):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=0.4, stratify=y, random_state=seed)
  rng = np.random.default_rng(seed)
  keep = np.zeros(len(y_train), bool)
  for k in range(NUM_CLASSES):
    members = np.flatnonzero(y_train == k)
    count = max(2, int(round(len(members) * rho**k)))
    keep[rng.choice(members, count, replace=False)] = True
  return x_train[keep], y_train[keep], x_test, y_test


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(NUM_CLASSES)(x)


def train(loss_fn, x, y, *, steps: int, seed: int):
  model = MLP()
  params = model.init(jax.random.key(seed), x[:1])
  optimizer = optax.adam(3e-3)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply(p, x), y))(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for _ in range(steps):
    params, state, loss = step(params, state)
  return model, params, float(loss)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--rho", type=float, default=0.02 ** (1 / 9),
                      help="class k keeps rho**k of its training images")
  args = parser.parse_args()

  results: dict[str, list[tuple[float, ...]]] = {}
  for seed in range(args.seeds):
    x_train, y_train, x_test, y_test = long_tailed_split(args.rho, seed)
    counts = np.bincount(y_train, minlength=NUM_CLASSES)
    # Inverse-frequency class weights scaled into [0, 1]: the rarest class gets 1.
    alpha = jnp.asarray(counts.min() / counts, jnp.float32)
    losses = {
        "cross-entropy": lambda z, t: jfocal.softmax_cross_entropy(z, t, reduction="mean"),
        "balanced CE (inverse frequency)": lambda z, t: jfocal.softmax_balanced_cross_entropy(
            z, t, alpha=alpha, reduction="mean"),
        "focal (gamma=2)": lambda z, t: jfocal.softmax_focal_loss(z, t, gamma=2.0,
                                                                  reduction="mean"),
        "focal (gamma=2) + balanced alpha": lambda z, t: jfocal.softmax_focal_loss(
            z, t, alpha=alpha, gamma=2.0, reduction="mean"),
    }
    if seed == 0:
      print(f"long-tailed training set: {counts.tolist()} images per digit "
            f"(test set balanced, {len(y_test)} images)\n")
    for name, loss_fn in losses.items():
      start = time.perf_counter()
      model, params, final_loss = train(loss_fn, jnp.asarray(x_train), jnp.asarray(y_train),
                                        steps=args.steps, seed=seed)
      seconds = time.perf_counter() - start
      predicted = np.asarray(jnp.argmax(model.apply(params, jnp.asarray(x_test)), -1))
      rare = recall_score(y_test, predicted, labels=[7, 8, 9], average="macro", zero_division=0)
      results.setdefault(name, []).append((
          final_loss, float(np.mean(predicted == y_test)),
          balanced_accuracy_score(y_test, predicted),
          f1_score(y_test, predicted, average="macro"), rare, seconds))

  header = ("loss", "final train loss", "accuracy", "balanced acc.", "macro F1",
            "recall 7-9", "seconds")
  print(f"{args.steps} adam steps, mean over {args.seeds} seed(s)\n")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for name, rows in results.items():
    mean = np.mean(np.asarray(rows), axis=0)
    print(f"| {name} | {mean[0]:.4f} | {mean[1]:.3f} | {mean[2]:.3f} | {mean[3]:.3f} | "
          f"{mean[4]:.3f} | {mean[5]:.1f} |")


if __name__ == "__main__":
  main()
