"""Row-wise sharded tables (XLA SPMD on forced host devices) against one device."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from jaxrec.ops.lookup import lookup
from jaxrec.ops.spec import LookupSpec
from jaxrec.parallel import row_partition_specs, row_shardings, shard_rows

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (forced host) devices")

KEYS = ["fa", "fb", "fc"]
BATCH = 6


def mesh4():
    return Mesh(np.array(jax.devices()[:4]), ("rows",))


def bag_tables(rows=(24, 40, 32)):
    dims = (8, 8, 4)
    return [
        EmbeddingBagConfig(name=f"t{k}", embedding_dim=d, num_embeddings=r, feature_names=[f])
        for k, (f, r, d) in enumerate(zip(KEYS, rows, dims, strict=True))
    ]


def random_kjt(rng, rows=(24, 40, 32), max_len=5):
    lengths = rng.integers(0, max_len, (len(KEYS), BATCH))
    values = np.concatenate(
        [rng.integers(0, r, n.sum()) for r, n in zip(rows, lengths, strict=True)]
    )
    return KeyedJaggedTensor(
        keys=KEYS, values=values.astype(np.int32), lengths=lengths.reshape(-1).astype(np.int32)
    )


def train_step(module, tx, params, opt_state, kjt, g):
    def loss(p):
        out = module.apply({"params": p}, kjt)
        values = out.values() if hasattr(out, "values") else out
        return jnp.sum(values * g)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jaxrec.optim.apply_updates(params, updates), opt_state, value


def table_leaves(params):
    return jax.tree.leaves(params["embedding_bags"])


@pytest.mark.parametrize(
    "optimizer",
    [jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1), jaxrec.optim.adam(learning_rate=0.05)],
    ids=["rowwise-adagrad", "adam"],
)
def test_fused_training_on_row_sharded_tables_matches_one_device(optimizer):
    rng = np.random.default_rng(0)
    ebc = EmbeddingBagCollection(tables=bag_tables(), optimizer=optimizer, backend="xla")
    kjts = [random_kjt(rng) for _ in range(3)]
    g = jnp.asarray(rng.normal(size=(BATCH, 20)), jnp.float32)
    params = ebc.init(jax.random.key(0), kjts[0])["params"]
    tx = jaxrec.optim.fused(optax.sgd(0.0))
    step = jax.jit(functools.partial(train_step, ebc, tx))

    ref, ref_state = params, tx.init(params)
    sharded = shard_rows(params, mesh4(), "rows")
    sh_state = tx.init(sharded)
    for kjt in kjts:
        ref, ref_state, ref_loss = step(ref, ref_state, kjt, g)
        sharded, sh_state, sh_loss = step(sharded, sh_state, kjt, g)
        np.testing.assert_allclose(sh_loss, ref_loss, rtol=1e-6)
    for got, want in zip(table_leaves(sharded), table_leaves(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for group in sharded["embedding_bags"].values():
        assert tuple(group.weight.sharding.spec) == ("rows", None)
        assert len({s.data.shape for s in group.weight.addressable_shards}) == 1
        assert group.weight.addressable_shards[0].data.shape[0] == group.weight.shape[0] // 4


def test_compiled_step_never_gathers_a_whole_table():
    rng = np.random.default_rng(1)
    ebc = EmbeddingBagCollection(
        tables=bag_tables(), optimizer=jaxrec.optim.exact_rowwise_adagrad(), backend="xla"
    )
    kjt = random_kjt(rng)
    params = shard_rows(ebc.init(jax.random.key(0), kjt)["params"], mesh4(), "rows")
    tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=False)
    g = jnp.ones((BATCH, 20))
    hlo = (
        jax.jit(functools.partial(train_step, ebc, tx))
        .lower(params, tx.init(params), kjt, g)
        .compile()
        .as_text()
    )
    table_shapes = {f"[{w.shape[0]},{w.shape[1]}]" for w in table_leaves(params) if w.ndim == 2}
    gathers = [line for line in hlo.splitlines() if "all-gather" in line]
    assert not [line for line in gathers if any(s in line for s in table_shapes)]


def test_sequence_lookup_on_row_sharded_tables_matches_one_device():
    rng = np.random.default_rng(2)
    tables = [
        EmbeddingConfig(name=f"t{k}", embedding_dim=4, num_embeddings=r, feature_names=[f])
        for k, (f, r) in enumerate(zip(KEYS, (24, 40, 32), strict=True))
    ]
    ec = EmbeddingCollection(
        tables=tables, optimizer=jaxrec.optim.exact_sgd(learning_rate=0.5), backend="xla"
    )
    kjt = random_kjt(rng)
    params = ec.init(jax.random.key(0), kjt)["params"]
    sharded = shard_rows(params, mesh4(), "rows")

    @jax.jit
    def step(p):
        def loss(p):
            out = ec.apply({"params": p}, kjt)
            return sum(jnp.sum(jnp.sin(out[k].values())) for k in KEYS)

        grads = jax.grad(loss)(p)
        tx = jaxrec.optim.fused(optax.sgd(0.0))
        updates, _ = tx.update(grads, tx.init(p), p)
        return jaxrec.optim.apply_updates(p, updates)

    for got, want in zip(
        jax.tree.leaves(step(sharded)["embeddings"]),
        jax.tree.leaves(step(params)["embeddings"]),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_plain_tables_train_with_optax_on_row_shards():
    rng = np.random.default_rng(3)
    ebc = EmbeddingBagCollection(tables=bag_tables(), backend="xla")
    kjt = random_kjt(rng)
    g = jnp.asarray(rng.normal(size=(BATCH, 20)), jnp.float32)
    params = ebc.init(jax.random.key(0), kjt)["params"]
    tx = optax.adagrad(0.1)
    step = jax.jit(functools.partial(train_step, ebc, tx))
    sharded = shard_rows(params, mesh4(), "rows")
    got, _, _ = step(sharded, tx.init(sharded), kjt, g)
    want, _, _ = step(params, tx.init(params), kjt, g)
    for a, b in zip(table_leaves(got), table_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        assert tuple(a.sharding.spec) == ("rows", None)


def test_placements_of_a_nested_model():
    rng = np.random.default_rng(4)
    ebc = EmbeddingBagCollection(
        tables=bag_tables(), optimizer=jaxrec.optim.exact_rowwise_adagrad(), backend="xla"
    )
    kjt = random_kjt(rng)
    variables = {
        "params": {
            "sparse": ebc.init(jax.random.key(0), kjt)["params"],
            "dense": {"kernel": jnp.ones((20, 3)), "bias": jnp.zeros(3)},
        }
    }
    shardings = row_shardings(variables, mesh4(), "rows")
    for group in shardings["params"]["sparse"]["embedding_bags"].values():
        assert tuple(group.weight.spec) == ("rows", None)
        assert all(tuple(s.spec) == ("rows",) for s in jax.tree.leaves(group.state))
        assert tuple(group.step.spec) == () and tuple(group.uses.spec) == ()
    assert tuple(shardings["params"]["dense"]["kernel"].spec) == ()


def test_uneven_rows_and_unknown_axes_are_refused_by_name():
    rng = np.random.default_rng(5)
    ebc = EmbeddingBagCollection(tables=bag_tables(rows=(24, 41, 32)), backend="xla")
    params = ebc.init(jax.random.key(0), random_kjt(rng, rows=(24, 41, 32)))["params"]
    with pytest.raises(ValueError, match=r"65 rows.*4 devices.*'rows'"):
        shard_rows(params, mesh4(), "rows")
    with pytest.raises(ValueError, match="no axis 'model'"):
        shard_rows(params, mesh4(), "model")


def shard_map_step(module, tx, mesh, params, opt_state, kjt, g):
    """``train_step`` inside shard_map: tables split by rows, batch whole on every device."""
    param_specs = row_partition_specs(params, mesh, "rows")
    state_specs = row_partition_specs(opt_state, mesh, "rows")
    body = functools.partial(train_step, module, tx)
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(param_specs, state_specs, P(), P()),
            out_specs=(param_specs, state_specs, P()),
            check_vma=False,
        )
    )(params, opt_state, kjt, g)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_shard_map_row_sharded_training_matches_one_device(backend, pooling):
    rng = np.random.default_rng(6)
    tables = [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=t.feature_names,
            pooling=jaxrec.PoolingType.MEAN if pooling == "mean" else jaxrec.PoolingType.SUM,
        )
        for t in bag_tables()
    ]
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1)
    kw = dict(tables=tables, optimizer=optimizer, backend=backend, is_weighted=True)
    single = EmbeddingBagCollection(**kw)
    sharded = EmbeddingBagCollection(**kw, row_shard_axis="rows")
    kjts = []
    for _ in range(2):
        base = random_kjt(rng)
        weights = rng.normal(size=base.values().shape).astype(np.float32)
        kjts.append(
            KeyedJaggedTensor(
                keys=KEYS, values=base.values(), lengths=base.lengths(), weights=weights
            )
        )
    g = jnp.asarray(rng.normal(size=(BATCH, 20)), jnp.float32)
    params = single.init(jax.random.key(0), kjts[0])["params"]
    # init of the sharded collection outside shard_map is the unsharded one
    same = sharded.init(jax.random.key(0), kjts[0])["params"]
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=False)
    mesh = mesh4()
    want, want_state = params, tx.init(params)
    got = shard_rows(params, mesh, "rows")
    got_state = shard_rows(tx.init(params), mesh, "rows")
    step = jax.jit(functools.partial(train_step, single, tx))
    for kjt in kjts:
        want, want_state, want_loss = step(want, want_state, kjt, g)
        got, got_state, got_loss = shard_map_step(sharded, tx, mesh, got, got_state, kjt, g)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for a, b in zip(table_leaves(got), table_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shard_map_row_sharded_sequence_lookup_and_bad_id_count():
    rng = np.random.default_rng(7)
    tables = [
        EmbeddingConfig(name=f"t{k}", embedding_dim=4, num_embeddings=r, feature_names=[f])
        for k, (f, r) in enumerate(zip(KEYS, (24, 40, 32), strict=True))
    ]
    single = EmbeddingCollection(tables=tables, backend="xla")
    sharded = EmbeddingCollection(tables=tables, backend="xla", row_shard_axis="rows")
    kjt = random_kjt(rng)
    values = np.asarray(kjt.values()).copy()
    values[:3] = [-1, 99, 1000]  # three ids outside table t0
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=kjt.lengths())
    params = single.init(jax.random.key(0), random_kjt(rng))["params"]
    mesh = mesh4()
    specs = row_partition_specs(params, mesh, "rows")

    def apply(module, p, kjt):
        out, state = module.apply({"params": p}, kjt, mutable=["bounds_check"])
        return [out[k].values() for k in KEYS], jax.tree.leaves(state)

    want, want_bad = jax.jit(functools.partial(apply, single))(params, kjt)
    got, got_bad = jax.jit(
        jax.shard_map(
            functools.partial(apply, sharded),
            mesh=mesh,
            in_specs=(specs, P()),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )(shard_rows(params, mesh, "rows"), kjt)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert [int(x) for x in got_bad] == [int(x) for x in want_bad] and int(want_bad[0]) >= 3


def test_row_shard_axis_with_data_parallel_axis_is_refused():
    with pytest.raises(ValueError, match="cannot be combined"):
        EmbeddingBagCollection(tables=bag_tables(), data_parallel_axis="d", row_shard_axis="r")


def test_whole_tables_inside_shard_map_are_refused_by_name():
    rng = np.random.default_rng(8)
    ebc = EmbeddingBagCollection(tables=bag_tables(), backend="xla", row_shard_axis="rows")
    kjt = random_kjt(rng)
    params = ebc.init(jax.random.key(0), kjt)["params"]

    def run(body, *args):
        mapped = jax.shard_map(
            body, mesh=mesh4(), in_specs=(P(),) * len(args), out_specs=P(), check_vma=False
        )
        return jax.jit(mapped)(*args)

    with pytest.raises(flax.errors.ScopeParamShapeError, match="embedding_bags"):
        run(lambda p, k: ebc.apply({"params": p}, k).values(), params, kjt)
    spec = LookupSpec.create(
        ebc.plan, tuple(KEYS), batch_size=BATCH, backend="xla", row_shard_axis="rows"
    )
    tables = tuple(params["embedding_bags"][g.name] for g in ebc.plan.groups)
    with pytest.raises(ValueError, match="not 1/4 of them"):
        run(lambda t, i, o: lookup(spec, t, i, o, None)[0], tables, kjt.values(), kjt.offsets())
