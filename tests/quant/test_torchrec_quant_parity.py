"""jaxrec.quant.EmbeddingBagCollection against TorchRec's quantized EmbeddingBagCollection
(``torchrec.quant.embedding_modules``) on the CPU, from the same float tables.

TorchRec's INT4 rows are FBGEMM's ``FloatToFusedNBitRowwiseQuantizedSBHalf`` rows, as
jaxrec's: the outputs agree to float32 rounding. TorchRec's INT8 rows carry a float16 scale
and bias (before the values, rows padded for alignment), jaxrec's a float32 scale and bias
after them (FBGEMM's training layout): the quantizations differ, so the outputs are compared
within the sum of both quantization errors over a bag.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec.configs import DataType, PoolingType
from jaxrec.quant import EmbeddingBagCollection as QuantEBC

torch = pytest.importorskip("torch")
torchrec = pytest.importorskip("torchrec")
trq = pytest.importorskip("torchrec.quant.embedding_modules")

DIMS = {"t1": (20, 8, "SUM"), "t2": (15, 16, "MEAN")}
BATCH = 4


def _both(data_type):
    """(jaxrec quantized output, TorchRec quantized output, longest bag, largest row span)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, 2 * BATCH)
    values = rng.integers(0, 15, int(lengths.sum()))
    tables = [
        jaxrec.EmbeddingBagConfig(
            name=n,
            embedding_dim=d,
            num_embeddings=r,
            feature_names=[f"f{n[1]}"],
            pooling=PoolingType[p],
        )  # fmt: skip
        for n, (r, d, p) in DIMS.items()
    ]
    kjt = jaxrec.KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.asarray(values), lengths=jnp.asarray(lengths)
    )
    ebc = jaxrec.EmbeddingBagCollection(tables, backend="xla")
    variables = ebc.init(jax.random.key(1), kjt)
    qebc, qvariables = QuantEBC.from_float(ebc, variables, data_type)
    ours = np.asarray(qebc.apply(qvariables, kjt).values())

    t_ebc = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(
                name=n,
                embedding_dim=d,
                num_embeddings=r,
                feature_names=[f"f{n[1]}"],
                pooling=torchrec.PoolingType[p],
            )  # fmt: skip
            for n, (r, d, p) in DIMS.items()
        ]
    )
    floats = ebc.state_dict(variables)
    t_ebc.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in floats.items()})
    observer = torch.ao.quantization.PlaceholderObserver
    weight = {DataType.INT8: torch.qint8, DataType.INT4: torch.quint4x2}[data_type]
    t_ebc.qconfig = torch.ao.quantization.QConfig(
        activation=observer.with_args(dtype=torch.float), weight=observer.with_args(dtype=weight)
    )
    t_kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f2"], values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    theirs = trq.EmbeddingBagCollection.from_float(t_ebc)(t_kjt).values().detach().numpy()
    span = max(float(jnp.max(v.max(1) - v.min(1))) for v in floats.values())
    return ours, theirs, int(lengths.max()), span


def test_int4_outputs_equal_torchrecs():
    ours, theirs, _, _ = _both(DataType.INT4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_int8_outputs_within_both_quantization_errors_of_torchrecs():
    ours, theirs, longest, span = _both(DataType.INT8)
    # Each value is within half a step (span / 255, float16-rounded on TorchRec's side) of
    # the float table; a SUM bag adds up to ``longest`` such errors.
    step = span / 255 * (1 + 2.0**-10)
    diff = np.abs(ours - theirs).max()
    assert 0 < diff <= longest * step + 1e-6
