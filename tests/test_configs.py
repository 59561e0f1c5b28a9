import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from jaxrec.configs import (
    data_type_to_dtype,
    dtype_to_data_type,
    embedding_names_by_table,
    pooling_type_to_str,
    validate_table_set,
)


def bag(name="t", dim=4, rows=10, features=("f",), **kw):
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=list(features), **kw
    )


def test_defaults_match_torchrec():
    t = bag()
    assert t.data_type is DataType.FP32
    assert t.pooling is PoolingType.SUM
    assert t.weight_init_max is None and t.weight_init_min is None
    assert t.num_embeddings_post_pruning is None and t.init_fn is None and t.need_pos is False
    assert t.get_weight_init_max() == pytest.approx(math.sqrt(1 / 10))
    assert t.get_weight_init_min() == pytest.approx(-math.sqrt(1 / 10))
    assert t.feature_names == ("f",) and t.num_features() == 1


def test_configs_are_hashable_and_equal_by_value():
    assert hash(bag()) == hash(bag()) and bag() == bag()


def test_default_initialiser_is_uniform_in_torchrec_bounds():
    t = bag(rows=400, dim=64)
    w = t.initialize(jax.random.key(0))
    bound = math.sqrt(1 / 400)
    assert w.shape == (400, 64) and w.dtype == jnp.float32
    assert float(w.min()) >= -bound and float(w.max()) <= bound
    assert float(w.max()) > 0.9 * bound and float(w.min()) < -0.9 * bound


def test_weight_init_bounds_and_init_fn_are_honoured():
    w = bag(weight_init_min=0.5, weight_init_max=0.75).initialize(jax.random.key(1))
    assert float(w.min()) >= 0.5 and float(w.max()) <= 0.75
    ones = bag(init_fn=lambda key, shape, dtype: jnp.ones(shape, dtype)).initialize(
        jax.random.key(0)
    )
    assert bool((ones == 1).all())


def test_init_fn_with_wrong_shape_is_refused():
    t = bag(name="t9", init_fn=lambda key, shape, dtype: jnp.ones((2, 2), dtype))
    with pytest.raises(ValueError, match=r"table 't9': init_fn returned shape \(2, 2\)"):
        t.initialize(jax.random.key(0))


@pytest.mark.parametrize(
    "data_type, dtype", [(DataType.FP16, jnp.float16), (DataType.BF16, jnp.bfloat16)]
)
def test_16_bit_tables(data_type, dtype):
    assert bag(data_type=data_type).initialize(jax.random.key(0)).dtype == dtype


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_embeddings": 0}, "num_embeddings must be a positive int, got 0"),
        ({"num_embeddings": -3}, "num_embeddings must be a positive int, got -3"),
        ({"embedding_dim": 0}, "embedding_dim must be a positive int, got 0"),
        ({"embedding_dim": 2.5}, "embedding_dim must be a positive int, got 2.5"),
        ({"data_type": "fp32"}, "data_type must be a jaxrec.DataType"),
        ({"feature_names": "f1"}, "feature_names must be a list of names"),
        ({"feature_names": ["a", "a"]}, "feature_names has duplicates"),
        ({"weight_init_min": 1.0, "weight_init_max": 0.0}, "weight_init_min 1.0 is greater"),
        ({"pooling": PoolingType.NONE}, "use EmbeddingConfig"),
    ],
)
def test_invalid_configs_raise_at_construction(kwargs, message):
    args = {"name": "bad", "embedding_dim": 4, "num_embeddings": 10, "feature_names": ["f"]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        EmbeddingBagConfig(**args)


def test_quantised_types_are_refused_for_training():
    with pytest.raises(ValueError, match="data_type INT8 is not supported"):
        data_type_to_dtype(DataType.INT8)
    with pytest.raises(ValueError, match="INT4 is not supported"):
        validate_table_set([bag(data_type=DataType.INT4)])


@pytest.mark.parametrize(
    "tables, message",
    [
        ([], "at least one table"),
        ([bag("a", features=["x"]), bag("a", features=["y"])], "duplicate table name 'a'"),
        ([bag("", features=["x"])], "needs a name"),
        ([bag("", features=[])], "needs a name"),
    ],
)
def test_invalid_table_sets(tables, message):
    with pytest.raises(ValueError, match=message):
        validate_table_set(tables)


def test_embedding_config_has_no_pooling_field():
    t = EmbeddingConfig(name="e", embedding_dim=3, num_embeddings=5, feature_names=["f"])
    assert not hasattr(t, "pooling")


def test_a_table_without_feature_names_reads_its_own_name():
    assert bag("user", features=[]).feature_names == ("user",)
    assert bag("", features=[]).feature_names == ()


def test_a_feature_may_be_read_by_several_tables_named_feature_at_table():
    tables = [bag("a", features=["x", "y"]), bag("b", features=["x"]), bag("c", features=["z"])]
    validate_table_set(tables)
    assert embedding_names_by_table(tables) == [["x@a", "y"], ["x@b"], ["z"]]


def test_data_types_are_torchrecs():
    torchrec = pytest.importorskip("torchrec")
    assert [t.name for t in DataType] == [t.name for t in torchrec.DataType]
    assert [str(t) for t in DataType] == [str(t) for t in torchrec.DataType]


@pytest.mark.parametrize(
    "dtype, data_type",
    [
        (jnp.float32, DataType.FP32),
        (jnp.float16, DataType.FP16),
        (jnp.bfloat16, DataType.BF16),
        (jnp.int32, DataType.INT32),
        (np.int64, DataType.INT64),
        (jnp.int8, DataType.INT8),
        (jnp.uint8, DataType.UINT8),
        (jnp.int4, DataType.INT4),
        (jnp.float8_e4m3fn, DataType.NFP8),
    ],
)
def test_dtype_to_data_type(dtype, data_type):
    assert dtype_to_data_type(dtype) is data_type


def test_dtype_to_data_type_refuses_unknown_dtypes():
    with pytest.raises(ValueError, match="no DataType stores dtype complex64"):
        dtype_to_data_type(jnp.complex64)
    with pytest.raises(ValueError, match="is not a dtype"):
        dtype_to_data_type("nonsense")


def test_pooling_type_to_str_is_torchs_mode_name():
    assert pooling_type_to_str(PoolingType.SUM) == "sum"
    assert pooling_type_to_str(PoolingType.MEAN) == "mean"
    with pytest.raises(ValueError, match="unsupported pooling type"):
        pooling_type_to_str(PoolingType.NONE)
