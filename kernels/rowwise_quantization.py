"""Row-wise quantized tables in FBGEMM's fused layouts: quantize and dequantize in XLA.

Each row of a ``[R, D]`` float table becomes one ``uint8`` row that carries its own scale
and bias; a value dequantizes as ``scale * q + bias``. Two layouts, FBGEMM's:

- ``"int8"`` (``FloatToFused8BitRowwiseQuantized``): ``D`` bytes, then the scale and the
  bias as little-endian float32 (8 bytes): ``[R, D + 8]``. ``bias`` is the row's minimum,
  ``scale = (max - min) / 255`` and ``q = round((x - min) * 255 / (max - min + 1e-8))``.
- ``"int4"`` and ``"int2"`` (``FloatToFusedNBitRowwiseQuantizedSBHalf`` with bit rate 4
  or 2): ``ceil(D * bits / 8)`` bytes holding ``8 / bits`` values each, lowest bits first
  (value ``2k`` in the low nibble of byte ``k`` for int4), then the scale and the bias as
  little-endian float16 (4 bytes). The bias is the row's minimum rounded to float16, the
  scale ``(max - bias) / (2**bits - 1)`` rounded to float16 (1 when the row is constant),
  and ``q = clip(round((x - bias) / scale), 0, 2**bits - 1)``.

Rounding is to nearest even, as FBGEMM's CPU operators do, and the results are bit for bit
theirs. A value's quantization error is at most half its row's scale (plus the float32
rounding of the dequantization), except that int4/int2 clip the top of a row whose float16
scale rounded down, by at most ``2**bits - 1`` times the scale's float16 rounding error.

>>> import jax.numpy as jnp
>>> x = jnp.array([[0.0, 0.5, 1.0, 2.0]], jnp.float32)
>>> q = quantize_rows(x, "int8")
>>> q.shape, q[0, :4].tolist()
((1, 12), [0, 64, 128, 255])
>>> scale, bias = row_scale_bias(q, "int8")
>>> round(float(scale[0]) * 255, 5), float(bias[0])
(2.0, 0.0)
>>> dequantize_rows(quantize_rows(x, "int4"), "int4", 4).tolist()
[[0.0, 0.533203125, 1.06640625, 1.99951171875]]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BITS",
    "WEIGHT_TYPES",
    "dequantize_8bit_rowwise",
    "dequantize_nbit_rowwise",
    "dequantize_rows",
    "float16_bits_to_float32",
    "packed_dim",
    "quantize_8bit_rowwise",
    "quantize_nbit_rowwise",
    "quantize_rows",
    "row_bytes",
    "row_scale_bias",
    "check_weight_type",
    "fused_multiply_add",
    "unpack_values",
]

#: The quantized weight types and their bits per value.
BITS = {"int8": 8, "int4": 4, "int2": 2}
WEIGHT_TYPES = tuple(BITS)

_EPSILON = np.float32(1e-8)  # FBGEMM's kEpsilon of the 8-bit range


def check_weight_type(weight_type: str) -> int:
    """The bits per value of ``weight_type``; a ValueError for an unknown type."""
    if weight_type not in BITS:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    return BITS[weight_type]


def packed_dim(dim: int, weight_type: str) -> int:
    """Bytes of a row's values (without its scale and bias).

    >>> packed_dim(128, "int8"), packed_dim(128, "int4"), packed_dim(5, "int4")
    (128, 64, 3)
    """
    per_byte = 8 // check_weight_type(weight_type)
    return -(-dim // per_byte)


def _scale_bias_bytes(weight_type: str) -> int:
    return 8 if check_weight_type(weight_type) == 8 else 4


def row_bytes(dim: int, weight_type: str) -> int:
    """Bytes of one quantized row: its values, then its scale and bias.

    >>> row_bytes(128, "int8"), row_bytes(128, "int4"), row_bytes(128, "int2")
    (136, 68, 36)
    """
    return packed_dim(dim, weight_type) + _scale_bias_bytes(weight_type)


def _check_float_table(x: jax.Array) -> None:
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected a 2-D float table [rows, dim], got {x.shape} {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"a table to quantize needs dim >= 1, got shape {x.shape}")


def _check_quantized(q: jax.Array, weight_type: str, dim: int | None) -> int:
    """The value count of each row of ``q``; a ValueError if ``q`` is not such a table."""
    bits = check_weight_type(weight_type)
    tail = _scale_bias_bytes(weight_type)
    if q.ndim != 2 or jnp.dtype(q.dtype) != jnp.uint8 or q.shape[1] <= tail:
        raise ValueError(
            f"a {weight_type} table is 2-D uint8 with more than {tail} bytes a row, got "
            f"{q.shape} {q.dtype}"
        )
    full = (q.shape[1] - tail) * (8 // bits)
    if dim is None:
        return full
    if packed_dim(dim, weight_type) != q.shape[1] - tail:
        raise ValueError(
            f"a {weight_type} row of dim {dim} has {row_bytes(dim, weight_type)} bytes, got "
            f"{q.shape[1]}"
        )
    return dim


def _divide(x: jax.Array, constant: float) -> jax.Array:
    """``x / constant`` rounded once, as C++ divides (XLA would multiply by a constant's
    rounded reciprocal, which differs in the last bit)."""
    return x / jax.lax.optimization_barrier(jnp.full_like(x, constant))


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split_high(x: jax.Array) -> jax.Array:
    """``x`` with its 12 lowest significand bits cleared (``x - high`` is exact)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & np.uint32(0xFFFFF000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def fused_multiply_add(q: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``q * scale + bias`` rounded once (an FMA), for integers ``0 <= q < 2**12`` in float32.

    FBGEMM's CPU dequantization of 8-bit rows uses FMA instructions; XLA on the CPU rounds
    the product first. ``q * high`` and ``q * low`` are exact (at most 24 bits each), their
    sum with ``bias`` is formed exactly with TwoSum, and the last addition rounds once
    because the small part is rounded to odd first (Boldo and Melquiond, "Emulation of FMA
    and correctly rounded sums", 2008).
    """
    high = _split_high(scale)
    uh, ul = _two_sum(q * high, q * (scale - high))
    th, tl = _two_sum(bias, uh)
    v, err = _two_sum(tl, ul)
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    inexact_even = (err != 0) & ((bits & 1) == 0)
    away = (err > 0) == (v > 0)  # the exact value lies beyond v, away from zero
    odd = jax.lax.bitcast_convert_type(bits + jnp.where(away, 1, -1), jnp.float32)
    v = jnp.where(inexact_even, odd, v)
    return th + v


def float16_bits_to_float32(bits: jax.Array) -> jax.Array:
    """IEEE half-precision bit patterns (the low 16 bits of ``uint32``) as float32 values.

    Integer operations and one ``uint32 -> float32`` bitcast, so it lowers the same way in
    XLA and in a Triton kernel (no 16-bit float bitcast): normal values rebias the exponent,
    subnormals are ``mantissa * 2**-24`` (exact), infinities and NaNs keep their payload.

    >>> h = jnp.array([0x3C00, 0xC000, 0x0001, 0x7C00, 0x8000], jnp.uint32)
    >>> float16_bits_to_float32(h).tolist()
    [1.0, -2.0, 5.960464477539063e-08, inf, -0.0]
    """
    h = bits.astype(jnp.uint32) & np.uint32(0xFFFF)
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    normal = sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    special = sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))  # inf and NaN
    wide = jnp.where(exponent == np.uint32(31), special, normal)
    value = jax.lax.bitcast_convert_type(wide, jnp.float32)
    tiny = mantissa.astype(jnp.float32) * np.float32(2.0**-24)  # subnormals and zeros
    tiny = jnp.where(sign != np.uint32(0), -tiny, tiny)
    return jnp.where(exponent == np.uint32(0), tiny, value)


def _bytes_of(values: jax.Array, dtype) -> jax.Array:
    """``[R]`` values of ``dtype`` as ``[R, itemsize]`` little-endian bytes."""
    return jax.lax.bitcast_convert_type(values.astype(dtype), jnp.uint8)


def _from_bytes(raw: jax.Array, dtype) -> jax.Array:
    """``[R, itemsize]`` little-endian bytes as ``[R]`` values of ``dtype``, in float32."""
    return jax.lax.bitcast_convert_type(raw, dtype).astype(jnp.float32)


@jax.jit
def quantize_8bit_rowwise(x: jax.Array) -> jax.Array:
    """``[R, D]`` floats -> ``[R, D + 8]`` uint8, FBGEMM's ``FloatToFused8BitRowwiseQuantized``."""
    _check_float_table(x)
    x = x.astype(jnp.float32)
    low = jnp.min(x, axis=1, keepdims=True)
    span = jnp.max(x, axis=1, keepdims=True) - low
    inverse = np.float32(255.0) / (span + _EPSILON)
    q = jnp.clip(jnp.round((x - low) * inverse), 0, 255).astype(jnp.uint8)
    scale = _divide(span[:, 0], 255.0)
    return jnp.concatenate([q, _bytes_of(scale, jnp.float32), _bytes_of(low[:, 0], jnp.float32)], 1)


def dequantize_8bit_rowwise(q: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``[R, D + 8]`` uint8 -> ``[R, D]``, FBGEMM's ``Fused8BitRowwiseQuantizedToFloat``."""
    return dequantize_rows(q, "int8", None, dtype)


@functools.partial(jax.jit, static_argnames=("bit_rate",))
def quantize_nbit_rowwise(x: jax.Array, bit_rate: int) -> jax.Array:
    """``[R, D]`` floats -> ``[R, ceil(D * bit_rate / 8) + 4]`` uint8, FBGEMM's
    ``FloatToFusedNBitRowwiseQuantizedSBHalf`` (bit rate 2, 4 or 8)."""
    _check_float_table(x)
    if bit_rate not in (2, 4, 8):
        raise ValueError(f"bit_rate must be 2, 4 or 8, got {bit_rate!r}")
    x = x.astype(jnp.float32)
    levels = np.float32((1 << bit_rate) - 1)
    bias16 = jnp.min(x, axis=1).astype(jnp.float16)
    low = bias16.astype(jnp.float32)[:, None]
    span = jnp.max(x, axis=1, keepdims=True) - low
    scale = jnp.where(span == 0, np.float32(1.0), _divide(span, float(levels)))
    scale = scale.astype(jnp.float16).astype(jnp.float32)
    scale = jnp.where(scale == 0, np.float32(1.0), scale)
    inverse = np.float32(1.0) / scale
    unusable = jnp.isinf(inverse)
    scale = jnp.where(unusable, np.float32(1.0), scale)
    inverse = jnp.where(unusable, np.float32(1.0), inverse)
    q = jnp.clip(jnp.round((x - low) * inverse), 0, levels).astype(jnp.uint8)
    per_byte = 8 // bit_rate
    dim = x.shape[1]
    q = jnp.pad(q, ((0, 0), (0, -dim % per_byte))).reshape(x.shape[0], -1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * np.uint8(bit_rate)
    packed = jnp.sum(q << shifts, axis=2, dtype=jnp.uint8)
    return jnp.concatenate(
        [packed, _bytes_of(scale[:, 0], jnp.float16), _bytes_of(bias16, jnp.float16)], 1
    )


@functools.partial(jax.jit, static_argnames=("bit_rate", "dim", "dtype"))
def dequantize_nbit_rowwise(
    q: jax.Array, bit_rate: int, dim: int | None = None, dtype=jnp.float32
) -> jax.Array:
    """uint8 rows -> ``[R, dim]``, FBGEMM's ``FusedNBitRowwiseQuantizedSBHalfToFloat``.

    ``dim`` defaults to every value the packed bytes hold (FBGEMM's output width).
    """
    types = {8: "int8_sbhalf", 4: "int4", 2: "int2"}
    if bit_rate not in types:
        raise ValueError(f"bit_rate must be 2, 4 or 8, got {bit_rate!r}")
    if bit_rate == 8:  # the fp16 scale/bias layout of 8-bit rows
        if q.ndim != 2 or jnp.dtype(q.dtype) != jnp.uint8 or q.shape[1] <= 4:
            raise ValueError(f"expected 2-D uint8 rows of more than 4 bytes, got {q.shape}")
        dim = q.shape[1] - 4 if dim is None else dim
        scale = _from_bytes(q[:, -4:-2], jnp.float16)[:, None]
        bias = _from_bytes(q[:, -2:], jnp.float16)[:, None]
        return (q[:, :dim].astype(jnp.float32) * scale + bias).astype(dtype)
    return dequantize_rows(q, types[bit_rate], dim, dtype)


def row_scale_bias(q: jax.Array, weight_type: str) -> tuple[jax.Array, jax.Array]:
    """Each row's ``(scale [R], bias [R])`` as float32."""
    _check_quantized(q, weight_type, None)
    if check_weight_type(weight_type) == 8:
        return _from_bytes(q[:, -8:-4], jnp.float32), _from_bytes(q[:, -4:], jnp.float32)
    return _from_bytes(q[:, -4:-2], jnp.float16), _from_bytes(q[:, -2:], jnp.float16)


def unpack_values(packed: jax.Array, weight_type: str, dim: int) -> jax.Array:
    """``[..., packed_dim]`` bytes -> ``[..., dim]`` integer values as float32.

    Value ``c`` is bits ``[(c % n) * bits, (c % n + 1) * bits)`` of byte ``c // n``, with
    ``n = 8 // bits`` values per byte (the layout's order).
    """
    bits = check_weight_type(weight_type)
    cols = np.arange(dim)
    per_byte = 8 // bits
    raw = packed[..., cols // per_byte]
    if bits == 8:
        return raw.astype(jnp.float32)
    shifts = jnp.asarray((cols % per_byte) * bits, jnp.uint8)
    return ((raw >> shifts) & np.uint8((1 << bits) - 1)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("weight_type", "dim", "dtype"))
def dequantize_rows(
    q: jax.Array, weight_type: str, dim: int | None = None, dtype=jnp.float32
) -> jax.Array:
    """``[R, row_bytes]`` uint8 -> ``[R, dim]``: ``scale * q + bias`` in float32, then ``dtype``.

    ``dim`` defaults to every value the packed bytes hold.
    """
    dim = _check_quantized(q, weight_type, dim)
    scale, bias = row_scale_bias(q, weight_type)
    values = unpack_values(q[:, : packed_dim(dim, weight_type)], weight_type, dim)
    return fused_multiply_add(values, scale[:, None], bias[:, None]).astype(dtype)


def quantize_rows(x: jax.Array, weight_type: str) -> jax.Array:
    """``[R, D]`` floats -> FBGEMM's fused rows of ``weight_type`` (see the module docstring)."""
    bits = check_weight_type(weight_type)
    return quantize_8bit_rowwise(x) if bits == 8 else quantize_nbit_rowwise(x, bits)
