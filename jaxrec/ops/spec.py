"""The static description of one collection lookup: what each group's kernels need.

A :class:`LookupSpec` is built once from a :class:`~jaxrec.ops.plan.LookupPlan` and the
KJT's keys; it is frozen and hashable (the custom VJP's static argument) and holds no
arrays. Each :class:`GroupSpec` is one stacked buffer: its features'
:class:`~jaxrec_kernels.layout.FeatureLayout`, its dim, rows, pooling and fused optimizer.

>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.ops.plan import build_plan
>>> plan = build_plan([
...     EmbeddingBagConfig(name="a", embedding_dim=2, num_embeddings=3, feature_names=["fa"]),
...     EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=2, feature_names=["fb"]),
... ])
>>> spec = LookupSpec.create(plan, ("fb", "fa"), batch_size=4, backend="xla")
>>> [(f.kjt_index, f.row_offset, f.col_offset) for f in spec.groups[0].features]
[(1, 0, 0), (0, 3, 2)]
>>> spec.bounds_check, spec.backend
('warning', 'xla')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from jaxrec_kernels.layout import BoundsCheck, FeatureLayout, Pooling

from jaxrec.ops.backend import BoundsCheckMode, resolve_backend
from jaxrec.ops.plan import LookupPlan
from jaxrec.ops.sharded import check_parallel_axes
from jaxrec.optim.sparse_optimizers import SparseOptimizer

__all__ = ["GroupSpec", "LookupSpec"]


@dataclass(frozen=True)
class GroupSpec:
    """What the kernels of one group need, all static."""

    features: tuple[FeatureLayout, ...]
    dim: int
    num_rows: int
    pooling: Pooling
    optimizer: Any = None  # the jaxrec.optim.SparseOptimizer of a fused group


@dataclass(frozen=True)
class LookupSpec:
    """Static description of one collection lookup (hashable: a custom VJP argument)."""

    groups: tuple[GroupSpec, ...]
    batch_size: int
    num_columns: int
    pooled: bool
    bounds_check: BoundsCheck  # a BoundsCheckMode's value
    backend: str  # "pallas" | "xla": what runs (jaxrec.ops.backend.resolve_backend)
    interpret: bool
    out_dtype: str | None
    data_parallel_axis: str | None = None  # mesh axis of data-parallel replicas (shard_map)
    row_shard_axis: str | None = None  # mesh axis the tables' rows are split over (shard_map)
    row_shards: int = 1  # that axis's size where it is bound, else 1 (set by ``lookup``)

    @classmethod
    def create(
        cls,
        plan: LookupPlan,
        kjt_keys: tuple[str, ...],
        *,
        batch_size: int,
        bounds_check: BoundsCheckMode | str = BoundsCheckMode.WARNING,
        backend: str = "auto",
        out_dtype: Any = None,
        optimizer: Any = None,
        data_parallel_axis: str | None = None,
        row_shard_axis: str | None = None,
    ) -> LookupSpec:
        """The spec of a lookup of ``plan`` for a KJT with ``kjt_keys``.

        ``optimizer``: the fused optimizer of every group, or a sequence with one entry per
        group (``None`` for a plain table). ``row_shard_axis``: see
        :func:`jaxrec.ops.lookup.lookup`. ``backend`` is resolved for the plan's forward
        operation (pooled or sequence, :func:`~jaxrec.ops.backend.resolve_backend`).
        """
        check_parallel_axes(data_parallel_axis, row_shard_axis)
        chosen = resolve_backend(backend, "pooled" if plan.pooled else "sequence")
        mode = BoundsCheckMode(bounds_check) if isinstance(bounds_check, str) else bounds_check
        if isinstance(optimizer, list | tuple) and not isinstance(optimizer, SparseOptimizer):
            if len(optimizer) != len(plan.groups):
                raise ValueError(f"got {len(optimizer)} optimizers for {len(plan.groups)} groups")
            optimizers = tuple(optimizer)
        else:
            optimizers = (optimizer,) * len(plan.groups)
        groups = tuple(
            GroupSpec(
                plan.kernel_features(g, tuple(kjt_keys)),
                group.dim,
                group.num_rows,
                group.pooling,
                optimizers[g],
            )
            for g, group in enumerate(plan.groups)
        )
        return cls(
            groups=groups,
            batch_size=batch_size,
            num_columns=plan.num_columns,
            pooled=plan.pooled,
            bounds_check=mode.value,
            backend=chosen.name,
            interpret=chosen.interpret,
            out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
            data_parallel_axis=data_parallel_axis,
            row_shard_axis=row_shard_axis,
        )
