"""Fused sparse backward: the Pallas kernel (interpret mode) against the XLA reference, and the
reference's row gradients against ``jax.grad`` of a plain XLA forward."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels import row_gradients as rg
from jaxrec_kernels import sparse_update as su
from ulp_assertions import assert_rounded_once

from jaxrec.optim import sparse_optimizers as so

BATCH = 3
NUM_KJT = 4  # KJT feature 3 belongs to no group feature below
NUM_ROWS = 15  # rows 11..14 belong to no table of the group: never touched


def _features(dim: int, pooling: str) -> tuple:
    """Tables: rows [0, 6) read by KJT features 0 and 2 (a shared table), rows [6, 11) by 1."""
    if pooling == "none":
        return ((0, 0, 6, 0), (1, 6, 5, 0), (2, 0, 6, 0))
    return ((0, 0, 6, 0), (1, 6, 5, dim), (2, 0, 6, 2 * dim))


def _batch(seed: int, *, max_len: int = 5, padding: int = 5, empty: bool = False):
    """A random KJT batch: duplicate ids, empty bags, some invalid real ids, poisoned padding."""
    rng = np.random.default_rng(seed)
    lengths = (
        np.zeros(NUM_KJT * BATCH, np.int64)
        if empty
        else rng.integers(0, max_len + 1, NUM_KJT * BATCH)
    )
    lengths[rng.integers(0, lengths.size)] = 0
    n_real = int(lengths.sum())
    real = rng.integers(-1, 7, n_real)  # -1 and 6 are outside every table of 5 or 6 rows
    pad = rng.choice([-(2**31), 2**31 - 1, 10**6, -7], padding)
    ids = np.concatenate([real, pad]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    psw = np.concatenate([rng.uniform(0.5, 2.0, n_real), np.full(padding, np.nan)])
    return jnp.asarray(ids), jnp.asarray(offsets), jnp.asarray(psw, jnp.float32)


def _grad_out(seed: int, dim: int, pooling: str, ids, offsets, features):
    """Random cotangent; every entry the group must not read is NaN."""
    rng = np.random.default_rng(seed + 1000)
    if pooling == "none":
        g = rng.normal(size=(ids.shape[0], dim))
        bag = np.searchsorted(np.asarray(offsets), np.arange(ids.shape[0]), side="right") - 1
        kjt = bag // BATCH
        group_kjts = {f[0] for f in features}
        unread = (np.arange(ids.shape[0]) >= int(offsets[-1])) | ~np.isin(kjt, list(group_kjts))
        g[unread] = np.nan
    else:
        g = rng.normal(size=(BATCH, 4 * dim))
        g[:, 3 * dim :] = np.nan  # another group's columns
    return jnp.asarray(g, jnp.float32)


def _dense_forward(weights, ids, offsets, psw, features, pooling):
    """Plain XLA lookup (take + segment_sum), bags computed on the host."""
    ids_np, offs_np = np.asarray(ids), np.asarray(offsets)
    n_real = int(offs_np[-1])
    bag = np.repeat(np.arange(offs_np.size - 1), np.diff(offs_np))
    dim = weights.shape[1]
    if pooling == "none":
        out = jnp.zeros((ids_np.size, dim), jnp.float32)
    else:
        out = jnp.zeros((BATCH, 4 * dim), jnp.float32)
    for kjt, row_offset, num_rows, col in features:
        pos = np.nonzero(bag // BATCH == kjt)[0]
        pos = pos[pos < n_real]
        ok = (ids_np[pos] >= 0) & (ids_np[pos] < num_rows)
        pos, rows = pos[ok], row_offset + ids_np[pos[ok]]
        vals = jnp.take(weights, jnp.asarray(rows, jnp.int32), axis=0).astype(jnp.float32)
        if pooling == "none":
            out = out.at[pos].add(vals)
            continue
        if psw is not None:
            vals = vals * psw[pos][:, None]
        b = bag[pos] % BATCH
        pooled = jax.ops.segment_sum(vals, jnp.asarray(b), num_segments=BATCH)
        if pooling == "mean":
            lengths = np.diff(offs_np)[kjt * BATCH : (kjt + 1) * BATCH]
            pooled = pooled / np.maximum(lengths, 1)[:, None]
        out = out.at[:, col : col + dim].add(pooled)
    return out


def _touched_rows(ids, offsets, features):
    ids_np, offs_np = np.asarray(ids), np.asarray(offsets)
    bag = np.repeat(np.arange(offs_np.size - 1), np.diff(offs_np))
    rows = set()
    for kjt, row_offset, num_rows, _ in features:
        for i in np.nonzero(bag // BATCH == kjt)[0]:
            if 0 <= ids_np[i] < num_rows:
                rows.add(row_offset + int(ids_np[i]))
    return np.array(sorted(rows), np.int64)


def _random_state(opt, dim, seed):
    keys = jax.random.split(jax.random.key(seed), 8)
    state = opt.init(NUM_ROWS, dim)
    return {
        k: jnp.abs(jax.random.normal(key, v.shape, v.dtype))
        for (k, v), key in zip(sorted(state.items()), keys, strict=False)
    }


def _args(seed, dim, pooling, weighted=True, dtype=jnp.float32, features=None):
    features = features or _features(dim, pooling)
    ids, offsets, psw = _batch(seed)
    grad_out = _grad_out(seed, dim, pooling, ids, offsets, features)
    weights = jax.random.normal(jax.random.key(seed), (NUM_ROWS, dim)).astype(dtype)
    return weights, grad_out, ids, offsets, (psw if weighted else None), features


# --------------------------------------------------------------------------- row gradients


def _sparse_and_dense(weights, grad_out, ids, offsets, psw, features, pooling):
    """``(rows, grads)`` of :func:`sparse_row_gradients` and ``jax.grad`` of the plain XLA
    forward (NaNs in ``grad_out`` mark entries no forward output depends on)."""
    rows, grads = rg.sparse_row_gradients(
        grad_out,
        ids,
        offsets,
        psw,
        features,
        batch_size=BATCH,
        dim=weights.shape[1],
        num_rows=NUM_ROWS,
        pooling=pooling,
    )
    cotangent = jnp.nan_to_num(grad_out)
    dense = jax.grad(
        lambda w: jnp.sum(_dense_forward(w, ids, offsets, psw, features, pooling) * cotangent)
    )(weights)
    return rows, grads, dense


@pytest.mark.parametrize(
    ("pooling", "weighted", "dim"),
    [("sum", False, 4), ("sum", True, 6), ("mean", True, 4), ("none", False, 6)],
)
def test_row_gradients_equal_dense_grad_of_xla_forward(pooling, weighted, dim):
    weights, grad_out, ids, offsets, psw, features = _args(1 + dim, dim, pooling, weighted)
    rows, grads, dense = _sparse_and_dense(weights, grad_out, ids, offsets, psw, features, pooling)
    touched = _touched_rows(ids, offsets, features)
    m = ids.shape[0]
    chex.assert_shape(rows, (m,))
    chex.assert_shape(grads, (m, dim))
    np.testing.assert_array_equal(rows[: touched.size], touched)
    np.testing.assert_array_equal(rows[touched.size :], NUM_ROWS)
    chex.assert_trees_all_close(grads[: touched.size], dense[touched], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(grads[touched.size :], jnp.zeros_like(grads[touched.size :]))
    untouched = np.setdiff1d(np.arange(NUM_ROWS), touched)
    chex.assert_trees_all_equal(dense[untouched], jnp.zeros_like(dense[untouched]))


def test_row_gradients_count_a_feature_listed_twice_once_per_listing():
    dim = 4
    features = ((0, 0, 6, 0), (0, 6, 5, dim), (1, 0, 6, 2 * dim))
    weights, grad_out, ids, offsets, psw, _ = _args(7, dim, "sum", features=features)
    rows, grads, dense = _sparse_and_dense(weights, grad_out, ids, offsets, psw, features, "sum")
    chex.assert_shape(rows, (2 * ids.shape[0],))
    scattered = jnp.zeros_like(weights).at[rows].add(grads, mode="drop")
    chex.assert_trees_all_close(scattered, dense, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- fused kernel


def _update(fn, opt, weights, state, step, grad_out, ids, offsets, psw, features, pooling, **kw):
    """``fn`` (the fused update or its reference) on this file's layout (``BATCH`` bags)."""
    layout = dict(batch_size=BATCH, dim=weights.shape[1], pooling=pooling, optimizer=opt)
    return fn(weights, state, step, grad_out, ids, offsets, psw, features, **layout, **kw)


def _run_both(opt, *args, config=None):
    """The Pallas kernel (interpret mode) and the XLA reference on the same arguments."""
    got = _update(su.fused_sparse_update, opt, *args, interpret=True, config=config)
    return got, _update(su.fused_sparse_update_reference, opt, *args)


def _assert_untouched_rows_unchanged(before, after, touched):
    untouched = np.setdiff1d(np.arange(NUM_ROWS), touched)
    chex.assert_trees_all_equal(before[untouched], after[untouched])


OPTIMIZERS = {
    "exact_sgd": lambda: so.exact_sgd(learning_rate=0.1),
    "exact_rowwise_adagrad": lambda: so.exact_rowwise_adagrad(learning_rate=0.1, eps=1e-6),
    "adam": lambda: so.adam(learning_rate=0.1, weight_decay=0.01),
    "partial_rowwise_adam": lambda: so.partial_rowwise_adam(learning_rate=0.1),
    "exact_adagrad": lambda: so.exact_adagrad(learning_rate=0.1),
    "lamb": lambda: so.lamb(learning_rate=0.1),
    "lars_sgd": lambda: so.lars_sgd(learning_rate=0.1, weight_decay=0.01),
    "rowwise_adagrad_l2_maxnorm": lambda: so.exact_rowwise_adagrad(
        learning_rate=0.1, weight_decay=0.1, weight_decay_mode="L2", max_norm=1.0
    ),
}


@pytest.mark.parametrize(
    ("name", "pooling", "dim", "config"),
    [
        ("exact_rowwise_adagrad", "sum", 4, su.SparseUpdateConfig(block_rows=4)),
        ("exact_rowwise_adagrad", "mean", 6, su.SparseUpdateConfig(block_rows=2, block_occ=4)),
        pytest.param("exact_rowwise_adagrad", "none", 4, None, marks=pytest.mark.slow),
        ("exact_sgd", "sum", 6, su.SparseUpdateConfig(block_rows=1, block_occ=2)),
        ("adam", "mean", 4, su.SparseUpdateConfig(block_rows=4, block_occ=2)),
        ("partial_rowwise_adam", "none", 6, su.SparseUpdateConfig(block_rows=8)),
        pytest.param("exact_adagrad", "sum", 4, None, marks=pytest.mark.slow),
        pytest.param("lamb", "sum", 4, None, marks=pytest.mark.slow),
        pytest.param("lars_sgd", "mean", 4, None, marks=pytest.mark.slow),
        pytest.param("rowwise_adagrad_l2_maxnorm", "sum", 6, None, marks=pytest.mark.slow),
    ],
)
def test_kernel_matches_reference_and_leaves_untouched_rows_bit_identical(
    name, pooling, dim, config
):
    opt = OPTIMIZERS[name]()
    weights, grad_out, ids, offsets, psw, features = _args(11 + dim, dim, pooling)
    state = _random_state(opt, dim, 3)
    args = (weights, state, jnp.int32(3), grad_out, ids, offsets, psw, features, pooling)
    (w_got, s_got), (w_want, s_want) = _run_both(opt, *args, config=config)
    chex.assert_trees_all_close((w_got, s_got), (w_want, s_want), rtol=2e-5, atol=2e-6)
    touched = _touched_rows(ids, offsets, features)
    assert touched.size > 0
    for before, got, want in [(weights, w_got, w_want)] + [
        (state[k], s_got[k], s_want[k]) for k in state
    ]:
        _assert_untouched_rows_unchanged(before, got, touched)
        _assert_untouched_rows_unchanged(before, want, touched)
    assert not np.allclose(w_got[touched], weights[touched])


def test_kernel_matches_reference_for_a_feature_listed_twice():
    dim = 4
    features = ((0, 0, 6, 0), (0, 6, 5, dim), (1, 0, 6, 2 * dim))
    opt = OPTIMIZERS["exact_rowwise_adagrad"]()
    weights, grad_out, ids, offsets, psw, _ = _args(5, dim, "sum", features=features)
    state = _random_state(opt, dim, 4)
    args = (weights, state, 2, grad_out, ids, offsets, psw, features, "sum")
    got, want = _run_both(opt, *args, config=su.SparseUpdateConfig(block_rows=4))
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("dtype", "rounding"),
    [
        (jnp.bfloat16, True),
        (jnp.float16, False),
        pytest.param(jnp.float16, True, marks=pytest.mark.slow),
        pytest.param(jnp.bfloat16, False, marks=pytest.mark.slow),
    ],
)
def test_kernel_matches_reference_on_16_bit_tables(dtype, rounding):
    dim = 8
    opt = so.exact_rowwise_adagrad(learning_rate=0.05, stochastic_rounding=rounding)
    weights, grad_out, ids, offsets, psw, features = _args(21, dim, "sum", dtype=dtype)
    state = _random_state(opt, dim, 5)
    args = (weights, state, jnp.int32(4), grad_out, ids, offsets, psw, features, "sum")
    (w_got, s_got), (w_want, s_want) = _run_both(
        opt, *args, config=su.SparseUpdateConfig(block_rows=4)
    )
    chex.assert_type(w_got, dtype)
    # Float32 sums may differ in the last bit, which can move a rounded value by one ulp.
    assert_rounded_once(w_got, np.asarray(w_want, np.float64), dtype)
    chex.assert_trees_all_close(s_got, s_want, rtol=2e-5, atol=2e-6)
    _assert_untouched_rows_unchanged(weights, w_got, _touched_rows(ids, offsets, features))


def test_stochastic_rounding_in_kernel_is_unbiased_across_steps():
    dim = 8
    opt = so.exact_sgd(learning_rate=1.0)
    weights = jnp.ones((NUM_ROWS, dim), jnp.bfloat16)
    ids = jnp.array([0], jnp.int32)
    offsets = jnp.zeros((NUM_KJT * BATCH + 1,), jnp.int32).at[1:].set(1)
    grad_out = jnp.full((BATCH, 4 * dim), -(2.0**-10), jnp.float32)  # 1/8 of a bf16 ulp at 1
    features = _features(dim, "sum")
    new_rows = []
    for step in range(1, 65):
        args = (weights, {}, step, grad_out, ids, offsets, None, features, "sum")
        w, _ = _update(su.fused_sparse_update, opt, *args, interpret=True)
        new_rows.append(np.asarray(w[0], np.float32))
    mean_step = np.mean(np.stack(new_rows)) - 1.0
    assert abs(mean_step - 2.0**-10) < 0.4 * 2.0**-10  # E[round(x)] = x; 512 draws


def test_kernel_sums_a_hot_row_over_many_loop_steps():
    dim = 4
    opt = OPTIMIZERS["exact_rowwise_adagrad"]()
    rng = np.random.default_rng(81)
    lengths = np.zeros(NUM_KJT * BATCH, np.int64)
    lengths[: 2 * BATCH] = 15  # KJT features 0 and 1: 90 ids, most of them the same row
    ids = np.where(rng.random(lengths.sum()) < 0.8, 3, rng.integers(0, 5, lengths.sum()))
    ids = jnp.asarray(ids, jnp.int32)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
    features = _features(dim, "sum")
    weights = jax.random.normal(jax.random.key(9), (NUM_ROWS, dim))
    grad_out = _grad_out(81, dim, "sum", ids, offsets, features)
    state = _random_state(opt, dim, 9)
    args = (weights, state, 1, grad_out, ids, offsets, None, features, "sum")
    got, want = _run_both(opt, *args, config=su.SparseUpdateConfig(block_rows=2, block_occ=4))
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-6)


def test_kernel_is_deterministic():
    dim = 4
    opt = OPTIMIZERS["partial_rowwise_adam"]()
    weights, grad_out, ids, offsets, psw, features = _args(31, dim, "mean")
    state = _random_state(opt, dim, 6)
    args = (weights, state, 5, grad_out, ids, offsets, psw, features, "mean")
    config = su.SparseUpdateConfig(block_rows=2, block_occ=2)
    run = functools.partial(
        _update, su.fused_sparse_update, opt, *args, interpret=True, config=config
    )
    chex.assert_trees_all_equal(run(), run())


def test_empty_batch_changes_nothing():
    dim = 4
    opt = OPTIMIZERS["adam"]()
    ids, offsets, psw = _batch(41, empty=True)
    features = _features(dim, "sum")
    weights = jax.random.normal(jax.random.key(0), (NUM_ROWS, dim))
    state = _random_state(opt, dim, 7)
    grad_out = jnp.ones((BATCH, 4 * dim))
    got, want = _run_both(opt, weights, state, 1, grad_out, ids, offsets, psw, features, "sum")
    chex.assert_trees_all_equal(got, (weights, state))
    chex.assert_trees_all_equal(want, (weights, state))


def test_hyperparameters_closed_over_inside_jit_reach_the_kernel():
    dim = 4
    weights, grad_out, ids, offsets, psw, features = _args(51, dim, "sum")
    state = _random_state(so.exact_rowwise_adagrad(), dim, 8)

    @functools.partial(jax.jit, static_argnames="fused")
    def step(weights, state, lr, fused):
        opt = so.exact_rowwise_adagrad(learning_rate=lambda count: lr * (count + 1))
        fn = (
            functools.partial(su.fused_sparse_update, interpret=True)
            if fused
            else su.fused_sparse_update_reference
        )
        return _update(fn, opt, weights, state, 2, grad_out, ids, offsets, psw, features, "sum")

    got = step(weights, state, 0.25, fused=True)
    chex.assert_trees_all_close(got, step(weights, state, 0.25, fused=False), rtol=2e-5, atol=2e-6)
    assert not np.allclose(got[0], step(weights, state, 0.5, fused=True)[0])


def test_kernel_updates_tables_in_place_on_gpu():
    dim = 128
    opt = so.partial_rowwise_adam()
    features = ((0, 0, 100, 0),)
    weights = jax.ShapeDtypeStruct((100, dim), jnp.float32)
    state = jax.eval_shape(lambda: opt.init(100, dim))

    def fn(w, s, g, ids, offsets):
        return su.fused_sparse_update(
            w,
            s,
            1,
            g,
            ids,
            offsets,
            None,
            features,
            batch_size=2,
            dim=dim,
            pooling="sum",
            optimizer=opt,
        )

    traced = jax.jit(fn, donate_argnums=(0, 1)).trace(
        weights,
        state,
        jax.ShapeDtypeStruct((2, dim), jnp.float32),
        jax.ShapeDtypeStruct((8,), jnp.int32),
        jax.ShapeDtypeStruct((3,), jnp.int32),
    )
    try:
        lowered = traced.lower(lowering_platforms=("cuda",))
    except RuntimeError as err:  # newer jax lowers Triton kernels only where a GPU is present
        if "No supported GPU devices found" not in str(err):
            raise
        pytest.skip("this jax version cannot lower Triton kernels without a GPU")
    text = lowered.as_text()
    calls = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*", text)
    assert len(calls) == 2  # for the group: the hot rows' chunk partials, then the update
    aliased = [call for call in calls if "output_tuple_indices" in call]
    assert len(aliased) == 1
    aliases = re.findall(r"output_tuple_indices = \[(\d+)\]", aliased[0])
    assert sorted(aliases) == ["0", "1", "2"]  # weights, momentum1, momentum2


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(pooling="max"), "pooling"),
        (dict(grad_out=jnp.zeros((BATCH, 5))), "columns"),
        (dict(grad_out=jnp.zeros((BATCH + 1, 16))), "batch_size"),
        (dict(features=((0, 10, 6, 0),)), "rows"),
        (dict(features=((7, 0, 6, 0),)), "kjt_feature_index"),
        (dict(state={"momentum2": jnp.zeros(NUM_ROWS)}), "state"),
        (dict(state={"momentum1": jnp.zeros((NUM_ROWS, 4))}), "momentum1"),
        (dict(weights=jnp.zeros((NUM_ROWS, 5))), "weights"),
        (dict(weights=jnp.zeros((NUM_ROWS, 4), jnp.int32)), "dtype"),
    ],
)
def test_bad_input_raises_value_error_naming_it(change, message):
    ids, offsets, psw = _batch(61)
    args = dict(
        weights=jnp.zeros((NUM_ROWS, 4)),
        state={"momentum1": jnp.zeros(NUM_ROWS)},
        step=1,
        grad_out=jnp.zeros((BATCH, 16)),
        ids=ids,
        offsets=offsets,
        per_sample_weights=psw,
        features=_features(4, "sum"),
        batch_size=BATCH,
        dim=4,
        pooling="sum",
        optimizer=so.exact_rowwise_adagrad(),
    )
    args.update(change)
    for fn in (su.fused_sparse_update, su.fused_sparse_update_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)


def test_sequence_pooling_refuses_a_feature_listed_twice():
    ids, offsets, _ = _batch(71)
    with pytest.raises(ValueError, match="listed twice"):
        rg.sparse_row_gradients(
            jnp.zeros((ids.shape[0], 4)),
            ids,
            offsets,
            None,
            ((0, 0, 6, 0), (0, 6, 5, 0)),
            batch_size=BATCH,
            dim=4,
            num_rows=NUM_ROWS,
            pooling="none",
        )


def test_config_rejects_block_sizes_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="block_rows"):
        su.SparseUpdateConfig(block_rows=3)
