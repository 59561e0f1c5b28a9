"""The lookup's custom VJP: fused optimizer updates through the modules, end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from float64_optimizers import reference_step, zero_state

import jaxrec
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
    pad_to_capacity,
)
from jaxrec.optim import FusedTableParams


def random_kjt(rng, keys, rows, batch, max_len=6, weighted=False, capacity=None):
    lengths = rng.integers(0, max_len + 1, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[k * batch : (k + 1) * batch].sum())
            for k in range(len(keys))
        ]
    )
    weights = rng.uniform(0.5, 1.5, values.shape).astype(np.float32) if weighted else None
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
    return kjt if capacity is None else pad_to_capacity(kjt, capacity)


def tables(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(
            name="a", embedding_dim=4, num_embeddings=9, feature_names=["fa", "fb"], pooling=pooling
        ),
        EmbeddingBagConfig(
            name="b", embedding_dim=3, num_embeddings=6, feature_names=["fc"], pooling=pooling
        ),
    ]


KEYS, ROWS = ["fa", "fb", "fc"], [9, 9, 6]


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_exact_sgd_equals_dense_grad_then_sgd(pooling, weighted):
    rng = np.random.default_rng(0)
    lr = 0.3
    kjt = random_kjt(rng, KEYS, ROWS, batch=5, weighted=weighted)
    plain = EmbeddingBagCollection(tables=tables(pooling), is_weighted=weighted)
    fused = EmbeddingBagCollection(
        tables=tables(pooling),
        is_weighted=weighted,
        optimizer=jaxrec.optim.exact_sgd(learning_rate=lr),
    )
    variables = plain.init(jax.random.key(0), kjt)
    fused_vars = fused.load_state_dict(
        fused.init(jax.random.key(1), kjt), plain.state_dict(variables)
    )
    g_out = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)

    def loss(module, params):
        return jnp.sum(module.apply({"params": params}, kjt).values() * g_out)

    dense_grads = jax.grad(functools.partial(loss, plain))(variables["params"])
    expected = {
        k: v - lr * g
        for (k, v), g in zip(
            plain.state_dict(variables).items(),
            plain.state_dict({"params": dense_grads}).values(),
            strict=True,
        )
    }
    grads = jax.grad(functools.partial(loss, fused))(fused_vars["params"])
    new_params = jaxrec.optim.apply_updates(fused_vars["params"], grads)
    for name, table in fused.state_dict({"params": new_params}).items():
        np.testing.assert_allclose(
            np.asarray(table), np.asarray(expected[name]), rtol=1e-5, atol=1e-6
        )


def numpy_rowwise_adagrad(tables_np, state_np, kjt, g_out, lr, eps, keys, features_of_table, dims):
    """float64 reference: sum each row's gradient over occurrences, then the row-wise rule."""
    values = np.asarray(kjt.values())
    offsets = np.asarray(kjt.offsets())
    batch = kjt.stride()
    col = 0
    grads = {t: np.zeros_like(w) for t, w in tables_np.items()}
    for k, key in enumerate(keys):
        table = features_of_table[key]
        for b in range(batch):
            lo, hi = offsets[k * batch + b], offsets[k * batch + b + 1]
            for i in range(lo, hi):
                grads[table][values[i]] += g_out[b, col : col + dims[table]]
        col += dims[table]
    for t, w in tables_np.items():
        touched = np.abs(grads[t]).sum(axis=1) > 0
        g = grads[t][touched]
        state_np[t][touched] += (g * g).mean(axis=1)
        w[touched] -= lr * g / (np.sqrt(state_np[t][touched])[:, None] + eps)
    return tables_np, state_np


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fused_rowwise_adagrad_training_loop_matches_float64_reference(backend):
    rng = np.random.default_rng(1)
    lr, eps = 0.1, 1e-8
    ebc = EmbeddingBagCollection(
        tables=tables(),
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=lr, eps=eps),
        backend=backend,
    )
    first = random_kjt(rng, KEYS, ROWS, batch=4, capacity=128)
    params = ebc.init(jax.random.key(0), first)["params"]
    tables_np = {
        k.split(".")[1]: np.asarray(v, np.float64)
        for k, v in ebc.state_dict({"params": params}).items()
    }
    state_np = {t: np.zeros(w.shape[0]) for t, w in tables_np.items()}
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, kjt, g_out):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state

    for _ in range(5):
        kjt = random_kjt(rng, KEYS, ROWS, batch=4, capacity=128)
        g_out = rng.normal(size=(4, 11)).astype(np.float32)
        params, opt_state = step(params, opt_state, kjt, jnp.asarray(g_out))
        tables_np, state_np = numpy_rowwise_adagrad(
            tables_np,
            state_np,
            kjt,
            g_out.astype(np.float64),
            lr,
            eps,
            KEYS,
            {"fa": "a", "fb": "a", "fc": "b"},
            {"a": 4, "b": 3},
        )
    got = ebc.state_dict({"params": params})
    for t in ("a", "b"):
        np.testing.assert_allclose(
            np.asarray(got[f"embedding_bags.{t}.weight"]), tables_np[t], rtol=1e-5, atol=1e-6
        )
    opt = ebc.optimizer_state_dict({"params": params})
    np.testing.assert_allclose(
        np.asarray(opt["embedding_bags.a.weight"]["momentum1"]), state_np["a"], rtol=1e-5
    )
    assert float(opt["embedding_bags.a.weight"]["step"]) == 5.0


def test_fused_embedding_collection_sgd_moves_only_looked_up_rows():
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=6, feature_names=["f"])],
        optimizer=jaxrec.optim.exact_sgd(learning_rate=1.0),
    )
    kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1, 4, 1]), lengths=jnp.array([2, 1]))
    params = ec.init(jax.random.key(0), kjt)["params"]
    before = np.asarray(ec.state_dict({"params": params})["embeddings.t.weight"])
    grads = jax.grad(lambda p: jnp.sum(ec.apply({"params": p}, kjt)["f"].values()))(params)
    after = np.asarray(
        ec.state_dict({"params": jaxrec.optim.apply_updates(params, grads)})["embeddings.t.weight"]
    )
    expected = before.copy()
    expected[1] -= 2.0  # looked up twice
    expected[4] -= 1.0
    np.testing.assert_allclose(after, expected, rtol=1e-6)


def test_table_used_in_two_lookups_is_refused():
    ebc = EmbeddingBagCollection(
        tables=tables(), optimizer=jaxrec.optim.exact_sgd(learning_rate=0.1)
    )
    kjt = random_kjt(np.random.default_rng(0), KEYS, ROWS, batch=2)
    params = ebc.init(jax.random.key(0), kjt)["params"]
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    grads = jax.grad(
        lambda p: (
            jnp.sum(ebc.apply({"params": p}, kjt).values())
            + jnp.sum(ebc.apply({"params": p}, kjt).values())
        )
    )(params)
    with pytest.raises(ValueError, match="entered 2 fused lookups"):
        tx.update(grads, tx.init(params), params)


def test_gradient_accumulation_of_fused_tables_is_refused():
    ebc = EmbeddingBagCollection(
        tables=tables(), optimizer=jaxrec.optim.exact_sgd(learning_rate=0.1)
    )
    rng = np.random.default_rng(0)
    params = ebc.init(jax.random.key(0), random_kjt(rng, KEYS, ROWS, batch=2))["params"]
    grad = jax.grad(lambda p, k: jnp.sum(ebc.apply({"params": p}, k).values()))
    total = jax.tree.map(
        jnp.add,
        grad(params, random_kjt(rng, KEYS, ROWS, batch=2)),
        grad(params, random_kjt(rng, KEYS, ROWS, batch=2)),
    )
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    with pytest.raises(ValueError, match="gradients were accumulated"):
        tx.update(total, tx.init(params), params)


def test_fused_params_carry_the_optimizer_state():
    ebc = EmbeddingBagCollection(tables=tables(), optimizer=jaxrec.optim.adam(learning_rate=0.1))
    params = ebc.init(jax.random.key(0), random_kjt(np.random.default_rng(0), KEYS, ROWS, batch=2))[
        "params"
    ]
    group = params["embedding_bags"]["sum_float32_d4"]
    assert isinstance(group, FusedTableParams)
    assert group.state["momentum1"].shape == (9, 4) and group.state["momentum2"].shape == (9, 4)
    names = ebc.optimizer_state_dict({"params": params})
    assert set(names) == {"embedding_bags.a.weight", "embedding_bags.b.weight"}
    assert names["embedding_bags.b.weight"]["momentum1"].shape == (6, 3)


FULL_HYPERPARAMETERS = {
    "EXACT_SGD": (jaxrec.optim.exact_sgd, dict(learning_rate=0.1)),
    "EXACT_ADAGRAD": (jaxrec.optim.exact_adagrad, dict(learning_rate=0.1, eps=1e-8)),
    "EXACT_ROWWISE_ADAGRAD": (
        jaxrec.optim.exact_rowwise_adagrad,
        dict(
            learning_rate=0.1,
            eps=1e-8,
            weight_decay=0.01,
            weight_decay_mode="DECOUPLE",
            max_norm=0.0,
        ),
    ),
    "ADAM": (
        jaxrec.optim.adam,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    ),
    "PARTIAL_ROWWISE_ADAM": (
        jaxrec.optim.partial_rowwise_adam,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    ),
    "LAMB": (
        jaxrec.optim.lamb,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    ),
    "PARTIAL_ROWWISE_LAMB": (
        jaxrec.optim.partial_rowwise_lamb,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01),
    ),
    "LARS_SGD": (
        jaxrec.optim.lars_sgd,
        dict(learning_rate=0.1, eta=0.001, momentum=0.9, weight_decay=0.01),
    ),
}


def numpy_row_gradients(kjt, g_out, features, dims, tables_np):
    """Loop oracle: each table row's gradient summed over its occurrences, and the touched rows."""
    values, offsets, weights = (
        np.asarray(kjt.values()),
        np.asarray(kjt.offsets()),
        np.asarray(kjt.weights()),
    )
    batch = kjt.stride()
    grads = {t: np.zeros_like(w) for t, w in tables_np.items()}
    touched = {t: np.zeros(w.shape[0], bool) for t, w in tables_np.items()}
    col = 0
    for k, (table, mean) in enumerate(features):
        for b in range(batch):
            lo, hi = offsets[k * batch + b], offsets[k * batch + b + 1]
            for i in range(lo, hi):
                scale = weights[i] / (hi - lo if mean else 1)
                grads[table][values[i]] += scale * g_out[b, col : col + dims[table]]
                touched[table][values[i]] = True
        col += dims[table]
    return grads, touched


@pytest.mark.parametrize("name", sorted(FULL_HYPERPARAMETERS))
def test_every_optimizer_through_the_collection_matches_float64_over_five_steps(name):
    make, hyper = FULL_HYPERPARAMETERS[name]
    rng = np.random.default_rng(7)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="a", embedding_dim=4, num_embeddings=9, feature_names=["fa", "fb"]
            ),
            EmbeddingBagConfig(
                name="b",
                embedding_dim=3,
                num_embeddings=6,
                feature_names=["fc"],
                pooling=PoolingType.MEAN,
            ),
        ],
        is_weighted=True,
        optimizer=make(**hyper),
    )
    features, dims = [("a", False), ("a", False), ("b", True)], {"a": 4, "b": 3}
    batches = [random_kjt(rng, KEYS, ROWS, batch=4, weighted=True, capacity=128) for _ in range(5)]
    params = ebc.init(jax.random.key(3), batches[0])["params"]
    tables_np = {
        t: np.asarray(ebc.state_dict({"params": params})[f"embedding_bags.{t}.weight"], np.float64)
        for t in dims
    }
    states_np = {t: zero_state(name, (w.shape[0],), w.shape[1]) for t, w in tables_np.items()}
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, kjt, g_out):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state

    for t_step, kjt in enumerate(batches, start=1):
        g_out = rng.normal(size=(4, 11)).astype(np.float32)
        params, opt_state = step(params, opt_state, kjt, jnp.asarray(g_out))
        grads, touched = numpy_row_gradients(
            kjt, g_out.astype(np.float64), features, dims, tables_np
        )
        for t in dims:
            rows = touched[t]
            state_rows = {k: v[rows] for k, v in states_np[t].items()}
            new_w, new_s = reference_step(
                name, hyper, tables_np[t][rows], state_rows, grads[t][rows], t_step
            )
            tables_np[t][rows] = new_w
            for k in new_s:
                states_np[t][k][rows] = new_s[k]
    got = ebc.state_dict({"params": params})
    got_state = ebc.optimizer_state_dict({"params": params})
    for t in dims:
        np.testing.assert_allclose(
            np.asarray(got[f"embedding_bags.{t}.weight"]), tables_np[t], rtol=2e-5, atol=2e-6
        )
        for k, v in states_np[t].items():
            np.testing.assert_allclose(
                np.asarray(got_state[f"embedding_bags.{t}.weight"][k]), v, rtol=2e-5, atol=2e-6
            )


def two_tables(**kw):
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="a", embedding_dim=4, num_embeddings=9, feature_names=["fa", "fb"]
            ),
            EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=6, feature_names=["fc"]),
        ],
        **kw,
    )


def test_per_table_optimizers_stack_apart_and_follow_their_own_rules():
    sgd = dict(learning_rate=0.3)
    adagrad = dict(learning_rate=0.1, eps=1e-8)
    ebc = two_tables(
        optimizer=jaxrec.optim.exact_sgd(**sgd),
        table_optimizers={"b": jaxrec.optim.exact_adagrad(**adagrad)},
    )
    assert [g.name for g in ebc.plan.groups] == ["sum_float32_d4", "sum_float32_d4_o1"]
    rng = np.random.default_rng(2)
    kjt = random_kjt(rng, KEYS, [9, 9, 6], batch=3, weighted=False)
    params = ebc.init(jax.random.key(0), kjt)["params"]
    before = {k: np.asarray(v, np.float64) for k, v in ebc.state_dict({"params": params}).items()}
    g_out = rng.normal(size=(3, 12)).astype(np.float32)
    grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out))(params)
    after = ebc.state_dict({"params": jaxrec.optim.apply_updates(params, grads)})
    ones = KeyedJaggedTensor(
        keys=KEYS,
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=np.ones(kjt.capacity(), np.float32),
    )
    row_grads, touched = numpy_row_gradients(
        ones,
        g_out.astype(np.float64),
        [("a", False), ("a", False), ("b", False)],
        {"a": 4, "b": 4},
        {"a": before["embedding_bags.a.weight"], "b": before["embedding_bags.b.weight"]},
    )
    for t, name, hyper in (("a", "EXACT_SGD", sgd), ("b", "EXACT_ADAGRAD", adagrad)):
        want = before[f"embedding_bags.{t}.weight"].copy()
        rows = touched[t]
        state = zero_state(name, (int(rows.sum()),), 4)
        want[rows], _ = reference_step(name, hyper, want[rows], state, row_grads[t][rows], 1)
        np.testing.assert_allclose(
            np.asarray(after[f"embedding_bags.{t}.weight"]), want, rtol=1e-5, atol=1e-6
        )
    states = ebc.optimizer_state_dict({"params": params})
    assert set(states["embedding_bags.a.weight"]) == {"step"}  # SGD keeps no row state
    assert set(states["embedding_bags.b.weight"]) == {"momentum1", "step"}


def test_a_weight_tied_table_takes_the_unfused_path_beside_fused_ones():
    lr = 0.2
    ebc = two_tables(
        optimizer=jaxrec.optim.exact_sgd(learning_rate=lr), table_optimizers={"b": None}
    )
    rng = np.random.default_rng(4)
    kjt = random_kjt(rng, KEYS, [9, 9, 6], batch=3)
    params = ebc.init(jax.random.key(0), kjt)["params"]
    groups = params["embedding_bags"]
    assert isinstance(groups["sum_float32_d4"], FusedTableParams)
    assert not isinstance(groups["sum_float32_d4_o1"], FusedTableParams)
    assert set(ebc.optimizer_state_dict({"params": params})) == {"embedding_bags.a.weight"}
    g_out = rng.normal(size=(3, 12)).astype(np.float32)

    def loss(p):  # table b is also used outside the lookup (weight tying)
        tied = p["embedding_bags"]["sum_float32_d4_o1"]
        return jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out) + jnp.sum(tied**2)

    tx = jaxrec.optim.fused(optax.sgd(lr))
    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jaxrec.optim.apply_updates(params, updates)
    plain = two_tables()
    plain_params = plain.load_state_dict(
        {"params": {"embedding_bags": {"sum_float32_d4": jnp.zeros((15, 4))}}},
        ebc.state_dict({"params": params}),
    )["params"]
    dense = jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, kjt).values() * g_out))(
        plain_params
    )
    dense_b = np.asarray(plain.state_dict({"params": dense})["embedding_bags.b.weight"])
    b = np.asarray(ebc.state_dict({"params": params})["embedding_bags.b.weight"])
    np.testing.assert_allclose(
        np.asarray(ebc.state_dict({"params": new})["embedding_bags.b.weight"]),
        b - lr * (dense_b + 2 * b),
        rtol=1e-5,
        atol=1e-6,
    )


def test_table_optimizers_naming_an_unknown_table_is_refused():
    with pytest.raises(ValueError, match=r"table_optimizers names unknown tables \['zz'\]"):
        two_tables(optimizer=jaxrec.optim.exact_sgd(), table_optimizers={"zz": None})


# Per-sample weight gradients ---------------------------------------------------------------

WG_TABLES_ROWS = {"a": 9, "b": 6, "c": 7}


def weight_grad_tables(pooling):
    """Three tables in two groups of mixed dims (4, 3), feature fa read by two tables."""

    def table(name, dim, features):
        return EmbeddingBagConfig(
            name=name,
            embedding_dim=dim,
            num_embeddings=WG_TABLES_ROWS[name],
            feature_names=features,
            pooling=pooling,
        )

    return [table("a", 4, ["fa", "fb"]), table("b", 3, ["fc"]), table("c", 4, ["fd"])]


WG_KEYS, WG_ROWS = ["fa", "fb", "fc", "fd"], [7, 9, 6, 7]
WG_TABLE_OF = {"fa": "a", "fb": "a", "fc": "b", "fd": "c"}


def plain_pooled(tables_by_name, kjt, weights, pooling):
    """The weighted pooled output written with a plain gather and ``segment_sum``."""
    values = np.asarray(kjt.values())
    lengths = np.asarray(kjt.lengths()).reshape(len(kjt.keys()), kjt.stride())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    outs = []
    for k, key in enumerate(kjt.keys()):
        lo, n = offsets[k * kjt.stride()], lengths[k].sum()
        bags = np.repeat(np.arange(kjt.stride()), lengths[k])
        rows = tables_by_name[WG_TABLE_OF[key]][values[lo : lo + n]] * weights[lo : lo + n, None]
        pooled = jax.ops.segment_sum(rows, bags, num_segments=kjt.stride())
        if pooling == PoolingType.MEAN:
            pooled = pooled / np.maximum(lengths[k], 1)[:, None]
        outs.append(pooled)
    return jnp.concatenate(outs, axis=1)


def weighted_kjt(kjt, weights):
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights
    )


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_per_sample_weight_gradient_equals_autodiff_of_the_plain_formula(backend, pooling):
    rng = np.random.default_rng(20)
    kjt = random_kjt(rng, WG_KEYS, WG_ROWS, batch=5, weighted=True, capacity=80)
    ebc = EmbeddingBagCollection(
        tables=weight_grad_tables(pooling), is_weighted=True, backend=backend
    )
    variables = ebc.init(jax.random.key(0), kjt)
    assert len(ebc.plan.groups) == 2
    g_out = jnp.asarray(rng.normal(size=(5, 15)), jnp.float32)
    by_name = {k.split(".")[1]: v for k, v in ebc.state_dict(variables).items()}

    def loss(weights):
        return jnp.sum(ebc.apply(variables, weighted_kjt(kjt, weights)).values() * g_out)

    def plain_loss(weights):
        return jnp.sum(plain_pooled(by_name, kjt, weights, pooling) * g_out)

    got = jax.jit(jax.grad(loss))(kjt.weights())
    want = jax.grad(plain_loss)(kjt.weights())
    assert float(jnp.abs(want).max()) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fused_step_gives_the_weight_gradient_of_the_old_tables_and_the_right_update(backend):
    rng = np.random.default_rng(21)
    lr = 0.5
    kjt = random_kjt(rng, WG_KEYS, WG_ROWS, batch=4, weighted=True, capacity=64)
    tables = weight_grad_tables(PoolingType.MEAN)
    plain = EmbeddingBagCollection(tables=tables, is_weighted=True, backend=backend)
    fused = EmbeddingBagCollection(
        tables=tables,
        is_weighted=True,
        backend=backend,
        optimizer=jaxrec.optim.exact_sgd(learning_rate=lr),
    )
    variables = plain.init(jax.random.key(1), kjt)
    fused_params = fused.load_state_dict(
        fused.init(jax.random.key(2), kjt), plain.state_dict(variables)
    )["params"]
    g_out = jnp.asarray(rng.normal(size=(4, 15)), jnp.float32)

    def loss(module, params, weights):
        out = module.apply({"params": params}, weighted_kjt(kjt, weights)).values()
        return jnp.sum(out * g_out)

    want_params, want_weights = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(
        variables["params"], kjt.weights()
    )
    got_params, got_weights = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(0, 1)))(
        fused_params, kjt.weights()
    )
    np.testing.assert_allclose(got_weights, want_weights, rtol=1e-5, atol=1e-6)
    new_tables = fused.state_dict({"params": jaxrec.optim.apply_updates(fused_params, got_params)})
    dense_grads = plain.state_dict({"params": want_params})
    for name, old in plain.state_dict(variables).items():
        np.testing.assert_allclose(
            new_tables[name], old - lr * dense_grads[name], rtol=1e-5, atol=1e-6
        )


def test_weight_gradient_is_zero_for_padding_and_bad_ids():
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])
        ],
        is_weighted=True,
        backend="xla",
        bounds_check_mode="ignore",
    )

    def kjt_of(values):
        kjt = KeyedJaggedTensor(
            keys=["f"], values=jnp.array(values), lengths=jnp.array([2, 1]), weights=jnp.ones(3)
        )
        return pad_to_capacity(kjt, 6)

    variables = ebc.init(jax.random.key(0), kjt_of([1, 2, 0]))

    @jax.jit
    def grad(kjt):
        def loss(w):
            return jnp.sum(ebc.apply(variables, weighted_kjt(kjt, w)).values())

        return jax.grad(loss)(kjt.weights())

    got = np.asarray(grad(kjt_of([1, 7, -1])))  # 7 and -1 are outside the table
    row = np.asarray(ebc.state_dict(variables)["embedding_bags.t.weight"][1])
    np.testing.assert_allclose(got, [row.sum(), 0, 0, 0, 0, 0], rtol=1e-6)


def test_per_sample_weight_gradient_matches_torchrec():
    torch = pytest.importorskip("torch")
    torchrec = pytest.importorskip("torchrec")
    rng = np.random.default_rng(22)
    kjt = random_kjt(rng, WG_KEYS, WG_ROWS, batch=5, weighted=True)
    ebc = EmbeddingBagCollection(tables=weight_grad_tables(PoolingType.SUM), is_weighted=True)
    variables = ebc.init(jax.random.key(0), kjt)
    g_out = rng.normal(size=(5, 15)).astype(np.float32)
    got = jax.grad(lambda w: jnp.sum(ebc.apply(variables, weighted_kjt(kjt, w)).values() * g_out))(
        kjt.weights()
    )

    tr_ebc = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(
                name=t.name,
                embedding_dim=t.embedding_dim,
                num_embeddings=t.num_embeddings,
                feature_names=list(t.feature_names),
            )
            for t in weight_grad_tables(PoolingType.SUM)
        ],
        is_weighted=True,
    )
    tr_ebc.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in ebc.state_dict(variables).items()}
    )
    weights = torch.from_numpy(np.array(kjt.weights())).requires_grad_()
    tr_kjt = torchrec.KeyedJaggedTensor(
        keys=WG_KEYS,
        values=torch.from_numpy(np.array(kjt.values(), np.int64)),
        lengths=torch.from_numpy(np.array(kjt.lengths(), np.int64)),
        weights=weights,
    )
    out = tr_ebc(tr_kjt)
    assert out.keys() == WG_KEYS
    (out.values() * torch.from_numpy(g_out)).sum().backward()
    np.testing.assert_allclose(got, weights.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (forced host) devices")
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_row_sharded_weight_gradient_equals_one_device(backend):
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from jaxrec.parallel import row_partition_specs, shard_rows

    rng = np.random.default_rng(23)
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=16, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=8, feature_names=["fb"]),
    ]
    kjt = random_kjt(rng, ["fa", "fb"], [16, 8], batch=4, weighted=True)
    single = EmbeddingBagCollection(tables=tables, is_weighted=True, backend=backend)
    sharded = EmbeddingBagCollection(
        tables=tables, is_weighted=True, backend=backend, row_shard_axis="rows"
    )
    params = single.init(jax.random.key(0), kjt)["params"]
    g_out = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)

    def weight_grad(module, params, weights):
        def loss(w):
            out = module.apply({"params": params}, weighted_kjt(kjt, w)).values()
            return jnp.sum(out * g_out)

        return jax.grad(loss)(weights)

    want = weight_grad(single, params, kjt.weights())
    mesh = Mesh(np.array(jax.devices()[:4]), ("rows",))
    got = jax.jit(
        jax.shard_map(
            functools.partial(weight_grad, sharded),
            mesh=mesh,
            in_specs=(row_partition_specs(params, mesh, "rows"), P()),
            out_specs=P(),
            check_vma=False,
        )
    )(shard_rows(params, mesh, "rows"), kjt.weights())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weighted_fused_step_that_does_not_differentiate_the_weights_copies_no_table():
    rng = np.random.default_rng(24)
    kjt = random_kjt(rng, WG_KEYS, WG_ROWS, batch=4, weighted=True, capacity=64)
    ebc = EmbeddingBagCollection(
        tables=weight_grad_tables(PoolingType.SUM),
        is_weighted=True,
        backend="xla",
        optimizer=jaxrec.optim.exact_sgd(learning_rate=0.1),
    )
    params = ebc.init(jax.random.key(0), kjt)["params"]
    g_out = jnp.ones((4, 15))

    def grads(params, kjt):
        return jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g_out))(params)

    text = jax.jit(grads, donate_argnums=0).lower(params, kjt).compile().as_text()
    shapes = [f"f32[{rows},{dim}]" for rows, dim in ((16, 4), (6, 3))]
    copies = [line for line in text.splitlines() if " copy(" in line]
    assert not [c for c in copies if any(s in c for s in shapes)], copies
