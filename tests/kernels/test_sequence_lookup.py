"""Sequence lookup: the Pallas kernel (interpret mode) and the XLA reference against a NumPy
oracle, on fresh random inputs."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.sequence_lookup import (
    SequenceConfig,
    sequence_lookup,
    sequence_lookup_reference,
)
from random_kjt import random_kjt


def numpy_sequence(w, ids, offsets, features, batch):
    """Loop oracle: one row per position, zero outside the group, for bad ids and padding."""
    w = np.asarray(w, np.float64)
    out = np.zeros((ids.shape[0], w.shape[1]))
    bad = 0
    for kjt, row_offset, num_rows, _ in features:
        for i in range(offsets[kjt * batch], offsets[(kjt + 1) * batch]):
            if 0 <= ids[i] < num_rows:
                out[i] = w[row_offset + ids[i]]
            else:
                bad += 1
    return out, bad


@pytest.mark.parametrize("dim,dtype", [(3, jnp.float32), (24, jnp.bfloat16), (160, jnp.float16)])
@pytest.mark.parametrize("mode", ["warning", "ignore"])
def test_rows_match_numpy_oracle_for_odd_dims_and_bounds_modes(dim, dtype, mode):
    rng = np.random.default_rng(dim)
    batch, rows = 4, 7
    ids, offsets = random_kjt(rng, 4, batch, 6, rows, bad_frac=0.2)
    w = jnp.asarray(rng.normal(size=(2 * rows, dim)), dtype)
    feats = ((3, 0, rows, 0), (1, rows, rows, 0))  # features 0 and 2 belong to other groups
    args = (w, jnp.asarray(ids), jnp.asarray(offsets), feats)
    got, got_bad = sequence_lookup(*args, batch_size=batch, bounds_check=mode, interpret=True)
    ref, ref_bad = sequence_lookup_reference(*args, batch_size=batch, bounds_check=mode)
    want, want_bad = numpy_sequence(w.astype(jnp.float32), ids, offsets, feats, batch)
    chex.assert_shape(got, (ids.shape[0], dim))
    assert got.dtype == ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    np.testing.assert_array_equal(np.asarray(ref, np.float32), want)
    assert want_bad > 0
    assert int(got_bad) == int(ref_bad) == (want_bad if mode == "warning" else 0)


@pytest.mark.parametrize("block_ids,steps", [(1, 1), (8, 3), (64, 1)])
def test_launch_shapes_agree_with_shared_tables_under_jit(block_ids, steps):
    rng = np.random.default_rng(block_ids)
    batch, rows, dim = 5, 9, 16
    ids, offsets = random_kjt(rng, 3, batch, 9, rows)
    w = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    feats = ((0, 0, rows, 0), (2, 0, rows, 0))  # two features share one table

    @jax.jit
    def f(w, ids, offsets):
        return sequence_lookup(
            w,
            ids,
            offsets,
            feats,
            batch_size=batch,
            interpret=True,
            config=SequenceConfig(block_ids=block_ids, steps=steps),
            out_dtype=jnp.float32,
        )

    got, got_bad = f(w, jnp.asarray(ids), jnp.asarray(offsets))
    want, _ = numpy_sequence(w, ids, offsets, feats, batch)
    np.testing.assert_array_equal(got, want)
    assert int(got_bad) == 0


def test_no_bounds_check_matches_on_valid_ids():
    rng = np.random.default_rng(2)
    ids, offsets = random_kjt(rng, 1, 3, 7, 5)
    w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    got, _ = sequence_lookup(
        w,
        jnp.asarray(ids),
        jnp.asarray(offsets),
        ((0, 0, 5, 0),),
        batch_size=3,
        bounds_check="none",
        interpret=True,
    )
    want, _ = numpy_sequence(w, ids, offsets, ((0, 0, 5, 0),), 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(features=((0, 0, 4, 0), (0, 0, 4, 0))), "distinct"),
        (dict(features=((0, 5, 4, 0),)), "rows"),
        (dict(bounds_check="bogus"), "bounds_check"),
        (dict(weights=jnp.zeros((6, 4), jnp.int32)), "dtype"),
        (dict(out_dtype=jnp.int8), "dtype"),
    ],
)
def test_bad_static_arguments_raise_value_error_naming_them(change, match):
    args = dict(
        weights=jnp.zeros((6, 4)),
        ids=jnp.zeros((4,), jnp.int32),
        offsets=jnp.zeros((4,), jnp.int32),
        features=((0, 0, 4, 0),),
        batch_size=3,
    )
    args.update(change)
    for fn in (sequence_lookup, sequence_lookup_reference):
        with pytest.raises(ValueError, match=match):
            fn(**args)


@pytest.mark.parametrize("mode", ["warning", "ignore", "fatal"])
def test_blocks_inside_one_long_feature_and_across_features_agree_with_the_oracle(mode):
    # Features of ~100 ids and 8-id blocks: most blocks lie inside one feature (the scalar
    # fast path), some straddle two features or a feature of another group (the slow path).
    rng = np.random.default_rng(11)
    batch, rows = 4, 50
    ids, offsets = random_kjt(rng, 3, batch, 50, rows, bad_frac=0.1)
    w = jnp.asarray(rng.normal(size=(2 * rows, 16)), jnp.float32)
    feats = ((0, 0, rows, 0), (2, rows, rows, 0))  # feature 1 belongs to another group
    got, got_bad = sequence_lookup(
        w,
        jnp.asarray(ids),
        jnp.asarray(offsets),
        feats,
        batch_size=batch,
        bounds_check=mode,
        interpret=True,
        config=SequenceConfig(block_ids=8, steps=2),
    )
    want, want_bad = numpy_sequence(w, ids, offsets, feats, batch)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want_bad > 0
    assert int(got_bad) == (0 if mode == "ignore" else want_bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(block_ids=48), "SequenceConfig.block_ids must be a power of two, got 48"),
        (dict(block_ids=64.0), "SequenceConfig.block_ids must be a power of two, got 64.0"),
        (dict(steps=0), "SequenceConfig.steps must be >= 1, got 0"),
    ],
)
def test_config_refuses_bad_launch_shapes_naming_the_field(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SequenceConfig(**change)
