"""Test configuration: the CPU compiler, float64 references, strict dtype promotion,
deterministic hypothesis.

Shared helpers live in `helpers.py`, the loss registry in `registry.py`.
"""

import importlib.metadata
import os

# XLA's CPU compiler builds fused loops with its MLIR fusion emitters and splits each
# program into 32 parts compiled in parallel. Its elemental emitters, in one part, compile
# about twice as fast (measured on the losses' programs: 0.48 s -> 0.22 s for softmax CE
# with its gradient, and 12% less again for one part on these 2 cores), and compiling small
# programs is most of the suite's time. The extreme-logit test of `test_references.py`
# checks that both settings give every loss the same finite entries and values within the
# suite's tolerance (bitwise, but for 1 ulp on AVX-512 CPUs), so the suite uses the faster
# one. It is set before JAX starts its CPU client, and so reaches the subprocesses and
# notebook kernels too; only for the jaxlib series it was measured on (XLA aborts on a
# flag it does not know).
# JFOCAL_TEST_DEFAULT_COMPILER=1 runs the suite with XLA's defaults.
XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": True,  # xla/debug_options_flags.cc
                "xla_cpu_parallel_codegen_split_count": 32}
SUITE_XLA_OPTIONS = {"xla_cpu_use_fusion_emitters": False,
                     "xla_cpu_parallel_codegen_split_count": 1}
_SUITE_FLAGS = " ".join(f"--{name}={str(value).lower()}"
                        for name, value in SUITE_XLA_OPTIONS.items())
SUITE_USES_ITS_OPTIONS = (not os.environ.get("JFOCAL_TEST_DEFAULT_COMPILER")
                          and importlib.metadata.version("jaxlib").startswith("0.10."))
if SUITE_USES_ITS_OPTIONS and _SUITE_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SUITE_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


def cpu_compiler_options(options: dict) -> dict:
  """The entries of `options` that this jaxlib's CPU compiler knows.

  A program's compile options, unlike XLA_FLAGS, raise on a name XLA does not know,
  and XLA drops flags between releases (these were read in jaxlib 0.10's sources): a
  suite run with a newer JAX, on a GPU machine say, then compiles with the options it
  still has rather than failing every test that passes them.
  """
  program = jax.jit(lambda x: x + 1).lower(jax.device_put(0.0, jax.devices("cpu")[0]))
  known = {}
  for name, value in options.items():
    try:
      program.compile({name: value})
    except jax.errors.JaxRuntimeError:  # INVALID_ARGUMENT: No such compile option
      continue
    known[name] = value
  return known


XLA_DEFAULTS = cpu_compiler_options(XLA_DEFAULTS)

# float64 references, and strict promotion so that an accidental mix of
# float32 and float64 inside the library is an error instead of a silent upcast.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# "ci" (the default) is derandomized: the same examples every run, no database.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=6,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
# `make fuzz`: thousands of random examples for tests/test_fuzz.py.
settings.register_profile(
    "fuzz", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The longest tests (subprocesses, notebooks, training runs) start first, so that the
# workers of `make test` finish together instead of one waiting on a late long test.
LONG = ("test_multidevice.py::", "test_notebooks.py::test_notebook_executes",
        "test_retinanet.py::test_a_short_run")


# Then the detector's tests: `pytest-xdist` hands each worker a run of consecutive tests, so
# they share one worker and its compiled initialisation (about 15 s per process).
SHARED_SETUP = ("test_retinanet.py::",)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: (not any(name in item.nodeid for name in LONG),
                               not any(name in item.nodeid for name in SHARED_SETUP)))


@pytest.fixture
def standard_promotion():
  """For tests of optax's and Flax's own code, which mixes int32 and float under strict mode
  (adam's bias correction); jfocal itself is covered by strict mode everywhere else."""
  with jax.numpy_dtype_promotion("standard"):
    yield


@pytest.fixture(params=["eager", "jit"])
def transform(request):
  """Runs every behaviour both eagerly and under `jax.jit`."""
  if request.param == "eager":
    return lambda fn: fn
  return jax.jit
