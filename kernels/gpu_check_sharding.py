"""Row-sharded tables on several GPUs: ``python -m jaxrec_kernels.gpu_check_sharding``.

Trains 8 tables x ``--rows`` x 128 (B=8192, bags 0..40, fused row-wise Adagrad) for three
steps on one GPU and, with :func:`jaxrec.parallel.shard_rows`, split by rows over every
visible GPU (XLA backend, SPMD partitioner); compares the tables and times one step of
each, beside the single-GPU Pallas step. Writes ``gpu_check_sharding.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, bench
from jaxrec.parallel import shard_rows
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


def _collection(rows: int, backend: str) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{t}"]
        )
        for t in range(NUM_TABLES)
    ]
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
    return EmbeddingBagCollection(tables=tables, optimizer=optimizer, backend=backend)


def _step_fn(ebc, g):
    tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=False)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(params, kjt):
        loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)
        grads = jax.grad(loss)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        return jaxrec.optim.apply_updates(params, updates)

    return step


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
    sharded = shard_rows(init(), mesh, "rows")
    for kjt in kjts:
        sharded = step(sharded, kjt)
    errs = [
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True)
        if a.ndim
    ]
    record["sharded_vs_single_max_relerr"] = max(errs)
    weight = jax.tree.leaves(sharded)[0]
    record["shard_rows_per_device"] = weight.addressable_shards[0].data.shape[0]
    del single

    state = [sharded]

    def run(kjt):
        state[0] = step(state[0], kjt)
        return state[0]

    record["sharded_xla_step_ms"] = bench.time_op(run, [(k,) for k in kjts], iters=args.iters)
    state.clear()
    del sharded
    for label, backend in (("single_xla_step_ms", "xla"), ("single_pallas_step_ms", "auto")):
        ebc = _collection(args.rows, backend)
        one = _step_fn(ebc, g)
        holder = [jax.device_put(init(), devices[0])]

        def run_one(kjt, holder=holder, one=one):
            holder[0] = one(holder[0], kjt)
            return holder[0]

        record[label] = bench.time_op(run_one, [(k,) for k in kjts], iters=args.iters)
        del holder
    record["ok"] = record["sharded_vs_single_max_relerr"] < 1e-5
    print(json.dumps(record, indent=1))
    with open(os.path.join(args.out, "gpu_check_sharding.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
