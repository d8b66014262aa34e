"""Hypothesis strategies shared by the loss tests."""

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import FLOAT_DTYPES

# Named values first (the paper's 2, the awkward 0 < gamma < 1, YOLO's 1.5: a square
# root), then any.
gammas = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
                   st.floats(0.0, 5.0, allow_nan=False))
dtypes = st.sampled_from(FLOAT_DTYPES)
batch_shapes = st.sampled_from([(), (3,), (2, 3)])


def logits(shape, bound):
  """float64 logits in [-bound, bound], with the edges and zero drawn often."""
  edges = st.sampled_from([0.0, bound, -bound, bound / 2, -bound / 2])
  return hnp.arrays(np.float64, shape, elements=st.one_of(
      edges, st.floats(-bound, bound, allow_nan=False, allow_infinity=False)))


def probabilities(shape, low=0.0, high=1.0):
  return hnp.arrays(np.float64, shape, elements=st.floats(low, high))


def hard_labels(shape):
  return hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0]))


def cast(array, dtype):
  """`array` rounded to `dtype`, and the rounded values as float64 for references."""
  rounded = jnp.asarray(array).astype(dtype)
  return rounded, np.asarray(rounded.astype(jnp.float64))
