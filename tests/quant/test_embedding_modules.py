"""Quantized EmbeddingBagCollection: from a float collection, within the quantization bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec.configs import DataType, PoolingType
from jaxrec.quant import EmbeddingBagCollection as QuantEBC

TABLES = [
    jaxrec.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=20, feature_names=["f1"]),
    jaxrec.EmbeddingBagConfig(
        name="t2",
        embedding_dim=6,
        num_embeddings=15,
        feature_names=["f2"],
        pooling=PoolingType.MEAN,
    ),
]


def setup(backend="xla", weighted=False):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, 2 * 4)
    values = rng.integers(0, 15, int(lengths.sum()))
    w = jnp.asarray(rng.uniform(0.5, 1.5, values.shape), jnp.float32) if weighted else None
    kjt = jaxrec.KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.asarray(values), lengths=jnp.asarray(lengths), weights=w
    )
    ebc = jaxrec.EmbeddingBagCollection(TABLES, is_weighted=weighted, backend=backend)
    variables = ebc.init(jax.random.key(1), kjt)
    return ebc, variables, kjt, lengths, w


@pytest.mark.parametrize("data_type", ["INT8", "INT4", "FP16"])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_outputs_within_the_quantization_bound_of_the_float_collection(data_type, backend):
    ebc, variables, kjt, lengths, _ = setup(backend)
    qebc, qvariables = QuantEBC.from_float(ebc, variables, DataType(data_type))
    got = np.asarray(qebc.apply(qvariables, kjt).values())
    want = np.asarray(ebc.apply(variables, kjt).values())
    floats = ebc.state_dict(variables)
    deq = qebc.state_dict(qvariables, dequantize=True)
    # Per-element table error; a SUM bag adds up to max-length errors, a MEAN bag averages.
    err = max(float(jnp.abs(deq[k] - floats[k]).max()) for k in floats)
    if data_type != "FP16":
        scales = [
            np.asarray(
                v[:, -8:-4].view(np.float32)
                if data_type == "INT8"
                else v[:, -4:-2].view(np.float16),
                np.float64,
            )
            for v in map(np.asarray, qebc.state_dict(qvariables).values())
        ]
        half_step = max(float(s.max()) for s in scales) / 2
        assert err <= half_step * (1 + 2.0**-10) + 1e-6
    assert np.abs(got - want).max() <= int(lengths.max()) * err + 1e-5
    assert np.abs(got - want).max() > 0 or data_type == "FP16"


def test_state_dict_gives_the_quantized_bytes_and_dequantizes_on_request():
    ebc, variables, kjt, _, _ = setup()
    qebc, qvariables = QuantEBC.from_float(ebc, variables, "int4")
    raw = qebc.state_dict(qvariables)
    assert raw["embedding_bags.t1.weight"].dtype == jnp.uint8
    assert raw["embedding_bags.t1.weight"].shape == (20, 4 + 4)
    assert qebc.state_dict(qvariables, dequantize=True)["embedding_bags.t2.weight"].shape == (15, 6)


def test_weighted_lookup_and_kernel_match_reference():
    ebc, variables, kjt, _, _ = setup(weighted=True)
    qx, qv = QuantEBC.from_float(ebc, variables, DataType.INT8)
    qp, _ = QuantEBC.from_float(ebc, variables, DataType.INT8, backend="pallas")
    np.testing.assert_allclose(
        qp.apply(qv, kjt).values(), qx.apply(qv, kjt).values(), rtol=0, atol=1e-5
    )


def test_bad_data_type_and_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="data_type must be one of"):
        QuantEBC(TABLES, data_type="FP32")
    ebc, variables, kjt, _, _ = setup()
    qebc, qv = QuantEBC.from_float(ebc, variables)
    bad = jaxrec.KeyedJaggedTensor(keys=["zz"], values=jnp.array([1]), lengths=jnp.array([1]))
    with pytest.raises(ValueError):
        qebc.apply(qv, bad)
