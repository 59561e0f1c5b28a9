"""Static layout of a collection: which tables stack into which group buffer.

Tables that share (dim, dtype, pooling) are stored stacked by rows in one 2-D
buffer per group, as FBGEMM keeps them; a feature maps to (group, row offset)
and, for pooled lookups, to its columns of the [B, sum of dims] output. The
plan is a frozen, hashable dataclass computed once from the configs; arrays
never enter it.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> plan = build_plan([
...     EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
...     EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"]),
...     EmbeddingBagConfig(name="t3", embedding_dim=3, num_embeddings=5, feature_names=["f3"]),
... ])
>>> [(g.name, g.tables, g.num_rows) for g in plan.groups]
[('sum_float32_d3', ('t1', 't3'), 15), ('sum_float32_d4', ('t2',), 10)]
>>> [(f.name, f.group, f.row_offset, f.col_offset) for f in plan.features]
[('f1', 0, 0, 0), ('f2', 1, 0, 3), ('f3', 0, 10, 7)]
>>> [tuple(f) for f in plan.kernel_features(0, ("f3", "f2", "f1"))]
[(2, 0, 10, 0), (0, 10, 5, 7)]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.layout import FeatureLayout

from jaxrec.configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    PoolingType,
    validate_table_set,
)


@dataclass(frozen=True)
class TablePlacement:
    """Where one table lives: rows [row_offset, row_offset + num_rows) of group `group`."""

    name: str
    group: int
    row_offset: int
    num_rows: int
    dim: int


@dataclass(frozen=True)
class FeaturePlacement:
    """One feature (KJT key): its table's placement and, when pooled, its output columns."""

    name: str
    table: str
    group: int
    row_offset: int
    num_rows: int
    dim: int
    col_offset: int


@dataclass(frozen=True)
class GroupLayout:
    """One stacked buffer [num_rows, dim] of `dtype`, looked up with one launch.

    ``optimizer_tag`` tells apart tables that share (pooling, dtype, dim) but are trained by
    different fused optimizers (tag 0: the collection's default).
    """

    name: str
    dim: int
    dtype: str
    pooling: str
    tables: tuple[str, ...]
    num_rows: int
    optimizer_tag: int = 0


@dataclass(frozen=True)
class LookupPlan:
    """The static layout of a collection, in the collection's feature order."""

    tables: tuple[TablePlacement, ...]
    features: tuple[FeaturePlacement, ...]
    groups: tuple[GroupLayout, ...]
    pooled: bool

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def num_columns(self) -> int:
        """Width of the pooled output: the sum of the features' dims."""
        return sum(f.dim for f in self.features)

    def table(self, name: str) -> TablePlacement:
        return self._tables_by_name[name]

    @functools.cached_property
    def _tables_by_name(self) -> dict[str, TablePlacement]:
        return {t.name: t for t in self.tables}

    def kernel_features(self, group: int, kjt_keys: tuple[str, ...]) -> tuple[FeatureLayout, ...]:
        """The kernels' per-feature layout of one group for a KJT with `kjt_keys`.

        One :class:`~jaxrec_kernels.layout.FeatureLayout` ``(kjt_index, row_offset, num_rows,
        col_offset)`` per feature of the group, in the collection's feature order.
        """
        return _kernel_features(self, group, tuple(kjt_keys))


@functools.lru_cache(maxsize=256)
def _kernel_features(
    plan: LookupPlan, group: int, kjt_keys: tuple[str, ...]
) -> tuple[FeatureLayout, ...]:
    index = {key: i for i, key in enumerate(kjt_keys)}
    return tuple(
        FeatureLayout(index[f.name], f.row_offset, f.num_rows, f.col_offset)
        for f in plan.features
        if f.group == group
    )


MAX_GROUP_ROWS = int(np.iinfo(np.int32).max)


def check_group_rows(name: str, num_rows: int, tables: tuple[str, ...]) -> None:
    """Refuse a stacked group of more than ``MAX_GROUP_ROWS`` (2**31 - 1) rows.

    Ids, offsets and stacked row indices are int32 in every kernel (and the fused backward
    uses the row count itself as a sentinel), so a group must be addressable by int32.
    Split such tables over several collections or shard their rows.

    >>> check_group_rows("sum_float32_d4", 2**31, ("big",))
    Traceback (most recent call last):
    ...
    ValueError: table group 'sum_float32_d4' (tables ['big']) has 2147483648 rows; a stacked group holds at most 2147483647 rows (int32 row indices)
    """
    if num_rows > MAX_GROUP_ROWS:
        raise ValueError(
            f"table group {name!r} (tables {list(tables)}) has {num_rows} rows; a stacked "
            f"group holds at most {MAX_GROUP_ROWS} rows (int32 row indices)"
        )


def _pooling_name(table: BaseEmbeddingConfig) -> str:
    if isinstance(table, EmbeddingBagConfig):
        return "mean" if table.pooling is PoolingType.MEAN else "sum"
    return "none"


def _shares_feature(group: Sequence[BaseEmbeddingConfig], table: BaseEmbeddingConfig) -> bool:
    """Whether ``table`` reads a feature that a table of ``group`` reads too."""
    return any(set(t.feature_names) & set(table.feature_names) for t in group)


def optimizer_tags(
    tables: Sequence[BaseEmbeddingConfig],
    optimizer: Any,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    """A tag per table and the optimizer of each tag: tag 0 is ``optimizer``'s, then one
    per distinct override of ``overrides`` (``{table name: optimizer or None}``) in table order.

    Optimizers are compared by value (NamedTuples compare field by field), so copies of one
    optimizer, as Flax makes of module fields, share a tag.

    >>> from jaxrec.configs import EmbeddingBagConfig
    >>> tables = [EmbeddingBagConfig(name=n, embedding_dim=2, num_embeddings=4) for n in "abc"]
    >>> optimizer_tags(tables, "sgd", {"b": "adam", "c": "adam"})
    ((0, 1, 1), ('sgd', 'adam'))
    """
    chosen_by_name = dict(overrides or {})
    unknown = sorted(set(chosen_by_name) - {t.name for t in tables})
    if unknown:
        raise ValueError(f"table_optimizers names unknown tables {unknown}")
    distinct: list[Any] = [optimizer]
    tags = []
    for table in tables:
        chosen = chosen_by_name.get(table.name, optimizer)
        if chosen not in distinct:
            distinct.append(chosen)
        tags.append(distinct.index(chosen))
    return tuple(tags), tuple(distinct)


def build_plan(
    tables: Sequence[BaseEmbeddingConfig], optimizer_tags: Sequence[int] | None = None
) -> LookupPlan:
    """Group `tables` by (pooling, dtype, dim) and place tables, features and columns.

    ``optimizer_tags`` (one int per table) also separates tables trained by different fused
    optimizers. Configs are hashable, so the plan of a table set is computed once.
    """
    tags = tuple(optimizer_tags) if optimizer_tags is not None else (0,) * len(tables)
    if len(tags) != len(tables):
        raise ValueError(f"got {len(tags)} optimizer tags for {len(tables)} tables")
    return _build_plan(tuple(tables), tags)


@functools.lru_cache(maxsize=128)
def _build_plan(tables: tuple[BaseEmbeddingConfig, ...], tags: tuple[int, ...]) -> LookupPlan:
    validate_table_set(tables)
    pooled = isinstance(tables[0], EmbeddingBagConfig)
    if any(isinstance(t, EmbeddingBagConfig) != pooled for t in tables):
        raise ValueError(
            "a collection takes either EmbeddingBagConfigs or EmbeddingConfigs, not both"
        )
    group_keys: list[tuple[str, str, int, int, int]] = []
    members: dict[tuple[str, str, int, int, int], list[BaseEmbeddingConfig]] = {}
    for table, tag in zip(tables, tags, strict=True):
        key = (_pooling_name(table), jnp.dtype(table.dtype).name, table.embedding_dim, tag, 0)
        # A sequence group writes one row per id position, so a feature shared by two of
        # its tables would need two rows there: such a table starts another group.
        while not pooled and key in members and _shares_feature(members[key], table):
            key = (*key[:4], key[4] + 1)
        if key not in members:
            group_keys.append(key)
            members[key] = []
        members[key].append(table)

    groups: list[GroupLayout] = []
    placements: dict[str, TablePlacement] = {}
    for g, key in enumerate(group_keys):
        pooling, dtype, dim, tag, part = key
        row = 0
        for table in members[key]:
            placements[table.name] = TablePlacement(table.name, g, row, table.num_embeddings, dim)
            row += table.num_embeddings
        name = f"{pooling}_{dtype}_d{dim}" + (f"_o{tag}" if tag else "")
        name += f"_p{part}" if part else ""
        check_group_rows(name, row, tuple(t.name for t in members[key]))
        groups.append(
            GroupLayout(
                name=name,
                dim=dim,
                dtype=dtype,
                pooling=pooling,
                tables=tuple(t.name for t in members[key]),
                num_rows=row,
                optimizer_tag=tag,
            )
        )

    features: list[FeaturePlacement] = []
    col = 0
    for table in tables:
        p = placements[table.name]
        for name in table.feature_names:
            features.append(
                FeaturePlacement(name, table.name, p.group, p.row_offset, p.num_rows, p.dim, col)
            )
            col += p.dim if pooled else 0
    return LookupPlan(
        tables=tuple(placements[t.name] for t in tables),
        features=tuple(features),
        groups=tuple(groups),
        pooled=pooled,
    )
