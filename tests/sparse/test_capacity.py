"""Capacity buckets and pad_to_capacity: few, aligned buckets; padding keeps the real content."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sparse import KeyedJaggedTensor, capacity_bucket, pad_to_capacity


@pytest.mark.parametrize(("minimum", "growth"), [(128, 1.25), (1000, 1.5), (1, 2.0)])
def test_bucket_is_the_smallest_aligned_ladder_step_at_or_above_n(minimum, growth):
    ns = np.unique(np.concatenate([np.arange(0, 3000), np.geomspace(1, 5e6, 400).astype(int)]))
    buckets = np.array([capacity_bucket(int(n), minimum=minimum, growth=growth) for n in ns])
    assert np.all(buckets >= ns) and np.all(buckets % 128 == 0)
    assert np.all(buckets >= minimum) and np.all(np.diff(buckets) >= 0)
    ladder = np.unique(buckets)
    for b in ladder:  # every bucket is its own bucket, and the step below it is not enough
        assert capacity_bucket(int(b), minimum=minimum, growth=growth) == b
        assert capacity_bucket(int(b) + 1, minimum=minimum, growth=growth) > b
    # consecutive buckets grow by at most `growth`, up to the 128 alignment
    assert np.all(ladder[1:] <= ladder[:-1] * growth + 128)


def test_default_ladder_stays_small():
    ladder = {capacity_bucket(n) for n in range(0, 1_000_001, 97)}
    assert len(ladder) <= math.ceil(math.log(1_000_000 / 128) / math.log(1.25)) + 1
    assert capacity_bucket(0) == 128


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be a non-negative int, got -1"),
        ({"n": 2.5}, "n must be a non-negative int, got 2.5"),
        ({"n": 5, "minimum": 0}, "minimum must be a positive int, got 0"),
        ({"n": 5, "growth": 1.0}, "growth must be > 1, got 1.0"),
    ],
)
def test_bad_bucket_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        capacity_bucket(**kwargs)


def _kjt(lengths, seed=0, weighted=False):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    ids = rng.integers(0, 1000, size=lengths.sum())
    weights = rng.random(lengths.sum()).astype(np.float32) if weighted else None
    return KeyedJaggedTensor(["a", "b"], ids, weights, lengths=lengths)


def test_pad_to_capacity_defaults_to_the_bucket_and_keeps_the_real_ids():
    kjt = _kjt([3, 0, 5, 2], weighted=True)
    padded = pad_to_capacity(kjt)
    assert padded.capacity() == capacity_bucket(10)
    np.testing.assert_array_equal(padded.values()[:10], kjt.values())
    np.testing.assert_array_equal(padded.values()[10:], 0)
    np.testing.assert_array_equal(padded.weights()[:10], kjt.weights())
    np.testing.assert_array_equal(padded.weights()[10:], 0)
    np.testing.assert_array_equal(padded.lengths(), kjt.lengths())
    assert padded.length_per_key() == kjt.length_per_key()


def test_pad_to_capacity_honours_an_explicit_capacity_and_fill():
    kjt = _kjt([1, 2, 0, 1])
    padded = pad_to_capacity(kjt, 6, fill_value=-7)
    np.testing.assert_array_equal(padded.values(), [*np.asarray(kjt.values()), -7, -7])
    traced = jax.jit(lambda k: pad_to_capacity(k, 9))(padded)
    np.testing.assert_array_equal(traced.values(), [*np.asarray(kjt.values()), 0, 0, 0, 0, 0])


def test_pad_to_capacity_rejects_a_capacity_below_the_number_of_ids():
    with pytest.raises(ValueError, match="capacity 5 is less than the 6 values"):
        pad_to_capacity(_kjt([1, 2, 3, 0]), 5)


def test_pad_to_capacity_needs_an_explicit_capacity_under_jit():
    with pytest.raises(ValueError, match="pass an explicit capacity"):
        jax.jit(lambda k: pad_to_capacity(k))(_kjt([1, 1, 1, 1]))


def test_batches_in_one_bucket_compile_once():
    traces = []

    @jax.jit
    def pooled_sum(kjt):
        traces.append(kjt.capacity())
        real = jnp.arange(kjt.capacity()) < kjt.num_values()
        return jnp.sum(jnp.where(real, kjt.values(), 0))

    first, second = _kjt([5, 9, 2, 7], seed=1), _kjt([40, 3, 0, 11], seed=2)
    for kjt in (first, second):
        assert int(pooled_sum(pad_to_capacity(kjt))) == int(np.sum(kjt.values()))
    assert traces == [128]
    pooled_sum(pad_to_capacity(_kjt([100, 100, 0, 0], seed=3)))
    assert traces == [128, 256]
