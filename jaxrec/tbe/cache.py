"""The set-associative HBM cache of a host-backed table group: tags, replacement, metrics.

A cached group keeps its rows in host memory (:mod:`jaxrec.tbe.host_table`) and
``sets * ways`` of them in a device buffer (the cache; slot ``s * ways + w`` is way ``w``
of set ``s``). Row ``r`` of the group may only live in set ``hash(r) % sets``. This module
holds the cache's metadata as a device pytree (:class:`CacheState`) and the jitted step
that maps one batch onto the cache (:func:`assign`):

1. the batch's ids become group rows (``row_offset + id``); ids outside their table, padding
   and features of other groups take no part;
2. each unique row looks for its tag in its set: a hit keeps its slot;
3. each missing row takes a victim way of its set. Victims are, in this order, empty ways,
   then the least recently used way (LRU: the batch counter at its last use) or the least
   frequently used one (LFU: how many times its row was read, counted per row over the
   whole run, as FBGEMM's LFU state). A way holding a row of this batch or a *locked* slot
   (the previous batch's, still in flight in a pipeline) is never a victim; ties go to the
   lower way. When a set has more missing rows than free ways, the batch cannot be cached:
   :func:`assign` counts the overflow and the caller refuses the batch
   (:meth:`jaxrec.tbe.CachedTBE.prefetch` raises before anything changes);
4. the batch's positions are rewritten to slot ids (``-1`` for bad ids, which every kernel
   skips and the bounds check counts exactly as it counts them in a device table).

Everything has a fixed shape (the capacity of ``indices``), so one compilation serves
every batch. Misses come out compacted at the front of ``miss_rows`` / ``miss_slots``, and evictions
at the front of ``evict_rows`` / ``evict_slots``, so the host moves only ``num_misses``
rows in and ``num_evictions`` rows out.

>>> import jax.numpy as jnp
>>> layout = CacheLayout(num_rows=10, sets=1, ways=2, features=((0, 0, 10),),
...                      table_offsets=(0,), algorithm="lru")
>>> state = layout.init()
>>> ids, offsets = jnp.array([7, 3, 7], jnp.int32), jnp.array([0, 2, 3], jnp.int32)
>>> state, out = assign(layout, state, ids, offsets, jnp.full((3,), -1), batch_size=2)
>>> out.slots.tolist(), int(out.num_misses), out.miss_rows[:2].tolist()
([1, 0, 1], 2, [3, 7])
>>> state.tags.tolist()
[[3, 7]]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.pooled_lookup import position_bags

__all__ = ["METRICS", "CacheLayout", "CacheState", "Assignment", "assign"]

METRICS = ("hits", "misses", "evictions", "unique_rows")
_BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static layout of one group's cache (hashable: a jit static argument).

    Attributes:
      num_rows: rows of the group (host-backed).
      sets, ways: the cache holds ``sets * ways`` rows; row ``r`` lives in set
        ``hash(r) % sets``.
      features: one ``(kjt_feature_index, row_offset, num_rows)`` per feature of the group.
      table_offsets: first group row of each table of the group (ascending), for the
        per-table metrics.
      algorithm: ``"lru"`` or ``"lfu"``.
    """

    num_rows: int
    sets: int
    ways: int
    features: tuple[tuple[int, int, int], ...]
    table_offsets: tuple[int, ...]
    algorithm: str = "lru"

    def __post_init__(self) -> None:
        if self.algorithm not in ("lru", "lfu"):
            raise ValueError(f"cache algorithm must be 'lru' or 'lfu', got {self.algorithm!r}")
        if self.sets < 1 or self.ways < 1:
            raise ValueError(f"a cache needs sets >= 1 and ways >= 1, got {self.sets}, {self.ways}")

    @property
    def slots(self) -> int:
        """Rows the cache holds: ``sets * ways``."""
        return self.sets * self.ways

    def init(self) -> CacheState:
        """An empty cache: every tag ``-1``, zero stamps, counts and metrics."""
        tables = len(self.table_offsets)
        zeros = jnp.zeros((tables, len(METRICS)), jnp.int32)
        counts = self.num_rows if self.algorithm == "lfu" else 0
        return CacheState(
            tags=jnp.full((self.sets, self.ways), -1, jnp.int32),
            stamps=jnp.zeros((self.sets, self.ways), jnp.int32),
            counts=jnp.zeros((counts,), jnp.int32),
            clock=jnp.zeros((), jnp.int32),
            totals=zeros,
            last=zeros,
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tags", "stamps", "counts", "clock", "totals", "last"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class CacheState:
    """Device metadata of one group's cache.

    Attributes:
      tags: ``[sets, ways]`` int32, the group row held by each slot (``-1``: empty).
      stamps: ``[sets, ways]`` int32, the batch counter at each slot's last use (LRU).
      counts: ``[num_rows]`` int32 reads per row over the run (LFU; empty under LRU).
      clock: int32 batches assigned so far.
      totals: ``[tables, 4]`` int32 cumulative hits, misses, evictions and unique rows
        (:data:`METRICS`) per table of the group; ``last``: the same for the last batch.
    """

    tags: jax.Array
    stamps: jax.Array
    counts: jax.Array
    clock: jax.Array
    totals: jax.Array
    last: jax.Array


class Assignment(NamedTuple):
    """What :func:`assign` tells the host and the lookup about one batch."""

    slots: jax.Array  # [N] slot of each position of this group (-1: bad id), else -1
    in_group: jax.Array  # [N] bool: the position is a real id of a feature of this group
    miss_rows: jax.Array  # [N] group rows to load, compacted (-1 past num_misses)
    miss_slots: jax.Array  # [N] their slots
    evict_rows: jax.Array  # [N] rows leaving the cache (they held a miss slot), compacted
    evict_slots: jax.Array  # [N] their slots (-1 past num_evictions), to write back
    num_misses: jax.Array  # int32
    num_evictions: jax.Array  # int32
    overflow: jax.Array  # int32: missing rows that found no free way in their set
    worst_set: jax.Array  # int32: a set that overflowed (0 if none)


def set_of(rows: jax.Array, sets: int) -> jax.Array:
    """The set of each group row: MurmurHash3's 32-bit finalizer, modulo ``sets``.

    >>> set_of(jnp.array([0, 1, 2]), 1).tolist()
    [0, 0, 0]
    """
    h = rows.astype(jnp.uint32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h % jnp.uint32(sets)).astype(jnp.int32)


def _group_rows(layout: CacheLayout, ids, offsets, batch_size):
    """Per position: (group row or ``num_rows``, real id of this group, any position of it)."""
    n = ids.shape[0]
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, n)
    kjt = jnp.clip(bags // batch_size, 0, num_kjt - 1)
    table = np.zeros((num_kjt, 3), np.int32)  # (member, row_offset, num_rows)
    for k, row_offset, rows in layout.features:
        table[k] = (1, row_offset, rows)
    entry = jnp.asarray(table)[kjt]
    member = live & (entry[:, 0] == 1)
    valid = member & (ids >= 0) & (ids < entry[:, 2])
    rows = jnp.where(valid, entry[:, 1] + ids, layout.num_rows)
    return rows, valid, member


def scatter_index(index: jax.Array, keep: jax.Array, size: int) -> jax.Array:
    """``index`` where ``keep``, else a distinct out-of-range index ``size + i``.

    Scatter targets for ``mode="drop"``: dropped entries land on distinct addresses past
    the end rather than on one shared index (on a GPU, millions of updates of one address
    serialize), so a scatter whose kept indices are distinct may say ``unique_indices``.

    >>> scatter_index(jnp.array([4, 1, 2, 0]), jnp.array([True, False, True, False]), 5).tolist()
    [4, 6, 2, 8]
    """
    n = index.shape[0]
    if size + n > _BIG:
        raise ValueError(f"scatter_index: size {size} + {n} entries overflows int32")
    return jnp.where(keep, index, size + jnp.arange(n, dtype=index.dtype))


def _run_heads(sorted_keys: jax.Array) -> jax.Array:
    """True at the first element of each run of equal values of a sorted array."""
    first = jnp.ones((min(1, sorted_keys.shape[0]),), bool)
    return jnp.concatenate([first, sorted_keys[1:] != sorted_keys[:-1]])


def sorted_unique(rows: jax.Array, fill: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.unique(rows, size=n, fill_value=fill, return_inverse=True)`` plus run lengths.

    One stable sort and scatters onto distinct indices only (``jnp.unique``'s fixed-size
    path bins every duplicate onto one counter). Returns ``(uniq, inverse, runs)``:
    ``runs[k]`` is how many times ``uniq[k]`` occurs (0 for the fill).

    >>> u, inv, runs = sorted_unique(jnp.array([5, 2, 5, 9]), fill=-1)
    >>> u.tolist(), inv.tolist(), runs.tolist()
    ([2, 5, 9, -1], [1, 0, 1, 2], [1, 2, 1, 0])
    """
    n = rows.shape[0]
    pos = jnp.arange(n, dtype=jnp.int32)
    sorted_rows, perm = jax.lax.sort((rows, pos), num_keys=1, is_stable=True)
    head = _run_heads(sorted_rows)
    group = jnp.cumsum(head.astype(jnp.int32)) - 1
    at = scatter_index(group, head, n)
    uniq = (
        jnp.full((n,), fill, rows.dtype).at[at].set(sorted_rows, mode="drop", unique_indices=True)
    )
    starts = jnp.full((n + 1,), n, jnp.int32).at[at].set(pos, mode="drop", unique_indices=True)
    inverse = jnp.zeros((n,), jnp.int32).at[perm].set(group, unique_indices=True)
    return uniq, inverse, starts[1:] - starts[:-1]


def _metrics(layout: CacheLayout, uniq, hit, miss, evicting, real):
    """Per table of the group: hits, misses, evictions and unique rows of this batch.

    ``uniq`` is sorted, so each table's rows form one run: a table's counts are the
    difference of the running sums at its run's ends. (No scatter-add of N updates onto a
    handful of counters, which serializes on a GPU, and no integer matrix product, which
    XLA's GPU backend runs as a slow loop: 67 ms for 2.6M positions on an H200.)
    """
    columns = jnp.stack([hit, miss, evicting, real], axis=1).astype(jnp.int32)  # [N, 4]
    running = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.cumsum(columns, axis=0)])
    starts = jnp.searchsorted(uniq, jnp.asarray(layout.table_offsets, uniq.dtype), side="left")
    ends = jnp.concatenate([starts[1:], jnp.full((1,), uniq.shape[0], starts.dtype)])
    return running[ends] - running[starts]


@functools.partial(jax.jit, static_argnames=("layout", "batch_size"))
def assign(
    layout: CacheLayout,
    state: CacheState,
    ids: jax.Array,
    offsets: jax.Array,
    locked: jax.Array,
    *,
    batch_size: int,
) -> tuple[CacheState, Assignment]:
    """Map one batch onto the cache (module docstring); returns the new state and the plan.

    ``ids [N]`` and ``offsets [F * B + 1]`` are the batch as the lookup reads it (after
    :func:`jaxrec.ops.bags.checked_offsets`); ``locked [M]`` holds slots that must not be
    evicted (``-1`` entries are ignored), e.g. the previous batch's ``slots``.
    """
    n = ids.shape[0]
    sets, ways, sentinel = layout.sets, layout.ways, layout.num_rows
    rows, valid, member = _group_rows(layout, ids, offsets, batch_size)
    uniq, inverse, runs = sorted_unique(rows, sentinel)
    real = uniq < sentinel
    set_u = jnp.where(real, set_of(uniq, sets), 0)

    tag_rows = state.tags[set_u]  # [n, ways]
    matches = (tag_rows == uniq[:, None]) & real[:, None]
    hit = jnp.any(matches, axis=1)
    hit_way = jnp.argmax(matches, axis=1).astype(jnp.int32)
    miss = real & ~hit

    # Ways that must stay: rows of this batch (hits) and the locked slots.
    # Every scatter below sends its dropped entries to distinct out-of-range indices
    # (scatter_index); the kept ones are distinct (hit slots, deduplicated locked slots).
    slots = layout.slots
    keep = jnp.zeros((slots,), bool)
    hit_slot = scatter_index(set_u * ways + hit_way, hit, slots)
    keep = keep.at[hit_slot].set(True, mode="drop", unique_indices=True)
    locked = jax.lax.sort(locked.reshape(-1).astype(jnp.int32))
    lock_at = scatter_index(locked, _run_heads(locked) & (locked >= 0), slots)
    keep = keep.at[lock_at].set(True, mode="drop", unique_indices=True).reshape(sets, ways)
    if layout.algorithm == "lru":
        use = state.stamps
    else:
        use = jnp.where(state.tags >= 0, state.counts[jnp.maximum(state.tags, 0)], 0)
    priority = jnp.where(keep, _BIG, jnp.where(state.tags < 0, -1, use))  # lowest goes first

    # Rank each miss among the misses of its set (misses sorted by set, stable by row).
    miss_set = jnp.where(miss, set_u, sets)
    sorted_set, perm = jax.lax.sort(
        (miss_set, jnp.arange(n, dtype=jnp.int32)), num_keys=1, is_stable=True
    )
    position = jnp.arange(n, dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(_run_heads(sorted_set), position, 0))
    rank = jnp.zeros((n,), jnp.int32).at[perm].set(position - first, unique_indices=True)
    # Victim order per set, sorted once over the sets ([sets, ways]) rather than once per
    # unique row of the batch ([N, ways], N the padded batch capacity: several times more).
    order = jnp.argsort(priority, axis=1, stable=True).astype(jnp.int32)
    free = jnp.sum(priority < _BIG, axis=1)[set_u]
    overflowing = miss & (rank >= free)
    victim_way = order[set_u, jnp.minimum(rank, ways - 1)]
    way = jnp.where(hit, hit_way, victim_way)
    slot_u = jnp.where(real, set_u * ways + way, -1)
    old_tag = state.tags[set_u, victim_way]
    evicting = miss & (old_tag >= 0)

    # Misses take distinct victims unless the set overflows (the batch is then refused):
    # not declared unique, so an overflowing batch's state stays well defined.
    miss_slot = scatter_index(set_u * ways + victim_way, miss, slots)
    tags = state.tags.reshape(-1).at[miss_slot].set(uniq, mode="drop").reshape(sets, ways)
    # Every entry writes the same clock, so a repeated slot (overflow) cannot matter.
    use_slot = scatter_index(set_u * ways + way, real, slots)
    stamps = (
        state.stamps.reshape(-1).at[use_slot].set(state.clock, mode="drop", unique_indices=True)
    )
    stamps = stamps.reshape(sets, ways)
    counts = state.counts
    if layout.algorithm == "lfu":
        # A real row's positions are exactly its valid positions: its run in the sort.
        row_at = scatter_index(uniq, real, sentinel)
        counts = counts.at[row_at].add(runs, mode="drop", unique_indices=True)

    num_misses = jnp.sum(miss.astype(jnp.int32))
    compact = jnp.arange(n) < num_misses
    # Evictions compacted on their own: a warm cache under skewed ids evicts far fewer rows
    # than it loads, and only those records travel back to the host.
    num_evictions = jnp.sum(evicting.astype(jnp.int32))
    evict_at = scatter_index(jnp.cumsum(evicting.astype(jnp.int32)) - 1, evicting, n)
    no_evict = jnp.full((n,), -1, jnp.int32)
    evict_rows = no_evict.at[evict_at].set(old_tag, mode="drop", unique_indices=True)
    evict_slots = no_evict.at[evict_at].set(slot_u, mode="drop", unique_indices=True)
    last = _metrics(layout, uniq, hit, miss, evicting, real)
    new_state = CacheState(
        tags=tags,
        stamps=stamps,
        counts=counts,
        clock=state.clock + 1,
        totals=state.totals + last,
        last=last,
    )
    plan = Assignment(
        slots=jnp.where(valid, slot_u[inverse], -1),
        in_group=member,
        miss_rows=jnp.where(compact, uniq[perm], -1),
        miss_slots=jnp.where(compact, slot_u[perm], -1),
        evict_rows=evict_rows,
        evict_slots=evict_slots,
        num_misses=num_misses,
        num_evictions=num_evictions,
        overflow=jnp.sum(overflowing.astype(jnp.int32)),
        worst_set=jnp.max(jnp.where(overflowing, set_u, 0)),
    )
    return new_state, plan
