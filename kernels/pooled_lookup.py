"""Pooled embedding lookup over one stacked table group: Pallas GPU kernel + XLA reference.

Layout (FBGEMM's table-batched embedding, TorchRec's KJT):

- ``weights [R, D]``: several tables stacked by rows (fp32, fp16 or bf16).
- ``ids [N_cap] int32``: feature-major KJT values; only ``ids[:offsets[-1]]`` is real, the
  rest is padding that is never read.
- ``offsets [F*B+1] int32``: bag ``b`` of KJT feature ``f`` is
  ``ids[offsets[f*B+b] : offsets[f*B+b+1]]``.
- ``features``: one static ``(kjt_feature_index, row_offset, num_rows, col_offset)`` per group
  feature. Its table is rows ``[row_offset, row_offset+num_rows)`` of ``weights``; a valid id
  is ``0 <= id < num_rows``; its pooled bags land in columns ``[col_offset, col_offset+D)`` of
  ``out [B, num_columns]``.

``out[b, col_offset:col_offset+D] = sum_i w_i * weights[row_offset + ids[i]]`` over the bag,
accumulated in fp32 (``w_i`` = per-sample weight, or 1). MEAN divides by the bag length
(number of ids; a 16-bit output rounds the sum first, see :func:`mean_of_sums`); an empty
bag gives zeros. Bounds (as FBGEMM's ``bounds_check_mode``): an id
outside its table contributes a zero row under "fatal", "warning" and "ignore"; the second
result counts such ids under "fatal" and "warning" and is 0 otherwise. "none" does not check
an id against its table: it reads stacked row ``clip(row_offset + id, 0, R - 1)``, which for
a bad id is a row of another table of the group or the buffer's first or last row (never
memory outside ``weights``); nothing is counted. Positions outside ``[0, N_cap)`` are never
read, whatever the offsets say (a bag reaching past them reads only its positions inside);
``jaxrec.ops.bags.checked_offsets`` empties such bags before any kernel runs.

The kernel runs one program per (group feature, block of ``block_bags`` bags). Each step of
its loop gathers ``[block_bags, block_len, D]`` rows at once (the next ``block_len`` ids of
every bag in the block), so many independent row loads are in flight; lanes past a bag's end
or past ``D`` (padded to a power of two) are masked off and read nothing. The default, the
fastest measured, is one bag per program and 16 or 32 ids per step, or for many bags of
512-byte rows the "segmented" strategy (see :func:`default_pooled_config`).

>>> import jax.numpy as jnp
>>> w = jnp.arange(12.0).reshape(6, 2)            # two tables of 3 rows, D=2
>>> ids = jnp.array([0, 2, 1, 2, 0], jnp.int32)    # feature 0: [0, 2], [] ; feature 1: [1, 2], [0]
>>> offs = jnp.array([0, 2, 2, 4, 5], jnp.int32)
>>> feats = ((0, 0, 3, 0), (1, 3, 3, 2))
>>> out, bad = pooled_lookup_reference(w, ids, offs, None, feats, batch_size=2, num_columns=4)
>>> out.tolist(), int(bad)
([[4.0, 6.0, 18.0, 20.0], [0.0, 0.0, 6.0, 7.0]], 0)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, Required, TypedDict, Unpack

import jax
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
    BOUNDS_CHECK_MODES,
    BoundsCheck,
    FeatureLayout,
    check_columns,
    checks_ids,
    counts_bad_ids,
    covered_columns,
    covers_all_columns,
    feature_layouts,
    feature_rounds,
    lookup_rows,
    position_bags,
    validate_group,
)

__all__ = [
    # this kernel
    "POOLING_MODES",
    "FloatRows",
    "PooledConfig",
    "PooledOptions",
    "RowDecoder",
    "check_pooled_args",
    "decoded_pooled_lookup",
    "decoded_pooled_lookup_reference",
    "default_pooled_config",
    "mean_of_sums",
    "pooled_lookup",
    "pooled_lookup_reference",
    # the group layout (jaxrec_kernels.layout), importable from here as before
    "BOUNDS_CHECK_MODES",
    "Feature",
    "covered_columns",
    "covers_all_columns",
    "feature_rounds",
    "lookup_rows",
    "position_bags",
    "validate_group",
]

Feature = FeatureLayout
POOLING_MODES = ("sum", "mean")


@dataclass(frozen=True)
class PooledConfig:
    """Launch shape of the pooled kernel.

    ``block_bags`` bags per program (power of two). ``strategy`` "bags": each loop step
    gathers the next ``block_len`` ids of every bag, ``[block_bags, block_len, D]`` rows
    (lanes past a bag's end are masked off). ``strategy`` "segmented": each step gathers the
    next ``block_len`` ids of the block's contiguous id range, ``[block_len, D]`` rows, and
    adds them to their bags with a one-hot fp32 product (no masked-off lanes however uneven
    the bags; needs ``block_bags``, ``block_len`` and the padded D to be >= 16).
    ``num_warps`` and ``num_stages`` as in Triton. ``eviction_policy`` ("evict_first",
    "evict_last"), Triton's L2 hint, applies to the row gathers only (rows are mostly read
    once). BENCHMARKS.md has the measurements.
    """

    block_bags: int = 1
    block_len: int = 16
    num_warps: int = 2
    num_stages: int = 2
    strategy: str = "bags"
    eviction_policy: str | None = None

    def __post_init__(self):
        for name in ("block_bags", "block_len", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"PooledConfig.{name} must be a power of two, got {v}")
        if self.num_stages < 1:
            raise ValueError(f"PooledConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.strategy not in ("bags", "segmented"):
            raise ValueError(f"PooledConfig.strategy must be bags|segmented, got {self.strategy!r}")
        if self.strategy == "segmented" and min(self.block_bags, self.block_len) < 16:
            raise ValueError(
                f"segmented strategy needs block_bags, block_len >= 16, got {self.block_bags}, "
                f"{self.block_len}"
            )
        if self.eviction_policy not in (None, "evict_first", "evict_last"):
            raise ValueError(
                f"PooledConfig.eviction_policy must be None|evict_first|evict_last, got "
                f"{self.eviction_policy!r}"
            )


SEGMENTED_MIN_BAGS = 1 << 17


EVICT_FIRST_MAX_OUT_BYTES = 16 << 20


def default_pooled_config(
    dim: int,
    dtype,
    num_bags: int | None = None,
    weighted: bool = False,
    out_bytes: int | None = None,
) -> PooledConfig:
    """The launch shape used when none is given: the fastest measured on an H100.

    By the padded row width in bytes: rows of at most 256 B take one warp and 16 ids per step
    (rows of at most 64 B also marked evict-first); unweighted fp32 rows of 512 B (D in
    (64, 128]) take the segmented strategy (16 bags x 32 ids, 4 warps) when there are at
    least ``SEGMENTED_MIN_BAGS`` bags (``num_bags`` = features x batch), else one bag with 32
    ids and 4 warps, its rows marked evict-first when the output (``out_bytes``) fits in
    ``EVICT_FIRST_MAX_OUT_BYTES`` (rows are read once; the output and ids then stay in L2);
    wider fp32 rows take 8 ids and 2 warps; the rest 16 ids and 2 warps (BENCHMARKS.md,
    "tuning").

    >>> cfg = default_pooled_config(128, "float32")
    >>> cfg.block_bags, cfg.block_len, cfg.num_warps, cfg.strategy, cfg.eviction_policy
    (1, 32, 4, 'bags', None)
    >>> default_pooled_config(128, "float32", out_bytes=512 * 4096 * 4).eviction_policy
    'evict_first'
    >>> default_pooled_config(128, "float32", num_bags=32 * 8192).strategy
    'segmented'
    >>> default_pooled_config(128, "float32", num_bags=32 * 8192, weighted=True).strategy
    'bags'
    >>> default_pooled_config(128, "bfloat16").num_warps
    1
    """
    dim_pad = next_power_of_2(dim)
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = dim_pad * itemsize
    if row_bytes <= 256:
        policy = "evict_first" if row_bytes <= 64 else None
        return PooledConfig(block_bags=1, block_len=16, num_warps=1, eviction_policy=policy)
    if itemsize == 4 and dim_pad == 128:
        if not weighted and num_bags is not None and num_bags >= SEGMENTED_MIN_BAGS:
            return PooledConfig(block_bags=16, block_len=32, num_warps=4, strategy="segmented")
        small_out = out_bytes is not None and out_bytes <= EVICT_FIRST_MAX_OUT_BYTES
        policy = "evict_first" if small_out else None
        return PooledConfig(block_bags=1, block_len=32, num_warps=4, eviction_policy=policy)
    if itemsize == 4 and dim_pad > 128:
        return PooledConfig(block_bags=1, block_len=8, num_warps=2)
    return PooledConfig()


def check_pooled_args(weights, features, num_columns, pooling, out, out_dtype, batch_size):
    """Check the pooling, the output columns and a given output; returns the output dtype."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    if not isinstance(num_columns, int) or num_columns < 1:
        raise ValueError(f"num_columns must be a positive int, got {num_columns!r}")
    check_columns(features, weights.shape[1], num_columns, f"num_columns={num_columns}")
    if out is not None:
        if out.shape != (batch_size, num_columns):
            raise ValueError(
                f"out must have shape {(batch_size, num_columns)}, got {tuple(out.shape)}"
            )
        if out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(out.dtype):
            raise ValueError(f"out_dtype {jnp.dtype(out_dtype)} differs from out.dtype {out.dtype}")
        return float_dtype(out.dtype)
    return float_dtype(weights.dtype if out_dtype is None else out_dtype)


class PooledOptions(TypedDict, total=False):
    """The options every pooled entry point takes beside its table (see :func:`pooled_lookup`):
    ``batch_size`` and ``num_columns`` (required), ``pooling`` ("sum"), ``bounds_check``
    ("warning"), ``out`` (None), ``out_dtype`` (None: the table's float dtype) and
    ``fill_uncovered`` (True)."""

    batch_size: Required[int]
    num_columns: Required[int]
    pooling: str
    bounds_check: BoundsCheck
    out: jax.Array | None
    out_dtype: Any
    fill_uncovered: bool


_OPTION_DEFAULTS = dict(
    pooling="sum", bounds_check="warning", out=None, out_dtype=None, fill_uncovered=True
)


def _static_arguments(view, ids, offsets, per_sample_weights, features, options) -> tuple:
    """Check the arguments every entry point shares (``view``: the float table the stored
    one stands for); returns the static arguments of the jitted implementations
    (``features`` as :class:`FeatureLayout` values, the output dtype), ``out`` and
    ``fill_uncovered``."""
    unknown = sorted(set(options) - set(PooledOptions.__annotations__))
    missing = sorted({"batch_size", "num_columns"} - set(options))
    if unknown or missing:
        raise TypeError(f"pooled lookup options: unknown {unknown}, missing {missing}")
    static = {**_OPTION_DEFAULTS, **options}
    out, out_dtype = static.pop("out"), static.pop("out_dtype")
    fill_uncovered = bool(static.pop("fill_uncovered"))
    batch_size, num_columns = static["batch_size"], static["num_columns"]
    validate_group(
        view, ids, offsets, per_sample_weights, features, batch_size, static["bounds_check"]
    )
    out_dt = check_pooled_args(
        view, features, num_columns, static["pooling"], out, out_dtype, batch_size
    )
    static.update(features=feature_layouts(features), out_dtype=out_dt)
    return static, out, fill_uncovered


# --------------------------------------------------------------------------- row decoders


class RowDecoder(Protocol):
    """How a kernel turns a table's stored rows into float32 values (static, hashable).

    The kernel reads rows through :meth:`decode`, in ``planes`` of ``lanes`` values: lane
    ``w`` of plane ``k`` is column ``w * planes + k`` (one plane, the plain columns, for a
    float table; one plane per value a packed word holds for a quantized one, so a word is
    loaded once and decoded in registers). The XLA reference reads them through
    :meth:`gather`.
    """

    dim: int
    name: str

    def check_table(self, table: jax.Array) -> jax.ShapeDtypeStruct:
        """Refuse a table this decoder cannot read (ValueError); the float32 ``[R, dim]``
        table it stands for."""
        ...

    def layout(self, word_bytes: int) -> tuple[int, int]:
        """``(planes, lanes)`` for a table of ``word_bytes``-byte elements."""
        ...

    def decode(self, table_ref, rows, valid, eviction_policy):
        """In the kernel: the rows ``rows`` (any leading shape) as ``planes`` float32 arrays
        ``[*rows.shape, lanes]``, exact zeros where ``valid`` is false (lanes past ``dim``
        are never stored: they may hold anything)."""
        ...

    def gather(self, table: jax.Array, rows: jax.Array) -> jax.Array:
        """In XLA: ``table``'s rows ``rows [N]`` (clamped) as ``[N, dim]`` float32."""
        ...


@dataclass(frozen=True)
class FloatRows:
    """The identity decoder: rows of a float32, float16 or bfloat16 table, read as stored.

    >>> FloatRows(dim=5).layout(4)
    (1, 8)
    """

    dim: int
    name: str = "jaxrec_pooled_lookup"

    def check_table(self, table):
        float_dtype(table.dtype)
        return jax.ShapeDtypeStruct(table.shape, table.dtype)

    def layout(self, word_bytes):
        return 1, next_power_of_2(self.dim)

    def decode(self, table_ref, rows, valid, eviction_policy):
        cols = jnp.arange(next_power_of_2(self.dim), dtype=jnp.int32)
        lead = tuple(range(valid.ndim))
        vals = masked_load(
            table_ref.at[jnp.expand_dims(rows, -1), jnp.expand_dims(cols, lead)],
            jnp.expand_dims(valid, -1) & jnp.expand_dims(cols < self.dim, lead),
            0,
            eviction_policy=eviction_policy,
        )
        return (vals.astype(jnp.float32),)

    def gather(self, table, rows):
        return jnp.take(table, rows, axis=0, mode="clip").astype(jnp.float32)


# --------------------------------------------------------------------------- Pallas kernel


def _pooled_kernel(
    meta_ref,
    offsets_ref,
    ids_ref,
    table_ref,
    *refs,
    decoder,
    batch_size,
    num_ids,
    pooling,
    checked,
    counted,
    weighted,
    aliased,
    config,
):
    refs = list(refs)
    psw_ref = refs.pop(0) if weighted else None
    if aliased:
        refs.pop(0)  # the aliased input buffer: same memory as out_ref
    out_ref, count_ref = refs
    block_bags, block_len = config.block_bags, config.block_len
    planes, lanes = decoder.layout(jnp.dtype(table_ref.dtype).itemsize)

    g = pl.program_id(0)
    blk = pl.program_id(1)
    kjt = meta_ref[g, 0]
    row_offset = meta_ref[g, 1]
    num_rows = meta_ref[g, 2]
    col_offset = meta_ref[g, 3]

    b = blk * block_bags + jnp.arange(block_bags, dtype=jnp.int32)
    in_batch = b < batch_size
    bag = kjt * batch_size + b
    start = masked_load(offsets_ref.at[bag], in_batch, 0)
    end = masked_load(offsets_ref.at[bag + 1], in_batch, 0)
    length = end - start

    def gather(pos, active):
        """The rows at ``pos`` as float32 planes (zero where inactive or invalid), times
        the per-sample weights when given, and the number of bad ids."""
        idx = masked_load(ids_ref.at[pos], active, 0)
        bad = jnp.int32(0)
        if checked:
            valid = active & (idx >= 0) & (idx < num_rows)
            if counted:
                bad = jnp.sum(active & ~valid, dtype=jnp.int32)
            rows = row_offset + jnp.where(valid, idx, 0)
        else:
            valid = active
            # "none": the id is not checked against its table, but the row stays in the buffer.
            rows = jnp.clip(row_offset + idx, 0, table_ref.shape[0] - 1)
        vals = decoder.decode(table_ref, rows, valid, config.eviction_policy)
        if psw_ref is not None:
            psw = jnp.expand_dims(masked_load(psw_ref.at[pos], valid, 0).astype(jnp.float32), -1)
            vals = tuple(v * psw for v in vals)
        return vals, bad

    acc0 = tuple(jnp.zeros((block_bags, lanes), jnp.float32) for _ in range(planes))
    if config.strategy == "bags":
        step_j = jnp.arange(block_len, dtype=jnp.int32)

        def step(s, carry):
            acc, bad = carry
            j = s * block_len + step_j
            pos = start[:, None] + j[None, :]
            active = (j[None, :] < length[:, None]) & (pos >= 0) & (pos < num_ids)
            vals, nbad = gather(pos, active)
            return tuple(a + jnp.sum(v, axis=1) for a, v in zip(acc, vals, strict=True)), bad + nbad

        num_steps = (jnp.max(length) + (block_len - 1)) // block_len
    else:
        first = jnp.min(jnp.where(in_batch, start, jnp.int32(2**31 - 1)))
        last = jnp.max(jnp.where(in_batch, end, 0))
        step_p = jnp.arange(block_len, dtype=jnp.int32)

        def step(s, carry):
            acc, bad = carry
            pos = first + s * block_len + step_p
            active = (pos < last) & (pos >= 0) & (pos < num_ids)
            vals, nbad = gather(pos, active)
            member = ((pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])).astype(
                jnp.float32
            )
            acc = tuple(
                a
                + jax.lax.dot(
                    member,
                    v,
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32,
                )
                for a, v in zip(acc, vals, strict=True)
            )
            return acc, bad + nbad

        num_steps = (jnp.maximum(last - first, 0) + (block_len - 1)) // block_len
    acc, bad = jax.lax.fori_loop(0, num_steps, step, (acc0, jnp.int32(0)))

    lane = jnp.arange(lanes, dtype=jnp.int32)
    for k, plane in enumerate(acc):
        if pooling == "mean":
            plane = mean_of_sums(plane, jnp.maximum(length, 1)[:, None], out_ref.dtype)
        cols = lane if planes == 1 else lane * planes + k
        masked_store(
            out_ref.at[b[:, None], (col_offset + cols)[None, :]],
            plane.astype(out_ref.dtype),
            in_batch[:, None] & (cols < decoder.dim)[None, :],
        )
    count_ref[g, blk] = bad


@functools.partial(
    jax.jit,
    static_argnames=(
        "decoder",
        "features",
        "batch_size",
        "num_columns",
        "pooling",
        "bounds_check",
        "out_dtype",
        "interpret",
        "config",
        "fill_uncovered",
    ),
)
def _pooled_pallas(
    table,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    decoder,
    features,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dtype,
    interpret,
    config,
    fill_uncovered,
):
    num_blocks = pl.cdiv(batch_size, config.block_bags)
    meta = jnp.asarray(np.asarray(features, np.int32).reshape(len(features), 4))
    weighted = per_sample_weights is not None
    if (
        out is None
        and fill_uncovered
        and not covers_all_columns(features, decoder.dim, num_columns)
    ):
        out = jnp.zeros((batch_size, num_columns), out_dtype)
    aliased = out is not None
    inputs = [meta, offsets, ids, table]
    if weighted:
        inputs.append(per_sample_weights)
    if aliased:
        inputs.append(out)
    kernel = functools.partial(
        _pooled_kernel,
        decoder=decoder,
        batch_size=batch_size,
        num_ids=ids.shape[0],
        pooling=pooling,
        checked=checks_ids(bounds_check),
        counted=counts_bad_ids(bounds_check),
        weighted=weighted,
        aliased=aliased,
        config=config,
    )
    pooled, counts = pl.pallas_call(
        kernel,
        grid=(len(features), num_blocks),
        out_shape=(
            jax.ShapeDtypeStruct((batch_size, num_columns), out_dtype),
            jax.ShapeDtypeStruct((len(features), num_blocks), jnp.int32),
        ),
        input_output_aliases={len(inputs) - 1: 0} if aliased else {},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=decoder.name,
    )(*inputs)
    return pooled, jnp.sum(counts)


def decoded_pooled_lookup(
    table: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    decoder: RowDecoder,
    config: PooledConfig,
    interpret: bool = False,
    **options: Unpack[PooledOptions],
) -> tuple[jax.Array, jax.Array]:
    """The pooled kernel reading ``table`` through ``decoder``: what :func:`pooled_lookup`
    (:class:`FloatRows`) and the quantized lookup run; ``options`` as :func:`pooled_lookup`'s."""
    static, out, fill_uncovered = _static_arguments(
        decoder.check_table(table), ids, offsets, per_sample_weights, features, options
    )
    if config.strategy == "segmented" and decoder.layout(table.dtype.itemsize)[1] < 16:
        raise ValueError(
            f"segmented strategy needs >= 16 lanes a plane, got "
            f"{decoder.layout(table.dtype.itemsize)[1]} (dim={decoder.dim}, {table.dtype} table)"
        )
    if ids.shape[0] == 0:
        # No values: every bag is empty (a longer one could read nothing). The kernel needs
        # one addressable id, so it gets a never-read padding id and all-empty bags.
        ids = jnp.zeros((1,), jnp.int32)
        offsets = jnp.zeros_like(offsets)
        if per_sample_weights is not None:
            per_sample_weights = jnp.zeros((1,), per_sample_weights.dtype)
    return _pooled_pallas(
        table,
        ids,
        offsets,
        per_sample_weights,
        out,
        decoder=decoder,
        interpret=interpret,
        config=config,
        fill_uncovered=fill_uncovered,
        **static,
    )


def pooled_lookup(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    batch_size: int,
    num_columns: int,
    pooling: str = "sum",
    bounds_check: BoundsCheck = "warning",
    out: jax.Array | None = None,
    out_dtype=None,
    interpret: bool = False,
    config: PooledConfig | None = None,
    fill_uncovered: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Pooled lookup of one stacked table group with the Pallas (Triton) kernel.

    Returns ``(out [batch_size, num_columns], bad_id_count int32 scalar)``. With ``out`` given,
    only this group's columns are written into it (in place when donated); otherwise columns
    no feature covers are zeros, or, with ``fill_uncovered=False``, left unwritten (undefined)
    for later groups to fill, which saves a zero pass over the whole output when several
    groups share it. ``interpret=True`` runs the same kernel on the CPU.
    See the module docstring for the layout and bounds rules.

    >>> import jax.numpy as jnp
    >>> w = jnp.ones((4, 3), jnp.float32)
    >>> ids = jnp.array([1, 3, 9, 0], jnp.int32)            # 9 is out of range; 0 is padding
    >>> offs = jnp.array([0, 2, 3], jnp.int32)
    >>> out, bad = pooled_lookup(w, ids, offs, None, ((0, 0, 4, 0),), batch_size=2,
    ...                          num_columns=3, interpret=True)
    >>> out.tolist(), int(bad)
    ([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]], 1)
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be 2-D [rows, dim], got shape {weights.shape}")
    decoder = FloatRows(dim=weights.shape[1])
    options = PooledOptions(
        batch_size=batch_size,
        num_columns=num_columns,
        pooling=pooling,
        bounds_check=bounds_check,
        out=out,
        out_dtype=out_dtype,
        fill_uncovered=fill_uncovered,
    )
    if config is None:
        static, _, _ = _static_arguments(
            weights, ids, offsets, per_sample_weights, features, options
        )
        config = default_pooled_config(
            weights.shape[1],
            weights.dtype,
            num_bags=len(features) * batch_size,
            weighted=per_sample_weights is not None,
            out_bytes=batch_size * num_columns * static["out_dtype"].itemsize,
        )
    return decoded_pooled_lookup(
        weights,
        ids,
        offsets,
        per_sample_weights,
        features,
        decoder=decoder,
        config=config,
        interpret=interpret,
        **options,
    )


# --------------------------------------------------------------------------- XLA reference


def mean_of_sums(sums: jax.Array, lengths: jax.Array, out_dtype) -> jax.Array:
    """float32 ``sums / lengths`` for a MEAN bag whose output is ``out_dtype``.

    A 16-bit output rounds the sum to ``out_dtype`` before dividing, as torch's 16-bit
    ``EmbeddingBag(mode="mean")`` (TorchRec's EBC) does, so both round the same way.
    """
    if jnp.dtype(out_dtype).itemsize < 4:
        sums = sums.astype(out_dtype).astype(jnp.float32)
    return sums / lengths.astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "decoder",
        "features",
        "batch_size",
        "num_columns",
        "pooling",
        "bounds_check",
        "out_dtype",
    ),
)
def _pooled_xla(
    table,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    decoder,
    features,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dtype,
):
    features = feature_layouts(features)
    dim = decoder.dim
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, ids.shape[0])
    if out is None:
        out = jnp.zeros((batch_size, num_columns), out_dtype)
    lengths = (offsets[1:] - offsets[:-1]).reshape(num_kjt, batch_size)
    bad_total = jnp.int32(0)
    for group_idx in feature_rounds(features):
        rows, valid, bad, slot, b = lookup_rows(
            ids,
            bags,
            live,
            features,
            group_idx,
            batch_size,
            num_kjt,
            checked=checks_ids(bounds_check),
        )
        # "none" reads clip(row, 0, R - 1), as the kernel does.
        vals = decoder.gather(table, rows)
        if per_sample_weights is not None:
            vals = vals * per_sample_weights.astype(jnp.float32)[:, None]
        # Positions that read no row add an exact zero: a select, not a product with 0, so
        # a row they were pointed at (whatever its values) cannot leak a NaN.
        vals = jnp.where(valid[:, None], vals, 0.0)
        n = len(group_idx)
        pooled = jax.ops.segment_sum(vals, slot * batch_size + b, num_segments=(n + 1) * batch_size)
        pooled = pooled[: n * batch_size].reshape(n, batch_size, dim)
        if pooling == "mean":
            kjts = np.array([features[g].kjt_index for g in group_idx])
            pooled = mean_of_sums(pooled, jnp.maximum(lengths[kjts], 1)[:, :, None], out_dtype)
        pooled = pooled.astype(out_dtype)
        cols = [features[g].col_offset for g in group_idx]
        if cols == [cols[0] + k * dim for k in range(n)]:  # contiguous: one transposed write
            block = pooled.transpose(1, 0, 2).reshape(batch_size, n * dim)
            out = jax.lax.dynamic_update_slice(out, block, (0, cols[0]))
        else:
            for k, c in enumerate(cols):
                out = jax.lax.dynamic_update_slice(out, pooled[k], (0, c))
        if counts_bad_ids(bounds_check):
            bad_total = bad_total + jnp.sum(bad.astype(jnp.int32))
    return out, bad_total


def decoded_pooled_lookup_reference(
    table: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    decoder: RowDecoder,
    **options: Unpack[PooledOptions],
) -> tuple[jax.Array, jax.Array]:
    """The XLA reference reading ``table`` through ``decoder`` (gather, decode,
    ``segment_sum``): the oracle of :func:`decoded_pooled_lookup`, same arguments but the
    launch shape. Uncovered columns of a fresh output are always zeros here (XLA has no
    unwritten buffers), so ``fill_uncovered`` only keeps the signatures alike."""
    static, out, _ = _static_arguments(
        decoder.check_table(table), ids, offsets, per_sample_weights, features, options
    )
    return _pooled_xla(table, ids, offsets, per_sample_weights, out, decoder=decoder, **static)


def pooled_lookup_reference(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    **options: Unpack[PooledOptions],
) -> tuple[jax.Array, jax.Array]:
    """Pure-XLA pooled lookup (gather + ``segment_sum``), same contract as :func:`pooled_lookup`
    (``options``: its keyword arguments but ``interpret`` and ``config``).

    The backend for CPU/TPU and the oracle the kernel is tested against. "none" reads the
    clamped stacked row of a bad id, as the kernel does. Uncovered columns of a fresh output
    are always zeros here, so ``fill_uncovered`` only keeps the signatures alike.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be 2-D [rows, dim], got shape {weights.shape}")
    decoder = FloatRows(dim=weights.shape[1])
    return decoded_pooled_lookup_reference(
        weights, ids, offsets, per_sample_weights, features, decoder=decoder, **options
    )
