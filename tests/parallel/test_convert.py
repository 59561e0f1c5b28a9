"""Single-device params ↔ sharded layout, both ways, with optimizer state."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from jaxrec.optim.fused import FusedTableParams
from jaxrec.parallel.convert import (
    partition_specs,
    shard_params,
    shard_tables,
    table_states,
    unshard_params,
)
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.types import (
    ShardingPlan,
    column_wise,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)

TABLES = [
    EmbeddingBagConfig(name="a", num_embeddings=11, embedding_dim=4, feature_names=["fa"]),
    EmbeddingBagConfig(name="b", num_embeddings=6, embedding_dim=6, feature_names=["fb"]),
    EmbeddingBagConfig(name="c", num_embeddings=9, embedding_dim=4, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", num_embeddings=5, embedding_dim=4, feature_names=["fd"]),
]
PLAN = ShardingPlan(
    {
        "a": row_wise(),
        "b": column_wise([2, 0, 2]),
        "c": table_row_wise([1, 3]),
        "d": data_parallel(),
    }
)


def random_params(optimizer, overrides=None):
    ebc = EmbeddingBagCollection(tables=TABLES, optimizer=optimizer, table_optimizers=overrides)
    kjt = KeyedJaggedTensor(
        keys=["fa", "fb", "fc", "fd"], values=[0, 1, 2, 3], lengths=[1, 1, 1, 1]
    )
    params = ebc.init(jax.random.key(0), kjt)["params"]["embedding_bags"]
    # distinct values everywhere, optimizer state and step included
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    return ebc, jax.tree.unflatten(
        tree, [rng.normal(size=np.shape(x)).astype(np.float32) for x in leaves]
    )


@pytest.mark.parametrize(
    "optimizer",
    [None, jaxrec.optim.exact_rowwise_adagrad(), jaxrec.optim.adam()],
    ids=["plain", "rowwise-adagrad", "adam"],
)
def test_round_trip_keeps_every_table_and_state(optimizer):
    ebc, params = random_params(optimizer, {"c": None} if optimizer is not None else None)
    layout = ShardedLayout.create(
        TABLES,
        PLAN,
        4,
        optimizer=optimizer,
        table_optimizers={"c": None} if optimizer is not None else None,
    )
    sharded = shard_params(layout, params)
    for group, entry in sharded["shards"].items():
        weight = entry.weight if isinstance(entry, FusedTableParams) else entry
        rows = next(g.rows for g in layout.groups if g.name == group)
        assert weight.shape[0] == 4 * rows
    back = unshard_params(layout, sharded)
    for name in ("a", "b", "c", "d"):
        want, got = table_states(ebc.plan, params)[name], table_states(ebc.plan, back)[name]
        np.testing.assert_array_equal(got.weight, want.weight)
        if want.state is not None:
            for key in want.state:
                np.testing.assert_array_equal(got.state[key], want.state[key])
            np.testing.assert_array_equal(got.step, want.step)


def test_partition_specs_split_the_blocks_and_replicate_the_rest():
    opt = jaxrec.optim.exact_rowwise_adagrad()
    layout = ShardedLayout.create(TABLES, PLAN, 4, optimizer=opt)
    specs = partition_specs(layout, "x")
    entry = specs["shards"]["sum_float32_d4"]
    assert entry.weight == P("x", None) and entry.state == {"momentum1": P("x")}
    assert entry.step == P() and entry.uses == P()
    assert specs["replicated"]["sum_float32_d4"].weight == P()
    # the specs fit the params' structure
    _, params = random_params(opt)
    jax.tree.map(
        lambda s, x: None, specs, shard_params(layout, params), is_leaf=lambda s: isinstance(s, P)
    )


def test_wrong_tables_are_refused_by_name():
    layout = ShardedLayout.create(
        TABLES, {"a": table_wise(0), "b": table_wise(0), "c": table_wise(0), "d": table_wise(0)}, 2
    )
    _, params = random_params(None)
    states = table_states(layout.single_plan, params)
    with pytest.raises(ValueError, match=r"no arrays for tables \['d'\]"):
        shard_tables(layout, {k: v for k, v in states.items() if k != "d"})
    bad = dict(states, b=type(states["b"])(weight=np.zeros((6, 5))))
    with pytest.raises(
        ValueError, match=r"table 'b': weight has shape \(6, 5\), expected \(6, 6\)"
    ):
        shard_tables(layout, bad)
