"""Functional table-batched lookups with a custom VJP (the spec: :mod:`jaxrec.ops.spec`;
row-sharded views: :mod:`jaxrec.ops.sharded`).

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

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values
from jax.experimental import checkify
from jaxrec_kernels.layout import counts_bad_ids, covered_columns
from jaxrec_kernels.sparse_update import (
    fused_update_from_row_gradients,
    skips_nonfinite,
    sparse_row_gradients,
)

from jaxrec.ops.backend import Backend, BoundsCheckMode, Operation, kernel
from jaxrec.ops.bags import checked_offsets
from jaxrec.ops.nonfinite import report_nonfinite_rows
from jaxrec.ops.sharded import (
    bind_row_shards,
    bound_axis_size,
    check_parallel_axes,
    group_views,
    group_weight,
)
from jaxrec.ops.spec import GroupSpec, LookupSpec
from jaxrec.optim.fused import FusedTableParams, lookup_cotangent

__all__ = [
    "lookup",
    "sparse_gradients",
    # the spec and the row-sharded views, importable from here as before
    "GroupSpec",
    "LookupSpec",
    "bound_axis_size",
    "check_parallel_axes",
]


def _kernel(spec: LookupSpec, operation: Operation):
    """The implementation of ``operation`` the spec's backend resolved to."""
    return kernel(operation, Backend(spec.backend, spec.interpret))


def _groups_cover_output(spec: LookupSpec) -> bool:
    """Whether the groups' features together write every column of the pooled output."""
    covered = [covered_columns(g.features, g.dim, spec.num_columns) for g in spec.groups]
    return bool(np.logical_or.reduce(covered).all())


def _forward(spec: LookupSpec, params: tuple, ids, offsets, weights):
    """Run every group's forward kernel; returns (outputs, bad id count).

    Row-sharded: each device looks its rows up (other ids give zero rows), the partial
    results are summed over the axis and bad ids are counted once, on the global ids.
    """
    views = group_views(spec, params, ids, offsets)
    if spec.row_shards == 1:
        return _local_forward(spec, params, views, offsets, weights)
    local_spec = dataclasses.replace(spec, bounds_check=BoundsCheckMode.IGNORE.value)
    out, _ = _local_forward(local_spec, params, views, offsets, weights)
    out = jax.lax.psum(out, spec.row_shard_axis)
    bad = jnp.zeros((), jnp.int32)
    if counts_bad_ids(spec.bounds_check):
        bad = sum(count for _, _, count in views).astype(jnp.int32)
    return out, bad


def _local_forward(spec: LookupSpec, params: tuple, views, offsets, weights):
    """Every group's forward kernel over its (group, ids) view."""
    bad = jnp.zeros((), jnp.int32)
    if spec.pooled:
        fn = _kernel(spec, "pooled")
        out_dtype = spec.out_dtype or jnp.result_type(*(group_weight(p).dtype for p in params)).name
        out = None
        # Every output column belongs to some group, so the first group need not zero-fill
        # the columns of the others.
        fill = not _groups_cover_output(spec)
        for (group, ids, _), param in zip(views, params, strict=True):
            out, count = fn(
                group_weight(param),
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
            )
            bad = bad + count
        return out, bad
    fn = _kernel(spec, "sequence")
    outs = []
    for (group, ids, _), param in zip(views, params, strict=True):
        rows, count = fn(
            group_weight(param),
            ids,
            offsets,
            group.features,
            batch_size=spec.batch_size,
            bounds_check=spec.bounds_check,
            out_dtype=spec.out_dtype,
        )
        outs.append(rows)
        bad = bad + count
    return tuple(outs), bad


def _backward_arguments(spec: LookupSpec, group: GroupSpec) -> dict:
    """The static keyword arguments every backward kernel of ``group`` takes."""
    return {"batch_size": spec.batch_size, "dim": group.dim, "pooling": group.pooling}


def _row_gradients(spec: LookupSpec, group: GroupSpec, grad_out, ids, offsets, weights):
    """One group's sparse gradient: (unique rows + sentinel, summed row gradients)."""
    return sparse_row_gradients(
        grad_out,
        ids,
        offsets,
        weights,
        group.features,
        num_rows=group.num_rows,
        **_backward_arguments(spec, group),
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
        update = _kernel(spec, "update")
        new_weight, new_state, nonfinite = update(
            param.weight,
            param.state,
            step,
            grad_out,
            ids,
            offsets,
            weights,
            group.features,
            optimizer=group.optimizer,
            return_nonfinite=True,
            **_backward_arguments(spec, group),
        )
    counted = None
    if skips_nonfinite(group.optimizer):
        if spec.row_shards > 1:  # each device skipped rows of its own block
            nonfinite = jax.lax.psum(nonfinite, spec.row_shard_axis)
        name = f"{group.pooling}_{jnp.dtype(param.weight.dtype).name}_d{group.dim}"
        counted = report_nonfinite_rows(spec.bounds_check, nonfinite, name)
    return lookup_cotangent(param, new_weight, new_state, step, counted)


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
    # symbolic_zeros: every leaf arrives as a CustomVJPPrimal telling whether JAX
    # differentiates it; only weights that are differentiated get a gradient.
    wanted = weights is not None and weights.perturbed
    params, ids, offsets, weights = custom_vjp_primal_tree_values((params, ids, offsets, weights))
    result = _forward(spec, params, ids, offsets, weights)
    if any(isinstance(param, FusedTableParams) for param in params):
        ids = ids + _zero_after(result).astype(ids.dtype)
    return result, (params, ids, offsets, weights, weights if wanted else None)


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


def _zero_after_all(x: jax.Array) -> jax.Array:
    """An int32 zero that XLA cannot compute before every element of ``x`` exists.

    As :func:`_zero_after`, but over all of ``x`` (the largest population count of its
    elements, at most 64, shifted right by 7): no slice of ``x`` can stand in for it, so
    nothing that reads a table to compute ``x`` can move after what depends on the zero.
    An optimization barrier does not order them on the CPU (the compiler drops it first).

    >>> int(_zero_after_all(jnp.array([jnp.nan, -jnp.inf, 1.0])))
    0
    """
    if x.size == 0:
        return jnp.zeros((), jnp.int32)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jnp.max(jax.lax.population_count(bits)).astype(jnp.int32) >> 7


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
        fn = _kernel(spec, "weight_gradient")
        total = fn(group_weight(param), group_ids, offsets, grad_out, group.features, **kwargs)
    if spec.row_shards > 1:
        total = jax.lax.psum(total, spec.row_shard_axis)
    return total.astype(weights.dtype)


def _instantiate(cotangent):
    """``cotangent`` with every symbolic zero made an array of zeros."""
    return jax.tree.map(
        lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, cotangent
    )


def _lookup_bwd(spec: LookupSpec, residuals, cotangents):
    params, ids, offsets, weights, differentiated = residuals
    grad_out = _instantiate(cotangents[0])
    views = group_views(spec, params, ids, offsets)
    weights_grad = None
    if differentiated is not None:
        weights_grad = _weights_cotangent(spec, params, views, grad_out, offsets, weights)
        if any(isinstance(param, FusedTableParams) for param in params):
            # The weight gradient reads the tables the fused updates then overwrite in
            # place: the updates' ids depend on all of it, so every read comes first.
            zero = _zero_after_all(weights_grad)
            views = [(group, group_ids + zero, rest) for group, group_ids, rest in views]
    grads = []
    for g, ((group, group_ids, _), param) in enumerate(zip(views, params, strict=True)):
        group_grad_out = grad_out if spec.pooled else grad_out[g]
        grads.append(
            _group_cotangent(spec, group, param, group_grad_out, group_ids, offsets, weights)
        )
    return tuple(grads), None, None, weights_grad


_lookup.defvjp(_lookup_fwd, _lookup_bwd, symbolic_zeros=True)


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
        The backward computes it only when JAX differentiates the weights; a step that
        differentiates the tables alone does not read the rows again for it.

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
    spec = bind_row_shards(spec)
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
    if counts_bad_ids(spec.bounds_check):
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
    if bind_row_shards(spec).row_shards > 1:
        raise ValueError(
            "sparse_gradients of row-sharded tables is not supported; call it outside "
            f"shard_map over {spec.row_shard_axis!r} with the whole tables"
        )
    return tuple(
        _row_gradients(spec, group, grad_out if spec.pooled else grad_out[g], ids, offsets, weights)
        for g, group in enumerate(spec.groups)
    )
