"""Pooled lookup: the Pallas kernel (interpret mode) and the XLA reference against a NumPy
oracle and each other, on fresh random inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.pooled_lookup import (
    PooledConfig,
    pooled_lookup,
    pooled_lookup_reference,
)
from random_kjt import random_kjt
from ulp_assertions import assert_rounded_once


def numpy_pooled(w, ids, offsets, psw, features, batch, num_columns, pooling, out=None):
    """Loop oracle: (out, bad count) following the documented rules literally."""
    w = np.asarray(w, np.float64)
    res = np.zeros((batch, num_columns)) if out is None else np.array(out, np.float64)
    bad = 0
    for kjt, row_offset, num_rows, col in features:
        for b in range(batch):
            lo, hi = offsets[kjt * batch + b], offsets[kjt * batch + b + 1]
            acc = np.zeros(w.shape[1])
            for i in range(lo, hi):
                if 0 <= ids[i] < num_rows:
                    acc += w[row_offset + ids[i]] * (1.0 if psw is None else psw[i])
                else:
                    bad += 1
            if pooling == "mean":
                acc /= max(hi - lo, 1)
            res[b, col : col + w.shape[1]] = acc
    return res, bad


def both(w, ids, offsets, psw, features, **kw):
    """Kernel (interpret) and reference results for the same call."""
    args = (w, jnp.asarray(ids), jnp.asarray(offsets), psw, features)
    got = pooled_lookup(*args, interpret=True, **kw)
    ref = pooled_lookup_reference(*args, **kw)
    return got, ref


@pytest.mark.parametrize("dim", [3, 24, 48, 96, 160])
def test_odd_dims_match_numpy_oracle_with_empty_bags_repeats_and_padding(dim):
    rng = np.random.default_rng(dim)
    batch, rows = 5, 6
    ids, offsets = random_kjt(rng, 2, batch, 9, rows)
    w = jnp.asarray(rng.normal(size=(2 * rows, dim)), jnp.float32)
    feats = ((0, 0, rows, dim), (1, rows, rows, 0))
    (got, got_bad), (ref, ref_bad) = both(
        w, ids, offsets, None, feats, batch_size=batch, num_columns=2 * dim
    )
    want, want_bad = numpy_pooled(w, ids, offsets, None, feats, batch, 2 * dim, "sum")
    chex.assert_shape(got, (batch, 2 * dim))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)
    assert int(got_bad) == int(ref_bad) == want_bad == 0


@pytest.mark.parametrize(
    "pooling,weighted,seed", [("mean", False, 1), ("sum", True, 2), ("mean", True, 3)]
)
def test_mean_and_per_sample_weights_match_numpy_oracle(pooling, weighted, seed):
    rng = np.random.default_rng(seed)
    batch, rows, dim = 6, 8, 16
    ids, offsets = random_kjt(rng, 3, batch, 12, rows)
    psw = rng.normal(size=ids.shape).astype(np.float32) if weighted else None
    w = jnp.asarray(rng.normal(size=(3 * rows, dim)), jnp.float32)
    feats = tuple((k, k * rows, rows, k * dim) for k in range(3))
    kw = dict(batch_size=batch, num_columns=3 * dim, pooling=pooling)
    (got, _), (ref, _) = both(
        w, ids, offsets, None if psw is None else jnp.asarray(psw), feats, **kw
    )
    want, _ = numpy_pooled(w, ids, offsets, psw, feats, batch, 3 * dim, pooling)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", True)])
def test_low_precision_tables_accumulate_in_fp32_and_round_once(dtype, pooling, weighted):
    rng = np.random.default_rng(7)
    batch, rows, dim = 4, 10, 24
    ids, offsets = random_kjt(rng, 2, batch, 80, rows)  # bags up to 80: 16-bit sums drift
    psw = rng.normal(size=ids.shape).astype(np.float32) if weighted else None
    w = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    feats = ((0, 0, rows, 0), (1, 0, rows, dim))  # both features share one table
    kw = dict(batch_size=batch, num_columns=2 * dim, pooling=pooling)
    psw_arg = None if psw is None else jnp.asarray(psw)
    (got, _), (ref, _) = both(w, ids, offsets, psw_arg, feats, **kw)
    want, _ = numpy_pooled(w.astype(jnp.float32), ids, offsets, psw, feats, batch, 2 * dim, "sum")
    if pooling == "mean":  # a 16-bit MEAN rounds the sum once, then divides (torch's rule)
        lengths = np.maximum(np.diff(offsets), 1).reshape(2, batch).T.repeat(dim, axis=1)
        want = want.astype(dtype).astype(np.float64) / lengths
    assert got.dtype == ref.dtype == dtype
    assert_rounded_once(got, want, dtype)
    assert_rounded_once(ref, want, dtype)


def test_two_groups_of_different_dims_fill_one_poisoned_output():
    rng = np.random.default_rng(11)
    batch, rows = 7, 9
    ids, offsets = random_kjt(rng, 3, batch, 10, rows)
    w16 = jnp.asarray(rng.normal(size=(2 * rows, 16)), jnp.float32)
    w3 = jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32)
    g16 = ((0, 0, rows, 0), (2, rows, rows, 19))
    g3 = ((1, 0, rows, 16),)
    num_columns = 40  # columns 35..39 belong to no feature
    poisoned = jnp.full((batch, num_columns), jnp.nan, jnp.float32)
    kw = dict(batch_size=batch, num_columns=num_columns)
    ids_j, offs_j = jnp.asarray(ids), jnp.asarray(offsets)
    out, _ = pooled_lookup(w16, ids_j, offs_j, None, g16, out=poisoned, interpret=True, **kw)
    out, _ = pooled_lookup(w3, ids_j, offs_j, None, g3, out=out, interpret=True, **kw)
    ref, _ = pooled_lookup_reference(w16, ids_j, offs_j, None, g16, out=poisoned, **kw)
    ref, _ = pooled_lookup_reference(w3, ids_j, offs_j, None, g3, out=ref, **kw)
    want, _ = numpy_pooled(w16, ids, offsets, None, g16, batch, num_columns, "sum", poisoned)
    want, _ = numpy_pooled(w3, ids, offsets, None, g3, batch, num_columns, "sum", want)
    assert np.isfinite(np.asarray(out[:, :35])).all()
    assert np.isnan(np.asarray(out[:, 35:])).all()
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)


def test_uncovered_columns_are_zero_without_out():
    rng = np.random.default_rng(5)
    ids, offsets = random_kjt(rng, 1, 4, 5, 6)
    w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    (got, _), (ref, _) = both(w, ids, offsets, None, ((0, 0, 6, 2),), batch_size=4, num_columns=8)
    want, _ = numpy_pooled(w, ids, offsets, None, ((0, 0, 6, 2),), 4, 8, "sum")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)


def test_groups_chained_without_zero_fill_cover_every_column():
    rng = np.random.default_rng(23)
    batch, rows = 6, 11
    ids, offsets = random_kjt(rng, 2, batch, 9, rows)
    ids_j, offs_j = jnp.asarray(ids), jnp.asarray(offsets)
    w8 = jnp.asarray(rng.normal(size=(rows, 8)), jnp.float32)
    w5 = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
    g8, g5 = ((1, 0, rows, 0),), ((0, 0, rows, 8),)
    kw = dict(batch_size=batch, num_columns=13, interpret=True, fill_uncovered=False)
    out, _ = pooled_lookup(w8, ids_j, offs_j, None, g8, **kw)
    out, _ = pooled_lookup(w5, ids_j, offs_j, None, g5, out=out, **kw)
    want, _ = numpy_pooled(w8, ids, offsets, None, g8, batch, 13, "sum")
    want, _ = numpy_pooled(w5, ids, offsets, None, g5, batch, 13, "sum", want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["evict_first", "evict_last"])
def test_eviction_hints_do_not_change_results(policy):
    rng = np.random.default_rng(29)
    ids, offsets = random_kjt(rng, 1, 5, 12, 20, bad_frac=0.1)
    w = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    feats = ((0, 0, 20, 0),)
    got, bad = pooled_lookup(
        w,
        jnp.asarray(ids),
        jnp.asarray(offsets),
        None,
        feats,
        batch_size=5,
        num_columns=16,
        interpret=True,
        config=PooledConfig(block_len=32, eviction_policy=policy),
    )
    want, want_bad = numpy_pooled(w, ids, offsets, None, feats, 5, 16, "sum")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert int(bad) == want_bad


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(block_len=12), "block_len"),
        (dict(eviction_policy="evict_never"), "eviction_policy"),
        (dict(strategy="segmented", block_bags=4), "segmented"),
    ],
)
def test_bad_launch_shapes_are_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        PooledConfig(**fields)


@pytest.mark.parametrize("mode", ["warning", "fatal", "ignore"])
def test_out_of_range_ids_give_zero_rows_and_are_counted_by_mode(mode):
    rng = np.random.default_rng(len(mode))
    batch, rows, dim = 6, 7, 8
    ids, offsets = random_kjt(rng, 2, batch, 10, rows, bad_frac=0.3)
    w = jnp.asarray(rng.normal(size=(2 * rows, dim)), jnp.float32)
    feats = ((0, 0, rows, 0), (1, rows, rows, dim))
    (got, got_bad), (ref, ref_bad) = both(
        w,
        ids,
        offsets,
        None,
        feats,
        batch_size=batch,
        num_columns=2 * dim,
        pooling="mean",
        bounds_check=mode,
    )
    want, want_bad = numpy_pooled(w, ids, offsets, None, feats, batch, 2 * dim, "mean")
    assert want_bad > 0
    expected = 0 if mode == "ignore" else want_bad
    assert int(got_bad) == int(ref_bad) == expected
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6)


def test_bad_ids_in_other_features_are_not_counted():
    rng = np.random.default_rng(3)
    ids, offsets = random_kjt(rng, 2, 4, 6, 5)
    n = int(offsets[-1])
    ids[offsets[4] : n] = 99  # feature 1 (not in the group) holds only bad ids
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    (_, got_bad), (_, ref_bad) = both(
        w, ids, offsets, None, ((0, 0, 5, 0),), batch_size=4, num_columns=4
    )
    assert int(got_bad) == int(ref_bad) == 0


def test_no_bounds_check_matches_on_valid_ids():
    rng = np.random.default_rng(13)
    ids, offsets = random_kjt(rng, 1, 5, 8, 9)
    w = jnp.asarray(rng.normal(size=(9, 8)), jnp.float32)
    (got, got_bad), _ = both(
        w, ids, offsets, None, ((0, 0, 9, 0),), batch_size=5, num_columns=8, bounds_check="none"
    )
    want, _ = numpy_pooled(w, ids, offsets, None, ((0, 0, 9, 0),), 5, 8, "sum")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert int(got_bad) == 0


@pytest.mark.parametrize(
    "config",
    [
        PooledConfig(block_bags=1, block_len=8),
        PooledConfig(block_bags=4, block_len=2, num_warps=4),
        PooledConfig(block_bags=16, block_len=16, strategy="segmented"),
    ],
    ids=["one-bag", "four-bags", "segmented"],
)
def test_launch_shapes_agree_on_long_weighted_bags(config):
    rng = np.random.default_rng(config.block_bags)
    batch, rows, dim = 19, 50, 16
    ids, offsets = random_kjt(rng, 2, batch, 60, rows, bad_frac=0.05)
    psw = jnp.asarray(rng.normal(size=ids.shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    feats = ((1, 0, rows, 0), (0, 0, rows, dim))
    kw = dict(batch_size=batch, num_columns=2 * dim, pooling="mean")
    got, got_bad = pooled_lookup(
        w, jnp.asarray(ids), jnp.asarray(offsets), psw, feats, interpret=True, config=config, **kw
    )
    want, want_bad = numpy_pooled(w, ids, offsets, np.asarray(psw), feats, batch, 2 * dim, "mean")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert int(got_bad) == want_bad


def test_kernel_runs_under_jit_with_traced_inputs():
    rng = np.random.default_rng(17)
    ids, offsets = random_kjt(rng, 1, 3, 6, 4)
    w = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    feats = ((0, 0, 4, 0),)

    @jax.jit
    def f(w, ids, offsets):
        return pooled_lookup(
            w, ids, offsets, None, feats, batch_size=3, num_columns=8, interpret=True
        )

    got, _ = f(w, jnp.asarray(ids), jnp.asarray(offsets))
    want, _ = numpy_pooled(w, ids, offsets, None, feats, 3, 8, "sum")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(features=((0, 3, 4, 0),)), "rows"),
        (dict(features=((2, 0, 4, 0),)), "kjt_feature_index"),
        (dict(features=((0, 0, 4, 6),)), "num_columns"),
        (dict(pooling="max"), "pooling"),
        (dict(bounds_check="strict"), "bounds_check"),
        (dict(out=jnp.zeros((3, 9))), "out must have shape"),
        (dict(ids=jnp.zeros((4,), jnp.float32)), "ids"),
        (dict(batch_size=2), "offsets"),
    ],
)
def test_bad_static_arguments_raise_value_error_naming_them(change, match):
    args = dict(
        weights=jnp.zeros((6, 4)),
        ids=jnp.zeros((4,), jnp.int32),
        offsets=jnp.zeros((4,), jnp.int32),
        per_sample_weights=None,
        features=((0, 0, 4, 0),),
        batch_size=3,
        num_columns=8,
    )
    args.update(change)
    for fn in (pooled_lookup, pooled_lookup_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)
