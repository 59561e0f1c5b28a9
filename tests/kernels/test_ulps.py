"""Ulp distances of 16-bit floats, and the rounded-once assertion that the 16-bit lookup
tests use: it accepts a float32 sum rounded once and refuses a sum accumulated in 16 bits."""

import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.ulps import rounded_once_ulps, ulp_distance
from ulp_assertions import assert_rounded_once

DTYPES = [np.float16, jnp.bfloat16]


def long_bags(dtype, seed, num_bags=64, dim=32, min_len=40, max_len=80):
    """Rows [n, dim] of ``dtype``, the bag of each row, and the exact float64 bag sums."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, num_bags)
    rows = rng.normal(size=(int(lengths.sum()), dim)).astype(dtype)
    bag = np.repeat(np.arange(num_bags), lengths)
    exact = np.zeros((num_bags, dim))
    np.add.at(exact, bag, rows.astype(np.float64))
    return rows, bag, exact


def accumulate(rows, bag, num_bags, acc_dtype, out_dtype):
    """Row by row into an accumulator of ``acc_dtype`` (each add rounded to it)."""
    acc = np.zeros((num_bags, rows.shape[1]), acc_dtype)
    for r, b in zip(rows, bag, strict=True):
        acc[b] = (acc[b].astype(np.float32) + r.astype(np.float32)).astype(acc_dtype)
    return acc.astype(out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_sum_rounded_once_passes(dtype):
    rows, bag, exact = long_bags(dtype, seed=1)
    assert_rounded_once(accumulate(rows, bag, 64, np.float32, dtype), exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_accumulated_in_16_bits_fails_on_bags_of_40_or_more(dtype):
    rows, bag, exact = long_bags(dtype, seed=2)
    wrong = accumulate(rows, bag, 64, dtype, dtype)
    with pytest.raises(AssertionError, match="ulp"):
        assert_rounded_once(wrong, exact, dtype)
    assert np.mean(rounded_once_ulps(wrong, exact, dtype) > 1) > 0.2


def test_ulp_distance_counts_representable_values_across_zero():
    x = np.array([1.0, 1.0, -0.0, np.finfo(np.float16).smallest_subnormal], np.float16)
    y = np.array([np.nextafter(np.float16(1), np.float16(2)), 0.5, 0.0, -x[3]], np.float16)
    np.testing.assert_array_equal(ulp_distance(x, y), [1, 1024, 0, 2])
    np.testing.assert_array_equal(
        ulp_distance(np.float16([np.nan, np.inf]), np.float16([1, 1])), [np.inf, np.inf]
    )


def test_ulp_distance_refuses_mixed_or_non_float_dtypes():
    with pytest.raises(ValueError, match="float16 and float32"):
        ulp_distance(np.float16([1]), np.float32([1]))
    with pytest.raises(ValueError, match="int32"):
        ulp_distance(np.int32([1]), np.int32([1]))


def test_rounded_once_ulps_ignores_float32_error_of_sums_that_cancel_to_nearly_zero():
    exact = np.array([40.0, 3e-6])  # the second: a float32 sum of large terms that cancelled
    actual = np.array([40.0, 0.0], np.float16)
    assert rounded_once_ulps(actual, exact, np.float16).tolist() == [0, 0]
    assert rounded_once_ulps(actual, exact, np.float16, floor=0.0).tolist()[1] > 1
