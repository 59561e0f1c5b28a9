"""The output distribution's transpose (the backward's gradient distribution): it moves the
gradients back with scatters of distinct columns, never an atomic scatter-add."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrec.configs import EmbeddingBagConfig, PoolingType
from jaxrec.parallel import ShardedLayout, ShardedLookupSpec
from jaxrec.parallel.sharded_lookup import distribute_output
from jaxrec.parallel.types import ShardingPlan, column_wise, data_parallel, row_wise, table_wise

N, B = 2, 3
KEYS = ("fa", "fb", "fc", "fd")
TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=9, feature_names=["fa"]),
    EmbeddingBagConfig(
        name="b", embedding_dim=4, num_embeddings=8, feature_names=["fb"], pooling=PoolingType.MEAN
    ),
    EmbeddingBagConfig(name="c", embedding_dim=6, num_embeddings=5, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", embedding_dim=2, num_embeddings=5, feature_names=["fd"]),
]
PLAN = {"a": table_wise(1), "b": row_wise(), "c": column_wise([0, 1]), "d": data_parallel()}


@pytest.mark.skipif(len(jax.devices()) < N, reason="needs 2 (forced host) devices")
def test_gradient_distribution_scatters_distinct_columns_and_is_the_exact_transpose():
    layout = ShardedLayout.create(TABLES, ShardingPlan(PLAN), N)
    spec = ShardedLookupSpec.create(layout, KEYS, batch_size=B, axis="x", backend="xla")
    mesh = Mesh(np.array(jax.devices()[:N]), ("x",))
    width = layout.local_plan.num_columns
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4, (N, len(KEYS) * B))
    offsets = np.concatenate([np.zeros((N, 1), int), np.cumsum(lengths, axis=1)], axis=1)
    offsets = jnp.asarray(offsets.reshape(-1).astype(np.int32))
    dp_width = layout.dp_plan.num_columns
    owner = jnp.asarray(rng.normal(size=(N * B, width)), jnp.float32)
    dp = jnp.asarray(rng.normal(size=(N * B, dp_width)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(N * B, layout.single_plan.num_columns)), jnp.float32)

    def forward(x, d, o):
        return distribute_output(spec, x, o, d)

    def transpose(g, x, d, o):
        return jax.linear_transpose(lambda x, d: forward(x, d, o), x, d)(g)

    smap = jax.shard_map(
        transpose, mesh=mesh, in_specs=(P("x"),) * 4, out_specs=(P("x"), P("x")), check_vma=False
    )
    fwd = jax.shard_map(
        forward, mesh=mesh, in_specs=(P("x"),) * 3, out_specs=P("x"), check_vma=False
    )
    text = jax.jit(smap).lower(g, owner, dp, offsets).as_text()
    scatters = re.findall(r"stablehlo\.scatter.*?unique_indices = (\w+)", text, re.S)
    assert scatters and set(scatters) == {"true"}
    # <g, forward(x, d)> == <transpose(g), (x, d)>: the transpose is exact
    gx, gd = jax.jit(smap)(g, owner, dp, offsets)
    lhs = jnp.vdot(g, jax.jit(fwd)(owner, dp, offsets))
    rhs = jnp.vdot(gx, owner) + jnp.vdot(gd, dp)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
