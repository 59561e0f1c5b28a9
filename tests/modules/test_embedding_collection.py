import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor, pad_to_capacity


def table(name, dim, rows, features):
    return EmbeddingConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features
    )


def seed_example():
    ec = EmbeddingCollection(tables=[table("t1", 3, 10, ["f1"]), table("t2", 3, 10, ["f2"])])
    features = KeyedJaggedTensor.from_offsets_sync(
        keys=["f1", "f2"],
        values=jnp.array([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=jnp.array([0, 2, 2, 3, 4, 5, 8]),
    )
    return ec, features


def test_torchrec_seed_example_rows_per_id():
    ec, features = seed_example()
    variables = ec.init(jax.random.key(0), features)
    out = ec.apply(variables, features)
    assert set(out) == {"f1", "f2"}
    assert out["f2"].values().shape == (5, 3)
    assert out["f1"].values().shape == (3, 3)
    assert out["f2"].lengths().tolist() == [1, 1, 3]
    sd = ec.state_dict(variables)
    np.testing.assert_array_equal(
        np.asarray(out["f2"].values()), np.asarray(sd["embeddings.t2.weight"][3:8])
    )
    np.testing.assert_array_equal(
        np.asarray(out["f1"].values()), np.asarray(sd["embeddings.t1.weight"][0:3])
    )


def test_torchrec_methods_and_need_indices():
    ec, features = seed_example()
    assert ec.need_indices() is False and ec.embedding_dim() == 3
    assert ec.embedding_names_by_table() == [["f1"], ["f2"]]
    ec = EmbeddingCollection(tables=ec.tables, need_indices=True)
    out = ec.apply(ec.init(jax.random.key(0), features), features)
    assert out["f2"].weights().tolist() == [3, 4, 5, 6, 7]


def test_mixed_dims_and_shared_tables():
    ec = EmbeddingCollection(tables=[table("a", 2, 5, ["x", "y"]), table("b", 4, 3, ["z"])])
    kjt = KeyedJaggedTensor(
        keys=["z", "x", "y"], values=jnp.array([2, 4, 0, 4]), lengths=jnp.array([1, 0, 1, 1, 0, 1])
    )
    variables = ec.init(jax.random.key(1), kjt)
    sd = ec.state_dict(variables)
    out = ec.apply(variables, kjt)
    np.testing.assert_array_equal(
        np.asarray(out["z"].values()), np.asarray(sd["embeddings.b.weight"][np.array([2])])
    )
    np.testing.assert_array_equal(
        np.asarray(out["x"].values()), np.asarray(sd["embeddings.a.weight"][np.array([4, 0])])
    )
    np.testing.assert_array_equal(
        np.asarray(out["y"].values()), np.asarray(sd["embeddings.a.weight"][np.array([4])])
    )
    with pytest.raises(ValueError, match="several dims"):
        ec.embedding_dim()


def test_under_jit_values_have_the_capacity_and_zero_padding():
    ec, features = seed_example()
    variables = ec.init(jax.random.key(0), features)
    eager = ec.apply(variables, features)
    jitted = jax.jit(ec.apply)(variables, pad_to_capacity(features, 16))
    for key in ("f1", "f2"):
        n = eager[key].values().shape[0]
        values = np.asarray(jitted[key].values())
        assert values.shape == (16, 3)
        np.testing.assert_array_equal(values[:n], np.asarray(eager[key].values()))
        np.testing.assert_array_equal(values[n:], 0)


def test_grad_reaches_each_looked_up_row():
    ec, features = seed_example()
    variables = ec.init(jax.random.key(0), features)
    grads = jax.grad(lambda v: sum(jnp.sum(jt.values()) for jt in ec.apply(v, features).values()))(
        variables
    )
    g = np.asarray(ec.state_dict(grads)["embeddings.t2.weight"])
    np.testing.assert_array_equal(g[3:8], 1.0)
    np.testing.assert_array_equal(g[:3], 0.0)


def test_id_out_of_range_is_refused():
    ec, features = seed_example()
    variables = ec.init(jax.random.key(0), features)
    kjt = KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.array([12]), lengths=jnp.array([0, 0, 0, 0, 1, 0])
    )
    with pytest.raises(ValueError, match=r"feature 'f2' \(table 't2', 10 rows\): id 12"):
        ec.apply(variables, kjt)


def test_pallas_interpret_backend_matches_xla():
    ec, features = seed_example()
    variables = ec.init(jax.random.key(0), features)
    pallas = EmbeddingCollection(tables=ec.tables, backend="pallas")
    a, b = ec.apply(variables, features), pallas.apply(variables, features)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key].values()), np.asarray(b[key].values()))


def test_a_feature_in_two_tables_gives_one_output_per_table_also_under_jit():
    ec = EmbeddingCollection(tables=[table("a", 2, 5, ["f", "g"]), table("b", 2, 4, ["f"])])
    assert ec.embedding_names_by_table() == [["f@a", "g"], ["f@b"]]
    kjt = KeyedJaggedTensor(
        keys=["x", "g", "f"], values=jnp.array([7, 1, 3, 0]), lengths=jnp.array([1, 1, 2])
    )
    variables = ec.init(jax.random.key(0), kjt)
    sd = {k: np.asarray(v) for k, v in ec.state_dict(variables).items()}
    eager = ec.apply(variables, kjt)
    jitted = jax.jit(ec.apply)(variables, pad_to_capacity(kjt, 8))
    assert list(eager) == ["f@a", "g", "f@b"] and set(jitted) == set(eager)
    want = {
        "f@a": sd["embeddings.a.weight"][[3, 0]],
        "g": sd["embeddings.a.weight"][[1]],
        "f@b": sd["embeddings.b.weight"][[3, 0]],
    }
    for name, rows in want.items():
        np.testing.assert_array_equal(np.asarray(eager[name].values()), rows)
        np.testing.assert_array_equal(np.asarray(jitted[name].values())[: len(rows)], rows)
        assert eager[name].values().dtype == jnp.float32


def test_16_bit_tables_give_float32_rows_by_default():
    from jaxrec import DataType

    t = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=3, data_type=DataType.FP16)
    kjt = KeyedJaggedTensor(keys=["t"], values=jnp.array([2]), lengths=jnp.array([1]))
    ec = EmbeddingCollection(tables=[t])
    variables = ec.init(jax.random.key(0), kjt)
    assert ec.apply(variables, kjt)["t"].values().dtype == jnp.float32
    narrow = EmbeddingCollection(tables=[t], output_dtype=None)
    assert narrow.apply(variables, kjt)["t"].values().dtype == jnp.float16
