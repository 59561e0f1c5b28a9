"""State dicts of the collections: what load_state_dict refuses, strict=False, named
parameters, and the fused optimizer state round trip (bit for bit)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrec
from jaxrec import (
    DataType,
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

KEYS, ROWS = ["fa", "fb", "fc"], [9, 6, 5]


def bag(name, dim, rows, features, **kw):
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, **kw
    )


def features(rng, batch=4, max_len=4):
    lengths = rng.integers(0, max_len + 1, len(KEYS) * batch)
    values = np.concatenate(
        [
            rng.integers(0, ROWS[k], lengths[k * batch : (k + 1) * batch].sum())
            for k in range(len(KEYS))
        ]
    )
    return KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths)


def fp16_and_fp32(**kw):
    """t1 (fp16) and t2 (fp32) in two groups, t3 beside t2."""
    return EmbeddingBagCollection(
        tables=[
            bag("t1", 3, 9, ["fa"], data_type=DataType.FP16),
            bag("t2", 4, 6, ["fb"]),
            bag("t3", 4, 5, ["fc"]),
        ],
        **kw,
    )


@pytest.fixture(scope="module")
def setup():
    ebc = fp16_and_fp32()
    variables = ebc.init(jax.random.key(0), features(np.random.default_rng(0)))
    return ebc, variables


def good(ebc, variables):
    return {k: np.asarray(v, np.float32) for k, v in ebc.state_dict(variables).items()}


T1 = "embedding_bags.t1.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: {**sd, T1: sd[T1] + 1j}, r"t1.weight: has complex values"),
        (lambda sd: {**sd, T1: np.full((9, 3), 1e6)}, r"t1.weight: value 1000000.0 at index"),
        (lambda sd: {**sd, T1: np.full((9, 3), 1e6)}, r"does not fit in float16"),
        (
            lambda sd: {**sd, "embedding_bags.t2.weight": np.full((6, 4), 1e39)},
            r"t2.weight: value 1e\+39 at index \(0, 0\) does not fit in float32",
        ),
        (
            lambda sd: {**sd, T1: np.where(np.arange(3) == 2, np.inf, sd[T1])},
            r"t1.weight: holds a non-finite value \(inf\) at index \(0, 2\)",
        ),
        (lambda sd: {**sd, T1: sd[T1] * np.nan}, r"t1.weight: holds a non-finite value \(nan\)"),
        (lambda sd: {**sd, T1: np.full((9, 3), "a")}, r"t1.weight: has <U1 values; expected real"),
        (lambda sd: {**sd, T1: np.full((9, 3), None)}, r"t1.weight: has object values"),
        (lambda sd: {**sd, T1: "weights"}, r"t1.weight: has <U7 values"),
        (lambda sd: {**sd, T1: sd[T1] > 0}, r"t1.weight: has bool values"),
        (lambda sd: {**sd, T1: sd[T1][:, :2]}, r"t1.weight: expected shape \(9, 3\), got \(9, 2\)"),
        (
            lambda sd: {k: v for k, v in sd.items() if k != T1},
            r"missing keys \['embedding_bags.t1.weight'\], unexpected keys \[\]",
        ),
        (
            lambda sd: {**sd, "embedding_bags.t9.weight": sd[T1]},
            r"missing keys \[\], unexpected keys \['embedding_bags.t9.weight'\]",
        ),
    ],
)
def test_load_state_dict_refuses_with_the_key_named(setup, change, message):
    ebc, variables = setup
    with pytest.raises(ValueError, match=message):
        ebc.load_state_dict(variables, change(good(ebc, variables)))


def test_values_that_fit_load_exactly_and_jax_arrays_are_checked_too(setup):
    ebc, variables = setup
    sd = good(ebc, variables)
    sd[T1] = np.full((9, 3), 65504.0)  # float16's largest finite value
    sd["embedding_bags.t2.weight"] = np.arange(24, dtype=np.int64).reshape(6, 4)  # ints cast
    loaded = ebc.state_dict(ebc.load_state_dict(variables, sd))
    assert loaded[T1].dtype == jnp.float16 and float(loaded[T1].max()) == 65504.0
    np.testing.assert_array_equal(
        np.asarray(loaded["embedding_bags.t2.weight"]), sd["embedding_bags.t2.weight"]
    )
    with pytest.raises(ValueError, match="t1.weight: value 70000.0 at index"):
        ebc.load_state_dict(variables, {**sd, T1: jnp.full((9, 3), 7e4)})


def test_strict_false_returns_missing_and_unexpected_keys_like_torchrec(setup):
    ebc, variables = setup
    before = good(ebc, variables)
    new_t2 = np.full((6, 4), 2.0, np.float32)
    loaded, keys = ebc.load_state_dict(
        variables, {"embedding_bags.t2.weight": new_t2, "other.weight": 1}, strict=False
    )
    assert keys.missing_keys == ["embedding_bags.t1.weight", "embedding_bags.t3.weight"]
    assert keys.unexpected_keys == ["other.weight"]
    after = good(ebc, loaded)
    np.testing.assert_array_equal(after["embedding_bags.t2.weight"], new_t2)
    for name in ("embedding_bags.t1.weight", "embedding_bags.t3.weight"):
        np.testing.assert_array_equal(after[name], before[name])
    # Values are still checked for the keys that do load.
    with pytest.raises(ValueError, match="t2.weight: has complex values"):
        ebc.load_state_dict(variables, {"embedding_bags.t2.weight": new_t2 * 1j}, strict=False)


def test_named_parameters_iterates_the_tables_with_torchrec_names(setup):
    ebc, variables = setup
    named = list(ebc.named_parameters(variables))
    assert [n for n, _ in named] == [f"embedding_bags.t{i}.weight" for i in (1, 2, 3)]
    for (_, table), view in zip(named, ebc.state_dict(variables).values(), strict=True):
        np.testing.assert_array_equal(np.asarray(table), np.asarray(view))
    assert next(ebc.named_parameters(variables, prefix="sparse.ebc"))[0] == (
        "sparse.ebc.embedding_bags.t1.weight"
    )


def sequence_collection():
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name="t1", embedding_dim=3, num_embeddings=9, feature_names=["fa"])]
    )


def test_wrong_variables_and_the_wrong_collection_type_say_what_is_wrong(setup):
    ebc, variables = setup
    with pytest.raises(ValueError, match=r"variables has no 'params' entry \(got keys \[\]\)"):
        ebc.state_dict({})
    with pytest.raises(ValueError, match="no 'params' entry"):
        ebc.load_state_dict({}, good(ebc, variables))
    with pytest.raises(ValueError, match="no 'params' entry"):
        ebc.optimizer_state_dict({})
    ec = sequence_collection()
    with pytest.raises(ValueError, match="these are an EmbeddingBagCollection's variables"):
        ec.state_dict(variables)
    kjt = KeyedJaggedTensor(keys=["fa"], values=np.array([1, 2]), lengths=np.array([1, 1]))
    ec_variables = ec.init(jax.random.key(0), kjt)
    with pytest.raises(
        ValueError,
        match=r"state dict is an EmbeddingBagCollection's .*this EmbeddingCollection expects "
        r"'embeddings.<table>.weight'",
    ):
        ec.load_state_dict(ec_variables, {T1: np.zeros((9, 3), np.float32)})
    with pytest.raises(ValueError, match="state dict is an EmbeddingCollection's"):
        ebc.load_state_dict(variables, ec.state_dict(ec_variables), strict=False)
    other = EmbeddingBagCollection(tables=[bag("t1", 3, 9, ["fa"])])
    with pytest.raises(ValueError, match="has no group 'sum_float16_d3'"):
        ebc.state_dict(other.init(jax.random.key(0), kjt))


# --- the fused optimizer state ---


def adam_collection():
    """Two fused groups (dims 4 and 3) with Adam, t3 beside t2: momentum in every row."""
    return EmbeddingBagCollection(
        tables=[bag("t1", 3, 9, ["fa"]), bag("t2", 4, 6, ["fb"]), bag("t3", 4, 5, ["fc"])],
        optimizer=jaxrec.optim.adam(learning_rate=0.05),
    )


def train_step(ebc):
    tx = jaxrec.optim.fused(optax.sgd(0.1))

    @jax.jit
    def step(params, kjt):
        def loss(p):
            return jnp.sum(jnp.tanh(ebc.apply({"params": p}, kjt).values()))

        grads = jax.grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return jaxrec.optim.apply_updates(params, updates)

    return step


def views(ebc, params):
    """Every table, state row and step count, by TorchRec name."""
    variables = {"params": params}
    state = ebc.optimizer_state_dict(variables)
    out = {k: np.asarray(v) for k, v in ebc.state_dict(variables).items()}
    out.update({f"{k}.{s}": np.asarray(v) for k, d in state.items() for s, v in d.items()})
    return out


def assert_bitwise_equal(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_weights_and_optimizer_state_round_trip_bit_for_bit():
    ebc = adam_collection()
    rng = np.random.default_rng(1)
    batches = [features(rng) for _ in range(3)]
    step = train_step(ebc)
    params = ebc.init(jax.random.key(0), batches[0])["params"]
    for kjt in batches[:2]:
        params = step(params, kjt)
    trained = {"params": params}
    weights = {k: np.asarray(v) for k, v in ebc.state_dict(trained).items()}
    state = jax.tree.map(np.asarray, ebc.optimizer_state_dict(trained))
    assert {float(s["step"]) for s in state.values()} == {2.0}

    fresh = ebc.init(jax.random.key(7), batches[0])
    restored = ebc.load_optimizer_state_dict(ebc.load_state_dict(fresh, weights), state)
    assert_bitwise_equal(views(ebc, restored["params"]), views(ebc, params))
    after_trained = step(params, batches[2])
    assert_bitwise_equal(
        views(ebc, step(restored["params"], batches[2])), views(ebc, after_trained)
    )

    # Weights alone keep the fresh momentum and step: the next step differs.
    weights_only = step(ebc.load_state_dict(fresh, weights)["params"], batches[2])
    assert not np.array_equal(
        np.asarray(ebc.state_dict({"params": weights_only})["embedding_bags.t1.weight"]),
        np.asarray(ebc.state_dict({"params": after_trained})["embedding_bags.t1.weight"]),
    )


@pytest.fixture(scope="module")
def adam_setup():
    ebc = adam_collection()
    variables = ebc.init(jax.random.key(0), features(np.random.default_rng(0)))
    state = jax.tree.map(np.asarray, ebc.optimizer_state_dict(variables))
    return ebc, variables, state


def replace(state, table, **entries):
    name = f"embedding_bags.{table}.weight"
    return {**state, name: {**state[name], **entries}}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: {k: v for k, v in s.items() if k != T1},
            r"missing keys \['embedding_bags.t1.weight'\]",
        ),
        (lambda s: {**s, "embedding_bags.t9.weight": s[T1]}, r"unexpected keys \[.*t9.weight'\]"),
        (
            lambda s: replace(s, "t1", exp_avg_sq=s[T1]["momentum2"]),
            r"t1.weight: state names \['exp_avg_sq', 'momentum1', 'momentum2', 'step'\] do not "
            r"match the optimizer's \['momentum1', 'momentum2', 'step'\]",
        ),
        (
            lambda s: replace(s, "t1", momentum1=np.zeros((9, 4))),
            r"t1.weight\['momentum1'\]: expected shape \(9, 3\), got \(9, 4\)",
        ),
        (
            lambda s: replace(s, "t2", momentum2=np.full((6, 4), np.inf)),
            r"t2.weight\['momentum2'\]: holds a non-finite value",
        ),
        (lambda s: replace(s, "t1", step=-1), r"t1.weight\['step'\]: expected a whole number"),
        (lambda s: replace(s, "t1", step=1.5), r"t1.weight\['step'\]: expected a whole number"),
        (lambda s: replace(s, "t1", step=np.ones(2)), r"t1.weight\['step'\]: expected a real"),
        (
            lambda s: replace(s, "t2", step=3),
            r"tables \['embedding_bags.t2.weight', 'embedding_bags.t3.weight'\] share one "
            r"stacked group \(one step count\) but have different steps \[3.0, 0.0\]",
        ),
        (lambda s: {**s, T1: s[T1]["momentum1"]}, r"t1.weight: expected a mapping"),
    ],
)
def test_load_optimizer_state_dict_refuses_with_the_key_named(adam_setup, change, message):
    ebc, variables, state = adam_setup
    with pytest.raises(ValueError, match=message):
        ebc.load_optimizer_state_dict(variables, change(state))


def test_optimizer_state_of_a_table_without_a_fused_optimizer_is_refused():
    ebc = EmbeddingBagCollection(
        tables=[bag("t1", 3, 9, ["fa"]), bag("t2", 4, 6, ["fb"])],
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1),
        table_optimizers={"t2": None},
    )
    kjt = KeyedJaggedTensor(keys=["fa", "fb"], values=np.array([1, 2]), lengths=np.array([1, 1]))
    variables = ebc.init(jax.random.key(0), kjt)
    state = ebc.optimizer_state_dict(variables)
    assert set(state) == {T1}
    bad = {**state, "embedding_bags.t2.weight": {"momentum1": np.zeros(6), "step": 0}}
    with pytest.raises(ValueError, match=r"\['embedding_bags.t2.weight'\], which have no fused"):
        ebc.load_optimizer_state_dict(variables, bad)
    plain = fp16_and_fp32()
    plain_variables = plain.init(jax.random.key(0), features(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="no table of this collection has a fused optimizer"):
        plain.load_optimizer_state_dict(plain_variables, state)
