"""jaxrec.tbe.CachedTBE: host tables behind a cache train bit for bit as device tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec import tbe
from jaxrec.tbe import CacheAlgorithm, EmbeddingLocation, OptimType
from jaxrec.tbe.managed import TIMED_PARTS

CPU = tbe.ComputeDevice.CPU
DEV, CACHED = EmbeddingLocation.DEVICE, EmbeddingLocation.MANAGED_CACHING
B = 4


def _ops(optimizer, location=CACHED, **kwargs):
    specs = [(60, 4, location, CPU), (40, 4, location, CPU), (30, 8, DEV, CPU)]
    common = {"optimizer": optimizer, "learning_rate": 0.1, "feature_table_map": [0, 1, 2, 0]}
    host = tbe.SplitTableBatchedEmbeddingBagsCodegen(specs, **common, **kwargs)
    device = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, DEV, c) for r, d, _, c in specs], **common
    )
    return host, device


def _batches(steps, seed=0, rows=(60, 40, 30, 60)):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        lengths = rng.integers(0, 4, size=len(rows) * B)
        ids = np.concatenate(
            [rng.zipf(1.3, size=n) % rows[i // B] for i, n in enumerate(lengths)]
        ).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        out.append((ids, offsets))
    return out


def _grad_step(lookup):
    @jax.jit
    def step(state, indices, offsets, g):
        grads = jax.grad(lambda s: jnp.sum(lookup(s, indices, offsets) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    return step


def _targets(op, steps):
    keys = jax.random.split(jax.random.key(1), steps)
    return [jax.random.normal(k, (B, op.total_D)) for k in keys]


def _device_run(device, weights, batches, targets):
    state = device.set_split_embedding_weights(device.init(), weights)
    step = _grad_step(device)
    for (ids, offsets), g in zip(batches, targets, strict=True):
        state = step(state, ids, offsets, g)
    return device.split_embedding_weights(state), device.split_optimizer_states(state)


def _assert_tables_equal(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("optimizer", "algorithm"),
    [(OptimType.EXACT_ROWWISE_ADAGRAD, CacheAlgorithm.LRU), (OptimType.ADAM, CacheAlgorithm.LFU)],
)
def test_cached_training_equals_device_tables_bitwise(optimizer, algorithm):
    host_op, device_op = _ops(optimizer, cache_load_factor=0.25, cache_algorithm=algorithm)
    cached = tbe.CachedTBE(host_op, ways=5)
    state, caches = cached.init(seed=3)
    weights = [np.array(w) for w in cached.split_embedding_weights(state, caches)]
    batches, targets = _batches(6), _targets(host_op, 6)
    step = _grad_step(cached)
    for (ids, offsets), g in zip(batches, targets, strict=True):
        ready = cached.prefetch(state, caches, ids, offsets)
        state, caches = step(ready.state, ready.indices, offsets, g), ready.caches
    evictions = int(cached.cache_metrics(caches)["total"][2])
    assert evictions > 0  # the cache was too small to hold the tables: rows went back and forth
    want_w, want_s = _device_run(device_op, weights, batches, targets)
    _assert_tables_equal(cached.split_embedding_weights(state, caches), want_w)
    got_s = cached.split_optimizer_states(state, caches)
    for got, want in zip(got_s, want_s, strict=True):
        assert sorted(got) == sorted(want)
        _assert_tables_equal([got[k] for k in sorted(got)], [want[k] for k in sorted(want)])


def test_prefetch_pipeline_equals_the_sequential_run():
    host_op, _ = _ops(OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.6)
    batches, targets = _batches(5, seed=4), _targets(host_op, 5)
    results = []
    for pipelined in (False, True):
        cached = tbe.CachedTBE(host_op, ways=10)
        state, caches = cached.init(seed=0)
        grad_step = _grad_step(cached)
        if pipelined:
            data = [(ids, off, g) for (ids, off), g in zip(batches, targets, strict=True)]

            def step(state, indices, batch, grad_step=grad_step):
                return grad_step(state, indices, batch[1], batch[2]), None

            state, caches, _ = tbe.prefetch_pipeline(cached, step, state, caches, data)
        else:
            for (ids, offsets), g in zip(batches, targets, strict=True):
                ready = cached.prefetch(state, caches, ids, offsets)
                state, caches = grad_step(ready.state, ready.indices, offsets, g), ready.caches
        results.append(cached.split_embedding_weights(state, caches))
    _assert_tables_equal(*results)


def test_prefetch_pipeline_stops_at_a_bad_batch_after_the_steps_before_it():
    """Batch 3 holds an id past its table: its inputs are checked ahead on a thread, and
    the error surfaces when batch 3's prefetch begins, after the steps of batches 0 and 1
    (as in the one-thread pipeline: the step of batch 2 would come after it)."""
    host_op, _ = _ops(OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.6)
    batches = _batches(5, seed=5)
    ids, offsets = batches[3]
    ids = ids.copy()
    ids[offsets[B] - 1 if offsets[B] > 0 else 0] = 10_000  # feature 0's last id (or the first)
    batches[3] = (ids, offsets)
    cached = tbe.CachedTBE(host_op, ways=10)
    state, caches = cached.init(seed=0)
    stepped = []

    def step(state, indices, batch):
        stepped.append(len(stepped))
        return state, None

    with pytest.raises(ValueError, match=r"index 10000 at position \d+ is outside \[0, "):
        tbe.prefetch_pipeline(cached, step, state, caches, batches)
    assert stepped == [0, 1]


def test_flush_and_write_back_lose_nothing():
    host_op, _ = _ops(OptimType.EXACT_SGD, cache_load_factor=0.5)
    cached = tbe.CachedTBE(host_op, ways=10)
    state, caches = cached.init(seed=0)
    before = [np.array(w) for w in cached.split_embedding_weights(state, caches)]
    ids, offsets = _batches(1, seed=7)[0]
    ready = cached.prefetch(state, caches, ids, offsets)
    g = jnp.ones((B, host_op.total_D))
    state = _grad_step(cached)(ready.state, ready.indices, offsets, g)
    host = cached.hosts["sum_float32_d4"]
    stale = host.weight.copy()
    cached.flush(state, ready.caches)
    assert not np.array_equal(stale, host.weight)  # the trained rows were only in the cache
    after = cached.split_embedding_weights(state, ready.caches)
    touched = {
        t: set(ids[offsets[f * B] : offsets[(f + 1) * B]].tolist())
        for f, t in enumerate(host_op.feature_table_map)
        for _ in [0]
    }
    for t in range(2):
        rows = sorted(
            set().union(
                *[
                    set(ids[offsets[f * B] : offsets[(f + 1) * B]].tolist())
                    for f, tt in enumerate(host_op.feature_table_map)
                    if tt == t
                ]
            )
        )
        untouched = np.setdiff1d(np.arange(before[t].shape[0]), rows)
        np.testing.assert_array_equal(after[t][untouched], before[t][untouched])
        assert not np.array_equal(after[t][rows], before[t][rows])
    del touched


def test_a_batch_larger_than_a_set_is_refused_before_anything_changes():
    host_op, _ = _ops(OptimType.EXACT_SGD, cache_load_factor=0.02, cache_sets=1)
    cached = tbe.CachedTBE(host_op, ways=2)
    state, caches = cached.init(seed=0)
    ids = np.array([1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0], np.int32)
    offsets = np.array([0, 3] + [3] * 3 + [3] * 4 + list(range(4, 12)), np.int32)[: 4 * B + 1]
    offsets[-1] = len(ids)
    with pytest.raises(ValueError, match="cannot hold this batch"):
        cached.prefetch(state, caches, ids, offsets)
    assert (np.asarray(caches["sum_float32_d4"].tags) == -1).all()


def test_bad_ids_behave_as_in_device_tables():
    host_op, device_op = _ops(OptimType.EXACT_SGD, cache_load_factor=0.5)
    cached = tbe.CachedTBE(host_op, ways=4)
    state, caches = cached.init(seed=0)
    weights = cached.split_embedding_weights(state, caches)
    dstate = device_op.set_split_embedding_weights(device_op.init(), weights)
    ids = np.array([1, 70, 2, -1, 3, 5, 99, 4], np.int32)  # 70, -1 and 99 are outside
    offsets = np.array([0, 2, 3, 4, 4, 5, 6, 6, 6] + [7] * 4 + [8] * 4, np.int32)
    with pytest.raises(ValueError, match="index 70 at position 1 is outside"):
        cached.prefetch(state, caches, ids, offsets)  # eagerly: the operator's message
    clean = np.array([1, 1, 2, 2, 3, 5, 4, 4], np.int32)
    ready = cached.prefetch(state, caches, clean, offsets)
    # Inside jit (WARNING) a bad id is a zero row and is counted, as on the device.
    bad_slots = jnp.asarray(ready.indices).at[1].set(-1).at[6].set(-1)
    got = jax.jit(cached.lookup)(ready.state, bad_slots, offsets)
    want = jax.jit(device_op.lookup)(
        dstate, jnp.asarray(clean).at[1].set(70).at[6].set(99), offsets
    )
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert int(got[1]) == int(want[1]) == 2


def test_placements_are_checked():
    host_op, _ = _ops(OptimType.EXACT_SGD)
    with pytest.raises(ValueError, match="Train them with jaxrec.tbe.CachedTBE"):
        host_op.init()
    mixed = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(5, 4, CACHED, CPU), (5, 4, DEV, CPU)], optimizer=OptimType.EXACT_SGD
    )
    with pytest.raises(ValueError, match="share a stacked buffer"):
        tbe.CachedTBE(mixed)
    plain = tbe.SplitTableBatchedEmbeddingBagsCodegen([(5, 4, CACHED, CPU)], optimizer="none")
    with pytest.raises(ValueError, match="need a fused optimizer"):
        tbe.CachedTBE(plain)
    for location in (EmbeddingLocation.HOST, EmbeddingLocation.MANAGED):
        op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
            [(8, 4, location, CPU)], optimizer=OptimType.EXACT_SGD, cache_load_factor=0.5
        )
        assert tbe.CachedTBE(op).layouts["sum_float32_d4"].slots == 4


def test_pinned_host_staging_trains_as_numpy_staging_with_every_stage_timed():
    host_op, _ = _ops(OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.25)
    batches, targets = _batches(4), _targets(host_op, 4)
    results = []
    for kind in (None, "pinned_host"):
        cached = tbe.CachedTBE(host_op, ways=5, staging_memory_kind=kind, profile=True)
        state, caches = cached.init(seed=1)
        step = _grad_step(cached)
        for (ids, offsets), g in zip(batches, targets, strict=True):
            ready = cached.prefetch(state, caches, ids, offsets)
            state, caches = step(ready.state, ready.indices, offsets, g), ready.caches
        assert (cached._pinned is not None) == (kind == "pinned_host")  # staged in place
        assert tuple(cached.timings) == TIMED_PARTS
        assert all(len(v) == 4 and min(v) >= 0 for v in cached.timings.values())
        assert int(cached.cache_metrics(caches)["total"][2]) > 0  # rows went back too
        results.append(cached.split_embedding_weights(state, caches))
    _assert_tables_equal(*results)


def test_only_evicted_rows_are_copied_back_to_the_host():
    op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(400, 4, CACHED, CPU)], optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.25
    )
    cached = tbe.CachedTBE(op, ways=100)  # one set of 100 ways
    state, caches = cached.init(seed=0)
    offsets = np.array([0, 64], np.int32)
    sent = []
    for ids in (np.arange(64), np.arange(64, 128)):  # 64 misses, then 64 more: 28 evict
        pending = cached.begin_prefetch(state, caches, ids.astype(np.int32), offsets)
        (name,) = pending.sizes
        misses, size, out = pending.sizes[name]
        evictions = int(pending.plans[name].num_evictions)
        sent.append((misses, evictions, size, pending.evicted[name].shape[0]))
        ready = cached.finish_prefetch(state, pending)
        state, caches = ready.state, ready.caches
    assert sent == [(64, 0, 64, 16), (64, 28, 64, 32)]  # records of the evictions' bucket
