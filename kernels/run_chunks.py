"""Long runs of one row, cut into chunks summed by many programs (the fused backward's first pass).

The fused update (``sparse_update``) sums each touched row's gradient over the row's run of
sorted occurrences. One program walking a run serially is fine for the few occurrences a
row has under uniform ids, but real ids are skewed: under Zipf(1.05) over 10M rows the most
frequent row of a table takes ~9% of its lookups (~14k of a 164k-id batch), and the one
program that owns it runs ~14k dependent loop steps while the rest of the GPU idles.

So a run longer than ``chunk`` occurrences is cut into chunks of ``chunk`` consecutive
sorted slots (the last one shorter). A first pass (:func:`chunk_partials`, one program per
``block`` chunks) sums every chunk; the update then sums the run's chunk partials in chunk
order instead of its occurrences. Runs of at most ``chunk`` occurrences are summed directly,
as before. The longest serial walk drops from ``L`` to about ``chunk + L / chunk`` steps.
Every sum still runs in a fixed order (no atomics): two runs give bitwise-equal results.

:func:`split_runs` plans the chunks with XLA from the run lengths of the sorted slots
(:func:`~jaxrec_kernels.row_gradients.run_lengths`). A run of ``L > chunk`` occurrences
makes ``ceil(L / chunk) < 2 L / chunk`` chunks, so ``2 M // chunk`` chunk slots hold
every batch of ``M`` occurrences.

>>> import jax.numpy as jnp
>>> run = jnp.array([5, 0, 0, 0, 0, 2, 0, 1], jnp.int32)    # runs of 5, 2 and 1 slots
>>> plan = split_runs(run, chunk=2)
>>> plan.count.tolist()                        # occurrences summed directly (short runs)
[0, 0, 0, 0, 0, 2, 0, 1]
>>> plan.num_chunks.tolist()[0], plan.first_chunk.tolist()[0]
(3, 0)
>>> plan.chunk_start.tolist()[:3], plan.chunk_len.tolist()[:3]
([0, 2, 4], [2, 2, 1])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._pallas_compat import compiler_params, masked_load, masked_store

__all__ = [
    "RunChunks",
    "chunk_partials",
    "num_chunk_slots",
    "split_runs",
    "sum_occurrences",
    "sum_partials",
]


class RunChunks(NamedTuple):
    """Which runs are summed directly and which through chunk partials.

    Per sorted slot ``[M]``: ``count`` (the run length when the slot heads a run of at most
    ``chunk`` occurrences, else 0), ``num_chunks`` and ``first_chunk`` (for the head of a
    longer run: how many chunk partials it has and where the first one is; else 0). Per
    chunk slot ``[P]``, ``P = max(1, 2 M // chunk)``: ``chunk_start`` (its first sorted
    slot) and ``chunk_len`` (its occurrences; 0 for an unused chunk slot).
    """

    count: jax.Array
    num_chunks: jax.Array
    first_chunk: jax.Array
    chunk_start: jax.Array
    chunk_len: jax.Array


def num_chunk_slots(num_slots: int, chunk: int) -> int:
    """How many chunk partials a batch of ``num_slots`` sorted slots can need, at most.

    >>> num_chunk_slots(1000, 64), num_chunk_slots(3, 64)
    (31, 1)
    """
    return max(1, (2 * num_slots) // chunk)


def split_runs(run: jax.Array, chunk: int) -> RunChunks:
    """Cut every run longer than ``chunk`` into chunks of ``chunk`` slots (XLA).

    ``run [M]`` holds the length of the run each sorted slot starts (0 unless it heads one);
    runs are contiguous and start at their heads. See :class:`RunChunks` for the result.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    m = run.shape[0]
    p = num_chunk_slots(m, chunk)
    slot = jnp.arange(m, dtype=jnp.int32)
    long = run > chunk
    num_chunks = jnp.where(long, (run + (chunk - 1)) // chunk, 0)
    first_chunk = jnp.cumsum(num_chunks) - num_chunks
    # Each slot's run head: the last head at or before it (slots past every run get 0).
    head = jax.lax.cummax(jnp.where(run > 0, slot, 0), axis=0)
    offset = slot - head
    in_long = long[head] & (offset < run[head])
    starts = in_long & (offset % chunk == 0)
    chunk_id = jnp.where(starts, first_chunk[head] + offset // chunk, p)
    length = jnp.minimum(chunk, run[head] - offset)
    chunk_start = jnp.zeros((p,), jnp.int32).at[chunk_id].set(slot, mode="drop")
    chunk_len = jnp.zeros((p,), jnp.int32).at[chunk_id].set(length, mode="drop")
    return RunChunks(
        jnp.where(long, 0, run), num_chunks, first_chunk, chunk_start, chunk_len.astype(jnp.int32)
    )


def sum_occurrences(
    start, count, src_row_ref, src_col_ref, scale_ref, grad_ref, *, dim, dim_pad, block_occ, acc
):
    """Inside a kernel: ``acc`` plus, per lane ``r``, the scaled gradients of the ``count[r]``
    sorted occurrences from slot ``start[r]`` on, ``block_occ`` of them per loop step.

    ``acc`` is ``[lanes, dim_pad]`` float32; lanes with ``count`` 0 add zeros.
    """
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    col_ok = cols < dim
    occ = jnp.arange(block_occ, dtype=jnp.int32)

    def accumulate(j, acc):
        offset = j * block_occ + occ
        live = offset[None, :] < count[:, None]
        slot = jnp.where(live, start[:, None] + offset[None, :], 0)
        src_row = masked_load(src_row_ref.at[slot], live, 0)
        src_col = masked_load(src_col_ref.at[slot], live, 0)
        scale = masked_load(scale_ref.at[slot], live, 0.0)
        g = masked_load(
            grad_ref.at[src_row[:, :, None], src_col[:, :, None] + cols[None, None, :]],
            live[:, :, None] & col_ok[None, None, :],
            0,
        ).astype(jnp.float32)
        return acc + jnp.sum(g * scale[:, :, None], axis=1)

    num_steps = (jnp.max(count) + (block_occ - 1)) // block_occ
    return jax.lax.fori_loop(0, num_steps, accumulate, acc)


def sum_partials(first, num, partial_ref, *, dim_pad, block_occ, acc):
    """Inside a kernel: ``acc`` plus, per lane ``r``, the chunk partials
    ``partial_ref[first[r] : first[r] + num[r]]`` in order, ``block_occ`` per loop step."""
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    occ = jnp.arange(block_occ, dtype=jnp.int32)

    def accumulate(j, acc):
        offset = j * block_occ + occ
        live = offset[None, :] < num[:, None]
        idx = jnp.where(live, first[:, None] + offset[None, :], 0)
        p = masked_load(partial_ref.at[idx[:, :, None], cols[None, None, :]], live[:, :, None], 0)
        return acc + jnp.sum(p, axis=1)

    num_steps = (jnp.max(num) + (block_occ - 1)) // block_occ
    return jax.lax.fori_loop(0, num_steps, accumulate, acc)


def _partials_kernel(
    start_ref,
    len_ref,
    src_row_ref,
    src_col_ref,
    scale_ref,
    grad_ref,
    out_ref,
    *,
    dim,
    dim_pad,
    num_chunks,
    block,
    block_occ,
):
    c = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    in_range = c < num_chunks
    c = jnp.where(in_range, c, 0)
    count = masked_load(len_ref.at[c], in_range, 0)

    @pl.when(jnp.max(count) > 0)
    def _():
        start = masked_load(start_ref.at[c], in_range, 0)
        acc = sum_occurrences(
            start,
            count,
            src_row_ref,
            src_col_ref,
            scale_ref,
            grad_ref,
            dim=dim,
            dim_pad=dim_pad,
            block_occ=block_occ,
            acc=jnp.zeros((block, dim_pad), jnp.float32),
        )
        cols = jnp.arange(dim_pad, dtype=jnp.int32)
        used = jnp.broadcast_to((count > 0)[:, None], acc.shape)
        masked_store(out_ref.at[c[:, None], cols[None, :]], acc, used)


@functools.partial(
    jax.jit,
    static_argnames=("dim", "dim_pad", "block", "block_occ", "num_warps", "interpret"),
)
def chunk_partials(
    plan: RunChunks,
    src_row: jax.Array,
    src_col: jax.Array,
    scale: jax.Array,
    grad_out: jax.Array,
    *,
    dim: int,
    dim_pad: int,
    block: int,
    block_occ: int,
    num_warps: int,
    interpret: bool,
) -> jax.Array:
    """The first pass: ``[P, dim_pad]`` float32 sums of the chunks of ``plan`` (Pallas).

    ``src_row``, ``src_col``, ``scale`` are the sorted occurrences' gradient locations (see
    ``row_gradients``); row ``c`` holds the scaled gradients of chunk ``c`` summed in slot
    order, ``block_occ`` per step. Unused chunk slots are never written (left undefined).
    """
    p = plan.chunk_len.shape[0]
    kernel = functools.partial(
        _partials_kernel,
        dim=dim,
        dim_pad=dim_pad,
        num_chunks=p,
        block=block,
        block_occ=block_occ,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(p, block),),
        out_shape=jax.ShapeDtypeStruct((p, dim_pad), jnp.float32),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="jaxrec_run_chunk_partials",
    )(plan.chunk_start, plan.chunk_len, src_row, src_col, scale, grad_out)
