"""Functional table-batched lookups with a custom VJP.

One call looks up every group of a collection: one kernel launch per group
(never per feature or table). The backward either

- applies the group's fused sparse optimizer to the touched rows only and
  hands the updated table and optimizer state out as the cotangent of the
  group's :class:`~jaxrec.optim.FusedTableParams` (no dense gradient of a
  table is ever built), or
- for a plain array table, returns its true gradient (the sparse row
  gradients scattered into a table-shaped array, as ``jax.grad`` expects).

Example (the XLA backend, two tables of dim 2 stacked in one group):

>>> import jax.numpy as jnp
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.ops.plan import build_plan
>>> plan = build_plan([
...     EmbeddingBagConfig(name="a", embedding_dim=2, num_embeddings=3, feature_names=["fa"]),
...     EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=2, feature_names=["fb"]),
... ])
>>> table = jnp.arange(10.0).reshape(5, 2)   # rows 0..2: table a, rows 3..4: table b
>>> spec = LookupSpec.create(plan, ("fa", "fb"), batch_size=2, backend="xla")
>>> ids = jnp.array([0, 2, 1, 1], jnp.int32)  # fa: [0, 2], []; fb: [1], [1]
>>> offsets = jnp.array([0, 2, 2, 3, 4], jnp.int32)
>>> out, bad = lookup(spec, (table,), ids, offsets, None)
>>> out.tolist()
[[4.0, 6.0, 8.0, 9.0], [0.0, 0.0, 8.0, 9.0]]
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxrec_kernels.pooled_lookup import (
    covered_columns,
    pooled_lookup,
    pooled_lookup_reference,
    position_bags,
)
from jaxrec_kernels.sequence_lookup import sequence_lookup, sequence_lookup_reference
from jaxrec_kernels.sparse_update import (
    fused_sparse_update,
    fused_sparse_update_reference,
    fused_update_from_row_gradients,
    skips_nonfinite,
    sparse_row_gradients,
)
from jaxrec_kernels.weight_gradient import weight_gradient, weight_gradient_reference

from jaxrec.ops.backend import BoundsCheckMode, resolve_backend
from jaxrec.ops.bags import checked_offsets
from jaxrec.ops.nonfinite import report_nonfinite_rows
from jaxrec.ops.plan import LookupPlan
from jaxrec.optim.fused import FusedTableParams, lookup_cotangent
from jaxrec.optim.sparse_optimizers import SparseOptimizer


@dataclass(frozen=True)
class GroupSpec:
    """What the kernels of one group need, all static."""

    features: tuple[tuple[int, int, int, int], ...]
    dim: int
    num_rows: int
    pooling: str  # "sum" | "mean" | "none"
    optimizer: Any = None  # the jaxrec.optim.SparseOptimizer of a fused group


@dataclass(frozen=True)
class LookupSpec:
    """Static description of one collection lookup (hashable: a custom VJP argument)."""

    groups: tuple[GroupSpec, ...]
    batch_size: int
    num_columns: int
    pooled: bool
    bounds_check: str
    backend: str
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
        group (``None`` for a plain table). ``row_shard_axis``: see :func:`lookup`.
        """
        check_parallel_axes(data_parallel_axis, row_shard_axis)
        chosen = resolve_backend(backend)
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


def _weight(param: jax.Array | FusedTableParams) -> jax.Array:
    return param.weight if isinstance(param, FusedTableParams) else param


def _kernel_options(spec: LookupSpec) -> dict[str, Any]:
    return {"interpret": spec.interpret} if spec.backend == "pallas" else {}


def _groups_cover_output(spec: LookupSpec) -> bool:
    """Whether the groups' features together write every column of the pooled output."""
    covered = [covered_columns(g.features, g.dim, spec.num_columns) for g in spec.groups]
    return bool(np.logical_or.reduce(covered).all())


def bound_axis_size(axis: str) -> int | None:
    """The size of mesh axis ``axis`` where it is bound (inside ``shard_map``), else None."""
    try:
        return int(jax.lax.axis_size(axis))
    except NameError:
        return None


def check_parallel_axes(data_parallel_axis: str | None, row_shard_axis: str | None) -> None:
    """Refuse the combination of data-parallel replicas and row-sharded tables (not built)."""
    if data_parallel_axis is not None and row_shard_axis is not None:
        raise ValueError(
            "data_parallel_axis and row_shard_axis cannot be combined yet; shard the rows "
            "over one mesh axis and keep the whole batch on it"
        )


def _row_shard(
    spec: LookupSpec, group: GroupSpec, local_rows: int, ids, kjt_of_pos, live, num_kjt: int
):
    """This device's view of ``group`` when its rows are split over ``spec.row_shard_axis``.

    Device ``d`` holds stacked rows ``[d * local_rows, (d + 1) * local_rows)``. Returns the
    group with one local table (``(kjt, 0, local_rows, col)`` per feature), the ids
    rewritten to local rows (an id in another shard, outside its table or in a feature
    outside the group becomes -1, which every kernel skips) and the number of the group's
    ids outside their tables, once per group feature that reads them.
    """
    if local_rows * spec.row_shards != group.num_rows:
        raise ValueError(
            f"a table group of {group.num_rows} rows holds {local_rows} rows on this device, "
            f"not 1/{spec.row_shards} of them: pass the tables split by rows over mesh axis "
            f"{spec.row_shard_axis!r} (jaxrec.parallel.row_shardings) into shard_map"
        )
    row_offset = np.zeros(num_kjt, np.int32)
    num_rows = np.full(num_kjt, -1, np.int32)
    listings = np.zeros(num_kjt, np.int32)
    for kjt, offset, rows, _ in group.features:
        if num_rows[kjt] >= 0 and (row_offset[kjt], num_rows[kjt]) != (offset, rows):
            raise ValueError(
                f"KJT feature {kjt} reads two tables of one group; row sharding needs one"
            )
        row_offset[kjt], num_rows[kjt] = offset, rows
        listings[kjt] += 1
    limit = jnp.asarray(num_rows)[kjt_of_pos]
    read = live & (limit >= 0)
    ok = read & (ids >= 0) & (ids < limit)
    first = jax.lax.axis_index(spec.row_shard_axis) * local_rows
    local_ids = jnp.where(ok, jnp.asarray(row_offset)[kjt_of_pos] + ids - first, -1)
    bad = jnp.sum(jnp.where(read & ~ok, jnp.asarray(listings)[kjt_of_pos], 0))
    features = tuple((k, 0, local_rows, col) for k, _, _, col in group.features)
    return dataclasses.replace(group, features=features, num_rows=local_rows), local_ids, bad


def _group_views(spec: LookupSpec, params: tuple, ids, offsets):
    """Per group: (group spec, ids, bad id count) as this device sees them: its row shard
    when sharded (counts of the global ids), else the group itself (count 0, the kernels
    count)."""
    if spec.row_shards == 1:
        return [(group, ids, 0) for group in spec.groups]
    bags, live = position_bags(offsets, ids.shape[0])
    kjt_of_pos = bags // spec.batch_size
    num_kjt = (offsets.shape[0] - 1) // spec.batch_size
    return [
        _row_shard(spec, group, _weight(param).shape[0], ids, kjt_of_pos, live, num_kjt)
        for group, param in zip(spec.groups, params, strict=True)
    ]


def _forward(spec: LookupSpec, params: tuple, ids, offsets, weights):
    """Run every group's forward kernel; returns (outputs, bad id count).

    Row-sharded: each device looks its rows up (other ids give zero rows), the partial
    results are summed over the axis and bad ids are counted once, on the global ids.
    """
    views = _group_views(spec, params, ids, offsets)
    if spec.row_shards == 1:
        return _local_forward(spec, params, views, offsets, weights)
    local_spec = dataclasses.replace(spec, bounds_check="ignore")
    out, _ = _local_forward(local_spec, params, views, offsets, weights)
    out = jax.lax.psum(out, spec.row_shard_axis)
    bad = jnp.zeros((), jnp.int32)
    if spec.bounds_check in ("fatal", "warning"):
        bad = sum(count for _, _, count in views).astype(jnp.int32)
    return out, bad


def _local_forward(spec: LookupSpec, params: tuple, views, offsets, weights):
    """Every group's forward kernel over its (group, ids) view."""
    bad = jnp.zeros((), jnp.int32)
    options = _kernel_options(spec)
    if spec.pooled:
        fn = pooled_lookup if spec.backend == "pallas" else (pooled_lookup_reference)
        out_dtype = spec.out_dtype or jnp.result_type(*(_weight(p).dtype for p in params)).name
        out = None
        # Every output column belongs to some group, so the first group need not zero-fill
        # the columns of the others.
        fill = not _groups_cover_output(spec)
        for (group, ids, _), param in zip(views, params, strict=True):
            out, count = fn(
                _weight(param),
                ids,
                offsets,
                weights,
                group.features,
                batch_size=spec.batch_size,
                num_columns=spec.num_columns,
                pooling=group.pooling,
                bounds_check=spec.bounds_check,
                out=out,
                out_dtype=out_dtype,
                fill_uncovered=fill,
                **options,
            )
            bad = bad + count
        return out, bad
    fn = sequence_lookup if spec.backend == "pallas" else (sequence_lookup_reference)
    outs = []
    for (group, ids, _), param in zip(views, params, strict=True):
        rows, count = fn(
            _weight(param),
            ids,
            offsets,
            group.features,
            batch_size=spec.batch_size,
            bounds_check=spec.bounds_check,
            out_dtype=spec.out_dtype,
            **options,
        )
        outs.append(rows)
        bad = bad + count
    return tuple(outs), bad


def _row_gradients(spec: LookupSpec, group: GroupSpec, grad_out, ids, offsets, weights):
    """One group's sparse gradient: (unique rows + sentinel, summed row gradients)."""
    return sparse_row_gradients(
        grad_out,
        ids,
        offsets,
        weights,
        group.features,
        batch_size=spec.batch_size,
        dim=group.dim,
        num_rows=group.num_rows,
        pooling=group.pooling,
    )


def _group_cotangent(spec: LookupSpec, group: GroupSpec, param, grad_out, ids, offsets, weights):
    """The cotangent of one group's parameter given the output cotangent.

    Fused: the updated table, state and step, with the marker of one genuine update
    (``jaxrec.optim.fused.lookup_cotangent``). Plain table: its gradient.
    """
    if not isinstance(param, FusedTableParams):
        rows, row_grads = _row_gradients(spec, group, grad_out, ids, offsets, weights)
        dense = jnp.zeros(param.shape, jnp.float32).at[rows].add(row_grads, mode="drop")
        return dense.astype(param.dtype)
    if group.optimizer is None:
        raise ValueError("a FusedTableParams group needs an optimizer in the lookup's spec")
    step = param.step + 1
    if spec.data_parallel_axis is not None:
        new_weight, new_state, nonfinite = _data_parallel_update(
            spec, group, param, step, grad_out, ids, offsets, weights
        )
    else:
        if spec.backend == "pallas":
            update = functools.partial(fused_sparse_update, interpret=spec.interpret)
        else:
            update = fused_sparse_update_reference
        new_weight, new_state, nonfinite = update(
            param.weight,
            param.state,
            step,
            grad_out,
            ids,
            offsets,
            weights,
            group.features,
            batch_size=spec.batch_size,
            dim=group.dim,
            pooling=group.pooling,
            optimizer=group.optimizer,
            return_nonfinite=True,
        )
    if skips_nonfinite(group.optimizer):
        name = f"{group.pooling}_{jnp.dtype(param.weight.dtype).name}_d{group.dim}"
        report_nonfinite_rows(spec.bounds_check, nonfinite, name)
    return lookup_cotangent(param, new_weight, new_state, step)


def _data_parallel_update(spec, group, param, step, grad_out, ids, offsets, weights):
    """Replicas gather each other's sparse row gradients, then all apply the same update."""
    rows, row_grads = _row_gradients(spec, group, grad_out, ids, offsets, weights)
    axis = spec.data_parallel_axis
    rows = jax.lax.all_gather(rows, axis, tiled=True)
    row_grads = jax.lax.all_gather(row_grads, axis, tiled=True)
    return fused_update_from_row_gradients(
        param.weight,
        param.state,
        step,
        rows,
        row_grads,
        dim=group.dim,
        optimizer=group.optimizer,
        return_nonfinite=True,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(spec: LookupSpec, params: tuple, ids, offsets, weights):
    return _forward(spec, params, ids, offsets, weights)


def _lookup_fwd(spec: LookupSpec, params: tuple, ids, offsets, weights):
    result = _forward(spec, params, ids, offsets, weights)
    if any(isinstance(param, FusedTableParams) for param in params):
        ids = ids + _zero_after(result).astype(ids.dtype)
    return result, (params, ids, offsets, weights)


def _zero_after(result) -> jax.Array:
    """An int32 zero that XLA cannot compute before every leaf of ``result`` exists.

    The backward writes a fused table in place. When the loss is linear in the outputs the
    backward does not depend on the forward's result, so nothing orders the forward's reads
    of a table before those writes, and XLA keeps copies of the table to stay correct (two
    per step on the CPU; an optimization barrier does not help there: the CPU compiler
    drops barriers before it places copies). The backward's ids get this zero added, which
    makes every write depend on every read. The population count of a word of at most 64
    bits is at most 64, so shifting it right by 7 gives 0 for every value (NaN included);
    XLA does not know that bound and keeps the dependence. It also keeps the forward alive
    when only the gradient is asked for.

    >>> int(_zero_after((jnp.full((2, 3), jnp.nan), jnp.ones((4,), jnp.bfloat16))))
    0
    """
    zero = jnp.zeros((), jnp.int32)
    for leaf in jax.tree.leaves(result):
        if leaf.size == 0:
            continue
        first = leaf.reshape(-1)[0]
        bits = jax.lax.bitcast_convert_type(first, jnp.dtype(f"uint{8 * first.dtype.itemsize}"))
        zero = zero + (jax.lax.population_count(bits).astype(jnp.int32) >> 7)
    return zero


def _weights_cotangent(spec: LookupSpec, params: tuple, views, grad_out, offsets, weights):
    """The gradient of a pooled lookup w.r.t. its per-sample weights, every group summed.

    Each group reads its table as the forward saw it (a fused group's residual, before this
    step's update). Row-sharded: each device adds its rows' part and the parts are summed
    over the axis. A sequence lookup does not read the weights: zeros.
    """
    if not spec.pooled:
        return jnp.zeros_like(weights)
    total = None
    for (group, group_ids, _), param in zip(views, params, strict=True):
        kwargs = {"batch_size": spec.batch_size, "pooling": group.pooling, "out": total}
        if spec.backend == "pallas":
            fn = functools.partial(weight_gradient, interpret=spec.interpret)
        else:
            fn = weight_gradient_reference
        total = fn(_weight(param), group_ids, offsets, grad_out, group.features, **kwargs)
    if spec.row_shards > 1:
        total = jax.lax.psum(total, spec.row_shard_axis)
    return total.astype(weights.dtype)


def _lookup_bwd(spec: LookupSpec, residuals, cotangents):
    params, ids, offsets, weights = residuals
    grad_out, _ = cotangents
    views = _group_views(spec, params, ids, offsets)
    weights_grad = None
    if weights is not None:
        weights_grad = _weights_cotangent(spec, params, views, grad_out, offsets, weights)
        # The weight gradient reads the tables before the fused updates overwrite them in
        # place: order it first (XLA drops both when the weights are not differentiated).
        # The CPU compiler drops the barrier before it places copies, so there a step that
        # differentiates the weights of a fused lookup copies the fused tables (correct,
        # not in place); a step that does not is unaffected.
        weights_grad, params = jax.lax.optimization_barrier((weights_grad, params))
    grads = []
    for g, ((group, group_ids, _), param) in enumerate(zip(views, params, strict=True)):
        group_grad_out = grad_out if spec.pooled else grad_out[g]
        grads.append(
            _group_cotangent(spec, group, param, group_grad_out, group_ids, offsets, weights)
        )
    return tuple(grads), None, None, weights_grad


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _bind_row_shards(spec: LookupSpec) -> LookupSpec:
    """``spec`` with ``row_shards`` set to the row axis's size where it is bound, else 1."""
    if spec.row_shard_axis is None:
        return spec
    size = bound_axis_size(spec.row_shard_axis)
    return dataclasses.replace(spec, row_shards=1 if size is None else size)


def lookup(
    spec: LookupSpec,
    params: tuple,
    ids: jax.Array,
    offsets: jax.Array,
    weights: jax.Array | None,
):
    """Look up every group of a collection.

    Args:
      spec: the static layout (``LookupSpec.create``).
      params: one entry per group: its stacked table [rows, dim], or a
        :class:`~jaxrec.optim.FusedTableParams` when its optimizer is fused.
      ids: KJT values [capacity] (only the first ``offsets[-1]`` are read).
      offsets: KJT offsets [F * B + 1].
      weights: per-sample weights [capacity] or None. They scale the rows. Pooled: their
        cotangent is ``<row_i, grad_bag>`` (divided by the bag length under MEAN; zero
        for padding and bad ids), as FBGEMM's; sequence lookups do not read them (zero).

    Returns:
      ``(out, bad_count)``: pooled: out [B, sum of dims] in the
      collection's feature order; sequence: a tuple with one [capacity, dim]
      array per group (row i is the embedding of position i). ``bad_count``
      (FATAL and WARNING; else 0) counts the ids outside their tables plus the
      bags of negative length or ending past the capacity (emptied first, see
      :mod:`jaxrec.ops.bags`). Under FATAL a bad id or bag raises (a checkify
      error inside ``jit``).

    With ``spec.row_shard_axis`` bound (inside ``shard_map`` over that mesh axis) each entry
    of ``params`` is this device's block of rows (the stacked group split evenly by rows,
    ``jaxrec.parallel.row_shardings``) and ``ids`` / ``offsets`` are the whole batch on every
    device: each device looks up the ids that fall in its rows, the partial results are
    summed over the axis (``psum``), and the backward updates each device's rows only.
    Where the axis is not bound the lookup is the unsharded one.
    """
    spec = _bind_row_shards(spec)
    offsets, bad_bags = checked_offsets(offsets, ids.shape[0])
    out, bad = _lookup(spec, tuple(params), ids, offsets, weights)
    if spec.bounds_check == BoundsCheckMode.FATAL.value:
        checkify.check(
            bad == 0, "{count} ids are outside their tables (bounds_check_mode=FATAL)", count=bad
        )
        checkify.check(
            bad_bags == 0,
            "{count} bags have a negative length or end past the values' capacity "
            "(bounds_check_mode=FATAL)",
            count=bad_bags,
        )
    if spec.bounds_check in (BoundsCheckMode.FATAL.value, BoundsCheckMode.WARNING.value):
        bad = bad + bad_bags
    return out, bad


def sparse_gradients(
    spec: LookupSpec,
    ids: jax.Array,
    offsets: jax.Array,
    weights: jax.Array | None,
    grad_out: jax.Array,
) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """The true sparse gradient of every group: ``((rows, row_grads), ...)``.

    For a pooled lookup with output cotangent ``grad_out [B, sum of dims]`` (or, for a
    sequence lookup, a tuple of per-group ``[capacity, dim]`` cotangents), each group gets
    ``rows [M] int32`` — the unique touched rows of its stacked buffer in ascending order,
    then the sentinel ``num_rows`` — and ``row_grads [M, dim] float32``, each row's gradient
    summed over its occurrences (zeros in unused slots). This is what an optimizer of one's
    own consumes; scatter-adding ``row_grads`` at ``rows`` (``mode="drop"``) gives the
    dense gradient.
    """
    if _bind_row_shards(spec).row_shards > 1:
        raise ValueError(
            "sparse_gradients of row-sharded tables is not supported; call it outside "
            f"shard_map over {spec.row_shard_axis!r} with the whole tables"
        )
    return tuple(
        _row_gradients(spec, group, grad_out if spec.pooled else grad_out[g], ids, offsets, weights)
        for g, group in enumerate(spec.groups)
    )
