"""The true sparse gradient of one stacked table group (XLA), and the steps leading to it.

The backward of a lookup never builds a dense table gradient. It

1. maps every id position to the table row it read (a sentinel ``R`` for padding, for
   positions of features outside the group and for ids outside their table):
   :func:`occurrences`,
2. sorts the positions by row (stable: ties keep position order) and cuts the sorted list
   into one segment per unique row: :func:`sort_rows`, :func:`segments`,
3. sums the gradient of each segment in that fixed order: :func:`sparse_row_gradients`.

The fused update (``sparse_update``) applies the group's sparse optimizer to the rows of
step 3; its Pallas kernel starts from the sorted occurrences of step 2.

Layout (the same as the forward kernels): ``ids [N_cap] int32`` (feature-major KJT values,
only ``ids[offsets[0]:offsets[-1]]`` are real); ``offsets [F*B+1] int32``; static
``features``, one :class:`~jaxrec_kernels.layout.FeatureLayout` per group feature. The
gradient of position ``i`` in bag ``(f, b)`` is

- pooled (``"sum"`` / ``"mean"``, ``grad_out [B, C]``):
  ``g_i = grad_out[b, col_offset:col_offset+D] * psw[i] * (1/len(bag) if mean)``,
  with ``psw[i] = 1`` when no per-sample weights are given;
- sequence (``"none"``, ``grad_out [N_cap, D]``): ``g_i = grad_out[i]`` (per-sample weights
  are not used).

A row's gradient is the sum of ``g_i`` over the positions that hit it, every feature of the
group included. A KJT feature listed by several group features contributes one occurrence
per listing, so the occurrence arrays have ``M = N_cap * copies`` entries, ``copies`` being
the largest number of listings of one KJT feature (1 in the usual case).

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .layout import (
    FeatureLayout,
    Pooling,
    check_columns,
    feature_layouts,
    feature_rounds,
    position_bags,
    validate_group,
)

__all__ = [
    "POOLINGS",
    "Occurrences",
    "Segments",
    "SortedRows",
    "check_gradient_args",
    "gather_rows",
    "occurrences",
    "run_lengths",
    "segment_row_gradients",
    "segments",
    "sort_rows",
    "sparse_row_gradients",
]

POOLINGS: tuple[Pooling, ...] = ("sum", "mean", "none")


def check_gradient_args(
    grad_out: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    batch_size: int,
    dim: int,
    num_rows: int,
    pooling: str,
) -> tuple[FeatureLayout, ...]:
    """Static checks shared by the backward's entry points (ValueError naming the bad
    argument); returns ``features`` as :class:`FeatureLayout` values.

    >>> check_gradient_args(jnp.ones((2, 4)), jnp.zeros(3, jnp.int32),
    ...                     jnp.array([0, 1, 3], jnp.int32), None, ((0, 0, 5, 0),),
    ...                     batch_size=2, dim=4, num_rows=5, pooling="max")
    Traceback (most recent call last):
    ...
    ValueError: pooling must be one of ('sum', 'mean', 'none'), got 'max'
    """
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


class Occurrences(NamedTuple):
    """One entry per (listing of a KJT feature, id position): ``M = N_cap * copies`` entries."""

    rows: jax.Array  # int32 stacked row, or the sentinel R when the entry reads nothing
    src_row: jax.Array  # int32 row of grad_out holding the gradient (0 when unused)
    src_col: jax.Array  # int32 first column of grad_out holding it (0 when unused)
    scale: jax.Array  # float32 factor of that gradient row


class SortedRows(NamedTuple):
    """The occurrences sorted by row (stable: ties keep occurrence order)."""

    rows: jax.Array  # [M] int32 rows ascending, sentinels last
    order: jax.Array  # [M] int32: occurrence index of each sorted slot
    head: jax.Array  # [M] bool: the slot starts the run of a touched row
    num_valid: jax.Array  # int32 scalar: slots holding a real row


class Segments(NamedTuple):
    """The sorted occurrences cut into one segment per unique row (the XLA path's view)."""

    order: jax.Array  # [M] int32: occurrence index of each sorted slot
    unique_rows: jax.Array  # [M] int32: unique rows ascending, then the sentinel R
    segment: jax.Array  # [M] int32: segment of each sorted slot (M for sentinel slots)


def occurrences(
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    batch_size: int,
    num_rows: int,
    pooling: str,
) -> Occurrences:
    """Step 1: every (group feature, id position) as the row it hits and where its gradient is.

    >>> occ = occurrences(jnp.array([2, 0, 9], jnp.int32), jnp.array([0, 1, 2], jnp.int32),
    ...                   None, ((0, 0, 3, 0),), 2, 3, "sum")
    >>> occ.rows.tolist(), occ.src_row.tolist()       # id 9 is padding: the sentinel 3
    ([2, 0, 3], [0, 1, 0])
    """
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
            Occurrences(
                rows=jnp.where(valid, entry[:, 0] + ids, num_rows),
                src_row=jnp.where(valid, src_row, 0),
                src_col=jnp.where(valid, entry[:, 2], 0),
                scale=jnp.where(valid, scale, 0.0),
            )
        )
    if len(parts) == 1:
        return parts[0]
    return Occurrences(*(jnp.concatenate(cols) for cols in zip(*parts, strict=True)))


def sort_rows(rows: jax.Array, num_rows: int) -> SortedRows:
    """Step 2: ``rows`` sorted (stable), each run of a touched row marked at its head.

    >>> srt = sort_rows(jnp.array([2, 0, 3, 2], jnp.int32), 3)
    >>> srt.rows.tolist(), srt.order.tolist(), srt.head.tolist(), int(srt.num_valid)
    ([0, 2, 2, 3], [1, 0, 3, 2], [True, True, False, False], 3)
    """
    m = rows.shape[0]
    # A stable sort on the row alone keeps the occurrence order inside every run; with one
    # key and one value XLA hands it to CUB's radix sort on GPUs.
    sorted_rows, order = jax.lax.sort(
        (rows, jnp.arange(m, dtype=jnp.int32)), num_keys=1, is_stable=True
    )
    valid = sorted_rows < num_rows
    changed = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])
    return SortedRows(sorted_rows, order, valid & changed, jnp.sum(valid.astype(jnp.int32)))


def segments(rows: jax.Array, num_rows: int) -> Segments:
    """Step 2 as segments: the unique rows ascending and the segment of each sorted slot.

    >>> seg = segments(jnp.array([2, 0, 3, 2], jnp.int32), 3)
    >>> seg.unique_rows.tolist(), seg.segment.tolist()
    ([0, 2, 3, 3], [0, 1, 1, 4])
    """
    m = rows.shape[0]
    srt = sort_rows(rows, num_rows)
    segment = jnp.cumsum(srt.head.astype(jnp.int32)) - 1
    unique_rows = jnp.full((m,), num_rows, jnp.int32)
    unique_rows = unique_rows.at[jnp.where(srt.head, segment, m)].set(srt.rows, mode="drop")
    return Segments(srt.order, unique_rows, jnp.where(srt.rows < num_rows, segment, m))


def run_lengths(srt: SortedRows) -> jax.Array:
    """For each sorted slot: the length of the run it starts (0 unless it is a head).

    >>> run_lengths(sort_rows(jnp.array([2, 0, 3, 2], jnp.int32), 3)).tolist()
    [1, 2, 0, 0]
    """
    m = srt.rows.shape[0]
    slot = jnp.arange(m, dtype=jnp.int32)
    head_at = jnp.where(srt.head, slot, srt.num_valid)
    next_head = jnp.concatenate([head_at[1:], srt.num_valid[None]])
    run_end = jax.lax.cummin(next_head, axis=0, reverse=True)
    return jnp.where(srt.head, run_end - slot, 0)


def gather_rows(grad_out: jax.Array, src_row: jax.Array, src_col: jax.Array, dim: int) -> jax.Array:
    """``grad_out[src_row[i], src_col[i] : src_col[i] + dim]`` for every ``i``, as float32."""
    cols = src_col[:, None] + jnp.arange(dim, dtype=jnp.int32)[None, :]
    return grad_out[src_row[:, None], cols].astype(jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("features", "batch_size", "dim", "num_rows", "pooling")
)
def segment_row_gradients(
    grad_out, ids, offsets, per_sample_weights, *, features, batch_size, dim, num_rows, pooling
):
    """:func:`sparse_row_gradients` without its argument checks (callers check them)."""
    occ = occurrences(ids, offsets, per_sample_weights, features, batch_size, num_rows, pooling)
    seg = segments(occ.rows, num_rows)
    m = occ.rows.shape[0]
    g = gather_rows(grad_out, occ.src_row[seg.order], occ.src_col[seg.order], dim)
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
    features = check_gradient_args(
        grad_out, ids, offsets, per_sample_weights, features, batch_size, dim, num_rows, pooling
    )
    return segment_row_gradients(
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
