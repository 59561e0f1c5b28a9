"""Differential tests against TorchRec on the CPU (skipped where torchrec does not import)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torchrec_twins import ebc_twins, ec_twins, random_jagged, run_twins

from jaxrec import DataType, EmbeddingBagCollection, PoolingType


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_ebc_matches_torchrec(pooling, weighted):
    if weighted and pooling is PoolingType.MEAN:
        pytest.skip("torch's CPU embedding_bag takes per-sample weights only with SUM")
    rng = np.random.default_rng(0)
    keys, rows = ["f1", "f2", "f3"], {"f1": 10, "f2": 7, "f3": 7}
    values, lengths = random_jagged(rng, keys, rows, 4, max_len=3)
    weights = rng.normal(size=values.shape).astype(np.float32) if weighted else None
    ours, theirs = ebc_twins(
        [("t1", 3, 10, ["f1"]), ("t2", 4, 7, ["f2", "f3"])], is_weighted=weighted, pooling=pooling
    )
    got, expected, _, _ = run_twins(ours, theirs, keys, values, lengths=lengths, weights=weights)
    assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
    np.testing.assert_allclose(
        np.asarray(got.values()), expected.values().detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_ec_matches_torchrec():
    ours, theirs = ec_twins([("t1", 3, 10, ["f1"]), ("t2", 3, 10, ["f2"])])
    values, offsets = np.arange(8), np.array([0, 2, 2, 3, 4, 5, 8])
    got, expected, _, _ = run_twins(ours, theirs, ["f1", "f2"], values, offsets=offsets)
    for key in ("f1", "f2"):
        np.testing.assert_allclose(
            np.asarray(got[key].values()), expected[key].values().detach().numpy(), rtol=1e-6
        )
        assert got[key].lengths().tolist() == expected[key].lengths().tolist()


def test_ebc_shared_feature_unnamed_table_and_extra_keys_match_torchrec():
    ours, theirs = ebc_twins([("a", 2, 6, ["f", "g"]), ("b", 3, 5, ["f"]), ("user", 2, 4, [])])
    keys = ["x", "user", "g", "f"]  # "x" is looked up by no table
    rows = {"x": 100, "user": 4, "g": 6, "f": 5}
    values, lengths = random_jagged(np.random.default_rng(1), keys, rows, 3, max_len=5)
    got, expected, _, _ = run_twins(ours, theirs, keys, values, lengths=lengths)
    assert got.keys() == expected.keys() == ["f@a", "g", "f@b", "user"]
    assert got.length_per_key() == expected.length_per_key()
    assert got.values().dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got.values()), expected.values().detach().numpy(), rtol=1e-6, atol=1e-7
    )


def test_ec_shared_feature_names_and_rows_match_torchrec():
    ours, theirs = ec_twins([("a", 2, 6, ["f", "g"]), ("b", 2, 5, ["f"])])
    keys, rows = ["g", "f"], {"g": 6, "f": 5}
    values, lengths = random_jagged(np.random.default_rng(2), keys, rows, 3, max_len=5)
    got, expected, _, _ = run_twins(ours, theirs, keys, values, lengths=lengths)
    assert list(got) == list(expected) == ["f@a", "g", "f@b"]
    assert ours.embedding_names_by_table() == theirs.embedding_names_by_table()
    for name in got:
        np.testing.assert_array_equal(
            np.asarray(got[name].values()), expected[name].values().detach().numpy()
        )


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_fp16_tables_match_torchrec_in_float32_and_when_asked_for_fp16(pooling):
    _, lengths = random_jagged(np.random.default_rng(3), ["f"], {"f": 40}, 64, max_len=5)
    lengths = lengths * 3  # long bags, so sums round
    values = np.random.default_rng(4).integers(0, 40, lengths.sum())
    ours, theirs = ebc_twins([("t", 16, 40, ["f"])], pooling=pooling, data_type=DataType.FP16)
    twins = run_twins(
        ours,
        theirs,
        ["f"],
        values,
        lengths=lengths,
        prepare=lambda v: jax.tree.map(lambda w: w * 8, v),  # rows of size ~1: sums round in fp16
    )
    got, expected = twins.got.values(), twins.expected.values().detach().numpy()
    assert got.dtype == jnp.float32 and expected.dtype == np.float32
    # TorchRec pools in fp16 and converts; jaxrec keeps the float32 sum: 1 fp16 ulp apart.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2**-10, atol=2**-14)
    ours16 = EmbeddingBagCollection(tables=ours.tables, output_dtype=jnp.float16)
    got16 = ours16.apply(twins.variables, twins.kjt).values()
    assert got16.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(got16), expected.astype(np.float16))
