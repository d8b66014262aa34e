"""The types of the public signatures."""

from __future__ import annotations

from typing import Literal, TypeAlias

import jax

ArrayLike: TypeAlias = jax.typing.ArrayLike

Reduction: TypeAlias = Literal["none", "sum", "mean"]

# A number or scalar array dividing the sum, or the detector convention.
Normalizer: TypeAlias = ArrayLike | Literal["num_positives"] | None

# One mapped axis or several (shard_map, pmap, vmap's axis_name).
AxisName: TypeAlias = str | tuple[str, ...] | None

# A hyper-parameter such as gamma: a Python number specialises the compiled
# program, an array (or a tracer) is traced, vmappable and differentiable.
Parameter: TypeAlias = float | jax.Array
