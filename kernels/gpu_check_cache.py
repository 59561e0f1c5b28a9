"""Time host tables behind a device cache against all tables in HBM:
``python -m jaxrec_kernels.gpu_check_cache``.

The issue's model: 8 tables x 10M rows x 128 fp32 (``--tables --rows --dim``), B = 8192
(``--batch``), bags of mean length 20 (lengths uniform in [0, 40], ``--mean-len``), fused
row-wise Adagrad, ids Zipf(1.05) and uniform (``--dists``). For each distribution it runs
the same jitted train step (loss = sum(out * G), ``jax.grad`` + ``apply_updates``, donated)

- ``hbm``: every table ``EmbeddingLocation.DEVICE`` (the baseline of the same run);
- ``cached``: every table ``MANAGED_CACHING`` with ``--load-factor`` (0.2) through
  ``jaxrec.tbe.CachedTBE``, sequential prefetch + step, and the same through
  ``jaxrec.tbe.prefetch_pipeline`` (next batch's prefetch overlapped with the step);

and reports the median step time of each (after ``--warmup`` steps), the ratio
cached / hbm, and the hit rate (hits / unique rows, from the cache metrics), to
``gpu_check_cache.json`` in ``--out`` (default ``$OUT``). Tiny flags run on a CPU (the
test suite does)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxrec
from jaxrec import tbe


def _batches(rng, args, dist, count):
    out = []
    for _ in range(count):
        lengths = rng.integers(0, 2 * args.mean_len + 1, args.tables * args.batch)
        n = int(lengths.sum())
        if dist == "zipf":
            ids = (rng.zipf(args.alpha, n) - 1) % args.rows
        else:
            ids = rng.integers(0, args.rows, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        capacity = args.tables * args.batch * 2 * args.mean_len  # fixed: no recompiles
        padded = np.zeros(capacity, np.int32)
        padded[:n] = ids
        out.append((padded, offsets))
    return out


def _step(lookup):
    def step(state, indices, offsets, g):
        grads = jax.grad(lambda s: jnp.sum(lookup(s, indices, offsets) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    return jax.jit(step, donate_argnums=(0,))


def _timed(fn, warmup):
    times = []
    for i, call in enumerate(fn()):
        start = time.perf_counter()
        jax.block_until_ready(call())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(args) -> dict:
    loc = tbe.EmbeddingLocation
    common = {"optimizer": tbe.OptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
    dev = tbe.ComputeDevice.CUDA
    hbm_op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, loc.DEVICE, dev)] * args.tables, **common
    )
    cached_op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, loc.MANAGED_CACHING, dev)] * args.tables,
        cache_load_factor=args.load_factor,
        **common,
    )
    g = jax.random.normal(jax.random.key(0), (args.batch, args.tables * args.dim))
    report = {"config": vars(args), "device": str(jax.devices()[0]), "results": {}}
    steps = args.warmup + args.steps
    for dist in args.dists.split(","):
        batches = _batches(np.random.default_rng(0), args, dist, steps)
        result = {}
        hbm_step = _step(hbm_op)
        state = {"s": hbm_op.init(jax.random.key(1))}

        def hbm_calls(state=state, hbm_step=hbm_step, batches=batches):
            for ids, offsets in batches:

                def call(ids=ids, offsets=offsets):
                    state["s"] = hbm_step(state["s"], jnp.asarray(ids), jnp.asarray(offsets), g)
                    return state["s"]

                yield call

        result["hbm_ms"] = _timed(hbm_calls, args.warmup)
        del state
        cached = tbe.CachedTBE(cached_op)
        cached_step = _step(cached)
        box = dict(zip(("s", "c"), cached.init(seed=1), strict=True))

        def cached_calls(box=box, cached=cached, cached_step=cached_step, batches=batches):
            for ids, offsets in batches:

                def call(ids=ids, offsets=offsets):
                    ready = cached.prefetch(box["s"], box["c"], ids, offsets)
                    box["c"] = ready.caches
                    box["s"] = cached_step(ready.state, ready.indices, jnp.asarray(offsets), g)
                    return box["s"]

                yield call

        result["cached_ms"] = _timed(cached_calls, args.warmup)
        metrics = np.asarray(cached.cache_metrics(box["c"])["total"], np.float64)
        result["hit_rate"] = float(metrics[0] / max(metrics[3], 1))
        result["metrics_total"] = dict(
            zip(("hits", "misses", "evictions", "unique"), metrics.tolist(), strict=True)
        )

        def pipelined(box=box, cached=cached, cached_step=cached_step, batches=batches):
            def step(st, indices, batch):
                return cached_step(st, indices, jnp.asarray(batch[1]), g), None

            start = time.perf_counter()
            box["s"], box["c"], _ = tbe.prefetch_pipeline(cached, step, box["s"], box["c"], batches)
            jax.block_until_ready(box["s"])
            return (time.perf_counter() - start) / len(batches) * 1e3

        pipelined()  # warm
        result["pipelined_ms"] = pipelined()
        result["ratio_cached"] = result["cached_ms"] / result["hbm_ms"]
        result["ratio_pipelined"] = result["pipelined_ms"] / result["hbm_ms"]
        report["results"][dist] = result
        print(dist, json.dumps(result), flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--mean-len", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.05)
    parser.add_argument("--load-factor", type=float, default=0.2)
    parser.add_argument("--dists", default="zipf,uniform")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check_cache.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
