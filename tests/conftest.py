"""Test configuration: float64 references, strict dtype promotion, deterministic hypothesis.

The implementation under test runs on whatever `jax.devices()` offers (CPU
here, GPU or TPU elsewhere); float64 references run on the host CPU backend,
which every JAX installation has.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# float64 references, and strict promotion so that an accidental mix of
# float32 and float64 inside the library is an error instead of a silent upcast.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# "ci" (the default) is derandomized: the same examples every run, no database.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=25,
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

FLOAT_DTYPES = (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16)

# One tolerance per dtype for every comparison against a float64 reference.
# Half-precision inputs are computed in float32 and rounded once at the end,
# so their error is that rounding: a few units of 2**-8 (bfloat16) and 2**-11
# (float16) relative. `atol` covers results that underflow in float16.
TOLERANCES = {
    np.dtype(jnp.float64): dict(rtol=1e-9, atol=1e-12),
    np.dtype(jnp.float32): dict(rtol=5e-5, atol=1e-6),
    np.dtype(jnp.bfloat16): dict(rtol=1.6e-2, atol=1e-5),
    np.dtype(jnp.float16): dict(rtol=2e-3, atol=2e-7),
}

REFERENCE_DEVICE = jax.devices("cpu")[0]


def assert_close(actual, expected, dtype, *, what="value", scale=1.0):
  """Elementwise |actual - expected| <= atol*scale + rtol*|expected| at `dtype`'s tolerance.

  `scale` widens only the absolute part, for results that are differences of
  terms of size `scale` (a gradient that is a small difference of O(1) terms).
  """
  tolerance = TOLERANCES[np.dtype(dtype)]
  actual = np.asarray(jnp.asarray(actual).astype(jnp.float64))
  expected = np.asarray(expected, dtype=np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  bound = tolerance["atol"] * scale + tolerance["rtol"] * np.abs(expected)
  error = np.abs(actual - expected)
  bad = ~(error <= bound)
  if bad.any():
    index = tuple(np.argwhere(bad)[0])
    raise AssertionError(
        f"{what} differs at {index} for {np.dtype(dtype).name}: got {actual[index]!r}, "
        f"expected {expected[index]!r} (|error| {error[index]:.3g} > bound {bound[index]:.3g}); "
        f"{int(bad.sum())} of {bad.size} elements outside tolerance {tolerance}")


@pytest.fixture(params=["eager", "jit"])
def transform(request):
  """Runs every behaviour both eagerly and under `jax.jit`."""
  if request.param == "eager":
    return lambda fn: fn
  return jax.jit
