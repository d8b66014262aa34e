"""One of two processes that check a data-parallel loss against a single process.

Started twice by tests/test_multidevice.py (``python two_process_worker.py ID PORT``):
the processes join one JAX runtime with ``jax.distributed.initialize`` (CPU
collectives over gloo), each holds half of a batch, and both compare the
sharded loss and gradient with the whole batch computed on their own device.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jfocal  # noqa: E402

NUM_PROCESSES = 2


def batch():
  """The same whole batch in every process: 8 images x 50 anchors x 4 classes."""
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(8, 50, 4)) * 3).astype(np.float32)
  ids = rng.integers(0, 5, size=(8, 50)).astype(np.int32)  # id 4 = background
  return logits, ids


def loss(logits, ids, **options):
  return jfocal.sigmoid_focal_loss(logits, ids, reduction="mean", normalizer="num_positives",
                                   **options)


def main(process_id: int, port: str) -> None:
  jax.distributed.initialize(f"localhost:{port}", num_processes=NUM_PROCESSES,
                             process_id=process_id)
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == NUM_PROCESSES
  logits, ids = batch()
  on_this_device = jax.device_put((logits, ids), jax.local_devices()[0])
  expected, expected_grad = jax.jit(jax.value_and_grad(loss))(*on_this_device)

  mesh = jax.make_mesh((NUM_PROCESSES,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  half = slice(process_id * 4, process_id * 4 + 4)
  global_logits = jax.make_array_from_process_local_data(sharding, logits[half])
  global_ids = jax.make_array_from_process_local_data(sharding, ids[half])

  # jit over global sharded arrays: no axis name.
  value, grad = jax.jit(jax.value_and_grad(loss))(global_logits, global_ids)
  # shard_map with axis_name: each process reduces over the global batch.
  mapped = jax.jit(jax.shard_map(
      lambda x, y: jax.value_and_grad(loss)(x, y, axis_name="data"),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P(), P("data"))))
  mapped_value, mapped_grad = mapped(global_logits, global_ids)

  for name, got, got_grad in (("jit", value, grad), ("shard_map", mapped_value, mapped_grad)):
    np.testing.assert_allclose(np.asarray(got.addressable_data(0)), np.asarray(expected),
                               rtol=1e-6, err_msg=f"{name} loss, process {process_id}")
    local_grad = np.asarray(got_grad.addressable_data(0))
    np.testing.assert_allclose(local_grad, np.asarray(expected_grad)[half], rtol=1e-6,
                               atol=1e-9, err_msg=f"{name} gradient, process {process_id}")
  print(f"process {process_id}: loss {float(expected):.6f} matches", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
