"""Checkpoints: single-device round trip, resharding 8 -> 4 -> 1, interrupted saves, export."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from jaxrec.checkpoint import (
    CheckpointManager,
    TableLayout,
    export_tables,
    import_tables,
    load_exported,
)
from jaxrec.checkpoint.tables import to_canonical
from jaxrec.parallel.convert import partition_specs, shard_params, table_states, unshard_params
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.types import (
    ShardingPlan,
    column_wise,
    data_parallel,
    row_wise,
    table_column_wise,
    table_row_wise,
    table_wise,
)

TABLES = [
    EmbeddingBagConfig(name="a", num_embeddings=11, embedding_dim=4, feature_names=["fa"]),
    EmbeddingBagConfig(name="b", num_embeddings=6, embedding_dim=6, feature_names=["fb"]),
    EmbeddingBagConfig(name="c", num_embeddings=9, embedding_dim=4, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", num_embeddings=5, embedding_dim=4, feature_names=["fd"]),
]
KJT = KeyedJaggedTensor(
    keys=["fa", "fb", "fc", "fd"],
    values=[0, 10, 3, 1, 5, 2, 8, 4, 0],
    lengths=[2, 1, 1, 2, 1, 0, 1, 1],
)
PATH = "params/sparse/embedding_bags"


@functools.cache
def collection():
    """Row-wise Adagrad on a, b, d (b column-split below: each shard keeps the per-row
    state); element-wise Adam on c, whose ``momentum1`` is per element, not per row."""
    return EmbeddingBagCollection(
        tables=TABLES,
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1),
        table_optimizers={"c": jaxrec.optim.adam(learning_rate=0.1)},
    )


_INITIAL = {}  # one (slow, eager) init per collection and process


def _initial_groups(ebc):
    if id(ebc) not in _INITIAL:
        _INITIAL[id(ebc)] = (ebc, ebc.init(jax.random.key(0), KJT)["params"]["embedding_bags"])
    return _INITIAL[id(ebc)][1]


def random_groups(ebc, seed):
    """Single-device groups with distinct values everywhere (optimizer state, step too)."""
    groups = _initial_groups(ebc)
    leaves, tree = jax.tree.flatten(groups)
    rng = np.random.default_rng(seed)
    new = [rng.normal(size=np.shape(x)).astype(np.float32) for x in leaves]
    groups = jax.tree.unflatten(tree, new)
    for entry in groups.values():  # a step count and a marker at rest
        object.__setattr__(entry, "step", np.float32(seed + 3))
        object.__setattr__(entry, "uses", np.array([0, seed, 0, 1, 0, seed], np.float32))
    return jax.tree.map(jnp.asarray, groups)


def assert_same_tables(ebc, got_groups, want_groups):
    got, want = table_states(ebc.plan, got_groups), table_states(ebc.plan, want_groups)
    for name in want:
        np.testing.assert_array_equal(got[name].weight, want[name].weight, err_msg=name)
        for key in want[name].state:
            np.testing.assert_array_equal(got[name].state[key], want[name].state[key], name)
        np.testing.assert_array_equal(got[name].step, want[name].step, err_msg=name)
        np.testing.assert_array_equal(got[name].uses, want[name].uses, err_msg=name)


# ---- single device: resume bit for bit ---------------------------------------------------


def test_single_device_resume_gives_the_same_next_step_bit_for_bit(tmp_path):
    ebc = collection()
    tx = jaxrec.optim.fused(optax.adam(1e-2))

    def init(seed):
        params = {
            "sparse": {"embedding_bags": random_groups(ebc, seed)},
            "dense": jax.random.normal(jax.random.key(seed + 1), (18, 3)),
        }
        return {"params": params, "opt_state": tx.init(params)}

    @jax.jit
    def step(state, g):
        def loss(params):
            out = ebc.apply({"params": params["sparse"]}, KJT).values()
            return jnp.sum(jnp.sin(out @ params["dense"]) * g)

        grads = jax.grad(loss)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": jaxrec.optim.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }

    g = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
    state = step(step(init(0), g), g)
    layouts = [TableLayout.single(PATH, ebc)]
    with CheckpointManager(tmp_path, max_to_keep=2) as manager:
        assert manager.latest_step() is None
        manager.save(2, state, layouts, extra={"loader": {"epoch": 0, "offset": 128}})
        target = jax.tree.map(jnp.zeros_like, state)
        restored = manager.restore(target, layouts)
    assert restored.step == 2 and restored.extra == {"loader": {"epoch": 0, "offset": 128}}
    jax.tree.map(np.testing.assert_array_equal, restored.state, state)
    jax.tree.map(np.testing.assert_array_equal, step(restored.state, g), step(state, g))
    # the state's structure (FusedTableParams included) comes back as the target's
    assert jax.tree.structure(restored.state) == jax.tree.structure(state)


def test_max_to_keep_and_steps(tmp_path):
    ebc = EmbeddingBagCollection(tables=TABLES[:1])
    layouts = [TableLayout.single("params/embedding_bags", ebc)]
    state = {"params": {"embedding_bags": {"sum_float32_d4": jnp.ones((11, 4))}}}
    with CheckpointManager(tmp_path, max_to_keep=2) as manager:
        for s in (1, 5, 9):
            manager.save(s, state, layouts)
        assert manager.all_steps() == [5, 9] and manager.latest_step() == 9
        assert manager.metadata(5)["tables"]["embedding_bags.a.weight"]["rows"] == 11
        with pytest.raises(ValueError, match=r"no checkpoint of step 1 .*\(steps \[5, 9\]\)"):
            manager.restore(state, layouts, step=1)
    with pytest.raises(ValueError, match="max_to_keep must be a positive int"):
        CheckpointManager(tmp_path, max_to_keep=0)


def test_a_mismatched_target_is_refused_by_name(tmp_path):
    ebc = collection()
    state = {"params": {"sparse": {"embedding_bags": random_groups(ebc, 0)}}}
    with CheckpointManager(tmp_path) as manager:
        manager.save(0, state, [TableLayout.single(PATH, ebc)])
        other = EmbeddingBagCollection(tables=TABLES)  # no fused optimizer
        plain = {g.name: jnp.zeros((g.num_rows, g.dim)) for g in other.plan.groups}
        target = {"params": {"sparse": {"embedding_bags": plain}}}
        with pytest.raises(ValueError, match=r"'sparse.embedding_bags.a.weight'.*momentum1"):
            manager.restore(target, [TableLayout.single(PATH, other)])
        with pytest.raises(ValueError, match=r"params has no 'dense'"):
            manager.save(1, state, [TableLayout.single("params/dense", ebc)])


# ---- sharded: 8 -> 4 -> 1 devices, other plans -----------------------------------------

PLAN_8 = ShardingPlan(
    {
        "a": row_wise(),
        "b": column_wise([2, 0, 5]),
        "c": table_row_wise([1, 3, 6]),
        "d": data_parallel(),
    }
)
PLAN_4 = ShardingPlan(
    {
        "a": table_wise(2),
        "b": table_column_wise([3, 3]),
        "c": row_wise(sizes=[1, 5, 2, 1]),
        "d": row_wise(),
    }
)


def sharded_state(layout, mesh, groups, dense):
    """Sharded params placed on ``mesh`` as partition_specs says, and a row-split dense array."""
    specs = partition_specs(layout, "x")
    params = jax.tree.map(
        lambda spec, x: jax.device_put(x, NamedSharding(mesh, spec)),
        specs,
        shard_params(layout, groups),
        is_leaf=lambda s: isinstance(s, P),
    )
    return {
        "params": {
            "sparse": {"embedding_bags": params},
            "dense": jax.device_put(dense, NamedSharding(mesh, P("x"))),
        }
    }


def make_layout(ebc, plan, n):
    return ShardedLayout.create(
        TABLES, plan, n, optimizer=ebc.optimizer, table_optimizers=ebc.table_optimizers
    )


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (forced host) devices")
def test_sharded_checkpoint_restores_on_4_and_1_devices_under_other_plans(tmp_path):
    ebc = collection()
    groups = random_groups(ebc, 1)
    dense = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    mesh8 = Mesh(np.array(jax.devices()[:8]), ("x",))
    mesh4 = Mesh(np.array(jax.devices()[4:8]), ("x",))
    layout8, layout4 = make_layout(ebc, PLAN_8, 8), make_layout(ebc, PLAN_4, 4)
    state8 = sharded_state(layout8, mesh8, groups, dense)
    sharded8 = [TableLayout.sharded(PATH, layout8, mesh8, "x")]

    # saved sharded: every table is split by rows over the 8 devices
    canonical = to_canonical(sharded8[0], state8["params"]["sparse"]["embedding_bags"])
    weight = canonical["sparse.embedding_bags.a.weight"]["weight"]
    assert weight.shape == (16, 4) and len(weight.sharding.device_set) == 8
    assert {s.data.shape for s in weight.addressable_shards} == {(2, 4)}

    with CheckpointManager(tmp_path) as manager:
        manager.save(3, state8, sharded8, extra={"plan": "8"})
        # restore on 4 other devices under another plan
        target4 = sharded_state(layout4, mesh4, random_groups(ebc, 2), np.zeros((8, 4), np.float32))
        sharded4 = [TableLayout.sharded(PATH, layout4, mesh4, "x")]
        restored4 = manager.restore(target4, sharded4).state
        got4 = restored4["params"]["sparse"]["embedding_bags"]
        assert_same_tables(ebc, unshard_params(layout4, got4), groups)
        np.testing.assert_array_equal(restored4["params"]["dense"], dense)
        for name, entry in got4["shards"].items():
            assert entry.weight.sharding.is_equivalent_to(NamedSharding(mesh4, P("x")), 2), name
        # save from 4, restore on 1 device (the single-device collection)
        manager.save(4, restored4, sharded4)
        single = [TableLayout.single(PATH, ebc)]
        target1 = {
            "params": {
                "sparse": {"embedding_bags": random_groups(ebc, 3)},
                "dense": jnp.zeros((8, 4)),
            }
        }
        for step in (3, 4):
            restored1 = manager.restore(target1, single, step=step).state
            assert_same_tables(ebc, restored1["params"]["sparse"]["embedding_bags"], groups)
            np.testing.assert_array_equal(restored1["params"]["dense"], dense)
        # and back from 1 device onto 8 under the first plan
        manager.save(5, restored1, single)
        restored8 = manager.restore(
            sharded_state(layout8, mesh8, random_groups(ebc, 4), dense), sharded8
        )
        back = restored8.state["params"]["sparse"]["embedding_bags"]
        assert_same_tables(ebc, unshard_params(layout8, back), groups)
        # everything, padding and the per-row state of b's three column shards included
        jax.tree.map(
            np.testing.assert_array_equal, back, state8["params"]["sparse"]["embedding_bags"]
        )


# ---- an interrupted save ---------------------------------------------------------------

_INTERRUPTED = textwrap.dedent(
    """
    import os, sys
    import jax, jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig
    from jaxrec.checkpoint import CheckpointManager, TableLayout

    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=64, feature_names=["f"])])
    layouts = [TableLayout.single("params/embedding_bags", ebc)]
    def state(value):
        return {"params": {"embedding_bags": {"sum_float32_d4": jnp.full((64, 4), value)},
                           "dense": jnp.full(3, value)}}
    manager = CheckpointManager(sys.argv[1])
    manager.save(1, state(1.0), layouts)
    original = ocp.handlers.StandardCheckpointHandler.async_save

    async def dies_after_writing(self, *args, **kwargs):
        futures = await original(self, *args, **kwargs)
        for future in futures or []:
            future.result()  # the arrays are on disk, in the step's temporary folder
        os._exit(17)  # the process dies before the step is committed

    ocp.handlers.StandardCheckpointHandler.async_save = dies_after_writing
    manager.save(2, state(2.0), layouts)
    """
)


def test_an_interrupted_save_leaves_the_last_good_step(tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED, str(folder)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 17, run.stderr[-2000:]
    leftovers = [p for p in os.listdir(folder) if p != "1"]
    assert leftovers and all("tmp" in p for p in leftovers), os.listdir(folder)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=64, feature_names=["f"])
        ]
    )
    layouts = [TableLayout.single("params/embedding_bags", ebc)]
    target = {
        "params": {"embedding_bags": {"sum_float32_d4": jnp.zeros((64, 4))}, "dense": jnp.zeros(3)}
    }
    with CheckpointManager(folder) as manager:
        assert manager.all_steps() == [1]
        restored = manager.restore(target, layouts)
        assert restored.step == 1
        jax.tree.map(lambda x: np.testing.assert_array_equal(x, 1.0), restored.state)
        assert sorted(os.listdir(folder)) == ["1"]  # the partial step was cleaned up
        manager.save(2, jax.tree.map(lambda x: x + 1, restored.state), layouts)
        assert manager.all_steps() == [1, 2]


# ---- export for serving ----------------------------------------------------------------


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (forced host) devices")
@pytest.mark.parametrize("optimizer_state", [False, True], ids=["weights", "with-state"])
def test_export_and_import_whole_tables(tmp_path, optimizer_state):
    ebc = collection()
    groups = random_groups(ebc, 5)
    mesh8 = Mesh(np.array(jax.devices()[:8]), ("x",))
    layout8 = make_layout(ebc, PLAN_8, 8)
    state8 = sharded_state(layout8, mesh8, groups, np.zeros((8, 4), np.float32))
    with CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(1, state8, [TableLayout.sharded(PATH, layout8, mesh8, "x")])
        export_tables(manager, tmp_path / "tables.npz", optimizer_state=optimizer_state)
    exported = load_exported(tmp_path / "tables.npz")
    want = ebc.state_dict({"params": {"embedding_bags": groups}})
    state_dict = load_exported(tmp_path / "tables.npz", prefix="sparse")
    assert {k for k in state_dict if "/" not in k} == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(state_dict[name], value)
    if optimizer_state:
        momentum = ebc.optimizer_state_dict({"params": {"embedding_bags": groups}})
        np.testing.assert_array_equal(
            exported["sparse.embedding_bags.c.weight/momentum2"],
            momentum["embedding_bags.c.weight"]["momentum2"],
        )
    # into a 4-device layout of another plan: weights, and the state when exported
    mesh4 = Mesh(np.array(jax.devices()[:4]), ("x",))
    layout4 = make_layout(ebc, PLAN_4, 4)
    fresh = random_groups(ebc, 6)
    target = sharded_state(layout4, mesh4, fresh, np.zeros((8, 4), np.float32))
    loaded = import_tables(target, [TableLayout.sharded(PATH, layout4, mesh4, "x")], exported)
    got = unshard_params(layout4, loaded["params"]["sparse"]["embedding_bags"])
    expected = (
        groups
        if optimizer_state
        else {
            k: v if not hasattr(v, "weight") else type(v)(groups[k].weight, v.state, v.step, v.uses)
            for k, v in fresh.items()
        }
    )
    assert_same_tables(ebc, got, expected)
    with pytest.raises(ValueError, match=r"no array for table 'sparse.embedding_bags.d.weight'"):
        import_tables(
            target,
            [TableLayout.sharded(PATH, layout4, mesh4, "x")],
            {k: v for k, v in exported.items() if not k.startswith("sparse.embedding_bags.d")},
        )
