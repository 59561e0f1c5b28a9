"""Sharding types and plans: which devices hold which rows and columns of each table.

TorchRec's vocabulary on a 1-D mesh axis of ``N`` devices (a device is a *rank*, its index
on the axis):

- ``TABLE_WISE``: the whole table on one rank.
- ``ROW_WISE``: rows split over every rank; pooled partial sums are reduce-scattered.
- ``COLUMN_WISE``: columns split over ranks (each shard is a whole-row-range table of a
  few columns); the shards' outputs are concatenated. With a row-wise optimizer (row-wise
  Adagrad, partial row-wise Adam/LAMB) each shard keeps its own per-row state, computed
  over its own columns, as TorchRec does: results differ from one device
  (:class:`ShardingType` says how).
- ``TABLE_ROW_WISE``: rows split over a subset of ranks (TorchRec: the ranks of one host).
- ``TABLE_COLUMN_WISE``: columns split over a subset of ranks, each shard placed table-wise.
- ``DATA_PARALLEL``: a replica on every rank; replicas combine their sparse gradients.

A :class:`ParameterSharding` is one table's choice (type, ranks, optional split sizes); its
:meth:`~ParameterSharding.shards` are the table's pieces as :class:`ShardMetadata`
(TorchRec's names: ``shard_offsets`` / ``shard_sizes`` as ``(row, col)``, ``placement`` a
rank). A :class:`ShardingPlan` maps table names to shardings and checks itself against the
tables and the device count. Everything here is frozen and hashable: static metadata.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
>>> [(s.shard_offsets, s.shard_sizes, s.placement) for s in row_wise().shards(t, 4)]
[((0, 0), (3, 8), 0), ((3, 0), (3, 8), 1), ((6, 0), (2, 8), 2), ((8, 0), (2, 8), 3)]
>>> [(s.shard_offsets, s.shard_sizes, s.placement) for s in column_wise([3, 1]).shards(t, 4)]
[((0, 0), (10, 4), 3), ((0, 4), (10, 4), 1)]
>>> plan = ShardingPlan({"t": table_wise(2)})
>>> plan.validate([t], num_devices=2)
Traceback (most recent call last):
...
ValueError: table 't': table_wise rank 2 is outside the 2 devices of the mesh axis (ranks 0..1)
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from jaxrec.configs import BaseEmbeddingConfig

__all__ = [
    "ParameterSharding",
    "ShardMetadata",
    "ShardingPlan",
    "ShardingType",
    "column_wise",
    "data_parallel",
    "row_wise",
    "table_column_wise",
    "table_row_wise",
    "table_wise",
]


class ShardingType(enum.StrEnum):
    """How a table is split across the devices of a mesh axis (TorchRec's values).

    ``COLUMN_WISE`` and ``TABLE_COLUMN_WISE`` with a row-wise optimizer: as TorchRec, each
    column shard keeps per-shard row-wise state, so results differ from one device. Row-wise
    Adagrad on a shard of columns ``C`` accumulates ``s += mean(g[C] ** 2)`` and updates
    ``w[C] -= lr * g[C] / (sqrt(s) + eps)``, where one device uses the mean over all columns.
    Every rule that reduces over a row does so over the shard's columns (LAMB's and LARS's
    trust ratios, ``max_norm``). Element-wise rules (SGD, Adagrad, Adam) and plain tables
    are unaffected: sharded numerics equal one device's.
    """

    DATA_PARALLEL = "data_parallel"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    TABLE_COLUMN_WISE = "table_column_wise"

    @property
    def splits_rows(self) -> bool:
        """Whether the table's rows are split (pooled partial sums must be added)."""
        return self in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)

    @property
    def splits_columns(self) -> bool:
        """Whether the table's columns are split (shard outputs are concatenated)."""
        return self in (ShardingType.COLUMN_WISE, ShardingType.TABLE_COLUMN_WISE)


@dataclass(frozen=True)
class ShardMetadata:
    """One piece of a table: rows ``[r, r + rows)`` and columns ``[c, c + cols)`` on a rank.

    ``shard_offsets = (r, c)``, ``shard_sizes = (rows, cols)``, ``placement``: the rank.
    """

    shard_offsets: tuple[int, int]
    shard_sizes: tuple[int, int]
    placement: int


def _even_split(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` sizes differing by at most one, larger first."""
    base, extra = divmod(total, parts)
    return tuple(base + (k < extra) for k in range(parts))


@dataclass(frozen=True)
class ParameterSharding:
    """One table's sharding: its type, the ranks holding it and optional split sizes.

    Attributes:
      sharding_type: a :class:`ShardingType`.
      ranks: the ranks of the shards, in shard order (empty for ``DATA_PARALLEL``; every
        rank of the axis for ``ROW_WISE`` when left empty). Row-split tables need distinct
        ranks; column shards may share a rank.
      sizes: rows per shard (row-split types) or columns per shard (column-split types),
        summing to the table's rows or dim; default: as even as possible, larger first.
    """

    sharding_type: ShardingType
    ranks: tuple[int, ...] = ()
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sharding_type", ShardingType(self.sharding_type))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))

    def resolved_ranks(self, num_devices: int) -> tuple[int, ...]:
        """The ranks of the shards on an axis of ``num_devices`` (ROW_WISE: all by default)."""
        if self.sharding_type is ShardingType.ROW_WISE and not self.ranks:
            return tuple(range(num_devices))
        return self.ranks

    def shards(self, table: BaseEmbeddingConfig, num_devices: int) -> tuple[ShardMetadata, ...]:
        """The table's pieces on an axis of ``num_devices`` (empty for ``DATA_PARALLEL``).

        Raises ``ValueError`` naming the table when the sharding cannot hold it.
        """
        kind = self.sharding_type
        label = f"table {table.name!r}: {kind.value}"
        ranks = self.resolved_ranks(num_devices)
        for rank in ranks:
            if not 0 <= rank < num_devices:
                raise ValueError(
                    f"{label} rank {rank} is outside the {num_devices} devices of the mesh axis "
                    f"(ranks 0..{num_devices - 1})"
                )
        rows, dim = table.num_embeddings, table.embedding_dim
        if kind is ShardingType.DATA_PARALLEL:
            if ranks or self.sizes is not None:
                raise ValueError(f"{label} takes no ranks or sizes (a replica on every rank)")
            return ()
        if kind is ShardingType.TABLE_WISE:
            if len(ranks) != 1 or self.sizes is not None:
                raise ValueError(f"{label} needs exactly one rank and no sizes, got {ranks}")
            return (ShardMetadata((0, 0), (rows, dim), ranks[0]),)
        if not ranks:
            raise ValueError(f"{label} needs at least one rank")
        total, what = (rows, "rows") if kind.splits_rows else (dim, "columns")
        if kind.splits_rows and len(set(ranks)) != len(ranks):
            raise ValueError(
                f"{label} ranks {list(ranks)} repeat a rank; a rank holds one row range"
            )
        sizes = self.sizes if self.sizes is not None else _even_split(total, len(ranks))
        if len(sizes) != len(ranks):
            raise ValueError(f"{label} has {len(sizes)} sizes for {len(ranks)} ranks")
        if sum(sizes) != total or min(sizes) < 1:
            raise ValueError(
                f"{label} sizes {list(sizes)} must be positive and sum to the table's {total} "
                f"{what}" + (f" (fewer {what} than ranks)" if total < len(ranks) else "")
            )
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        if kind.splits_rows:
            return tuple(
                ShardMetadata((s, 0), (n, dim), r)
                for s, n, r in zip(starts, sizes, ranks, strict=True)
            )
        return tuple(
            ShardMetadata((0, s), (rows, n), r)
            for s, n, r in zip(starts, sizes, ranks, strict=True)
        )


def table_wise(rank: int) -> ParameterSharding:
    """The whole table on ``rank``."""
    return ParameterSharding(ShardingType.TABLE_WISE, (rank,))


def row_wise(ranks: Sequence[int] = (), sizes: Sequence[int] | None = None) -> ParameterSharding:
    """Rows split over ``ranks`` (default: every rank), ``sizes`` rows each (default: even)."""
    return ParameterSharding(ShardingType.ROW_WISE, tuple(ranks), _opt(sizes))


def column_wise(ranks: Sequence[int], sizes: Sequence[int] | None = None) -> ParameterSharding:
    """Columns split over ``ranks``, ``sizes`` columns each (default: even)."""
    return ParameterSharding(ShardingType.COLUMN_WISE, tuple(ranks), _opt(sizes))


def table_row_wise(ranks: Sequence[int], sizes: Sequence[int] | None = None) -> ParameterSharding:
    """Rows split over a subset of ranks (TorchRec: the devices of one host)."""
    return ParameterSharding(ShardingType.TABLE_ROW_WISE, tuple(ranks), _opt(sizes))


def table_column_wise(
    ranks: Sequence[int], sizes: Sequence[int] | None = None
) -> ParameterSharding:
    """Columns split into shards, each placed table-wise on its rank."""
    return ParameterSharding(ShardingType.TABLE_COLUMN_WISE, tuple(ranks), _opt(sizes))


def data_parallel() -> ParameterSharding:
    """A replica of the table on every rank."""
    return ParameterSharding(ShardingType.DATA_PARALLEL)


def _opt(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if sizes is None else tuple(sizes)


class ShardingPlan(Mapping[str, ParameterSharding]):
    """Table name → :class:`ParameterSharding` for one collection (frozen, hashable).

    >>> plan = ShardingPlan({"a": table_wise(0), "b": data_parallel()})
    >>> plan["a"].sharding_type.value, len(plan), hash(plan) == hash(ShardingPlan(dict(plan)))
    ('table_wise', 2, True)
    """

    def __init__(self, plan: Mapping[str, ParameterSharding]) -> None:
        items = []
        for name, sharding in plan.items():
            if not isinstance(sharding, ParameterSharding):
                raise ValueError(
                    f"table {name!r}: expected a ParameterSharding, got {type(sharding).__name__}"
                )
            items.append((str(name), sharding))
        self._items = tuple(sorted(items, key=lambda item: item[0]))
        self._dict = dict(self._items)

    def __getitem__(self, name: str) -> ParameterSharding:
        return self._dict[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardingPlan) and self._items == other._items

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {s.sharding_type.value}{list(s.ranks)}" for n, s in self._items)
        return f"ShardingPlan({{{inner}}})"

    def validate(self, tables: Sequence[BaseEmbeddingConfig], num_devices: int) -> None:
        """Check that every table has a sharding, no other name does, and each fits.

        Raises ``ValueError`` naming the table and what is wrong.
        """
        if num_devices < 1:
            raise ValueError(f"num_devices must be at least 1, got {num_devices}")
        names = [t.name for t in tables]
        missing = [n for n in names if n not in self._dict]
        unknown = sorted(set(self._dict) - set(names))
        if missing or unknown:
            raise ValueError(
                f"sharding plan does not match the tables: tables without a sharding {missing}, "
                f"shardings of unknown tables {unknown}"
            )
        for table in tables:
            self._dict[table.name].shards(table, num_devices)
