"""DistributedModelParallel on 8 forced host devices against the single-device model."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import jaxrec
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    pad_to_capacity,
)
from jaxrec.models.dlrm import DLRM
from jaxrec.parallel import (
    DistributedModelParallel,
    EmbeddingShardingPlanner,
    ShardingPlan,
    Topology,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)

N = 8
pytestmark = pytest.mark.skipif(len(jax.devices()) < N, reason="needs 8 (forced host) devices")

B, DENSE, DIM, CAPACITY = 2, 3, 4, 24
ROWS = {"t0": 37, "t1": 21, "t2": 50, "t3": 13}
KEYS = [f"f{t[1]}" for t in ROWS]
HAND_PLAN = {
    "t0": row_wise(),
    "t1": table_wise(3),
    "t2": table_row_wise([1, 6]),
    "t3": data_parallel(),
}


def tables():
    return [
        EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=[k])
        for (name, rows), k in zip(ROWS.items(), KEYS, strict=True)
    ]


def mesh(n=N):
    return Mesh(np.array(jax.devices()[:n]), ("x",))


def model():
    return DLRM(
        tables=tables(),
        bottom_mlp=(8, DIM),
        top_mlp=(8, 1),
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1),
        backend="xla",
    )


def batches(seed, empty_device=None):
    """Per device (dense, padded KJT, labels), and the whole batch for one device."""
    rng = np.random.default_rng(seed)
    local, per_key = [], [[] for _ in KEYS]
    for d in range(N):
        lengths = rng.integers(0, 4, (len(KEYS), B))
        if d == empty_device:
            lengths[:] = 0
        values = [
            rng.integers(0, ROWS[f"t{k[1]}"], n) for k, n in zip(KEYS, lengths.sum(1), strict=True)
        ]
        for k, v in enumerate(values):
            per_key[k].append((lengths[k], v))
        kjt = KeyedJaggedTensor(KEYS, np.concatenate(values), lengths=lengths.reshape(-1))
        dense = rng.normal(size=(B, DENSE)).astype(np.float32)
        labels = rng.integers(0, 2, B).astype(np.float32)
        local.append((dense, pad_to_capacity(kjt, CAPACITY), labels))
    whole_kjt = KeyedJaggedTensor(
        KEYS,
        np.concatenate([v for key in per_key for _, v in key]),
        lengths=np.concatenate([length for key in per_key for length, _ in key]),
    )
    whole = (
        np.concatenate([b[0] for b in local]),
        whole_kjt,
        np.concatenate([b[2] for b in local]),
    )
    return local, whole


def loss_fn(params, dense, kjt, labels):
    logits = model().apply({"params": params}, dense, kjt)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def tx():
    return jaxrec.optim.fused(optax.adam(1e-2))


def single_run(steps):
    """Three steps on one device; returns the variables at init, after and the losses."""
    params = model().init(jax.random.key(0), *steps[0][1][:2])["params"]
    first = params
    opt = tx().init(params)

    @jax.jit
    def step(p, o, dense, kjt, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, dense, kjt, labels)
        updates, o = tx().update(grads, o, p)
        return jaxrec.optim.apply_updates(p, updates), o, loss

    losses = []
    for _, whole in steps:
        params, opt, loss = step(params, opt, *whole)
        losses.append(float(loss))
    return first, params, losses


def single_state_dict(params):
    ebc = EmbeddingBagCollection(
        tables=tables(), optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1)
    )
    sparse = {"params": params["sparse_arch"]}
    out = {name: np.asarray(w) for name, w in ebc.named_parameters(sparse, prefix="sparse_arch")}
    dense = {k: v for k, v in params.items() if k != "sparse_arch"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(dense):
        out[".".join(k.key for k in path)] = np.asarray(leaf)
    states = {
        f"sparse_arch.{name}": state for name, state in ebc.optimizer_state_dict(sparse).items()
    }
    return out, states


def assert_same_state(dmp, params, want_params, rtol):
    got = dmp.state_dict({"params": params})
    want, want_states = single_state_dict(want_params)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-7, err_msg=name)
    states = dmp.optimizer_state_dict({"params": params})
    assert sorted(states) == sorted(want_states)
    for name, state in want_states.items():
        assert sorted(states[name]) == sorted(state)
        for key in state:
            np.testing.assert_allclose(
                states[name][key], state[key], rtol=rtol, atol=1e-7, err_msg=f"{name} {key}"
            )


def planner():
    return EmbeddingShardingPlanner(
        Topology(num_devices=N, hbm_cap=10**6), batch_size=B, reserve_bytes=0
    )


@pytest.mark.parametrize("how", ["hand", "planner"])
def test_three_train_steps_equal_one_device(how):
    steps = [batches(seed, empty_device=seed) for seed in range(3)]
    first, want_params, want_losses = single_run(steps)

    dmp = DistributedModelParallel(
        model(), mesh(), plan=ShardingPlan(HAND_PLAN) if how == "hand" else planner()
    )
    batch = [dmp.shard_batch(local) for local, _ in steps]
    variables = dmp.init(jax.random.key(0), *batch[0][:2])
    if how == "hand":
        assert dmp.plans == {"sparse_arch": ShardingPlan(HAND_PLAN)}
    else:
        assert dmp.plans["sparse_arch"] == planner().plan(tables(), optimizer=model().optimizer)
    # created sharded, each table as one device initialises it; and placed from one device
    assert_same_state(dmp, variables["params"], first, rtol=0)
    placed = dmp.place({"params": first}, *batch[0][:2])
    assert_same_state(dmp, placed["params"], first, rtol=0)
    np.testing.assert_array_equal(
        dmp.unshard(placed)["params"]["sparse_arch"]["embedding_bags"]["sum_float32_d4"].weight,
        first["sparse_arch"]["embedding_bags"]["sum_float32_d4"].weight,
    )

    step = dmp.make_train_step(loss_fn, tx())
    params = variables["params"]
    opt = dmp.init_optimizer(tx(), params)
    losses = []
    for b in batch:
        params, opt, loss = step(params, opt, *b)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert_same_state(dmp, params, want_params, rtol=2e-6)


def test_forward_equals_one_device_and_outputs_follow_the_batch():
    local, whole = batches(7)
    first = model().init(jax.random.key(0), *whole[:2])
    dmp = DistributedModelParallel(model(), mesh(), plan={"sparse_arch": HAND_PLAN})
    dense, kjt, _ = dmp.shard_batch(local)
    placed = dmp.place(first, dense, kjt)
    got = dmp.apply(placed, dense, kjt)
    np.testing.assert_allclose(got, model().apply(first, *whole[:2]), rtol=1e-6, atol=1e-7)


def test_16_bit_communication_is_close_to_one_device_but_rounded():
    """comm_dtype="bfloat16": the sharded model's output is the one-device output to
    bfloat16 rounding of what travels (not bit-equal: the rounding happened)."""
    local, whole = batches(7)
    first = model().init(jax.random.key(0), *whole[:2])
    want = np.asarray(model().apply(first, *whole[:2]))
    dmp = DistributedModelParallel(
        model(), mesh(), plan={"sparse_arch": HAND_PLAN}, comm_dtype="bfloat16"
    )
    dense, kjt, _ = dmp.shard_batch(local)
    got = np.asarray(dmp.apply(dmp.place(first, dense, kjt), dense, kjt))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < 2.0**-6
    with pytest.raises(ValueError, match="comm_dtype must be None or one of"):
        DistributedModelParallel(model(), mesh(), plan=HAND_PLAN, comm_dtype="float8")


def test_sequence_collection_rows_equal_one_device_per_device():
    configs = [
        EmbeddingConfig(name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=[k])
        for (name, rows), k in zip(ROWS.items(), KEYS, strict=True)
    ]
    ec = EmbeddingCollection(tables=configs, backend="xla")
    local, _ = batches(3)
    kjts = [b[1] for b in local]
    dmp = DistributedModelParallel(ec, mesh(), plan=ShardingPlan(HAND_PLAN))
    batch = dmp.shard_batch(kjts)
    variables = dmp.init(jax.random.key(2), batch)
    single = dmp.unshard(variables)
    got = dmp.apply(variables, batch)
    for d, kjt in enumerate(kjts):
        want = jax.jit(ec.apply)(single, kjt)
        for key in KEYS:
            rows = got[key].values()[d * CAPACITY : (d + 1) * CAPACITY]
            np.testing.assert_array_equal(rows, want[key].values(), err_msg=f"{key} device {d}")


def test_misuse_is_refused_with_what_is_wrong():
    local, _ = batches(0)
    with pytest.raises(ValueError, match="name the one to shard over"):
        DistributedModelParallel(
            model(), Mesh(np.array(jax.devices()[:N]).reshape(2, 4), ("a", "b")), plan=HAND_PLAN
        )
    with pytest.raises(ValueError, match=r"axis 'y' is not an axis of the mesh \['x'\]"):
        DistributedModelParallel(model(), mesh(), plan=ShardingPlan(HAND_PLAN), axis="y")
    dmp = DistributedModelParallel(model(), mesh(), plan={"other": HAND_PLAN})
    batch = dmp.shard_batch(local)
    with pytest.raises(
        ValueError, match=r"no plan for \['sparse_arch'\].*unknown collections \['other'\]"
    ):
        dmp.init(jax.random.key(0), *batch[:2])
    dmp = DistributedModelParallel(model(), mesh(), plan=ShardingPlan(HAND_PLAN))
    with pytest.raises(ValueError, match="one batch per device of this process on the mesh"):
        dmp.shard_batch(local[:3])
    uneven = [(d, pad_to_capacity(k, CAPACITY + (i == 1)), y) for i, (d, k, y) in enumerate(local)]
    with pytest.raises(ValueError, match="pad every KJT to one capacity"):
        dmp.shard_batch(uneven)
    with pytest.raises(ValueError, match=r"shape \(5, 3\) does not split over the 8 devices"):
        dmp.init(jax.random.key(0), np.zeros((5, DENSE), np.float32), batch[1])
    with pytest.raises(ValueError, match="not configured yet"):
        dmp.make_train_step(loss_fn, tx())
    small = DistributedModelParallel(
        model(),
        mesh(),
        plan=planner().__class__(
            Topology(num_devices=4, hbm_cap=10**6), batch_size=B, reserve_bytes=0
        ),
    )
    with pytest.raises(ValueError, match="topology has 4 devices but mesh axis 'x' has 8"):
        small.init(jax.random.key(0), *batch[:2])
    bare = DistributedModelParallel(jaxrec.models.dlrm.MLP((2,)), mesh(), plan=HAND_PLAN)
    with pytest.raises(ValueError, match="calls no EmbeddingBagCollection"):
        bare.init(jax.random.key(0), np.zeros((N, 3), np.float32))
