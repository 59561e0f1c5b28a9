"""Row-wise sharding of embedding tables across the devices of a mesh axis.

Every stacked table group of an :class:`~jaxrec.EmbeddingBagCollection` or
:class:`~jaxrec.EmbeddingCollection` (``params["embedding_bags"]`` / ``params["embeddings"]``,
at any depth of a model's variables) is split by rows over one mesh axis; every other leaf
is replicated. Under ``jax.jit`` XLA's SPMD partitioner then runs each lookup on the rows a
device holds and sums the partial results across the axis (TorchRec's row-wise sharding):
no device ever holds a whole table, and the fused sparse update writes each device's rows
in place. That path needs the XLA backend (``backend="xla"``): the Pallas kernels have no
partitioning rule. The faster path, with any backend, runs the collection inside
``jax.shard_map`` with ``row_shard_axis=axis`` and these placements as ``in_specs``
(:func:`row_partition_specs`): each device looks up its rows with the kernels and only the
pooled outputs are summed across the axis.

For a :class:`~jaxrec.optim.FusedTableParams` the table and its per-row optimizer state are
split by rows; ``step`` and ``uses`` are replicated. A group's row count (the sum of its
tables' ``num_embeddings``) must divide evenly by the axis size.

>>> import jax, numpy as np
>>> from jax.sharding import Mesh
>>> mesh = Mesh(np.array(jax.devices()[:2]), ("rows",))
>>> variables = {"params": {"embedding_bags": {"g": np.zeros((6, 4))}, "mlp": np.zeros(3)}}
>>> placed = shard_rows(variables, mesh, "rows")
>>> tuple(placed["params"]["embedding_bags"]["g"].sharding.spec)
('rows', None)
>>> tuple(placed["params"]["mlp"].sharding.spec)
()
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.ops.sharded import (
    check_divisible,
    is_fused_table,
    local_row_block,
    map_row_leaves,
)

__all__ = ["local_row_block", "row_partition_specs", "row_shardings", "shard_rows"]

TABLE_COLLECTIONS = ("embedding_bags", "embeddings")


def _under_table_collection(path: tuple) -> bool:
    return any(getattr(key, "key", None) in TABLE_COLLECTIONS for key in path)


def _split_rows(axis: str, ndim: int) -> P:
    return P(axis, *([None] * (ndim - 1)))


def row_shardings(variables: Any, mesh: Mesh, axis: str) -> Any:
    """A pytree of :class:`~jax.sharding.NamedSharding` matching ``variables``: table groups
    split by rows over ``axis``, everything else replicated.

    Raises ``ValueError`` for an unknown axis or a group whose rows do not divide evenly.
    """
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    size = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())

    def place(path: tuple, node: Any) -> Any:
        if not _under_table_collection(path):
            return jax.tree.map(lambda _: replicated, node)

        def split(leaf, rows):
            check_divisible(f" at {jax.tree_util.keystr(path)}", rows, size, axis)
            return NamedSharding(mesh, _split_rows(axis, leaf.ndim))

        return map_row_leaves(node, split, lambda _: replicated)

    return jax.tree_util.tree_map_with_path(place, variables, is_leaf=is_fused_table)


def row_partition_specs(variables: Any, mesh: Mesh, axis: str) -> Any:
    """The :class:`~jax.sharding.PartitionSpec` of each leaf of :func:`row_shardings`: the
    ``in_specs`` / ``out_specs`` of these variables for ``jax.shard_map``."""
    return jax.tree.map(
        lambda s: s.spec,
        row_shardings(variables, mesh, axis),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def shard_rows(variables: Any, mesh: Mesh, axis: str) -> Any:
    """``variables`` placed on ``mesh``: table groups split by rows over ``axis``, the rest
    replicated (see :func:`row_shardings`). Jitted steps keep these placements."""
    return jax.device_put(variables, row_shardings(variables, mesh, axis))
