"""Row-sharded tables on several GPUs: ``python -m benchmarks.gpu_check_sharding``.

Trains 8 tables x ``--rows`` x 128 (B=8192, bags 0..40, fused row-wise Adagrad) for three
steps on one GPU and with the tables split by rows over every visible GPU, two ways:
``shard_map`` with ``row_shard_axis`` (Pallas kernels on each device's rows, pooled outputs
summed over the axis) and :func:`jaxrec.parallel.shard_rows` under plain ``jit`` (XLA
backend, SPMD partitioner). Compares the tables with the single-GPU run and times one step
of each beside the single-GPU steps. Writes ``gpu_check_sharding.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, bench
from jaxrec.parallel import row_partition_specs, shard_rows
from jaxrec.sparse import pad_to_capacity

NUM_TABLES, DIM, BATCH = 8, 128, 8192


def _kjts(rows: int, seed: int, count: int) -> list[KeyedJaggedTensor]:
    rng = np.random.default_rng(seed)
    kjts = []
    for _ in range(count):
        lengths = rng.integers(0, 41, NUM_TABLES * BATCH)
        values = rng.integers(0, rows, int(lengths.sum())).astype(np.int32)
        keys = [f"f{t}" for t in range(NUM_TABLES)]
        kjts.append(KeyedJaggedTensor(keys=keys, values=values, lengths=lengths))
    capacity = max(k.capacity() for k in kjts)
    return [pad_to_capacity(k, capacity) for k in kjts]


def _collection(rows: int, backend: str, row_shard_axis=None) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{t}"]
        )
        for t in range(NUM_TABLES)
    ]
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
    return EmbeddingBagCollection(
        tables=tables, optimizer=optimizer, backend=backend, row_shard_axis=row_shard_axis
    )


def _step_body(ebc, g):
    tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=False)

    def step(params, kjt):
        loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)
        grads = jax.grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return jaxrec.optim.apply_updates(params, updates)

    return step


def _step_fn(ebc, g):
    return jax.jit(_step_body(ebc, g), donate_argnums=(0,))


def _shard_map_step_fn(ebc, g, mesh, params):
    specs = row_partition_specs(params, mesh, "rows")
    body = jax.shard_map(
        _step_body(ebc, g), mesh=mesh, in_specs=(specs, P()), out_specs=specs, check_vma=False
    )
    return jax.jit(body, donate_argnums=(0,))


def _relerr(got, want) -> float:
    return max(
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        if a.ndim
    )


def _time_steps(step, params, kjts, iters) -> float:
    state = [params]

    def run(kjt):
        state[0] = step(state[0], kjt)
        return state[0]

    ms = bench.time_op(run, [(k,) for k in kjts], iters=iters)
    state.clear()
    return ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    devices = jax.devices()
    record: dict = {**bench.environment(), "devices": len(devices), "rows": args.rows}
    kjts = _kjts(args.rows, 0, 3)
    g = jax.random.normal(jax.random.key(1), (BATCH, NUM_TABLES * DIM), jnp.float32)
    xla = _collection(args.rows, "xla")
    init = lambda: xla.init(jax.random.key(0), kjts[0])["params"]
    step = _step_fn(xla, g)

    single = init()
    for kjt in kjts:
        single = step(single, kjt)
    mesh = Mesh(np.array(devices), ("rows",))
    gspmd = shard_rows(init(), mesh, "rows")
    for kjt in kjts:
        gspmd = step(gspmd, kjt)
    record["gspmd_vs_single_max_relerr"] = _relerr(gspmd, single)
    record["shard_rows_per_device"] = jax.tree.leaves(gspmd)[0].addressable_shards[0].data.shape[0]
    del gspmd
    row_sharded = _collection(args.rows, "auto", row_shard_axis="rows")
    mapped_step = _shard_map_step_fn(row_sharded, g, mesh, init())
    mapped = shard_rows(init(), mesh, "rows")
    for kjt in kjts:
        mapped = mapped_step(mapped, kjt)
    record["shard_map_vs_single_max_relerr"] = _relerr(mapped, single)
    del single, mapped

    record["shard_map_pallas_step_ms"] = _time_steps(
        mapped_step, shard_rows(init(), mesh, "rows"), kjts, args.iters
    )
    record["gspmd_xla_step_ms"] = _time_steps(
        step, shard_rows(init(), mesh, "rows"), kjts, args.iters
    )
    for label, backend in (("single_xla_step_ms", "xla"), ("single_pallas_step_ms", "auto")):
        one = _step_fn(_collection(args.rows, backend), g)
        params = jax.device_put(init(), devices[0])
        record[label] = _time_steps(one, params, kjts, args.iters)
    record["sharded_vs_single_max_relerr"] = max(
        record["gspmd_vs_single_max_relerr"], record["shard_map_vs_single_max_relerr"]
    )
    record["ok"] = record["sharded_vs_single_max_relerr"] < 1e-5
    print(json.dumps(record, indent=1))
    with open(os.path.join(args.out, "gpu_check_sharding.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
