"""Static shard layout: equal per-device blocks, slots aligned across devices."""

import pytest

import jaxrec
from jaxrec import EmbeddingBagConfig, PoolingType
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.types import ShardingPlan, column_wise, data_parallel, row_wise, table_wise


def table(name, rows, dim, features, pooling=PoolingType.SUM):
    return EmbeddingBagConfig(
        name=name, num_embeddings=rows, embedding_dim=dim, feature_names=features, pooling=pooling
    )


TABLES = (
    table("a", 10, 4, ["fa", "fa2"]),
    table("b", 7, 4, ["fb"], PoolingType.MEAN),
    table("c", 5, 8, ["fc"]),
    table("d", 3, 4, ["fd"]),
)


def test_blocks_are_equal_and_shards_never_overlap():
    plan = ShardingPlan(
        {"a": table_wise(1), "b": row_wise(), "c": column_wise([0, 1]), "d": table_wise(1)}
    )
    layout = ShardedLayout.create(TABLES, plan, 2)
    # a row-split MEAN table runs as SUM on its owners (the source divides by the bag length),
    # so b's rows, c's 4-column shards, a and d share one group; rank 1 holds the most rows
    assert [(g.name, g.pooling, g.rows) for g in layout.groups] == [("sum_float32_d4", "sum", 21)]
    assert [(s.table, s.rank, s.local_row, s.num_rows) for s in layout.shards] == [
        ("a", 1, 0, 10),
        ("b", 0, 0, 4),
        ("b", 1, 10, 3),
        ("c", 0, 4, 5),
        ("c", 1, 13, 5),
        ("d", 1, 18, 3),
    ]


def test_slots_hold_one_shard_per_device_or_nothing():
    plan = ShardingPlan(
        {"a": table_wise(1), "b": row_wise(), "c": column_wise([0, 1]), "d": data_parallel()}
    )
    layout = ShardedLayout.create(TABLES, plan, 2)
    features = [f for f, _ in layout.features]
    assert layout.dp_tables == ("d",)
    reduce = [j for j, s in enumerate(layout.slots) if s.reduce]
    # one reduce-scatter slot per feature of the row-wise table, on both devices
    assert [layout.assignments[r][j] for j in reduce for r in range(2)] == [
        (features.index("fb"), 0),
        (features.index("fb"), 1),
    ]
    held = [h for row in layout.assignments for h in row if h is not None]
    assert len(held) == len(set(held)) == 2 + 2 + 2  # fa, fa2 on rank 1; c's shards; fb's


def test_per_table_optimizers_get_their_own_groups():
    sgd = jaxrec.optim.exact_sgd(learning_rate=0.1)
    plan = ShardingPlan({n.name: table_wise(0) for n in TABLES})
    layout = ShardedLayout.create(TABLES, plan, 2, optimizer=sgd, table_optimizers={"d": None})
    assert [(g.name, g.rows) for g in layout.groups] == [
        ("sum_float32_d4", 10),
        ("mean_float32_d4", 7),
        ("sum_float32_d8", 5),
        ("sum_float32_d4_o1", 3),
    ]
    assert [layout.group_optimizer(g) for g in range(4)] == [sgd, sgd, sgd, None]
    with pytest.raises(ValueError, match=r"unknown tables \['z'\]"):
        ShardedLayout.create(TABLES, plan, 2, table_optimizers={"z": None})


def test_bad_plans_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tables without a sharding \['d'\]"):
        ShardedLayout.create(TABLES, {"a": table_wise(0), "b": row_wise(), "c": row_wise()}, 2)
    plan = ShardingPlan({n.name: table_wise(0) for n in TABLES})
    with pytest.raises(ValueError, match="num_devices must be at least 1"):
        ShardedLayout.create(TABLES, plan, 0)
