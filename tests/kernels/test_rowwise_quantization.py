"""Row-wise quantization: bit for bit FBGEMM's CPU operators, and within FBGEMM's error bounds."""

import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.rowwise_quantization import (
    dequantize_8bit_rowwise,
    dequantize_nbit_rowwise,
    dequantize_rows,
    float16_bits_to_float32,
    fused_multiply_add,
    quantize_8bit_rowwise,
    quantize_nbit_rowwise,
    quantize_rows,
    row_bytes,
    row_scale_bias,
)


def random_table(seed, rows, dim):
    """Rows of very different ranges, a constant row, a row of one repeated value."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dim)) * rng.uniform(1e-3, 100.0, (rows, 1))
    x += rng.uniform(-50, 50, (rows, 1))
    x[0] = 1.5
    x[1, : dim // 2] = -3.0
    return x.astype(np.float32)


@pytest.mark.parametrize("dim", [1, 33, 128])
def test_8bit_matches_fbgemm_bit_for_bit(dim):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    x = random_table(dim, 300, dim)
    want = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(torch.from_numpy(x)).numpy()
    got = np.asarray(quantize_8bit_rowwise(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    back = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(torch.from_numpy(want)).numpy()
    np.testing.assert_array_equal(np.asarray(dequantize_8bit_rowwise(jnp.asarray(want))), back)


@pytest.mark.parametrize("bit_rate", [2, 4, 8])
@pytest.mark.parametrize("dim", [8, 136])
def test_nbit_matches_fbgemm_bit_for_bit(bit_rate, dim):
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    x = random_table(dim + bit_rate, 300, dim)
    t = torch.from_numpy(x)
    want = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(t, bit_rate).numpy()
    got = np.asarray(quantize_nbit_rowwise(jnp.asarray(x), bit_rate))
    np.testing.assert_array_equal(got, want)
    back = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(torch.from_numpy(want), bit_rate)
    np.testing.assert_array_equal(
        np.asarray(dequantize_nbit_rowwise(jnp.asarray(want), bit_rate)), back.numpy()
    )


def test_fused_multiply_add_rounds_once():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, 20000).astype(np.float32)
    scale = rng.uniform(1e-4, 3.0, 20000).astype(np.float32)
    bias = (rng.normal(size=20000) * 50).astype(np.float32)
    exact = (q.astype(np.float64) * scale + bias).astype(np.float32)  # one rounding
    got = np.asarray(fused_multiply_add(jnp.asarray(q), jnp.asarray(scale), jnp.asarray(bias)))
    np.testing.assert_array_equal(got, exact)
    twice = q * scale + bias
    assert (twice != exact).any()  # the case it exists for


@pytest.mark.parametrize("weight_type", ["int8", "int4", "int2"])
@pytest.mark.parametrize("dim", [5, 64])
def test_error_within_half_a_step(weight_type, dim):
    """|x - dequantize(quantize(x))| <= scale / 2 per element (float32 rounding aside);
    int4/int2 also carry their float16 bias and scale rounding: the bottom of a row may sit
    below the rounded bias, the top above ``levels * scale`` when the scale rounded down."""
    x = random_table(7, 400, dim)
    q = quantize_rows(jnp.asarray(x), weight_type)
    assert q.shape == (400, row_bytes(dim, weight_type))
    back = np.asarray(dequantize_rows(q, weight_type, dim), np.float64)
    scale, _ = (np.asarray(v, np.float64) for v in row_scale_bias(q, weight_type))
    err = np.abs(back - x)
    bound = scale[:, None] / 2 + 4e-7 * np.abs(x).max(1, keepdims=True)
    if weight_type != "int8":
        levels = (1 << {"int4": 4, "int2": 2}[weight_type]) - 1
        half_ulp16 = 2.0**-11
        bound += levels * scale[:, None] * half_ulp16 + np.abs(x).min(1, keepdims=True) * half_ulp16
    assert (err <= bound).all(), float((err - bound).max())
    assert err[2:].max() > 0.3 * scale[2:].min()  # the bound is not vacuous


def test_constant_rows_come_back_exactly():
    x = jnp.full((3, 6), 0.25, jnp.float32)
    for weight_type in ("int8", "int4", "int2"):
        back = dequantize_rows(quantize_rows(x, weight_type), weight_type, 6)
        np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quantize_rows(jnp.zeros((2, 4)), "int3"), "weight_type must be one of"),
        (lambda: quantize_rows(jnp.zeros((4,)), "int8"), "2-D float table"),
        (lambda: quantize_nbit_rowwise(jnp.zeros((2, 4)), 3), "bit_rate must be 2, 4 or 8"),
        (lambda: dequantize_rows(jnp.zeros((2, 12), jnp.float32), "int8"), "2-D uint8"),
        (lambda: dequantize_rows(jnp.zeros((2, 12), jnp.uint8), "int8", 5), "has 13 bytes"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float16_bits_decode_as_numpy_for_every_pattern():
    # The kernels decode float16 scales and biases with integer operations; every one of
    # the 65536 patterns (subnormals, zeros, infinities, NaN payloads) must match bit for bit.
    bits = np.arange(1 << 16, dtype=np.uint32)
    got = np.asarray(float16_bits_to_float32(jnp.asarray(bits)))
    want = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
