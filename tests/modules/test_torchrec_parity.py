"""Differential tests against TorchRec on the CPU (skipped where torchrec does not import)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import (
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

torch = pytest.importorskip("torch")
torchrec = pytest.importorskip("torchrec")


def _torch_kjt(keys, values, lengths, weights=None):
    return torchrec.KeyedJaggedTensor(
        keys=keys,
        values=torch.as_tensor(values, dtype=torch.int64),
        lengths=torch.as_tensor(lengths, dtype=torch.int64),
        weights=None if weights is None else torch.as_tensor(weights),
    )


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_ebc_matches_torchrec(pooling, weighted):
    if weighted and pooling is PoolingType.MEAN:
        pytest.skip("torch's CPU embedding_bag takes per-sample weights only with SUM")
    rng = np.random.default_rng(0)
    specs = [("t1", 3, 10, ["f1"]), ("t2", 4, 7, ["f2", "f3"])]
    keys, batch = ["f1", "f2", "f3"], 4
    rows = {"f1": 10, "f2": 7, "f3": 7}
    lengths = rng.integers(0, 4, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[i * batch : (i + 1) * batch].sum())
            for i, k in enumerate(keys)
        ]
    )
    weights = rng.normal(size=values.shape).astype(np.float32) if weighted else None

    ours = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=n, embedding_dim=d, num_embeddings=r, feature_names=f, pooling=pooling
            )
            for n, d, r, f in specs
        ],
        is_weighted=weighted,
    )
    theirs = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(
                name=n,
                embedding_dim=d,
                num_embeddings=r,
                feature_names=f,
                pooling=getattr(torchrec.PoolingType, pooling.name),
            )
            for n, d, r, f in specs
        ],
        is_weighted=weighted,
    )
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
    variables = ours.init(jax.random.key(0), kjt)
    theirs.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in ours.state_dict(variables).items()}
    )
    expected = theirs(_torch_kjt(keys, values, lengths, weights))
    got = ours.apply(variables, kjt)
    assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
    np.testing.assert_allclose(
        np.asarray(got.values()), expected.values().detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_ec_matches_torchrec():
    specs = [("t1", 3, 10, ["f1"]), ("t2", 3, 10, ["f2"])]
    values, offsets = np.arange(8), np.array([0, 2, 2, 3, 4, 5, 8])
    ours = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    theirs = torchrec.EmbeddingCollection(
        tables=[
            torchrec.EmbeddingConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=values, offsets=offsets)
    variables = ours.init(jax.random.key(0), kjt)
    theirs.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in ours.state_dict(variables).items()}
    )
    expected = theirs(
        torchrec.KeyedJaggedTensor(
            keys=["f1", "f2"], values=torch.as_tensor(values), offsets=torch.as_tensor(offsets)
        )
    )
    got = ours.apply(variables, kjt)
    for key in ("f1", "f2"):
        np.testing.assert_allclose(
            np.asarray(got[key].values()), expected[key].values().detach().numpy(), rtol=1e-6
        )
        assert got[key].lengths().tolist() == expected[key].lengths().tolist()


def _random_kjt(keys, rows, batch, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[i * batch : (i + 1) * batch].sum())
            for i, k in enumerate(keys)
        ]
    )
    return values, lengths


def _load_into_torchrec(theirs, ours, variables):
    theirs.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in ours.state_dict(variables).items()}
    )


def test_ebc_shared_feature_unnamed_table_and_extra_keys_match_torchrec():
    specs = [("a", 2, 6, ["f", "g"]), ("b", 3, 5, ["f"]), ("user", 2, 4, [])]
    keys = ["x", "user", "g", "f"]  # "x" is looked up by no table
    rows = {"x": 100, "user": 4, "g": 6, "f": 5}
    values, lengths = _random_kjt(keys, rows, 3, seed=1)
    ours = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    theirs = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    variables = ours.init(jax.random.key(0), kjt)
    _load_into_torchrec(theirs, ours, variables)
    expected = theirs(_torch_kjt(keys, values, lengths))
    got = ours.apply(variables, kjt)
    assert got.keys() == expected.keys() == ["f@a", "g", "f@b", "user"]
    assert got.length_per_key() == expected.length_per_key()
    assert got.values().dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(got.values()), expected.values().detach().numpy(), rtol=1e-6, atol=1e-7
    )


def test_ec_shared_feature_names_and_rows_match_torchrec():
    specs = [("a", 2, 6, ["f", "g"]), ("b", 2, 5, ["f"])]
    keys, rows = ["g", "f"], {"g": 6, "f": 5}
    values, lengths = _random_kjt(keys, rows, 3, seed=2)
    ours = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    theirs = torchrec.EmbeddingCollection(
        tables=[
            torchrec.EmbeddingConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f)
            for n, d, r, f in specs
        ]
    )
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    variables = ours.init(jax.random.key(0), kjt)
    _load_into_torchrec(theirs, ours, variables)
    expected = theirs(_torch_kjt(keys, values, lengths))
    got = ours.apply(variables, kjt)
    assert list(got) == list(expected) == ["f@a", "g", "f@b"]
    assert ours.embedding_names_by_table() == theirs.embedding_names_by_table()
    for name in got:
        np.testing.assert_array_equal(
            np.asarray(got[name].values()), expected[name].values().detach().numpy()
        )


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_fp16_tables_match_torchrec_in_float32_and_when_asked_for_fp16(pooling):
    keys, rows = ["f"], {"f": 40}
    values, lengths = _random_kjt(keys, rows, 64, seed=3)
    lengths = lengths * 3  # long bags, so sums round
    values = np.random.default_rng(4).integers(0, 40, lengths.sum())
    config = dict(name="t", embedding_dim=16, num_embeddings=40, feature_names=["f"])
    tables = [EmbeddingBagConfig(**config, pooling=pooling, data_type=DataType.FP16)]
    ours, ours16 = (
        EmbeddingBagCollection(tables=tables),
        EmbeddingBagCollection(tables=tables, output_dtype=jnp.float16),
    )
    theirs = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(
                **config,
                pooling=getattr(torchrec.PoolingType, pooling.name),
                data_type=torchrec.DataType.FP16,
            )
        ]
    )
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    variables = ours.init(jax.random.key(0), kjt)
    variables = jax.tree.map(lambda w: w * 8, variables)  # rows of size ~1: sums round in fp16
    _load_into_torchrec(theirs, ours, variables)
    expected = theirs(_torch_kjt(keys, values, lengths)).values().detach().numpy()
    got = ours.apply(variables, kjt).values()
    assert got.dtype == jnp.float32 and expected.dtype == np.float32
    # TorchRec pools in fp16 and converts; jaxrec keeps the float32 sum: 1 fp16 ulp apart.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2**-10, atol=2**-14)
    got16 = ours16.apply(variables, kjt).values()
    assert got16.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(got16), expected.astype(np.float16))
