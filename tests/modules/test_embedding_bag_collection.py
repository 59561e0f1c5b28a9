import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    PoolingType,
    pad_to_capacity,
)


def bag(name, dim, rows, features, **kw):
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, **kw
    )


def seed_example():
    ebc = EmbeddingBagCollection(tables=[bag("t1", 3, 10, ["f1"]), bag("t2", 4, 10, ["f2"])])
    features = KeyedJaggedTensor(
        keys=["f1", "f2"],
        values=jnp.array([0, 1, 2, 3, 4, 5, 6, 7]),
        offsets=jnp.array([0, 2, 2, 3, 4, 5, 8]),
    )
    return ebc, features


def test_torchrec_seed_example_shapes_keys_offsets_and_empty_bag():
    ebc, features = seed_example()
    variables = ebc.init(jax.random.key(0), features)
    kt = ebc.apply(variables, features)
    assert kt.values().shape == (3, 7)
    assert kt.keys() == ["f1", "f2"]
    assert kt.offset_per_key() == [0, 3, 7]
    sd = ebc.state_dict(variables)
    t1, t2 = np.asarray(sd["embedding_bags.t1.weight"]), np.asarray(sd["embedding_bags.t2.weight"])
    expected = np.zeros((3, 7), np.float32)
    expected[0, :3] = t1[0] + t1[1]
    expected[2, :3] = t1[2]  # bag 1 of f1 is empty: zeros
    expected[:, 3:] = [t2[3], t2[4], t2[5] + t2[6] + t2[7]]
    np.testing.assert_allclose(np.asarray(kt.values()), expected, rtol=1e-6)


def test_torchrec_methods():
    ebc, _ = seed_example()
    assert ebc.is_weighted() is False
    assert [t.name for t in ebc.embedding_bag_configs()] == ["t1", "t2"]
    assert ebc.embedding_names_by_table() == [["f1"], ["f2"]]
    assert EmbeddingBagCollection(tables=[bag("t", 2, 3, ["f"])], is_weighted=True).is_weighted()


def fixed_tables(ebc, variables, seed=0):
    """Replace every table by known random values; returns (variables, per-table arrays)."""
    rng = np.random.default_rng(seed)
    sd = {
        k: rng.normal(size=v.shape).astype(np.float32) for k, v in ebc.state_dict(variables).items()
    }
    return ebc.load_state_dict(variables, sd), sd


def test_mean_pooling_divides_by_bag_length_and_empty_bag_is_zero():
    ebc = EmbeddingBagCollection(tables=[bag("t", 2, 5, ["f"], pooling=PoolingType.MEAN)])
    kjt = KeyedJaggedTensor(
        keys=["f"], values=jnp.array([1, 3, 4, 4]), lengths=jnp.array([3, 0, 1])
    )
    variables, sd = fixed_tables(ebc, ebc.init(jax.random.key(0), kjt))
    w = sd["embedding_bags.t.weight"]
    out = np.asarray(ebc.apply(variables, kjt).values())
    np.testing.assert_allclose(out, [(w[1] + w[3] + w[4]) / 3, [0, 0], w[4]], rtol=1e-6)


def test_per_sample_weights_multiply_rows():
    ebc = EmbeddingBagCollection(tables=[bag("t", 3, 6, ["f"])], is_weighted=True)
    kjt = KeyedJaggedTensor(
        keys=["f"],
        values=jnp.array([0, 5, 2]),
        lengths=jnp.array([2, 1]),
        weights=jnp.array([0.5, -2.0, 3.0]),
    )
    variables, sd = fixed_tables(ebc, ebc.init(jax.random.key(0), kjt))
    w = sd["embedding_bags.t.weight"]
    out = np.asarray(ebc.apply(variables, kjt).values())
    np.testing.assert_allclose(out, [0.5 * w[0] - 2.0 * w[5], 3.0 * w[2]], rtol=1e-6)


def test_features_sharing_a_table_and_mixed_dims_keep_feature_order():
    ebc = EmbeddingBagCollection(tables=[bag("shared", 2, 4, ["a", "b"]), bag("wide", 5, 3, ["c"])])
    # Input keys in another order than the collection's features.
    kjt = KeyedJaggedTensor(
        keys=["c", "b", "a"],
        values=jnp.array([2, 1, 3, 3, 0]),
        lengths=jnp.array([1, 1, 0, 2, 1, 0]),
    )
    variables, sd = fixed_tables(ebc, ebc.init(jax.random.key(0), kjt))
    s, wide = sd["embedding_bags.shared.weight"], sd["embedding_bags.wide.weight"]
    kt = ebc.apply(variables, kjt)
    assert kt.keys() == ["a", "b", "c"] and kt.length_per_key() == [2, 2, 5]
    out = np.asarray(kt.values())
    np.testing.assert_allclose(out[:, 0:2], [s[0], [0, 0]], rtol=1e-6)  # a: [0], []
    np.testing.assert_allclose(out[:, 2:4], [[0, 0], s[3] + s[3]], rtol=1e-6)  # b: [], [3, 3]
    np.testing.assert_allclose(out[:, 4:9], [wide[2], wide[1]], rtol=1e-6)  # c: [2], [1]


def random_kjt(rng, keys, rows, batch, max_len=5, weighted=False):
    lengths = rng.integers(0, max_len + 1, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[k * batch : (k + 1) * batch].sum())
            for k in range(len(keys))
        ]
    )
    weights = rng.normal(size=values.shape).astype(np.float32) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def test_jit_gives_the_eager_result_and_compiles_once_per_capacity_bucket():
    rng = np.random.default_rng(0)
    ebc = EmbeddingBagCollection(tables=[bag("t1", 4, 20, ["f1"]), bag("t2", 4, 30, ["f2"])])
    traces = []

    @jax.jit
    def apply(variables, kjt):
        traces.append(1)
        return ebc.apply(variables, kjt).values()

    a = random_kjt(rng, ["f1", "f2"], [20, 30], batch=4)
    b = random_kjt(rng, ["f1", "f2"], [20, 30], batch=4)
    variables = ebc.init(jax.random.key(0), a)
    for kjt in (a, b):
        eager = ebc.apply(variables, kjt).values()
        jitted = apply(variables, pad_to_capacity(kjt, 64))
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    assert len(traces) == 1


def test_grad_is_the_dense_gradient_of_the_table():
    ebc = EmbeddingBagCollection(tables=[bag("t", 2, 4, ["f"], pooling=PoolingType.MEAN)])
    kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1, 1, 3]), lengths=jnp.array([2, 1]))
    variables = ebc.init(jax.random.key(0), kjt)
    g_out = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    grads = jax.grad(lambda v: jnp.sum(ebc.apply(v, kjt).values() * g_out))(variables)
    table_grad = np.asarray(ebc.state_dict(grads)["embedding_bags.t.weight"])
    # Row 1 occurs twice in a bag of length 2 (MEAN: each occurrence contributes g/2).
    np.testing.assert_allclose(table_grad, [[0, 0], [1, 2], [0, 0], [3, 4]], rtol=1e-6)


def test_pallas_interpret_backend_matches_xla_backend():
    rng = np.random.default_rng(3)
    tables = [bag("t1", 3, 11, ["f1"]), bag("t2", 5, 7, ["f2"], pooling=PoolingType.MEAN)]
    kjt = random_kjt(rng, ["f1", "f2"], [11, 7], batch=3)
    xla = EmbeddingBagCollection(tables=tables, backend="xla")
    pallas = EmbeddingBagCollection(tables=tables, backend="pallas")
    variables = xla.init(jax.random.key(0), kjt)
    np.testing.assert_allclose(
        np.asarray(pallas.apply(variables, kjt).values()),
        np.asarray(xla.apply(variables, kjt).values()),
        rtol=1e-6,
        atol=1e-7,
    )


def test_state_dict_round_trip_and_gradients_view():
    ebc, features = seed_example()
    variables = ebc.init(jax.random.key(0), features)
    sd = ebc.state_dict(variables)
    assert {k: v.shape for k, v in sd.items()} == {
        "embedding_bags.t1.weight": (10, 3),
        "embedding_bags.t2.weight": (10, 4),
    }
    new = {k: np.full(v.shape, i + 1.0, np.float32) for i, (k, v) in enumerate(sd.items())}
    loaded = ebc.state_dict(ebc.load_state_dict(variables, new))
    for k in new:
        np.testing.assert_array_equal(np.asarray(loaded[k]), new[k])


@pytest.mark.parametrize(
    "state_dict, message",
    [
        (
            {"embedding_bags.t1.weight": np.zeros((10, 3))},
            r"missing keys \['embedding_bags.t2.weight'\]",
        ),
        (
            {
                "embedding_bags.t1.weight": np.zeros((10, 3)),
                "embedding_bags.t2.weight": np.zeros((10, 4)),
                "x": 1,
            },
            r"unexpected keys \['x'\]",
        ),
        (
            {
                "embedding_bags.t1.weight": np.zeros((9, 3)),
                "embedding_bags.t2.weight": np.zeros((10, 4)),
            },
            r"embedding_bags.t1.weight: expected shape \(10, 3\), got \(9, 3\)",
        ),
    ],
)
def test_load_state_dict_names_what_is_wrong(state_dict, message):
    ebc, features = seed_example()
    variables = ebc.init(jax.random.key(0), features)
    with pytest.raises(ValueError, match=message):
        ebc.load_state_dict(variables, state_dict)


class TestBadInput:
    def setup_method(self):
        self.ebc, self.features = seed_example()
        self.variables = self.ebc.init(jax.random.key(0), self.features)

    def run(self, kjt, ebc=None):
        return (ebc or self.ebc).apply(self.variables, kjt)

    def test_id_outside_its_table_names_feature_table_and_value(self):
        kjt = KeyedJaggedTensor(
            keys=["f1", "f2"], values=jnp.array([0, 10, 3]), lengths=jnp.array([2, 0, 0, 1, 0, 0])
        )
        with pytest.raises(
            ValueError, match=r"feature 'f1' \(table 't1', 10 rows\): id 10 at position 1"
        ):
            self.run(kjt)

    def test_negative_id(self):
        kjt = KeyedJaggedTensor(
            keys=["f1", "f2"], values=jnp.array([0, -1]), lengths=jnp.array([1, 0, 0, 1, 0, 0])
        )
        with pytest.raises(ValueError, match=r"feature 'f2' \(table 't2', 10 rows\): id -1"):
            self.run(kjt)

    def test_missing_keys(self):
        kjt = KeyedJaggedTensor(keys=["f1", "zz"], values=jnp.array([0]), lengths=jnp.array([1, 0]))
        with pytest.raises(ValueError, match=r"missing feature keys \['f2'\]"):
            self.run(kjt)

    def test_a_feature_repeated_in_the_input_is_refused(self):
        a = KeyedJaggedTensor(
            keys=["f1", "f2"], values=jnp.array([0, 1]), lengths=jnp.array([1, 1])
        )
        b = KeyedJaggedTensor(keys=["f2"], values=jnp.array([2]), lengths=jnp.array([1]))
        with pytest.raises(ValueError, match="feature key 'f2' appears 2 times"):
            self.run(KeyedJaggedTensor.concat([a, b]))

    def test_weights_on_unweighted_collection_and_the_reverse(self):
        kjt = KeyedJaggedTensor(
            keys=["f1", "f2"],
            values=jnp.array([0, 1]),
            lengths=jnp.array([1, 0, 0, 1, 0, 0]),
            weights=jnp.array([1.0, 2.0]),
        )
        with pytest.raises(ValueError, match="not weighted"):
            self.run(kjt)
        weighted = EmbeddingBagCollection(tables=self.ebc.tables, is_weighted=True)
        with pytest.raises(ValueError, match="weighted .* but the input has no weights"):
            self.run(self.features, weighted)

    def test_lengths_that_do_not_sum_to_the_values(self):
        with pytest.raises(ValueError):
            KeyedJaggedTensor(
                keys=["f1", "f2"],
                values=jnp.array([0, 1, 2]),
                lengths=jnp.array([1, 0, 0, 1, 0, 0]),
            )

    def test_float_ids_are_refused(self):
        with pytest.raises(ValueError):
            KeyedJaggedTensor(
                keys=["f1", "f2"],
                values=jnp.array([0.0, 1.0]),
                lengths=jnp.array([1, 0, 0, 1, 0, 0]),
            )

    def test_not_a_kjt(self):
        with pytest.raises(ValueError, match="expected a KeyedJaggedTensor"):
            self.run(jnp.array([1, 2]))

    def test_wrong_config_type_and_bad_options(self):
        from jaxrec import EmbeddingConfig

        with pytest.raises(ValueError, match="takes EmbeddingBagConfigs"):
            EmbeddingBagCollection(
                tables=[
                    EmbeddingConfig(
                        name="e", embedding_dim=2, num_embeddings=2, feature_names=["f"]
                    )
                ]
            )
        with pytest.raises(ValueError, match="backend must be one of"):
            EmbeddingBagCollection(tables=self.ebc.tables, backend="cuda")
        with pytest.raises(ValueError, match="bounds_check_mode must be one of"):
            EmbeddingBagCollection(tables=self.ebc.tables, bounds_check_mode="loud")


def test_bad_ids_inside_jit_give_zero_rows_and_are_counted():
    ebc, features = seed_example()
    variables = ebc.init(jax.random.key(0), features)
    good = KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.array([1, 2]), lengths=jnp.array([1, 0, 0, 1, 0, 0])
    )
    bad = KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.array([1, 99]), lengths=jnp.array([1, 0, 0, 1, 0, 0])
    )

    @jax.jit
    def apply(kjt):
        return ebc.apply(variables, kjt, mutable=["bounds_check"])

    kt, state = apply(bad)
    assert int(state["bounds_check"]["invalid_ids"][0]) == 1
    np.testing.assert_array_equal(np.asarray(kt.values()[0, 3:]), np.zeros(4))
    np.testing.assert_allclose(
        np.asarray(kt.values()[0, :3]), np.asarray(ebc.apply(variables, good).values()[0, :3])
    )


def test_sparse_gradients_are_the_nonzero_rows_of_the_dense_gradient():
    rng = np.random.default_rng(5)
    tables = [bag("t1", 3, 11, ["f1", "f2"]), bag("t2", 3, 7, ["f3"], pooling=PoolingType.MEAN)]
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=True)
    kjt = random_kjt(rng, ["f1", "f2", "f3"], [11, 11, 7], batch=4, weighted=True)
    variables = ebc.init(jax.random.key(0), kjt)
    g_out = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    dense = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out))(
        variables["params"]
    )["embedding_bags"]
    for name, (rows, grads) in ebc.sparse_gradients(kjt, g_out).items():
        table = np.asarray(dense[name])
        rebuilt = np.zeros_like(table)
        real = np.asarray(rows) < table.shape[0]
        rebuilt[np.asarray(rows)[real]] = np.asarray(grads)[real]
        np.testing.assert_allclose(rebuilt, table, rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(np.asarray(rows)[real]) > 0)  # unique, ascending


def test_fatal_bounds_mode_is_a_checkify_error_inside_jit():
    from jax.experimental import checkify

    ebc, features = seed_example()
    fatal = EmbeddingBagCollection(tables=ebc.tables, bounds_check_mode="fatal")
    variables = fatal.init(jax.random.key(0), features)
    bad = KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.array([1, 99]), lengths=jnp.array([1, 0, 0, 1, 0, 0])
    )
    checked = jax.jit(checkify.checkify(lambda v, k: fatal.apply(v, k).values()))
    err, _ = checked(variables, features)
    assert err.get() is None
    err, _ = checked(variables, bad)
    assert "1 ids are outside their tables" in err.get()


def test_ignore_bounds_mode_gives_zero_rows_and_counts_nothing():
    ebc, features = seed_example()
    ignore = EmbeddingBagCollection(tables=ebc.tables, bounds_check_mode="ignore")
    variables = ignore.init(jax.random.key(0), features)
    bad = KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.array([1, 99]), lengths=jnp.array([1, 0, 0, 1, 0, 0])
    )
    kt, state = jax.jit(lambda v, k: ignore.apply(v, k, mutable=["bounds_check"]))(variables, bad)
    assert "bounds_check" not in state
    np.testing.assert_array_equal(np.asarray(kt.values()[0, 3:]), np.zeros(4))


def test_16_bit_tables_pool_to_float32_by_default_and_output_dtype_overrides():
    from jaxrec import DataType

    tables = [bag("t", 8, 10, ["f"], data_type=DataType.BF16)]
    kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1, 2, 3]), lengths=jnp.array([2, 1]))
    wide = EmbeddingBagCollection(tables=tables)
    narrow = EmbeddingBagCollection(tables=tables, output_dtype=None)
    variables = wide.init(jax.random.key(0), kjt)
    assert narrow.apply(variables, kjt).values().dtype == jnp.bfloat16
    out = wide.apply(variables, kjt).values()
    assert out.dtype == jnp.float32
    w = np.asarray(wide.state_dict(variables)["embedding_bags.t.weight"], np.float32)
    np.testing.assert_allclose(np.asarray(out), [w[1] + w[2], w[3]], rtol=1e-6)


def test_tables_sharing_one_override_optimizer_stack_in_one_group_matching_the_plan():
    import jaxrec

    tables = [bag(f"t{i}", 4, 10, [f"f{i}"]) for i in range(4)]
    shared = jaxrec.optim.exact_rowwise_adagrad(0.1)
    ebc = EmbeddingBagCollection(
        tables=tables,
        optimizer=jaxrec.optim.exact_sgd(0.1),
        table_optimizers={t.name: shared for t in tables},
    )
    kjt = KeyedJaggedTensor(
        keys=[f"f{i}" for i in range(4)], values=jnp.arange(4), lengths=jnp.ones(4, jnp.int32)
    )
    variables = ebc.init(jax.random.key(0), kjt)
    assert list(variables["params"]["embedding_bags"]) == [g.name for g in ebc.plan.groups]
    assert [g.tables for g in ebc.plan.groups] == [("t0", "t1", "t2", "t3")]
    assert ebc.group_optimizers() == (shared,)


def test_lookup_options_group_the_keyword_fields():
    from jaxrec.ops import BoundsCheckMode
    from jaxrec.ops.options import LookupOptions

    ebc = EmbeddingBagCollection(
        tables=[bag("t", 2, 3, ["f"])], backend="xla", bounds_check_mode="ignore", output_dtype=None
    )
    assert ebc.lookup_options == LookupOptions(
        backend="xla", bounds_check_mode=BoundsCheckMode.IGNORE, output_dtype=None
    )
    with pytest.raises(ValueError, match="backend"):
        EmbeddingBagCollection(tables=[bag("t", 2, 3, ["f"])], backend="cuda")


class TestInputTorchRecAccepts:
    """Inputs a TorchRec model feeds its EBC, taken the same way."""

    def test_extra_keys_are_ignored_and_order_is_free(self):
        ebc, features = seed_example()
        variables = ebc.init(jax.random.key(0), features)
        wider = KeyedJaggedTensor(
            keys=["x", "f2", "f1"],
            values=jnp.array([9, 9, 3, 4, 5, 6, 7, 0, 1, 2]),
            lengths=jnp.array([1, 0, 1, 1, 1, 3, 2, 0, 1]),
        )
        want = ebc.apply(variables, features).values()
        np.testing.assert_array_equal(np.asarray(ebc.apply(variables, wider).values()), want)
        jitted = jax.jit(ebc.apply)(variables, pad_to_capacity(wider, 16))
        np.testing.assert_array_equal(np.asarray(jitted.values()), want)

    def test_a_feature_in_two_tables_gives_feature_at_table_outputs(self):
        tables = [bag("a", 2, 5, ["f", "g"]), bag("b", 3, 4, ["f"]), bag("c", 2, 6, ["h"])]
        ebc = EmbeddingBagCollection(tables=tables)
        assert ebc.embedding_names_by_table() == [["f@a", "g"], ["f@b"], ["h"]]
        kjt = KeyedJaggedTensor(
            keys=["h", "g", "f"], values=jnp.array([5, 1, 3, 0]), lengths=jnp.array([1, 1, 2])
        )
        variables = ebc.init(jax.random.key(0), kjt)
        kt = ebc.apply(variables, kjt)
        assert kt.keys() == ["f@a", "g", "f@b", "h"] and kt.length_per_key() == [2, 2, 3, 2]
        sd = {k: np.asarray(v) for k, v in ebc.state_dict(variables).items()}
        a, b, c = (sd[f"embedding_bags.{t}.weight"] for t in "abc")
        np.testing.assert_allclose(np.asarray(kt["f@a"]), [a[3] + a[0]], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(kt["f@b"]), [b[3] + b[0]], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(kt["g"]), [a[1]], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(kt["h"]), [c[5]], rtol=1e-6)
        with pytest.raises(ValueError, match=r"feature 'f' \(table 'b', 4 rows\): id 4"):
            ebc.apply(
                variables, KeyedJaggedTensor(["f", "g", "h"], jnp.array([4]), lengths=[1, 0, 0])
            )

    def test_a_table_without_feature_names_reads_its_own_name(self):
        ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="user", embedding_dim=2, num_embeddings=3)]
        )
        kjt = KeyedJaggedTensor(keys=["user"], values=jnp.array([2]), lengths=jnp.array([1]))
        variables = ebc.init(jax.random.key(0), kjt)
        assert ebc.apply(variables, kjt).keys() == ["user"]
