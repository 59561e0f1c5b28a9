"""Column-wise sharding with a row-wise optimizer keeps per-shard row statistics (as
TorchRec does): each column shard's row-wise Adagrad accumulates the mean of the squared
gradient over its own columns, so the result differs from one device's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from jaxrec.parallel import ShardedLayout, ShardedLookupSpec, ShardingPlan, column_wise
from jaxrec.parallel.convert import partition_specs, shard_params, table_states, unshard_params
from jaxrec.parallel.sharded_lookup import sharded_lookup

N, B, ROWS, DIM, LR, EPS = 2, 4, 7, 6, 0.5, 1e-8
SPLIT = (2, 4)  # columns of shard 0 and shard 1 (uneven, so the two means differ in kind)

pytestmark = pytest.mark.skipif(len(jax.devices()) < N, reason="needs 2 (forced host) devices")


def test_column_shards_keep_their_own_rowwise_adagrad_statistics():
    table = EmbeddingBagConfig(
        name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f"]
    )
    opt = jaxrec.optim.exact_rowwise_adagrad(learning_rate=LR, eps=EPS)
    plan = ShardingPlan({"t": column_wise([0, 1], sizes=list(SPLIT))})
    layout = ShardedLayout.create([table], plan, N, optimizer=opt)
    spec = ShardedLookupSpec.create(layout, ("f",), batch_size=B, axis="x", backend="xla")
    ebc = EmbeddingBagCollection(tables=[table], optimizer=opt)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4, (N, B)).astype(np.int32)
    ids = [rng.integers(0, ROWS, n).astype(np.int32) for n in lengths.sum(1)]
    capacity = int(lengths.sum(1).max())
    values = np.stack([np.pad(v, (0, capacity - v.size)) for v in ids])
    whole = KeyedJaggedTensor(["f"], np.concatenate(ids), lengths=lengths.reshape(-1))
    params = ebc.init(jax.random.key(0), whole)["params"]
    before = np.asarray(table_states(ebc.plan, params["embedding_bags"])["t"].weight)
    g = rng.normal(size=(N * B, DIM)).astype(np.float32)
    tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=False)

    def step(p, v, n, g):
        offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n)]).astype(jnp.int32)
        loss = lambda p: jnp.sum(sharded_lookup(spec, p, v, offsets, None)[0] * g)  # noqa: E731
        updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
        return jaxrec.optim.apply_updates(p, updates)

    specs = partition_specs(layout, "x")
    smap = functools.partial(jax.shard_map, mesh=Mesh(np.array(jax.devices()[:N]), ("x",)))
    run = jax.jit(smap(step, in_specs=(specs, P("x"), P("x"), P("x")), out_specs=specs,
                       check_vma=False))  # fmt: skip
    sharded = run(shard_params(layout, params["embedding_bags"]), values.reshape(-1),
                  lengths.reshape(-1), g)  # fmt: skip
    got = table_states(layout.single_plan, unshard_params(layout, sharded))["t"].weight

    # each row's gradient: the sum of the output gradients of the bags that hold it
    grad = np.zeros((ROWS, DIM))
    bags = np.repeat(np.arange(N * B), lengths.reshape(-1))
    np.add.at(grad, np.concatenate(ids), g[bags])
    touched = np.unique(np.concatenate(ids))

    def rowwise_adagrad(columns):  # one step from zero state over ``columns`` only
        w, gc = before[:, columns].copy(), grad[:, columns]
        s = np.mean(gc * gc, axis=1, keepdims=True)
        w[touched] -= (LR * gc / (np.sqrt(s) + EPS))[touched]
        return w

    cuts = np.cumsum((0, *SPLIT))
    per_shard = np.concatenate(
        [rowwise_adagrad(np.arange(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)], 1
    )
    one_device = rowwise_adagrad(np.arange(DIM))
    np.testing.assert_allclose(np.asarray(got), per_shard, rtol=1e-6, atol=1e-6)
    assert np.abs(per_shard - one_device).max() > 1e-3  # the statistics do differ
