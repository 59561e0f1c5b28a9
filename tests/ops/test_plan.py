import pytest

from jaxrec import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from jaxrec.ops.plan import build_plan


def bag(name, dim, rows, features, **kw):
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, **kw
    )


def test_tables_of_one_dim_dtype_and_pooling_share_a_group():
    plan = build_plan([bag(f"t{i}", 8, 10 + i, [f"f{i}"]) for i in range(26)])
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert group.num_rows == sum(10 + i for i in range(26))
    assert [t.row_offset for t in plan.tables][:3] == [0, 10, 21]
    assert plan.num_columns == 26 * 8


def test_dim_dtype_and_pooling_split_groups():
    plan = build_plan(
        [
            bag("a", 8, 5, ["fa"]),
            bag("b", 16, 5, ["fb"]),
            bag("c", 8, 5, ["fc"], data_type=DataType.BF16),
            bag("d", 8, 5, ["fd"], pooling=PoolingType.MEAN),
            bag("e", 8, 7, ["fe"]),
        ]
    )
    names = [g.name for g in plan.groups]
    assert names == ["sum_float32_d8", "sum_float32_d16", "sum_bfloat16_d8", "mean_float32_d8"]
    assert plan.groups[0].tables == ("a", "e") and plan.table("e").row_offset == 5


def test_shared_table_features_have_the_same_rows_and_their_own_columns():
    plan = build_plan([bag("t", 4, 10, ["f1", "f2"]), bag("u", 2, 3, ["f3"])])
    f1, f2, f3 = plan.features
    assert (f1.row_offset, f2.row_offset) == (0, 0)
    assert (f1.col_offset, f2.col_offset, f3.col_offset) == (0, 4, 8)
    assert plan.kernel_features(0, ("f3", "f2", "f1")) == ((2, 0, 10, 0), (1, 0, 10, 4))


def test_plans_are_cached_and_hashable():
    tables = [bag("t", 4, 10, ["f1"])]
    assert build_plan(tables) is build_plan(list(tables))
    hash(build_plan(tables))


def test_sequence_plan_is_not_pooled():
    plan = build_plan(
        [EmbeddingConfig(name="e", embedding_dim=3, num_embeddings=4, feature_names=["f"])]
    )
    assert not plan.pooled and plan.groups[0].pooling == "none"


def test_mixing_bag_and_sequence_configs_is_refused():
    with pytest.raises(ValueError, match="either EmbeddingBagConfigs or EmbeddingConfigs"):
        build_plan(
            [
                bag("t", 4, 10, ["f1"]),
                EmbeddingConfig(name="e", embedding_dim=4, num_embeddings=4, feature_names=["f2"]),
            ]
        )
