"""Stochastic rounding of float32 rows to bfloat16 / float16.

FBGEMM stores 16-bit embedding rows back after a fused optimizer step with
stochastic rounding: a value lying a fraction ``p`` of the way from its lower
neighbour ``lo`` to its upper neighbour ``hi`` (the two representable values
around it) becomes ``hi`` with probability ``p`` and ``lo`` otherwise, so that
``E[result] = x`` and small updates are not lost to round-to-nearest.

The random bits come from a counter-based integer hash of
``(seed, row id, column index)`` built from uint32 multiply / xor / shift only:
the same inputs always give the same bits, nothing is stateful, and the very
same code runs in XLA and inside a Pallas Triton kernel body (where the column
index is the lane index of the block, so zero-padded lanes beyond the real row
width do not change the bits of the real lanes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["random_bits", "seed_for_step", "stochastic_round"]

# The finaliser of MurmurHash3 (a bijection of uint32 with full avalanche) and
# the 32-bit golden ratio, used to spread consecutive counters.
_MIX1 = 0x85EBCA6B
_MIX2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_SEED_SALT = 0x5BD1E995

_SUPPORTED = {
    np.dtype(jnp.float32): "float32",
    np.dtype(jnp.bfloat16): "bfloat16",
    np.dtype(jnp.float16): "float16",
}

# float16: 10 stored mantissa bits; its smallest normal exponent is -14, i.e.
# a biased float32 exponent of 113. Below it the grid is uniform (2**-24).
_F16_MANTISSA_BITS = 10
_F16_MIN_NORMAL_BIASED_EXP = 113


def _u32(value: int) -> jax.Array:
    return jnp.asarray(value, dtype=jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * _u32(_MIX1)
    h = h ^ (h >> 13)
    h = h * _u32(_MIX2)
    return h ^ (h >> 16)


def _to_u32(x: jax.Array | int) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.uint32:
        return x
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.int32)
    return x.astype(jnp.uint32)


def seed_for_step(step: jax.Array | int | float) -> jax.Array:
    """A uint32 rounding seed for fused step ``step`` (hash of the step count).

    ``step`` may be a Python number or a traced float32 / int32 scalar (the
    ``step`` of a fused table); consecutive steps give unrelated seeds.

    >>> import jax.numpy as jnp
    >>> s = seed_for_step(3)
    >>> s.dtype, s.shape
    (dtype('uint32'), ())
    >>> bool(s == seed_for_step(jnp.float32(3.0))), bool(s == seed_for_step(4))
    (True, False)
    """
    return _fmix32(_to_u32(step) * _u32(_GOLDEN) + _u32(_SEED_SALT))


def random_bits(seed: jax.Array | int, row_ids: jax.Array | int, num_cols: int) -> jax.Array:
    """uint32 bits ``hash(seed, row_ids[...], col)`` of shape ``row_ids.shape + (num_cols,)``.

    ``h = fmix32(fmix32(fmix32(seed) ^ row) ^ col * 0x9E3779B9)``, where fmix32
    is MurmurHash3's finaliser: elementwise uint32 arithmetic only.

    >>> import jax.numpy as jnp
    >>> b = random_bits(7, jnp.arange(2), 3)
    >>> b.shape, b.dtype
    ((2, 3), dtype('uint32'))
    >>> bool((b == random_bits(7, jnp.arange(2), 3)).all())
    True
    """
    key = _fmix32(_to_u32(seed))
    rows = _to_u32(row_ids)[..., None]
    cols = jax.lax.broadcasted_iota(jnp.uint32, (num_cols,), 0)
    return _fmix32(_fmix32(key ^ rows) ^ (cols * _u32(_GOLDEN)))


def _round_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    # bfloat16 is the top half of a float32: adding 16 random bits to the
    # bottom half and truncating carries into the kept half with probability
    # (dropped bits) / 2**16, which is the fraction of the gap (the float
    # encoding is linear within a binade and monotone across binades).
    ints = jax.lax.bitcast_convert_type(x, jnp.uint32)
    ints = (ints + (bits & _u32(0xFFFF))) & _u32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(ints, jnp.float32)
    return jnp.where(x != x, x, out)  # a NaN's payload could carry into the sign


def _round_float16(x: jax.Array, bits: jax.Array) -> jax.Array:
    # q = |x| / ulp16(|x|) is exact (a power-of-two scale); its integer part is
    # the lower neighbour on the float16 grid and its fraction the probability
    # of rounding up, compared with 24 random bits.
    ints = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = ints & _u32(0x80000000)
    biased_exp = (ints >> 23) & _u32(0xFF)
    grid_exp = jnp.maximum(biased_exp, _u32(_F16_MIN_NORMAL_BIASED_EXP))
    # ulp = 2**(grid_exp - 127 - 10); both it and 1/ulp are normal float32.
    ulp = jax.lax.bitcast_convert_type((grid_exp - _u32(_F16_MANTISSA_BITS)) << 23, jnp.float32)
    inv_ulp = jax.lax.bitcast_convert_type(
        (_u32(2 * 127 + _F16_MANTISSA_BITS) - grid_exp) << 23, jnp.float32
    )
    magnitude = jnp.abs(x)
    finite = magnitude < jnp.inf
    q = jnp.where(finite, magnitude * inv_ulp, 0.0)  # < 2**11
    low = q.astype(jnp.int32).astype(jnp.float32)
    uniform = jax.lax.bitcast_convert_type(bits >> 8, jnp.int32).astype(jnp.float32)
    up = uniform * (1.0 / (1 << 24)) < q - low
    rounded = (low + up.astype(jnp.float32)) * ulp
    signed = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(rounded, jnp.uint32) | sign, jnp.float32
    )
    return jnp.where(finite, signed, x)


def stochastic_round(
    x: jax.Array,
    dtype: jnp.dtype | type,
    seed: jax.Array | int,
    row_ids: jax.Array | int,
) -> jax.Array:
    """Round ``x`` (rows ``[..., D]``) to ``dtype`` stochastically and without bias.

    Each element becomes its upper neighbour ``hi`` in ``dtype`` with
    probability ``(x - lo) / (hi - lo)`` and its lower neighbour ``lo``
    otherwise, so ``E[result] = x``; representable values come back unchanged.
    The bits are ``random_bits(seed, row_ids, D)``: ``row_ids`` has shape
    ``x.shape[:-1]`` (a scalar for a single row) and should be the rows'
    global ids, so that every row of a table draws its own bits.

    ``x`` is first converted to float32. ``dtype`` float32 passes ``x`` through.
    Special values: NaN stays NaN, ±inf stays ±inf, the sign of zero is kept.
    Beyond the largest finite value the next grid point is taken to be inf:
    bfloat16 values above its largest finite round to it or to inf with the
    same rule, and float16 values between 65504 and 65536 round to 65504 or
    inf (larger ones to inf, as round-to-nearest does). Exact to the last bit
    for bfloat16 and for normal float16; within float16's subnormal range the
    probability of rounding up is quantised to 2**-24.

    >>> import jax.numpy as jnp
    >>> x = jnp.full((2, 3), 1.0 + 2.0**-9, jnp.float32)   # between two bf16 values
    >>> y = stochastic_round(x, jnp.bfloat16, seed=1, row_ids=jnp.arange(2))
    >>> y.dtype, sorted(set(y.astype(jnp.float32).ravel().tolist())) <= [1.0, 1.0078125]
    (dtype(bfloat16), True)
    """
    try:
        target = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"stochastic_round: dtype={dtype!r} is not a dtype") from err
    if target not in _SUPPORTED:
        raise ValueError(
            f"stochastic_round: dtype={target} is not supported; "
            "use one of bfloat16, float16, float32"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"stochastic_round: x has dtype {x.dtype}; expected a floating dtype")
    if x.ndim < 1:
        raise ValueError(f"stochastic_round: x has shape {x.shape}; expected rows [..., D]")
    x = x.astype(jnp.float32)
    if target == np.dtype(jnp.float32):
        return x
    row_shape = jnp.shape(row_ids)
    if row_shape not in ((), x.shape[:-1]):
        raise ValueError(
            f"stochastic_round: row_ids has shape {row_shape}; expected {x.shape[:-1]} "
            f"(one id per row of x with shape {x.shape}) or a scalar"
        )
    bits = random_bits(seed, row_ids, x.shape[-1])
    if target == np.dtype(jnp.bfloat16):
        return _round_bfloat16(x, bits).astype(jnp.bfloat16)
    return _round_float16(x, bits).astype(jnp.float16)
