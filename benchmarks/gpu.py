"""Achieved bandwidth of the focal losses' value-and-grad on an accelerator.

The short, prepared device check of the performance issue: on a GPU (or TPU),
the sigmoid and the softmax focal loss's value-and-grad of the summed loss at
2**27 logits, each against the device's copy bound, optax and the floor kernel
of `run.py`, timed in this one process.

    python benchmarks/gpu.py [--out DIR] [--hlo]   # writes DIR/gpu.md (DIR: benchmarks/)

Bytes are the least such a program moves: it reads the logits and the labels
once and writes the gradient once. The copy bound is that many bytes at the
bandwidth of ``a * 1.5`` over 2**28 float32 (1 GiB read, 1 GiB written).
Each time is the best over 5 repeats of the mean of a loop of calls dispatched
back to back, so that the launch overhead of one call is hidden behind the
previous one as in a training step. With ``--hlo``, DIR/gpu_hlo.txt holds
jfocal's optimised programs, to count their kernels.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import run as bench  # noqa: E402  (the floor kernel, inputs and timer of `make bench`)

LOG2_ELEMENTS = 27

CANDIDATES = {
    "sigmoid": {
        "jfocal": bench.FAMILIES["sigmoid"]["jfocal"],
        "optax": bench.FAMILIES["sigmoid"]["optax"],
        "floor": bench._floor,
    },
    "softmax": {
        "jfocal": bench.FAMILIES["softmax"]["jfocal"],
        "jfocal CE": bench.SOFTMAX_CLASSES["jfocal CE"],
        "optax CE": bench.SOFTMAX_CLASSES["optax CE"],
        "floor": bench._floor,
    },
}
CASES = [("sigmoid", 80), ("softmax", 81), ("softmax", 1000), ("softmax", 32768)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=pathlib.Path, default=bench.HERE)
  parser.add_argument("--hlo", action="store_true", help="also write jfocal's programs")
  parser.add_argument("--log2-elements", type=int, default=LOG2_ELEMENTS)
  args = parser.parse_args()
  device = jax.devices()[0]
  peak = bench.copy_bandwidth()
  lines = [f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", "",
           f"Copy bound: {peak / 1e9:.0f} GB/s (a * 1.5 over 2**28 float32).", "",
           "| family | dtype | C | impl | ms | GB/s | x copy bound | x jfocal | temp / logits |",
           "|---|---|---|---|---|---|---|---|---|"]
  hlo = []
  rng = np.random.default_rng(0)
  for family, classes in CASES:
    for dtype in (jnp.float32, jnp.bfloat16):
      x, labels = bench._inputs(family, 2 ** args.log2_elements, classes, dtype, rng)
      moved = 2 * x.nbytes + labels.nbytes
      times = {}
      for impl, loss in CANDIDATES[family].items():
        fn = loss if impl == "floor" else jax.value_and_grad(loss)
        compiled = jax.jit(fn).lower(x, labels).compile()
        memory = compiled.memory_analysis()
        temp = None if memory is None else memory.temp_size_in_bytes / x.nbytes
        times[impl] = bench.seconds_per_call(compiled, x, labels)
        if impl == "jfocal":
          hlo.append(f"===== {family} {jnp.dtype(dtype).name} C={classes}\n"
                     f"{compiled.as_text()}")
        lines.append(
            f"| {family} | {jnp.dtype(dtype).name} | {classes} | {impl} | "
            f"{times[impl] * 1e3:.3f} | {moved / times[impl] / 1e9:.0f} | "
            f"{times[impl] * peak / moved:.2f} | {times[impl] / times['jfocal']:.2f} | "
            f"{'-' if temp is None else f'{temp:.2f}'} |")
        print(lines[-1], flush=True)
      del x, labels
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
  if args.hlo:
    (args.out / "gpu_hlo.txt").write_text("\n".join(hlo))
  print("\n".join(lines[:4]))


if __name__ == "__main__":
  main()
