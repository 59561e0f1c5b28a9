"""Where each table's rows and columns sit in a set of row-block arrays, and the copies
that move them from one such set to another.

Every array here is 2-D and split by rows over the ``n`` devices of a mesh axis (device
``r`` holds block ``r``), or replicated (every device holds all of it). A
:class:`Segment` says that rows ``[row_offset, row_offset + num_rows)`` and columns
``[col_offset, col_offset + num_cols)`` of a table sit in ``array``'s block on ``rank``
from local row ``local_row``. Three placements are described this way:

- a single-device collection's stacked groups (:func:`plan_segments`, ``n = 1``);
- a sharded collection (:func:`layout_segments`): local-group blocks and, for
  data-parallel tables, replicated groups (one segment per rank);
- the canonical form (:func:`canonical_segments`): one array per table, its rows split
  evenly over the ranks (``ceil(rows / n)`` per rank, the last ranks padded).

:func:`copies` matches a destination placement with a source placement: for every
destination segment, the pieces of the source that hold the same rows and columns,
preferring a copy on the same rank. Per-row optimizer state (1-D) has one column; the
column shards of a table each hold a copy of it.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel.layout import ShardedLayout
>>> from jaxrec.parallel.types import ShardingPlan, row_wise
>>> t = EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=5, feature_names=["f"])
>>> layout = ShardedLayout.create([t], ShardingPlan({"t": row_wise()}), 2)
>>> src = layout_segments(layout, "weight", per_row=False)
>>> dst = canonical_segments({"t": (5, 2)}, 2, "weight", per_row=False)
>>> [(c.src_rank, c.src_row, c.dst_rank, c.dst_row, c.rows) for c in copies(src, dst)]
[(0, 0, 0, 0, 3), (1, 0, 1, 0, 2)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jaxrec.ops.plan import LookupPlan
from jaxrec.parallel.layout import ShardedLayout

__all__ = [
    "Copy",
    "Segment",
    "canonical_array",
    "canonical_rows",
    "canonical_segments",
    "copies",
    "layout_segments",
    "plan_segments",
]


@dataclass(frozen=True)
class Segment:
    """Rows and columns of ``table`` in ``array`` on ``rank``, from its block's ``local_row``."""

    table: str
    array: str
    rank: int
    local_row: int
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int


@dataclass(frozen=True)
class Copy:
    """``rows x cols`` from ``src`` (block of ``src_rank``) to ``dst`` (block of ``dst_rank``)."""

    src: str
    src_rank: int
    src_row: int
    src_col: int
    dst: str
    dst_rank: int
    dst_row: int
    dst_col: int
    rows: int
    cols: int


def canonical_rows(rows: int, num_devices: int) -> int:
    """Rows per rank of a table's canonical array: ``ceil(rows / num_devices)`` (at least 1)."""
    return max(1, -(-rows // num_devices))


def canonical_array(table: str, leaf: str) -> str:
    """The name of a table's canonical array of ``leaf`` (``weight`` or a state name)."""
    return f"{table}/{leaf}"


def canonical_segments(
    shapes: Mapping[str, tuple[int, int]], num_devices: int, leaf: str, *, per_row: bool
) -> list[Segment]:
    """The canonical form of tables ``{name: (rows, dim)}``: rank ``d`` holds rows
    ``[d * k, (d + 1) * k)`` of each, ``k = canonical_rows(rows, num_devices)``."""
    out = []
    for name, (rows, dim) in shapes.items():
        k = canonical_rows(rows, num_devices)
        for d in range(num_devices):
            lo, hi = d * k, min(rows, (d + 1) * k)
            if hi > lo:
                out.append(
                    Segment(
                        name,
                        canonical_array(name, leaf),
                        d,
                        0,
                        lo,
                        hi - lo,
                        0,
                        1 if per_row else dim,
                    )
                )
    return out


def plan_segments(
    plan: LookupPlan, group_arrays: Mapping[str, str], *, per_row: bool
) -> list[Segment]:
    """A single-device collection's tables in its stacked groups (``group_arrays``: group
    name → array name; groups left out are skipped)."""
    out = []
    for table in plan.tables:
        group = plan.groups[table.group].name
        if group in group_arrays:
            out.append(
                Segment(
                    table.name,
                    group_arrays[group],
                    0,
                    table.row_offset,
                    0,
                    table.num_rows,
                    0,
                    1 if per_row else table.dim,
                )
            )
    return out


def layout_segments(layout: ShardedLayout, leaf: str, *, per_row: bool) -> list[Segment]:
    """A sharded collection's tables: shards in ``shards/<group>/<leaf>`` blocks and
    data-parallel tables in ``replicated/<group>/<leaf>`` on every rank."""
    out = []
    for shard in layout.shards:
        group = layout.groups[shard.group].name
        out.append(
            Segment(
                shard.table,
                f"shards/{group}/{leaf}",
                shard.rank,
                shard.local_row,
                shard.row_offset,
                shard.num_rows,
                0 if per_row else shard.col_offset,
                1 if per_row else shard.num_cols,
            )
        )
    if layout.dp_plan is not None:
        for table in layout.dp_plan.tables:
            group = layout.dp_plan.groups[table.group].name
            for rank in range(layout.num_devices):
                out.append(
                    Segment(
                        table.name,
                        f"replicated/{group}/{leaf}",
                        rank,
                        table.row_offset,
                        0,
                        table.num_rows,
                        0,
                        1 if per_row else table.dim,
                    )
                )
    return out


def copies(sources: Sequence[Segment], destinations: Sequence[Segment]) -> list[Copy]:
    """The copies that fill every destination segment from the sources.

    Sources holding the same rows and columns of a table (replicas, per-row state of
    column shards) are alternatives: the one on the destination's rank is taken, else
    the lowest rank. Raises ``ValueError`` when a destination is not fully covered.
    """
    by_table: dict[str, list[Segment]] = {}
    for s in sources:
        by_table.setdefault(s.table, []).append(s)
    out: list[Copy] = []
    for d in destinations:
        chosen: dict[tuple[int, int, int, int], Segment] = {}
        for s in sorted(by_table.get(d.table, []), key=lambda s: (s.rank != d.rank, s.rank)):
            chosen.setdefault((s.row_offset, s.num_rows, s.col_offset, s.num_cols), s)
        covered = 0
        for s in chosen.values():
            lo = max(s.row_offset, d.row_offset)
            hi = min(s.row_offset + s.num_rows, d.row_offset + d.num_rows)
            clo = max(s.col_offset, d.col_offset)
            chi = min(s.col_offset + s.num_cols, d.col_offset + d.num_cols)
            if hi <= lo or chi <= clo:
                continue
            covered += (hi - lo) * (chi - clo)
            out.append(
                Copy(
                    src=s.array,
                    src_rank=s.rank,
                    src_row=s.local_row + lo - s.row_offset,
                    src_col=clo - s.col_offset,
                    dst=d.array,
                    dst_rank=d.rank,
                    dst_row=d.local_row + lo - d.row_offset,
                    dst_col=clo - d.col_offset,
                    rows=hi - lo,
                    cols=chi - clo,
                )
            )
        if covered != d.num_rows * d.num_cols:
            raise ValueError(
                f"table {d.table!r}: rows {d.row_offset}..{d.row_offset + d.num_rows - 1}, "
                f"columns {d.col_offset}..{d.col_offset + d.num_cols - 1} are not held by the source"
            )
    return out
