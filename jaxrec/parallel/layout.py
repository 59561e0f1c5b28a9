"""Where every shard of a sharded collection lives: equal-shaped per-device group buffers.

``shard_map`` runs one program on every device, so the shards a device holds must sit in
buffers of one shape on all devices. Shards that share (columns, dtype, pooling as run,
fused optimizer) form a *local group*: one global ``[num_devices * rows, cols]`` array
split by its first axis, device ``d`` holding rows ``[d * rows, (d + 1) * rows)`` with its
shards stacked from the top of its block (``rows`` = the largest device's total; the rest
is padding that no id reaches).

The owner's lookup sees ``num_devices * K`` features of ``B`` bags (the local batch): one
per (source device, *slot*). A slot is a fixed position of a local group's lookup, the
same on every device; what it holds differs per device (``assignments``):

- all-to-all slots (table-wise and column shards): per local group, as many as the busiest
  device needs; a device's slot holds one (feature, shard) pair, or nothing;
- reduce-scatter slots (row-split tables): one per feature of such a table, at the same
  position on every device, holding that device's row shard (or nothing): the pooled
  partial sums of a slot are added across devices.

Data-parallel tables stay out of the slots: they are the ordinary grouped layout
(:func:`jaxrec.ops.plan.build_plan` of those tables), replicated.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel.types import ShardingPlan, row_wise, table_wise
>>> tables = [
...     EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=10, feature_names=["fa"]),
...     EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=6, feature_names=["fb"]),
... ]
>>> layout = ShardedLayout.create(tables, ShardingPlan({"a": row_wise(), "b": table_wise(1)}), 2)
>>> [(g.name, g.rows) for g in layout.groups]
[('sum_float32_d4', 11)]
>>> [(s.table, s.rank, s.row_offset, s.num_rows, s.local_row) for s in layout.shards]
[('a', 0, 0, 5, 0), ('a', 1, 5, 5, 0), ('b', 1, 0, 6, 5)]
>>> [(s.group, s.reduce) for s in layout.slots], layout.assignments
([(0, False), (0, True)], ((None, (0, 0)), ((1, 0), (0, 1))))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jaxrec.configs import (
    TRAINABLE_DATA_TYPES,
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from jaxrec.ops.plan import LookupPlan, build_plan, optimizer_tags
from jaxrec.parallel.types import ShardingPlan, ShardingType

__all__ = ["LocalGroup", "ShardPlacement", "ShardedLayout", "Slot"]


@dataclass(frozen=True)
class LocalGroup:
    """One per-device buffer ``[rows, dim]`` of ``dtype``, looked up with ``pooling``."""

    name: str
    dim: int
    dtype: str
    pooling: str  # as run on the owner: "sum" | "mean" | "none"
    optimizer_tag: int
    rows: int


@dataclass(frozen=True)
class ShardPlacement:
    """Shard ``index`` of ``table``: its rows and columns, its rank, where it sits there."""

    table: str
    index: int
    rank: int
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int
    group: int
    local_row: int  # first row of the shard in its rank's block of the group


@dataclass(frozen=True)
class Slot:
    """A feature position of the owners' lookup: its local group and how its output returns."""

    group: int
    reduce: bool  # True: partial sums reduce-scattered; False: all-to-all


def _pooling_run(table: BaseEmbeddingConfig, row_split: bool) -> str:
    """How the owner pools a table's shard: a row shard sees part of a bag, so it sums (the
    source divides MEAN bags by their whole length)."""
    if not isinstance(table, EmbeddingBagConfig):
        return "none"
    return "mean" if table.pooling is PoolingType.MEAN and not row_split else "sum"


@dataclass(frozen=True)
class ShardedLayout:
    """The static placement of a collection's tables under a :class:`ShardingPlan`.

    Build it with :meth:`create`. ``features`` are the collection's features in its order
    (``(feature, table)``); ``assignments[rank][slot]`` is ``(feature index, shard index)``
    or ``None``; ``dp_tables`` are the data-parallel tables, in collection order.
    """

    tables: tuple[BaseEmbeddingConfig, ...]
    plan: ShardingPlan
    num_devices: int
    optimizer_tags: tuple[int, ...]
    optimizers: tuple[Any, ...]
    groups: tuple[LocalGroup, ...]
    shards: tuple[ShardPlacement, ...]
    slots: tuple[Slot, ...]
    assignments: tuple[tuple[tuple[int, int] | None, ...], ...]
    features: tuple[tuple[str, str], ...]
    dp_tables: tuple[str, ...]

    @classmethod
    def create(
        cls,
        tables: Sequence[BaseEmbeddingConfig],
        plan: ShardingPlan,
        num_devices: int,
        *,
        optimizer: Any = None,
        table_optimizers: dict[str, Any] | None = None,
    ) -> ShardedLayout:
        """Place ``tables`` on ``num_devices`` ranks as ``plan`` says.

        ``optimizer``: the fused sparse optimizer of every table (``None``: plain arrays with
        true gradients); ``table_optimizers``: per-table overrides, as the collections take.
        Raises ``ValueError`` for an invalid table set or plan.
        """
        return _create(
            tuple(tables),
            plan if isinstance(plan, ShardingPlan) else ShardingPlan(plan),
            int(num_devices),
            optimizer,
            tuple(sorted((table_optimizers or {}).items())),
        )

    # ---- derived static views ----------------------------------------------------------
    @functools.cached_property
    def single_plan(self) -> LookupPlan:
        """The single-device plan of the collection (its params layout and output columns)."""
        return build_plan(self.tables, self.optimizer_tags)

    @functools.cached_property
    def dp_plan(self) -> LookupPlan | None:
        """The plan of the data-parallel tables (replicated groups), or None."""
        if not self.dp_tables:
            return None
        by_name = {
            t.name: (t, tag) for t, tag in zip(self.tables, self.optimizer_tags, strict=True)
        }
        chosen = [by_name[name] for name in self.dp_tables]
        return build_plan([t for t, _ in chosen], [tag for _, tag in chosen])

    def group_optimizer(self, group: int) -> Any:
        """The fused optimizer (or None) of local group ``group``."""
        return self.optimizers[self.groups[group].optimizer_tag]

    def table(self, name: str) -> BaseEmbeddingConfig:
        return next(t for t in self.tables if t.name == name)

    def shards_of(self, table: str) -> tuple[ShardPlacement, ...]:
        return tuple(s for s in self.shards if s.table == table)

    @property
    def pooled(self) -> bool:
        return self.single_plan.pooled

    def local_key(self, source: int, slot: int) -> str:
        """The owners' lookup key of ``slot`` for bags from ``source``."""
        return f"{source}/{slot}"

    @functools.cached_property
    def local_keys(self) -> tuple[str, ...]:
        """The owners' lookup keys in the order the received ids arrive: source-major."""
        n, k = self.num_devices, len(self.slots)
        return tuple(self.local_key(s, j) for s in range(n) for j in range(k))

    @functools.cached_property
    def local_plan(self) -> LookupPlan | None:
        """The owners' lookup plan: one table per local group, read by its slots."""
        if not self.groups:
            return None
        configs = []
        for g, group in enumerate(self.groups):
            names = [
                self.local_key(s, j)
                for s in range(self.num_devices)
                for j, slot in enumerate(self.slots)
                if slot.group == g
            ]
            common = dict(
                name=group.name,
                embedding_dim=group.dim,
                num_embeddings=group.rows,
                feature_names=names,
                data_type=_DATA_TYPES[group.dtype],
            )
            if group.pooling == "none":
                configs.append(EmbeddingConfig(**common))
            else:
                pooling = PoolingType.MEAN if group.pooling == "mean" else PoolingType.SUM
                configs.append(EmbeddingBagConfig(**common, pooling=pooling))
        return build_plan(configs, [g.optimizer_tag for g in self.groups])


_DATA_TYPES = {
    jnp.dtype(dtype).name: data_type for data_type, dtype in TRAINABLE_DATA_TYPES.items()
}


def _optimizer_tags(tables, optimizer, overrides) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    """A tag per table and the optimizer of each tag (tag 0: ``optimizer``), as the
    collections number them."""
    return optimizer_tags(tables, optimizer, dict(overrides))


@functools.lru_cache(maxsize=64)
def _create(tables, plan, num_devices, optimizer, overrides) -> ShardedLayout:
    tags, optimizers = _optimizer_tags(tables, optimizer, overrides)
    single = build_plan(tables, tags)  # validates the table set
    plan.validate(tables, num_devices)

    group_keys: list[tuple[int, str, str, int]] = []
    used_rows: dict[tuple, list[int]] = {}
    placements: list[ShardPlacement] = []
    dp_tables: list[str] = []
    for table, tag in zip(tables, tags, strict=True):
        sharding = plan[table.name]
        if sharding.sharding_type is ShardingType.DATA_PARALLEL:
            dp_tables.append(table.name)
            continue
        pooling = _pooling_run(table, sharding.sharding_type.splits_rows)
        for index, meta in enumerate(sharding.shards(table, num_devices)):
            cols = meta.shard_sizes[1]
            key = (cols, jnp.dtype(table.dtype).name, pooling, tag)
            if key not in used_rows:
                group_keys.append(key)
                used_rows[key] = [0] * num_devices
            local_row = used_rows[key][meta.placement]
            used_rows[key][meta.placement] += meta.shard_sizes[0]
            placements.append(
                ShardPlacement(
                    table=table.name,
                    index=index,
                    rank=meta.placement,
                    row_offset=meta.shard_offsets[0],
                    num_rows=meta.shard_sizes[0],
                    col_offset=meta.shard_offsets[1],
                    num_cols=cols,
                    group=group_keys.index(key),
                    local_row=local_row,
                )
            )
    groups = tuple(
        LocalGroup(
            name=f"{pooling}_{dtype}_d{cols}" + (f"_o{tag}" if tag else ""),
            dim=cols,
            dtype=dtype,
            pooling=pooling,
            optimizer_tag=tag,
            rows=max(1, max(used_rows[(cols, dtype, pooling, tag)])),
        )
        for cols, dtype, pooling, tag in group_keys
    )

    # Slots: all-to-all slots per group (as many as the busiest rank needs), then one
    # reduce-scatter slot per feature of a row-split table.
    features = tuple((f.name, f.table) for f in single.features)
    per_rank: dict[tuple[int, int], list[tuple[int, int]]] = {}
    reduce_slots: list[tuple[int, str]] = []
    for fi, (_, table_name) in enumerate(features):
        sharding = plan[table_name]
        if sharding.sharding_type is ShardingType.DATA_PARALLEL:
            continue
        if sharding.sharding_type.splits_rows:
            reduce_slots.append((fi, table_name))
            continue
        for shard in (s for s in placements if s.table == table_name):
            per_rank.setdefault((shard.group, shard.rank), []).append((fi, shard.index))
    slots: list[Slot] = []
    table_of_rank: list[list[tuple[int, int] | None]] = [[] for _ in range(num_devices)]
    for g in range(len(groups)):
        width = max((len(per_rank.get((g, r), [])) for r in range(num_devices)), default=0)
        for j in range(width):
            slots.append(Slot(g, reduce=False))
            for r in range(num_devices):
                held = per_rank.get((g, r), [])
                table_of_rank[r].append(held[j] if j < len(held) else None)
    for fi, table_name in reduce_slots:
        shards = [s for s in placements if s.table == table_name]
        slots.append(Slot(shards[0].group, reduce=True))
        by_rank = {s.rank: s.index for s in shards}
        for r in range(num_devices):
            table_of_rank[r].append((fi, by_rank[r]) if r in by_rank else None)
    return ShardedLayout(
        tables=tables,
        plan=plan,
        num_devices=num_devices,
        optimizer_tags=tags,
        optimizers=optimizers,
        groups=groups,
        shards=tuple(placements),
        slots=tuple(slots),
        assignments=tuple(tuple(row) for row in table_of_rank),
        features=features,
        dp_tables=tuple(dp_tables),
    )
