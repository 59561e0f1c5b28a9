"""Pooled lookup from row-wise quantized tables: Pallas GPU kernel + XLA reference.

The layout and the contract are :mod:`~jaxrec_kernels.pooled_lookup`'s (``ids``,
``offsets [F*B+1]``, the ``(kjt_feature_index, row_offset, num_rows, col_offset)`` feature
tuples, SUM/MEAN, per-sample weights, bounds modes), except that the stacked table is
``qweights [R, row_bytes] uint8`` in one of FBGEMM's fused row-wise layouts
(:mod:`~jaxrec_kernels.rowwise_quantization`: ``"int8"`` rows of ``dim`` bytes and a
float32 scale and bias; ``"int4"``/``"int2"`` rows of packed values and a float16 scale
and bias). Every row read is dequantized in the kernel, ``scale * q + bias`` in float32,
and pooled in float32: a table of ``dim`` values reads ``row_bytes(dim, weight_type)``
bytes a row instead of ``4 * dim``.

The kernel reads the table in bytes, or in 2- or 4-byte words where byte offsets would
overflow the 32-bit offsets of JAX's Triton lowering (:func:`kernel_word_bytes`); the
float16 scale and bias are decoded with integer operations
(:func:`~jaxrec_kernels.rowwise_quantization.float16_bits_to_float32`). A position that
reads no row (a bad id, padding, a lane past a bag's end) adds an exact zero (a select,
not a product with a zero mask), so no byte it was pointed at can turn the sum into NaN.

The product and the bias may be rounded once (an FMA, as the GPU contracts it and as
FBGEMM's dequantization does) or twice (XLA on the CPU, interpret mode): the results of
the kernel, the reference and a lookup of the dequantized table agree to float32 rounding.

>>> import jax.numpy as jnp
>>> from jaxrec_kernels.rowwise_quantization import quantize_rows
>>> table = jnp.array([[0.0, 1.0], [2.0, 4.0], [1.0, 1.0]], jnp.float32)
>>> q = quantize_rows(table, "int8")                   # [3, 2 + 8] uint8
>>> ids = jnp.array([0, 1, 2, 7], jnp.int32)            # 7 is outside the table
>>> offs = jnp.array([0, 2, 4], jnp.int32)
>>> out, bad = quantized_pooled_lookup_reference(
...     q, ids, offs, None, ((0, 0, 3, 0),), dim=2, weight_type="int8", batch_size=2,
...     num_columns=2)
>>> out.tolist(), int(bad)
([[2.0, 5.0], [1.0, 1.0]], 1)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._pallas_compat import compiler_params, masked_load, masked_store, next_power_of_2
from .pooled_lookup import (
    Feature,
    PooledConfig,
    _check_pooled_args,
    covers_all_columns,
    feature_rounds,
    lookup_rows,
    mean_of_sums,
    position_bags,
    validate_group,
)
from .rowwise_quantization import (
    BITS,
    float16_bits_to_float32,
    packed_dim,
    row_bytes,
    row_scale_bias,
    unpack_values,
)

__all__ = [
    "default_quantized_config",
    "kernel_table",
    "kernel_word_bytes",
    "quantized_pooled_lookup",
    "quantized_pooled_lookup_reference",
]


def default_quantized_config(dim: int, weight_type: str) -> PooledConfig:
    """The launch shape used when none is given: one bag per program, 16 ids per step
    (32 for rows of at most 64 bytes), one warp (two for rows over 256 bytes).

    >>> default_quantized_config(128, "int8")
    PooledConfig(block_bags=1, block_len=16, num_warps=1, num_stages=2, strategy='bags', eviction_policy=None)
    >>> default_quantized_config(128, "int4").block_len
    16
    >>> default_quantized_config(64, "int4").block_len
    32
    """
    nbytes = row_bytes(dim, weight_type)
    block_len = 32 if nbytes <= 64 else 16
    return PooledConfig(block_bags=1, block_len=block_len, num_warps=1 if nbytes <= 256 else 2)


def _check_quantized_args(qweights, dim, weight_type, config=None) -> jax.ShapeDtypeStruct:
    """Check the quantized table; returns the float32 ``[R, dim]`` table it stands for."""
    if weight_type not in BITS:
        raise ValueError(f"weight_type must be one of {tuple(BITS)}, got {weight_type!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    width = row_bytes(dim, weight_type)
    if qweights.ndim != 2 or jnp.dtype(qweights.dtype) != jnp.uint8:
        raise ValueError(
            f"qweights must be 2-D uint8 [rows, row_bytes], got {qweights.shape} {qweights.dtype}"
        )
    if qweights.shape[1] != width:
        raise ValueError(
            f"qweights rows of a {weight_type} table of dim {dim} have {width} bytes, got "
            f"{qweights.shape[1]}"
        )
    if config is not None and config.strategy != "bags":
        raise ValueError(f"the quantized kernel runs the 'bags' strategy, got {config.strategy!r}")
    return jax.ShapeDtypeStruct((qweights.shape[0], dim), jnp.float32)


# --------------------------------------------------------------------------- Pallas kernel


#: JAX's Triton lowering addresses an operand with 32-bit signed element offsets unless it
#: holds more than 2**32 bytes, so a byte-element table of 2**31 to 2**32 bytes would wrap
#: past 2**31 and read before the buffer (the cause of NaN from the INT4 "large" table).
_OFFSETS_32_BIT = (2**31, 2**32)
_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def kernel_word_bytes(num_rows: int, width: int) -> int:
    """Bytes per element the kernel reads a ``[num_rows, width]`` uint8 table in.

    1 (bytes) unless the table holds ``2**31`` to ``2**32`` bytes, where byte offsets
    would overflow the 32-bit signed offsets JAX's Triton lowering uses up to ``2**32``
    bytes; those tables are read as 4-byte words (fewer elements; rows padded to a
    multiple of 4 bytes if needed, which copies the table), 2-byte words when the rows
    have an even width that is not a multiple of 4.

    >>> kernel_word_bytes(1 << 25, 68)     # INT4, 32 tables x 1M rows x 128: 2.3 GB
    4
    >>> kernel_word_bytes(1 << 25, 136), kernel_word_bytes(1000, 68)
    (1, 1)
    """
    low, high = _OFFSETS_32_BIT
    if not low <= num_rows * width <= high:
        return 1
    return 2 if width % 4 == 2 else 4


def kernel_table(qweights: jax.Array, word_bytes: int) -> jax.Array:
    """``qweights [R, W] uint8`` as ``[R, ceil(W / word_bytes)]`` little-endian words
    (``uint8``, ``uint16`` or ``uint32``); rows are zero-padded to whole words.

    >>> kernel_table(jnp.arange(6, dtype=jnp.uint8).reshape(2, 3), 2).tolist()
    [[256, 2], [1027, 5]]
    """
    if word_bytes not in _WORD_DTYPES:
        raise ValueError(f"word_bytes must be 1, 2 or 4, got {word_bytes!r}")
    if word_bytes == 1:
        return qweights
    rows, width = qweights.shape
    pad = -width % word_bytes
    if pad:
        qweights = jnp.pad(qweights, ((0, 0), (0, pad)))
    words = qweights.reshape(rows, -1, word_bytes)
    return jax.lax.bitcast_convert_type(words, _WORD_DTYPES[word_bytes])


def _load_field(table_ref, rows, first: int, nbytes: int, valid, word_bytes: int):
    """The ``nbytes`` (2 or 4) little-endian bytes at byte ``first`` of each row, as uint32.

    Each table element the field overlaps is loaded once (a padded row's field may
    straddle two). Lanes where ``valid`` is false read nothing and give 0."""
    out = None
    for word in range(first // word_bytes, (first + nbytes - 1) // word_bytes + 1):
        lo = max(first, word * word_bytes)  # the field's bytes in this element
        hi = min(first + nbytes, (word + 1) * word_bytes)
        part = masked_load(table_ref.at[rows, word], valid, 0).astype(jnp.uint32)
        if lo > word * word_bytes:
            part = part >> np.uint32(8 * (lo - word * word_bytes))
        if hi - lo < 4:
            part = part & np.uint32((1 << (8 * (hi - lo))) - 1)
        if lo > first:
            part = part << np.uint32(8 * (lo - first))
        out = part if out is None else out | part
    return out


def _field_as_float(bits, nbytes: int):
    """A float32 (``nbytes == 4``) or float16 (``2``) field's bits as float32 values."""
    if nbytes == 4:
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return float16_bits_to_float32(bits)


def _quantized_kernel(
    meta_ref,
    offsets_ref,
    ids_ref,
    qweights_ref,
    *refs,
    batch_size,
    num_ids,
    dim,
    weight_type,
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
    dim_pad = next_power_of_2(dim)
    bits = BITS[weight_type]
    word_bytes = jnp.dtype(qweights_ref.dtype).itemsize
    per_word = 8 * word_bytes // bits  # values per table element
    sb_first = packed_dim(dim, weight_type)
    sb_bytes = 4 if bits == 8 else 2

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
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    col_ok = cols < dim
    word_of_col = cols // per_word
    shift = ((cols % per_word) * bits).astype(jnp.uint32)
    mask = np.uint32((1 << bits) - 1)
    step_j = jnp.arange(block_len, dtype=jnp.int32)

    def step(s, carry):
        acc, bad = carry
        j = s * block_len + step_j
        pos = start[:, None] + j[None, :]
        active = (j[None, :] < length[:, None]) & (pos >= 0) & (pos < num_ids)
        idx = masked_load(ids_ref.at[pos], active, 0)
        nbad = jnp.int32(0)
        if checked:
            valid = active & (idx >= 0) & (idx < num_rows)
            if counted:
                nbad = jnp.sum(active & ~valid, dtype=jnp.int32)
            rows = row_offset + jnp.where(valid, idx, 0)
        else:
            valid = active
            rows = jnp.clip(row_offset + idx, 0, qweights_ref.shape[0] - 1)
        lanes = valid[..., None] & col_ok[None, None, :]
        packed = masked_load(
            qweights_ref.at[rows[..., None], word_of_col[None, None, :]],
            lanes,
            0,
            eviction_policy=config.eviction_policy,
        ).astype(jnp.uint32)
        values = ((packed >> shift) & mask).astype(jnp.float32)
        sb = functools.partial(_load_field, qweights_ref, rows, valid=valid, word_bytes=word_bytes)
        scale = _field_as_float(sb(sb_first, sb_bytes), sb_bytes)
        bias = _field_as_float(sb(sb_first + sb_bytes, sb_bytes), sb_bytes)
        if psw_ref is not None:
            psw = masked_load(psw_ref.at[pos], valid, 0).astype(jnp.float32)
            scale, bias = scale * psw, bias * psw
        vals = values * scale[..., None] + bias[..., None]
        # Lanes that read nothing add an exact zero, whatever their (zero) loads multiply.
        vals = jnp.where(lanes, vals, 0.0)
        return acc + jnp.sum(vals, axis=1), bad + nbad

    num_steps = (jnp.max(length) + (block_len - 1)) // block_len
    acc0 = jnp.zeros((block_bags, dim_pad), jnp.float32)
    acc, bad = jax.lax.fori_loop(0, num_steps, step, (acc0, jnp.int32(0)))
    if pooling == "mean":
        acc = mean_of_sums(acc, jnp.maximum(length, 1)[:, None], out_ref.dtype)
    masked_store(
        out_ref.at[b[:, None], (col_offset + cols)[None, :]],
        acc.astype(out_ref.dtype),
        in_batch[:, None] & col_ok[None, :],
    )
    count_ref[g, blk] = bad


@functools.partial(
    jax.jit,
    static_argnames=(
        "features",
        "dim",
        "weight_type",
        "batch_size",
        "num_columns",
        "pooling",
        "bounds_check",
        "out_dtype",
        "interpret",
        "config",
        "fill_uncovered",
        "word_bytes",
    ),
)
def _quantized_pallas(
    qweights,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    features,
    dim,
    weight_type,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dtype,
    interpret,
    config,
    fill_uncovered,
    word_bytes,
):
    num_blocks = pl.cdiv(batch_size, config.block_bags)
    meta = jnp.asarray(np.asarray(features, np.int32).reshape(len(features), 4))
    weighted = per_sample_weights is not None
    if out is None and fill_uncovered and not covers_all_columns(features, dim, num_columns):
        out = jnp.zeros((batch_size, num_columns), out_dtype)
    aliased = out is not None
    inputs = [meta, offsets, ids, kernel_table(qweights, word_bytes)]
    if weighted:
        inputs.append(per_sample_weights)
    if aliased:
        inputs.append(out)
    kernel = functools.partial(
        _quantized_kernel,
        batch_size=batch_size,
        num_ids=ids.shape[0],
        dim=dim,
        weight_type=weight_type,
        pooling=pooling,
        checked=bounds_check != "none",
        counted=bounds_check in ("fatal", "warning"),
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
        name=f"jaxrec_{weight_type}_pooled_lookup",
    )(*inputs)
    return pooled, jnp.sum(counts)


def quantized_pooled_lookup(
    qweights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[Feature, ...],
    *,
    dim: int,
    weight_type: str,
    batch_size: int,
    num_columns: int,
    pooling: str = "sum",
    bounds_check: str = "warning",
    out: jax.Array | None = None,
    out_dtype=None,
    interpret: bool = False,
    config: PooledConfig | None = None,
    fill_uncovered: bool = True,
    word_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pooled lookup of one quantized stacked group with the Pallas (Triton) kernel.

    ``qweights [R, row_bytes(dim, weight_type)] uint8``; the rest as
    :func:`jaxrec_kernels.pooled_lookup` (``out_dtype`` defaults to float32). Returns
    ``(out [batch_size, num_columns], bad_id_count)``. ``config`` must use the "bags"
    strategy (default :func:`default_quantized_config`). ``word_bytes`` (1, 2 or 4) is
    the element the kernel reads the table in (default :func:`kernel_word_bytes`); every
    choice gives the same result.

    >>> import jax.numpy as jnp
    >>> from jaxrec_kernels.rowwise_quantization import quantize_rows
    >>> q = quantize_rows(jnp.array([[0.0, 15.0], [1.0, 1.0]]), "int4")  # scale 1 and 0
    >>> out, bad = quantized_pooled_lookup(q, jnp.array([0, 1, 1], jnp.int32),
    ...     jnp.array([0, 1, 3], jnp.int32), None, ((0, 0, 2, 0),), dim=2, weight_type="int4",
    ...     batch_size=2, num_columns=2, interpret=True)
    >>> out.tolist(), int(bad)
    ([[0.0, 15.0], [2.0, 2.0]], 0)
    """
    view = _check_quantized_args(qweights, dim, weight_type, config)
    validate_group(view, ids, offsets, per_sample_weights, features, batch_size, bounds_check)
    out_dt = _check_pooled_args(view, features, num_columns, pooling, out, out_dtype, batch_size)
    if config is None:
        config = default_quantized_config(dim, weight_type)
    if word_bytes is None:
        word_bytes = kernel_word_bytes(*qweights.shape)
    elif word_bytes not in _WORD_DTYPES:
        raise ValueError(f"word_bytes must be 1, 2 or 4, got {word_bytes!r}")
    if ids.shape[0] == 0:
        # As pooled_lookup: one never-read padding id and all-empty bags.
        ids = jnp.zeros((1,), jnp.int32)
        offsets = jnp.zeros_like(offsets)
        if per_sample_weights is not None:
            per_sample_weights = jnp.zeros((1,), per_sample_weights.dtype)
    return _quantized_pallas(
        qweights,
        ids,
        offsets,
        per_sample_weights,
        out,
        features=features,
        dim=dim,
        weight_type=weight_type,
        batch_size=batch_size,
        num_columns=num_columns,
        pooling=pooling,
        bounds_check=bounds_check,
        out_dtype=out_dt,
        interpret=interpret,
        config=config,
        fill_uncovered=bool(fill_uncovered),
        word_bytes=word_bytes,
    )


# --------------------------------------------------------------------------- XLA reference


def _dequantize_gathered(qrows: jax.Array, weight_type: str, dim: int) -> jax.Array:
    """Gathered ``[N, row_bytes]`` rows as ``[N, dim]`` float32, ``q * scale + bias``."""
    scale, bias = row_scale_bias(qrows, weight_type)
    values = unpack_values(qrows[:, : packed_dim(dim, weight_type)], weight_type, dim)
    return values * scale[:, None] + bias[:, None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "features",
        "dim",
        "weight_type",
        "batch_size",
        "num_columns",
        "pooling",
        "bounds_check",
        "out_dt",
    ),
)
def _quantized_xla(
    qweights,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    features,
    dim,
    weight_type,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dt,
):
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, ids.shape[0])
    if out is None:
        out = jnp.zeros((batch_size, num_columns), out_dt)
    lengths = (offsets[1:] - offsets[:-1]).reshape(num_kjt, batch_size)
    bad_total = jnp.int32(0)
    for group_idx in feature_rounds(features):
        rows, valid, bad, slot, b = lookup_rows(
            ids, bags, live, features, group_idx, batch_size, num_kjt, bounds_check != "none"
        )
        qrows = jnp.take(qweights, rows, axis=0, mode="clip")  # "none": the clamped row
        vals = _dequantize_gathered(qrows, weight_type, dim)
        if per_sample_weights is not None:
            vals = vals * per_sample_weights.astype(jnp.float32)[:, None]
        # Positions that read no row add an exact zero: a select, not a product with 0,
        # so a row they were pointed at (row 0, whatever its bytes) cannot leak a NaN.
        vals = jnp.where(valid[:, None], vals, 0.0)
        n = len(group_idx)
        pooled = jax.ops.segment_sum(vals, slot * batch_size + b, num_segments=(n + 1) * batch_size)
        pooled = pooled[: n * batch_size].reshape(n, batch_size, dim)
        if pooling == "mean":
            kjts = np.array([features[g][0] for g in group_idx])
            pooled = mean_of_sums(pooled, jnp.maximum(lengths[kjts], 1)[:, :, None], out_dt)
        pooled = pooled.astype(out_dt)
        for k, g in enumerate(group_idx):
            out = jax.lax.dynamic_update_slice(out, pooled[k], (0, features[g][3]))
        if bounds_check in ("fatal", "warning"):
            bad_total = bad_total + jnp.sum(bad.astype(jnp.int32))
    return out, bad_total


def quantized_pooled_lookup_reference(
    qweights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[Feature, ...],
    *,
    dim: int,
    weight_type: str,
    batch_size: int,
    num_columns: int,
    pooling: str = "sum",
    bounds_check: str = "warning",
    out: jax.Array | None = None,
    out_dtype=None,
    fill_uncovered: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Pure-XLA quantized pooled lookup (gather the bytes, dequantize, ``segment_sum``).

    Same contract as :func:`quantized_pooled_lookup`; only the rows the ids read are
    dequantized. The backend for CPU/TPU and the oracle of the kernel's tests.
    ``fill_uncovered`` only keeps the signatures alike (uncovered columns are zeros).
    """
    view = _check_quantized_args(qweights, dim, weight_type)
    validate_group(view, ids, offsets, per_sample_weights, features, batch_size, bounds_check)
    out_dt = _check_pooled_args(view, features, num_columns, pooling, out, out_dtype, batch_size)
    return _quantized_xla(
        qweights,
        ids,
        offsets,
        per_sample_weights,
        out,
        features=features,
        dim=dim,
        weight_type=weight_type,
        batch_size=batch_size,
        num_columns=num_columns,
        pooling=pooling,
        bounds_check=bounds_check,
        out_dt=out_dt,
    )
