"""Differential tests against TorchRec on the CPU (skipped where torchrec does not import)."""

import jax
import numpy as np
import pytest

from jaxrec import (
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
