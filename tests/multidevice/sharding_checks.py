"""Data parallelism on 8 simulated CPU devices: sharded and mapped losses equal one device.

Not collected by the main run (the file name does not match test_*.py):
tests/test_multidevice.py runs it in its own pytest process with
``--xla_force_host_platform_device_count=8``, so every other test keeps one
device.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jfocal
import registry
from helpers import assert_close

NUM_CLASSES = 3

# The unreduced loss, and the mean over the positives, which needs every global count.
REDUCTIONS = [("none", None), ("mean", "num_positives")]
# Collectives that would move logits-sized data between devices.
MOVING_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  if jax.device_count() != 8:
    pytest.fail(f"run through tests/test_multidevice.py: needs 8 devices, has {jax.device_count()}")


@pytest.fixture(params=registry.PARAMS)
def loss(request):
  """A registry loss as (its loss without state, its family)."""
  return request.param, request.param.family


def batch(family, images=16, anchors=12, seed=0):
  """float32 logits (images, anchors, C) and class ids per anchor, ~1/4 of them positive."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(images, anchors, NUM_CLASSES)) * 3, jnp.float32)
  top = NUM_CLASSES + 1 if family == "sigmoid" else NUM_CLASSES  # sigmoid id C = background
  ids = jnp.asarray(rng.integers(0, top, size=(images, anchors)), jnp.int32)
  return logits, ids


def collectives(compiled):
  """(name, result shapes) of every cross-device operation in a compiled program's HLO."""
  found = []
  for line in compiled.as_text().splitlines():
    match = re.search(r"= (.*?) ([a-z-]+)(?:-start)?\(", line)
    if match and match.group(2) in ("all-reduce",) + MOVING_COLLECTIVES:
      found.append((match.group(2), re.findall(r"\[([\d,]*)\]", match.group(1))))
  return found


def test_sharded_arrays_need_no_axis_name_and_move_only_scalars(loss):
  """jit over arrays sharded by image and anchor equals one device; only scalars are all-reduced."""
  fn, family = loss
  logits, ids = batch(family)
  mesh = jax.make_mesh((4, 2), ("images", "anchors"))
  sharded = jax.device_put((logits, ids), NamedSharding(mesh, P("images", "anchors")))

  def losses_and_grads(x, y):  # every reduction's loss, and the gradient of its sum
    calls = [lambda x, r=r, n=n: fn(x, y, reduction=r, normalizer=n) for r, n in REDUCTIONS]
    return [(call(x), jax.value_and_grad(lambda x: jnp.sum(call(x)))(x)) for call in calls]

  # One program on one device, one on the mesh (compiled, run and read), and the
  # unreduced loss alone, which needs no collective unless the loss is not elementwise.
  expected = jax.jit(losses_and_grads)(logits, ids)
  step = jax.jit(losses_and_grads).lower(*sharded).compile()
  unreduced = jax.jit(lambda x, y: fn(x, y)).lower(*sharded).compile()
  for (reduction, _), (value, (total, grad)), (want, (want_total, want_grad)) in zip(
      REDUCTIONS, step(*sharded), expected):
    assert_close(value, want, jnp.float32, what=f"{reduction} loss")
    assert_close(total, want_total, jnp.float32, what=f"sum of the {reduction} loss")
    assert_close(grad, want_grad, jnp.float32, what=f"gradient of the {reduction} loss")
    assert grad.sharding.spec[:2] == ("images", "anchors"), "the gradient stays sharded"
  assert_close(unreduced(*sharded), expected[0][0], jnp.float32)

  # GHM-C sums its histogram whatever the reduction.
  for compiled, reduces in ((unreduced, not fn.elementwise), (step, True)):
    ops = collectives(compiled)
    moving = [name for name, _ in ops if name in MOVING_COLLECTIVES]
    assert not moving, f"logits-sized data moves between devices: {moving}"
    sizes = [shapes for name, shapes in ops if name == "all-reduce"]
    # Scalars only; GHM-C also sums its histogram of gradient norms, one count per bin.
    allowed = {""} | ({str(fn.params["bins"])} if fn.name == "ghmc_loss" else set())
    assert all(dims in allowed for shapes in sizes for dims in shapes), (
        f"only scalars (and GHM-C's histogram) may be all-reduced; got shapes {sizes}")
    assert bool(sizes) == reduces, f"a global reduction all-reduces partial sums; got {ops}"


# Every loss: the unreduced loss, and the detector's reduction over two mesh axes. The
# reductions are the engine's (`jfocal.engine.reduce`), one for every loss, so the other
# reductions over one axis run for the two focal losses and the stateful GHM-C.
MAPPED = [("none", None, ("data",)), ("mean", "num_positives", ("images", "anchors")),
          ("mean", "num_positives", ("data",)), ("sum", None, ("data",))]
ONE_AXIS_LOSSES = ("sigmoid_focal_loss", "softmax_focal_loss", "ghmc_loss")
MAPPED_CASES = [pytest.param(p.values[0], *config, id=f"{p.id}-{'-'.join(map(str, config[:2]))}-"
                             f"{len(config[2])}axes")
                for p in registry.PARAMS for i, config in enumerate(MAPPED)
                if i < 2 or p.id in ONE_AXIS_LOSSES]


@functools.cache
def one_device(name, reduction, normalizer):
  """The unreduced loss, and the reduced loss with its gradient, on one device (the same
  for one mesh axis and two)."""
  fn = registry.LOSSES[name]
  summed = lambda x, y: jnp.sum(fn(x, y, reduction=reduction, normalizer=normalizer))
  return jax.jit(lambda x, y: (fn(x, y), jax.value_and_grad(summed)(x, y)))(*batch(fn.family))


@pytest.mark.parametrize("fn, reduction, normalizer, axes", MAPPED_CASES)
def test_shard_map_with_axis_name_equals_one_device(fn, reduction, normalizer, axes):
  """Each device gets the global loss and its share of the global gradient."""
  family = fn.family
  logits, ids = batch(family)
  mesh = jax.make_mesh((8,), axes) if len(axes) == 1 else jax.make_mesh((4, 2), axes)
  spec = P(*axes) if len(axes) == 2 else P(axes[0])
  axis_name = axes if len(axes) == 2 else axes[0]
  summed = lambda x, y, **kw: jnp.sum(fn(x, y, reduction=reduction, normalizer=normalizer, **kw))
  expected_loss, (expected, expected_grad) = one_device(fn.name, reduction, normalizer)

  if reduction == "none":  # nothing to reduce: the loss stays sharded like the logits
    per_device = lambda x, y: (fn(x, y, axis_name=axis_name),
                               jax.grad(summed)(x, y, axis_name=axis_name))
    value_spec, expected = spec, expected_loss
  else:
    per_device = lambda x, y: jax.value_and_grad(summed)(x, y, axis_name=axis_name)
    value_spec = P()
  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec),
                                 out_specs=(value_spec, spec)))
  value, grad = mapped(*jax.device_put((logits, ids), NamedSharding(mesh, spec)))
  assert_close(value, expected, jnp.float32)
  assert_close(grad, expected_grad, jnp.float32)


@pytest.mark.parametrize("normalizer", [None, "num_positives"])
def test_pmap_with_axis_name_equals_one_device(normalizer):
  """Under pmap (no varying-value types) the gradient is still the device's share."""
  logits, ids = batch("sigmoid")
  summed = lambda x, y, **kw: jfocal.sigmoid_focal_loss(
      x, y, reduction="mean", normalizer=normalizer, **kw)
  expected, expected_grad = jax.value_and_grad(summed)(logits, ids)
  mapped = jax.pmap(lambda x, y: jax.value_and_grad(summed)(x, y, axis_name="data"),
                    axis_name="data")
  value, grad = mapped(logits.reshape(8, 2, 12, NUM_CLASSES), ids.reshape(8, 2, 12))
  assert_close(value, np.full(8, expected), jnp.float32)
  assert_close(grad.reshape(logits.shape), expected_grad, jnp.float32)


def test_ema_normalizer_counts_positives_over_all_devices():
  ids = batch("sigmoid")[1]
  count = lambda y: jnp.sum(y < NUM_CLASSES)
  state = jfocal.ema_normalizer_init(50.0)
  expected = jfocal.ema_normalizer(count(ids), state, momentum=0.8)
  mesh = jax.make_mesh((8,), ("data",))
  mapped = jax.jit(jax.shard_map(
      lambda y, s: jfocal.ema_normalizer(count(y), s, momentum=0.8, axis_name="data"),
      mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))
  assert_close(mapped(jax.device_put(ids, NamedSharding(mesh, P("data"))), state), expected,
               jnp.float32)


class Detector(nn.Module):
  """A per-anchor classifier: features (images, anchors, 8) -> logits (images, anchors, C)."""

  @nn.compact
  def __call__(self, features):
    hidden = nn.relu(nn.Dense(16)(features))
    return nn.Dense(NUM_CLASSES, bias_init=jfocal.prior_bias_init(0.01))(hidden)


def training_data(steps=4):
  rng = np.random.default_rng(7)
  features = rng.normal(size=(steps, 16, 12, 8)).astype(np.float32)
  ids = rng.integers(0, NUM_CLASSES + 1, size=(steps, 16, 12)).astype(np.int32)
  return features, ids


def train(step, params, features, ids, place=lambda *arrays: arrays):
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  for x, y in zip(features, ids):
    params, opt_state = step(optimizer, params, opt_state, *place(x, y))
  return params


def test_data_parallel_training_steps_match_one_device(standard_promotion):
  """Four adam steps: batch-sharded jit and shard_map(axis_name) give one device's params."""
  model = Detector()
  features, ids = training_data()
  params = model.init(jax.random.key(0), features[0])

  def objective(params, x, y, **kw):
    return jfocal.sigmoid_focal_loss(model.apply(params, x), y, reduction="mean",
                                     normalizer="num_positives", **kw)

  def update(optimizer, params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def plain_step(params, opt_state, x, y):
    return update(optax.adam(1e-2), params, opt_state, jax.grad(objective)(params, x, y))

  # Auto axes: flax's Dense leaves the sharding of its weight gradients to XLA,
  # which a mesh with explicit axes would make it spell out.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = NamedSharding(mesh, P("data"))

  @jax.jit
  def mapped_step(params, opt_state, x, y):
    # Replicated params: JAX sums their per-device gradients itself (shard_map
    # types them invariant), so every device applies the global gradient.
    grads = jax.shard_map(lambda p, x, y: jax.grad(objective)(p, x, y, axis_name="data"),
                          mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())(
                              params, x, y)
    return update(optax.adam(1e-2), params, opt_state, grads)

  as_step = lambda fn: (lambda optimizer, *args: fn(*args))
  expected = train(as_step(plain_step), params, features, ids)
  shard = lambda *arrays: jax.device_put(arrays, batch_sharding)
  for name, step in (("sharded jit", plain_step), ("shard_map", mapped_step)):
    got = train(as_step(step), params, features, ids, place=shard)
    for leaf, reference in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert_close(leaf, reference, jnp.float32, what=f"{name} parameters after 4 steps")


def test_ghmc_histogram_is_global_when_sharded_or_mapped():
  """GHM-C's weights depend on the whole batch: sharded and mapped runs see all of it."""
  logits, ids = batch("sigmoid")
  state = jfocal.ghmc_init(5, dtype=jnp.float32) + jnp.arange(5, dtype=jnp.float32)
  loss = lambda x, y, s, **kw: jfocal.ghmc_loss(x, y, bins=5, momentum=0.5, state=s,
                                                reduction="mean", **kw)
  (expected, expected_state), expected_grad = jax.value_and_grad(loss, has_aux=True)(
      logits, ids, state)

  mesh = jax.make_mesh((4, 2), ("images", "anchors"))
  spec = P("images", "anchors")
  sharded = jax.device_put((logits, ids), NamedSharding(mesh, spec))
  (value, new_state), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(*sharded, state)
  mapped = jax.jit(jax.shard_map(
      lambda x, y, s: jax.value_and_grad(loss, has_aux=True)(
          x, y, s, axis_name=("images", "anchors")),
      mesh=mesh, in_specs=(spec, spec, P()), out_specs=((P(), P()), spec)))
  (mapped_value, mapped_state), mapped_grad = mapped(*sharded, state)
  for got, got_state, got_grad in ((value, new_state, grad),
                                   (mapped_value, mapped_state, mapped_grad)):
    assert_close(got, expected, jnp.float32)
    assert_close(got_state, expected_state, jnp.float32)
    assert_close(got_grad, expected_grad, jnp.float32)


def linear_problem(tokens=32, d=8, vocab=96):
  """Features, kernel, bias, alpha and ids (one ignored) of a fused linear + softmax loss."""
  rng = np.random.default_rng(0)
  arrays = (rng.normal(size=(tokens, d)), rng.normal(size=(d, vocab)) / 3, rng.normal(size=vocab),
            rng.uniform(0.2, 1.0, size=vocab))
  ids = jnp.asarray(rng.integers(0, vocab, size=tokens)).at[3].set(-100)
  return (*(jnp.asarray(a, jnp.float32) for a in arrays), ids)


def linear_loss(f, w, b, a, y, **kw):
  # 12 columns per device when the vocabulary is split 8 ways: blocks of 5 overlap at the end.
  return jfocal.linear_softmax_focal_loss(f, w, y, bias=b, alpha=a, gamma=2.0,
                                          label_smoothing=0.1, z_loss=1e-3, ignore_index=-100,
                                          reduction="mean", block_size=5, **kw)


linear_value_and_grads = jax.value_and_grad(linear_loss, argnums=(0, 1, 2, 3))


def test_linear_loss_with_tokens_sharded_under_jit_equals_one_device():
  problem = linear_problem()
  expected = jax.jit(linear_value_and_grads)(*problem)
  mesh = jax.make_mesh((8,), ("tokens",))
  tokens, replicated = NamedSharding(mesh, P("tokens")), NamedSharding(mesh, P())
  placed = jax.device_put(problem, (tokens, replicated, replicated, replicated, tokens))
  got = jax.jit(linear_value_and_grads)(*placed)
  for value, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert_close(value, want, jnp.float32)


@pytest.mark.parametrize("axes", [("vocab",), ("data", "vocab")])
def test_shard_map_with_vocab_axis_name_equals_one_device(axes):
  """The kernel, bias and alpha split by vocabulary columns (tensor parallelism), and the
  tokens too over a second axis: the global loss, and each device's exact gradient."""
  problem = linear_problem()
  expected = jax.jit(linear_value_and_grads)(*problem)
  data = "data" if "data" in axes else None
  mesh = jax.make_mesh((8,) if data is None else (2, 4), axes)
  token_spec = P(data)
  specs = (token_spec, P(None, "vocab"), P("vocab"), P("vocab"), token_spec)
  per_device = functools.partial(linear_value_and_grads, vocab_axis_name="vocab", axis_name=data)
  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs,
                                 out_specs=(P(), specs[:4])))
  got = mapped(*jax.device_put(problem, tuple(NamedSharding(mesh, s) for s in specs)))
  for value, want in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert_close(value, want, jnp.float32)
