"""One process of the 2-process run of ``test_multiprocess.py`` (or the single-device
reference with ``--reference``).

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT`` — each process
has 2 CPU devices and joins the others through ``jax.distributed.initialize`` with gloo CPU
collectives; the mesh spans every process's devices. A DLRM trains 3 steps through
:class:`jaxrec.parallel.DistributedModelParallel`; process 0 writes the losses and the
gathered state dicts to ``OUT`` (``.npz``).
"""

import os
import sys

LOCAL_DEVICES = 2
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxrec  # noqa: E402
from jaxrec import EmbeddingBagConfig, KeyedJaggedTensor, pad_to_capacity  # noqa: E402
from jaxrec.models.dlrm import DLRM  # noqa: E402

B, DENSE, DIM, CAPACITY, STEPS = 2, 3, 4, 24, 3
ROWS = {"t0": 37, "t1": 21, "t2": 50, "t3": 13}
KEYS = [f"f{name[1]}" for name in ROWS]


def plan():
    from jaxrec.parallel import ShardingPlan, data_parallel, row_wise, table_row_wise, table_wise

    return ShardingPlan(
        {
            "t0": row_wise(),
            "t1": table_wise(3),
            "t2": table_row_wise([1, 2]),
            "t3": data_parallel(),
        }
    )


def model():
    tables = [
        EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=[k])
        for (name, rows), k in zip(ROWS.items(), KEYS, strict=True)
    ]
    return DLRM(
        tables=tables,
        bottom_mlp=(8, DIM),
        top_mlp=(8, 1),
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1),
        backend="xla",
    )


def device_batches(step, devices):
    """Per device (dense, KJT padded to CAPACITY, labels), and the whole batch."""
    rng = np.random.default_rng(step)
    local, per_key = [], [[] for _ in KEYS]
    for _ in range(devices):
        lengths = rng.integers(0, 4, (len(KEYS), B))
        values = [
            rng.integers(0, ROWS[f"t{k[1]}"], n) for k, n in zip(KEYS, lengths.sum(1), strict=True)
        ]
        for k, v in enumerate(values):
            per_key[k].append((lengths[k], v))
        kjt = KeyedJaggedTensor(KEYS, np.concatenate(values), lengths=lengths.reshape(-1))
        dense = rng.normal(size=(B, DENSE)).astype(np.float32)
        local.append((dense, pad_to_capacity(kjt, CAPACITY), rng.integers(0, 2, B) * 1.0))
    whole_kjt = KeyedJaggedTensor(
        KEYS,
        np.concatenate([v for key in per_key for _, v in key]),
        lengths=np.concatenate([n for key in per_key for n, _ in key]),
    )
    dense = np.concatenate([b[0] for b in local])
    labels = np.concatenate([b[2] for b in local]).astype(np.float32)
    local = [(d, k, y.astype(np.float32)) for d, k, y in local]
    return local, (dense, whole_kjt, labels)


def loss_fn(params, dense, kjt, labels):
    logits = model().apply({"params": params}, dense, kjt)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def tx():
    return jaxrec.optim.fused(optax.adam(1e-2))


def reference(devices, out):
    """The same 3 steps on one device; the state dict named as the wrapper names it."""
    params = model().init(jax.random.key(0), *device_batches(0, devices)[1][:2])["params"]
    opt = tx().init(params)

    @jax.jit
    def step(p, o, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
        updates, o = tx().update(grads, o, p)
        return jaxrec.optim.apply_updates(p, updates), o, loss

    losses = []
    for s in range(STEPS):
        params, opt, loss = step(params, opt, *device_batches(s, devices)[1])
        losses.append(float(loss))
    ebc = jaxrec.EmbeddingBagCollection(tables=model().tables, optimizer=model().optimizer)
    sparse = {"params": params["sparse_arch"]}
    arrays = {n: np.asarray(w) for n, w in ebc.named_parameters(sparse, prefix="sparse_arch")}
    for name, state in ebc.optimizer_state_dict(sparse).items():
        arrays[f"state:sparse_arch.{name}:momentum1"] = np.asarray(state["momentum1"])
    dense = {k: v for k, v in params.items() if k != "sparse_arch"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(dense):
        arrays[".".join(k.key for k in path)] = np.asarray(leaf)
    np.savez(out, losses=np.asarray(losses), **arrays)


def main(process_id, num_processes, port, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(range(LOCAL_DEVICES)),
    )
    from jax.sharding import Mesh

    from jaxrec.parallel import DistributedModelParallel

    devices = jax.devices()
    assert len(devices) == LOCAL_DEVICES * num_processes, devices
    dmp = DistributedModelParallel(model(), Mesh(np.array(devices), ("x",)), plan=plan())
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]

    def batch(step):
        local, _ = device_batches(step, len(devices))
        return dmp.shard_batch([local[i] for i in mine])

    first = batch(0)
    variables = dmp.init(jax.random.key(0), *first[:2])
    params = variables["params"]
    opt = dmp.init_optimizer(tx(), params)
    train = dmp.make_train_step(loss_fn, tx())
    losses = []
    for s in range(STEPS):
        params, opt, loss = train(params, opt, *batch(s))
        losses.append(float(loss))
    arrays = dmp.state_dict({"params": params})
    for name, state in dmp.optimizer_state_dict({"params": params}).items():
        arrays[f"state:{name}:momentum1"] = state["momentum1"]
    if process_id == 0:
        np.savez(out, losses=np.asarray(losses), **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "--reference":
        reference(int(sys.argv[2]), sys.argv[3])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
