"""How a collection inside a model finds out that it runs sharded.

:class:`~jaxrec.parallel.DistributedModelParallel` traces the user's model inside
``jax.shard_map`` with :func:`use_shardings` active: a mapping from each collection's module
path (``("sparse_arch",)`` for a DLRM's EBC) to its :class:`CollectionSharding`. The
collections call :func:`sharded_collection_lookup` before their ordinary lookup; under a
sharding it declares the sharded params (``{"shards": ..., "replicated": ...}``, see
:mod:`jaxrec.parallel.convert`) and runs :func:`~jaxrec.parallel.sharded_lookup`, otherwise
it returns ``None`` and the collection looks up as on one device. The mapping lives in a
:mod:`contextvars` variable for the duration of one trace; nothing is kept between traces.

With a ``record`` dict the context also collects every collection it meets (path →
module), which is how the wrapper discovers the collections of a model:

>>> import jax, jax.numpy as jnp
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
>>> ebc = EmbeddingBagCollection(tables=[
...     EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4, feature_names=["f"])])
>>> kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1, 2]), lengths=jnp.array([2]))
>>> seen = {}
>>> with use_shardings({}, record=seen):
...     _ = jax.eval_shape(ebc.init, jax.random.key(0), kjt)
>>> [(path, type(m).__name__) for path, m in seen.items()]
[((), 'EmbeddingBagCollection')]
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxrec.ops.backend import as_bounds_check_mode
from jaxrec.optim.fused import init_fused_table
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.sharded_lookup import ShardedLookupSpec, sharded_lookup

__all__ = [
    "CollectionSharding",
    "init_sharded_params",
    "sharded_collection_lookup",
    "use_shardings",
]


@dataclass(frozen=True)
class CollectionSharding:
    """One collection's placement: its :class:`ShardedLayout` over mesh axis ``axis``, the
    input all-to-all's ``ids_per_destination`` (None: the exact bound) and the dtype the
    pooled outputs and their gradients travel in (``comm_dtype``, None: their own; see
    :meth:`ShardedLookupSpec.create`)."""

    layout: ShardedLayout
    axis: str
    ids_per_destination: int | None = None
    comm_dtype: str | None = None


@dataclass(frozen=True)
class _Context:
    shardings: Mapping[tuple[str, ...], CollectionSharding]
    record: dict | None


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "jaxrec_collection_shardings", default=None
)


@contextlib.contextmanager
def use_shardings(
    shardings: Mapping[tuple[str, ...], CollectionSharding], *, record: dict | None = None
) -> Iterator[None]:
    """Collections at the paths of ``shardings`` look up sharded while the context is open;
    ``record`` (a dict) collects ``{path: module}`` of every collection called."""
    token = _CONTEXT.set(_Context(dict(shardings), record))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _path(module: Any) -> tuple[str, ...]:
    return tuple(str(p) for p in module.scope.path)


def init_sharded_params(sharding: CollectionSharding, tables, key: jax.Array) -> dict[str, Any]:
    """This device's sharded params, each table initialised as on one device.

    Runs inside ``shard_map``: device ``d`` builds its block of every local group from the
    tables it holds (``jax.lax.switch`` on the axis index, so a device only generates the
    tables it holds; a table is generated whole, then sliced). Table ``i`` of ``tables``
    draws from ``fold_in(key, i)``, as :func:`jaxrec.modules.stacked_tables.init_groups`.
    """
    layout, axis = sharding.layout, sharding.axis
    index = {t.name: i for i, t in enumerate(tables)}
    by_name = {t.name: t for t in tables}

    def whole(name: str) -> jax.Array:
        return by_name[name].initialize(jax.random.fold_in(key, index[name]))

    def block(g: int, rank: int) -> jax.Array:
        group = layout.groups[g]
        held = sorted(
            (s for s in layout.shards if s.group == g and s.rank == rank),
            key=lambda s: s.local_row,
        )
        parts = [
            whole(s.table)[
                s.row_offset : s.row_offset + s.num_rows, s.col_offset : s.col_offset + s.num_cols
            ].astype(group.dtype)
            for s in held
        ]
        used = sum(s.num_rows for s in held)
        parts.append(jnp.zeros((group.rows - used, group.dim), group.dtype))
        return jnp.concatenate(parts, axis=0)

    rank = jax.lax.axis_index(axis)
    shards: dict[str, Any] = {}
    for g, group in enumerate(layout.groups):
        branches = [lambda g=g, r=r: block(g, r) for r in range(layout.num_devices)]
        weight = jax.lax.switch(rank, branches)
        optimizer = layout.group_optimizer(g)
        shards[group.name] = weight if optimizer is None else init_fused_table(weight, optimizer)
    replicated: dict[str, Any] = {}
    if layout.dp_plan is not None:
        for group in layout.dp_plan.groups:
            parts = [whole(name) for name in group.tables]
            weight = jnp.concatenate(parts, axis=0).astype(group.dtype)
            optimizer = layout.optimizers[group.optimizer_tag]
            replicated[group.name] = (
                weight if optimizer is None else init_fused_table(weight, optimizer)
            )
    return {"shards": shards, "replicated": replicated}


def sharded_collection_lookup(module: Any, features: Any, weights: jax.Array | None) -> Any:
    """The collection's lookup when a sharding is active for it, else ``None``.

    Called by the collections inside their compact ``__call__``: declares the sharded params
    under the collection's ``PARAMS_NAME`` and returns what the single-device lookup returns
    (pooled ``[B, sum of dims]``, or one ``[capacity, dim]`` array per group).
    """
    context = _CONTEXT.get()
    if context is None:
        return None
    path = _path(module)
    if context.record is not None:
        context.record[path] = module
    sharding = context.shardings.get(path)
    if sharding is None:
        return None
    for name in ("data_parallel_axis", "row_shard_axis"):
        if getattr(module, name, None) is not None:
            raise ValueError(
                f"the collection at {'/'.join(path) or '(root)'} sets {name}; a sharding plan "
                f"places its tables, so leave {name} unset"
            )
    params = module.param(
        module.PARAMS_NAME,
        lambda key: init_sharded_params(sharding, tuple(module.tables), key),
    )
    mode = as_bounds_check_mode(module.bounds_check_mode)
    spec = ShardedLookupSpec.create(
        sharding.layout,
        tuple(features.keys()),
        batch_size=features.stride(),
        axis=sharding.axis,
        backend=module.backend,
        bounds_check=mode,
        ids_per_destination=sharding.ids_per_destination,
        comm_dtype=sharding.comm_dtype,
    )
    out, bad = sharded_lookup(spec, params, features.values(), features.offsets(), weights)
    if module.output_dtype is not None:
        dtype = jnp.dtype(module.output_dtype)
        out = out.astype(dtype) if hasattr(out, "astype") else tuple(o.astype(dtype) for o in out)
    from jaxrec.modules.input_checks import report_invalid_ids  # the modules import this file

    report_invalid_ids(module, mode, bad)
    return out
