"""Position-weighted features: semantics, TorchRec's state-dict names and numerics, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrec
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    FeatureProcessedEmbeddingBagCollection,
    JaggedTensor,
    KeyedJaggedTensor,
    PositionWeightedModule,
    PositionWeightedModuleCollection,
    pad_to_capacity,
)

KEYS = ["f1", "f2", "f3"]
MAX_LENGTHS = {"f1": 4, "f2": 3, "f3": 5}
BATCH = 4


def tables():
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
        EmbeddingBagConfig(
            name="t2", embedding_dim=4, num_embeddings=8, feature_names=["f2", "f3"]
        ),
    ]


def random_kjt(rng):
    lengths = np.stack([rng.integers(0, MAX_LENGTHS[k] + 1, BATCH) for k in KEYS])
    rows = {"f1": 10, "f2": 8, "f3": 8}
    values = np.concatenate(
        [rng.integers(0, rows[k], n) for k, n in zip(KEYS, lengths.sum(1), strict=True)]
    )
    return KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths.reshape(-1))


def numpy_position_weights(kjt, tables_by_key):
    lengths = np.asarray(kjt.lengths()).reshape(len(kjt.keys()), kjt.stride())
    out = []
    for k, key in enumerate(kjt.keys()):
        for n in lengths[k]:
            out.extend(tables_by_key[key][:n] if key in tables_by_key else np.ones(n))
    return np.array(out)


def fp_ebc(kind, ebc=None):
    ebc = ebc or EmbeddingBagCollection(tables=tables(), is_weighted=True)
    if kind == "collection":
        return FeatureProcessedEmbeddingBagCollection(
            ebc, PositionWeightedModuleCollection(MAX_LENGTHS)
        )
    return FeatureProcessedEmbeddingBagCollection(
        ebc, {k: PositionWeightedModule(n) for k, n in MAX_LENGTHS.items()}
    )


def random_state(rng, module, variables):
    return {
        k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
        for k, v in module.state_dict(variables).items()
    }


def test_collection_weights_by_position_ones_for_unlisted_keys_and_replaces_input_weights():
    rng = np.random.default_rng(0)
    kjt = random_kjt(rng)
    kjt = KeyedJaggedTensor(
        keys=KEYS, values=kjt.values(), lengths=kjt.lengths(), weights=np.full(kjt.capacity(), 7.0)
    )
    pwc = PositionWeightedModuleCollection({"f1": 4, "f3": 5})
    variables = pwc.init(jax.random.key(0), kjt)
    assert all(bool((v == 1).all()) for v in jax.tree.leaves(variables))
    state = {"position_weights.f1": rng.normal(size=4), "position_weights.f3": rng.normal(size=5)}
    variables = pwc.load_state_dict(variables, state)
    got = pwc.apply(variables, kjt)
    want = numpy_position_weights(
        kjt, {"f1": state["position_weights.f1"], "f3": state["position_weights.f3"]}
    )
    np.testing.assert_allclose(got.weights(), want, rtol=1e-6)
    assert got.keys() == KEYS and got.values() is kjt.values()


def test_padded_input_under_jit_and_a_bag_past_max_length():
    rng = np.random.default_rng(1)
    kjt = random_kjt(rng)
    pwc = PositionWeightedModuleCollection(MAX_LENGTHS)
    variables = pwc.init(jax.random.key(0), kjt)
    state = {f"position_weights.{k}": rng.normal(size=n) for k, n in MAX_LENGTHS.items()}
    variables = pwc.load_state_dict(variables, state)
    padded = pad_to_capacity(kjt, kjt.capacity() + 5)
    got = jax.jit(lambda v, x: pwc.apply(v, x).weights())(variables, padded)
    want = numpy_position_weights(kjt, {k: state[f"position_weights.{k}"] for k in MAX_LENGTHS})
    np.testing.assert_allclose(got[: kjt.capacity()], want, rtol=1e-6)
    assert not np.any(np.asarray(got)[kjt.capacity() :])

    long = KeyedJaggedTensor(keys=["f1"], values=np.arange(6), lengths=np.array([1, 5]))
    small = PositionWeightedModuleCollection({"f1": 4})
    small_vars = small.init(
        jax.random.key(0), KeyedJaggedTensor(keys=["f1"], values=[0], lengths=[1])
    )
    with pytest.raises(ValueError, match="feature 'f1': bag 1 has 5 ids, more than its 4"):
        small.apply(small_vars, long)
    traced = jax.jit(lambda x: small.apply(small_vars, x).weights())(long)
    np.testing.assert_array_equal(traced, [1, 1, 1, 1, 1, 0])  # the fifth id is dropped


def test_single_feature_module_and_bad_arguments():
    pw = PositionWeightedModule(max_feature_length=3)
    jt = JaggedTensor(values=jnp.array([4, 5, 6, 7]), lengths=jnp.array([3, 0, 1]))
    variables = pw.load_state_dict(pw.init(jax.random.key(0), jt), {"position_weight": [2, 3, 4]})
    np.testing.assert_array_equal(pw.apply(variables, jt).weights(), [2, 3, 4, 2])
    with pytest.raises(ValueError, match="position_weight: expected shape"):
        pw.load_state_dict(variables, {"position_weight": [1.0, 2.0]})
    with pytest.raises(ValueError, match="missing keys"):
        pw.load_state_dict(variables, {})
    with pytest.raises(ValueError, match="max_feature_length"):
        PositionWeightedModule(max_feature_length=0)
    with pytest.raises(ValueError, match=r"max_feature_lengths\['a'\]"):
        PositionWeightedModuleCollection({"a": -1})
    unweighted = EmbeddingBagCollection(tables=tables())
    with pytest.raises(ValueError, match="is_weighted=True"):
        FeatureProcessedEmbeddingBagCollection(
            unweighted, PositionWeightedModuleCollection({"f1": 2})
        )
    ebc = EmbeddingBagCollection(tables=tables(), is_weighted=True)
    with pytest.raises(ValueError, match="name each feature once"):
        FeatureProcessedEmbeddingBagCollection(ebc, {"f1": PositionWeightedModule(2)})


@pytest.mark.parametrize("kind", ["collection", "dict"])
def test_state_dict_round_trip_and_refusals(kind):
    rng = np.random.default_rng(2)
    kjt = random_kjt(rng)
    module = fp_ebc(kind)
    variables = module.init(jax.random.key(0), kjt)
    state = random_state(rng, module, variables)
    loaded = module.state_dict(module.load_state_dict(variables, state))
    assert list(loaded) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(loaded[k], v)
    name = next(k for k in state if "position_weight" in k)
    with pytest.raises(ValueError, match="expected shape"):
        module.load_state_dict(variables, {**state, name: np.ones(9)})
    with pytest.raises(ValueError, match="unexpected keys"):
        module.load_state_dict(variables, {**state, "extra": np.ones(1)})


def torchrec_fp_ebc(kind):
    torch = pytest.importorskip("torch")
    torchrec = pytest.importorskip("torchrec")
    from torchrec.modules.feature_processor_ import (
        PositionWeightedModule as TorchPW,
    )
    from torchrec.modules.feature_processor_ import (
        PositionWeightedModuleCollection as TorchPWC,
    )
    from torchrec.modules.fp_embedding_modules import (
        FeatureProcessedEmbeddingBagCollection as TorchFP,
    )

    ebc = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.embedding_dim,
                num_embeddings=t.num_embeddings,
                feature_names=list(t.feature_names),
            )
            for t in tables()
        ],
        is_weighted=True,
    )
    if kind == "collection":
        processors = TorchPWC(dict(MAX_LENGTHS))
    else:
        processors = {k: TorchPW(n) for k, n in MAX_LENGTHS.items()}
    return torch, torchrec, TorchFP(ebc, processors)


@pytest.mark.parametrize("kind", ["collection", "dict"])
def test_forward_and_position_weight_gradients_match_torchrec(kind):
    torch, torchrec, theirs = torchrec_fp_ebc(kind)
    rng = np.random.default_rng(3)
    kjt = random_kjt(rng)
    ours = fp_ebc(kind)
    variables = ours.init(jax.random.key(0), kjt)
    assert set(ours.state_dict(variables)) == set(theirs.state_dict())
    state = random_state(rng, ours, variables)
    variables = ours.load_state_dict(variables, state)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    g_out = rng.normal(size=(BATCH, 11)).astype(np.float32)

    def loss(params):
        return jnp.sum(ours.apply({"params": params}, kjt).values() * g_out)

    grads = ours.state_dict({"params": jax.grad(loss)(variables["params"])})
    tr_kjt = torchrec.KeyedJaggedTensor(
        keys=KEYS,
        values=torch.from_numpy(np.array(kjt.values(), np.int64)),
        lengths=torch.from_numpy(np.array(kjt.lengths(), np.int64)),
    )
    out = theirs(tr_kjt)
    np.testing.assert_allclose(
        ours.apply(variables, kjt).values(), out.values().detach().numpy(), rtol=1e-5, atol=1e-6
    )
    (out.values() * torch.from_numpy(g_out)).sum().backward()
    for name, param in theirs.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert any("position_weight" in name for name, _ in theirs.named_parameters())


def test_position_weights_train_with_the_dense_optimizer_beside_fused_tables():
    rng = np.random.default_rng(4)
    lr, table_lr = 0.1, 0.5
    kjt = random_kjt(rng)
    fused_ebc = EmbeddingBagCollection(
        tables=tables(),
        is_weighted=True,
        optimizer=jaxrec.optim.exact_sgd(learning_rate=table_lr),
    )
    plain_ebc = EmbeddingBagCollection(tables=tables(), is_weighted=True)
    fused, plain = fp_ebc("collection", fused_ebc), fp_ebc("collection", plain_ebc)
    plain_vars = plain.init(jax.random.key(0), kjt)
    plain_vars = plain.load_state_dict(plain_vars, random_state(rng, plain, plain_vars))
    params = fused.load_state_dict(
        fused.init(jax.random.key(1), kjt), plain.state_dict(plain_vars)
    )["params"]
    g_out = jnp.asarray(rng.normal(size=(BATCH, 11)), jnp.float32)

    def loss(module, params):
        return jnp.sum(module.apply({"params": params}, kjt).values() * g_out)

    want_grads = plain.state_dict(
        {"params": jax.grad(functools.partial(loss, plain))(plain_vars["params"])}
    )
    tx = jaxrec.optim.fused(optax.sgd(lr))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(functools.partial(loss, fused))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state

    new = fused.state_dict({"params": step(params, opt_state)[0]})
    for name, old in plain.state_dict(plain_vars).items():
        step_lr = lr if "position_weights" in name else table_lr
        np.testing.assert_allclose(
            new[name], old - step_lr * want_grads[name], rtol=1e-5, atol=1e-6
        )
        if "position_weights" in name:
            assert float(jnp.abs(new[name] - old).max()) > 1e-3
