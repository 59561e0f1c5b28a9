"""Time host tables behind a device cache against all tables in HBM:
``python -m benchmarks.gpu_check_cache``.

The issue's model: 8 tables x 10M rows x 128 fp32 (``--tables --rows --dim``), B = 8192
(``--batch``), bags of mean length 20 (lengths uniform in [0, 40], ``--mean-len``), fused
row-wise Adagrad, ids Zipf(1.05) and uniform (``--dists``). For each distribution it runs
the same jitted train step (loss = sum(out * G), ``jax.grad`` + ``apply_updates``, donated)
on the same batches

- ``hbm``: every table ``EmbeddingLocation.DEVICE`` (the baseline of the same run, drawn
  on the device with ``jax.random``);
- ``cached``: every table ``MANAGED_CACHING`` with ``--load-factor`` (0.2) through
  ``jaxrec.tbe.CachedTBE``, prefetch then step, from an empty cache;
- ``pipelined``: the same through ``jaxrec.tbe.prefetch_pipeline`` (the next batch's
  prefetch overlapped with the step), from an empty cache again;

and reports the median step time of each after ``--warmup`` steps, the ratios to ``hbm``
and the hit rate (hits / unique rows, from the cache metrics), to ``gpu_check_cache.json``
in ``--out`` (default ``$OUT``). Every phase prints its elapsed time as it ends and every
cached step its time and misses, so a slow run shows where the time goes.

Host work per cached step: the rows a batch misses are gathered by NumPy from the host
table and sent to the device, and as many cache rows (the misses' slots, for write-back)
come back, each move rounded up to a power of two rows; a row is ``dim * 4`` bytes plus its
optimizer state. With Zipf(1.05) ids about 60% of a table's ~100K unique rows per batch
are first seen (8 tables: ~0.6M misses, ~0.5 GB each way); uniform ids miss almost every
one of their ~1.3M rows (~1 GB each way). The host tables (41 GB at 10M rows) are filled
once, by threads copying one random block, and shared by every cache of the run.
``--quick`` runs 1 warmup and 3 timed steps; tiny flags run on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

import jaxrec
from jaxrec import tbe

_CLOCK = {"start": time.perf_counter()}


def log(message: str) -> None:
    """Print ``message`` with the seconds since the run started, flushed at once."""
    print(f"[{time.perf_counter() - _CLOCK['start']:7.1f} s] {message}", flush=True)


def _batch(seed, args, dist):
    rng = np.random.default_rng(seed)
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
    return padded, offsets


def make_batches(args, dist: str, count: int, seed: int = 0) -> list:
    """``count`` batches ``(ids padded to a fixed capacity, offsets)``, drawn in threads."""
    seeds = np.random.SeedSequence([seed, ("zipf", "uniform").index(dist)]).spawn(count)
    with ThreadPoolExecutor(min(count, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda s: _batch(s, args, dist), seeds))


def fill_uniform(array: np.ndarray, bound: float, seed: int = 0, block_rows: int = 1 << 16):
    """Fill ``array [R, D]`` in place with values uniform in ``±bound``: one random block
    of ``block_rows`` rows, copied over the table by threads (memory speed, every page
    touched now rather than during the timed steps)."""
    rows = array.shape[0]
    block = np.random.default_rng(seed).random((min(block_rows, rows), array.shape[1]))
    block = ((2 * block - 1) * bound).astype(array.dtype)

    def copy(start):
        stop = min(start + block.shape[0], rows)
        array[start:stop] = block[: stop - start]

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(copy, range(0, rows, block.shape[0])))


def _step(lookup):
    def step(state, indices, offsets, g):
        grads = jax.grad(lambda s: jnp.sum(lookup(s, indices, offsets) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    return jax.jit(step, donate_argnums=(0,))


def _median_ms(times, warmup):
    timed = times[warmup:] or times[-1:]
    return statistics.median(timed) * 1e3


def _fresh_cache(cached, hosts):
    """An empty cache (device buffers and metadata) in front of the shared host tables."""
    state, caches = cached.init()
    cached.hosts = hosts
    return state, caches


def run_hbm(hbm_step, box, batches, g, dist, warmup) -> float:
    times = []
    for ids, offsets in batches:
        start = time.perf_counter()
        box["s"] = hbm_step(box["s"], jnp.asarray(ids), jnp.asarray(offsets), g)
        jax.block_until_ready(box["s"])
        times.append(time.perf_counter() - start)
    log(f"{dist} hbm: {len(times)} steps, {[round(t * 1e3, 1) for t in times]} ms")
    return _median_ms(times, warmup)


def run_cached(cached, cached_step, hosts, batches, g, dist, warmup):
    """Sequential prefetch + step from an empty cache; returns (median ms, metrics)."""
    state, caches = _fresh_cache(cached, hosts)
    times = []
    for i, (ids, offsets) in enumerate(batches):
        start = time.perf_counter()
        ready = cached.prefetch(state, caches, ids, offsets)
        caches = ready.caches
        state = cached_step(ready.state, ready.indices, jnp.asarray(offsets), g)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        last = np.asarray(cached.cache_metrics(caches)["last_total"])
        log(
            f"{dist} cached step {i + 1}/{len(batches)}: {times[-1] * 1e3:.1f} ms, "
            f"{last[1]} misses of {last[3]} unique rows, {last[2]} evictions"
        )
    metrics = np.asarray(cached.cache_metrics(caches)["total"], np.float64)
    del state
    return _median_ms(times, warmup), metrics


def run_pipelined(cached, cached_step, hosts, batches, g, dist, warmup) -> float:
    """The same batches through ``prefetch_pipeline`` from an empty cache: the time of
    step n is the wall time between the dispatches of steps n and n + 1."""
    state, caches = _fresh_cache(cached, hosts)
    stamps = []

    def step(st, indices, batch):
        stamps.append(time.perf_counter())
        return cached_step(st, indices, jnp.asarray(batch[1]), g), None

    state, caches, _ = tbe.prefetch_pipeline(cached, step, state, caches, batches)
    jax.block_until_ready(state)
    stamps.append(time.perf_counter())
    times = np.diff(stamps).tolist()
    log(f"{dist} pipelined: {len(times)} steps, {[round(t * 1e3, 1) for t in times]} ms")
    return _median_ms(times, warmup)


def run(args) -> dict:
    _CLOCK["start"] = time.perf_counter()
    loc = tbe.EmbeddingLocation
    common = {"optimizer": tbe.OptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
    dev = tbe.ComputeDevice.CUDA
    specs = [(args.rows, args.dim, loc.DEVICE, dev)] * args.tables
    hbm_op = tbe.SplitTableBatchedEmbeddingBagsCodegen(specs, **common)
    cached_op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, loc.MANAGED_CACHING, dev)] * args.tables,
        cache_load_factor=args.load_factor,
        **common,
    )
    table_gb = args.tables * args.rows * args.dim * 4 / 1e9
    log(f"{jax.devices()[0]}: {args.tables} tables x {args.rows} x {args.dim} ({table_gb:.1f} GB)")
    steps = args.warmup + args.steps
    dists = args.dists.split(",")
    batches = {dist: make_batches(args, dist, steps) for dist in dists}
    ids_per_batch = int(np.mean([b[1][-1] for bs in batches.values() for b in bs]))
    log(f"drew {steps} batches per distribution ({ids_per_batch} ids each)")

    g = jax.random.normal(jax.random.key(0), (args.batch, args.tables * args.dim))
    box = {"s": hbm_op.init(jax.random.key(1))}
    jax.block_until_ready(box["s"])
    log("HBM baseline tables drawn on the device")

    cached = tbe.CachedTBE(cached_op)
    cached.init()
    hosts = cached.hosts
    for host in hosts.values():
        fill_uniform(host.weight, 1.0 / np.sqrt(args.rows))
    slots = sum(layout.slots for layout in cached.layouts.values())
    log(f"host tables filled; cache of {slots} rows ({args.load_factor} of the rows)")

    hbm_step, cached_step = _step(hbm_op), _step(cached)
    report = {"config": vars(args), "device": str(jax.devices()[0]), "results": {}}
    for dist in dists:
        result = {"hbm_ms": run_hbm(hbm_step, box, batches[dist], g, dist, args.warmup)}
        result["cached_ms"], metrics = run_cached(
            cached, cached_step, hosts, batches[dist], g, dist, args.warmup
        )
        result["hit_rate"] = float(metrics[0] / max(metrics[3], 1))
        result["metrics_total"] = dict(
            zip(("hits", "misses", "evictions", "unique"), metrics.tolist(), strict=True)
        )
        result["pipelined_ms"] = run_pipelined(
            cached, cached_step, hosts, batches[dist], g, dist, args.warmup
        )
        result["ratio_cached"] = result["cached_ms"] / result["hbm_ms"]
        result["ratio_pipelined"] = result["pipelined_ms"] / result["hbm_ms"]
        report["results"][dist] = result
        log(f"{dist} {json.dumps(result)}")
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
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 warmup step and 3 timed ones")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    for dist in args.dists.split(","):
        if dist not in ("zipf", "uniform"):
            raise ValueError(f"--dists takes zipf and/or uniform, got {dist!r}")
    quick_or_default = (1, 3) if args.quick else (2, 6)
    args.warmup = quick_or_default[0] if args.warmup is None else args.warmup
    args.steps = quick_or_default[1] if args.steps is None else args.steps
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check_cache.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'gpu_check_cache.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
