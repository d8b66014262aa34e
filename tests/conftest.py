"""Test configuration: float64 references, strict dtype promotion, deterministic hypothesis.

Shared helpers live in `helpers.py`, the loss registry in `registry.py`.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# float64 references, and strict promotion so that an accidental mix of
# float32 and float64 inside the library is an error instead of a silent upcast.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# "ci" (the default) is derandomized: the same examples every run, no database.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=12,
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
