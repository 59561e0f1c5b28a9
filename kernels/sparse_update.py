"""Fused sparse backward of one stacked table group: Pallas GPU kernel + XLA reference.

The backward of a lookup never builds a dense table gradient. It

1. maps every id position to the table row it read (a sentinel ``R`` for padding, for
   positions of features outside the group and for ids outside their table),
2. sorts the positions by row (stable: ties keep position order) and cuts the sorted list
   into one segment per unique row,
3. sums the gradient of each segment in that fixed order and applies the group's sparse
   optimizer to the touched rows only, in place.

Layout (the same as the forward kernels): ``weights [R, D]``; ``ids [N_cap] int32``
(feature-major KJT values, only ``ids[offsets[0]:offsets[-1]]`` are real);
``offsets [F*B+1] int32``; static ``features``, one
``(kjt_feature_index, row_offset, num_rows, col_offset)`` per group feature. The gradient
of position ``i`` in bag ``(f, b)`` is

- pooled (``"sum"`` / ``"mean"``, ``grad_out [B, C]``):
  ``g_i = grad_out[b, col_offset:col_offset+D] * psw[i] * (1/len(bag) if mean)``,
  with ``psw[i] = 1`` when no per-sample weights are given;
- sequence (``"none"``, ``grad_out [N_cap, D]``): ``g_i = grad_out[i]`` (per-sample weights
  are not used).

A row's gradient is the sum of ``g_i`` over the positions that hit it, every feature of the
group included. A KJT feature listed by several group features contributes one occurrence
per listing, so the occurrence arrays have ``M = N_cap * copies`` entries, ``copies`` being
the largest number of listings of one KJT feature (1 in the usual case).

The Pallas kernel runs one program per block of ``block_rows`` sorted slots; a slot that
starts the run of a touched row (a "head") owns that row. Each program sums the gradients of
its rows' occurrences (``block_occ`` occurrences of every row per loop step, masked past a
run's end), loads the rows and their optimizer state, calls ``optimizer.update`` on the
``[block_rows, Dp]`` block (``Dp`` = ``D`` rounded up to a power of two, padded lanes zero)
and stores rows and state back through ``input_output_aliases``: under ``jit`` with donated
buffers no table is copied, and the work grows with the batch, not with ``R``. Every sum runs
in a fixed order, so two runs give bitwise-equal tables (no atomics).

>>> import jax.numpy as jnp
>>> ids = jnp.array([2, 0, 2, 1, 7], jnp.int32)   # bags [2, 0], [2, 1]; id 7 is padding
>>> offsets = jnp.array([0, 2, 4], jnp.int32)
>>> grad_out = jnp.array([[1.0, 2.0], [10.0, 20.0]])
>>> rows, grads = sparse_row_gradients(grad_out, ids, offsets, None, ((0, 0, 3, 0),),
...                                    batch_size=2, dim=2, num_rows=3, pooling="sum")
>>> rows.tolist()                                  # unique rows, then the sentinel 3
[0, 1, 2, 3, 3]
>>> grads[:3].tolist()
[[1.0, 2.0], [10.0, 20.0], [11.0, 22.0]]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._pallas_compat import (
    compiler_params,
    float_dtype,
    masked_load,
    masked_store,
    next_power_of_2,
)
from .layout import (
    FeatureLayout,
    Pooling,
    check_columns,
    feature_layouts,
    feature_rounds,
    position_bags,
    validate_group,
)
from .stochastic_rounding import seed_for_step, stochastic_round

__all__ = [
    "POOLINGS",
    "SparseUpdateConfig",
    "default_update_config",
    "fused_sparse_update",
    "fused_sparse_update_reference",
    "fused_update_from_row_gradients",
    "sparse_row_gradients",
]

POOLINGS: tuple[Pooling, ...] = ("sum", "mean", "none")


@dataclass(frozen=True)
class SparseUpdateConfig:
    """Launch shape of the fused update kernel (``block_rows``, ``block_occ``: powers of two).

    ``block_rows`` sorted slots per program (each slot that starts a row's run owns that row);
    ``block_occ`` occurrences of each row gathered per loop step; ``num_warps`` / ``num_stages``
    as in Triton; ``evict_first``: load and store table rows and state with an evict-first
    cache hint (they are touched once), leaving the L2 cache to ``grad_out``.

    >>> SparseUpdateConfig(block_rows=8).block_occ
    1
    """

    block_rows: int = 4
    block_occ: int = 1
    num_warps: int = 1
    num_stages: int = 1
    evict_first: bool = False

    def __post_init__(self):
        for name in ("block_rows", "block_occ", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"SparseUpdateConfig.{name} must be a power of two, got {v!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"SparseUpdateConfig.num_stages must be >= 1, got {self.num_stages!r}")


def default_update_config(dim: int) -> SparseUpdateConfig:
    """The launch shape used when none is given: about 512 row elements per warp.

    Small programs keep many rows in flight: the backward waits on memory (an H100 ran
    ``(4, 1, 1, 1)`` fastest at D=128, 2026-11-23).

    >>> default_update_config(128)
    SparseUpdateConfig(block_rows=4, block_occ=1, num_warps=1, num_stages=1, evict_first=False)
    """
    dim_pad = next_power_of_2(dim)
    block_rows = max(1, min(32, 512 // dim_pad))
    num_warps = max(1, min(8, block_rows * dim_pad // 512))
    return SparseUpdateConfig(block_rows=block_rows, num_warps=num_warps)


# --------------------------------------------------------------------------- validation


def _check_args(
    grad_out, ids, offsets, per_sample_weights, features, batch_size, dim, num_rows, pooling
):
    """Static checks shared by every entry point (ValueError naming the bad argument);
    returns ``features`` as :class:`FeatureLayout` values."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    table = jax.ShapeDtypeStruct((num_rows, dim), jnp.float32)
    validate_group(table, ids, offsets, per_sample_weights, features, batch_size, "ignore")
    if jnp.ndim(grad_out) != 2 or not jnp.issubdtype(grad_out.dtype, jnp.floating):
        raise ValueError(
            f"grad_out must be a 2-D float array, got shape {jnp.shape(grad_out)} "
            f"dtype {grad_out.dtype}"
        )
    if pooling == "none":
        if grad_out.shape != (ids.shape[0], dim):
            raise ValueError(
                f"sequence grad_out must have shape {(ids.shape[0], dim)}, got {grad_out.shape}"
            )
        kjts = [feat.kjt_index for feat in feature_layouts(features)]
        if len(set(kjts)) != len(kjts):
            raise ValueError(
                f"sequence pooling: a KJT feature is listed twice in features={features}"
            )
    else:
        if grad_out.shape[0] != batch_size:
            raise ValueError(
                f"pooled grad_out must have {batch_size} rows (batch_size), got {grad_out.shape}"
            )
        num_columns = grad_out.shape[1]
        check_columns(features, dim, num_columns, f"the {num_columns} columns of grad_out")
    return feature_layouts(features)


def _check_table(weights, state, dim, optimizer):
    if jnp.ndim(weights) != 2 or weights.shape[1] != dim:
        raise ValueError(f"weights must have shape [rows, dim={dim}], got {jnp.shape(weights)}")
    float_dtype(weights.dtype)
    for attr in ("init", "update", "stochastic_rounding"):
        if not hasattr(optimizer, attr):
            raise ValueError(f"optimizer must be a jaxrec.optim.SparseOptimizer, got {optimizer!r}")
    rows = weights.shape[0]
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict of arrays, got {type(state).__name__}")
    expected = jax.eval_shape(lambda: optimizer.init(rows, dim))
    if set(state) != set(expected):
        raise ValueError(f"state has keys {sorted(state)}; the optimizer needs {sorted(expected)}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(
                f"state[{name!r}] has shape {tuple(state[name].shape)}; expected "
                f"{tuple(want.shape)}"
            )


# --------------------------------------------------------------------------- XLA preprocessing


class _Occurrences(NamedTuple):
    """One entry per (listing of a KJT feature, id position): ``M = N_cap * copies`` entries."""

    rows: jax.Array  # int32 stacked row, or the sentinel R when the entry reads nothing
    src_row: jax.Array  # int32 row of grad_out holding the gradient (0 when unused)
    src_col: jax.Array  # int32 first column of grad_out holding it (0 when unused)
    scale: jax.Array  # float32 factor of that gradient row


class _Sorted(NamedTuple):
    """The occurrences sorted by row (stable: ties keep occurrence order)."""

    rows: jax.Array  # [M] int32 rows ascending, sentinels last
    order: jax.Array  # [M] int32: occurrence index of each sorted slot
    head: jax.Array  # [M] bool: the slot starts the run of a touched row
    num_valid: jax.Array  # int32 scalar: slots holding a real row


class _Segments(NamedTuple):
    """The sorted occurrences cut into one segment per unique row (the XLA reference's view)."""

    order: jax.Array  # [M] int32: occurrence index of each sorted slot
    unique_rows: jax.Array  # [M] int32: unique rows ascending, then the sentinel R
    segment: jax.Array  # [M] int32: segment of each sorted slot (M for sentinel slots)


def _occurrences(ids, offsets, per_sample_weights, features, batch_size, num_rows, pooling):
    features = feature_layouts(features)
    n = ids.shape[0]
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, n)
    kjt = bags // batch_size
    if pooling == "none":
        src_row = jnp.arange(n, dtype=jnp.int32)
        scale = jnp.ones((n,), jnp.float32)
    else:
        src_row = bags - kjt * batch_size
        scale = jnp.ones((n,), jnp.float32)
        if per_sample_weights is not None:
            scale = scale * per_sample_weights.astype(jnp.float32)
        if pooling == "mean":
            lengths = offsets[1:] - offsets[:-1]
            scale = scale / jnp.maximum(lengths[bags], 1).astype(jnp.float32)
    parts = []
    for group_idx in feature_rounds(features):
        table = np.zeros((num_kjt, 3), np.int32)  # (row_offset, num_rows, col_offset); 0 rows
        for g in group_idx:
            feat = features[g]
            table[feat.kjt_index] = (feat.row_offset, feat.num_rows, feat.col_offset)
        entry = jnp.asarray(table)[kjt]
        valid = live & (ids >= 0) & (ids < entry[:, 1])
        parts.append(
            _Occurrences(
                rows=jnp.where(valid, entry[:, 0] + ids, num_rows),
                src_row=jnp.where(valid, src_row, 0),
                src_col=jnp.where(valid, entry[:, 2], 0),
                scale=jnp.where(valid, scale, 0.0),
            )
        )
    if len(parts) == 1:
        return parts[0]
    return _Occurrences(*(jnp.concatenate(cols) for cols in zip(*parts, strict=True)))


def _sort(rows, num_rows):
    m = rows.shape[0]
    # A stable sort on the row alone keeps the occurrence order inside every run; with one
    # key and one value XLA hands it to CUB's radix sort on GPUs.
    sorted_rows, order = jax.lax.sort(
        (rows, jnp.arange(m, dtype=jnp.int32)), num_keys=1, is_stable=True
    )
    valid = sorted_rows < num_rows
    changed = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
    return _Sorted(sorted_rows, order, valid & changed, jnp.sum(valid.astype(jnp.int32)))


def _segments(rows, num_rows):
    m = rows.shape[0]
    srt = _sort(rows, num_rows)
    segment = jnp.cumsum(srt.head.astype(jnp.int32)) - 1
    unique_rows = jnp.full((m,), num_rows, jnp.int32)
    unique_rows = unique_rows.at[jnp.where(srt.head, segment, m)].set(srt.rows, mode="drop")
    return _Segments(srt.order, unique_rows, jnp.where(srt.rows < num_rows, segment, m))


def _run_lengths(srt: _Sorted) -> jax.Array:
    """For each sorted slot: the length of the run it starts (0 unless it is a head)."""
    m = srt.rows.shape[0]
    slot = jnp.arange(m, dtype=jnp.int32)
    head_at = jnp.where(srt.head, slot, srt.num_valid)
    next_head = jnp.concatenate([head_at[1:], srt.num_valid[None]])
    run_end = jax.lax.cummin(next_head, axis=0, reverse=True)
    return jnp.where(srt.head, run_end - slot, 0)


def _gather_rows(grad_out, src_row, src_col, dim):
    cols = src_col[:, None] + jnp.arange(dim, dtype=jnp.int32)[None, :]
    return grad_out[src_row[:, None], cols].astype(jnp.float32)


# --------------------------------------------------------------------------- XLA reference


@functools.partial(
    jax.jit, static_argnames=("features", "batch_size", "dim", "num_rows", "pooling")
)
def _row_gradients(
    grad_out, ids, offsets, per_sample_weights, *, features, batch_size, dim, num_rows, pooling
):
    occ = _occurrences(ids, offsets, per_sample_weights, features, batch_size, num_rows, pooling)
    seg = _segments(occ.rows, num_rows)
    m = occ.rows.shape[0]
    g = _gather_rows(grad_out, occ.src_row[seg.order], occ.src_col[seg.order], dim)
    g = g * occ.scale[seg.order][:, None]
    grads = jax.ops.segment_sum(g, seg.segment, num_segments=m, indices_are_sorted=True)
    return seg.unique_rows, grads


def sparse_row_gradients(
    grad_out: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    batch_size: int,
    dim: int,
    num_rows: int,
    pooling: str,
) -> tuple[jax.Array, jax.Array]:
    """The true sparse gradient of one group's table (XLA): ``(rows, grads)``.

    ``rows [M] int32`` holds the touched rows of the stacked table in ascending order, then
    the sentinel ``num_rows`` in unused slots; ``grads [M, dim] float32`` holds each row's
    summed gradient, zeros in unused slots (``M = N_cap`` unless a KJT feature is listed by
    several group features; see the module docstring). Scatter-add ``grads`` at ``rows``
    with ``mode="drop"`` to get the dense gradient.

    >>> import jax.numpy as jnp
    >>> rows, grads = sparse_row_gradients(
    ...     jnp.ones((1, 2)), jnp.array([1, 1], jnp.int32), jnp.array([0, 2], jnp.int32),
    ...     jnp.array([0.5, 2.0]), ((0, 0, 4, 0),), batch_size=1, dim=2, num_rows=4,
    ...     pooling="sum")
    >>> rows.tolist(), grads.tolist()
    ([1, 4], [[2.5, 2.5], [0.0, 0.0]])
    """
    features = _check_args(
        grad_out, ids, offsets, per_sample_weights, features, batch_size, dim, num_rows, pooling
    )
    return _row_gradients(
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


def _store_rows(new_rows, dtype, optimizer, step, row_ids):
    """Cast float32 rows to the table dtype: stochastic rounding for 16-bit when asked."""
    if jnp.dtype(dtype) != jnp.float32 and optimizer.stochastic_rounding:
        return stochastic_round(new_rows, dtype, seed_for_step(step), row_ids)
    return new_rows.astype(dtype)


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
    rows, grads = _row_gradients(
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
    return _apply_unique_rows(weights, state, step, rows, grads, dim=dim, optimizer=optimizer)


def skips_nonfinite(optimizer: Any) -> bool:
    """Whether the fused update leaves rows with a non-finite gradient unchanged (default on).

    Read from the optimizer's ``skip_nonfinite`` setting (``jaxrec.optim.SparseOptimizer``).
    """
    return bool(getattr(optimizer, "skip_nonfinite", True))


def _finite_rows(rows, grads, num_rows):
    """(rows with each non-finite gradient's row turned into the sentinel, how many there were)."""
    nonfinite = (rows < num_rows) & ~jnp.all(jnp.isfinite(grads), axis=-1)
    return jnp.where(nonfinite, num_rows, rows), jnp.sum(nonfinite.astype(jnp.int32))


def _apply_unique_rows(weights, state, step, rows, grads, *, dim, optimizer):
    """Gather the unique ``rows`` (sentinel ``R`` dropped), update them, scatter them back.

    Returns ``(weights, state, nonfinite)``: with the guard on (:func:`skips_nonfinite`) a row
    whose summed gradient holds a NaN or an infinity is dropped like the sentinel (weights and
    state bit-for-bit unchanged) and counted in ``nonfinite``.
    """
    nonfinite = jnp.zeros((), jnp.int32)
    if skips_nonfinite(optimizer):
        rows, nonfinite = _finite_rows(rows, grads, weights.shape[0])
    w = jnp.take(weights, rows, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    s = {k: jnp.take(v, rows, axis=0, mode="fill", fill_value=0) for k, v in state.items()}
    new_w, new_s = optimizer.update(w, s, grads, step, dim)
    new_w = _store_rows(new_w, weights.dtype, optimizer, step, rows)
    weights = weights.at[rows].set(new_w, mode="drop")
    state = {k: v.at[rows].set(new_s[k].astype(v.dtype), mode="drop") for k, v in state.items()}
    return weights, state, nonfinite


@functools.partial(jax.jit, static_argnames=("dim", "optimizer", "return_nonfinite"))
def fused_update_from_row_gradients(
    weights, state, step, rows, grads, *, dim, optimizer, return_nonfinite=False
):
    """One fused optimizer step from row gradients that may repeat a row (XLA).

    ``rows [M]`` (sentinel ``R`` = ``weights.shape[0]`` for unused slots) and
    ``grads [M, D]`` are e.g. the :func:`sparse_row_gradients` of several data-parallel
    replicas gathered together: gradients of the same row are summed (stable sort, fixed
    order), then the optimizer updates each touched row once. Every replica that runs this on
    the same gathered inputs gets bitwise the same table. A row whose summed gradient is not
    finite is left unchanged (see :func:`fused_sparse_update_reference`); with
    ``return_nonfinite`` their number is returned third.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> new_w, _ = fused_update_from_row_gradients(
    ...     jnp.zeros((3, 1)), {}, 1, jnp.array([2, 0, 2, 3], jnp.int32),
    ...     jnp.ones((4, 1)), dim=1, optimizer=exact_sgd(learning_rate=1.0))
    >>> new_w[:, 0].tolist()
    [-1.0, 0.0, -2.0]
    """
    num_rows = weights.shape[0]
    seg = _segments(rows, num_rows)
    m = rows.shape[0]
    summed = jax.ops.segment_sum(
        grads[seg.order].astype(jnp.float32), seg.segment, num_segments=m, indices_are_sorted=True
    )
    new_w, new_s, nonfinite = _apply_unique_rows(
        weights, dict(state), step, seg.unique_rows, summed, dim=dim, optimizer=optimizer
    )
    return (new_w, new_s, nonfinite) if return_nonfinite else (new_w, new_s)


def _checked_update(
    implementation,
    weights,
    state,
    step,
    grad_out,
    ids,
    offsets,
    per_sample_weights,
    features,
    *,
    batch_size,
    dim,
    pooling,
    optimizer,
    return_nonfinite,
    **options,
):
    """Check the arguments both entry points share, then run ``implementation``
    (:func:`_update_xla` or :func:`_update_pallas`, with its ``options``)."""
    features = _check_args(
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
    _check_table(weights, state, dim, optimizer)
    if ids.shape[0] == 0:  # no ids touch no rows (the kernel needs one addressable id)
        new_w, new_s, nonfinite = weights, dict(state), jnp.zeros((), jnp.int32)
    else:
        new_w, new_s, nonfinite = implementation(
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
            **options,
        )
    return (new_w, new_s, nonfinite) if return_nonfinite else (new_w, new_s)


def fused_sparse_update_reference(
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
    optimizer: Any,
    return_nonfinite: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One fused optimizer step on the touched rows, in plain XLA: ``(new_weights, new_state)``.

    :func:`sparse_row_gradients`, then a gather of the touched rows and their state,
    ``optimizer.update`` (a ``jaxrec.optim.SparseOptimizer``) at step ``step`` (t >= 1) and a
    scatter back (``mode="drop"``). 16-bit tables are stored back with stochastic rounding
    (seeded by the step and the row id) when the optimizer asks for it.

    Non-finite guard (on unless the optimizer's ``skip_nonfinite`` is False): a row whose
    summed gradient holds a NaN or an infinity keeps its weights and optimizer state bit for
    bit, so one bad batch cannot make a row (or its momentum) NaN for good. With
    ``return_nonfinite`` the number of such rows is returned third.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> w = jnp.zeros((3, 2))
    >>> ids, offsets = jnp.array([1, 1, 2], jnp.int32), jnp.array([0, 2, 3], jnp.int32)
    >>> new_w, _ = fused_sparse_update_reference(
    ...     w, {}, 1, jnp.ones((2, 2)), ids, offsets, None, ((0, 0, 3, 0),),
    ...     batch_size=2, dim=2, pooling="sum", optimizer=exact_sgd(learning_rate=0.5))
    >>> new_w.tolist()
    [[0.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]]
    """
    return _checked_update(
        _update_xla,
        weights,
        state,
        step,
        grad_out,
        ids,
        offsets,
        per_sample_weights,
        features,
        batch_size=batch_size,
        dim=dim,
        pooling=pooling,
        optimizer=optimizer,
        return_nonfinite=return_nonfinite,
    )


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
    run_ref,
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

    # This program owns the runs that start in its sorted slots [k0, k0 + block_rows).
    k = program * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    in_range = k < num_slots
    k = jnp.where(in_range, k, 0)
    count = masked_load(run_ref.at[k], in_range, 0)
    num_steps = (jnp.max(count) + (block_occ - 1)) // block_occ

    @pl.when(num_steps > 0)
    def _():
        cols = jnp.arange(dim_pad, dtype=jnp.int32)
        col_ok = cols < dim
        occ = jnp.arange(block_occ, dtype=jnp.int32)

        def accumulate(j, acc):
            offset = j * block_occ + occ
            live = offset[None, :] < count[:, None]
            slot = jnp.where(live, k[:, None] + offset[None, :], 0)
            src_row = masked_load(src_row_ref.at[slot], live, 0)
            src_col = masked_load(src_col_ref.at[slot], live, 0)
            scale = masked_load(scale_ref.at[slot], live, 0.0)
            g = masked_load(
                grad_ref.at[src_row[:, :, None], src_col[:, :, None] + cols[None, None, :]],
                live[:, :, None] & col_ok[None, None, :],
                0,
            ).astype(jnp.float32)
            return acc + jnp.sum(g * scale[:, :, None], axis=1)

        grads = jax.lax.fori_loop(
            0, num_steps, accumulate, jnp.zeros((block_rows, dim_pad), jnp.float32)
        )
        # Lanes that own no row get the out-of-range row R: never written on a GPU (masked),
        # and dropped by the interpreter's scatter rather than colliding with a real row.
        touched = count > 0
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
        if jnp.dtype(w_ref.dtype) != jnp.float32 and optimizer.stochastic_rounding:
            stored = stochastic_round(new_w, w_ref.dtype, seed_ref[0], rows)
        else:
            stored = new_w.astype(w_ref.dtype)
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
    occ = _occurrences(ids, offsets, per_sample_weights, features, batch_size, num_rows, pooling)
    srt = _sort(occ.rows, num_rows)
    m = occ.rows.shape[0]
    block_rows = config.block_rows

    names = tuple(sorted(state))
    rowwise = {k: state[k].ndim == 1 for k in names}
    dim_pad = next_power_of_2(dim)
    step = jnp.asarray(step)
    update = _trace_update(optimizer, names, rowwise, block_rows, dim_pad, dim, step)
    consts = [jnp.reshape(jnp.asarray(c), (1,)) for c in update.consts]
    inputs = [
        _run_lengths(srt),
        srt.rows,
        occ.src_row[srt.order],
        occ.src_col[srt.order],
        occ.scale[srt.order],
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
    optimizer: Any,
    interpret: bool = False,
    config: SparseUpdateConfig | None = None,
    return_nonfinite: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One fused optimizer step on the touched rows with the Pallas (Triton) kernel.

    Same contract and result as :func:`fused_sparse_update_reference` (up to the order of
    float32 sums): ``(new_weights, new_state)``, the rows nobody touched bit-identical. The
    tables are updated in place when their buffers are donated; the kernel reads and writes
    only the touched rows. ``interpret=True`` runs the same kernel on the CPU. The
    non-finite guard and ``return_nonfinite`` are as in the reference.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> w = jnp.zeros((3, 2))
    >>> ids, offsets = jnp.array([1, 1, 2], jnp.int32), jnp.array([0, 2, 3], jnp.int32)
    >>> new_w, _ = fused_sparse_update(
    ...     w, {}, 1, jnp.ones((2, 2)), ids, offsets, None, ((0, 0, 3, 0),), batch_size=2,
    ...     dim=2, pooling="sum", optimizer=exact_sgd(learning_rate=0.5), interpret=True)
    >>> new_w.tolist()
    [[0.0, 0.0], [-1.0, -1.0], [-0.5, -0.5]]
    """
    if config is None:
        config = default_update_config(dim)
    return _checked_update(
        _update_pallas,
        weights,
        state,
        step,
        grad_out,
        ids,
        offsets,
        per_sample_weights,
        features,
        batch_size=batch_size,
        dim=dim,
        pooling=pooling,
        optimizer=optimizer,
        return_nonfinite=return_nonfinite,
        interpret=interpret,
        config=config,
    )
