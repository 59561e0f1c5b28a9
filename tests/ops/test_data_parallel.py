"""Fused updates under data parallelism: replicas combine sparse gradients, tables stay equal."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

KEYS, ROWS, DIMS, BATCH = ["fa", "fb"], [7, 5], [3, 2], 3


def tables():
    return [
        EmbeddingBagConfig(name="ta", embedding_dim=3, num_embeddings=7, feature_names=["fa"]),
        EmbeddingBagConfig(name="tb", embedding_dim=2, num_embeddings=5, feature_names=["fb"]),
    ]


def local_batch(rng, capacity):
    """One replica's KJT parts: values padded to `capacity`, lengths [F * BATCH]."""
    lengths = rng.integers(0, 4, (len(KEYS), BATCH))
    values = [rng.integers(0, ROWS[k], lengths[k].sum()) for k in range(len(KEYS))]
    flat = np.zeros(capacity, np.int32)
    real = np.concatenate(values)
    flat[: real.size] = real
    return flat, lengths.reshape(-1).astype(np.int32), values, lengths


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (forced host devices)")
def test_replicas_apply_the_update_of_the_whole_batch():
    rng = np.random.default_rng(0)
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.2)
    single = EmbeddingBagCollection(tables=tables(), optimizer=optimizer)
    replicated = EmbeddingBagCollection(
        tables=tables(), optimizer=optimizer, data_parallel_axis="data"
    )
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    capacity = 32

    def loss(module, params, kjt, g_out):
        return jnp.sum(module.apply({"params": params}, kjt).values() * g_out)

    def replica_step(params, values, lengths, g_out):
        kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths)
        grads = jax.grad(functools.partial(loss, replicated))(params, kjt, g_out)
        return jaxrec.optim.apply_updates(params, grads)

    sharded_step = jax.jit(
        jax.shard_map(
            replica_step,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )

    @jax.jit
    def single_step(params, kjt, g_out):
        grads = jax.grad(functools.partial(loss, single))(params, kjt, g_out)
        return jaxrec.optim.apply_updates(params, grads)

    parts = [local_batch(rng, capacity) for _ in range(2)]
    whole = KeyedJaggedTensor(
        keys=KEYS,
        values=np.concatenate([np.concatenate([p[2][k] for p in parts]) for k in range(2)]).astype(
            np.int32
        ),
        lengths=np.concatenate([np.concatenate([p[3][k] for p in parts]) for k in range(2)]).astype(
            np.int32
        ),
    )
    params = single.init(jax.random.key(0), whole)["params"]
    params_dp = params
    for _ in range(3):
        g_out = rng.normal(size=(2 * BATCH, sum(DIMS))).astype(np.float32)
        params = single_step(params, whole, jnp.asarray(g_out))
        params_dp = sharded_step(
            params_dp,
            jnp.asarray(np.concatenate([p[0] for p in parts])),
            jnp.asarray(np.concatenate([p[1] for p in parts])),
            jnp.asarray(g_out),
        )
    want, got = single.state_dict({"params": params}), single.state_dict({"params": params_dp})
    for name in want:
        np.testing.assert_allclose(
            np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5, atol=1e-6
        )
    assert float(params_dp["embedding_bags"]["sum_float32_d3"].step) == 3.0
