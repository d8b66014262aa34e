"""XLA's temporary memory of value-and-grad on the CPU: the layouts of jfocal/engine/numerics.py.

The gradient of every elementwise sigmoid loss reads the materialised loss
(`jfocal.engine.numerics.reads`), so that XLA writes the gradient over it in
place: value-and-grad holds no logits-sized temporary. That rests on XLA's
buffer assignment and scheduling, which an XLA upgrade could change; memory
analysis is deterministic (compiled, not timed), so these tests guard it.
The same holds for which of XLA's CPU emitters compiles each loop (the last
test). Other backends fuse on their own and are not checked here.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import registry
from helpers import compiled_as_users_get_it

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the fused layout is specific to XLA on the CPU")

SHAPE = (4096, 80)
# A few row-sized buffers (class ids, counts) may remain; a logits-sized one may not.
AT_MOST = 0.05
SIGMOID = [p for p in registry.ELEMENTWISE_PARAMS if p.values[0].family == "sigmoid"]
# How the labels and the mask reach the core changes XLA's fusions (a per-row
# factor, labels compared with an iota), so each way is checked.
CASES = {
    "dense": lambda x: (jnp.zeros_like(x), {}),
    "dense, where": lambda x: (jnp.zeros_like(x), {"where": jnp.ones(x.shape, bool)}),
    "dense, row where": lambda x: (jnp.zeros_like(x), {"where": jnp.ones((len(x), 1), bool)}),
    "dense, row weights": lambda x: (jnp.zeros_like(x), {"weights": jnp.ones((len(x), 1))}),
    "ids": lambda x: (class_ids(x), {}),
    "ids, ignore_index": lambda x: (class_ids(x), {"ignore_index": -1}),
    "ids, row weights": lambda x: (class_ids(x), {"weights": jnp.ones((len(x), 1))}),
}


def class_ids(x):
  """-1 (ignored) to C (background) in turn."""
  return jnp.asarray(np.arange(len(x)) % (x.shape[1] + 2) - 1, jnp.int32)


def temp_over_logits(fn, *args):
  step = compiled_as_users_get_it(jax.jit(jax.value_and_grad(fn)).lower(*args))
  return step.memory_analysis().temp_size_in_bytes / args[0].nbytes


def value_and_grad_temp(loss, case, how):
  x = jnp.zeros(SHAPE, jnp.float32)
  y, options = CASES[case](x)
  # Masks and weights are traced, as a training step's are (constants would be folded).
  arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
  static = {k: v for k, v in options.items() if k not in arrays}
  if how == "caller's jnp.sum":
    fn = lambda x, y, arrays: jnp.sum(loss(x, y, **arrays, **static))
  else:
    fn = lambda x, y, arrays: loss(x, y, reduction=how, **arrays, **static)
  return temp_over_logits(fn, x, y, arrays)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss", SIGMOID)
def test_sigmoid_value_and_grad_keeps_no_logits_sized_temporary(loss, case):
  assert value_and_grad_temp(loss, case, "sum") <= AT_MOST


@pytest.mark.parametrize("how", ["mean", "caller's jnp.sum"])
@pytest.mark.parametrize("case", ["dense", "ids"])
@pytest.mark.parametrize("loss", SIGMOID)
def test_mean_and_a_callers_sum_keep_none_either(loss, case, how):
  # The registry's focal losses take gamma = 1.5; integer gamma is below.
  assert value_and_grad_temp(loss, case, how) <= AT_MOST


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("case", ["dense", "ids"])
def test_sigmoid_focal_loss_keeps_no_temporary_at_any_gamma(gamma, case):
  # An integer gamma takes another derivative (it reads the loss for its focusing term).
  loss = functools.partial(registry.LOSSES["sigmoid_focal_loss"], gamma=gamma)
  assert value_and_grad_temp(loss, case, "mean") <= AT_MOST


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_a_callers_sum_keeps_one_temporary_at_integer_gamma(gamma):
  # The documented exception (docs/performance.md): XLA schedules the
  # gradient loop, which reads the loss, before the caller's sum of it, so the
  # loss stays alive beside the gradient. reduction="sum" or "mean" holds none.
  loss = functools.partial(registry.LOSSES["sigmoid_focal_loss"], gamma=gamma)
  assert value_and_grad_temp(loss, "dense", "caller's jnp.sum") <= 1 + AT_MOST
  assert value_and_grad_temp(loss, "dense", "sum") <= AT_MOST


def test_a_detectors_call_keeps_no_temporary():
  x = jnp.zeros(SHAPE, jnp.float32)
  fn = lambda x, ids: registry.LOSSES["sigmoid_focal_loss"].fn(
      x, ids, ignore_index=-1, reduction="mean", normalizer="num_positives")
  assert temp_over_logits(fn, x, class_ids(x)) <= AT_MOST


def test_ghmc_keeps_two_logits_sized_buffers():
  # Its histogram scatters every logit's count into its bin, and XLA writes the bins
  # and the counts for that (2.0x the logits); looking the bin edges up in a table
  # made it write two more (4.0x).
  assert value_and_grad_temp(registry.LOSSES["ghmc_loss"], "dense", "sum") <= 2 + AT_MOST


# XLA on the CPU (jaxlib 0.10) compiles a loop fusion that holds no broadcast
# with its newer emitter, which writes scalar code: 4-7x slower for a
# transcendental (log1p over the rows of the softmax losses took 0.9-1.1 ms of
# a 7 ms value-and-grad). The engine keeps a broadcast in every such loop
# (`jfocal.engine.numerics.vectorising`); the HLO after optimisation shows it.
TRANSCENDENTALS = ("exponential(", "exponential-minus-one(", "log(", "log-plus-one(",
                   "logistic(", "tanh(", "power(", "sqrt(", "rsqrt(")


def loops_without_broadcast(compiled) -> list[str]:
  """The loop fusions of ``compiled`` that compute a transcendental but hold no broadcast."""
  text = compiled.as_text()
  bodies = dict(re.findall(r"^%(\S+) \(.*?\n(.*?)\n}", text, re.M | re.S))
  found = []
  for fusion, called in re.findall(r"^\s*%(\S+) = .*? fusion\(.*kind=kLoop, calls=%([^,\s]+)",
                                   text, re.M):
    body = bodies[called]
    if any(op in body for op in TRANSCENDENTALS) and " broadcast(" not in body:
      found.append(fusion)
  return found


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}],
                         ids=["plain", "label smoothing and z-loss"])
@pytest.mark.parametrize("labels", ["dense", "ids"])
@pytest.mark.parametrize("loss", registry.PARAMS)
def test_no_transcendental_loop_is_left_to_the_scalar_emitter(loss, labels, options):
  if labels not in loss.labels or not all(loss.takes(k) for k in options):
    pytest.skip(f"{loss.name} takes no {labels} labels or no {sorted(options)}")
  # An even row count: XLA does not vectorise a loop over an odd number of rows at all.
  x = jnp.zeros((4096, 16 if loss.family == "softmax" else 80), jnp.float32)
  y = class_ids(x) if labels == "ids" else jnp.zeros_like(x)
  if labels == "ids" and loss.family == "softmax":
    y = jnp.clip(y, 0, x.shape[1] - 1)
  fn = lambda x, y: loss(x, y, reduction="sum", **options)
  step = compiled_as_users_get_it(jax.jit(jax.value_and_grad(fn)).lower(x, y))
  assert loops_without_broadcast(step) == []
