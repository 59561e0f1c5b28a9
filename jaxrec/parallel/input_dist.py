"""Input distribution: every id to the device that owns its table, rows or columns.

The sender checks each id against its global table, routes it to its shard (row-split
tables: bucketized by row range; column shards: one copy per shard), rewrites it to the
owner's local row, and gathers them into one capacity-padded buffer per destination
(:func:`route`), without a sort: the KJT is feature-major, so a whole-row shard reads one
contiguous feature range, and a row shard's ids are a stable partition of its feature's
range (a cumulative sum of the range's mask). After ``jax.lax.all_to_all`` of lengths and ids, the owner packs the
per-source buffers into one KJT whose features are (source device, slot) pairs
(:func:`compact`). Everything static (which shard holds what) is numpy, computed once.

**Capacities.** ``all_to_all`` moves equal static buffers, one per destination. The exact
bound on what one source sends one destination is the local capacity times the most
shards of one table on a device (:func:`send_capacity`): every id of the batch could
belong to a feature that destination owns. It never drops an id, and it moves (and makes
the owner look up) ``N`` times the local capacity, mostly padding. A KJT carries one
capacity for all its features, not one per feature, so nothing tighter is exact. The
tighter choice is the user's: ``ids_per_destination`` (the ids one source may send one
destination per step), e.g. :func:`destination_capacity` from the expected ids per bag of
each feature (what the planner's pooling factors say) with headroom. Ids past it are
dropped from their bags (the bag keeps the ids that fit) and counted with the bad ids: a
WARNING lookup reports them, a FATAL one raises. The send buffers then hold what the
destinations receive, not capacity x shards.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel.types import ShardingPlan, row_wise, table_wise
>>> tables = [
...     EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=100, feature_names=["fa"]),
...     EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=6, feature_names=["fb"]),
... ]
>>> layout = ShardedLayout.create(tables, ShardingPlan({"a": row_wise(), "b": table_wise(1)}), 2)
>>> expected_ids_per_destination(layout, {"fa": 20.0, "fb": 1.0}, batch_size=1000).tolist()
[10000.0, 11000.0]
>>> destination_capacity(layout, {"fa": 20.0, "fb": 1.0}, batch_size=1000, headroom=1.1)
12160
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.parallel.layout import ShardedLayout

__all__ = [
    "bags_of_positions",
    "compact",
    "destination_capacity",
    "expected_ids_per_destination",
    "route",
    "routing_tables",
    "send_capacity",
    "slot_sources",
]


@functools.lru_cache(maxsize=64)
def routing_tables(layout: ShardedLayout, kjt_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per KJT feature and shard index: where its ids go (numpy, static).

    ``copies [F]`` shards reading every id (column-split: one per shard; 0: not sent),
    ``row_split [F]``, ``row_starts [F, S]`` (padded with int32 max), ``dest [F, S]``
    (rank * slots + slot), ``shift [F, S]`` (local row - global row), ``col_offset`` and
    ``num_cols [F, S]`` (the shard's columns), ``rows [F]`` (the table's), ``counted [F]``
    (whether the sender counts its bad ids: not for data-parallel tables).
    """
    num_slots = len(layout.slots)
    width = max([len(layout.shards_of(t.name)) for t in layout.tables] + [1])
    big = np.iinfo(np.int32).max
    f_count = len(kjt_keys)
    out = {
        "copies": np.zeros(f_count, np.int32),
        "row_split": np.zeros(f_count, bool),
        "row_starts": np.full((f_count, width), big, np.int32),
        "dest": np.zeros((f_count, width), np.int32),
        "shift": np.zeros((f_count, width), np.int32),
        "rows": np.zeros(f_count, np.int32),
        "counted": np.zeros(f_count, bool),
        "col_offset": np.zeros((f_count, width), np.int32),
        "num_cols": np.zeros((f_count, width), np.int32),
    }
    where = {}
    for rank, row in enumerate(layout.assignments):
        for slot, held in enumerate(row):
            if held is not None:
                where[held] = rank * num_slots + slot
    for fi, (feature, table_name) in enumerate(layout.features):
        k = kjt_keys.index(feature)
        sharding = layout.plan[table_name]
        out["rows"][k] = layout.table(table_name).num_embeddings
        shards = layout.shards_of(table_name)
        if not shards:  # data parallel: looked up in place
            continue
        out["counted"][k] = True
        split = sharding.sharding_type.splits_rows
        out["row_split"][k] = split
        out["copies"][k] = 1 if split else len(shards)
        for shard in shards:
            out["row_starts"][k, shard.index] = shard.row_offset if split else 0
            out["dest"][k, shard.index] = where[(fi, shard.index)]
            out["shift"][k, shard.index] = shard.local_row - shard.row_offset
            out["col_offset"][k, shard.index] = shard.col_offset
            out["num_cols"][k, shard.index] = shard.num_cols
    return out


@functools.lru_cache(maxsize=64)
def send_capacity(layout: ShardedLayout) -> int:
    """Ids sent to one device, per id of the local KJT: the most shards of one table a
    device holds (column shards may share a device; row shards never do)."""
    counts = [1]
    for t in layout.tables:
        ranks = [s.rank for s in layout.shards_of(t.name)]
        counts += [ranks.count(r) for r in set(ranks)]
    return max(counts)


def expected_ids_per_destination(
    layout: ShardedLayout, pooling_factors: Mapping[str, float], batch_size: int
) -> np.ndarray:
    """Ids one source sends each rank per step, expected: ``batch_size`` bags of every
    feature times its ids per bag (``pooling_factors``: feature name → mean ids per bag),
    a row shard taking its rows' share (ids taken as uniform over the rows), every column
    shard a copy. Data-parallel tables send nothing. Returns ``[num_devices]`` floats."""
    features = dict(layout.features)
    unknown = sorted(set(pooling_factors) - set(features))
    missing = sorted(
        f for f, t in features.items() if layout.shards_of(t) and f not in pooling_factors
    )
    if unknown or missing:
        raise ValueError(
            f"pooling_factors name unknown features {unknown} and miss sharded features "
            f"{missing}; give one mean ids-per-bag for every feature of the layout"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = np.zeros(layout.num_devices)
    for feature, table_name in layout.features:
        shards = layout.shards_of(table_name)
        if not shards:
            continue
        p = float(pooling_factors[feature])
        if not (np.isfinite(p) and p >= 0):
            raise ValueError(f"feature {feature!r}: pooling factor must be >= 0, got {p}")
        rows = layout.table(table_name).num_embeddings
        split = layout.plan[table_name].sharding_type.splits_rows
        for shard in shards:
            out[shard.rank] += batch_size * p * (shard.num_rows / rows if split else 1.0)
    return out


def destination_capacity(
    layout: ShardedLayout,
    pooling_factors: Mapping[str, float],
    batch_size: int,
    *,
    headroom: float = 1.1,
) -> int:
    """``ids_per_destination`` for a :class:`~jaxrec.parallel.ShardedLookupSpec`: the most
    ids one source is expected to send one rank (:func:`expected_ids_per_destination`)
    times ``headroom``, rounded up to a multiple of 128 (at least 128)."""
    if not headroom >= 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    most = float(expected_ids_per_destination(layout, pooling_factors, batch_size).max())
    return max(128, 128 * math.ceil(most * headroom / 128))


def bags_of_positions(offsets: jax.Array, capacity: int):
    """For every position of the values: its bag (flat ``f * B + b``) and whether it is real."""
    positions = jnp.arange(capacity, dtype=jnp.int32)
    bags = jnp.searchsorted(offsets[1:], positions, side="right").astype(jnp.int32)
    return bags, positions < offsets[-1]


@functools.lru_cache(maxsize=64)
def slot_sources(layout: ShardedLayout, kjt_keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per destination rank and slot: what it reads of the local KJT (numpy, static).

    ``feature [n, slots]`` (the KJT feature; -1: an empty slot), ``shard [n, slots]`` (the
    shard index), ``row_split [n, slots]``, ``shift [n, slots]`` (local row - global row).
    """
    routes = routing_tables(layout, kjt_keys)
    n, num_slots = layout.num_devices, len(layout.slots)
    out = {
        "feature": np.full((n, num_slots), -1, np.int32),
        "shard": np.zeros((n, num_slots), np.int32),
        "row_split": np.zeros((n, num_slots), bool),
        "shift": np.zeros((n, num_slots), np.int32),
    }
    for k in range(len(kjt_keys)):
        for i in range(int(routes["copies"][k]) if not routes["row_split"][k] else 0):
            _fill_slot(out, routes, k, i, num_slots)
        if routes["row_split"][k]:
            for i in range(routes["row_starts"].shape[1]):
                if routes["row_starts"][k, i] != np.iinfo(np.int32).max:
                    _fill_slot(out, routes, k, i, num_slots)
    return out


def _fill_slot(out, routes, k, i, num_slots) -> None:
    rank, slot = divmod(int(routes["dest"][k, i]), num_slots)
    out["feature"][rank, slot] = k
    out["shard"][rank, slot] = i
    out["row_split"][rank, slot] = routes["row_split"][k]
    out["shift"][rank, slot] = routes["shift"][k, i]


def route(
    layout: ShardedLayout,
    kjt_keys: tuple[str, ...],
    batch: int,
    ids,
    offsets,
    weights,
    ids_per_destination: int | None = None,
):
    """Sender side: per destination, the lengths ``[n, slots, B]`` and padded ids (and
    weights) ``[n, cap]``, this device's count of ids outside their tables, its count of
    ids past ``cap`` (dropped), and for every buffer entry the local position it holds, the
    shard it goes to and whether it is real.

    No sort: the KJT is feature-major, so a table-wise or column shard's slot reads one
    contiguous feature range (its start from ``offsets``); a row shard's slot reads the ids
    of its row range in order, a stable partition computed with a cumulative sum of the
    range's mask (per-bag counts: differences of that sum at the bag offsets). Each
    destination's buffer is one gather: entry ``q`` of rank ``r`` lies in the slot whose
    run (from the per-slot totals) holds it.

    ``cap``: ``ids_per_destination`` where given (at most the exact bound), else the exact
    bound ``capacity * send_capacity(layout)`` (see the module docstring)."""
    routes = routing_tables(layout, kjt_keys)
    slots = slot_sources(layout, kjt_keys)
    n, num_slots = slots["feature"].shape
    f_count, capacity = len(kjt_keys), ids.shape[0]
    cap = capacity * send_capacity(layout)
    if ids_per_destination is not None:
        cap = min(cap, int(ids_per_destination))
    offsets = offsets.astype(jnp.int32)
    positions = jnp.arange(capacity, dtype=jnp.int32)
    feature_starts = offsets[::batch][: f_count + 1]  # [F + 1]: where each feature begins
    kjt = jnp.clip(jnp.searchsorted(feature_starts, positions, side="right") - 1, 0, f_count - 1)
    live = positions < offsets[-1]
    bad = live & ((ids < 0) | (ids >= jnp.asarray(routes["rows"])[kjt]))
    bad_count = jnp.sum(bad & jnp.asarray(routes["counted"])[kjt]).astype(jnp.int32)

    feature = np.maximum(slots["feature"], 0)  # [n, slots]
    used = slots["feature"] >= 0
    bag_lengths = (offsets[1:] - offsets[:-1]).reshape(f_count, batch)
    lengths = jnp.where(used[..., None], bag_lengths[feature], 0)  # [n, slots, B]
    any_split = bool(slots["row_split"].any())
    if any_split:
        # row shards: the ids of shard i of a row-split feature, counted in position order
        row_starts = jnp.asarray(routes["row_starts"])[kjt]  # [capacity, S]
        bucket = jnp.sum(ids[:, None] >= row_starts, axis=1) - 1
        split = live & ~bad & jnp.asarray(routes["row_split"])[kjt]
        width = routes["row_starts"].shape[1]
        masks = split[None, :] & (bucket[None, :] == jnp.arange(width)[:, None])
        counts = jnp.cumsum(masks.astype(jnp.int32), axis=1)
        counts = jnp.pad(counts, ((0, 0), (1, 0)))  # [S, capacity + 1]: ids before a position
        bag_at = feature[..., None] * batch + jnp.arange(batch)[None, None, :]
        shard = jnp.asarray(slots["shard"])[..., None]
        split_lengths = counts[shard, offsets[bag_at + 1]] - counts[shard, offsets[bag_at]]
        lengths = jnp.where(slots["row_split"][..., None], split_lengths, lengths)
    # ids past ``cap`` are the tail of a destination's run: they leave their bags
    flat = lengths.reshape(n, num_slots * batch)
    bag_starts = jnp.cumsum(flat, axis=1) - flat
    kept = jnp.clip(cap - bag_starts, 0, flat)
    overflow = jnp.sum(flat - kept).astype(jnp.int32)
    slot_totals = lengths.sum(axis=2)  # [n, slots], before truncation
    slot_ends = jnp.cumsum(slot_totals, axis=1)
    slot_starts = slot_ends - slot_totals
    q = jnp.arange(cap, dtype=jnp.int32)
    slot_of = jax.vmap(lambda ends: jnp.searchsorted(ends, q, side="right"))(slot_ends)
    slot_of = jnp.minimum(slot_of, num_slots - 1)  # [n, cap]
    real = q[None, :] < slot_ends[:, -1:]
    ranks = jnp.arange(n)[:, None]
    within = q[None, :] - slot_starts[ranks, slot_of]
    source = feature_starts[jnp.asarray(feature)[ranks, slot_of]] + within
    if any_split:
        # a row-split id's place in its destination buffer, inverted by one scatter
        dest = jnp.asarray(routes["dest"])[kjt, jnp.clip(bucket, 0, width - 1)]
        rank, slot = dest // num_slots, dest % num_slots
        rank_in_slot = (
            counts[jnp.clip(bucket, 0, width - 1), positions]
            - counts[jnp.clip(bucket, 0, width - 1), feature_starts[kjt]]
        )
        place = slot_starts[rank, slot] + rank_in_slot
        # unsent positions get distinct out-of-range targets (dropped): indices stay unique
        target = jnp.where(split & (place < cap), rank * cap + place, n * cap + positions)
        inverse = (
            jnp.zeros(n * cap, jnp.int32)
            .at[target]
            .set(positions, mode="drop", unique_indices=True)
        )
        split_slot = jnp.asarray(slots["row_split"])[ranks, slot_of]
        source = jnp.where(split_slot, inverse.reshape(n, cap), source)
    source = jnp.clip(source, 0, capacity - 1)
    shift = jnp.asarray(slots["shift"])[ranks, slot_of]
    out_ids = jnp.where(real, jnp.where(bad[source], -1, ids[source] + shift), 0)
    out_weights = None
    if weights is not None:
        out_weights = jnp.where(real, weights[source], 0).astype(weights.dtype)
    entries = (source, jnp.asarray(slots["shard"])[ranks, slot_of], real)
    return kept.reshape(n, num_slots, batch), out_ids, out_weights, bad_count, overflow, entries


def compact(lengths, ids, weights):
    """Receiver side: the per-source padded buffers as one KJT (features source-major)."""
    n, cap = ids.shape
    totals = lengths.reshape(n, -1).sum(axis=1)
    ends = jnp.cumsum(totals)
    q = jnp.arange(n * cap, dtype=jnp.int32)
    source = jnp.minimum(jnp.searchsorted(ends, q, side="right"), n - 1)
    within = jnp.clip(q - (ends[source] - totals[source]), 0, cap - 1)
    real = q < ends[-1]
    values = jnp.where(real, ids[source, within], 0)
    out_weights = None if weights is None else jnp.where(real, weights[source, within], 0)
    flat = lengths.reshape(-1)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(flat).astype(jnp.int32)])
    return values, offsets, out_weights
