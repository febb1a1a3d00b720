"""Many devices: rows of a per-row or n:m layer problem are independent, so they shard.

``shard_rows`` places ``W``'s rows across a 1-D mesh of devices and replicates ``G``; the
compiled ``solve_layer`` then runs SPMD (XLA's partitioner keeps every row-wise operation local,
only the loop's "all rows done?" test and the reported totals communicate). The same code runs
multi-host once ``jax.distributed.initialize()`` has been called.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["row_mesh", "shard_rows"]


def row_mesh(devices: Optional[list] = None) -> Mesh:
    """A 1-D mesh named ``"rows"`` over ``devices`` (default: all devices)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("rows",))


def shard_rows(weight: Array, gram: Array, mesh: Optional[Mesh] = None) -> tuple[Array, Array]:
    """Return ``weight`` sharded by rows over ``mesh`` and ``gram`` replicated on it.

    Raises:
      ValueError: the number of rows is not a multiple of the number of devices.
    """
    mesh = mesh if mesh is not None else row_mesh()
    devices = mesh.devices.size
    if weight.shape[0] % devices:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, not a multiple of the {devices} devices of the mesh; "
            "pad the rows or use a mesh whose size divides them"
        )
    return (
        jax.device_put(weight, NamedSharding(mesh, PartitionSpec("rows", None))),
        jax.device_put(gram, NamedSharding(mesh, PartitionSpec())),
    )
