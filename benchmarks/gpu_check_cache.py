"""Time host tables behind a device cache against all tables in HBM:
``python -m benchmarks.gpu_check_cache``.

The issue's model: 8 tables x 10M rows x 128 fp32 (``--tables --rows --dim``), B = 8192
(``--batch``), bags of mean length 20 (lengths uniform in [0, 40], ``--mean-len``), fused
row-wise Adagrad, ids Zipf(1.05) bounded to the table (``P(id = k) ~ (k + 1)^-alpha`` for
``k < rows``, drawn by inverse CDF) and uniform (``--dists``). For each distribution it runs
the same jitted train step (loss = sum(out * G), ``jax.grad`` + ``apply_updates``, donated)

- ``hbm``: every table ``EmbeddingLocation.DEVICE`` (the baseline of the same run);
- for each ``--variants`` entry, every table ``MANAGED_CACHING`` with ``--load-factor``
  (0.2) through ``jaxrec.tbe.CachedTBE``: ``numpy`` (staging in pageable NumPy memory),
  ``pinned_host`` (the library's default on a GPU: JAX ``pinned_host`` arrays written in
  place, ``jaxrec.tbe.staging``), ``torch_pinned`` (staging buffers in page-locked memory
  from torch; skipped without CUDA). Each variant warms a fresh cache for ``--warmup``
  steps (uniform ids: at most 20, 14 with ``--quick``, enough to fill it) through
  ``jaxrec.tbe.prefetch_pipeline``, then times ``--steps`` steps sequentially (prefetch,
  then the step, each waited for, with ``CachedTBE(profile=True)``: every stage of the
  prefetch waited for in turn, ``stages_ms``, and what no stage holds, ``unaccounted_ms``)
  and ``--steps`` more through the pipeline (next batch's misses fetched while the step
  runs; wall time between step dispatches).

It also times raw copies of one step's miss records (to the device from pageable NumPy,
through a NumPy-to-``pinned_host`` put, from a ``pinned_host`` array written in place, from
torch page-locked memory; back to the host into NumPy and into ``pinned_host``), reports
per-step hits, misses, evictions and unique rows, the hit rate (hits / unique rows, steady
state) and every median, to ``gpu_check_cache.json`` in ``--out`` (default ``$OUT``).
``--dists zipf`` re-runs the skewed case alone (about a minute less). ``--trace DIR`` runs
the sequential steps under the profiler and adds the busiest kernels and host calls of
each device stream and thread (``benchmarks.trace_summary``) to the report.

``--capacity-gb G`` instead trains tables totalling at least G GB of fp32 weights (tables of
``--rows x --dim``; 30 x 10M x 128 = 154 GB for G = 150) for ``--steps`` steps through the
cache (no HBM baseline), flushes, and saves a checkpoint of per-table weights and
optimizer state (``.npy`` files, FBGEMM's split views) to ``--checkpoint-dir``: as many whole
tables as fit in ``--checkpoint-gb`` (disk is smaller than the model), then reads one back
and checks it bit for bit. Tiny flags run on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

import jaxrec
from benchmarks.trace_summary import summarize, traced
from jaxrec import tbe
from jaxrec.tbe.staging import pinned_staging

_CLOCK = {"start": time.perf_counter()}
VARIANTS = ("numpy", "pinned_host", "torch_pinned")
# Uniform ids fill a 0.2 cache in ~0.2 * rows / (unique ids per batch) = 13 steps of the
# issue's model; after that every step evicts as many rows as it loads (the steady state).
UNIFORM_WARMUP = 20
UNIFORM_WARMUP_QUICK = 14


def log(message: str) -> None:
    """Print ``message`` with the seconds since the run started, flushed at once."""
    print(f"[{time.perf_counter() - _CLOCK['start']:7.1f} s] {message}", flush=True)


def zipf_cdf(rows: int, alpha: float) -> np.ndarray:
    """CDF of the Zipf law bounded to ``rows`` ids: ``P(k) ~ (k + 1)^-alpha``, ``k < rows``."""
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -alpha)
    return cdf / cdf[-1]


def _batch(seed, args, dist, cdf):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 2 * args.mean_len + 1, args.tables * args.batch)
    n = int(lengths.sum())
    if dist == "zipf":
        ids = np.minimum(np.searchsorted(cdf, rng.random(n)), args.rows - 1)
    else:
        ids = rng.integers(0, args.rows, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    capacity = args.tables * args.batch * 2 * args.mean_len  # fixed: no recompiles
    padded = np.zeros(capacity, np.int32)
    padded[:n] = ids
    return padded, offsets


def make_batches(args, dist: str, count: int, seed: int = 0) -> list:
    """``count`` batches ``(ids padded to a fixed capacity, offsets)``, drawn in threads."""
    cdf = zipf_cdf(args.rows, args.alpha) if dist == "zipf" else None
    seeds = np.random.SeedSequence([seed, ("zipf", "uniform").index(dist)]).spawn(count)
    with ThreadPoolExecutor(min(count, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda s: _batch(s, args, dist, cdf), seeds))


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


def _ms(values) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def torch_pinned_allocator():
    """``shape -> uint8 array`` in page-locked memory from torch, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    keep = []  # the tensors own the memory the arrays view

    def allocate(shape):
        tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        keep.append(tensor)
        return tensor.numpy()

    return allocate


def _cached_tbe(op, variant):
    if variant == "torch_pinned":
        allocate = torch_pinned_allocator()
        return None if allocate is None else tbe.CachedTBE(op, staging=allocate)
    kind = "pinned_host" if variant == "pinned_host" else None
    return tbe.CachedTBE(op, staging_memory_kind=kind)


def stage_times(cached, prefetch_s: list[float]) -> dict:
    """Median ms of each prefetch stage, and the median of what no stage of a prefetch
    holds (its wall time less the sum of its stages)."""
    stages = {k: _ms(v) for k, v in cached.timings.items()}
    per_step = zip(*cached.timings.values(), strict=True)
    rest = [total - sum(parts) for total, parts in zip(prefetch_s, per_step, strict=True)]
    return {"stages_ms": stages, "unaccounted_ms": _ms(rest)}


def run_hbm(hbm_step, box, batches, g, dist, warmup) -> float:
    times = []
    for ids, offsets in batches:
        ids, offsets = jax.block_until_ready((jnp.asarray(ids), jnp.asarray(offsets)))
        start = time.perf_counter()
        box["s"] = jax.block_until_ready(hbm_step(box["s"], ids, offsets, g))
        times.append(time.perf_counter() - start)
    log(f"{dist} hbm: {len(times)} steps, {[round(t * 1e3, 2) for t in times]} ms")
    return _ms(times[warmup:])


def _last(cached, caches) -> dict:
    last = np.asarray(cached.cache_metrics(caches)["last_total"]).tolist()
    return dict(zip(("hits", "misses", "evictions", "unique"), last, strict=True))


def run_variant(cached, hosts, step, batches, g, warmup, steps, name, trace=None) -> dict:
    """Warm a fresh cache, then time ``steps`` sequential and ``steps`` pipelined steps
    (the sequential ones under the profiler when ``trace`` names a folder)."""
    state, caches = cached.init()
    cached.hosts = hosts
    start = time.perf_counter()

    def plain(st, indices, batch):
        return step(st, indices, jnp.asarray(batch[1]), g), None

    state, caches, _ = tbe.prefetch_pipeline(cached, plain, state, caches, batches[:warmup])
    jax.block_until_ready(state)
    log(f"{name}: warmed {warmup} steps in {time.perf_counter() - start:.1f} s")
    for parts in cached.timings.values():
        parts.clear()
    rows, prefetch_s, step_s = [], [], []
    cached.profile = True  # each stage waited for: device time lands in its stage

    def sequential(state, caches):
        for ids, offsets in batches[warmup : warmup + steps]:
            start = time.perf_counter()
            ready = cached.prefetch(state, caches, ids, offsets)
            jax.block_until_ready(ready.state)
            prefetch_s.append(time.perf_counter() - start)
            caches, offsets = ready.caches, jax.block_until_ready(jnp.asarray(offsets))
            start = time.perf_counter()
            state = jax.block_until_ready(step(ready.state, ready.indices, offsets, g))
            step_s.append(time.perf_counter() - start)
            rows.append(_last(cached, caches))
        return state, caches

    run = functools.partial(sequential, state, caches)
    state, caches = traced(run, trace) if trace else run()
    cached.profile = False
    result = {
        "sequential_ms": _ms([a + b for a, b in zip(prefetch_s, step_s, strict=True)]),
        "prefetch_ms": _ms(prefetch_s),
        "device_step_ms": _ms(step_s),
        **{f"{k}_ms": _ms(cached.timings[k]) for k in ("d2h", "write_back", "gather", "h2d")},
        **stage_times(cached, prefetch_s),
        "per_step": rows,
    }
    if trace:
        result["trace"] = summarize(trace)
    hits = sum(r["hits"] for r in rows)
    result["hit_rate"] = hits / max(1, sum(r["unique"] for r in rows))
    log(f"{name} sequential: {json.dumps({k: v for k, v in result.items() if k != 'per_step'})}")
    stamps = []

    def stamped(st, indices, batch):
        stamps.append(time.perf_counter())
        return plain(st, indices, batch)

    timed = batches[warmup + steps : warmup + 2 * steps]
    state, caches, _ = tbe.prefetch_pipeline(cached, stamped, state, caches, timed)
    jax.block_until_ready(state)
    stamps.append(time.perf_counter())
    times = np.diff(stamps).tolist()
    result["pipelined_ms"] = _ms(times[1:])  # the first includes the unoverlapped prefetch
    log(f"{name} pipelined: {[round(t * 1e3, 1) for t in times]} ms")
    del state
    return result


def transfer_bench(nbytes: int, repeats: int = 5) -> dict:
    """Median ms of copies of ``nbytes``. To the device: from pageable NumPy, NumPy into a
    ``pinned_host`` array (a host copy), a ``pinned_host`` array to the device, one written
    in place (``jaxrec.tbe.staging``), torch page-locked memory; back: into NumPy and into a
    ``pinned_host`` array."""
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    pageable = np.ones(nbytes, np.uint8)
    out = {"bytes": nbytes}

    def timed(fn):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return _ms(times[1:])

    out["pageable_ms"] = timed(lambda: jax.device_put(pageable, sharding))
    pinned_sharding = sharding.with_memory_kind("pinned_host")
    out["to_pinned_host_ms"] = timed(lambda: jax.device_put(pageable, pinned_sharding))
    pinned = jax.device_put(pageable, pinned_sharding)
    out["pinned_host_to_device_ms"] = timed(lambda: jax.device_put(pinned, sharding))
    staging = pinned_staging(device)
    if staging is not None:
        view = staging.allocate((nbytes, 1))
        view[:] = 1
        out["pinned_in_place_ms"] = timed(lambda: staging.to_device(view))
        staging.release(view)
    allocate = torch_pinned_allocator()
    if allocate is not None:
        locked = allocate((nbytes,))
        locked[:] = 1
        out["torch_pinned_ms"] = timed(lambda: jax.device_put(locked, sharding))
    on_device = jax.device_put(pageable, sharding)  # "+ 0": a fresh array (no cached copy)
    out["d2h_pageable_ms"] = timed(lambda: np.asarray(on_device + 0))
    out["d2h_pinned_host_ms"] = timed(lambda: jax.device_put(on_device + 0, pinned_sharding))
    out["device_copy_ms"] = timed(lambda: on_device + 0)  # the "+ 0" alone
    for key in [k for k in out if k.endswith("_ms")]:
        out[key.replace("_ms", "_GBps")] = nbytes / out[key] / 1e6
    return out


def _ops(args, tables):
    loc, dev = tbe.EmbeddingLocation, tbe.ComputeDevice.CUDA
    common = {"optimizer": tbe.OptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
    hbm = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, loc.DEVICE, dev)] * tables, **common
    )
    cached = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, loc.MANAGED_CACHING, dev)] * tables,
        cache_load_factor=args.load_factor,
        **common,
    )
    return hbm, cached


def _filled_hosts(cached, args) -> dict:
    cached.init()
    for host in cached.hosts.values():
        fill_uniform(host.weight, 1.0 / np.sqrt(args.rows))
    return cached.hosts


def run(args) -> dict:
    _CLOCK["start"] = time.perf_counter()
    hbm_op, cached_op = _ops(args, args.tables)
    table_gb = args.tables * args.rows * args.dim * 4 / 1e9
    log(f"{jax.devices()[0]}: {args.tables} tables x {args.rows} x {args.dim} ({table_gb:.1f} GB)")
    count = args.warmup + 2 * args.steps
    dists = args.dists.split(",")
    batches = {dist: make_batches(args, dist, count) for dist in dists}
    log(f"drew {count} batches per distribution ({int(batches[dists[0]][0][1][-1])} ids each)")

    g = jax.random.normal(jax.random.key(0), (args.batch, args.tables * args.dim))
    box = {"s": jax.block_until_ready(hbm_op.init(jax.random.key(1)))}
    log("HBM baseline tables drawn on the device")
    hosts = _filled_hosts(tbe.CachedTBE(cached_op), args)
    row_bytes = next(iter(hosts.values())).row_bytes
    log(f"host tables filled ({row_bytes} bytes per row with its optimizer state)")

    hbm_step, cached_step = _step(hbm_op), _step(tbe.CachedTBE(cached_op))
    report = {"config": vars(args), "device": str(jax.devices()[0]), "results": {}}
    for dist in dists:
        result = {"hbm_ms": run_hbm(hbm_step, box, batches[dist][: 3 + args.steps], g, dist, 3)}
        for variant in args.variants.split(","):
            cached = _cached_tbe(cached_op, variant)
            if cached is None:
                log(f"{dist} {variant}: skipped (no CUDA torch)")
                continue
            name = f"{dist} {variant}"
            step = _step(cached)
            cap = UNIFORM_WARMUP_QUICK if args.quick else UNIFORM_WARMUP
            warmup = args.warmup if dist == "zipf" else min(args.warmup, cap)
            try:
                trace = os.path.join(args.trace, f"{dist}_{variant}") if args.trace else None
                out = run_variant(
                    cached, hosts, step, batches[dist], g, warmup, args.steps, name, trace
                )
            except ValueError as error:  # e.g. no in-place pinned_host staging on this device
                log(f"{name}: skipped ({error})")
                result[variant] = {"error": str(error)}
                continue
            out["ratio_sequential"] = out["sequential_ms"] / result["hbm_ms"]
            out["ratio_pipelined"] = out["pipelined_ms"] / result["hbm_ms"]
            result[variant] = out
        misses = [r["misses"] for v in VARIANTS for r in result.get(v, {}).get("per_step", [])]
        if misses:
            result["transfer"] = transfer_bench(int(np.median(misses)) * row_bytes)
            log(f"{dist} transfers: {json.dumps(result['transfer'])}")
        report["results"][dist] = result
    del cached_step
    return report


def save_checkpoint(cached, state, caches, folder: str, budget_gb: float) -> dict:
    """Flush, then save whole tables' weights and optimizer state as ``.npy`` while they
    fit in ``budget_gb``; read the first back and compare bit for bit."""
    start = time.perf_counter()
    weights = cached.split_embedding_weights(state, caches)
    states = cached.split_optimizer_states(state, caches)
    flushed = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    saved, total = [], 0
    start = time.perf_counter()
    for t, (weight, opt) in enumerate(zip(weights, states, strict=True)):
        size = weight.nbytes + sum(v.nbytes for v in opt.values())
        if total + size > budget_gb * 1e9:
            break
        np.save(os.path.join(folder, f"t{t}.weight.npy"), weight)
        for key, value in opt.items():
            np.save(os.path.join(folder, f"t{t}.{key}.npy"), value)
        saved.append(t)
        total += size
    written = time.perf_counter() - start
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"tables": saved, "num_tables": len(weights), "bytes": total}, f)
    same = bool(saved) and np.array_equal(
        np.load(os.path.join(folder, "t0.weight.npy"), mmap_mode="r"), weights[0]
    )
    return {
        "tables_saved": len(saved),
        "tables": len(weights),
        "saved_gb": total / 1e9,
        "flush_s": flushed,
        "write_s": written,
        "write_GBps": total / max(written, 1e-9) / 1e9,
        "read_back_equal": same,
    }


def run_capacity(args) -> dict:
    _CLOCK["start"] = time.perf_counter()
    tables = math.ceil(args.capacity_gb * 1e9 / (args.rows * args.dim * 4))
    _, op = _ops(args, tables)
    cached = tbe.CachedTBE(op)
    gb = tables * args.rows * args.dim * 4 / 1e9
    log(f"capacity: {tables} tables x {args.rows} x {args.dim} = {gb:.1f} GB fp32")
    start = time.perf_counter()
    hosts = _filled_hosts(cached, args)
    host_gb = sum(h.packed.nbytes for h in hosts.values()) / 1e9
    fill_s = time.perf_counter() - start
    log(f"host tables filled: {host_gb:.1f} GB with optimizer state in {fill_s:.1f} s")
    state, caches = cached.init()
    cached.hosts = hosts
    args.tables = tables
    batches = make_batches(args, "zipf", args.steps)
    g = jax.random.normal(jax.random.key(0), (args.batch, tables * args.dim))
    step = _step(cached)
    times = []
    for ids, offsets in batches:
        start = time.perf_counter()
        ready = cached.prefetch(state, caches, ids, offsets)
        caches = ready.caches
        state = jax.block_until_ready(step(ready.state, ready.indices, jnp.asarray(offsets), g))
        times.append(time.perf_counter() - start)
        log(f"capacity step {len(times)}: {times[-1] * 1e3:.0f} ms, {_last(cached, caches)}")
    checkpoint = save_checkpoint(cached, state, caches, args.checkpoint_dir, args.checkpoint_gb)
    log(f"checkpoint: {json.dumps(checkpoint)}")
    return {
        "config": vars(args),
        "device": str(jax.devices()[0]),
        "capacity": {
            "tables": tables,
            "table_gb": gb,
            "host_gb": host_gb,
            "fill_s": fill_s,
            "step_ms": [t * 1e3 for t in times],
            "checkpoint": checkpoint,
        },
    }


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
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    parser.add_argument("--warmup", type=int, default=None, help="cache warm-up (default 150)")
    parser.add_argument("--quick", action="store_true", help="40 warm-up and 4 timed steps")
    parser.add_argument("--capacity-gb", type=float, default=0.0)
    parser.add_argument("--checkpoint-dir", default="/tmp/jaxrec_capacity_ckpt")
    parser.add_argument("--checkpoint-gb", type=float, default=40.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument(
        "--trace", default=None,
        help="profile the sequential steps into this folder and summarize their kernels",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for dist in args.dists.split(","):
        if dist not in ("zipf", "uniform"):
            raise ValueError(f"--dists takes zipf and/or uniform, got {dist!r}")
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise ValueError(f"--variants takes {', '.join(VARIANTS)}, got {variant!r}")
    quick_or_default = (40, 4) if args.quick else (150, 8)
    args.warmup = quick_or_default[0] if args.warmup is None else args.warmup
    args.steps = quick_or_default[1] if args.steps is None else args.steps
    if args.steps < 2:
        raise ValueError(
            f"--steps must be >= 2 (the first pipelined step is not timed), got {args.steps}"
        )
    report = run_capacity(args) if args.capacity_gb else run(args)
    os.makedirs(args.out, exist_ok=True)
    name = "gpu_check_cache_capacity.json" if args.capacity_gb else "gpu_check_cache.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
