"""fp16/bf16 tables through the collections, on the XLA and Pallas (interpret) backends: a
pooled sum is the exact sum rounded once to a 16-bit output (within 1 ulp; summing in 16
bits drifts by several on these long bags), or float32-exact with a float32 output; the
sequence collection returns the stored rows bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ulp_assertions import assert_rounded_once

from jaxrec import (
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

DATA_TYPES = {jnp.float16: DataType.FP16, jnp.bfloat16: DataType.BF16}
BATCH, ROWS, DIM = 3, 12, 16


def long_bags(seed, weighted):
    """Two features, bags of 40..80 ids (one empty), optional per-sample weights."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 81, 2 * BATCH)
    lengths[1] = 0
    values = rng.integers(0, ROWS, int(lengths.sum()))
    weights = rng.normal(size=values.shape).astype(np.float32) if weighted else None
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=values, lengths=lengths, weights=weights)
    return kjt, values, lengths, weights


def exact_pooled(w, values, lengths, weights, pooling):
    """float64 [BATCH, 2 * DIM]: feature f then g, each over the same table ``w``."""
    w = np.asarray(w, np.float64)
    scale = np.ones(values.shape) if weights is None else np.asarray(weights, np.float64)
    bags = np.split(w[values] * scale[:, None], np.cumsum(lengths)[:-1])
    sums = np.stack([b.sum(axis=0) for b in bags])
    if pooling == PoolingType.MEAN:
        sums /= np.maximum(lengths, 1)[:, None]
    return np.concatenate([sums[:BATCH], sums[BATCH:]], axis=1)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_pooled_sum_rounds_the_exact_sum_once_to_a_16_bit_output(dtype, backend):
    kjt, values, lengths, weights = long_bags(seed=5, weighted=True)
    table = EmbeddingBagConfig(
        name="t",
        embedding_dim=DIM,
        num_embeddings=ROWS,
        feature_names=["f", "g"],
        data_type=DATA_TYPES[dtype],
    )
    ebc = EmbeddingBagCollection(
        tables=[table], is_weighted=True, backend=backend, output_dtype=dtype
    )
    variables = ebc.init(jax.random.key(0), kjt)
    out = ebc.apply(variables, kjt).values()
    w = ebc.state_dict(variables)["embedding_bags.t.weight"]
    assert out.dtype == w.dtype == dtype
    assert_rounded_once(out, exact_pooled(w, values, lengths, weights, PoolingType.SUM), dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_pooled_mean_of_16_bit_rows_is_float32_exact_with_a_float32_output(dtype, backend):
    kjt, values, lengths, _ = long_bags(seed=6, weighted=False)
    table = EmbeddingBagConfig(
        name="t",
        embedding_dim=DIM,
        num_embeddings=ROWS,
        feature_names=["f", "g"],
        data_type=DATA_TYPES[dtype],
        pooling=PoolingType.MEAN,
    )
    ebc = EmbeddingBagCollection(tables=[table], backend=backend, output_dtype=jnp.float32)
    variables = ebc.init(jax.random.key(0), kjt)
    out = ebc.apply(variables, kjt).values()
    w = ebc.state_dict(variables)["embedding_bags.t.weight"]
    want = exact_pooled(w, values, lengths, None, PoolingType.MEAN)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sequence_rows_of_16_bit_tables_are_returned_bit_for_bit(dtype, backend):
    kjt, values, lengths, _ = long_bags(seed=7, weighted=False)
    table = EmbeddingConfig(
        name="t",
        embedding_dim=DIM,
        num_embeddings=ROWS,
        feature_names=["f", "g"],
        data_type=DATA_TYPES[dtype],
    )
    ec = EmbeddingCollection(tables=[table], backend=backend, output_dtype=dtype)
    variables = ec.init(jax.random.key(0), kjt)
    out = ec.apply(variables, kjt)
    w = np.asarray(ec.state_dict(variables)["embeddings.t.weight"])
    split = int(lengths[:BATCH].sum())
    assert out["f"].values().dtype == dtype
    np.testing.assert_array_equal(np.asarray(out["f"].values())[:split], w[values[:split]])
    np.testing.assert_array_equal(np.asarray(out["g"].values()), w[values[split:]])
