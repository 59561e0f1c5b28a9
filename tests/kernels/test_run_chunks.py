"""Hot rows in the fused backward: the chunk plan of long runs, its partial sums, and the fused
update on heavily skewed batches (one row taking most occurrences) against the XLA reference
for every optimizer family the kernel fuses."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels import row_gradients as rg
from jaxrec_kernels import run_chunks as rc
from jaxrec_kernels import sparse_update as su

from jaxrec.optim import sparse_optimizers as so


def _runs(lengths: list[int], m: int) -> np.ndarray:
    """Run lengths per sorted slot: runs of ``lengths`` back to back, then sentinel slots."""
    run = np.zeros(m, np.int32)
    start = 0
    for length in lengths:
        run[start] = length
        start += length
    assert start <= m
    return run


def _plan_by_loop(run: np.ndarray, chunk: int):
    """The chunks of every run longer than ``chunk``, walked slot by slot."""
    chunks, first, num = [], {}, {}
    for head in np.nonzero(run)[0]:
        if run[head] > chunk:
            first[head], num[head] = len(chunks), 0
            for start in range(head, head + run[head], chunk):
                chunks.append((start, min(chunk, head + run[head] - start)))
                num[head] += 1
    return chunks, first, num


@pytest.mark.parametrize(
    ("lengths", "m", "chunk"),
    [
        ([5, 2, 1, 9, 4, 4], 30, 4),  # short, exactly chunk, chunk + 1 and multiples
        ([65] * 15, 1000, 64),  # the most chunks a batch can make: every run chunk + 1 long
        ([1000], 1000, 64),  # one row takes every occurrence
        ([1] * 7, 9, 2),  # nothing to split
        ([], 5, 1),  # an empty batch
    ],
)
def test_split_runs_cuts_every_long_run_into_chunks_in_order(lengths, m, chunk):
    run = _runs(lengths, m)
    plan = jax.tree.map(np.asarray, rc.split_runs(jnp.asarray(run), chunk))
    chunks, first, num = _plan_by_loop(run, chunk)
    assert plan.chunk_start.shape == plan.chunk_len.shape == (rc.num_chunk_slots(m, chunk),)
    assert len(chunks) <= plan.chunk_len.size
    got = list(zip(plan.chunk_start.tolist(), plan.chunk_len.tolist(), strict=True))
    assert got[: len(chunks)] == chunks
    assert not plan.chunk_len[len(chunks) :].any()
    np.testing.assert_array_equal(plan.count, np.where(run > chunk, 0, run))
    np.testing.assert_array_equal(plan.num_chunks, [num.get(k, 0) for k in range(m)])
    np.testing.assert_array_equal(plan.first_chunk[list(first)], list(first.values()))
    # The longest serial walk of one program: at most chunk occurrences or L/chunk + 1 partials.
    assert plan.count.max(initial=0) <= chunk
    assert plan.num_chunks.max(initial=0) <= max(lengths, default=0) // chunk + 1


def test_split_runs_refuses_a_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
        rc.split_runs(jnp.zeros(4, jnp.int32), 0)
    with pytest.raises(ValueError, match="SparseUpdateConfig.chunk_occ must be a power of two"):
        su.SparseUpdateConfig(chunk_occ=48)


def test_chunk_partials_sum_each_chunk_in_slot_order():
    rng = np.random.default_rng(3)
    m, dim, chunk = 40, 3, 4
    run = _runs([13, 2, 9, 5], m)
    src_row = jnp.asarray(rng.integers(0, 6, m), jnp.int32)
    src_col = jnp.asarray(rng.integers(0, 2, m) * dim, jnp.int32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, m), jnp.float32)
    grad_out = jnp.asarray(rng.normal(size=(6, 2 * dim)), jnp.float32)
    plan = rc.split_runs(jnp.asarray(run), chunk)
    got = rc.chunk_partials(
        plan, src_row, src_col, scale, grad_out,
        dim=dim, dim_pad=4, block=2, block_occ=2, num_warps=1, interpret=True,
    )  # fmt: skip
    g = rg.gather_rows(grad_out, src_row, src_col, dim) * scale[:, None]
    chunks, _, _ = _plan_by_loop(run, chunk)
    assert len(chunks) == 4 + 3 + 2  # 13, 9 and 5 slots; the run of 2 is not cut
    for c, (start, length) in enumerate(chunks):
        want = np.asarray(g[start : start + length], np.float64).sum(0)
        np.testing.assert_allclose(got[c, :dim], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[c, dim:], 0.0)  # padded lanes


# --------------------------------------------------------------------------- skewed batches

BATCH, ROWS, HOT = 6, 20, 7
FEATURES = ((0, 0, ROWS, 0), (1, 0, ROWS, 4))  # two KJT features share one table of ROWS rows

# One optimizer of each family the kernel fuses (stateless, row-wise, element-wise moments,
# mixed row-wise and element-wise state, row-norm trust ratio).
OPTIMIZERS = {
    "exact_sgd": lambda: so.exact_sgd(learning_rate=0.1),
    "exact_rowwise_adagrad": lambda: so.exact_rowwise_adagrad(learning_rate=0.1, eps=1e-6),
    "adam": lambda: so.adam(learning_rate=0.1, weight_decay=0.01),
    "partial_rowwise_lamb": lambda: so.partial_rowwise_lamb(learning_rate=0.1),
    "lars_sgd": lambda: so.lars_sgd(learning_rate=0.1, weight_decay=0.01),
}


def _skewed_batch(seed: int, pooling: str, dim: int = 4):
    """~220 ids, ~85% of them row HOT; row 2 exactly 8 times, row 3 nine times (chunk 8)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(10, 27, 2 * BATCH)
    lengths[3] = 0  # an empty bag
    n = int(lengths.sum())
    ids = np.where(rng.random(n) < 0.85, HOT, rng.integers(8, ROWS, n))
    ids[rng.permutation(np.nonzero(ids == HOT)[0])[:17]] = [2] * 8 + [3] * 9
    ids = np.concatenate([ids, [2**31 - 1] * 3]).astype(np.int32)  # padding
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    psw = jnp.asarray(rng.uniform(0.5, 2.0, ids.size), jnp.float32)
    shape = (ids.size, dim) if pooling == "none" else (BATCH, 2 * dim)
    grad_out = jnp.asarray(rng.normal(size=shape), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(ROWS, dim)), jnp.float32)
    return weights, grad_out, jnp.asarray(ids), jnp.asarray(offsets), psw


def _state(opt, dim, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    init = sorted(opt.init(ROWS, dim).items())
    return {
        k: jnp.abs(jax.random.normal(key, v.shape)) for (k, v), key in zip(init, keys, strict=False)
    }


def _update(fn, opt, pooling, weights, grad_out, ids, offsets, psw, step=3, **kw):
    features = ((0, 0, ROWS, 0), (1, 0, ROWS, 0)) if pooling == "none" else FEATURES
    state = _state(opt, weights.shape[1], 5)
    psw = None if pooling == "none" else psw
    return fn(
        weights, state, step, grad_out, ids, offsets, psw, features,
        batch_size=BATCH, dim=weights.shape[1], pooling=pooling, optimizer=opt, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kernel_on_a_skewed_batch_matches_reference(name):
    opt = OPTIMIZERS[name]()
    pooling = "mean" if name in ("adam", "lars_sgd") else "sum"
    batch = _skewed_batch(11, pooling)
    config = su.SparseUpdateConfig(block_rows=2, block_occ=2, chunk_occ=8)
    got = _update(su.fused_sparse_update, opt, pooling, *batch, interpret=True, config=config)
    want = _update(su.fused_sparse_update_reference, opt, pooling, *batch)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)
    hot = np.asarray(batch[0][HOT])
    assert not np.allclose(np.asarray(got[0][HOT]), hot)
    untouched = np.array([0, 1, 4, 5, 6])  # rows below 8 that no id hits
    chex.assert_trees_all_equal(got[0][untouched], batch[0][untouched])


def test_kernel_on_a_skewed_sequence_batch_is_deterministic_and_matches_reference():
    opt = OPTIMIZERS["exact_rowwise_adagrad"]()
    batch = _skewed_batch(12, "none", dim=6)
    config = su.SparseUpdateConfig(block_rows=4, block_occ=1, chunk_occ=4)
    run = lambda: _update(  # noqa: E731
        su.fused_sparse_update, opt, "none", *batch, interpret=True, config=config
    )
    got = run()
    chex.assert_trees_all_equal(got, run())
    want = _update(su.fused_sparse_update_reference, opt, "none", *batch)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)


def test_non_finite_gradient_of_a_hot_row_leaves_it_unchanged():
    opt = so.partial_rowwise_adam(learning_rate=0.1)
    weights, grad_out, ids, offsets, psw = _skewed_batch(13, "sum")
    hot_pos = int(np.nonzero(np.asarray(ids) == HOT)[0][-1])
    psw = psw.at[hot_pos].set(jnp.inf)  # one occurrence of the hot row, in its last chunk
    config = su.SparseUpdateConfig(block_rows=2, chunk_occ=8)
    got_w, got_s, skipped = _update(
        su.fused_sparse_update, opt, "sum", weights, grad_out, ids, offsets, psw,
        interpret=True, config=config, return_nonfinite=True,
    )  # fmt: skip
    assert int(skipped) == 1
    chex.assert_trees_all_equal(got_w[HOT], weights[HOT])
    want = _update(
        su.fused_sparse_update_reference, opt, "sum", weights, grad_out, ids, offsets, psw
    )
    chex.assert_trees_all_close((got_w, got_s), want, rtol=2e-5, atol=2e-6)
