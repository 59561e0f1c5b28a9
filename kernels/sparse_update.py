"""Fused sparse backward of one stacked table group: Pallas GPU kernel + XLA reference.

The backward of a lookup never builds a dense table gradient: it maps every id position to
the row it read, sorts the positions by row and sums each row's gradient in that fixed order
(:mod:`~jaxrec_kernels.row_gradients`, which also gives the true sparse gradient), then
applies the group's sparse optimizer to the touched rows only, in place
(:mod:`~jaxrec_kernels.row_update`). Layout and gradient of a position are as in
:mod:`~jaxrec_kernels.row_gradients`.

The Pallas kernel runs one program per block of ``block_rows`` sorted slots; a slot that
starts the run of a touched row (a "head") owns that row. Each program sums the gradients of
its rows' occurrences (``block_occ`` occurrences of every row per loop step, masked past a
run's end); a row with more than ``chunk_occ`` occurrences (a hot id) is summed instead from
the partial sums of its chunks of ``chunk_occ`` occurrences, which a first pass computes
with many programs (:mod:`~jaxrec_kernels.run_chunks`), so no program walks a hot row's
whole run alone. Each program then loads the rows and their optimizer state, calls ``optimizer.update`` on the
``[block_rows, Dp]`` block (``Dp`` = ``D`` rounded up to a power of two, padded lanes zero)
and stores rows and state back through ``input_output_aliases``: under ``jit`` with donated
buffers no table is copied, and the work grows with the batch, not with ``R``. Every sum runs
in a fixed order, so two runs give bitwise-equal tables (no atomics). The XLA reference
gathers the touched rows, updates them and scatters them back.

>>> from typing import NamedTuple
>>> import jax.numpy as jnp
>>> class SGD(NamedTuple):              # a RowOptimizer: stateless SGD
...     learning_rate: float = 0.5
...     stochastic_rounding: bool = False
...     def init(self, rows, dim):
...         return {}
...     def update(self, w, state, g, step, dim):
...         return w - self.learning_rate * g, state
>>> ids, offsets = jnp.array([1, 1, 2], jnp.int32), jnp.array([0, 2, 3], jnp.int32)
>>> args = (jnp.zeros((3, 2)), {}, 1, jnp.ones((2, 2)), ids, offsets, None, ((0, 0, 3, 0),))
>>> layout = dict(batch_size=2, dim=2, pooling="sum", optimizer=SGD())
>>> new_w, _ = fused_sparse_update(*args, **layout, interpret=True)
>>> new_w.tolist()
[[0.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]]
>>> fused_sparse_update_reference(*args, **layout)[0].tolist()
[[0.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._pallas_compat import (
    check_launch_shape,
    compiler_params,
    masked_load,
    masked_store,
    next_power_of_2,
)
from .entry import Implementation, check_implementation, xla_reference
from .layout import FeatureLayout
from .row_gradients import (
    POOLINGS,
    check_gradient_args,
    occurrences,
    run_lengths,
    segment_row_gradients,
    sort_rows,
    sparse_row_gradients,
)
from .row_update import (
    RowOptimizer,
    apply_unique_rows,
    check_table,
    fused_update_from_row_gradients,
    skips_nonfinite,
    store_rows,
)
from .run_chunks import chunk_partials, split_runs, sum_occurrences, sum_partials
from .stochastic_rounding import seed_for_step

__all__ = [
    "POOLINGS",
    "SparseUpdateConfig",
    "default_update_config",
    "fused_sparse_update",
    "fused_sparse_update_reference",
    "fused_update_from_row_gradients",
    "skips_nonfinite",
    "sparse_row_gradients",
]


@dataclass(frozen=True)
class SparseUpdateConfig:
    """Launch shape of the fused update kernel (``block_rows``, ``block_occ``: powers of two).

    ``block_rows`` sorted slots per program (each slot that starts a row's run owns that row);
    ``block_occ`` occurrences of each row gathered per loop step; ``num_warps`` / ``num_stages``
    as in Triton; ``evict_first``: load and store table rows and state with an evict-first
    cache hint (they are touched once), leaving the L2 cache to ``grad_out``; ``chunk_occ``:
    a row with more occurrences than this is summed in chunks of ``chunk_occ`` by a first
    pass (:mod:`~jaxrec_kernels.run_chunks`), so the longest serial walk of one program is
    about ``chunk_occ + occurrences / chunk_occ`` steps rather than ``occurrences``.

    >>> SparseUpdateConfig(block_rows=8).block_occ
    1
    """

    block_rows: int = 4
    block_occ: int = 1
    num_warps: int = 1
    num_stages: int = 1
    evict_first: bool = False
    chunk_occ: int = 64

    def __post_init__(self):
        check_launch_shape(
            self, ("block_rows", "block_occ", "num_warps", "chunk_occ"), ("num_stages",)
        )


def default_update_config(dim: int) -> SparseUpdateConfig:
    """The launch shape used when none is given: about 512 row elements per warp.

    Small programs keep many rows in flight: the backward waits on memory (an H100 ran
    ``(4, 1, 1, 1)`` fastest at D=128, 2026-11-23).

    >>> c = default_update_config(128)
    >>> c.block_rows, c.block_occ, c.num_warps, c.num_stages, c.evict_first, c.chunk_occ
    (4, 1, 1, 1, False, 64)
    """
    dim_pad = next_power_of_2(dim)
    block_rows = max(1, min(32, 512 // dim_pad))
    num_warps = max(1, min(8, block_rows * dim_pad // 512))
    return SparseUpdateConfig(block_rows=block_rows, num_warps=num_warps)


# --------------------------------------------------------------------------- XLA reference


@functools.partial(
    jax.jit, static_argnames=("features", "batch_size", "dim", "pooling", "optimizer")
)
def _update_xla(
    weights,
    state,
    step,
    grad_out,
    ids,
    offsets,
    per_sample_weights,
    *,
    features,
    batch_size,
    dim,
    pooling,
    optimizer,
):
    num_rows = weights.shape[0]
    rows, grads = segment_row_gradients(
        grad_out,
        ids,
        offsets,
        per_sample_weights,
        features=features,
        batch_size=batch_size,
        dim=dim,
        num_rows=num_rows,
        pooling=pooling,
    )
    return apply_unique_rows(weights, state, step, rows, grads, dim=dim, optimizer=optimizer)


# --------------------------------------------------------------------------- Pallas kernel


class _UpdateFn(NamedTuple):
    """``optimizer.update`` on one block, traced once; closed-over arrays become inputs."""

    jaxpr: Any  # jax.extend.core.Jaxpr over (w, *state, g, step)
    consts: list  # scalars it closed over, passed to the kernel as [1] arrays
    out_tree: Any


def _trace_update(optimizer, names, rowwise, block_rows, dim_pad, dim, step):
    rows = jax.ShapeDtypeStruct((block_rows, dim_pad), jnp.float32)
    per_row = jax.ShapeDtypeStruct((block_rows,), jnp.float32)
    state = tuple(per_row if rowwise[k] else rows for k in names)

    def fn(w, s, g, t):
        new_w, new_s = optimizer.update(w, dict(zip(names, s, strict=True)), g, t, dim)
        return new_w, tuple(new_s[k] for k in names)

    step_aval = jax.ShapeDtypeStruct((), jnp.asarray(step).dtype)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(rows, state, rows, step_aval)
    for c in closed.consts:
        if jnp.size(c) != 1:
            raise ValueError(
                f"optimizer.update closes over an array of shape {jnp.shape(c)}; only scalars "
                "can enter the fused kernel"
            )
    return _UpdateFn(closed.jaxpr, list(closed.consts), jax.tree.structure(out_shape))


def _table_load(view, mask, evict_first):
    return masked_load(view, mask, 0, eviction_policy="evict_first" if evict_first else None)


def _table_store(view, value, mask, evict_first):
    masked_store(view, value, mask, eviction_policy="evict_first" if evict_first else None)


def _update_kernel(
    count_ref,
    num_chunks_ref,
    first_chunk_ref,
    partial_ref,
    rows_ref,
    src_row_ref,
    src_col_ref,
    scale_ref,
    grad_ref,
    step_ref,
    seed_ref,
    *refs,
    names,
    rowwise,
    update,
    optimizer,
    dim,
    dim_pad,
    num_slots,
    block_rows,
    block_occ,
    evict_first,
    skip_nonfinite,
):
    refs = list(refs)
    const_refs = refs[: len(update.consts)]
    del refs[: len(update.consts)]
    del refs[: 1 + len(names)]  # the aliased inputs: same memory as the outputs
    w_ref, *state_refs, nonfinite_ref = refs
    program = pl.program_id(0)
    nonfinite_ref[program] = jnp.int32(0)

    # This program owns the runs that start in its sorted slots [k0, k0 + block_rows): short
    # runs summed over their occurrences, long ones over their chunk partials (run_chunks).
    k = program * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    in_range = k < num_slots
    k = jnp.where(in_range, k, 0)
    count = masked_load(count_ref.at[k], in_range, 0)
    num_chunks = masked_load(num_chunks_ref.at[k], in_range, 0)

    @pl.when(jnp.max(count + num_chunks) > 0)
    def _():
        cols = jnp.arange(dim_pad, dtype=jnp.int32)
        col_ok = cols < dim
        grads = sum_occurrences(
            k,
            count,
            src_row_ref,
            src_col_ref,
            scale_ref,
            grad_ref,
            dim=dim,
            dim_pad=dim_pad,
            block_occ=block_occ,
            acc=jnp.zeros((block_rows, dim_pad), jnp.float32),
        )
        first_chunk = masked_load(first_chunk_ref.at[k], num_chunks > 0, 0)
        grads = sum_partials(
            first_chunk, num_chunks, partial_ref, dim_pad=dim_pad, block_occ=block_occ, acc=grads
        )
        # Lanes that own no row get the out-of-range row R: never written on a GPU (masked),
        # and dropped by the interpreter's scatter rather than colliding with a real row.
        touched = (count > 0) | (num_chunks > 0)
        if skip_nonfinite:
            # A row whose summed gradient is not finite is neither read nor written.
            # x * 0 is NaN exactly for a NaN or infinite x (padded lanes hold zeros); a sum
            # over the row stays in Triton's reductions.
            finite = jnp.isfinite(jnp.sum(grads * 0.0, axis=1))
            nonfinite_ref[program] = jnp.sum(touched & ~finite, dtype=jnp.int32)
            touched = touched & finite
        rows = jnp.where(touched, masked_load(rows_ref.at[k], touched, 0), w_ref.shape[0])
        lanes = touched[:, None] & col_ok[None, :]
        at_rows = (rows[:, None], cols[None, :])
        w = _table_load(w_ref.at[at_rows], lanes, evict_first).astype(jnp.float32)
        state = [
            _table_load(ref.at[rows], touched, evict_first)
            if rowwise[name]
            else _table_load(ref.at[at_rows], lanes, evict_first)
            for name, ref in zip(names, state_refs, strict=True)
        ]
        step = step_ref[0]
        consts = [ref[0] for ref in const_refs]
        flat = jex.jaxpr_as_fun(jex.ClosedJaxpr(update.jaxpr, consts))(
            w, *[s.astype(jnp.float32) for s in state], grads, step
        )
        new_w, new_state = jax.tree.unflatten(update.out_tree, flat)
        stored = store_rows(new_w, w_ref.dtype, optimizer, seed_ref[0], rows)
        _table_store(w_ref.at[at_rows], stored, lanes, evict_first)
        for name, ref, value in zip(names, state_refs, new_state, strict=True):
            if rowwise[name]:
                _table_store(ref.at[rows], value.astype(ref.dtype), touched, evict_first)
            else:
                _table_store(ref.at[at_rows], value.astype(ref.dtype), lanes, evict_first)


@functools.partial(
    jax.jit,
    static_argnames=(
        "features",
        "batch_size",
        "dim",
        "pooling",
        "optimizer",
        "interpret",
        "config",
    ),
)
def _update_pallas(
    weights,
    state,
    step,
    grad_out,
    ids,
    offsets,
    per_sample_weights,
    *,
    features,
    batch_size,
    dim,
    pooling,
    optimizer,
    interpret,
    config,
):
    num_rows = weights.shape[0]
    occ = occurrences(ids, offsets, per_sample_weights, features, batch_size, num_rows, pooling)
    srt = sort_rows(occ.rows, num_rows)
    m = occ.rows.shape[0]
    block_rows = config.block_rows

    names = tuple(sorted(state))
    rowwise = {k: state[k].ndim == 1 for k in names}
    dim_pad = next_power_of_2(dim)
    step = jnp.asarray(step)
    update = _trace_update(optimizer, names, rowwise, block_rows, dim_pad, dim, step)
    consts = [jnp.reshape(jnp.asarray(c), (1,)) for c in update.consts]
    plan = split_runs(run_lengths(srt), config.chunk_occ)
    sorted_occ = (occ.src_row[srt.order], occ.src_col[srt.order], occ.scale[srt.order])
    partials = chunk_partials(
        plan,
        *sorted_occ,
        grad_out,
        dim=dim,
        dim_pad=dim_pad,
        block=block_rows,
        block_occ=config.block_occ,
        num_warps=config.num_warps,
        interpret=interpret,
    )
    inputs = [
        plan.count,
        plan.num_chunks,
        plan.first_chunk,
        partials,
        srt.rows,
        *sorted_occ,
        grad_out,
        jnp.reshape(step, (1,)),
        jnp.reshape(seed_for_step(step), (1,)),
        *consts,
        weights,
        *(state[k] for k in names),
    ]
    first_table = len(inputs) - 1 - len(names)
    kernel = functools.partial(
        _update_kernel,
        names=names,
        rowwise=rowwise,
        update=update,
        optimizer=optimizer,
        dim=dim,
        dim_pad=dim_pad,
        num_slots=m,
        block_rows=block_rows,
        block_occ=config.block_occ,
        evict_first=config.evict_first,
        skip_nonfinite=skips_nonfinite(optimizer),
    )
    num_programs = pl.cdiv(m, block_rows)
    *new_tables, nonfinite = pl.pallas_call(
        kernel,
        grid=(num_programs,),
        out_shape=[jax.ShapeDtypeStruct(weights.shape, weights.dtype)]
        + [jax.ShapeDtypeStruct(state[k].shape, state[k].dtype) for k in names]
        + [jax.ShapeDtypeStruct((num_programs,), jnp.int32)],
        input_output_aliases={first_table + i: i for i in range(1 + len(names))},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="jaxrec_fused_sparse_update",
    )(*inputs)
    new_weights, *new_state = new_tables
    return new_weights, dict(zip(names, new_state, strict=True)), jnp.sum(nonfinite)


# --------------------------------------------------------------------------- entry point


def fused_sparse_update(
    weights: jax.Array,
    state: dict[str, jax.Array],
    step: jax.Array,
    grad_out: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    batch_size: int,
    dim: int,
    pooling: str,
    optimizer: RowOptimizer,
    implementation: Implementation = "pallas",
    interpret: bool = False,
    config: SparseUpdateConfig | None = None,
    return_nonfinite: bool = False,
) -> tuple[jax.Array, ...]:
    """One fused optimizer step on the touched rows: ``(new_weights, new_state)``.

    The gradient of every touched row is summed (see the module docstring), then
    ``optimizer.update`` (a :class:`~jaxrec_kernels.row_update.RowOptimizer`, e.g. a
    ``jaxrec.optim.SparseOptimizer``) runs at step ``step`` (t >= 1) on those rows only; the
    rows nobody touched stay bit-identical. 16-bit tables are stored back with stochastic
    rounding (seeded by the step and the row id) when the optimizer asks for it.

    ``implementation="pallas"`` runs the Triton kernel (``interpret=True`` runs it on the
    CPU; ``config`` is its launch shape, :func:`default_update_config` when None): the tables
    are updated in place when their buffers are donated and only the touched rows are read
    and written. ``implementation="xla"`` (:data:`fused_sparse_update_reference`) is the
    plain-XLA reference: gather, update, scatter back (``mode="drop"``); the two agree up to
    the order of float32 sums.

    Non-finite guard (on unless the optimizer's ``skip_nonfinite`` is False): a row whose
    summed gradient holds a NaN or an infinity keeps its weights and optimizer state bit for
    bit, so one bad batch cannot make a row (or its momentum) NaN for good. With
    ``return_nonfinite`` the number of such rows is returned third.
    """
    check_implementation(implementation, interpret, config)
    features = check_gradient_args(
        grad_out,
        ids,
        offsets,
        per_sample_weights,
        features,
        batch_size,
        dim,
        weights.shape[0],
        pooling,
    )
    check_table(weights, state, dim, optimizer)
    if ids.shape[0] == 0:  # no ids touch no rows (the kernel needs one addressable id)
        new_w, new_s, nonfinite = weights, dict(state), jnp.zeros((), jnp.int32)
    else:
        if implementation == "pallas":
            if config is None:
                config = default_update_config(dim)
            run = functools.partial(_update_pallas, interpret=interpret, config=config)
        else:
            run = _update_xla
        new_w, new_s, nonfinite = run(
            weights,
            dict(state),
            step,
            grad_out,
            ids,
            offsets,
            per_sample_weights,
            features=features,
            batch_size=batch_size,
            dim=dim,
            pooling=pooling,
            optimizer=optimizer,
        )
    return (new_w, new_s, nonfinite) if return_nonfinite else (new_w, new_s)


fused_sparse_update_reference = xla_reference(fused_sparse_update)
