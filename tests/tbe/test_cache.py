"""jaxrec.tbe.cache: hits, LRU/LFU victims, locking, overflow and metrics on hand-made batches."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.tbe.cache import CacheLayout, assign, scatter_index, set_of, sorted_unique


def _layout(algorithm, ways=3, sets=1, rows=20):
    return CacheLayout(
        num_rows=rows,
        sets=sets,
        ways=ways,
        features=((0, 0, rows),),
        table_offsets=(0,),
        algorithm=algorithm,
    )


def _batch(state, layout, ids, locked=None):
    ids = jnp.asarray(ids, jnp.int32)
    offsets = jnp.array([0, ids.shape[0]], jnp.int32)
    lock = jnp.full((1,), -1, jnp.int32) if locked is None else jnp.asarray(locked, jnp.int32)
    return assign(layout, state, ids, offsets, lock, batch_size=1)


def _run(layout, batches):
    state = layout.init()
    plans = []
    for ids in batches:
        state, plan = _batch(state, layout, ids)
        plans.append(plan)
    return state, plans


def test_lru_evicts_the_least_recently_used_row():
    layout = _layout("lru")
    # 1, 2, 3 fill the ways; 1 is used again; 4 must evict 2 (the oldest), then 5 evicts 3.
    state, plans = _run(layout, [[1, 2, 3], [1], [4], [5]])
    assert plans[2].evict_rows[0] == 2 and plans[3].evict_rows[0] == 3
    assert sorted(np.asarray(state.tags).ravel().tolist()) == [1, 4, 5]


def test_lfu_evicts_the_least_frequently_used_row():
    layout = _layout("lfu")
    # Reads: 1 x3, 2 x1, 3 x2 (duplicates within a batch count); 4 evicts 2, then 5 evicts 4
    # (read once, fewer than 3's two and 1's three).
    state, plans = _run(layout, [[1, 1, 2, 3], [3, 1], [4], [5]])
    assert plans[2].evict_rows[0] == 2 and plans[3].evict_rows[0] == 4
    assert sorted(np.asarray(state.tags).ravel().tolist()) == [1, 3, 5]
    assert np.asarray(state.counts)[[1, 2, 3, 4, 5]].tolist() == [3, 1, 2, 1, 1]


def test_hits_keep_their_slot_and_rows_of_the_batch_are_never_victims():
    layout = _layout("lru")
    state, plans = _run(layout, [[7, 8, 9], [9, 10]])
    first, second = plans
    slot_of_9 = int(first.slots[2])
    assert int(second.slots[0]) == slot_of_9  # a hit keeps its slot
    assert int(second.evict_rows[0]) == 7  # the oldest; 9 is read by this batch
    assert int(second.num_misses) == 1


def test_locked_slots_are_not_evicted():
    layout = _layout("lru")
    state, (plan,) = _run(layout, [[1, 2, 3]])
    slot_of_1 = int(plan.slots[0])
    state, plan = _batch(state, layout, [4], locked=[slot_of_1])
    assert int(plan.evict_rows[0]) == 2  # 1 is the oldest but locked


def test_a_set_with_more_rows_than_free_ways_overflows():
    layout = _layout("lru", ways=2)
    state, (plan,) = _run(layout, [[1, 2, 3]])
    assert int(plan.overflow) == 1
    state, (plan,) = _run(layout, [[1, 2]])
    assert int(plan.overflow) == 0


def test_metrics_count_hits_misses_evictions_and_unique_rows_per_table():
    layout = CacheLayout(
        num_rows=20, sets=1, ways=3, features=((0, 0, 10), (1, 10, 10)), table_offsets=(0, 10)
    )
    state = layout.init()
    offsets = jnp.array([0, 3, 4], jnp.int32)  # feature 0: ids 1, 1, 2; feature 1: id 5
    state, plan = assign(
        layout,
        state,
        jnp.array([1, 1, 2, 5], jnp.int32),
        offsets,
        jnp.full((1,), -1),
        batch_size=1,
    )
    assert np.asarray(state.last).tolist() == [[0, 2, 0, 2], [0, 1, 0, 1]]
    # The cache holds rows 1, 2 and 15. Feature 0 reads ids 1, 3; feature 1 reads id 7.
    state, plan = assign(
        layout,
        state,
        jnp.array([1, 3, 7], jnp.int32),
        jnp.array([0, 2, 3], jnp.int32),
        jnp.full((1,), -1),
        batch_size=1,
    )
    # table 0: rows 1 (hit), 3 (miss, evicts row 2); table 1: row 17 (miss, evicts row 15)
    assert np.asarray(state.last).tolist() == [[1, 1, 1, 2], [0, 1, 1, 1]]
    assert np.asarray(state.totals).tolist() == [[1, 3, 1, 4], [0, 2, 1, 2]]


def test_bad_ids_and_padding_take_no_slot():
    layout = _layout("lru", rows=5)
    ids = jnp.array([1, 9, -2, 1, 4], jnp.int32)
    offsets = jnp.array([0, 4], jnp.int32)  # position 4 is padding
    state, plan = assign(layout, layout.init(), ids, offsets, jnp.full((1,), -1), batch_size=1)
    slots = np.asarray(plan.slots).tolist()
    assert slots[1] == slots[2] == slots[4] == -1 and slots[0] == slots[3] >= 0
    assert int(plan.num_misses) == 1


def test_rows_spread_over_sets_and_stay_in_their_set():
    layout = _layout("lru", ways=2, sets=4, rows=100)
    ids = jnp.arange(6, dtype=jnp.int32)
    sets = np.asarray(set_of(ids, 4))
    chosen = ids[np.concatenate([np.flatnonzero(sets == s)[:2] for s in range(4)])]
    state, plan = _batch(layout.init(), layout, chosen)
    slots = np.asarray(plan.slots)
    np.testing.assert_array_equal(slots // 2, np.asarray(set_of(chosen, 4)))


def test_layout_refuses_an_unknown_algorithm():
    with pytest.raises(ValueError, match="'lru' or 'lfu'"):
        _layout("fifo")


def test_evictions_are_compacted_apart_from_the_misses():
    layout = _layout("lru")
    # 1 and 2 leave a way free: of the misses 3 and 4, 3 takes the empty way and only 4
    # evicts (row 1, the lowest of the two oldest ways).
    state, (first,) = _run(layout, [[1, 2]])
    state, plan = _batch(state, layout, [3, 4])
    assert (int(plan.num_misses), int(plan.num_evictions)) == (2, 1)
    assert plan.evict_rows[:2].tolist() == [1, -1]
    assert plan.evict_slots[:2].tolist() == [int(first.slots[0]), -1]


def test_scatter_index_sends_dropped_entries_to_distinct_out_of_range_indices():
    keep = jnp.array([True, False, False, True, False])
    at = np.asarray(scatter_index(jnp.array([3, 0, 0, 1, 0]), keep, 4))
    assert at[[0, 3]].tolist() == [3, 1]
    dropped = at[~np.asarray(keep)]
    assert (dropped >= 4).all() and len(set(dropped.tolist())) == dropped.size


def test_sorted_unique_matches_jnp_unique_and_counts_runs():
    rows = jnp.array([7, 2, 7, 9, 2, 7, 11, 11], jnp.int32)
    uniq, inverse, runs = sorted_unique(rows, 11)
    ref, ref_inv = jnp.unique(rows, size=8, fill_value=11, return_inverse=True)
    assert uniq.tolist() == ref.tolist() and inverse.tolist() == ref_inv.reshape(-1).tolist()
    assert runs.tolist() == [2, 3, 1, 2, 0, 0, 0, 0]


def test_per_table_metrics_match_a_numpy_count_over_many_tables():
    """Six tables (one never read, one with bad ids), two batches: per table, unique rows
    are NumPy's count of distinct valid ids, hits plus misses are the unique rows, and the
    second batch hits exactly the rows the first one cached (the cache holds them all)."""
    rows = (7, 30, 1, 12, 50, 9)
    starts = tuple(int(x) for x in np.cumsum((0,) + rows[:-1]))
    layout = CacheLayout(
        num_rows=sum(rows),
        sets=4,
        ways=40,
        features=tuple((t, starts[t], r) for t, r in enumerate(rows)),
        table_offsets=starts,
    )
    rng = np.random.default_rng(3)
    state, seen = layout.init(), [set() for _ in rows]
    for _ in range(2):
        lengths = [0 if t == 2 else int(rng.integers(1, 25)) for t in range(len(rows))]
        ids = [rng.integers(-2 if t == 3 else 0, rows[t] + (3 if t == 3 else 0), n)
               for t, n in enumerate(lengths)]  # fmt: skip
        offsets = jnp.asarray(np.cumsum([0, *lengths]), jnp.int32)
        state, _ = assign(
            layout, state, jnp.asarray(np.concatenate(ids), jnp.int32), offsets,
            jnp.full((1,), -1), batch_size=1,
        )  # fmt: skip
        last = np.asarray(state.last)
        for t, table_ids in enumerate(ids):
            valid = {int(i) for i in table_ids if 0 <= i < rows[t]}
            hits, misses, evictions, unique = last[t]
            assert (unique, hits + misses, evictions) == (len(valid), len(valid), 0), t
            assert hits == len(valid & seen[t]), t
            seen[t] |= valid
