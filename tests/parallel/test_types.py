"""Sharding types, per-table shardings and plans: shards and the errors of bad plans."""

import pytest

from jaxrec import EmbeddingBagConfig
from jaxrec.parallel.types import (
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    column_wise,
    data_parallel,
    row_wise,
    table_column_wise,
    table_row_wise,
    table_wise,
)

T = EmbeddingBagConfig(name="t", embedding_dim=6, num_embeddings=10, feature_names=["f"])


def pieces(sharding, devices=4):
    return [(s.shard_offsets, s.shard_sizes, s.placement) for s in sharding.shards(T, devices)]


def test_values_are_torchrec_strings():
    assert [t.value for t in ShardingType] == [
        "data_parallel",
        "table_wise",
        "column_wise",
        "row_wise",
        "table_row_wise",
        "table_column_wise",
    ]
    assert ShardingType("row_wise") is ShardingType.ROW_WISE
    assert ParameterSharding("table_wise", (1,)).sharding_type is ShardingType.TABLE_WISE


def test_shards_of_each_type():
    assert pieces(table_wise(2)) == [((0, 0), (10, 6), 2)]
    assert pieces(row_wise(sizes=[1, 2, 3, 4])) == [
        ((0, 0), (1, 6), 0),
        ((1, 0), (2, 6), 1),
        ((3, 0), (3, 6), 2),
        ((6, 0), (4, 6), 3),
    ]
    assert pieces(table_row_wise([3, 1])) == [((0, 0), (5, 6), 3), ((5, 0), (5, 6), 1)]
    assert pieces(column_wise([0, 0, 2])) == [
        ((0, 0), (10, 2), 0),
        ((0, 2), (10, 2), 0),
        ((0, 4), (10, 2), 2),
    ]
    assert pieces(table_column_wise([1, 3], sizes=[5, 1])) == [
        ((0, 0), (10, 5), 1),
        ((0, 5), (10, 1), 3),
    ]
    assert pieces(data_parallel()) == []


@pytest.mark.parametrize(
    ("sharding", "message"),
    [
        (table_wise(4), "rank 4 is outside the 4 devices"),
        (ParameterSharding(ShardingType.TABLE_WISE, (0, 1)), "exactly one rank"),
        (row_wise([0, 0]), r"repeat a rank"),
        (row_wise(sizes=[5, 5, 1, 1]), r"sum to the table's 10 rows"),
        (column_wise([0, 1], sizes=[6]), "1 sizes for 2 ranks"),
        (column_wise([0, 1], sizes=[6, 0]), "must be positive"),
        (column_wise(list(range(4)) * 2), "fewer columns than ranks"),
        (table_row_wise([]), "needs at least one rank"),
        (ParameterSharding(ShardingType.DATA_PARALLEL, (0,)), "takes no ranks"),
    ],
)
def test_bad_shardings_name_the_table(sharding, message):
    with pytest.raises(ValueError, match=message) as info:
        sharding.shards(T, 4)
    assert "table 't'" in str(info.value)


def test_plan_is_hashable_and_checks_table_names():
    plan = ShardingPlan({"t": row_wise(), "u": table_wise(0)})
    assert plan == ShardingPlan({"u": table_wise(0), "t": row_wise()})
    assert hash(plan) == hash(ShardingPlan({"u": table_wise(0), "t": row_wise()}))
    with pytest.raises(ValueError, match=r"without a sharding \[\].*unknown tables \['u'\]"):
        plan.validate([T], num_devices=4)
    with pytest.raises(ValueError, match=r"without a sharding \['t'\]"):
        ShardingPlan({}).validate([T], num_devices=4)
    with pytest.raises(ValueError, match="expected a ParameterSharding"):
        ShardingPlan({"t": "row_wise"})
    ShardingPlan({"t": row_wise()}).validate([T], num_devices=8)
    with pytest.raises(ValueError, match="fewer rows than ranks"):
        ShardingPlan({"t": row_wise()}).validate([T], num_devices=16)
