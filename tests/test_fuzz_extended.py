"""Fuzzing the extended family (FL*, Poly-1, QFL, VFL, GHM-C) with the campaign's invariants.

tests/test_fuzz.py covers the six core losses with every keyword; this file
draws one of the six later losses with wide inputs (0-sized axes, every float
dtype, subnormal, huge, infinite and NaN logits, class ids in and out of
range, dense targets, (class_ids, scores) pairs) and checks, in one property:

- the unreduced loss has the expected shape and the logits' dtype;
- an entry (a row, for the softmax Poly-1) whose logits are finite with
  |x| <= 1e4 and whose labels are valid has a finite loss and gradient,
  whatever the other entries hold (NaN stays where it was put);
- jit and eager agree within 1 ulp, NaN in the same places;
- with no elements, "sum" and "mean" are 0.

`make fuzz` runs it with the "fuzz" profile, `make test` with "ci".
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import jfocal
from conftest import FLOAT_DTYPES

BOUND = 1e4
SPECIAL = [0.0, 1e-40, -1e-40, 1e-310, 3.0, -30.0, BOUND, -BOUND, 1e30, -1e30,
           math.inf, -math.inf, math.nan]
# name -> (softmax?, static options drawn per example)
LOSSES = {
    "sigmoid_focal_loss_star": (False, {"gamma": [1.0, 0.5, 4.0], "beta": [0.0, 1.0, -2.0]}),
    "poly1_focal_loss": (False, {"epsilon": [1.0, -1.0, 3.0], "gamma": [2.0, 0.0, 0.5]}),
    "poly1_cross_entropy": (True, {"epsilon": [1.0, -1.0, 0.0, 3.0]}),
    "quality_focal_loss": (False, {"beta": [2.0, 0.5, 1.0, 3.0]}),
    "varifocal_loss": (False, {"gamma": [2.0, 0.0, 0.5], "iou_weighted": [True, False]}),
    "ghmc_loss": (False, {"bins": [10, 1, 3], "momentum": [0.0, 0.75]}),
}
SHAPES = [(2, 3), (3,), (1, 1), (4, 2, 5), (2, 130), (0, 3), (2, 0, 4), (3, 0)]


def call(name, logits, labels, reduction, options):
  loss = getattr(jfocal, name)(logits, labels, reduction=reduction, **options)
  return loss[0] if name == "ghmc_loss" else loss


@st.composite
def cases(draw):
  name = draw(st.sampled_from(sorted(LOSSES)))
  softmax, choices = LOSSES[name]
  options = {key: draw(st.sampled_from(values)) for key, values in choices.items()}
  # A softmax needs a class; a sigmoid loss may have none.
  shape = draw(st.sampled_from([s for s in SHAPES if s[-1] or not softmax]))
  dtype = draw(st.sampled_from(FLOAT_DTYPES))
  values = st.one_of(st.sampled_from(SPECIAL), st.floats(-50, 50))
  logits = np.asarray(draw(hnp.arrays(np.float64, shape, elements=values)))
  classes = shape[-1]
  kind = draw(st.sampled_from(["ids", "dense", "pair"] if name in (
      "quality_focal_loss", "varifocal_loss") else ["ids", "dense"]))
  top = classes - 1 if softmax else classes  # sigmoid id C = background
  if kind == "dense":
    dense = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0, 0.3, 1e-30])))
    if softmax:  # a distribution per row (0-sized rows stay empty)
      dense = dense / np.maximum(dense.sum(-1, keepdims=True), 1e-30)
      dense = np.where(dense.sum(-1, keepdims=True) > 0, dense, np.eye(classes)[0])
    labels, valid = np.asarray(dense, np.float32), np.ones(shape[:-1], bool)
  else:
    ids = np.asarray(draw(hnp.arrays(np.int32, shape[:-1], elements=st.integers(-2, top + 2))))
    valid = (ids >= 0) & (ids <= top)
    labels = ids
    if kind == "pair":
      scores = draw(hnp.arrays(np.float32, shape[:-1], elements=st.sampled_from([0.0, 0.5, 1.0])))
      labels = (ids, np.asarray(scores))
  with np.errstate(over="ignore"):  # 1e30 is inf in float16, as intended
    logits = logits.astype(jnp.dtype(dtype))
  return name, logits, labels, valid, softmax, options


def host(array):
  return np.asarray(jnp.asarray(array).astype(jnp.float64))


@given(case=cases())
def test_extended_losses_keep_their_promises(case):
  name, logits, labels, valid, softmax, options = case
  logits = jnp.asarray(logits)
  eager = call(name, logits, labels, "none", options)
  # Labels are arguments, not constants: XLA would fold constant subexpressions with a
  # differently rounded exp or log, which cancellation (Poly-1 with epsilon < 0) magnifies.
  jitted = jax.jit(lambda x, y: call(name, x, y, "none", options))(logits, labels)
  expected_shape = logits.shape[:-1] if softmax else logits.shape
  assert eager.shape == expected_shape and eager.dtype == logits.dtype, (eager.shape, eager.dtype)

  eager_host, jitted_host = host(eager), host(jitted)
  np.testing.assert_array_equal(np.isnan(jitted_host), np.isnan(eager_host), "NaN positions")
  if logits.dtype == jnp.float32:
    keep = ~np.isnan(jitted_host)
    np.testing.assert_array_max_ulp(np.asarray(jitted)[keep], np.asarray(eager)[keep], maxulp=1)

  # Entries with bounded finite logits and valid labels: finite loss and gradient.
  x = host(logits)
  bounded = np.isfinite(x) & (np.abs(x) <= BOUND)
  good = (bounded.all(-1) if softmax else bounded) & (valid if softmax else valid[..., None])
  summed = lambda x: jnp.sum(jnp.where(good, call(name, x, labels, "none", options), 0))
  grad_rows = host(jax.jit(jax.grad(summed))(logits))
  grad_good = np.broadcast_to(good[..., None], grad_rows.shape) if softmax else good
  loss_good = good
  if logits.dtype == jnp.float16:
    # GHM-C's weights reach N / bins: at |x| = 1e4 a loss or gradient may exceed float16's
    # range (65504). Require finite results where the float32 computation fits in it.
    wide = logits.astype(jnp.float32)
    fits = lambda value: np.abs(host(value)) <= np.finfo(np.float16).max
    loss_good = good & fits(call(name, wide, labels, "none", options))
    grad_good = grad_good & fits(jax.grad(summed)(wide))
  assert np.isfinite(jitted_host[loss_good]).all(), f"non-finite loss {jitted_host[loss_good]}"
  assert np.isfinite(grad_rows[grad_good]).all(), "non-finite gradient of a finite entry"

  if logits.size == 0:
    for reduction in ("sum", "mean"):
      assert float(call(name, logits, labels, reduction, options)) == 0.0
