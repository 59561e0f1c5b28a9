"""What a sharding costs each device: bytes through the kernels, bytes on the wire, memory.

The planner's cost model, from bytes moved (DESIGN: lookups at the measured kernel
bandwidth, collectives at the measured link bandwidth). One training step of ``B`` bags
per feature on each of ``N`` devices (``N * B`` in the whole batch), a table of ``rows x
dim`` with ``s`` bytes per weight and ``p_f`` ids per bag on feature ``f``:

- **Lookup** (kernel bytes on the owner): the forward reads ``ids x cols x s``; the fused
  backward reads and writes each looked-up row and its optimizer state
  (``ids x 2 (cols x s + state)``); a plain table's backward scatter-adds float32
  gradients (``ids x cols x 4``) into a zeroed table-sized gradient (``rows x cols x 4``).
  Table-wise and column shards look up every id of the batch; a row shard the ids of its
  row range (ids taken as uniform over the rows: hot rows are not modelled); a
  data-parallel replica its own ``B x p`` ids forward, and every replica applies the
  update to the ``N x B x p`` gathered rows.
- **Communication**, in three phases that run one after the other: the *input* all-to-all
  (ids and lengths), the *output* distribution (forward) and the *gradient* distribution
  (backward). Within a phase a link is full duplex, so a device's time is the larger of
  the bytes it sends and receives over the link bandwidth; the phases add up. Table-wise
  and column shards: each source sends its ids and lengths to the owner (int32, input),
  the owner returns ``B x cols`` float32 pooled outputs per feature to each other source
  (output), and the sources send their gradients back (gradient). Row-split tables: ids go
  to the row range's owner (input), and each feature's ``[N, B, dim]`` float32 partial
  sums are reduce-scattered over *all* devices: every device sends and receives
  ``(N - 1) B dim`` floats (output), and the backward all-gathers the output gradients,
  the same bytes again (gradient). At 2 devices a table-wise table moves ``B dim`` floats
  per step and direction from one device, a row-wise one from both: twice the wire bytes.
  Data parallel: nothing forward; fused replicas all-gather each other's sparse row
  gradients (``(N - 1) B p`` rows of ids and float32 gradients), plain ones all-reduce the
  dense gradient (gradient phase).
- **Memory**: weights and optimizer state of the rows a device holds (plain tables: plus a
  float32 gradient of the same shape). ``shard_map`` needs equal-shaped buffers on every
  device, so each local group (:mod:`jaxrec.parallel.layout`) *allocates* on every device
  the rows of its busiest device; data-parallel tables are whole on every device.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel.types import table_wise
>>> t = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=100, feature_names=["f"])
>>> profile = TableProfile.create(t, pooling_factors=(2.0,), optimizer=None, tag=0)
>>> cost = sharding_cost(profile, table_wise(1), num_devices=2, batch_size=8)
>>> cost.lookup.tolist()  # forward 32 ids x 16 B, backward 32 x 16 + the 100 x 16 gradient
[0.0, 2624.0]
>>> cost.sent.tolist()  # per phase (input, output, gradient) and device
[[96.0, 0.0], [0.0, 128.0], [128.0, 0.0]]
>>> cost.received.tolist()  # ids+lengths in, outputs out, grads back
[[0.0, 96.0], [128.0, 0.0], [0.0, 128.0]]
>>> cost.held.tolist()  # weights and the float32 gradient of a plain table
[0.0, 3200.0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from jaxrec.configs import BaseEmbeddingConfig
from jaxrec.parallel.layout import _pooling_run
from jaxrec.parallel.types import ParameterSharding, ShardingType

__all__ = [
    "H200_HBM_BYTES",
    "H200_LINK_BANDWIDTH",
    "H200_LOOKUP_BANDWIDTH",
    "PHASES",
    "DeviceLoad",
    "ShardingCost",
    "TableProfile",
    "Topology",
    "sharding_cost",
    "state_bytes_per_row",
]

#: H200 memory as the driver reports it (143,771 MiB); a process sees a little less.
H200_HBM_BYTES = 143_771 * 2**20
#: Pooled lookups on an H200, bytes of rows per second: a copy through JAX moves 3.69 TB/s
#: (read + write) and the lookup kernels run at 87-90% of it (measured).
H200_LOOKUP_BANDWIDTH = 0.88 * 3.69e12
#: Collective bandwidth per direction per GPU, bytes each device sends per second: measured
#: on 2 x H200 (NVLink, jax 0.11.2, 256 MB per device; the scaling run recorded in
#: BENCHMARKS.md): all-to-all 233 GB/s, reduce-scatter 197 GB/s; 210 GB/s lies between.
H200_LINK_BANDWIDTH = 210e9
#: The communication phases of a training step, in the order they run.
PHASES = ("input", "output", "gradient")
_INPUT, _OUTPUT, _GRADIENT = range(3)

_ID_BYTES = 4  # int32 ids and lengths
_OUT_BYTES = 4  # float32 pooled outputs and their gradients


@dataclass(frozen=True)
class Topology:
    """The devices a plan places tables on (TorchRec's ``Topology``).

    Attributes:
      num_devices: devices on the mesh axis (TorchRec: ``world_size``).
      hbm_cap: memory of one device in bytes (default: an H200).
      lookup_bandwidth: bytes of rows per second the lookup kernels move on one device
        (TorchRec: ``hbm_mem_bw``; default: measured on an H200).
      link_bandwidth: bytes per second one device sends (and, at once, receives) in an
        all-to-all (TorchRec: ``intra_host_bw``; default: 210 GB/s, measured on H200s).
    """

    num_devices: int
    hbm_cap: int = H200_HBM_BYTES
    lookup_bandwidth: float = H200_LOOKUP_BANDWIDTH
    link_bandwidth: float = H200_LINK_BANDWIDTH

    def __post_init__(self) -> None:
        if not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise ValueError(f"num_devices must be an int >= 1, got {self.num_devices!r}")
        if not self.hbm_cap > 0:
            raise ValueError(f"hbm_cap must be positive bytes, got {self.hbm_cap!r}")
        for name in ("lookup_bandwidth", "link_bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of bytes/s, got {value!r}")


@functools.lru_cache(maxsize=256)
def state_bytes_per_row(optimizer: Any, cols: int) -> int:
    """Bytes of fused optimizer state per row of ``cols`` columns (0 without one).

    >>> import jaxrec
    >>> state_bytes_per_row(jaxrec.optim.exact_rowwise_adagrad(0.1), 128)
    4
    >>> state_bytes_per_row(jaxrec.optim.adam(0.1), 128)
    1024
    """
    if optimizer is None:
        return 0

    def nbytes(rows: int) -> int:
        shapes = jax.eval_shape(lambda: optimizer.init(rows, cols))
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    return nbytes(1) - nbytes(0)


@dataclass(frozen=True)
class TableProfile:
    """A table as the cost model sees it: its config, expected ids per bag on each of its
    features, its fused optimizer (or None) and that optimizer's tag (the layout's local
    groups never mix optimizers)."""

    table: BaseEmbeddingConfig
    pooling_factors: tuple[float, ...]
    optimizer: Any
    tag: int

    @classmethod
    def create(
        cls,
        table: BaseEmbeddingConfig,
        *,
        pooling_factors: Sequence[float],
        optimizer: Any,
        tag: int,
    ) -> TableProfile:
        factors = tuple(float(p) for p in pooling_factors)
        if len(factors) != table.num_features():
            raise ValueError(
                f"table {table.name!r}: {len(factors)} pooling factors for its "
                f"{table.num_features()} features {list(table.feature_names)}"
            )
        if any(not (np.isfinite(p) and p >= 0) for p in factors):
            raise ValueError(f"table {table.name!r}: pooling factors must be >= 0, got {factors}")
        return cls(table, factors, optimizer, int(tag))

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def itemsize(self) -> int:
        return self.table.dtype.itemsize

    def row_bytes(self, cols: int) -> int:
        """Bytes per row of a ``cols``-column shard: weights, optimizer state, and a plain
        table's float32 gradient."""
        extra = state_bytes_per_row(self.optimizer, cols) if self.optimizer else cols * 4
        return cols * self.itemsize + extra

    @property
    def nbytes(self) -> int:
        """The whole table's memory (one replica, unsplit)."""
        return self.table.num_embeddings * self.row_bytes(self.table.embedding_dim)

    def group_key(self, cols: int, row_split: bool) -> tuple:
        """The layout's local group of a shard: (cols, dtype, pooling as run, tag)."""
        return (cols, self.table.dtype.name, _pooling_run(self.table, row_split), self.tag)

    def backward_bytes(self, ids: float, rows: int, cols: int) -> float:
        """Kernel bytes of the backward over ``ids`` ids of a ``rows x cols`` shard."""
        if self.optimizer is None:
            return ids * cols * 4 + rows * cols * 4
        state = state_bytes_per_row(self.optimizer, cols)
        return ids * 2 * (cols * self.itemsize + state)


@dataclass
class ShardingCost:
    """Per-device costs of one table under one sharding (arrays over the ``N`` devices).

    ``lookup``: kernel bytes; ``sent`` / ``received``: bytes on the wire, ``[3, N]`` (one
    row per phase of :data:`PHASES`); ``held``: bytes
    of the table's shards; ``rows``: rows added to each local group (``group_key`` →
    rows per device; allocated at the busiest device's count on every device);
    ``replicated``: bytes on every device (data parallel).
    """

    lookup: np.ndarray
    sent: np.ndarray
    received: np.ndarray
    held: np.ndarray
    rows: dict[tuple, np.ndarray] = field(default_factory=dict)
    row_bytes: dict[tuple, int] = field(default_factory=dict)
    replicated: float = 0.0


def sharding_cost(
    profile: TableProfile, sharding: ParameterSharding, num_devices: int, batch_size: int
) -> ShardingCost:
    """The costs of ``sharding`` for ``profile`` on ``num_devices`` devices of
    ``batch_size`` bags per feature each (the rules in the module docstring)."""
    n, b = num_devices, batch_size
    table = profile.table
    rows, dim, s = table.num_embeddings, table.embedding_dim, profile.itemsize
    ids = sum(profile.pooling_factors)  # ids per sample over the table's features
    feats = len(profile.pooling_factors)
    cost = ShardingCost(
        np.zeros(n), np.zeros((len(PHASES), n)), np.zeros((len(PHASES), n)), np.zeros(n)
    )
    kind = sharding.sharding_type
    if kind is ShardingType.DATA_PARALLEL:
        cost.lookup += b * ids * dim * s
        if profile.optimizer is not None:
            cost.lookup += profile.backward_bytes(n * b * ids, rows, dim)
            wire = (n - 1) * b * ids * (_ID_BYTES + dim * _OUT_BYTES)
        else:
            cost.lookup += profile.backward_bytes(b * ids, rows, dim)
            wire = 2 * (n - 1) / n * rows * dim * _OUT_BYTES
        cost.sent[_GRADIENT] += wire
        cost.received[_GRADIENT] += wire
        cost.replicated = float(profile.nbytes)
        cost.held += profile.nbytes
        return cost
    split = kind.splits_rows
    others = np.ones(n, bool)
    for shard in sharding.shards(table, n):
        r = shard.placement
        (num_rows, cols) = shard.shard_sizes
        share = num_rows / rows if split else 1.0  # the ids this shard looks up
        looked_up = n * b * ids * share
        cost.lookup[r] += looked_up * cols * s + profile.backward_bytes(looked_up, num_rows, cols)
        others[:] = True
        others[r] = False
        into = b * (ids * share * _ID_BYTES + feats * _ID_BYTES)  # ids and lengths per source
        cost.sent[_INPUT, others] += into
        cost.received[_INPUT, r] += (n - 1) * into
        if not split:  # outputs back to each source, their gradients to the owner
            out = b * feats * cols * _OUT_BYTES
            cost.sent[_OUTPUT, r] += (n - 1) * out
            cost.received[_OUTPUT, others] += out
            cost.sent[_GRADIENT, others] += out
            cost.received[_GRADIENT, r] += (n - 1) * out
        key = profile.group_key(cols, split)
        cost.rows.setdefault(key, np.zeros(n, np.int64))[r] += num_rows
        cost.row_bytes[key] = profile.row_bytes(cols)
        cost.held[r] += num_rows * profile.row_bytes(cols)
    if split:  # reduce-scatter of [N, B, dim] partial sums, all-gather of their gradients
        wire = (n - 1) * b * feats * dim * _OUT_BYTES
        for phase in (_OUTPUT, _GRADIENT):
            cost.sent[phase] += wire
            cost.received[phase] += wire
    return cost


class DeviceLoad:
    """Running per-device totals of the shardings chosen so far."""

    def __init__(self, topology: Topology, batch_size: int) -> None:
        n = topology.num_devices
        self.topology, self.batch_size = topology, batch_size
        self.lookup, self.held = np.zeros(n), np.zeros(n)
        self.sent, self.received = np.zeros((len(PHASES), n)), np.zeros((len(PHASES), n))
        self.rows: dict[tuple, np.ndarray] = {}
        self.row_bytes: dict[tuple, int] = {}
        self.replicated = 0.0

    def add(self, cost: ShardingCost) -> DeviceLoad:
        """A new load: this one plus ``cost``."""
        new = DeviceLoad(self.topology, self.batch_size)
        new.lookup, new.sent = self.lookup + cost.lookup, self.sent + cost.sent
        new.received, new.held = self.received + cost.received, self.held + cost.held
        new.rows = {k: v.copy() for k, v in self.rows.items()}
        for key, rows in cost.rows.items():
            new.rows[key] = new.rows.get(key, 0) + rows
        new.row_bytes = {**self.row_bytes, **cost.row_bytes}
        new.replicated = self.replicated + cost.replicated
        return new

    @property
    def lookup_seconds(self) -> np.ndarray:
        return self.lookup / self.topology.lookup_bandwidth

    @property
    def comm_seconds(self) -> np.ndarray:
        """Per device: each phase's larger of bytes sent and received, phases added."""
        return np.maximum(self.sent, self.received).sum(axis=0) / self.topology.link_bandwidth

    @property
    def seconds(self) -> np.ndarray:
        """Estimated time per device: lookup plus communication."""
        return self.lookup_seconds + self.comm_seconds

    @property
    def work(self) -> float:
        """Device-seconds of the whole step: every device's lookups plus every byte sent
        (each byte once) over the link bandwidth. Balancing moves work between devices;
        choosing a sharding type changes it."""
        topo = self.topology
        return float(
            self.lookup.sum() / topo.lookup_bandwidth + self.sent.sum() / topo.link_bandwidth
        )

    @property
    def allocated(self) -> float:
        """Bytes every device allocates: each local group at its busiest device's rows, and
        the data-parallel replicas."""
        sharded = sum(int(rows.max()) * self.row_bytes[k] for k, rows in self.rows.items())
        return float(sharded + self.replicated)
