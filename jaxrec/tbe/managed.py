"""Tables larger than the device: host-memory tables behind a device cache.

:class:`CachedTBE` runs a :class:`~jaxrec.tbe.SplitTableBatchedEmbeddingBagsCodegen`
whose tables are placed ``HOST``, ``MANAGED`` or ``MANAGED_CACHING``. Each such stacked
group keeps its rows and optimizer state rows in host memory and a set-associative cache
of ``cache_load_factor * rows`` rows (with their state rows) in device memory; ``DEVICE``
groups stay whole on the device as in the operator. JAX has no unified memory, so the
three host placements share this one mechanism: a table in host memory with a device
cache (``MANAGED`` is FBGEMM's UVM table without a cache; here it is cached too, which
reads the same rows and gives the same numbers).

A step is

1. :meth:`CachedTBE.prefetch`: the batch's rows are mapped onto the cache
   (:func:`jaxrec.tbe.cache.assign`), victims are written back to host memory with their
   optimizer state, missing rows are loaded into their slots, and the indices are
   rewritten to slot ids;
2. the ordinary fused lookup on the cache buffers (:meth:`CachedTBE.lookup`, jit-able and
   differentiable as the operator's call): the fused optimizer updates the cached rows in
   place; :func:`jaxrec.optim.apply_updates` swaps the updated cache in.

Every row a batch reads is in the cache during its step and row updates are row-local,
so the tables equal the all-in-device run bit for bit (the backward sums the gradients of
one row in position order whatever the row's id; 16-bit tables with stochastic rounding
seed the rounding by slot rather than row, so only float32 tables are bitwise equal).
:meth:`CachedTBE.flush` writes every cached row back (checkpoints, ``split_*`` views).
:mod:`jaxrec.tbe.pipeline` overlaps the next batch's prefetch with the current step.

>>> import jax, numpy as np
>>> from jaxrec import tbe
>>> op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
...     [(100, 4, tbe.EmbeddingLocation.MANAGED_CACHING, tbe.ComputeDevice.CPU)],
...     optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.1)
>>> cached = CachedTBE(op, ways=4)
>>> state, caches = cached.init(seed=0)
>>> batch = cached.prefetch(state, caches, np.array([5, 7, 5]), np.array([0, 2, 3]))
>>> out = cached(batch.state, batch.indices, np.array([0, 2, 3]))
>>> out.shape, cached.layouts["sum_float32_d4"].slots
((2, 4), 12)
>>> np.asarray(cached.cache_metrics(batch.caches)["totals"]).tolist()   # hits, misses, evictions, unique
[[0, 2, 0, 2]]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.ops.bags import checked_offsets
from jaxrec.ops.lookup import lookup as grouped_lookup
from jaxrec.optim.fused import init_fused_table
from jaxrec.tbe.cache import METRICS, CacheLayout, CacheState, assign
from jaxrec.tbe.enums import EmbeddingLocation, OptimType
from jaxrec.tbe.host_table import HostTable
from jaxrec.tbe.inputs import TBEInputs
from jaxrec.tbe.operator import SplitTableBatchedEmbeddingBagsCodegen
from jaxrec.tbe.optimizers import make_optimizer
from jaxrec.tbe.records import gather_records, load_records
from jaxrec.tbe.staging import PinnedStaging, host_view, pinned_staging
from jaxrec.tbe.state import TBEState

__all__ = ["CachedTBE", "CheckedBatch", "Prefetched", "PendingPrefetch"]

DEFAULT_WAYS = 32  # FBGEMM's associativity on NVIDIA GPUs
# Stages of a prefetch, in order (CachedTBE.timings): input checks, the cache assignment (up
# to the miss counts reaching the host), the victims' records gathered on the device, their
# copy to the host, the write-back, the host gather of the missing rows, their copy to the
# device, the device load into the cache, and the index rewrite.
TIMED_PARTS = (
    "check",
    "assign",
    "victims",
    "d2h",
    "write_back",
    "gather",
    "h2d",
    "load",
    "rewrite",
)
_AUTO = "auto"
_FLUSH_ROWS = 1 << 20  # cache rows per device-to-host copy of a flush


class Prefetched(NamedTuple):
    """A batch made ready for the lookup.

    ``indices`` are the batch's indices with the cached groups' ids rewritten to slots;
    ``slots`` holds each cached group's slot per position (``-1`` elsewhere), which a
    pipeline passes as ``locked`` to the next prefetch.
    """

    state: TBEState
    caches: dict[str, CacheState]
    indices: jax.Array
    slots: dict[str, jax.Array]


class CheckedBatch(NamedTuple):
    """A batch's checked inputs on the device (:meth:`CachedTBE.check_inputs`): int32
    ``indices``, ``offsets`` as the lookup reads them, and the batch ``size``."""

    indices: jax.Array
    offsets: jax.Array
    size: int


@dataclasses.dataclass
class PendingPrefetch:
    """A prefetch whose device part is dispatched; :meth:`CachedTBE.finish_prefetch` ends it."""

    caches: dict[str, CacheState]
    indices: jax.Array
    plans: dict[str, Any]
    evicted: dict[str, jax.Array]  # group -> the victims' records, copying to the host
    sizes: dict[str, tuple[int, int, int]]  # group -> (misses, bucket, eviction bucket)


def _bucket(count: int, capacity: int) -> int:
    """Rows moved for ``count`` misses: the next power of two (>= 16), at most ``capacity``."""
    return min(capacity, max(16, 1 << max(count - 1, 0).bit_length()))


_checked = jax.jit(
    lambda offsets, capacity: checked_offsets(offsets, capacity)[0], static_argnums=1
)  # one launch rather than an eager scan per prefetch
_NO_LOCK = np.full((1,), -1, np.int32)


@jax.jit
def _rewrite(indices, slots_and_masks):
    out = indices
    for slots, in_group in slots_and_masks:
        out = jnp.where(in_group, slots, out)
    return out


class CachedTBE:
    """A TBE with host-memory tables behind a device cache (module docstring).

    Args:
      op: the operator; its ``embedding_specs`` place each table, its ``cache_algorithm``
        (LRU/LFU), ``cache_load_factor`` (cache rows per group: ``ceil(factor * rows)``,
        rounded up to whole sets) and ``cache_sets`` (0: ``slots / ways``) shape the cache.
        Tables stacked in one group (same dim) must share a placement: the device ones
        whole, the host ones through one cache. The optimizer must be fused, and
        ``cache_precision`` (if set) equal to ``weights_precision`` (rows are cached in
        their own precision). ``cache_reserved_memory`` and ``enforce_hbm`` size and place
        FBGEMM's CUDA allocations; they have no counterpart here.
      ways: the associativity (FBGEMM's is 32), at most the cache's rows.
      staging: allocates the host staging buffers of the missing rows (``shape -> uint8
        array``), e.g. page-locked memory from another library; overrides
        ``staging_memory_kind``.
      staging_memory_kind: where rows are staged between host tables and the device.
        ``"pinned_host"``: page-locked JAX arrays written in place
        (:mod:`jaxrec.tbe.staging`): the missing rows are gathered straight into them and
        the victims' rows arrive in them, so both copies run at the link's speed (a
        ValueError where that does not hold); ``None``: pageable NumPy memory (a few GB/s);
        ``"auto"`` (default): ``"pinned_host"`` on a GPU where it holds, else ``None``.
      profile: wait for the device after each stage of a prefetch, so ``timings``
        attributes device time to its stage (slower: nothing overlaps).

    Cache metrics (hits, misses, evictions and unique rows, per table and batch) are always
    counted, as device arrays updated by the prefetch (:meth:`cache_metrics`). ``timings``
    holds, per prefetch, the host seconds of each stage in :data:`TIMED_PARTS`: ``check``,
    ``assign`` (until the miss counts reach the host), ``victims``, ``d2h`` (waiting for the
    victims' records), ``write_back`` (run on a thread while the missing rows are gathered
    and loaded, so only its wait unless ``profile``), ``gather``, ``h2d``, ``load`` and
    ``rewrite`` (device stages are dispatch times unless ``profile``).
    """

    def __init__(
        self,
        op: SplitTableBatchedEmbeddingBagsCodegen,
        *,
        ways: int = DEFAULT_WAYS,
        staging: Callable[[tuple[int, int]], np.ndarray] | None = None,
        staging_memory_kind: str | None = _AUTO,
        profile: bool = False,
    ):
        if not isinstance(op, SplitTableBatchedEmbeddingBagsCodegen):
            raise ValueError(f"op must be a SplitTableBatchedEmbeddingBagsCodegen, got {op!r}")
        if op.optimizer is OptimType.NONE:
            raise ValueError(
                "host-placed tables need a fused optimizer (the cache trains its rows in "
                "place); OptimType.NONE returns dense table gradients"
            )
        if op.cache_precision not in (None, op.weights_precision):
            raise ValueError(
                f"cache_precision={op.cache_precision} differs from weights_precision="
                f"{op.weights_precision}; the cache holds rows in the table's precision"
            )
        if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
            raise ValueError(f"ways must be an int >= 1, got {ways!r}")
        if staging_memory_kind not in (None, "pinned_host", _AUTO):
            raise ValueError(
                "staging_memory_kind must be None, 'pinned_host' or 'auto', got "
                f"{staging_memory_kind!r}"
            )
        self.op = op
        self._allocate = staging or (lambda shape: np.empty(shape, np.uint8))
        self._memory_kind = None if staging is not None else staging_memory_kind
        self._pinned: PinnedStaging | None = None
        self.profile = bool(profile)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jaxrec-write-back")
        self._staging: dict[tuple[str, int], list[np.ndarray]] = {}
        self.timings: dict[str, list[float]] = {k: [] for k in TIMED_PARTS}
        plan = op.plan
        index = {name: t for t, name in enumerate(op.table_names)}
        self.layouts: dict[str, CacheLayout] = {}
        self._tables: dict[str, tuple[int, ...]] = {}
        for g, group in enumerate(plan.groups):
            tables = tuple(index[name] for name in group.tables)
            places = {EmbeddingLocation(op.embedding_specs[t][2]) for t in tables}
            host = places - {EmbeddingLocation.DEVICE}
            if not host:
                continue
            if len(places) > 1:
                names = {op.table_names[t]: op.embedding_specs[t][2].name for t in tables}
                raise ValueError(
                    f"tables {names} share a stacked buffer (same dim and precision) but not a "
                    "placement; place them alike or put them in separate TBEs"
                )
            target = max(1, math.ceil(op.cache_load_factor * group.num_rows))
            group_ways = min(ways, target)
            sets = op.cache_sets or math.ceil(target / group_ways)
            features = tuple(
                (k, row_offset, rows)
                for k, row_offset, rows, _ in plan.kernel_features(g, self._keys)
            )
            self.layouts[group.name] = CacheLayout(
                num_rows=group.num_rows,
                sets=sets,
                ways=group_ways,
                features=features,
                table_offsets=tuple(plan.table(name).row_offset for name in group.tables),
                algorithm=op.cache_algorithm.name.lower(),
            )
            self._tables[group.name] = tables
        self.hosts: dict[str, HostTable] = {}

    @property
    def _keys(self) -> tuple[str, ...]:
        return tuple(f"f{i}" for i in range(self.op.num_features))

    def _optimizer(self, lr: Any = None):
        return make_optimizer(self.op._optimizer_args, self.op.learning_rate if lr is None else lr)

    # State ------------------------------------------------------------------------------
    def init(self, seed: int | None = None) -> tuple[TBEState, dict[str, CacheState]]:
        """Device state (whole device groups, empty caches) and empty cache metadata.

        The host tables are made here too (in ``self.hosts``): zeros without ``seed``, as
        FBGEMM's constructor leaves tables; with ``seed`` every table (host or device) is
        drawn uniformly in ``±sqrt(1 / rows)`` from NumPy's generator (table ``t`` from
        ``(seed, t)``), without building host tables on the device.
        """
        optimizer = self._optimizer()
        plan = self.op.plan
        groups, caches = {}, {}
        for group in plan.groups:
            dtype = np.dtype(jnp.dtype(group.dtype))
            layout = self.layouts.get(group.name)
            if seed is None and layout is not None:  # pages zeroed as rows are first written
                empty = optimizer.init(0, group.dim)
                specs = {k: (v.shape[1:], np.dtype(v.dtype)) for k, v in empty.items()}
                host = HostTable.zeros(group.num_rows, group.dim, dtype, specs)
                self.hosts[group.name] = host
                groups[group.name] = init_fused_table(
                    jnp.zeros((layout.slots, group.dim), dtype), optimizer
                )
                caches[group.name] = layout.init()
                continue
            if seed is None:
                weight = np.zeros((group.num_rows, group.dim), dtype)
            else:
                parts = []
                for name in group.tables:
                    t = self.op.table_names.index(name)
                    rows = self.op.embedding_specs[t][0]
                    bound = 1.0 / math.sqrt(rows)
                    draw = np.random.default_rng((seed, t)).uniform(
                        -bound, bound, (rows, group.dim)
                    )
                    parts.append(draw.astype(np.float32).astype(dtype))
                weight = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if layout is None:
                groups[group.name] = init_fused_table(jnp.asarray(weight), optimizer)
                continue
            empty = optimizer.init(0, group.dim)
            state = {
                k: np.zeros((group.num_rows, *v.shape[1:]), np.dtype(v.dtype))
                for k, v in empty.items()
            }
            self.hosts[group.name] = HostTable(weight, state)
            groups[group.name] = init_fused_table(
                jnp.zeros((layout.slots, group.dim), dtype), optimizer
            )
            caches[group.name] = layout.init()
        return TBEState(groups=groups, learning_rate=jnp.float32(self.op.learning_rate)), caches

    def flush(self, state: TBEState, caches: dict[str, CacheState]) -> None:
        """Write every cached row and its optimizer state back to host memory.

        The cache keeps its rows (they stay valid), so training continues unchanged.
        """
        for name, layout in self.layouts.items():
            host, tags = self.hosts[name], caches[name].tags.reshape(-1)
            for start in range(0, layout.slots, _FLUSH_ROWS):
                size = min(_FLUSH_ROWS, layout.slots - start)
                slots = jnp.arange(start, start + size, dtype=jnp.int32)
                records = gather_records(
                    state.groups[name],
                    slots,
                    size=size,
                    fields=host.fields,
                    row_bytes=host.row_bytes,
                )
                host.scatter(np.asarray(tags[start : start + size]), np.asarray(records))

    def set_split_embedding_weights(
        self, state: TBEState, caches: dict[str, CacheState], arrays: list[Any]
    ) -> TBEState:
        """``state`` with each table's weights set to ``arrays[t]`` (``[rows, dim]``): host
        tables written in host memory, device tables in ``state``. Only before the first
        prefetch (or after an empty cache's ``init``): cached rows would go stale."""
        if len(arrays) != len(self.op.table_names):
            raise ValueError(f"expected {len(self.op.table_names)} arrays, got {len(arrays)}")
        held = [n for n in self.layouts if bool(jnp.any(caches[n].tags >= 0))]
        if held:
            raise ValueError(f"the caches of {held} hold rows; set weights before prefetching")
        groups = dict(state.groups)
        for t, array in enumerate(arrays):
            placement = self.op.plan.table(self.op.table_names[t])
            name = self.op.plan.groups[placement.group].name
            shape = (placement.num_rows, self.op.embedding_specs[t][1])
            if np.shape(array) != shape:
                raise ValueError(
                    f"table {self.op.table_names[t]!r}: weights of shape {np.shape(array)}, "
                    f"expected {shape}"
                )
            start = placement.row_offset
            if name in self.hosts:
                self.hosts[name].weight[start : start + shape[0]] = np.asarray(array)
            else:
                param = groups[name]
                weight = param.weight.at[start : start + shape[0]].set(jnp.asarray(array))
                groups[name] = dataclasses.replace(param, weight=weight)
        return dataclasses.replace(state, groups=groups)

    def split_embedding_weights(
        self, state: TBEState, caches: dict[str, CacheState]
    ) -> list[np.ndarray | jax.Array]:
        """Each table's weights ``[rows, dim]`` (flushed first; host tables as NumPy views)."""
        self.flush(state, caches)
        return [self._table_rows(state, t, "weight") for t in range(len(self.op.table_names))]

    def split_optimizer_states(
        self, state: TBEState, caches: dict[str, CacheState]
    ) -> list[dict[str, Any]]:
        """Each table's optimizer state under FBGEMM's names (flushed first)."""
        self.flush(state, caches)
        out = []
        for t in range(len(self.op.table_names)):
            placement = self.op.plan.table(self.op.table_names[t])
            keys = sorted(state.groups[self.op.plan.groups[placement.group].name].state)
            out.append({k: self._table_rows(state, t, k) for k in keys})
        return out

    def _table_rows(self, state: TBEState, t: int, key: str) -> np.ndarray | jax.Array:
        placement = self.op.plan.table(self.op.table_names[t])
        name = self.op.plan.groups[placement.group].name
        rows = slice(placement.row_offset, placement.row_offset + placement.num_rows)
        if name in self.hosts:
            host = self.hosts[name]
            return (host.weight if key == "weight" else host.state[key])[rows]
        param = state.groups[name]
        return (param.weight if key == "weight" else param.state[key])[rows]

    def cache_metrics(self, caches: dict[str, CacheState]) -> dict[str, jax.Array]:
        """Device arrays (no host sync): ``totals`` and ``last``, each ``[tables, 4]`` with
        columns :data:`~jaxrec.tbe.cache.METRICS` (hits, misses, evictions, unique rows) per
        table in ``embedding_specs`` order (zeros for device tables), cumulative and of the
        last prefetched batch; ``total`` and ``last_total`` sum them over the tables."""
        num_tables = len(self.op.table_names)
        out = {}
        for key in ("totals", "last"):
            table = jnp.zeros((num_tables, len(METRICS)), jnp.int32)
            for name, tables in self._tables.items():
                table = table.at[np.asarray(tables)].set(getattr(caches[name], key))
            out[key] = table
        out["total"] = out["totals"].sum(axis=0)
        out["last_total"] = out["last"].sum(axis=0)
        return out

    # Prefetch ---------------------------------------------------------------------------
    def check_inputs(self, indices: Any, offsets: Any) -> CheckedBatch:
        """A batch's inputs checked (bad ids and offsets raise a ValueError naming them) and
        on the device: the first stage of :meth:`begin_prefetch`, which a pipeline may run
        ahead of time on another thread (it touches no cache state)."""
        rows = tuple(self.op.embedding_specs[t][0] for t in self.op.feature_table_map)
        inputs = TBEInputs.check(
            indices,
            offsets,
            None,
            None,
            num_features=self.op.num_features,
            feature_rows=rows,
            feature_tables=self.op.feature_table_map,
        )
        checked = _checked(inputs.offsets, inputs.indices.shape[0])
        if self.profile:
            jax.block_until_ready((inputs.indices, checked))
        return CheckedBatch(inputs.indices, checked, inputs.batch_size)

    def begin_prefetch(
        self,
        state: TBEState,
        caches: dict[str, CacheState],
        indices: Any,
        offsets: Any,
        locked: dict[str, jax.Array] | None = None,
        *,
        checked: CheckedBatch | None = None,
    ) -> PendingPrefetch:
        """Map the batch onto the caches and read the victims' rows (device work only).

        Waits only for the (small) miss counts. A set with more missing rows than free ways
        raises a ValueError before anything changes. ``locked``: slots per group that must
        not be evicted (a pipeline's previous batch). ``checked``: this batch's
        :meth:`check_inputs`, when already done (``indices`` and ``offsets`` are then not
        read again).
        """
        spent = dict.fromkeys(TIMED_PARTS[:3], 0.0)
        start = time.perf_counter()
        batch = self.check_inputs(indices, offsets) if checked is None else checked
        spent["check"] = time.perf_counter() - start
        start = time.perf_counter()
        new_caches, plans, evicted, sizes = dict(caches), {}, {}, {}
        for name, layout in self.layouts.items():
            lock = _NO_LOCK if not locked else locked[name]
            new_caches[name], plans[name] = assign(
                layout, caches[name], batch.indices, batch.offsets, lock, batch_size=batch.size
            )
        counts = jax.device_get(
            {n: (p.num_misses, p.num_evictions, p.overflow, p.worst_set) for n, p in plans.items()}
        )
        spent["assign"] = time.perf_counter() - start
        start = time.perf_counter()
        pinned = self._pinned_staging(state)
        for name, (misses, evictions, overflow, worst) in counts.items():
            layout = self.layouts[name]
            if overflow:
                raise ValueError(
                    f"the cache of group {name!r} ({layout.sets} sets x {layout.ways} ways) cannot "
                    f"hold this batch: {int(overflow)} missing rows find no free way (e.g. set "
                    f"{int(worst)}), every way holding a row of this batch or of the batch in "
                    "flight. Raise cache_load_factor or the ways, or split the batch"
                )
            size = _bucket(int(misses), batch.indices.shape[0])
            out = _bucket(int(evictions), batch.indices.shape[0])
            sizes[name] = (int(misses), size, out)
            host = self.hosts[name]
            records = gather_records(
                state.groups[name],
                plans[name].evict_slots,
                size=out,
                fields=host.fields,
                row_bytes=host.row_bytes,
            )
            # The copy to the host overlaps the step a pipeline dispatches next.
            if pinned is not None:
                evicted[name] = jax.device_put(records, pinned.host)
            else:
                evicted[name] = records
                records.copy_to_host_async()
        if self.profile:
            jax.block_until_ready(evicted)
        spent["victims"] = time.perf_counter() - start
        for key, seconds in spent.items():
            self.timings[key].append(seconds)
        return PendingPrefetch(new_caches, batch.indices, plans, evicted, sizes)

    def finish_prefetch(self, state: TBEState, pending: PendingPrefetch) -> Prefetched:
        """Write the victims back to host memory, load the missing rows into ``state``'s
        caches, and rewrite the indices to slots. ``state`` may be a later step's (the
        victims are never rows of the batch in flight)."""
        groups = dict(state.groups)
        spent = dict.fromkeys(TIMED_PARTS[3:], 0.0)
        pinned = self._pinned_staging(state)
        writes = []
        for name, (_, size, out) in pending.sizes.items():
            plan, host = pending.plans[name], self.hosts[name]
            start = time.perf_counter()
            miss_rows, evict_rows = jax.device_get((plan.miss_rows[:size], plan.evict_rows[:out]))
            evicted = jax.block_until_ready(pending.evicted[name])
            evicted = host_view(evicted) if pinned is not None else np.asarray(evicted)
            spent["d2h"] += time.perf_counter() - start
            start = time.perf_counter()
            if self.profile:
                host.scatter(evict_rows, evicted)
            else:  # evicted rows are never missing rows: the write-back overlaps the gather
                writes.append(self._writer.submit(host.scatter, evict_rows, evicted))
            spent["write_back"] += time.perf_counter() - start
            start = time.perf_counter()
            staged = self._staging_buffer(name, size, host.row_bytes)
            host.gather(miss_rows, staged)
            spent["gather"] += time.perf_counter() - start
            start = time.perf_counter()
            records = self._to_device(staged, groups[name].weight.sharding)
            spent["h2d"] += time.perf_counter() - start
            start = time.perf_counter()
            groups[name] = load_records(
                groups[name], plan.miss_slots, records, size=size, fields=host.fields
            )
            if self.profile:
                jax.block_until_ready(groups[name])
            spent["load"] += time.perf_counter() - start
        start = time.perf_counter()
        for write in writes:
            write.result()
        spent["write_back"] += time.perf_counter() - start
        start = time.perf_counter()
        pairs = tuple((p.slots, p.in_group) for p in pending.plans.values())
        indices = _rewrite(pending.indices, pairs)
        if self.profile:
            jax.block_until_ready(indices)
        spent["rewrite"] = time.perf_counter() - start
        for key, seconds in spent.items():
            self.timings[key].append(seconds)
        slots = {name: p.slots for name, p in pending.plans.items()}
        return Prefetched(dataclasses.replace(state, groups=groups), pending.caches, indices, slots)

    def _pinned_staging(self, state: TBEState) -> PinnedStaging | None:
        """The page-locked staging of the caches' device (``staging_memory_kind``), made once."""
        if self._memory_kind is None or self._pinned is not None or not self.layouts:
            return self._pinned
        device = next(iter(state.groups[next(iter(self.layouts))].weight.devices()))
        if self._memory_kind == _AUTO and device.platform != "gpu":
            self._memory_kind = None
            return None
        self._pinned = pinned_staging(device)
        if self._pinned is None:
            if self._memory_kind == "pinned_host":
                raise ValueError(
                    f"staging_memory_kind='pinned_host': {device} has no pinned_host memory "
                    "that can be written in place; use None (NumPy staging)"
                )
            self._memory_kind = None
        return self._pinned

    def _staging_buffer(self, name: str, size: int, row_bytes: int) -> np.ndarray:
        """``[size, row_bytes]``: the group's two staging buffers of this bucket size,
        alternately (a buffer is refilled only after the transfer from it is done)."""
        buffers = self._staging.setdefault((name, size), [])
        if len(buffers) < 2:
            allocate = self._pinned.allocate if self._pinned is not None else self._allocate
            buffers[:] = [allocate((size, row_bytes)) for _ in range(2)]
        buffers.reverse()
        return buffers[0]

    def _to_device(self, staged: np.ndarray, sharding: Any) -> jax.Array:
        """One host-to-device copy of the staged records, waited for."""
        if self._pinned is not None:
            return self._pinned.to_device(staged, sharding)
        return jax.block_until_ready(jax.device_put(staged, sharding))

    def prefetch(
        self,
        state: TBEState,
        caches: dict[str, CacheState],
        indices: Any,
        offsets: Any,
        locked: dict[str, jax.Array] | None = None,
    ) -> Prefetched:
        """:meth:`begin_prefetch` then :meth:`finish_prefetch` on the same ``state``."""
        pending = self.begin_prefetch(state, caches, indices, offsets, locked)
        return self.finish_prefetch(state, pending)

    # Lookup -----------------------------------------------------------------------------
    def lookup(
        self, state: TBEState, indices: Any, offsets: Any, per_sample_weights: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(output, bad_count)`` of the prefetched ``indices`` (as the operator's lookup).

        ``indices`` must come from :meth:`prefetch` (or a pipeline) for this ``state``.
        """
        indices = jnp.asarray(indices, jnp.int32)
        offsets = jnp.asarray(offsets, jnp.int32)
        num_features = self.op.num_features
        batch = (offsets.shape[0] - 1) // num_features
        lr = jax.lax.stop_gradient(jnp.asarray(state.learning_rate, jnp.float32))
        spec = self.op._lookup_spec(batch, self._optimizer(lambda count: lr))
        plan = self.op.plan
        groups = []
        for group, layout in zip(spec.groups, plan.groups, strict=True):
            cache = self.layouts.get(layout.name)
            if cache is not None:
                features = tuple((k, 0, cache.slots, col) for k, _, _, col in group.features)
                group = dataclasses.replace(group, features=features, num_rows=cache.slots)
            groups.append(group)
        spec = dataclasses.replace(spec, groups=tuple(groups))
        out, bad = grouped_lookup(
            spec,
            tuple(state.groups[g.name] for g in plan.groups),
            indices,
            offsets,
            None if per_sample_weights is None else jnp.asarray(per_sample_weights),
        )
        return (out if plan.pooled else out[0]), bad

    def __call__(
        self, state: TBEState, indices: Any, offsets: Any, per_sample_weights: Any = None
    ) -> jax.Array:
        """The lookup's output (:meth:`lookup`)."""
        return self.lookup(state, indices, offsets, per_sample_weights)[0]
