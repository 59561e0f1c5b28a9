"""Sequence (unpooled) embedding lookup over one stacked table group: Pallas kernel + reference.

Same inputs as :mod:`pooled_lookup` (``weights [R, D]``, KJT ``ids``/``offsets``, static
``features`` of ``(kjt_feature_index, row_offset, num_rows, col_offset)``; ``col_offset`` is
unused here). The output has one row per id position:

``out[i] = weights[row_offset + ids[i]]`` for every real position ``i`` (``i < offsets[-1]``)
of one of the group's features; rows of other positions (other groups' features, padding) are
zeros, as are rows of ids outside ``[0, num_rows)`` under "fatal", "warning" and "ignore".
The second result counts those ids under "fatal" and "warning" (else 0). "none" does not
check an id against its table and reads stacked row ``clip(row_offset + id, 0, R - 1)`` (for
a bad id: another table's row or the buffer's first or last row, never outside ``weights``);
nothing is counted. A KJT feature may appear at most once in a group (its rows have one place to go).

The kernel runs one program per ``steps`` blocks of ``block_ids`` consecutive positions and
gathers ``[block_ids, D]`` rows per step. A block whose two ends lie in the same group feature
(the common case: features hold thousands of ids) takes that feature's table from two scalar
searches of the features' id ranges ``[offsets[f*B], offsets[(f+1)*B])``; a block that
straddles features searches them per position.

>>> import jax.numpy as jnp
>>> w = jnp.arange(12.0).reshape(6, 2)            # two tables of 3 rows, D=2
>>> ids = jnp.array([0, 2, 1, 7, 0], jnp.int32)    # feature 0: [0, 2] ; feature 1: [1, 7]; pad
>>> offs = jnp.array([0, 2, 4], jnp.int32)
>>> out, bad = sequence_lookup_reference(w, ids, offs, ((1, 3, 3, 0),), batch_size=1)
>>> out.tolist(), int(bad)
([[0.0, 0.0], [0.0, 0.0], [8.0, 9.0], [0.0, 0.0], [0.0, 0.0]], 1)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._pallas_compat import (
    check_launch_shape,
    compiler_params,
    float_dtype,
    masked_load,
    masked_store,
    next_power_of_2,
)
from .entry import Implementation, check_implementation, xla_reference
from .layout import (
    BoundsCheck,
    FeatureLayout,
    checks_ids,
    counts_bad_ids,
    feature_layouts,
    lookup_rows,
    position_bags,
    validate_group,
)

__all__ = [
    "SequenceConfig",
    "default_sequence_config",
    "sequence_lookup",
    "sequence_lookup_reference",
]


@dataclass(frozen=True)
class SequenceConfig:
    """Launch shape of the sequence kernel.

    Each program copies ``steps`` blocks of ``block_ids`` consecutive positions (power of 2),
    one ``[block_ids, D]`` gather per loop step; ``num_warps``/``num_stages`` as in Triton.
    """

    block_ids: int = 64
    steps: int = 8
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        check_launch_shape(self, ("block_ids", "num_warps"), ("steps", "num_stages"))


def default_sequence_config(dim: int, dtype) -> SequenceConfig:
    """The launch shape used when none is given: 8 steps of 4k-element gathers, 4 warps.

    The fastest measured at D=128 fp32 on an H100 was 32 ids x 8 steps x 4 warps (95.8% of
    the copy bandwidth, BENCHMARKS.md); other dims keep its elements per step.

    >>> default_sequence_config(128, "float32")
    SequenceConfig(block_ids=32, steps=8, num_warps=4, num_stages=2)
    """
    del dtype  # one rule for every table dtype (only fp32 was measured)
    block_ids = max(8, min(256, 4096 // next_power_of_2(dim)))
    return SequenceConfig(block_ids=block_ids, steps=8, num_warps=4)


def _static_arguments(weights, ids, offsets, features, *, batch_size, bounds_check, out_dtype):
    """Check the entry point's arguments; returns the static arguments of the
    jitted implementations (``features`` as :class:`FeatureLayout` values, the output dtype)."""
    validate_group(weights, ids, offsets, None, features, batch_size, bounds_check)
    layouts = feature_layouts(features)
    kjts = [f.kjt_index for f in layouts]
    if len(set(kjts)) != len(kjts):
        raise ValueError(f"sequence features must use distinct KJT features, got {features}")
    out_dt = float_dtype(weights.dtype if out_dtype is None else out_dtype)
    return {
        "features": layouts,
        "batch_size": batch_size,
        "bounds_check": bounds_check,
        "out_dtype": out_dt,
    }


def _sequence_kernel(
    offsets_ref,
    ids_ref,
    weights_ref,
    out_ref,
    count_ref,
    *,
    features,
    batch_size,
    num_ids,
    dim,
    checked,
    counted,
    config,
):
    blk = pl.program_id(0)
    block_ids = config.block_ids
    ranges = [
        (offsets_ref[kjt * batch_size], offsets_ref[(kjt + 1) * batch_size], row_off, rows)
        for kjt, row_off, rows, _ in map(FeatureLayout._make, features)
    ]
    dim_pad = next_power_of_2(dim)
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    col_ok = cols < dim

    def locate(p):
        """(1 + slot of the group feature holding scalar position p, or 0; its row range)."""
        slot, row_offset, num_rows = jnp.int32(0), jnp.int32(0), jnp.int32(0)
        for k, (first, last, f_row_offset, f_num_rows) in enumerate(ranges):
            hit = (p >= first) & (p < last)
            slot = jnp.where(hit, k + 1, slot)
            row_offset = jnp.where(hit, f_row_offset, row_offset)
            num_rows = jnp.where(hit, f_num_rows, num_rows)
        return slot, row_offset, num_rows

    def search(pos):
        """Per position: its feature's row offset and row count, and whether it is in the group."""
        row_offset = jnp.zeros((block_ids,), jnp.int32)
        num_rows = jnp.zeros((block_ids,), jnp.int32)
        in_group = jnp.zeros((block_ids,), jnp.bool_)
        for first, last, f_row_offset, f_num_rows in ranges:
            in_f = (pos >= first) & (pos < last)
            row_offset = jnp.where(in_f, f_row_offset, row_offset)
            num_rows = jnp.where(in_f, f_num_rows, num_rows)
            in_group = in_group | in_f
        return row_offset, num_rows, in_group

    def copy_rows(pos, in_cap, in_group, row_offset, num_rows, bad):
        idx = masked_load(ids_ref.at[pos], in_group, 0)
        if checked:
            valid = in_group & (idx >= 0) & (idx < num_rows)
            idx = jnp.where(valid, idx, 0)
            rows = row_offset + idx
        else:
            valid = in_group
            # "none": the id is not checked against its table; the row stays in the buffer.
            rows = jnp.clip(row_offset + idx, 0, weights_ref.shape[0] - 1)
        vals = masked_load(
            weights_ref.at[rows[:, None], cols[None, :]], valid[:, None] & col_ok[None, :], 0
        )
        masked_store(
            out_ref.at[pos[:, None], cols[None, :]],
            vals.astype(out_ref.dtype),
            in_cap[:, None] & col_ok[None, :],
        )
        if counted:
            bad = bad + jnp.sum(in_group & ~valid, dtype=jnp.int32)
        return bad

    def step(s, bad):
        start = (blk * config.steps + s) * block_ids
        pos = start + jnp.arange(block_ids, dtype=jnp.int32)
        in_cap = pos < num_ids
        # A block almost always lies inside one feature: then two scalar searches (its ends)
        # replace the per-position search over every feature of the group.
        head, head_row_offset, head_rows = locate(start)
        tail, _, _ = locate(jnp.minimum(start + block_ids, num_ids) - 1)

        def one_feature(bad):
            return copy_rows(pos, in_cap, in_cap, head_row_offset, head_rows, bad)

        def mixed(bad):
            row_offset, num_rows, in_group = search(pos)
            return copy_rows(pos, in_cap, in_group & in_cap, row_offset, num_rows, bad)

        return jax.lax.cond((head == tail) & (head > 0), one_feature, mixed, bad)

    if config.steps == 1:
        bad = step(0, jnp.int32(0))
    else:
        bad = jax.lax.fori_loop(0, config.steps, step, jnp.int32(0))
    count_ref[blk] = bad


@functools.partial(
    jax.jit,
    static_argnames=("features", "batch_size", "bounds_check", "out_dtype", "interpret", "config"),
)
def _sequence_pallas(
    weights, ids, offsets, *, features, batch_size, bounds_check, out_dtype, interpret, config
):
    num_ids, dim = ids.shape[0], weights.shape[1]
    num_blocks = pl.cdiv(num_ids, config.block_ids * config.steps)
    kernel = functools.partial(
        _sequence_kernel,
        features=features,
        batch_size=batch_size,
        num_ids=num_ids,
        dim=dim,
        checked=checks_ids(bounds_check),
        counted=counts_bad_ids(bounds_check),
        config=config,
    )
    out, counts = pl.pallas_call(
        kernel,
        grid=(num_blocks,),
        out_shape=(
            jax.ShapeDtypeStruct((num_ids, dim), out_dtype),
            jax.ShapeDtypeStruct((num_blocks,), jnp.int32),
        ),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="jaxrec_sequence_lookup",
    )(offsets, ids, weights)
    return out, jnp.sum(counts)


@functools.partial(jax.jit, static_argnames=("features", "batch_size", "bounds_check", "out_dtype"))
def _sequence_xla(weights, ids, offsets, *, features, batch_size, bounds_check, out_dtype):
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, ids.shape[0])
    rows, valid, bad, _, _ = lookup_rows(
        ids,
        bags,
        live,
        features,
        list(range(len(features))),
        batch_size,
        num_kjt,
        checked=checks_ids(bounds_check),
    )
    picked = jnp.take(weights, rows, axis=0, mode="clip")  # "none": the clamped row, as the kernel
    out = jnp.where(valid[:, None], picked, 0).astype(out_dtype)
    count = jnp.sum(bad.astype(jnp.int32)) if counts_bad_ids(bounds_check) else 0
    return out, jnp.int32(count)


def sequence_lookup(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    features: tuple[FeatureLayout, ...],
    *,
    batch_size: int,
    bounds_check: BoundsCheck = "warning",
    out_dtype=None,
    implementation: Implementation = "pallas",
    interpret: bool = False,
    config: SequenceConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sequence lookup of one stacked table group: ``(out [N_cap, D], bad_id_count int32)``.

    See the module docstring. ``implementation="pallas"`` runs the Triton kernel
    (``interpret=True`` on the CPU; ``config``: :func:`default_sequence_config` when None);
    ``"xla"`` (:data:`sequence_lookup_reference`) is one XLA gather. On an H100 the kernel
    moves rows at 92-98% of the copy bandwidth, ahead of the XLA gather (BENCHMARKS.md,
    sequence lookups).

    >>> import jax.numpy as jnp
    >>> w = jnp.arange(8.0).reshape(4, 2)
    >>> ids = jnp.array([3, 0, 5], jnp.int32)                # 5 is padding
    >>> offs = jnp.array([0, 1, 2], jnp.int32)
    >>> out, bad = sequence_lookup(w, ids, offs, ((0, 0, 4, 0),), batch_size=2, interpret=True)
    >>> out.tolist(), int(bad)
    ([[6.0, 7.0], [0.0, 1.0], [0.0, 0.0]], 0)
    """
    check_implementation(implementation, interpret, config)
    static = _static_arguments(
        weights,
        ids,
        offsets,
        features,
        batch_size=batch_size,
        bounds_check=bounds_check,
        out_dtype=out_dtype,
    )
    if implementation == "xla":
        return _sequence_xla(weights, ids, offsets, **static)
    if config is None:
        config = default_sequence_config(weights.shape[1], weights.dtype)
    if ids.shape[0] == 0:  # no positions, no rows (the kernel needs one addressable id)
        return jnp.zeros((0, weights.shape[1]), static["out_dtype"]), jnp.zeros((), jnp.int32)
    return _sequence_pallas(weights, ids, offsets, interpret=interpret, config=config, **static)


sequence_lookup_reference = xla_reference(sequence_lookup)
