"""Moving a collection's variables between the single-device and the sharded layout.

The single-device layout is a collection's ``params["embedding_bags"]`` (or
``["embeddings"]``): ``{group name: stacked table or FusedTableParams}`` as
:func:`jaxrec.ops.plan.build_plan` groups the tables. The sharded layout of a
:class:`~jaxrec.parallel.layout.ShardedLayout` is ``{"shards": {local group: [n * rows,
cols] or FusedTableParams}, "replicated": {data-parallel group: ...}}``: every local group
split by rows over the mesh axis (:func:`partition_specs`), data-parallel groups whole.

Both go through whole per-table arrays (:class:`TableState`), which is also what a
state dict or a checkpoint export reads. Per-row optimizer state (row-wise Adagrad's
``momentum1``) of a column-split table is kept by every column shard, as TorchRec does;
each shard updates its copy from its own columns, so the copies drift apart in training
and the per-table view reports the first column shard's.

>>> import numpy as np
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel.layout import ShardedLayout
>>> from jaxrec.parallel.types import ShardingPlan, column_wise
>>> t = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
>>> layout = ShardedLayout.create([t], ShardingPlan({"t": column_wise([1, 0])}), 2)
>>> single = {"sum_float32_d4": np.arange(12.0).reshape(3, 4)}
>>> sharded = shard_params(layout, single)
>>> sharded["shards"]["sum_float32_d2"].tolist()   # rank 0: columns 2:4, rank 1: columns 0:2
[[2.0, 3.0], [6.0, 7.0], [10.0, 11.0], [0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]
>>> np.array_equal(unshard_params(layout, sharded)["sum_float32_d4"], single["sum_float32_d4"])
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrec.ops.plan import LookupPlan
from jaxrec.optim.fused import FusedTableParams
from jaxrec.parallel.layout import ShardedLayout

__all__ = [
    "TableState",
    "partition_specs",
    "shard_params",
    "shard_tables",
    "table_states",
    "unshard_params",
    "unshard_tables",
]


@dataclass(frozen=True)
class TableState:
    """One whole table: ``weight [rows, dim]``; for a fused table its optimizer ``state``
    (per-row ``[rows]`` or per-element ``[rows, dim]`` arrays), ``step`` and ``uses``."""

    weight: np.ndarray
    state: dict[str, np.ndarray] | None = None
    step: np.ndarray | None = None
    uses: np.ndarray | None = None


def _host(x: Any) -> np.ndarray:
    return np.asarray(x)


def table_states(plan: LookupPlan, groups: Mapping[str, Any]) -> dict[str, TableState]:
    """Whole per-table arrays (on the host) of stacked groups laid out as ``plan``."""
    out = {}
    for table in plan.tables:
        entry = groups[plan.groups[table.group].name]
        rows = slice(table.row_offset, table.row_offset + table.num_rows)
        if isinstance(entry, FusedTableParams):
            out[table.name] = TableState(
                weight=_host(entry.weight)[rows],
                state={k: _host(v)[rows] for k, v in entry.state.items()},
                step=_host(entry.step),
                uses=_host(entry.uses),
            )
        else:
            out[table.name] = TableState(weight=_host(entry)[rows])
    return out


def _stack(plan: LookupPlan, tables: Mapping[str, TableState], optimizers) -> dict[str, Any]:
    """Stacked groups of ``plan`` from whole tables (the inverse of :func:`table_states`)."""
    groups = {}
    for g, group in enumerate(plan.groups):
        members = [tables[t.name] for t in plan.tables if t.group == g]
        weight = jnp.asarray(np.concatenate([m.weight for m in members]), group.dtype)
        if optimizers[g] is None:
            groups[group.name] = weight
            continue
        first = _fused_member(group.name, members)
        groups[group.name] = FusedTableParams(
            weight=weight,
            state={
                k: jnp.asarray(np.concatenate([m.state[k] for m in members])) for k in first.state
            },
            step=jnp.asarray(first.step),
            uses=jnp.asarray(first.uses),
        )
    return groups


def _fused_member(group: str, members: list[TableState]) -> TableState:
    """The first member, after checking that all are fused with one step count."""
    if any(m.state is None for m in members):
        raise ValueError(f"group {group!r} is fused, but a table in it has no optimizer state")
    steps = {float(m.step) for m in members}
    if len(steps) > 1:
        raise ValueError(
            f"the tables of group {group!r} have different step counts {sorted(steps)}"
        )
    return members[0]


def shard_tables(layout: ShardedLayout, tables: Mapping[str, TableState]) -> dict[str, Any]:
    """The sharded params of ``layout`` holding the whole tables ``tables``."""
    missing = sorted({t.name for t in layout.tables} - set(tables))
    if missing:
        raise ValueError(f"no arrays for tables {missing}")
    for config in layout.tables:
        got = np.shape(tables[config.name].weight)
        if got != (config.num_embeddings, config.embedding_dim):
            raise ValueError(
                f"table {config.name!r}: weight has shape {got}, expected "
                f"{(config.num_embeddings, config.embedding_dim)}"
            )
    n = layout.num_devices
    shards: dict[str, Any] = {}
    for g, group in enumerate(layout.groups):
        weight = np.zeros((n * group.rows, group.dim), jnp.dtype(group.dtype))
        optimizer = layout.group_optimizer(g)
        state = None
        if optimizer is not None:
            state = {k: np.array(v) for k, v in optimizer.init(n * group.rows, group.dim).items()}
        members = []
        for shard in (s for s in layout.shards if s.group == g):
            whole = tables[shard.table]
            members.append(whole)
            top = shard.rank * group.rows + shard.local_row
            dest = slice(top, top + shard.num_rows)
            rows = slice(shard.row_offset, shard.row_offset + shard.num_rows)
            cols = slice(shard.col_offset, shard.col_offset + shard.num_cols)
            weight[dest] = whole.weight[rows, cols]
            if state is not None:
                if whole.state is None:
                    raise ValueError(f"table {shard.table!r} is fused but has no optimizer state")
                for key, value in state.items():
                    part = whole.state[key][rows]
                    value[dest] = part[:, cols] if value.ndim == 2 else part
        if state is None:
            shards[group.name] = jnp.asarray(weight)
            continue
        first = _fused_member(group.name, members)
        shards[group.name] = FusedTableParams(
            weight=jnp.asarray(weight),
            state={k: jnp.asarray(v) for k, v in state.items()},
            step=jnp.asarray(first.step),
            uses=jnp.asarray(first.uses),
        )
    replicated: dict[str, Any] = {}
    if layout.dp_plan is not None:
        optimizers = [layout.optimizers[g.optimizer_tag] for g in layout.dp_plan.groups]
        replicated = _stack(layout.dp_plan, tables, optimizers)
    return {"shards": shards, "replicated": replicated}


def unshard_tables(layout: ShardedLayout, params: Mapping[str, Any]) -> dict[str, TableState]:
    """Whole per-table arrays of sharded params (global arrays or host copies)."""
    out: dict[str, TableState] = {}
    blocks = {name: _host_entry(entry) for name, entry in params["shards"].items()}
    for config in layout.tables:
        shards = layout.shards_of(config.name)
        if not shards:
            continue
        weight = None
        state: dict[str, np.ndarray] | None = None
        step = uses = None
        for shard in shards:
            group = layout.groups[shard.group]
            block = blocks[group.name]
            top = shard.rank * group.rows + shard.local_row
            src = slice(top, top + shard.num_rows)
            rows = slice(shard.row_offset, shard.row_offset + shard.num_rows)
            cols = slice(shard.col_offset, shard.col_offset + shard.num_cols)
            if weight is None:
                weight = np.zeros((config.num_embeddings, config.embedding_dim), block.weight.dtype)
            weight[rows, cols] = block.weight[src]
            if block.state is None:
                continue
            if state is None:
                state = {
                    k: np.zeros((config.num_embeddings, config.embedding_dim)[: v.ndim], v.dtype)
                    for k, v in block.state.items()
                }
                step, uses = block.step, block.uses
            for key, value in block.state.items():
                if value.ndim == 2:
                    state[key][rows, cols] = value[src]
                elif shard.col_offset == 0:
                    state[key][rows] = value[src]
        out[config.name] = TableState(weight=weight, state=state, step=step, uses=uses)
    if layout.dp_plan is not None:
        out.update(table_states(layout.dp_plan, params["replicated"]))
    return {t.name: out[t.name] for t in layout.tables}


def _host_entry(entry: Any) -> TableState:
    if isinstance(entry, FusedTableParams):
        return TableState(
            weight=_host(entry.weight),
            state={k: _host(v) for k, v in entry.state.items()},
            step=_host(entry.step),
            uses=_host(entry.uses),
        )
    return TableState(weight=_host(entry))


def shard_params(layout: ShardedLayout, groups: Mapping[str, Any]) -> dict[str, Any]:
    """Single-device collection params (``{group: table or FusedTableParams}``) → sharded."""
    return shard_tables(layout, table_states(layout.single_plan, groups))


def unshard_params(layout: ShardedLayout, params: Mapping[str, Any]) -> dict[str, Any]:
    """Sharded params → the single-device collection's ``{group: table or FusedTableParams}``."""
    plan = layout.single_plan
    optimizers = [layout.optimizers[g.optimizer_tag] for g in plan.groups]
    return _stack(plan, unshard_tables(layout, params), optimizers)


def partition_specs(layout: ShardedLayout, axis: str) -> dict[str, Any]:
    """The ``shard_map`` specs of sharded params: local groups split by rows over ``axis``
    (``step`` and ``uses`` replicated), data-parallel groups replicated."""
    shards: dict[str, Any] = {}
    for g, group in enumerate(layout.groups):
        optimizer = layout.group_optimizer(g)
        split = P(axis, None)
        if optimizer is None:
            shards[group.name] = split
            continue
        shards[group.name] = FusedTableParams(
            weight=split,
            state={
                k: P(axis, *([None] * (v.ndim - 1)))
                for k, v in optimizer.init(1, group.dim).items()
            },
            step=P(),
            uses=P(),
        )
    replicated: dict[str, Any] = {}
    if layout.dp_plan is not None:
        for group in layout.dp_plan.groups:
            optimizer = layout.optimizers[group.optimizer_tag]
            replicated[group.name] = (
                P()
                if optimizer is None
                else FusedTableParams(
                    weight=P(),
                    state={k: P() for k in optimizer.init(1, group.dim)},
                    step=P(),
                    uses=P(),
                )
            )
    return {"shards": shards, "replicated": replicated}
