"""A planner that chooses each table's sharding type and devices (TorchRec's
``EmbeddingShardingPlanner``).

Inputs: the tables (rows, dim, dtype), their fused optimizers (state bytes per row), the
expected ids per bag of every feature, the batch per device, and the devices
(:class:`~jaxrec.parallel.cost_model.Topology`: count, memory, measured lookup and link
bandwidths). Users control, per table, the allowed sharding types, a pinned
:class:`~jaxrec.parallel.types.ParameterSharding` and the pooling factors
(:class:`ParameterConstraints`), and per device the memory budget (a fraction of the
device or bytes) less a reserve for everything else (dense model, activations, buffers).

The plan is a greedy bin-packing over the cost model of :mod:`jaxrec.parallel.cost_model`
(per-device time: lookup bytes at the kernel bandwidth plus, per communication phase, the
larger of the bytes sent and received at the link bandwidth):

1. Refuse at once what cannot fit: the tables' total memory over every device's budget.
2. Place the pinned tables as given; refuse one that overflows a device.
3. Estimate each other table's time alone, table-wise (its *solo* time), and the ideal
   per-device time: the solo times and the pinned load summed, over the device count. A
   table whose solo time exceeds that share is *hot*: table-wise, it alone would set the
   step's time.
4. Take the tables by solo time, largest first (then memory). A table that is not hot and
   fits one device goes **table-wise** on the device whose time stays lowest (the smallest
   maximum, then sum of squares of the per-device times, then memory): longest-first
   bin-packing by estimated time. Data parallel competes only on total work (a replica
   moves nothing forward but costs every device): it wins for tiny *plain* tables, whose
   dense gradient all-reduce is smaller than a table-wise owner's outputs; a tiny *fused*
   table stays table-wise (a fused replica all-gathers ``(N - 1) B p`` gradient rows on
   every device). A hot table, one that fits no device whole, or one whose constraints
   exclude table-wise, takes the allowed candidate (row-wise over all devices;
   table-row-wise over the 2, 4, ... least loaded devices; column-wise, if allowed, in 2,
   3, ... equal shards of at least ``min_partition`` columns; table-wise on a device;
   data-parallel) of the smallest maximum plus mean per-device time, then the smallest
   maximum, then the least memory. Refuse a table that fits nowhere.

Why table-wise first: at ``N`` devices a table-wise table sends ``(N - 1) B dim`` floats
from its owner per step and direction, a row-wise one reduce-scatters ``(N - 1) B dim``
partial sums from *every* device (at 2 devices, twice the wire bytes) and spreads its
lookups; a per-table greedy on the maximum sees only the second. Data parallel is proposed
only for tables of at most ``data_parallel_max_bytes`` unless a table's constraints list
it. Column-wise types are proposed only where a table's constraints allow them: a column
shard keeps its own row-wise optimizer state, so such a table trains differently from one
device.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> import jaxrec
>>> tables = [
...     EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=rows,
...                        feature_names=[f"f{i}"])
...     for i, rows in enumerate([8_000_000, 1_000_000, 1_000_000, 1_000_000, 5_000])
... ]
>>> planner = EmbeddingShardingPlanner(
...     Topology(num_devices=2, hbm_cap=2 * 10**9), batch_size=4096,
...     memory_budget=0.9, reserve_bytes=0,
...     constraints={"t1": ParameterConstraints(pinned=table_wise(0))},
... )
>>> opt = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
>>> plan = planner.plan(tables, optimizer=opt)
>>> plan
ShardingPlan({'t0': row_wise[], 't1': table_wise[0], 't2': table_wise[1], 't3': table_wise[0], 't4': table_wise[1]})
>>> print(planner.explain(tables, plan, optimizer=opt))
Sharding plan: 2 devices, batch 4096 per device, budget 1.80 GB per device (90% of 2.00 GB, reserve 0 B)
table  type        ranks   memory
t0     row_wise    [0, 1]  2.08 GB
t1     table_wise  [0]     260.00 MB
t2     table_wise  [1]     260.00 MB
t3     table_wise  [0]     260.00 MB
t4     table_wise  [1]     1.30 MB
device  held     allocated  budget   lookup  comm     total
0       1.56 GB  1.56 GB    1.80 GB  4.9 us  30.4 us  35.3 us
1       1.30 GB  1.56 GB    1.80 GB  4.9 us  30.4 us  35.3 us
imbalance (max/mean of estimated time): 1.00
>>> EmbeddingShardingPlanner(Topology(num_devices=1, hbm_cap=2 * 10**9), batch_size=4096,
...                          memory_budget=0.9, reserve_bytes=0).plan(tables, optimizer=opt)
Traceback (most recent call last):
...
ValueError: the tables need 2.86 GB (weights 2.82 GB, optimizer state and gradients 44.02 MB) but 1 device(s) hold 1 x 1.80 GB = 1.80 GB (90% of 2.00 GB, reserve 0 B): 1.06 GB short; use at least 2 devices, raise memory_budget, lower reserve_bytes, or shrink the tables
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxrec.configs import BaseEmbeddingConfig
from jaxrec.parallel.cost_model import DeviceLoad, TableProfile, Topology, sharding_cost
from jaxrec.parallel.types import (
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    column_wise,
    data_parallel,
    row_wise,
    table_column_wise,
    table_row_wise,
    table_wise,
)

__all__ = [
    "DEFAULT_SHARDING_TYPES",
    "EmbeddingShardingPlanner",
    "ParameterConstraints",
    "PlanReport",
    "Topology",
]

#: The types proposed unless a table's constraints say otherwise: the ones that train
#: exactly as one device does.
DEFAULT_SHARDING_TYPES = (
    ShardingType.TABLE_WISE,
    ShardingType.ROW_WISE,
    ShardingType.TABLE_ROW_WISE,
    ShardingType.DATA_PARALLEL,
)
_PREFERENCE = tuple(ShardingType)  # tie-break order: data parallel, table wise, ...


@dataclass(frozen=True)
class ParameterConstraints:
    """What a user fixes for one table (TorchRec's ``ParameterConstraints``).

    Attributes:
      sharding_types: the types the planner may choose (default
        :data:`DEFAULT_SHARDING_TYPES`).
      pooling_factors: expected ids per bag, one per feature of the table, or one number
        for all of them (TorchRec's default: 1.0).
      min_partition: the fewest columns of a column shard (TorchRec: ``min_partition``).
      pinned: a :class:`ParameterSharding` to use as given.
    """

    sharding_types: tuple[ShardingType, ...] | None = None
    pooling_factors: tuple[float, ...] | float = 1.0
    min_partition: int = 32
    pinned: ParameterSharding | None = None

    def __post_init__(self) -> None:
        if self.sharding_types is not None:
            try:
                kinds = tuple(ShardingType(k) for k in self.sharding_types)
            except ValueError:
                known = [k.value for k in ShardingType]
                raise ValueError(
                    f"sharding_types {list(self.sharding_types)} name an unknown type; "
                    f"known: {known}"
                ) from None
            if not kinds:
                raise ValueError("sharding_types is empty; allow at least one type")
            object.__setattr__(self, "sharding_types", kinds)
        if not isinstance(self.pooling_factors, int | float):
            object.__setattr__(self, "pooling_factors", tuple(self.pooling_factors))
        if not isinstance(self.min_partition, int) or self.min_partition < 1:
            raise ValueError(f"min_partition must be an int >= 1, got {self.min_partition!r}")
        pinned = self.pinned
        if pinned is not None and not isinstance(pinned, ParameterSharding):
            raise ValueError(f"pinned must be a ParameterSharding, got {type(pinned).__name__}")
        if pinned is not None and pinned.sharding_type not in (
            self.sharding_types or (pinned.sharding_type,)
        ):
            raise ValueError(
                f"pinned {pinned.sharding_type.value} is not among the allowed sharding_types "
                f"{[k.value for k in self.allowed]}"
            )

    @property
    def allowed(self) -> tuple[ShardingType, ...]:
        return self.sharding_types if self.sharding_types is not None else DEFAULT_SHARDING_TYPES


@dataclass(frozen=True)
class PlanReport:
    """A plan's estimated costs; ``str(report)`` prints them as a table.

    Per table: its sharding and memory (weights + optimizer state, all replicas). Per
    device: bytes of the shards it holds, bytes it allocates (each local group at the
    busiest device's rows, plus data-parallel replicas), its budget, and the estimated
    lookup and communication time of one training step.
    """

    plan: ShardingPlan
    num_devices: int
    batch_size: int
    budget: float
    budget_note: str
    table_bytes: Mapping[str, float]
    held: np.ndarray
    allocated: np.ndarray
    lookup_seconds: np.ndarray
    comm_seconds: np.ndarray

    @property
    def seconds(self) -> np.ndarray:
        return self.lookup_seconds + self.comm_seconds

    @property
    def imbalance(self) -> float:
        """max / mean of the per-device estimated time (1.0: perfectly balanced)."""
        mean = float(self.seconds.mean())
        return float(self.seconds.max()) / mean if mean > 0 else 1.0

    def __str__(self) -> str:
        n = self.num_devices
        lines = [
            f"Sharding plan: {n} devices, batch {self.batch_size} per device, budget "
            f"{_bytes(self.budget)} per device ({self.budget_note})"
        ]
        rows = [("table", "type", "ranks", "memory")]
        for name, sharding in self.plan.items():
            ranks = sharding.resolved_ranks(n)
            where = "all" if sharding.sharding_type is ShardingType.DATA_PARALLEL else list(ranks)
            rows.append(
                (name, sharding.sharding_type.value, str(where), _bytes(self.table_bytes[name]))
            )
        lines += _columns(rows)
        rows = [("device", "held", "allocated", "budget", "lookup", "comm", "total")]
        for d in range(n):
            over = " OVER" if self.allocated[d] > self.budget else ""
            rows.append(
                (
                    str(d),
                    _bytes(self.held[d]),
                    _bytes(self.allocated[d]) + over,
                    _bytes(self.budget),
                    _seconds(self.lookup_seconds[d]),
                    _seconds(self.comm_seconds[d]),
                    _seconds(self.seconds[d]),
                )
            )
        lines += _columns(rows)
        lines.append(f"imbalance (max/mean of estimated time): {self.imbalance:.2f}")
        return "\n".join(lines)


class EmbeddingShardingPlanner:
    """Chooses a :class:`ShardingPlan` for a collection's tables (see the module docstring).

    Args:
      topology: the devices (:class:`Topology`).
      batch_size: bags per feature on each device.
      memory_budget: per device, a fraction of ``topology.hbm_cap`` (a float in (0, 1]) or
        bytes (an int). JAX on a GPU preallocates 75% of the memory by default: set
        ``XLA_PYTHON_CLIENT_MEM_FRACTION`` at least as high.
      reserve_bytes: kept free out of the budget for everything that is not a table.
      constraints: table name → :class:`ParameterConstraints`.
      data_parallel_max_bytes: the largest table (weights + optimizer state) proposed as
        data parallel unless its constraints list that type: a replica costs memory on
        every device.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        batch_size: int,
        memory_budget: float | int = 0.9,
        reserve_bytes: int = 2 * 2**30,
        constraints: Mapping[str, ParameterConstraints] | None = None,
        data_parallel_max_bytes: int = 16 * 2**20,
    ) -> None:
        if not isinstance(topology, Topology):
            raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be an int >= 1 (bags per device), got {batch_size!r}"
            )
        cap = topology.hbm_cap
        if isinstance(memory_budget, float) and 0 < memory_budget <= 1:
            budget, note = memory_budget * cap, f"{memory_budget:.0%} of {_bytes(cap)}"
        elif (
            isinstance(memory_budget, int)
            and not isinstance(memory_budget, bool)
            and 0 < memory_budget <= cap
        ):
            budget, note = float(memory_budget), f"of {_bytes(cap)}"
        else:
            raise ValueError(
                f"memory_budget must be a fraction in (0, 1] or bytes in [1, hbm_cap = {cap}], "
                f"got {memory_budget!r}"
            )
        if not isinstance(reserve_bytes, int) or not 0 <= reserve_bytes < budget:
            raise ValueError(
                f"reserve_bytes must be an int in [0, budget = {_bytes(budget)}), got {reserve_bytes!r}"
            )
        for name, c in (constraints or {}).items():
            if not isinstance(c, ParameterConstraints):
                raise ValueError(f"constraints[{name!r}] must be a ParameterConstraints")
        self.topology, self.batch_size = topology, batch_size
        self.budget = budget - reserve_bytes
        self.budget_note = f"{note}, reserve {_bytes(reserve_bytes)}"
        if not isinstance(data_parallel_max_bytes, int) or data_parallel_max_bytes < 0:
            raise ValueError(
                f"data_parallel_max_bytes must be an int >= 0, got {data_parallel_max_bytes!r}"
            )
        self.constraints = dict(constraints or {})
        self.data_parallel_max_bytes = data_parallel_max_bytes

    # ---- public ----------------------------------------------------------------------------
    def plan(
        self,
        tables: Sequence[BaseEmbeddingConfig],
        *,
        optimizer: Any = None,
        table_optimizers: Mapping[str, Any] | None = None,
    ) -> ShardingPlan:
        """A plan for ``tables`` with fused ``optimizer`` (None: plain tables) and per-table
        ``table_optimizers``, as the collections take them.

        Raises ``ValueError`` saying what does not fit, by how much and what to change.
        """
        profiles = self._profiles(tables, optimizer, table_optimizers)
        self._check_total(profiles)
        n = self.topology.num_devices
        load, chosen = DeviceLoad(self.topology, self.batch_size), {}
        for p in profiles:
            pinned = self._constraint(p.name).pinned
            if pinned is None:
                continue
            load = load.add(sharding_cost(p, pinned, n, self.batch_size))
            chosen[p.name] = pinned
            if load.allocated > self.budget:
                raise ValueError(
                    f"pinned {pinned.sharding_type.value} sharding of table {p.name!r} on ranks "
                    f"{list(pinned.resolved_ranks(n))} makes every device allocate "
                    f"{_bytes(load.allocated)}, over the budget of {_bytes(self.budget)} by "
                    f"{_bytes(load.allocated - self.budget)}; pin it elsewhere, split it "
                    f"(row_wise), or raise memory_budget"
                )
        rest = [p for p in profiles if p.name not in chosen]
        solo = {p.name: self._solo_seconds(p) for p in rest}
        share = (sum(solo.values()) + float(load.seconds.sum())) / n
        rest.sort(key=lambda p: (-solo[p.name], -p.nbytes, p.name))
        for p in rest:
            load, chosen[p.name] = self._place(p, load, hot=solo[p.name] > share * (1 + 1e-9))
        plan = ShardingPlan(chosen)
        plan.validate(list(tables), n)
        return plan

    def explain(
        self,
        tables: Sequence[BaseEmbeddingConfig],
        plan: ShardingPlan,
        *,
        optimizer: Any = None,
        table_optimizers: Mapping[str, Any] | None = None,
    ) -> PlanReport:
        """The estimated costs of any ``plan`` for ``tables`` (devices over budget are marked)."""
        n = self.topology.num_devices
        plan = plan if isinstance(plan, ShardingPlan) else ShardingPlan(plan)
        plan.validate(list(tables), n)
        load, table_bytes = DeviceLoad(self.topology, self.batch_size), {}
        for p in self._profiles(tables, optimizer, table_optimizers):
            cost = sharding_cost(p, plan[p.name], n, self.batch_size)
            load = load.add(cost)
            table_bytes[p.name] = float(cost.held.sum())
        return PlanReport(
            plan=plan,
            num_devices=n,
            batch_size=self.batch_size,
            budget=self.budget,
            budget_note=self.budget_note,
            table_bytes=table_bytes,
            held=load.held,
            allocated=np.full(n, load.allocated),
            lookup_seconds=load.lookup_seconds,
            comm_seconds=load.comm_seconds,
        )

    # ---- steps -----------------------------------------------------------------------------
    def _constraint(self, name: str) -> ParameterConstraints:
        return self.constraints.get(name, ParameterConstraints())

    def _profiles(self, tables, optimizer, table_optimizers) -> list[TableProfile]:
        names = [t.name for t in tables]
        for what, given in (
            ("constraints", self.constraints),
            ("table_optimizers", table_optimizers or {}),
        ):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ValueError(f"{what} name unknown tables {unknown}; the tables are {names}")
        distinct, profiles = [optimizer], []
        for table in tables:
            chosen = (table_optimizers or {}).get(table.name, optimizer)
            tag = next((i for i, o in enumerate(distinct) if o is chosen), None)
            if tag is None:
                distinct.append(chosen)
                tag = len(distinct) - 1
            factors = self._constraint(table.name).pooling_factors
            if isinstance(factors, int | float):
                factors = (factors,) * table.num_features()
            profiles.append(
                TableProfile.create(table, pooling_factors=factors, optimizer=chosen, tag=tag)
            )
        return profiles

    def _check_total(self, profiles: list[TableProfile]) -> None:
        n = self.topology.num_devices
        need = sum(
            p.nbytes
            * (n if self._constraint(p.name).allowed == (ShardingType.DATA_PARALLEL,) else 1)
            for p in profiles
        )
        if need <= n * self.budget:
            return
        weights = sum(p.table.num_embeddings * p.table.embedding_dim * p.itemsize for p in profiles)
        raise ValueError(
            f"the tables need {_bytes(need)} (weights {_bytes(weights)}, optimizer state and "
            f"gradients {_bytes(need - weights)}) but {n} device(s) hold {n} x "
            f"{_bytes(self.budget)} = {_bytes(n * self.budget)} ({self.budget_note}): "
            f"{_bytes(need - n * self.budget)} short; use at least "
            f"{math.ceil(need / self.budget)} devices, raise memory_budget, lower "
            f"reserve_bytes, or shrink the tables"
        )

    def _candidates(self, p: TableProfile, load: DeviceLoad) -> list[ParameterSharding]:
        n, dim = self.topology.num_devices, p.table.embedding_dim
        constraint = self._constraint(p.name)
        least = [int(d) for d in np.lexsort((load.held, load.seconds))]
        out: list[ParameterSharding] = []
        for kind in constraint.allowed:
            if kind is ShardingType.TABLE_WISE:
                out += [table_wise(r) for r in range(n)]
            elif kind is ShardingType.ROW_WISE and p.table.num_embeddings >= n:
                out.append(row_wise())
            elif kind is ShardingType.TABLE_ROW_WISE:
                k = 2
                while k <= min(n, p.table.num_embeddings):
                    out.append(table_row_wise(sorted(least[:k])))
                    k *= 2
            elif kind is ShardingType.DATA_PARALLEL:
                explicit = constraint.sharding_types is not None
                if explicit or p.nbytes <= self.data_parallel_max_bytes:
                    out.append(data_parallel())
            else:
                make = column_wise if kind is ShardingType.COLUMN_WISE else table_column_wise
                for k in range(2, n + 1):
                    if dim % k == 0 and dim // k >= constraint.min_partition:
                        out.append(make(least[:k]))
        return out

    def _solo_seconds(self, p: TableProfile) -> float:
        """The table's estimated time alone, table-wise: its owner's lookup and traffic."""
        cost = sharding_cost(p, table_wise(0), self.topology.num_devices, self.batch_size)
        return float(DeviceLoad(self.topology, self.batch_size).add(cost).seconds.max())

    def _place(
        self, p: TableProfile, load: DeviceLoad, hot: bool
    ) -> tuple[DeviceLoad, ParameterSharding]:
        n, options, misses = self.topology.num_devices, [], {}
        for sharding in self._candidates(p, load):
            new = load.add(sharding_cost(p, sharding, n, self.batch_size))
            kind = sharding.sharding_type
            if new.allocated > self.budget:
                over = new.allocated - self.budget
                misses[kind] = min(over, misses.get(kind, over))
                continue
            options.append((sharding, new))
        whole = [o for o in options if o[0].sharding_type is ShardingType.TABLE_WISE]
        if whole and not hot:  # bin-packing: the device whose time stays lowest
            best = min(whole, key=lambda o: _balance(o[1], o[0]))
            replicas = [o for o in options if o[0].sharding_type is ShardingType.DATA_PARALLEL]
            if replicas and replicas[0][1].work < best[1].work * (1 - 1e-9):
                best = replicas[0]
            return best[1], best[0]
        best = None
        for sharding, new in options:
            seconds = new.seconds
            worst, total = float(seconds.max()), float(seconds.sum())
            kind = sharding.sharding_type
            score = (worst + total / n, worst, new.allocated, _PREFERENCE.index(kind))
            if best is None or _before(score, best[0]):
                best = (score, new, sharding)
        if best is not None:
            return best[1], best[2]
        allowed = self._constraint(p.name).allowed
        tried = ", ".join(f"{k.value} over by {_bytes(v)}" for k, v in misses.items())
        raise ValueError(
            f"table {p.name!r} ({_bytes(p.nbytes)} of weights and optimizer state) fits no "
            f"allowed sharding type {[k.value for k in allowed]}: every device already "
            f"allocates {_bytes(load.allocated)} of its {_bytes(self.budget)} budget "
            f"({tried or 'no candidate'}); allow row_wise, add devices or raise memory_budget"
        )


def _balance(load: DeviceLoad, sharding: ParameterSharding) -> tuple:
    """Order of table-wise candidates: the smallest maximum time, then the most even times
    (sum of squares), then memory, then the lower rank (times compared to the picosecond)."""
    seconds = load.seconds
    return (
        round(float(seconds.max()) * 1e12),
        round(float(np.sqrt((seconds**2).sum())) * 1e12),
        load.allocated,
        sharding.ranks[0],
    )


def _before(a: tuple, b: tuple, rel: float = 1e-9) -> bool:
    """Lexicographic ``a < b``, floats equal within ``rel``."""
    for x, y in zip(a, b, strict=True):
        if abs(x - y) > rel * max(abs(x), abs(y)):
            return x < y
    return False


def _bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _seconds(x: float) -> str:
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
