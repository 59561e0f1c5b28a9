"""Vectorized batch building, static shapes for partial batches, background prefetch."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data import make_batch, prefetch, ragged_gather
from jaxrec.sparse import KeyedJaggedTensor


def test_ragged_gather_matches_a_loop_over_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, 50)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 1000, offsets[-1])
    rows = rng.integers(0, 50, 200)
    got_lengths, got_values = ragged_gather(offsets, values, rows)
    expected = [values[offsets[r] : offsets[r + 1]] for r in rows]
    np.testing.assert_array_equal(got_lengths, [len(e) for e in expected])
    np.testing.assert_array_equal(got_values, np.concatenate(expected))


def test_ragged_gather_of_only_empty_bags():
    lengths, values = ragged_gather(np.array([0, 0, 0]), np.zeros(0, np.int64), np.array([1, 0]))
    assert lengths.tolist() == [0, 0] and values.shape == (0,)


def test_make_batch_equals_the_exact_kjt_and_pads_rows_and_capacity():
    lengths = [np.array([1, 2, 0]), np.array([1, 1, 1])]
    values = [np.array([4, 5, 6]), np.array([7, 8, 9])]
    batch = make_batch(
        ["a", "b"], lengths, values, np.ones((3, 2)), np.array([1.0, 0.0, 1.0]), batch_size=5
    )
    exact = KeyedJaggedTensor(
        ["a", "b"],
        np.array([4, 5, 6, 7, 8, 9]),
        lengths=np.array([1, 2, 0, 0, 0, 1, 1, 1, 0, 0]),
    )
    assert batch.sparse.keys() == exact.keys() and batch.sparse.stride() == 5
    np.testing.assert_array_equal(batch.sparse.lengths(), exact.lengths())
    assert batch.sparse.capacity() == 128
    np.testing.assert_array_equal(batch.sparse.values()[:6], exact.values())
    np.testing.assert_array_equal(batch.dense[3:], 0.0)
    np.testing.assert_array_equal(batch.labels, [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch.weights, [1, 1, 1, 0, 0])


def test_make_batch_to_device_gives_jax_arrays():
    batch = make_batch(
        ["a"],
        [np.array([1])],
        [np.array([3])],
        np.ones((1, 1)),
        np.ones(1),
        batch_size=2,
        to_device=True,
    )
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(batch))


def test_a_partial_batch_does_not_recompile_the_step():
    traces = []

    @jax.jit
    def step(batch):
        traces.append(1)
        return jnp.sum(batch.labels * batch.weights) + jnp.sum(batch.sparse.lengths())

    for n in (8, 8, 3):
        ids = np.arange(n)
        step(
            make_batch(
                ["a"], [np.ones(n, np.int32)], [ids], np.ones((n, 1)), np.ones(n), batch_size=8
            )
        )
    assert len(traces) == 1


def test_make_batch_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="do not fit a batch"):
        make_batch(["a"], [np.ones(3)], [np.arange(3)], np.ones((3, 1)), np.ones(3), batch_size=2)
    with pytest.raises(ValueError, match="key 'a'"):
        make_batch(["a"], [np.ones(2)], [np.arange(3)], np.ones((2, 1)), np.ones(2), batch_size=2)
    with pytest.raises(ValueError, match="one lengths and one values"):
        make_batch(
            ["a", "b"], [np.ones(2)], [np.arange(2)], np.ones((2, 1)), np.ones(2), batch_size=2
        )


def test_prefetch_overlaps_the_source_with_the_consumer():
    def slow_source():
        for i in range(6):
            time.sleep(0.05)
            yield i

    start = time.perf_counter()
    got = []
    for item in prefetch(slow_source(), size=2):
        time.sleep(0.05)  # the "step"
        got.append(item)
    elapsed = time.perf_counter() - start
    assert got == list(range(6))
    assert elapsed < 0.5  # serial would take 0.6 s; overlapped about 0.35 s


def test_prefetch_reraises_the_source_error():
    def failing():
        yield 1
        raise ValueError("bad line 7")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad line 7"):
        next(it)


def test_prefetch_close_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    with prefetch(endless(), size=1) as it:
        assert next(it) == 0
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(ValueError, match="size must be >= 1"):
        prefetch([], size=0)
