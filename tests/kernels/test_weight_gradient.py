"""Per-sample weight gradient: the Pallas kernel (interpret mode) and the XLA reference against
a NumPy loop oracle and against autodiff of the plain pooled lookup."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.pooled_lookup import pooled_lookup_reference
from jaxrec_kernels.weight_gradient import (
    WeightGradientConfig,
    weight_gradient,
    weight_gradient_reference,
)
from random_kjt import random_kjt


def numpy_weight_gradient(w, ids, offsets, g, features, batch, pooling):
    """Loop oracle following the documented rule literally."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    res = np.zeros(len(ids))
    dim = w.shape[1]
    for kjt, row_offset, num_rows, col in features:
        for b in range(batch):
            lo, hi = offsets[kjt * batch + b], offsets[kjt * batch + b + 1]
            for i in range(lo, hi):
                if 0 <= ids[i] < num_rows:
                    dot = w[row_offset + ids[i]] @ g[b, col : col + dim]
                    res[i] += dot / (max(hi - lo, 1) if pooling == "mean" else 1)
    return res


def both(*args, **kw):
    return weight_gradient(*args, interpret=True, **kw), weight_gradient_reference(*args, **kw)


@pytest.mark.parametrize("pooling,dim,seed", [("sum", 3, 0), ("mean", 40, 2)])
def test_matches_numpy_oracle_with_bad_ids_padding_and_a_feature_in_two_tables(pooling, dim, seed):
    rng = np.random.default_rng(seed)
    batch, rows = 5, 7
    ids, offsets = random_kjt(rng, 3, batch, 8, rows, bad_frac=0.2)
    w = jnp.asarray(rng.normal(size=(3 * rows, dim)), jnp.float32)
    # KJT feature 0 is read by two tables (rounds), feature 2 by none of this group.
    feats = ((0, 0, rows, 0), (1, rows, rows, dim), (0, 2 * rows, rows, 2 * dim))
    g = jnp.asarray(rng.normal(size=(batch, 3 * dim + 2)), jnp.float32)
    args = (w, jnp.asarray(ids), jnp.asarray(offsets), g, feats)
    got, ref = both(*args, batch_size=batch, pooling=pooling)
    want = numpy_weight_gradient(w, ids, offsets, g, feats, batch, pooling)
    assert got.shape == ref.shape == ids.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
    n = int(offsets[-1])
    assert not np.any(np.asarray(got)[n:])  # padding gets no gradient


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_equals_autodiff_of_the_weighted_pooled_lookup(pooling):
    rng = np.random.default_rng(4)
    batch, rows, dim = 6, 5, 8
    ids, offsets = random_kjt(rng, 2, batch, 6, rows, bad_frac=0.1)
    ids, offsets = jnp.asarray(ids), jnp.asarray(offsets)
    w = jnp.asarray(rng.normal(size=(2 * rows, dim)), jnp.float32)
    psw = jnp.asarray(rng.uniform(0.5, 1.5, ids.shape), jnp.float32)
    feats = ((0, 0, rows, dim), (1, rows, rows, 0))
    g = jnp.asarray(rng.normal(size=(batch, 2 * dim)), jnp.float32)

    def loss(p):
        out, _ = pooled_lookup_reference(
            w, ids, offsets, p, feats, batch_size=batch, num_columns=2 * dim, pooling=pooling
        )
        return jnp.sum(out * g)

    want = jax.grad(loss)(psw)
    got, ref = both(w, ids, offsets, g, feats, batch_size=batch, pooling=pooling)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16_bit_tables_and_cotangents_accumulate_in_fp32(dtype):
    rng = np.random.default_rng(5)
    batch, rows, dim = 4, 6, 24
    ids, offsets = random_kjt(rng, 1, batch, 9, rows)
    w = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    g = jnp.asarray(rng.normal(size=(batch, dim)), dtype)
    args = (w, jnp.asarray(ids), jnp.asarray(offsets), g, ((0, 0, rows, 0),))
    got, ref = both(*args, batch_size=batch)
    # The oracle sees the same 16-bit values, so only the fp32 sum order differs.
    want = numpy_weight_gradient(np.float32(w), ids, offsets, np.float32(g), args[4], batch, "sum")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)


def test_out_accumulates_several_groups_and_small_blocks_cover_every_position():
    rng = np.random.default_rng(6)
    batch, rows, dim = 3, 4, 6
    ids, offsets = random_kjt(rng, 2, batch, 5, rows)
    ids, offsets = jnp.asarray(ids), jnp.asarray(offsets)
    w1 = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(rows, 2 * dim)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, 3 * dim)), jnp.float32)
    first = ((0, 0, rows, 0),)
    second = ((1, 0, rows, dim),)
    kw = dict(batch_size=batch, interpret=True, config=WeightGradientConfig(block_ids=4))
    acc = weight_gradient(w1, ids, offsets, g, first, **kw)
    acc = weight_gradient(w2, ids, offsets, g, second, out=acc, **kw)
    want = numpy_weight_gradient(w1, ids, offsets, g, first, batch, "sum")
    want += numpy_weight_gradient(w2, ids, offsets, g, second, batch, "sum")
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_with_the_argument_named():
    w = jnp.ones((4, 2))
    ids = jnp.zeros(3, jnp.int32)
    offs = jnp.array([0, 1, 3], jnp.int32)
    feats = ((0, 0, 4, 0),)
    with pytest.raises(ValueError, match="grad_out"):
        weight_gradient_reference(w, ids, offs, jnp.ones((3, 2)), feats, batch_size=2)
    with pytest.raises(ValueError, match="exceed"):
        weight_gradient_reference(w, ids, offs, jnp.ones((2, 2)), ((0, 0, 4, 1),), batch_size=2)
    with pytest.raises(ValueError, match="pooling"):
        weight_gradient(w, ids, offs, jnp.ones((2, 2)), feats, batch_size=2, pooling="max")
    with pytest.raises(ValueError, match="out must be"):
        weight_gradient(w, ids, offs, jnp.ones((2, 2)), feats, batch_size=2, out=jnp.ones(2))
    with pytest.raises(ValueError, match="block_ids"):
        WeightGradientConfig(block_ids=3)


def test_gpu_check_weights_section_runs_on_small_shapes(tmp_path):
    from benchmarks import gpu_check_backward

    argv = ["--small", "--interpret", "--limit", "2", "--sections", "weights"]
    assert gpu_check_backward.main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check_backward.json").read_text())["weights"]
    assert len(record["checks"]) == 2 and record["ok"]
    assert record["timing"]["pallas_ms"] > 0 and record["timing"]["bytes"] > 0
