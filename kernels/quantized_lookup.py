"""Pooled lookup from row-wise quantized tables: the pooled kernel with a dequantizing decoder.

The kernel and the XLA reference are :mod:`~jaxrec_kernels.pooled_lookup`'s, reading rows
through :class:`QuantizedRows` instead of the identity decoder; the layout and the contract
are the same (``ids``,
``offsets [F*B+1]``, the ``(kjt_feature_index, row_offset, num_rows, col_offset)`` feature
tuples, SUM/MEAN, per-sample weights, bounds modes), except that the stacked table is
``qweights [R, row_bytes] uint8`` in one of FBGEMM's fused row-wise layouts
(:mod:`~jaxrec_kernels.rowwise_quantization`: ``"int8"`` rows of ``dim`` bytes and a
float32 scale and bias; ``"int4"``/``"int2"`` rows of packed values and a float16 scale
and bias). Every row read is dequantized in the kernel, ``scale * q + bias`` in float32,
and pooled in float32: a table of ``dim`` values reads ``row_bytes(dim, weight_type)``
bytes a row instead of ``4 * dim``.

The kernel reads the table in 4-byte words (2-byte words, or bytes, when the row width
is not a multiple of 4; see :func:`kernel_word_bytes`): each word is loaded once and its
values are decoded in registers, one plane of columns per value a word holds, so a row of
INT8 values costs a quarter of the loads of its float32 row. Words also keep element
offsets below 2**31 on tables of 2 to 4 GiB, past which JAX's Triton lowering's 32-bit
offsets would wrap. A table can be held as words already (:func:`kernel_table`) so that no
call converts it. The float16 scale and bias are decoded with integer operations
(:func:`~jaxrec_kernels.rowwise_quantization.float16_bits_to_float32`). A position that
reads no row (a bad id, padding, a lane past a bag's end) adds an exact zero: its values,
scale and bias are masked loads that read nothing and give 0, so it adds ``0 * 0 + 0``
and no byte it was pointed at can turn the sum into NaN; no select is spent per value.

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

from dataclasses import dataclass
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
import numpy as np

from ._pallas_compat import masked_load, next_power_of_2
from .layout import FeatureLayout
from .pooled_lookup import (
    PooledConfig,
    PooledOptions,
    decoded_pooled_lookup,
    decoded_pooled_lookup_reference,
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
    "DEFAULT_LAUNCH",
    "QuantizedLaunch",
    "QuantizedRows",
    "default_quantized_config",
    "kernel_table",
    "kernel_word_bytes",
    "quantized_pooled_lookup",
    "quantized_pooled_lookup_reference",
]

_WORD_DTYPES = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}

#: JAX's Triton lowering addresses an operand with 32-bit signed element offsets unless it
#: holds more than 2**32 bytes, so a byte-element table of 2**31 to 2**32 bytes would wrap
#: past 2**31 and read before the buffer (the cause of NaN from the INT4 "large" table).
_OFFSETS_32_BIT = (2**31, 2**32)


class QuantizedLaunch(NamedTuple):
    """How the quantized kernel is launched when no ``config`` is given.

    ``row_bytes_per_warp``: bytes of stored rows one warp gathers per loop step (the ids
    per step are the nearest power of two, 8 to 128, of this over the row's bytes);
    ``num_warps``: warps per program for rows of at most 256 bytes (twice as many for wider
    rows); ``block_bags``: bags per program; ``word_bytes``: the element (1, 2 or 4 bytes)
    the table is read in when it is safe (:func:`kernel_word_bytes`);
    ``one_scale_bias_read``: the scale and bias of a row come in one load of the elements
    they span (else one load each).
    """

    row_bytes_per_warp: int = 4096
    num_warps: int = 1
    block_bags: int = 1
    word_bytes: int = 4
    one_scale_bias_read: bool = True


#: The default launch per weight type: the line the GPU check
#: (``python -m benchmarks.gpu_check_quantized``) prints its best measured shape as.
#: INT8 and INT4 are the fastest forms of the H200 sweep (run D in BENCHMARKS.md): ~2 KB
#: of rows in flight per warp and step (16 and 32 ids of dim 128) on one warp, read in
#: 4-byte words; INT8 loads its scale and bias one at a time (the single load measured
#: 2.6x slower there), INT4 in one load. INT2 keeps the unmeasured ~4 KB.
DEFAULT_LAUNCH: dict[str, QuantizedLaunch] = {
    "int8": QuantizedLaunch(
        row_bytes_per_warp=2176, num_warps=1, block_bags=1, word_bytes=4, one_scale_bias_read=False
    ),
    "int4": QuantizedLaunch(row_bytes_per_warp=2176, num_warps=1, block_bags=1, word_bytes=4),
    "int2": QuantizedLaunch(row_bytes_per_warp=4096, num_warps=1, block_bags=1, word_bytes=4),
}


def default_quantized_config(dim: int, weight_type: str) -> PooledConfig:
    """The launch shape used when none is given, from :data:`DEFAULT_LAUNCH`: its bags and
    warps (twice the warps for rows over 256 bytes), with as many ids per step (8 to 128) as
    keep about ``row_bytes_per_warp`` bytes of rows in flight per warp: a quantized row is
    a fraction of a float row's bytes, so it takes more rows per step to hide the same
    memory latency.

    >>> default_quantized_config(128, "int8")                  # rows of 136 bytes
    PooledConfig(block_bags=1, block_len=16, num_warps=1, num_stages=2, strategy='bags', eviction_policy=None)
    >>> default_quantized_config(128, "int4").block_len        # rows of 68 bytes
    32
    >>> default_quantized_config(512, "int8").num_warps, default_quantized_config(512, "int8").block_len
    (2, 8)
    """
    if weight_type not in DEFAULT_LAUNCH:
        raise ValueError(f"weight_type must be one of {tuple(DEFAULT_LAUNCH)}, got {weight_type!r}")
    launch = DEFAULT_LAUNCH[weight_type]
    nbytes = row_bytes(dim, weight_type)
    num_warps = launch.num_warps * (1 if nbytes <= 256 else 2)
    rows = launch.row_bytes_per_warp * num_warps / nbytes
    block_len = min(128, max(8, 1 << round(np.log2(rows))))
    return PooledConfig(block_bags=launch.block_bags, block_len=block_len, num_warps=num_warps)


def _offsets_fit(num_rows: int, width: int, word_bytes: int) -> bool:
    """Whether every element of the ``word_bytes`` view is addressable by the lowering."""
    elements = num_rows * -(-width // word_bytes)
    low, high = _OFFSETS_32_BIT
    return elements * word_bytes > high or elements < low


def kernel_word_bytes(num_rows: int, width: int, preferred: int = 4) -> int:
    """Bytes per element the kernel reads a ``[num_rows, width]`` uint8 table in.

    ``preferred`` when the rows are whole elements of it, else the widest of 4 and 2 that
    divides the row width (the view is a free bitcast), else bytes; except that no view
    whose element offsets pass ``2**31`` in a table of at most ``2**32`` bytes is chosen
    (JAX's Triton lowering addresses such an operand with 32-bit signed offsets, which
    would wrap): when none fits, the rows are padded to whole 4-byte words (a copy).

    >>> kernel_word_bytes(1 << 25, 68), kernel_word_bytes(1 << 25, 136)   # INT4, INT8 "large"
    (4, 4)
    >>> kernel_word_bytes(1 << 25, 136, 1), kernel_word_bytes(1 << 25, 68, 1)  # 4.6 GB, 2.3 GB
    (1, 4)
    >>> kernel_word_bytes(1000, 14), kernel_word_bytes(1000, 7), kernel_word_bytes(1 << 28, 9)
    (2, 1, 4)
    """
    if preferred not in _WORD_DTYPES:
        raise ValueError(f"word_bytes must be 1, 2 or 4, got {preferred!r}")
    for word_bytes in dict.fromkeys((preferred, 4, 2, 1)):
        if width % word_bytes == 0 and _offsets_fit(num_rows, width, word_bytes):
            return word_bytes
    return 4


def kernel_table(qweights: jax.Array, word_bytes: int) -> jax.Array:
    """``qweights [R, W] uint8`` as ``[R, ceil(W / word_bytes)]`` little-endian words
    (``uint8``, ``uint16`` or ``uint32``); rows are zero-padded to whole words. A table held
    this way is read as it is by :func:`quantized_pooled_lookup`.

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
    elements = {
        word: masked_load(table_ref.at[rows, word], valid, 0).astype(jnp.uint32)
        for word in range(first // word_bytes, (first + nbytes - 1) // word_bytes + 1)
    }
    return _assemble(elements, first, nbytes, word_bytes)


def _load_elements(table_ref, rows, first: int, nbytes: int, valid, word_bytes: int):
    """The table elements bytes ``[first, first + nbytes)`` of each row span, ``{index:
    uint32 values}``, from one load of a ``[*rows.shape, n]`` tile (one vector load a row
    where the alignment allows): what reads a row's scale and bias at once."""
    lo, hi = first // word_bytes, (first + nbytes - 1) // word_bytes
    if lo == hi:
        return {lo: masked_load(table_ref.at[rows, lo], valid, 0).astype(jnp.uint32)}
    k = jnp.arange(next_power_of_2(hi - lo + 1), dtype=jnp.int32)
    lead = tuple(range(valid.ndim))
    tile = masked_load(
        table_ref.at[jnp.expand_dims(rows, -1), jnp.expand_dims(lo + k, lead)],
        jnp.expand_dims(valid, -1) & jnp.expand_dims(k <= hi - lo, lead),
        0,
    ).astype(jnp.uint32)
    return {
        lo + i: jnp.sum(jnp.where(k == i, tile, np.uint32(0)), axis=-1, dtype=jnp.uint32)
        for i in range(hi - lo + 1)
    }


def _assemble(elements: dict, first: int, nbytes: int, word_bytes: int):
    """The ``nbytes`` little-endian bytes at byte ``first``, as uint32, from the loaded
    table elements that hold them (``{index: uint32 values}``)."""
    out = None
    for word in range(first // word_bytes, (first + nbytes - 1) // word_bytes + 1):
        lo = max(first, word * word_bytes)  # the field's bytes in this element
        hi = min(first + nbytes, (word + 1) * word_bytes)
        part = elements[word]
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


@dataclass(frozen=True)
class QuantizedRows:
    """The decoder of FBGEMM's fused row-wise quantized rows: ``scale * q + bias``.

    Reads a table of uint8, uint16 or uint32 elements (:func:`kernel_table`). A word of
    ``word_bytes`` holds ``8 * word_bytes / bits`` values; value ``k`` of word ``w`` is
    column ``w * planes + k``, so the kernel keeps one accumulator plane per ``k``. A row's
    scale and bias come from one load of the elements they span (``one_scale_bias_read``;
    two 4-byte words of an INT8 row, one word of an INT4 row), else from one load each.

    >>> QuantizedRows(dim=128, weight_type="int8").layout(4)    # 32 words of 4 values
    (4, 32)
    >>> QuantizedRows(dim=128, weight_type="int4").layout(4)    # 16 words of 8 values
    (8, 16)
    """

    dim: int
    weight_type: str
    one_scale_bias_read: bool = True

    @property
    def name(self) -> str:
        return f"jaxrec_{self.weight_type}_pooled_lookup"

    def width(self, word_bytes: int) -> int:
        """Elements of ``word_bytes`` in a stored row."""
        return -(-row_bytes(self.dim, self.weight_type) // word_bytes)

    def check_table(self, table):
        word_bytes = jnp.dtype(table.dtype).itemsize
        if table.ndim != 2 or jnp.dtype(table.dtype) != _WORD_DTYPES.get(word_bytes):
            raise ValueError(
                f"qweights must be 2-D uint8 [rows, row_bytes] (or uint16/uint32 words, see "
                f"kernel_table), got {table.shape} {table.dtype}"
            )
        if table.shape[1] != self.width(word_bytes):
            raise ValueError(
                f"qweights rows of a {self.weight_type} table of dim {self.dim} have "
                f"{row_bytes(self.dim, self.weight_type)} bytes ({self.width(word_bytes)} "
                f"{table.dtype} elements), got {table.shape[1]}"
            )
        return jax.ShapeDtypeStruct((table.shape[0], self.dim), jnp.float32)

    def layout(self, word_bytes):
        planes = 8 * word_bytes // BITS[self.weight_type]
        return planes, next_power_of_2(-(-self.dim // planes))

    def decode(self, table_ref, rows, valid, eviction_policy):
        word_bytes = jnp.dtype(table_ref.dtype).itemsize
        bits = BITS[self.weight_type]
        planes, lanes = self.layout(word_bytes)
        words = jnp.arange(lanes, dtype=jnp.int32)
        lead = tuple(range(valid.ndim))
        mask = jnp.expand_dims(valid, -1)
        if (lanes - 1) * planes >= self.dim:  # some lanes hold no column: not read
            mask = mask & jnp.expand_dims(words * planes < self.dim, lead)
        packed = masked_load(
            table_ref.at[jnp.expand_dims(rows, -1), jnp.expand_dims(words, lead)],
            mask,
            0,
            eviction_policy=eviction_policy,
        ).astype(jnp.uint32)
        sb_first = packed_dim(self.dim, self.weight_type)
        sb_bytes = 4 if bits == 8 else 2
        if self.one_scale_bias_read:
            elements = _load_elements(table_ref, rows, sb_first, 2 * sb_bytes, valid, word_bytes)
            fields = (
                _assemble(elements, f, sb_bytes, word_bytes)
                for f in (sb_first, sb_first + sb_bytes)
            )
        else:
            fields = (
                _load_field(table_ref, rows, f, sb_bytes, valid, word_bytes)
                for f in (sb_first, sb_first + sb_bytes)
            )
        scale, bias = (_field_as_float(bits_, sb_bytes)[..., None] for bits_ in fields)
        out = []
        for k in range(planes):
            q = packed if planes == 1 else packed >> np.uint32(k * bits)
            if bits < 8 * word_bytes:
                q = q & np.uint32((1 << bits) - 1)
            # A row that is not read has zero values, scale and bias (its loads read
            # nothing): exactly 0 * 0 + 0, with no select. Lanes past dim decode to the
            # row's bias and are never stored.
            out.append(q.astype(jnp.float32) * scale + bias)
        return tuple(out)

    def gather(self, table, rows):
        qrows = jnp.take(table, rows, axis=0, mode="clip")  # "none": the clamped row
        if qrows.dtype != jnp.uint8:
            qrows = jax.lax.bitcast_convert_type(qrows, jnp.uint8).reshape(qrows.shape[0], -1)
        qrows = qrows[:, : row_bytes(self.dim, self.weight_type)]
        scale, bias = row_scale_bias(qrows, self.weight_type)
        values = unpack_values(
            qrows[:, : packed_dim(self.dim, self.weight_type)], self.weight_type, self.dim
        )
        return values * scale[:, None] + bias[:, None]


def _decoder(dim, weight_type, one_scale_bias_read: bool | None = None) -> QuantizedRows:
    if weight_type not in BITS:
        raise ValueError(f"weight_type must be one of {tuple(BITS)}, got {weight_type!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if one_scale_bias_read is None:
        one_scale_bias_read = DEFAULT_LAUNCH[weight_type].one_scale_bias_read
    return QuantizedRows(dim=dim, weight_type=weight_type, one_scale_bias_read=one_scale_bias_read)


def quantized_pooled_lookup(
    qweights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    dim: int,
    weight_type: str,
    interpret: bool = False,
    config: PooledConfig | None = None,
    word_bytes: int | None = None,
    one_scale_bias_read: bool | None = None,
    **options: Unpack[PooledOptions],
) -> tuple[jax.Array, jax.Array]:
    """Pooled lookup of one quantized stacked group with the Pallas (Triton) kernel.

    ``qweights [R, row_bytes(dim, weight_type)] uint8``, or the same rows as uint16/uint32
    words (:func:`kernel_table`, read as they are); ``options`` (``batch_size``,
    ``num_columns``, ``pooling``, ``bounds_check``, ``out``, ``out_dtype``,
    ``fill_uncovered``) as :func:`jaxrec_kernels.pooled_lookup` (``out_dtype`` defaults to
    float32). Returns ``(out [batch_size, num_columns], bad_id_count)``. ``config`` defaults
    to :func:`default_quantized_config`. ``word_bytes`` (1, 2 or 4) is the element the
    kernel reads a uint8 table in (default :func:`kernel_word_bytes` of
    :data:`DEFAULT_LAUNCH`'s; a view whose offsets the lowering cannot address is
    refused), ``one_scale_bias_read`` how it reads a row's scale and bias (default
    :data:`DEFAULT_LAUNCH`'s); every choice gives the same result.

    >>> import jax.numpy as jnp
    >>> from jaxrec_kernels.rowwise_quantization import quantize_rows
    >>> q = quantize_rows(jnp.array([[0.0, 15.0], [1.0, 1.0]]), "int4")  # scale 1 and 0
    >>> out, bad = quantized_pooled_lookup(q, jnp.array([0, 1, 1], jnp.int32),
    ...     jnp.array([0, 1, 3], jnp.int32), None, ((0, 0, 2, 0),), dim=2, weight_type="int4",
    ...     batch_size=2, num_columns=2, interpret=True)
    >>> out.tolist(), int(bad)
    ([[0.0, 15.0], [2.0, 2.0]], 0)
    """
    decoder = _decoder(dim, weight_type, one_scale_bias_read)
    decoder.check_table(qweights)
    if word_bytes is not None and word_bytes not in _WORD_DTYPES:
        raise ValueError(f"word_bytes must be 1, 2 or 4, got {word_bytes!r}")
    if qweights.dtype == jnp.uint8:
        if word_bytes is None:
            word_bytes = kernel_word_bytes(*qweights.shape, DEFAULT_LAUNCH[weight_type].word_bytes)
        elif not _offsets_fit(*qweights.shape, word_bytes):
            raise ValueError(
                f"word_bytes={word_bytes}: a {qweights.shape} uint8 table read in "
                f"{word_bytes}-byte elements has offsets past 2**31 in at most 2**32 bytes, "
                f"which the lowering's 32-bit offsets cannot address; use "
                f"kernel_word_bytes{qweights.shape}"
            )
        qweights = kernel_table(qweights, word_bytes)
    if config is None:
        config = default_quantized_config(dim, weight_type)
    return decoded_pooled_lookup(
        qweights,
        ids,
        offsets,
        per_sample_weights,
        features,
        decoder=decoder,
        config=config,
        interpret=interpret,
        **options,
    )


def quantized_pooled_lookup_reference(
    qweights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[FeatureLayout, ...],
    *,
    dim: int,
    weight_type: str,
    **options: Unpack[PooledOptions],
) -> tuple[jax.Array, jax.Array]:
    """Pure-XLA quantized pooled lookup (gather the bytes, dequantize, ``segment_sum``).

    Same contract as :func:`quantized_pooled_lookup` (but ``interpret``, ``config`` and
    ``word_bytes``); only the rows the ids read are dequantized. The backend for CPU/TPU
    and the oracle of the kernel's tests. ``fill_uncovered`` only keeps the signatures
    alike (uncovered columns are zeros).
    """
    decoder = _decoder(dim, weight_type)
    return decoded_pooled_lookup_reference(
        qweights, ids, offsets, per_sample_weights, features, decoder=decoder, **options
    )
