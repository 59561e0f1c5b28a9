"""Stochastic rounding: neighbours only, unbiased, deterministic, special values."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jaxrec_kernels.stochastic_rounding import random_bits, seed_for_step, stochastic_round

DTYPES = {"bfloat16": (jnp.bfloat16, ml_dtypes.bfloat16), "float16": (jnp.float16, np.float16)}
NUM_SEEDS = 2048
_round = jax.jit(stochastic_round, static_argnums=1)


def _neighbours(x: np.ndarray, np_dtype) -> tuple[np.ndarray, np.ndarray]:
    """The representable values just below and above each float32 ``x`` (NumPy's own casts)."""
    nearest = x.astype(np_dtype)
    back = nearest.astype(np.float64)
    x64 = x.astype(np.float64)
    inf = np.array(np.inf, np_dtype)
    up = np.nextafter(nearest, inf).astype(np.float64)
    down = np.nextafter(nearest, -inf).astype(np.float64)
    low = np.where(back <= x64, back, down)
    high = np.where(back >= x64, back, up)
    return low, high


def _samples(x: jax.Array, dtype, num_seeds: int = NUM_SEEDS) -> np.ndarray:
    """``[num_seeds, *x.shape]`` roundings of ``x``, one per seed, as float64."""
    row_ids = jnp.arange(x.shape[0], dtype=jnp.int32)
    seeds = jnp.arange(num_seeds, dtype=jnp.uint32)
    rounded = jax.jit(jax.vmap(lambda s: stochastic_round(x, dtype, s, row_ids)))(seeds)
    return np.asarray(rounded.astype(jnp.float32), np.float64)


def _values(name: str, rng: np.random.Generator) -> np.ndarray:
    """Rows [4, 64] over many binades, including float16's subnormal range."""
    magnitude = {"bfloat16": (-30, 30), "float16": (-26, 15)}[name]
    exponents = rng.uniform(*magnitude, size=(4, 64))
    signs = rng.choice([-1.0, 1.0], size=(4, 64))
    return (signs * 2.0**exponents).astype(np.float32)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_result_is_always_one_of_the_two_neighbours(name):
    dtype, np_dtype = DTYPES[name]
    x = _values(name, np.random.default_rng(0))
    got = _samples(jnp.asarray(x), dtype, 256)
    low, high = _neighbours(x, np_dtype)
    assert np.all((got == low) | (got == high))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_mean_over_seeds_is_unbiased(name):
    dtype, np_dtype = DTYPES[name]
    x = _values(name, np.random.default_rng(1))
    got = _samples(jnp.asarray(x), dtype)
    low, high = _neighbours(x, np_dtype)
    gap = high - low
    p = np.divide(x - low, gap, out=np.zeros_like(gap), where=gap > 0)
    # Bernoulli(p) scaled by the gap: standard error of the mean over the seeds.
    stderr = gap * np.sqrt(p * (1 - p) / NUM_SEEDS)
    error = np.abs(got.mean(axis=0) - x.astype(np.float64))
    assert np.all(error <= 5 * stderr + 1e-12 * np.abs(x)), np.max(error / (stderr + 1e-300))
    # and round-to-nearest would not be: the values sit strictly between neighbours
    assert np.mean(gap > 0) > 0.99


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_probability_of_rounding_up_is_the_fraction_of_the_gap(name):
    dtype, np_dtype = DTYPES[name]
    one = np.float32(1.0)
    step = float(np.nextafter(np.array(1.0, np_dtype), np.array(2.0, np_dtype))) - 1.0
    fractions = np.array([0.0, 0.125, 0.25, 0.5, 0.75, 0.9375], np.float32)
    x = np.tile(one + fractions * np.float32(step), (8, 1)).astype(np.float32)
    got = _samples(jnp.asarray(x), dtype)
    frequency = (got > 1.0).mean(axis=(0, 1))
    np.testing.assert_allclose(frequency, fractions, atol=5 * np.sqrt(0.25 / got[..., 0].size))
    assert frequency[0] == 0.0


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_representable_values_come_back_unchanged(name):
    dtype, np_dtype = DTYPES[name]
    x = _values(name, np.random.default_rng(2)).astype(np_dtype).astype(np.float32)
    got = _samples(jnp.asarray(x), dtype, 16)
    np.testing.assert_array_equal(got, np.broadcast_to(x.astype(np.float64), got.shape))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_same_inputs_give_same_bits_and_seeds_rows_columns_differ(name):
    dtype, _ = DTYPES[name]
    x = jnp.asarray(_values(name, np.random.default_rng(3)))
    rows = jnp.arange(4)
    first = stochastic_round(x, dtype, 11, rows)
    chex.assert_trees_all_equal(first, stochastic_round(x, dtype, 11, rows))
    chex.assert_trees_all_equal(
        first, jax.jit(stochastic_round, static_argnums=1)(x, dtype, 11, rows)
    )
    assert not np.array_equal(np.asarray(first), np.asarray(stochastic_round(x, dtype, 12, rows)))
    bits = np.asarray(random_bits(11, rows, 64))
    assert len(np.unique(bits)) == bits.size  # no repeats over rows and columns


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("padded", [64, 128])
def test_zero_padded_lanes_do_not_change_the_real_lanes(name, padded):
    dtype, _ = DTYPES[name]
    x = _values(name, np.random.default_rng(4))[:, :50]
    rows = jnp.array([3, 70000, 5, 12])
    narrow = _round(jnp.asarray(x), dtype, 5, rows)
    wide = _round(jnp.asarray(np.pad(x, [(0, 0), (0, padded - 50)])), dtype, 5, rows)
    chex.assert_trees_all_equal(wide[:, :50], narrow)
    for r in range(4):  # one row at a time, as a kernel with a row per program sees it
        chex.assert_trees_all_equal(_round(x[r], dtype, 5, rows[r]), narrow[r])


def test_float32_passes_through_and_16_bit_inputs_are_accepted():
    x = jnp.asarray(_values("bfloat16", np.random.default_rng(5)))
    chex.assert_trees_all_equal(stochastic_round(x, jnp.float32, 0, jnp.arange(4)), x)
    as_bf16 = x.astype(jnp.bfloat16)
    out = stochastic_round(as_bf16, jnp.bfloat16, 0, jnp.arange(4))
    chex.assert_trees_all_equal(out, as_bf16)


def test_float16_special_values_and_overflow():
    big = np.float32(65504.0)
    x = np.array(
        [np.nan, np.inf, -np.inf, -0.0, 0.0, big, big + 16, -(big + 16), 70000.0, 1e30, 2.0**-25],
        np.float32,
    )
    got = _samples(jnp.asarray(np.tile(x, (2, 1))), jnp.float16, 512)
    assert np.all(np.isnan(got[..., 0]))
    assert np.all(got[..., 1] == np.inf) and np.all(got[..., 2] == -np.inf)
    assert np.all(np.signbit(got[..., 3])) and not np.any(np.signbit(got[..., 4]))
    assert np.all(got[..., 5] == 65504.0)
    # halfway between the largest finite value and the next grid point (inf)
    assert set(np.unique(got[..., 6])) == {65504.0, np.inf}
    assert set(np.unique(got[..., 7])) == {-65504.0, -np.inf}
    assert np.all(got[..., 8] == np.inf) and np.all(got[..., 9] == np.inf)
    # half the smallest subnormal rounds to 0 or to it, about evenly
    assert set(np.unique(got[..., 10])) == {0.0, 2.0**-24}
    assert 0.4 < np.mean(got[..., 10] > 0) < 0.6


def test_bfloat16_special_values_and_overflow():
    big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    f32_max = np.finfo(np.float32).max
    tiny = np.float32(1e-40)  # a float32 subnormal: bfloat16 keeps float32's exponent range
    x = np.array([np.nan, np.inf, -np.inf, -0.0, big, f32_max, tiny], np.float32)
    got = _samples(jnp.asarray(np.tile(x, (2, 1))), jnp.bfloat16, 512)
    assert np.all(np.isnan(got[..., 0]))
    assert np.all(got[..., 1] == np.inf) and np.all(got[..., 2] == -np.inf)
    assert np.all(np.signbit(got[..., 3]))
    assert np.all(got[..., 4] == big)
    assert set(np.unique(got[..., 5])) <= {big, np.inf}
    low, high = _neighbours(x[6:], ml_dtypes.bfloat16)
    assert set(np.unique(got[..., 6])) == {low[0], high[0]}


def test_bad_arguments_raise_naming_them():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="dtype=int8"):
        stochastic_round(x, jnp.int8, 0, jnp.arange(2))
    with pytest.raises(ValueError, match="row_ids has shape"):
        stochastic_round(x, jnp.bfloat16, 0, jnp.arange(3))
    with pytest.raises(ValueError, match="x has dtype int32"):
        stochastic_round(jnp.ones((2, 3), jnp.int32), jnp.float16, 0, jnp.arange(2))
    with pytest.raises(ValueError, match="x has shape"):
        stochastic_round(jnp.float32(1.0), jnp.float16, 0, 0)


def test_seed_for_step_is_deterministic_and_distinct_per_step():
    steps = np.arange(1, 4097)
    seeds = np.asarray(jax.vmap(seed_for_step)(jnp.asarray(steps, jnp.float32)))
    assert seeds.dtype == np.uint32
    assert len(np.unique(seeds)) == steps.size
    np.testing.assert_array_equal(seeds, np.asarray(jax.vmap(seed_for_step)(jnp.asarray(steps))))
    assert int(seed_for_step(7)) == int(jax.jit(seed_for_step)(jnp.float32(7.0)))


def test_random_bits_are_balanced_in_every_bit_position():
    bits = np.asarray(random_bits(seed_for_step(1), jnp.arange(256), 128)).ravel()
    per_position = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
    stderr = np.sqrt(0.25 / bits.size)
    assert np.all(np.abs(per_position - 0.5) < 6 * stderr), per_position
    neighbours = np.corrcoef(bits[:-1].astype(np.float64), bits[1:].astype(np.float64))[0, 1]
    assert abs(neighbours) < 0.02
