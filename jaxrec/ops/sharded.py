"""Row-sharded views of a lookup: mesh axes, each device's block of rows and its ids.

A collection whose tables are split by rows over a mesh axis (``row_shard_axis``) runs
its lookup inside ``shard_map`` over that axis: each device holds the stacked rows
``[d * local_rows, (d + 1) * local_rows)`` of every group and sees the whole batch. This
module turns a group of the :class:`~jaxrec.ops.spec.LookupSpec` into the device's view
(one local table, ids rewritten to local rows), binds the axis size where the axis is
bound, and cuts a device's block out of whole tables (:func:`local_row_block`).
:mod:`jaxrec.parallel` places whole variables on a mesh with the same row blocks.

>>> bound_axis_size("rows") is None                # not inside shard_map over "rows"
True
>>> import numpy as np
>>> local_row_block({"g": np.zeros((6, 2))}, "rows")["g"].shape   # unbound: unchanged
(6, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.layout import FeatureLayout, position_bags

from jaxrec.optim.fused import FusedTableParams, is_fused_table

if TYPE_CHECKING:
    from jaxrec.ops.spec import GroupSpec, LookupSpec

__all__ = [
    "bind_row_shards",
    "bound_axis_size",
    "check_divisible",
    "check_parallel_axes",
    "group_views",
    "group_weight",
    "is_fused_table",
    "local_row_block",
    "map_row_leaves",
    "row_shard_view",
]


def bound_axis_size(axis: str) -> int | None:
    """The size of mesh axis ``axis`` where it is bound (inside ``shard_map``), else None."""
    try:
        return int(jax.lax.axis_size(axis))
    except NameError:
        return None


def check_parallel_axes(data_parallel_axis: str | None, row_shard_axis: str | None) -> None:
    """Refuse the combination of data-parallel replicas and row-sharded tables (not built)."""
    if data_parallel_axis is not None and row_shard_axis is not None:
        raise ValueError(
            "data_parallel_axis and row_shard_axis cannot be combined yet; shard the rows "
            "over one mesh axis and keep the whole batch on it"
        )


def group_weight(entry: Any) -> jax.Array:
    """The stacked table of a group entry (a plain array or a FusedTableParams)."""
    return entry.weight if is_fused_table(entry) else entry


def check_divisible(where: str, rows: int, size: int, axis: str) -> None:
    """Refuse a group of ``rows`` rows that does not split evenly over ``size`` devices."""
    if rows % size:
        raise ValueError(
            f"the table group{where} has {rows} rows, which do not split evenly over the "
            f"{size} devices of mesh axis {axis!r}; choose num_embeddings so that every "
            "stacked group's total is a multiple of the axis size"
        )


def map_row_leaves(node: Any, split: Callable, keep: Callable) -> Any:
    """One table group with ``split(leaf, rows)`` on its row-indexed leaves (the table and
    per-row optimizer state) and ``keep(leaf)`` on the rest (``step``, ``uses``, scalars)."""
    if is_fused_table(node):
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
        check_divisible("", rows, size, axis)
        return jax.lax.dynamic_slice_in_dim(leaf, index * (rows // size), rows // size)

    return jax.tree.map(
        lambda node: map_row_leaves(node, split, lambda leaf: leaf),
        groups,
        is_leaf=is_fused_table,
    )


def bind_row_shards(spec: LookupSpec) -> LookupSpec:
    """``spec`` with ``row_shards`` set to the row axis's size where it is bound, else 1."""
    if spec.row_shard_axis is None:
        return spec
    size = bound_axis_size(spec.row_shard_axis)
    return dataclasses.replace(spec, row_shards=1 if size is None else size)


def row_shard_view(
    spec: LookupSpec, group: GroupSpec, local_rows: int, ids, kjt_of_pos, live, num_kjt: int
):
    """This device's view of ``group`` when its rows are split over ``spec.row_shard_axis``.

    Device ``d`` holds stacked rows ``[d * local_rows, (d + 1) * local_rows)``. Returns the
    group with one local table (``(kjt, 0, local_rows, col)`` per feature), the ids
    rewritten to local rows (an id in another shard, outside its table or in a feature
    outside the group becomes -1, which every kernel skips) and the number of the group's
    ids outside their tables, once per group feature that reads them.
    """
    if local_rows * spec.row_shards != group.num_rows:
        raise ValueError(
            f"a table group of {group.num_rows} rows holds {local_rows} rows on this device, "
            f"not 1/{spec.row_shards} of them: pass the tables split by rows over mesh axis "
            f"{spec.row_shard_axis!r} (jaxrec.parallel.row_shardings) into shard_map"
        )
    row_offset = np.zeros(num_kjt, np.int32)
    num_rows = np.full(num_kjt, -1, np.int32)
    listings = np.zeros(num_kjt, np.int32)
    for feat in map(FeatureLayout._make, group.features):
        kjt = feat.kjt_index
        if num_rows[kjt] >= 0 and (row_offset[kjt], num_rows[kjt]) != (
            feat.row_offset,
            feat.num_rows,
        ):
            raise ValueError(
                f"KJT feature {kjt} reads two tables of one group; row sharding needs one"
            )
        row_offset[kjt], num_rows[kjt] = feat.row_offset, feat.num_rows
        listings[kjt] += 1
    limit = jnp.asarray(num_rows)[kjt_of_pos]
    read = live & (limit >= 0)
    ok = read & (ids >= 0) & (ids < limit)
    first = jax.lax.axis_index(spec.row_shard_axis) * local_rows
    local_ids = jnp.where(ok, jnp.asarray(row_offset)[kjt_of_pos] + ids - first, -1)
    bad = jnp.sum(jnp.where(read & ~ok, jnp.asarray(listings)[kjt_of_pos], 0))
    features = tuple(
        FeatureLayout(f.kjt_index, 0, local_rows, f.col_offset)
        for f in map(FeatureLayout._make, group.features)
    )
    return dataclasses.replace(group, features=features, num_rows=local_rows), local_ids, bad


def group_views(spec: LookupSpec, params: tuple, ids, offsets):
    """Per group: (group spec, ids, bad id count) as this device sees them: its row shard
    when sharded (counts of the global ids), else the group itself (count 0, the kernels
    count)."""
    if spec.row_shards == 1:
        return [(group, ids, 0) for group in spec.groups]
    bags, live = position_bags(offsets, ids.shape[0])
    kjt_of_pos = bags // spec.batch_size
    num_kjt = (offsets.shape[0] - 1) // spec.batch_size
    return [
        row_shard_view(spec, group, group_weight(param).shape[0], ids, kjt_of_pos, live, num_kjt)
        for group, param in zip(spec.groups, params, strict=True)
    ]
