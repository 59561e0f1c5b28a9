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

from jaxrec.ops.lookup import bound_axis_size
from jaxrec.optim.fused import FusedTableParams

TABLE_COLLECTIONS = ("embedding_bags", "embeddings")


def _is_fused(node: Any) -> bool:
    return isinstance(node, FusedTableParams)


def _under_table_collection(path: tuple) -> bool:
    return any(getattr(key, "key", None) in TABLE_COLLECTIONS for key in path)


def _split_rows(axis: str, ndim: int) -> P:
    return P(axis, *([None] * (ndim - 1)))


def _check_divisible(where: str, rows: int, size: int, axis: str) -> None:
    if rows % size:
        raise ValueError(
            f"the table group{where} has {rows} rows, which do not split evenly over the "
            f"{size} devices of mesh axis {axis!r}; choose num_embeddings so that every "
            "stacked group's total is a multiple of the axis size"
        )


def _map_group(node: Any, split, keep) -> Any:
    """One table group with ``split(leaf, rows)`` on its row-indexed leaves (the table and
    per-row optimizer state) and ``keep(leaf)`` on the rest (``step``, ``uses``, scalars)."""
    if _is_fused(node):
        rows = node.weight.shape[0]
        per_row = lambda leaf: (
            split(leaf, rows)
            if getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == rows
            else keep(leaf)
        )
        return FusedTableParams(
            weight=split(node.weight, rows),
            state=jax.tree.map(per_row, node.state),
            step=keep(node.step),
            uses=keep(node.uses),
        )
    return split(node, node.shape[0]) if getattr(node, "ndim", 0) >= 2 else keep(node)


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
            _check_divisible(f" at {jax.tree_util.keystr(path)}", rows, size, axis)
            return NamedSharding(mesh, _split_rows(axis, leaf.ndim))

        return _map_group(node, split, lambda _: replicated)

    return jax.tree_util.tree_map_with_path(place, variables, is_leaf=_is_fused)


def local_row_block(groups: Any, axis: str) -> Any:
    """This device's block of rows of every table group (``{name: table or fused params}``)
    inside ``shard_map`` over ``axis``; the groups unchanged where ``axis`` is not bound.

    What a collection with ``row_shard_axis`` initialises inside ``shard_map``: the same
    tables as outside, each device keeping its own rows.
    """
    size = bound_axis_size(axis)
    if size is None:
        return groups
    index = jax.lax.axis_index(axis)

    def split(leaf, rows):
        _check_divisible("", rows, size, axis)
        return jax.lax.dynamic_slice_in_dim(leaf, index * (rows // size), rows // size)

    return jax.tree.map(
        lambda node: _map_group(node, split, lambda leaf: leaf), groups, is_leaf=_is_fused
    )


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
