"""Differential test against FBGEMM's CPU TBE (skipped where fbgemm_gpu does not import).

FBGEMM's CPU path implements EXACT_SGD, EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD; each is
run for a few steps on the same tables, ids and output gradients as jaxrec's fused update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

torch = pytest.importorskip("torch")
fbgemm_training = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
fbgemm_common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
fbgemm_configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")

ROWS, DIM, BATCH, TABLES = 20, 8, 4, 2
OPTIMIZERS = {
    "EXACT_SGD": lambda lr, eps: jaxrec.optim.exact_sgd(learning_rate=lr),
    "EXACT_ADAGRAD": lambda lr, eps: jaxrec.optim.exact_adagrad(learning_rate=lr, eps=eps),
    "EXACT_ROWWISE_ADAGRAD": lambda lr, eps: jaxrec.optim.exact_rowwise_adagrad(
        learning_rate=lr, eps=eps
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_updates_match_fbgemm_cpu(name):
    rng = np.random.default_rng(0)
    lr, eps = 0.1, 1e-8
    tbe = fbgemm_training.SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[
            (ROWS, DIM, fbgemm_common.EmbeddingLocation.HOST, fbgemm_training.ComputeDevice.CPU)
            for _ in range(TABLES)
        ],
        optimizer=getattr(fbgemm_configs.EmbOptimType, name),
        learning_rate=lr,
        eps=eps,
        pooling_mode=fbgemm_common.PoolingMode.SUM,
    )
    keys = [f"f{t}" for t in range(TABLES)]
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t{t}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[keys[t]]
            )
            for t in range(TABLES)
        ],
        optimizer=OPTIMIZERS[name](lr, eps),
    )
    lengths = rng.integers(0, 5, TABLES * BATCH)
    values = rng.integers(0, ROWS, lengths.sum())
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    params = ebc.init(jax.random.key(0), kjt)["params"]
    with torch.no_grad():
        for t, weight in enumerate(tbe.split_embedding_weights()):
            weight.copy_(
                torch.as_tensor(
                    np.asarray(ebc.state_dict({"params": params})[f"embedding_bags.t{t}.weight"])
                )
            )
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    for _ in range(4):
        g_out = rng.normal(size=(BATCH, TABLES * DIM)).astype(np.float32)
        tbe(torch.as_tensor(values, dtype=torch.int64), offsets).backward(torch.as_tensor(g_out))
        grads = jax.grad(lambda p, g=g_out: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(
            params
        )
        params = jaxrec.optim.apply_updates(params, grads)
    ours = ebc.state_dict({"params": params})
    for t, weight in enumerate(tbe.split_embedding_weights()):
        np.testing.assert_allclose(
            np.asarray(ours[f"embedding_bags.t{t}.weight"]),
            weight.detach().numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
