"""Side-by-side timings of jfocal against optax, a naive textbook loss and a floor kernel.

Every case compiles all implementations first, then times them in interleaved
rounds (one call of each per round, in a fresh seeded random order each round) in
this one process, so that the machine's noise hits all of them alike; the table
reports medians, and ratios as the median of the two candidates' per-round ratios
(`ratio`). Memory comes from XLA's `memory_analysis()` of the
compiled value-and-grad.

    python benchmarks/run.py                 # the full sweep, writes results.md/.png
    python benchmarks/run.py --quick         # a small smoke run

Peers per family (labels: ~1% positives for sigmoid, uniform class ids for softmax):
  sigmoid  jfocal.sigmoid_focal_loss | optax.sigmoid_focal_loss | naive (sigmoid, pow) | floor
           (and jfocal.checked(...) to price the run-time checks)
  softmax  jfocal.softmax_focal_loss | optax CE with integer labels | naive (log_softmax,
           gather, pow) | floor
  registry one case (--extended-size) of every loss of tests/registry.py against its
           textbook formula (tests/references.py) at the same dtype and against the
           sigmoid focal loss, a detector's call against the same loss with optax, and
           softmax CE with PaLM's z-loss against the textbook CE plus z lse**2; each
           also as a caller's jnp.sum of the unreduced loss, and the floor
  softmax classes  softmax CE and focal loss against optax integer-label CE and the floor
           at C = 16, 81, 1000 and 32768 (4M logits, rows a multiple of 16), and at
           C = 81 with an odd number of rows
  vocabulary  the fused linear + softmax losses (CE, focal, each with and without label
           smoothing) of 2048 tokens x 128 features -> V = 32768 classes against a dense
           matmul followed by optax's integer-label CE, value-and-grad in the features and
           the kernel; V = 131072 compiled for XLA's memory analysis only
The floor kernel reads the same inputs and writes one logits-shaped array with one
exp and one log1p per element: the least a value-and-grad can read, write and
compute. Softmax with C=1 is skipped: its loss is identically zero. All losses are summed, gradients are taken with respect to the logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jfocal

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
import references as ref  # noqa: E402  (the textbook formulas of tests/references.py)
import registry  # noqa: E402  (the test registry: every loss, its parameters and reference)
ALPHA, GAMMA = 0.25, 2.0


def _sigmoid_naive(x, y):
  p = jax.nn.sigmoid(x)
  p_t = y * p + (1 - y) * (1 - p)
  alpha_t = ALPHA * y + (1 - ALPHA) * (1 - y)
  ce = optax.sigmoid_binary_cross_entropy(x, y)
  return jnp.sum(alpha_t * (1 - p_t) ** GAMMA * ce)


def _softmax_naive(x, ids):
  log_p = jnp.take_along_axis(jax.nn.log_softmax(x), ids[:, None], axis=-1)[:, 0]
  return jnp.sum(-((1 - jnp.exp(log_p)) ** GAMMA) * log_p)


def _floor(x, labels):
  """One exp and one log1p per logit, reading the labels too; writes a logits-shaped array."""
  if labels.ndim < x.ndim:  # class ids: one per row
    labels = labels[:, None] > 0
  return jnp.log1p(jnp.exp(-jnp.abs(x))) * labels.astype(x.dtype)


FAMILIES: dict[str, dict[str, Callable]] = {
    "sigmoid": {
        "jfocal": lambda x, y: jfocal.sigmoid_focal_loss(x, y, alpha=ALPHA, gamma=GAMMA,
                                                         reduction="sum"),
        "optax": lambda x, y: jnp.sum(optax.sigmoid_focal_loss(x, y, alpha=ALPHA, gamma=GAMMA)),
        "naive": _sigmoid_naive,
        "jfocal checked": lambda x, y: jfocal.checked(jfocal.sigmoid_focal_loss)(
            x, y, alpha=ALPHA, gamma=GAMMA, reduction="sum"),
    },
    "softmax": {
        "jfocal": lambda x, ids: jfocal.softmax_focal_loss(x, ids, gamma=GAMMA, reduction="sum"),
        "optax CE": lambda x, ids: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, ids)),
        "naive": _softmax_naive,
        "jfocal checked": lambda x, ids: jfocal.checked(jfocal.softmax_focal_loss)(
            x, ids, gamma=GAMMA, reduction="sum"),
    },
}


DETECTOR = "sigmoid_focal_loss, detector ids (naive: optax)"
# ASL's usual input, multi-label 0/1 targets, as integers: each side's power takes no log.
ASL_HARD = "asymmetric_loss, 0/1 integer targets"
Z_LOSS = "softmax_cross_entropy, z_loss=1e-4"
# The family of the cases beyond the registry's losses.
EXTRA_FAMILIES = {DETECTOR: "sigmoid", Z_LOSS: "softmax", ASL_HARD: "sigmoid"}


def _optax_detector_loss(x, ids):
  """How a detector calls optax: one-hot targets, a mask for ignored anchors, / positives."""
  targets = jax.nn.one_hot(ids, x.shape[-1], dtype=x.dtype)  # background C and -1: all zero
  kept = (ids >= 0)[:, None]
  loss = jnp.where(kept, optax.sigmoid_focal_loss(x, targets, alpha=ALPHA, gamma=GAMMA), 0)
  return jnp.sum(loss) / jnp.maximum(jnp.sum((ids >= 0) & (ids < x.shape[-1])), 1)


def registry_losses(classes: int) -> dict[str, tuple[Callable, Callable]]:
  """Every loss of the test registry (tests/registry.py), with the registry's hyper-parameters,
  against its float64-reference formula (tests/references.py) run at the benchmark's dtype:
  the loss as a reader of its paper would write it in jnp. Softmax references take one-hot
  targets, built inside the naive function as a user of a one-hot API would."""
  cases = {}
  for entry in registry.LOSSES.values():
    params = entry.options(classes)

    def ours(x, y, entry=entry):
      return entry(x, y, reduction="sum")

    def callers_sum(x, y, entry=entry):
      return jnp.sum(entry(x, y))

    def naive(x, y, entry=entry, params=params):
      if entry.family == "softmax":
        y = jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype)
      return jnp.sum(entry.reference(x, y, **params))

    cases[entry.name] = (ours, naive, callers_sum)
  cases[ASL_HARD] = cases["asymmetric_loss"]
  # A detector's call: class ids with background C and ignored anchors -1, the mean
  # over the positives; its peer is the same loss written with optax.
  # PaLM's z-loss on the softmax cross-entropy; its peer adds z lse**2 to the textbook CE.
  cases[Z_LOSS] = (
      lambda x, ids: jfocal.softmax_cross_entropy(x, ids, z_loss=1e-4, reduction="sum"),
      lambda x, ids: jnp.sum(ref.softmax_focal(x, jax.nn.one_hot(ids, x.shape[-1], dtype=x.dtype))
                             + 1e-4 * ref.log_sum_exp(x) ** 2),
      lambda x, ids: jnp.sum(jfocal.softmax_cross_entropy(x, ids, z_loss=1e-4)))
  detector = dict(alpha=ALPHA, gamma=GAMMA, ignore_index=-1)
  cases[DETECTOR] = (
      lambda x, ids: jfocal.sigmoid_focal_loss(x, ids, **detector, reduction="mean",
                                               normalizer="num_positives"),
      _optax_detector_loss,
      lambda x, ids: jnp.sum(jfocal.sigmoid_focal_loss(x, ids, **detector)))
  return cases


@dataclasses.dataclass
class Row:
  family: str
  dtype: str
  classes: int
  elements: int
  impl: str
  mode: str  # "forward" or "value_and_grad"
  median_s: float
  compile_s: float
  temp_over_input: float | None
  input_bytes: int
  output_bytes: int
  # Seconds of each round, in round order; rows timed together share the rounds (`ratio`).
  seconds: list[float] = dataclasses.field(default_factory=list)


def ratio(row: Row, other: Row) -> float:
  """``row``'s time over ``other``'s: the median of their per-round ratios where they were
  timed in the same rounds, else the ratio of medians. Single calls on this VM alternate
  between two speeds (the floor kernel's between about 1.0 and 2.0 ms at 1M logits) that
  calls close in time share, so the per-round ratio moves less between runs."""
  if row.seconds and len(row.seconds) == len(other.seconds):
    return float(np.median(np.asarray(row.seconds) / np.asarray(other.seconds)))
  return row.median_s / other.median_s


def _median(seconds: list[float]) -> float:
  return float(np.median(seconds)) if seconds else float("nan")


def _inputs(family: str, elements: int, classes: int, dtype, rng):
  rows = max(elements // classes, 1)
  # One sigmoid class is binary classification: logits of shape (N,), not (N, 1).
  shape = (rows,) if family == "sigmoid" and classes == 1 else (rows, classes)
  x = jnp.asarray(rng.normal(size=shape) * 4).astype(dtype)
  if family == "sigmoid":
    labels = jnp.asarray(rng.uniform(size=shape) < 0.01).astype(dtype)
  else:
    labels = jnp.asarray(rng.integers(0, classes, size=rows), jnp.int32)
  return x, labels


def _compile(fn, x, labels):
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(x, labels).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return compiled, seconds, None if memory is None else memory.temp_size_in_bytes


def _interleaved(calls: dict, rounds: int) -> dict:
  """Seconds of each round for each ``key: (compiled, args)``, timed one call each per round.

  Each round runs the calls in a fresh random order (seeded, so a run is
  repeatable): a call that follows one with large buffers pays for the
  allocator's and the caches' state, and a fixed order would bill that to the
  same candidate every round (it had made the floor 1.6x slower).
  """
  order = np.random.default_rng(0)
  keys = list(calls)
  times = {key: [] for key in calls}
  for _ in range(rounds):
    for index in order.permutation(len(keys)):
      fn, args = calls[keys[index]]
      times[keys[index]].append(_timed(fn, *args))
  return times


def run_case(family, dtype, classes, elements, rounds, rng) -> list[Row]:
  x, labels = _inputs(family, elements, classes, dtype, rng)
  input_bytes = x.nbytes + labels.nbytes
  candidates = {}
  for impl, loss in FAMILIES[family].items():
    candidates[(impl, "forward")] = loss
    candidates[(impl, "value_and_grad")] = jax.value_and_grad(loss)
  candidates[("floor", "forward")] = candidates[("floor", "value_and_grad")] = _floor
  compiled = {key: _compile(fn, x, labels) for key, fn in candidates.items()}
  times = _interleaved({key: (fn, (x, labels)) for key, (fn, _, _) in compiled.items()},
                       rounds)
  rows = []
  for (impl, mode), (_, compile_s, temp) in compiled.items():
    rows.append(Row(family, jnp.dtype(dtype).name, classes, int(x.size), impl, mode,
                    _median(times[(impl, mode)]), compile_s,
                    None if temp is None else temp / x.nbytes, input_bytes,
                    x.nbytes if mode == "value_and_grad" or impl == "floor" else 4,
                    times[(impl, mode)]))
  return rows


def run_extended(dtype, classes, elements, rounds, rng) -> list[Row]:
  """value_and_grad of every registry loss and of its textbook formula, interleaved."""
  rows_count = max(elements // classes, 1)
  shape = (rows_count, classes)
  x = jnp.asarray(rng.normal(size=shape) * 4).astype(dtype)
  positive = rng.uniform(size=shape) < 0.01
  y = jnp.asarray(np.where(positive, rng.uniform(0.05, 1.0, size=shape), 0.0)).astype(dtype)
  ids = jnp.asarray(rng.integers(0, classes, size=rows_count), jnp.int32)
  # ~1% foreground anchors, ~10% ignored (-1), the rest background (id C).
  kind = rng.uniform(size=rows_count)
  detector_ids = jnp.asarray(np.where(kind < 0.01, rng.integers(0, classes, size=rows_count),
                                      np.where(kind < 0.11, -1, classes)), jnp.int32)
  candidates = {("floor dense", "value_and_grad"): (_floor, y),
                ("floor ids", "value_and_grad"): (_floor, ids)}
  for name, (ours, naive, callers_sum) in registry_losses(classes).items():
    family = registry.LOSSES[name].family if name in registry.LOSSES else EXTRA_FAMILIES[name]
    labels = ids if family == "softmax" else y
    labels = detector_ids if name == DETECTOR else labels
    labels = jnp.asarray(positive, jnp.int32) if name == ASL_HARD else labels
    for impl, fn in (("jfocal", ours), ("naive", naive), ("jnp.sum", callers_sum)):
      candidates[(f"{impl} {name}", "value_and_grad")] = (jax.value_and_grad(fn), labels)
  compiled = {key: _compile(fn, x, labels) + (labels,)
              for key, (fn, labels) in candidates.items()}
  times = _interleaved({key: (fn, (x, labels)) for key, (fn, _, _, labels)
                        in compiled.items()}, rounds)
  return [Row("extended", jnp.dtype(dtype).name, classes, int(x.size), impl, mode,
              _median(times[(impl, mode)]), compile_s,
              None if temp is None else temp / x.nbytes, x.nbytes + y.nbytes, x.nbytes,
              times[(impl, mode)])
          for (impl, mode), (_, compile_s, temp, _) in compiled.items()]


def fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def _floor_of(rows: list[Row], row: Row, labels: str) -> Row:
  return _lookup(rows, family=row.family, dtype=row.dtype, classes=row.classes,
                 elements=row.elements, impl=f"floor {labels}")


def extended_markdown(rows: list[Row]) -> str:
  out = ["", "Every loss of the registry, value-and-grad of the loss with `reduction=\"sum\"` "
         "(the detector's call: the mean over the positives), dense soft targets (~1% of the "
         "logits hold an IoU) for the sigmoid family, class ids for the softmax family; the "
         "detector's call gets class ids (~1% foreground, ~10% ignored, the rest "
         "background). The floor reads the same logits and labels (dense or ids) and "
         "writes one logits-sized array with one exp and one log1p per logit; "
         "`jnp.sum` is the caller's `jnp.sum` of the unreduced loss:",
         "",
         "| loss | dtype | C | elements | jfocal ms | naive / jfocal | jfocal / floor | "
         "jfocal / sigmoid focal | jfocal temp / logits | jnp.sum time / jfocal | "
         "jnp.sum temp / logits | naive temp / logits | jfocal compile s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.family != "extended" or not r.impl.startswith("jfocal "):
      continue
    name = r.impl[len("jfocal "):]
    key = dict(family="extended", dtype=r.dtype, classes=r.classes, elements=r.elements,
               mode=r.mode)
    naive = _lookup(rows, impl=f"naive {name}", **key)
    callers_sum = _lookup(rows, impl=f"jnp.sum {name}", **key)
    focal = _lookup(rows, impl="jfocal sigmoid_focal_loss", **key)
    dense = name == ASL_HARD or (name in registry.LOSSES
                                 and registry.LOSSES[name].family == "sigmoid")
    floor = _floor_of(rows, r, "dense" if dense else "ids")
    out.append(f"| {name} | {r.dtype} | {r.classes} | {r.elements} | {r.median_s * 1e3:.3f} | "
               f"{ratio(naive, r):.2f} | {ratio(r, floor):.2f} | "
               f"{ratio(r, focal):.2f} | {fmt(r.temp_over_input)} | "
               f"{ratio(callers_sum, r):.2f} | {fmt(callers_sum.temp_over_input)} | "
               f"{fmt(naive.temp_over_input)} | {r.compile_s:.2f} |")
  return "\n".join(out) + "\n"


# Softmax CE and focal loss against optax's integer-label CE across class counts at one
# size: the small-C layouts (a row maximum broadcast over few columns) and the large.
SOFTMAX_CLASSES = {
    "jfocal CE": lambda x, ids: jfocal.softmax_cross_entropy(x, ids, reduction="sum"),
    "jfocal focal": lambda x, ids: jfocal.softmax_focal_loss(x, ids, gamma=GAMMA,
                                                             reduction="sum"),
    "optax CE": lambda x, ids: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, ids)),
}


def sweep_rows(elements: int, classes: int, odd: bool = False) -> int:
  """Rows of the softmax sweep: ``elements // classes``, rounded down to a multiple of 16 as a
  batch is, or made odd. XLA on the CPU does not vectorise a loop over the rows at all
  when their number does not split evenly over its threads, and the softmax losses' work
  per row (the precise log-normaliser, the focal factor) is then scalar."""
  rows = max(elements // classes, 1)
  if odd:
    return rows | 1
  return rows // 16 * 16 if rows >= 16 else rows


def run_softmax_classes(cases, rounds, rng) -> list[Row]:
  """``cases``: (classes, rows) pairs."""
  rows = []
  for classes, count in cases:
    x, ids = _inputs("softmax", count * classes, classes, jnp.float32, rng)
    compiled = {impl: _compile(jax.value_and_grad(fn), x, ids)
                for impl, fn in SOFTMAX_CLASSES.items()}
    compiled["floor"] = _compile(_floor, x, ids)
    times = _interleaved({impl: (fn, (x, ids)) for impl, (fn, _, _) in compiled.items()},
                         rounds)
    rows += [Row("softmax classes", "float32", classes, int(x.size), impl, "value_and_grad",
                 _median(times[impl]), compile_s,
                 None if temp is None else temp / x.nbytes, x.nbytes + ids.nbytes, x.nbytes,
                 times[impl])
             for impl, (_, compile_s, temp) in compiled.items()]
  return rows


def softmax_classes_markdown(rows: list[Row]) -> str:
  out = ["", "Softmax value-and-grad of the summed loss with class ids against optax's "
         "integer-label CE, float32, across class counts (targets: CE <= 1.0x, focal "
         "<= 1.1x):", "",
         "| loss | C | rows | ms | time / optax CE | time / floor | temp / logits | "
         "optax temp / logits | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.family != "softmax classes" or not r.impl.startswith("jfocal"):
      continue
    key = dict(family=r.family, classes=r.classes, elements=r.elements)
    optax_ce = _lookup(rows, impl="optax CE", **key)
    floor = _lookup(rows, impl="floor", **key)
    out.append(f"| {r.impl[len('jfocal '):]} | {r.classes} | {r.elements // r.classes} | "
               f"{r.median_s * 1e3:.3f} | {ratio(r, optax_ce):.2f} | "
               f"{ratio(r, floor):.2f} | {fmt(r.temp_over_input)} | "
               f"{fmt(optax_ce.temp_over_input)} | {r.compile_s:.2f} |")
  return "\n".join(out) + "\n"


# The fused linear + softmax losses against the materialised path (dense matmul, then
# optax's integer-label CE), value-and-grad in the features and the kernel.
DENSE = "dense matmul + optax CE"


def vocabulary_losses(ids) -> dict[str, Callable]:
  fused = {
      "linear_softmax_cross_entropy": lambda f, w: jfocal.linear_softmax_cross_entropy(
          f, w, ids, reduction="mean"),
      "linear_softmax_focal_loss": lambda f, w: jfocal.linear_softmax_focal_loss(
          f, w, ids, gamma=GAMMA, reduction="mean"),
      "linear_softmax_cross_entropy, label_smoothing=0.1": lambda f, w: (
          jfocal.linear_softmax_cross_entropy(f, w, ids, label_smoothing=0.1, reduction="mean")),
      "linear_softmax_focal_loss, label_smoothing=0.1": lambda f, w: (
          jfocal.linear_softmax_focal_loss(f, w, ids, gamma=GAMMA, label_smoothing=0.1,
                                           reduction="mean")),
  }
  return {DENSE: lambda f, w: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(f @ w, ids)), **fused}


def run_vocabulary(tokens, features_dim, vocab, rounds, rng, notes: list[str],
                   timed=True) -> list[Row]:
  """Fused losses and the materialised path interleaved; temp relative to the logits' bytes.
  Appends the float32 agreement of fused CE with the dense path to ``notes``."""
  f = jnp.asarray(rng.normal(size=(tokens, features_dim)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(features_dim, vocab)) / np.sqrt(features_dim), jnp.float32)
  ids = jnp.asarray(rng.integers(0, vocab, size=tokens), jnp.int32)
  logits_bytes = tokens * vocab * 4
  compiled = {name: _compile(jax.value_and_grad(fn, argnums=(0, 1)), f, w)
              for name, fn in vocabulary_losses(ids).items()}
  times = _interleaved({name: (fn, (f, w)) for name, (fn, _, _) in compiled.items()},
                       rounds if timed else 0)
  if timed:  # float32 agreement of fused CE with the dense path: loss, and gradients
    (dense_loss, dense_grads), (loss, grads) = (
        compiled[name][0](f, w) for name in (DENSE, "linear_softmax_cross_entropy"))
    agreement = max([abs(float(loss - dense_loss)) / abs(float(dense_loss))] + [
        float(jnp.max(jnp.abs(g - h)) / jnp.max(jnp.abs(h))) for g, h in zip(grads, dense_grads)])
    notes.append(f"V={vocab}: linear_softmax_cross_entropy and the dense path agree to "
                 f"{agreement:.1e} relative in float32 (the loss, and the largest gradient "
                 "error over the largest gradient entry)")
  return [Row("vocabulary", "float32", vocab, tokens * vocab, name, "value_and_grad",
              _median(times[name]), compile_s,
              None if temp is None else temp / logits_bytes, f.nbytes + w.nbytes, w.nbytes,
              times[name])
          for name, (_, compile_s, temp) in compiled.items()]


def vocabulary_markdown(rows: list[Row], tokens: int, features_dim: int) -> str:
  fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"
  out = ["", f"Large vocabularies: value-and-grad in the features and the kernel of the mean "
         f"loss of {tokens} tokens x {features_dim} features -> V classes, float32 (temp: "
         "XLA's temp bytes over the logits' tokens x V x 4 bytes; time only where measured):",
         "", "| loss | V | ms | time / dense | time / fused CE | temp / logits | compile s |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.family != "vocabulary":
      continue
    dense = _lookup(rows, family="vocabulary", classes=r.classes, impl=DENSE)
    ce = _lookup(rows, family="vocabulary", classes=r.classes,
                 impl="linear_softmax_cross_entropy")
    out.append(f"| {r.impl} | {r.classes} | {fmt(r.median_s * 1e3)} | "
               f"{fmt(ratio(r, dense))} | {fmt(ratio(r, ce))} | "
               f"{fmt(r.temp_over_input)} | {r.compile_s:.2f} |")
  return "\n".join(out) + "\n"


def _rounds(elements: int, requested: int | None) -> int:
  if requested:
    return requested
  return int(np.clip(2 ** 25 // elements, 30, 300))


def seconds_per_call(fn, *args, repeats: int = 5) -> float:
  """The best over ``repeats`` of the mean of a loop of calls dispatched back to back (about
  50 ms a loop), so that each call's launch overhead hides behind the one before it."""
  jax.block_until_ready(fn(*args))
  once = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - once
  calls = int(np.clip(0.05 / max(once, 1e-6), 5, 500))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def copy_bandwidth() -> float:
  """Bytes per second of ``a * 1.5`` over 2**28 float32 (1 GiB read, 1 GiB written): the
  practical ceiling."""
  x = jnp.ones((2 ** 28,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.5).lower(x).compile()
  return 2 * x.nbytes / seconds_per_call(copy, x)


def _timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _lookup(rows, **where):
  found = [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]
  return found[0] if found else None


def headline(rows: list[Row]) -> list[str]:
  """The issue's targets, measured as ratios in this run."""
  lines = []
  big = max(r.elements for r in rows if r.family == "sigmoid")
  for classes in sorted({r.classes for r in rows if r.family == "sigmoid"}):
    where = dict(family="sigmoid", dtype="float32", classes=classes, mode="value_and_grad")
    ours = _lookup(rows, impl="jfocal", elements=_elements(rows, big, classes), **where)
    peer = _lookup(rows, impl="optax", elements=_elements(rows, big, classes), **where)
    floor = _lookup(rows, impl="floor", elements=_elements(rows, big, classes), **where)
    if ours and peer and floor:
      lines.append(
          f"sigmoid focal value-and-grad, {ours.elements} float32 elements, C={classes}: "
          f"{ratio(peer, ours):.2f}x faster than optax (target >= 4), "
          f"{ratio(ours, floor):.2f}x the floor kernel (target <= 2.5), "
          f"XLA temp {ours.temp_over_input:.2f}x the logits bytes (target <= 1.0; optax "
          f"{peer.temp_over_input:.2f}x)")
    checked = _lookup(rows, impl="jfocal checked", elements=_elements(rows, big, classes), **where)
    if ours and checked:
      lines.append(f"jfocal.checked costs {ratio(checked, ours):.2f}x the unchecked "
                   f"sigmoid value-and-grad there")
  where = dict(family="softmax", dtype="float32", mode="value_and_grad")
  for classes in sorted({r.classes for r in rows if r.family == "softmax"}):
    elements = _elements(rows, big, classes, family="softmax")
    ours = _lookup(rows, impl="jfocal", classes=classes, elements=elements, **where)
    peer = _lookup(rows, impl="optax CE", classes=classes, elements=elements, **where)
    naive = _lookup(rows, impl="naive", classes=classes, elements=elements, **where)
    if ours and peer and naive:
      # The target is the detector's case, 80 classes and background.
      target = "target <= 1.15" if classes == 81 else "no target"
      lines.append(
          f"softmax focal value-and-grad with integer labels, {elements // classes} x "
          f"{classes}: {ratio(ours, peer):.3f}x the time of optax integer-label "
          f"CE ({target}); naive focal {ratio(naive, peer):.2f}x")
  for classes, elements in sorted({(r.classes, r.elements) for r in rows
                                   if r.family == "softmax classes"}):
    where = dict(family="softmax classes", classes=classes, elements=elements)
    peer = _lookup(rows, impl="optax CE", **where)
    ce, focal = (_lookup(rows, impl=f"jfocal {name}", **where) for name in ("CE", "focal"))
    count = elements // classes
    lines.append(f"softmax with class ids, {count}{' (odd)' if count % 2 else ''} x {classes}: "
                 f"CE {ratio(ce, peer):.2f}x optax's integer-label CE (target "
                 f"<= 1.0), focal {ratio(focal, peer):.2f}x (target <= 1.1)")
  sigmoid = [r for r in rows if r.family == "extended" and r.dtype == "float32"
             and r.impl.startswith("jfocal ") and r.impl[7:] in registry.LOSSES
             and registry.LOSSES[r.impl[7:]].family == "sigmoid"]
  elementwise = [r for r in sigmoid if registry.LOSSES[r.impl[7:]].elementwise]
  if elementwise:
    worst = max(elementwise, key=lambda r: r.temp_over_input or 0)
    others = ", ".join(f"{r.impl[7:]} {r.temp_over_input:.2f}x" for r in sigmoid
                       if r not in elementwise)
    lines.append(f"elementwise sigmoid losses (all {len(elementwise)}), float32: XLA temp at "
                 f"most {worst.temp_over_input:.2f}x the logits ({worst.impl[7:]}; target "
                 f"<= 0.05); {others or 'no other sigmoid loss'}")
    hard = _lookup(rows, family="extended", impl=f"jfocal {ASL_HARD}", dtype="float32")
    ratios = ", ".join(f"{r.impl[7:]} {ratio(r, _floor_of(rows, r, 'dense')):.2f}"
                       for r in sigmoid + ([hard] if hard else []))
    lines.append(f"sigmoid losses' time over the floor kernel (target <= 2.0): {ratios}")
  ours = _lookup(rows, family="extended", impl=f"jfocal {DETECTOR}", dtype="float32")
  peer = _lookup(rows, family="extended", impl=f"naive {DETECTOR}", dtype="float32")
  if ours and peer:
    lines.append(
        f"sigmoid focal value-and-grad, a detector's call (class ids, ignore_index, mean "
        f"over num_positives), {ours.elements} float32 elements, C={ours.classes}: "
        f"{ratio(peer, ours):.2f}x faster than optax with one-hot targets, "
        f"XLA temp {ours.temp_over_input:.2f}x the logits bytes (optax "
        f"{peer.temp_over_input:.2f}x)")
  return lines


def _elements(rows, target, classes, family="sigmoid"):
  sizes = sorted({r.elements for r in rows if r.family == family and r.classes == classes})
  return min(sizes, key=lambda n: abs(n - target)) if sizes else None


def markdown(rows: list[Row], lines: list[str], machine: str) -> str:
  out = [f"Measured on {machine}, {time.strftime('%Y-%m-%d')}.", ""]
  out += [f"- {line}" for line in lines] + [""]
  header = ("family", "dtype", "C", "elements", "mode", "jfocal ms", "peer", "peer / jfocal",
            "naive / jfocal", "jfocal / floor", "checked / jfocal", "jfocal temp / logits", "peer temp / logits",
            "jfocal compile s")
  out.append("| " + " | ".join(header) + " |")
  out.append("|" + "---|" * len(header))
  for r in rows:
    if r.impl != "jfocal" or r.family not in FAMILIES:
      continue
    key = dict(family=r.family, dtype=r.dtype, classes=r.classes, elements=r.elements,
               mode=r.mode)
    peer_name = "optax" if r.family == "sigmoid" else "optax CE"
    peer = _lookup(rows, impl=peer_name, **key)
    naive = _lookup(rows, impl="naive", **key)
    floor = _lookup(rows, impl="floor", **key)
    checked = _lookup(rows, impl="jfocal checked", **key)
    out.append(
        f"| {r.family} | {r.dtype} | {r.classes} | {r.elements} | {r.mode} | "
        f"{r.median_s * 1e3:.3f} | {peer_name} | {ratio(peer, r):.2f} | "
        f"{ratio(naive, r):.2f} | {ratio(r, floor):.2f} | "
        f"{ratio(checked, r):.2f} | "
        f"{fmt(r.temp_over_input)} | {fmt(peer.temp_over_input)} | {r.compile_s:.2f} |")
  return "\n".join(out) + "\n" + softmax_classes_markdown(rows) + extended_markdown(rows)


def plot(rows: list[Row], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = sorted({r.family for r in rows if r.family in FAMILIES})
  fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
  for ax, family in zip(axes[0], families):
    per_classes = {}
    for r in rows:
      if r.family == family:
        per_classes.setdefault(r.classes, set()).add(r.elements)
    classes = max(per_classes, key=lambda c: (len(per_classes[c]), c))  # the longest series
    for impl in sorted({r.impl for r in rows if r.family == family}):
      points = sorted((r.elements, r.median_s) for r in rows
                      if r.family == family and r.impl == impl and r.classes == classes
                      and r.dtype == "float32" and r.mode == "value_and_grad")
      if points:
        ax.loglog(*zip(*points), marker="o", label=impl)
    ax.set_title(f"{family} focal, value_and_grad, float32, C={classes}")
    ax.set_xlabel("elements (logits)")
    ax.set_ylabel("median seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="sizes 2^14 and 2^16, C=16, float32")
  parser.add_argument("--sizes", type=int, nargs="*", default=[14, 18, 22],
                      help="log2 of the number of logits")
  parser.add_argument("--classes", type=int, nargs="*", default=[1, 16, 80])
  parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
  parser.add_argument("--extended-size", type=int, default=20,
                      help="log2 of the logits of the extended losses' single case (C is the "
                      "largest --classes); at most the largest --sizes")
  parser.add_argument("--softmax-classes", type=int, nargs="*", default=[16, 81, 1000, 32768],
                      help="C of the softmax sweep against optax's CE at --softmax-size")
  parser.add_argument("--softmax-size", type=int, default=22,
                      help="log2 of the logits of the softmax sweep (rows: a multiple of 16)")
  parser.add_argument("--softmax-odd-classes", type=int, nargs="*", default=[81],
                      help="C of the softmax sweep's extra cases with an odd number of rows")
  parser.add_argument("--vocab-sizes", type=int, nargs="*", default=[32768, 131072],
                      help="V of the large-vocabulary cases; the largest is compiled for its "
                      "memory, not timed")
  parser.add_argument("--vocab-tokens", type=int, default=2048)
  parser.add_argument("--vocab-features", type=int, default=128)
  parser.add_argument("--out", type=pathlib.Path, default=HERE)
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.classes, args.dtypes = [14, 16], [16], ["float32"]
    args.softmax_classes, args.softmax_size, args.softmax_odd_classes = [16, 1000], 16, []

  rng = np.random.default_rng(0)
  backend = jax.default_backend()
  device = jax.devices()[0]
  machine = (f"{device.device_kind} ({backend}, {jax.device_count()} device(s)), host "
             f"{_cpu_model()} with {os.cpu_count()} cores, jax {jax.__version__}")
  print(f"benchmarking on {machine}")
  rows: list[Row] = []
  started = time.perf_counter()
  for family in FAMILIES:
    for dtype in args.dtypes:
      for classes in args.classes:
        if family == "softmax" and classes == 1:
          continue  # one class: the loss is identically 0, and XLA folds it away
        cases = [(classes, 2 ** log2) for log2 in args.sizes]
        if family == "softmax" and classes == 80 and not args.quick:
          cases.append((81, 65536 * 81))  # 80 classes and background, 65536 anchors
        for classes_here, elements in cases:
          rows += run_case(family, jnp.dtype(dtype), classes_here, elements,
                           _rounds(elements, args.rounds), rng)
          print(f"  {family:7s} {dtype:8s} C={classes_here:<3d} {elements:>8d} logits done "
                f"({time.perf_counter() - started:.0f} s)", flush=True)
  extended_elements = 2 ** min(args.extended_size, max(args.sizes))
  for dtype in args.dtypes:
    rows += run_extended(jnp.dtype(dtype), max(args.classes), extended_elements,
                         _rounds(extended_elements, args.rounds), rng)
    print(f"  extended {dtype:8s} C={max(args.classes):<3d} {extended_elements:>8d} logits done "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
  softmax_elements = 2 ** args.softmax_size
  sweep = ([(c, sweep_rows(softmax_elements, c)) for c in args.softmax_classes]
           + [(c, sweep_rows(softmax_elements, c, odd=True)) for c in args.softmax_odd_classes])
  rows += run_softmax_classes(sweep, _rounds(softmax_elements, args.rounds), rng)
  print(f"  softmax C={args.softmax_classes} {softmax_elements:>8d} logits done "
        f"({time.perf_counter() - started:.0f} s)", flush=True)
  notes: list[str] = []
  for vocab in args.vocab_sizes:
    timed = vocab != max(args.vocab_sizes) or len(args.vocab_sizes) == 1
    rows += run_vocabulary(args.vocab_tokens, args.vocab_features, vocab,
                           args.rounds or 5, rng, notes, timed=timed)
    print(f"  vocabulary V={vocab} done ({time.perf_counter() - started:.0f} s)", flush=True)
  lines = headline(rows) + notes
  if backend == "gpu":
    peak = copy_bandwidth()
    for r in rows:
      if r.impl == "jfocal" and r.mode == "value_and_grad" and r.elements >= 2 ** 20:
        achieved = (r.input_bytes + r.output_bytes) / r.median_s
        lines.append(f"{r.family} {r.dtype} C={r.classes} {r.elements}: "
                     f"{achieved / 1e9:.0f} GB/s, {peak / achieved:.2f}x the copy bound "
                     f"of {peak / 1e9:.0f} GB/s (target <= 1.3)")
  for line in lines:
    print(line)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.md").write_text(markdown(rows, lines, machine) + vocabulary_markdown(
      rows, args.vocab_tokens, args.vocab_features))
  # Without each round's seconds (50k numbers): the medians, and results.md's ratios.
  records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "seconds"} for r in rows]
  (args.out / "results.json").write_text(json.dumps(records, indent=1))
  plot(rows, args.out / "results.png")
  print(f"wrote {args.out / 'results.md'}, results.json and results.png "
        f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
