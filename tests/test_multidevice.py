"""Data-parallel checks that need their own processes: 8 simulated devices, and two processes.

JAX fixes its device count when it starts, so these run in subprocesses and
every other test keeps a single device. Both use CPU devices, which every JAX
installation has, whatever accelerator the main run uses.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CPU_ONLY = {"JAX_PLATFORMS": "cpu"}


def run(command, env, timeout=600):
  return subprocess.run(command, cwd=HERE.parent, env={**os.environ, **env}, timeout=timeout,
                        capture_output=True, text=True)


# Two processes of about the same length, so that two workers of the main run share them
# (each process pays about 8 s to start JAX and collect).
PARTS = {"shard_map": "shard_map_with",
         "sharded jit, pmap, ema, training, ghmc": "not shard_map_with"}


@pytest.mark.parametrize("part", PARTS)
def test_sharded_and_mapped_losses_on_eight_devices(part):
  result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                str(HERE / "multidevice" / "sharding_checks.py"), "-k", PARTS[part]],
               {**CPU_ONLY, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


def free_port():
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_match_one_process():
  """jax.distributed over localhost: each process holds half of the batch."""
  worker = str(HERE / "multidevice" / "two_process_worker.py")
  port = str(free_port())
  processes = [subprocess.Popen([sys.executable, worker, str(rank), port], cwd=HERE.parent,
                                env={**os.environ, **CPU_ONLY}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
  try:
    outputs = [process.communicate(timeout=300)[0] for process in processes]
  finally:
    for process in processes:
      process.kill()
  for rank, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, f"process {rank} failed:\n{output[-6000:]}"
    assert f"process {rank}: loss" in output and "matches" in output, output[-2000:]
