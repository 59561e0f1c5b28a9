"""Check and time the forward lookup kernels on a GPU: ``python -m benchmarks.gpu_check``.

1. ``correctness``: every case draws fresh random inputs (empty and long bags, repeated ids,
   shared tables, odd dims, fp32/fp16/bf16, SUM/MEAN, per-sample weights, out-of-range real
   ids under each bounds mode, padding filled with out-of-range ids) and compares the Pallas
   kernel with the XLA reference: float32 by ``|out - ref| / |ref|`` (at most 1e-6), fp16
   and bf16 within 1 ulp (:mod:`~jaxrec_kernels.ulps`: both round a float32 sum once, so a
   kernel that summed in 16 bits fails); outputs are poisoned with NaN
   first (``out=`` prefilled, or a freed NaN buffer of the output's size for fresh outputs),
   so a missed write shows. Every launch shape timed below is checked too.
2. ``tune``: times candidate launch shapes of the pooled kernel for each (dim, dtype) on a
   tuning model (8 tables x 1M rows, B=8192, bags 0..40), on "fbgemm-default" and "large"
   (plain, weighted, bf16), and of the sequence kernel on "large"; ``--repeats`` times them
   interleaved and ranks medians; the fastest of each is used below. Beside them: an XLA
   random-row gather and the sequence kernel over the same ids, and (fbgemm-default) a call
   whose bags are all empty.
3. ``bench``: :func:`jaxrec.bench.run_shape` with its peers, in the same run; ``--rounds``
   repeats whole passes and reports medians; the ``--in-jit-shapes`` are also timed as
   ``--in-jit-calls`` lookups inside one jitted call. Without ``tune``, the library's
   default launch shapes run.

Writes ``gpu_check.json`` (and the printed table) to ``--out`` (default ``$OUT`` or ``.``).
``--interpret`` runs the same flow on a CPU (slowly), to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels._pallas_compat import next_power_of_2
from jaxrec_kernels.pooled_lookup import PooledConfig, pooled_lookup, pooled_lookup_reference
from jaxrec_kernels.sequence_lookup import (
    SequenceConfig,
    sequence_lookup,
    sequence_lookup_reference,
)
from jaxrec_kernels.ulps import rounded_once_ulps

from benchmarks._common import relative_error
from jaxrec import bench

# Candidate launch shapes: for short rows (D <= 64) and for wide rows (D >= 128).
SHORT_ROW_VARIANTS = [
    PooledConfig(1, 16, 2, 2),
    PooledConfig(1, 16, 1, 2),
    PooledConfig(1, 8, 1, 2),
    PooledConfig(1, 32, 1, 2),
    PooledConfig(1, 32, 2, 2),
    PooledConfig(1, 16, 1, 2, eviction_policy="evict_first"),
    PooledConfig(1, 16, 2, 2, eviction_policy="evict_first"),
    PooledConfig(1, 32, 2, 2, eviction_policy="evict_first"),
]
WIDE_ROW_VARIANTS = [
    PooledConfig(1, 32, 4, 2),
    PooledConfig(1, 16, 2, 2),
    PooledConfig(1, 8, 2, 2),
    PooledConfig(1, 16, 4, 2),
    PooledConfig(1, 32, 4, 2, eviction_policy="evict_first"),
    PooledConfig(1, 16, 2, 2, eviction_policy="evict_first"),
    PooledConfig(1, 8, 2, 2, eviction_policy="evict_first"),
    PooledConfig(16, 32, 4, 2, strategy="segmented"),
    PooledConfig(16, 32, 4, 2, strategy="segmented", eviction_policy="evict_first"),
    PooledConfig(16, 32, 4, 1, strategy="segmented"),
    PooledConfig(16, 32, 8, 2, strategy="segmented"),
    PooledConfig(32, 32, 4, 2, strategy="segmented"),
]
BF16_VARIANTS = [  # 256-byte rows, many bags
    PooledConfig(16, 32, 4, 2, strategy="segmented"),
    PooledConfig(16, 32, 2, 2, strategy="segmented"),
    PooledConfig(16, 64, 4, 2, strategy="segmented"),
]
POOLED_VARIANTS = list(dict.fromkeys(SHORT_ROW_VARIANTS + WIDE_ROW_VARIANTS + BF16_VARIANTS))
SEQUENCE_VARIANTS = [
    SequenceConfig(32, 1, 4),
    SequenceConfig(32, 8, 4),
    SequenceConfig(16, 16, 4),
    SequenceConfig(64, 4, 4),
    SequenceConfig(64, 8, 8),
    SequenceConfig(128, 2, 8),
]
TUNE_DIMS = {"fp32": (16, 32, 64, 128, 256), "bf16": (16, 128)}
TUNE_ROWS, TUNE_TABLES, TUNE_BATCH = 1_000_000, 8, 8192
TUNE_CATEGORIES = tuple(f"{t}:{d}" for t, dims in TUNE_DIMS.items() for d in dims) + (
    "fbgemm-default",
    "large",
    "large-weighted",
    "large-bf16",
    "sequence",
)


def _cfg_name(cfg) -> str:
    if cfg is None:
        return "default"
    return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def _poison_freed(shape, dtype) -> None:
    """Fill, then free, a NaN buffer of ``shape``: a fresh output will likely reuse it."""
    jnp.full(shape, jnp.nan, dtype).block_until_ready()


def _error(out, ref) -> dict:
    """How far ``out`` is from the reference ``ref`` (same dtype): the relative error, and for
    16-bit outputs the largest distance in ulps; ``ok`` at 1e-6 relative (float32) or 1 ulp
    of the reference's float32 result rounded once (16-bit: summing in 16 bits fails)."""
    err = {"relerr": relative_error(out, ref)}
    if jnp.dtype(out.dtype).itemsize < 4:
        ulps = rounded_once_ulps(np.asarray(out), np.asarray(ref, np.float64), out.dtype)
        err["max_ulps"] = float(ulps.max(initial=0.0))
        err["ok"] = err["max_ulps"] <= 1
    else:
        err["ok"] = err["relerr"] <= 1e-6
    return err


def _random_kjt(rng, num_kjt, batch, max_len, table_rows, bad_frac, pad):
    lengths = rng.integers(0, max_len + 1, num_kjt * batch)
    lengths[rng.random(lengths.shape) < 0.2] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n = int(offsets[-1])
    highs = np.repeat(np.repeat(np.asarray(table_rows), batch), lengths)
    ids = (rng.random(n) * highs).astype(np.int32)
    bad = rng.random(n) < bad_frac
    ids[bad] = np.where(rng.random(bad.sum()) < 0.5, -3, highs[bad] + 7)
    ids = np.concatenate([ids, np.full(pad, 1 << 30, np.int32)])
    ids[n::2] = -(1 << 30)
    return jnp.asarray(ids), jnp.asarray(offsets)


def _pooled_case(
    rng,
    *,
    dims,
    dtype,
    pooling,
    weighted,
    bounds,
    config,
    max_len,
    rows,
    shared,
    interpret,
    batch=None,
):
    """Groups of one dim each, written into one NaN-poisoned output; returns (relerr, ok)."""
    num_kjt = 2 * len(dims)
    batch = int(rng.integers(3, 70)) if batch is None else batch
    table_rows = [rows] * num_kjt
    bad_frac = 0.0 if bounds == "none" else 0.05
    ids, offsets = _random_kjt(rng, num_kjt, batch, max_len, table_rows, bad_frac, 37)
    psw = jnp.asarray(rng.normal(size=ids.shape), jnp.float32) if weighted else None
    cols = 2 * sum(dims) + 5
    out = jnp.full((batch, cols), jnp.nan, dtype)
    ref = out
    col, counts_ok = 0, True
    for k, d in enumerate(dims):
        second_row = 0 if shared else rows
        feats = ((2 * k, 0, rows, col), (2 * k + 1, second_row, rows, col + d))
        w = jnp.asarray(rng.normal(size=(2 * rows, d)), dtype)
        kw = dict(batch_size=batch, num_columns=cols, pooling=pooling, bounds_check=bounds)
        out, c1 = pooled_lookup(
            w, ids, offsets, psw, feats, out=out, config=config, interpret=interpret, **kw
        )
        ref, c2 = pooled_lookup_reference(w, ids, offsets, psw, feats, out=ref, **kw)
        counts_ok &= int(c1) == int(c2)
        col += 2 * d
    written = np.isfinite(np.asarray(ref, np.float32))
    untouched = np.isnan(np.asarray(out, np.float32)) == ~written
    err = _error(jnp.where(written, out, 0), jnp.where(written, ref, 0))
    return err, bool(counts_ok and untouched.all())


def _pooled_fresh_case(rng, *, dim, dtype, config, interpret):
    """Fully covered output, no ``out=``: the fresh buffer reuses freed NaN memory."""
    num_kjt, batch, rows = 3, 257, 50
    ids, offsets = _random_kjt(rng, num_kjt, batch, 30, [rows] * num_kjt, 0.0, 5)
    w = jnp.asarray(rng.normal(size=(num_kjt * rows, dim)), dtype)
    feats = tuple((k, k * rows, rows, k * dim) for k in range(num_kjt))
    kw = dict(batch_size=batch, num_columns=num_kjt * dim)
    _poison_freed((batch, num_kjt * dim), dtype)
    out, _ = pooled_lookup(w, ids, offsets, None, feats, config=config, interpret=interpret, **kw)
    ref, _ = pooled_lookup_reference(w, ids, offsets, None, feats, **kw)
    return _error(out, ref), True


def _sequence_case(rng, *, dim, dtype, bounds, config, interpret):
    num_kjt, batch, rows = 4, int(rng.integers(3, 70)), 40
    ids, offsets = _random_kjt(rng, num_kjt, batch, 25, [rows] * num_kjt, 0.05, 33)
    w = jnp.asarray(rng.normal(size=(3 * rows, dim)), dtype)
    feats = ((0, 0, rows, 0), (2, rows, rows, 0), (3, 2 * rows, rows, 0))
    _poison_freed((ids.shape[0], dim), dtype)
    out, c1 = sequence_lookup(
        w,
        ids,
        offsets,
        feats,
        batch_size=batch,
        bounds_check=bounds,
        config=config,
        interpret=interpret,
    )
    ref, c2 = sequence_lookup_reference(
        w, ids, offsets, feats, batch_size=batch, bounds_check=bounds
    )
    exact = bool(jnp.all(out == ref))
    return {"relerr": relative_error(out, ref), "ok": exact}, exact and int(c1) == int(c2)


def correctness(seed: int, interpret: bool = False, limit: int | None = None) -> list[dict]:
    """Run every case; one record per case with its relative error (16-bit outputs: also
    the largest distance in ulps) and pass/fail."""
    rng = np.random.default_rng(seed)
    modes = (("sum", False, "warning"), ("mean", True, "fatal"), ("sum", True, "ignore"))
    base = dict(config=None, max_len=40, rows=30, shared=False)
    cases = []
    for k, (dims, dtype) in enumerate(
        (d, t) for d in ([3, 24, 48], [96, 160], [128, 256]) for t in ("fp32", "fp16", "bf16")
    ):
        if k % 4:  # three of the nine: every dims list, dtype and mode once
            continue
        pooling, weighted, bounds = modes[k % 3]
        cases.append(
            (
                "pooled",
                dict(
                    base, dims=dims, dtype=dtype, pooling=pooling, weighted=weighted, bounds=bounds
                ),
            )
        )
    for pooling, weighted, bounds in modes:
        cases.append(
            (
                "pooled",
                dict(
                    base,
                    dims=[16, 128],
                    dtype="fp32",
                    pooling=pooling,
                    weighted=weighted,
                    bounds=bounds,
                    shared=True,
                ),
            )
        )
    for cfg in POOLED_VARIANTS:
        for dims, dtype in (([24, 128], "fp32"), ([16, 256], "bf16")):
            kw = dict(dims=dims, dtype=dtype, pooling="mean", weighted=True, bounds="warning")
            cases.append(("pooled", dict(kw, config=cfg, max_len=70, rows=9, shared=True)))
    kw = dict(dims=[128], dtype="fp32", pooling="sum", weighted=False, bounds="none")
    cases.append(("pooled", dict(kw, config=None, max_len=400, rows=1000, shared=False)))
    # Enough bags for the default launch shape of 512-byte rows to switch to "segmented".
    kw = dict(dims=[128], dtype="fp32", pooling="mean", weighted=True, bounds="warning")
    cases.append(
        ("pooled", dict(kw, config=None, max_len=6, rows=5000, shared=False, batch=70_001))
    )
    for dim in (48, 128):
        cases.append(("fresh", dict(dim=dim, dtype="fp32", config=None)))
    seq_cases = ((128, "fp32", "warning"), (24, "bf16", "ignore"), (160, "fp16", "fatal"))
    for dim, dtype, bounds in seq_cases:
        cases.append(("sequence", dict(dim=dim, dtype=dtype, bounds=bounds, config=None)))
    for cfg in SEQUENCE_VARIANTS:
        for dim, dtype, bounds in seq_cases[:2]:
            cases.append(("sequence", dict(dim=dim, dtype=dtype, bounds=bounds, config=cfg)))
    records = []
    for kind, kw in cases[:limit]:
        kw = dict(kw)
        dtype = kw["dtype"]
        kw["dtype"] = bench.DTYPES[dtype]
        rec = {
            "kind": kind,
            **{
                k: (_cfg_name(v) if k == "config" and v else v)
                for k, v in kw.items()
                if k != "dtype"
            },
            "dtype": dtype,
        }
        try:
            fn = {"pooled": _pooled_case, "fresh": _pooled_fresh_case, "sequence": _sequence_case}[
                kind
            ]
            err, ok = fn(rng, interpret=interpret, **kw)
            rec.update(err, ok=bool(ok and err["ok"]))
        except Exception as ex:
            rec.update(
                ok=False,
                error=f"{type(ex).__name__}: {ex}"[:1500],
                trace=traceback.format_exc()[-3000:],
            )
        records.append(rec)
    return records


def _tune_job(category: str):
    """(dtype, shape, weighted, op, candidate launch shapes) of one tuning category."""
    if category == "sequence":
        return "fp32", bench.SHAPES["large"], False, "sequence", SEQUENCE_VARIANTS
    if category in ("fbgemm-default", "large", "large-weighted"):
        weighted = category == "large-weighted"
        shape = bench.SHAPES[category.removesuffix("-weighted")]
        return "fp32", shape, weighted, "pooled", WIDE_ROW_VARIANTS
    if category == "large-bf16":
        return "bf16", bench.SHAPES["large"], False, "pooled", SHORT_ROW_VARIANTS + BF16_VARIANTS
    dtype, dim = category.split(":")
    shape = bench.BenchShape(f"tune-{dim}", ((TUNE_ROWS, int(dim)),) * TUNE_TABLES, TUNE_BATCH, 20)
    row_bytes = next_power_of_2(int(dim)) * jnp.dtype(bench.DTYPES[dtype]).itemsize
    variants = SHORT_ROW_VARIANTS if row_bytes <= 256 else WIDE_ROW_VARIANTS
    return dtype, shape, False, "pooled", variants


def tune(
    iters: int, interpret: bool = False, categories=TUNE_CATEGORIES, repeats: int = 1
) -> tuple[list[dict], dict]:
    """Time every candidate launch shape; returns (records, fastest config per category).

    Categories: ``"{dtype}:{dim}"`` on the tuning model (8 tables x 1M rows, B=8192),
    ``"fbgemm-default"`` and ``"large"`` (fp32), and ``"sequence"`` (fp32, "large"). The
    candidates are timed ``repeats`` times, interleaved, and ranked by their median. Each
    pooled category also times a plain random-row gather (XLA ``take`` fused into a sum over
    the same ids) and the sequence kernel over the same ids (rows read and written).
    """
    rows, best = [], {}
    for category in categories:
        if category not in TUNE_CATEGORIES:
            raise ValueError(f"unknown tuning category {category!r}; known: {TUNE_CATEGORIES}")
        dtype, shape, weighted, op, variants = _tune_job(category)
        inputs = bench.make_inputs(shape, dtype, weighted=weighted, rotations=2)
        arg_sets = list(zip(inputs.ids, inputs.offsets, strict=True))
        if op == "sequence":
            nbytes = bench.sequence_bytes(inputs, dtype)
        else:
            nbytes = bench.pooled_bytes(inputs, dtype, weighted)
        times: dict = {}
        for r in range(repeats):
            for cfg in variants:
                rec = _time_variant(inputs, op, cfg, arg_sets, nbytes, iters, interpret)
                rec.update(category=category, shape=shape.name, dtype=dtype, repeat=r)
                rows.append(rec)
                if "ms" in rec:
                    times.setdefault(cfg, []).append(rec["ms"])
        if times:
            best[category] = min(times, key=lambda c: float(np.median(times[c])))
        if category == "fbgemm-default":  # the fixed cost: same launch, every bag empty
            empty = [(ids, jnp.zeros_like(offsets)) for ids, offsets in arg_sets]
            out_bytes = inputs.shape.batch_size * inputs.num_columns * 4
            rec = _time_variant(inputs, op, None, empty, out_bytes, iters, interpret)
            rec.update(category=category, shape=shape.name, dtype=dtype, op="pooled-empty")
            rows.append(rec)
        if op == "pooled" and not weighted:
            seq_bytes = bench.sequence_bytes(inputs, dtype)
            for rec in (
                _time_gather(inputs, arg_sets, iters),
                _time_variant(inputs, "sequence", None, arg_sets, seq_bytes, iters, interpret),
            ):
                rec.update(category=category, shape=shape.name, dtype=dtype)
                rows.append(rec)
        del inputs
    return rows, best


def _time_gather(inputs, arg_sets, iters):
    """XLA: every id's row gathered and summed into one row per group (reads the rows only)."""
    groups, batch = inputs.groups, inputs.shape.batch_size

    offs = inputs.host_offsets[0]
    spans = [
        [
            (int(offs[t * batch]), int(offs[(t + 1) * batch]), f[1])
            for t, f in zip(g.tables, g.features, strict=True)
        ]
        for g in groups
    ]

    @jax.jit
    def gather(tables, ids, offsets):
        del offsets
        sums = []
        for span, w in zip(spans, tables, strict=True):
            rows = jnp.concatenate([ids[lo:hi] + row_offset for lo, hi, row_offset in span])
            sums.append(jnp.take(w, rows, axis=0).astype(jnp.float32).sum(axis=0))
        return sums

    tables = [g.weights for g in groups]
    item = jnp.dtype(tables[0].dtype).itemsize
    nbytes = sum(
        (hi - lo) * g.dim * item
        for span, g in zip(spans, groups, strict=True)
        for lo, hi, _ in span
    )
    rec = {"op": "gather", "config": "xla take+sum", "bytes": int(nbytes)}
    try:
        ms = bench.time_op(lambda i, o: gather(tables, i, o), arg_sets, iters=iters)
        rec.update(ms=ms, GBps=nbytes / ms / 1e6)
    except Exception as ex:
        rec["error"] = f"{type(ex).__name__}: {ex}"[:1500]
    return rec


@functools.partial(jax.jit, static_argnames=("op", "cfg", "layout", "interpret"))
def _run_variant(tables, ids, offsets, psw, *, op, cfg, layout, interpret):
    """All groups of a bench model through one kernel launch shape (jit-cached per shape)."""
    batch, cols, group_features = layout
    if op == "sequence":
        return [
            sequence_lookup(
                w, ids, offsets, feats, batch_size=batch, config=cfg, interpret=interpret
            )[0]
            for feats, w in zip(group_features, tables, strict=True)
        ]
    out = None
    for feats, w in zip(group_features, tables, strict=True):
        out, _ = pooled_lookup(
            w,
            ids,
            offsets,
            psw,
            feats,
            out=out,
            config=cfg,
            interpret=interpret,
            batch_size=batch,
            num_columns=cols,
            fill_uncovered=False,
        )
    return out


def _time_variant(inputs, op, cfg, arg_sets, nbytes, iters, interpret=False):
    tables = [g.weights for g in inputs.groups]
    layout = (
        inputs.shape.batch_size,
        inputs.num_columns,
        tuple(g.features for g in inputs.groups),
    )
    fn = functools.partial(_run_variant, op=op, cfg=cfg, layout=layout, interpret=interpret)
    psw = inputs.per_sample_weights[0] if inputs.per_sample_weights and op == "pooled" else None
    rec = {"op": op, "config": _cfg_name(cfg), "bytes": nbytes}
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(tables, *arg_sets[0], psw))
        rec["first_call_s"] = time.perf_counter() - t0
        ms = bench.time_op(lambda i, o: fn(tables, i, o, psw), arg_sets, iters=iters)
        rec.update(ms=ms, GBps=nbytes / ms / 1e6)
    except Exception as ex:
        rec["error"] = f"{type(ex).__name__}: {ex}"[:1500]
    return rec


def _torch_copy_bandwidth(nbytes: int) -> float | None:
    """``torch.Tensor.copy_`` bandwidth (read + write) of an ``nbytes`` buffer, if torch runs."""
    try:
        import torch

        bufs = [torch.empty(nbytes // 4, dtype=torch.float32, device="cuda") for _ in range(2)]
        ms = bench.time_op(
            lambda: bufs[1].copy_(bufs[0]), [()], sync=lambda _: torch.cuda.synchronize()
        )
        bufs.clear()
        torch.cuda.empty_cache()
        return 2 * nbytes / ms / 1e6
    except Exception:  # no torch or no CUDA: the JAX copy figure stands alone
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sections", default="correctness,tune,bench")
    p.add_argument(
        "--bench",
        default="fbgemm-default:fp32:sum:0,large:fp32:sum:0:pooled+sequence,large:bf16:sum:0,"
        "large:fp32:mean:0,large:fp32:sum:1,mixed-dim:fp32:sum:0",
        help="comma list of shape:dtype:pooling:weighted[:ops]",
    )
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--in-jit-calls", type=int, default=8, help="lookups per jitted call")
    p.add_argument(
        "--in-jit-shapes",
        default="fbgemm-default",
        help="shapes (short calls) also timed as --in-jit-calls lookups in one jitted call",
    )
    p.add_argument("--rounds", type=int, default=1, help="bench passes; medians reported")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timings per candidate")
    p.add_argument(
        "--tune",
        default=",".join(TUNE_CATEGORIES),
        help=f"comma list of tuning categories out of {TUNE_CATEGORIES}",
    )
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--interpret", action="store_true", help="CPU dry run of the checks")
    p.add_argument("--limit", type=int, default=None, help="run only the first N checks")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    record = {**bench.environment(), "seed": args.seed}
    path = os.path.join(args.out, "gpu_check.json")

    def save():
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    on_gpu = jax.default_backend() == "gpu"
    record["copy_GBps"] = bench.copy_bandwidth(2**31 if on_gpu else 2**24)
    record["torch_copy_GBps"] = _torch_copy_bandwidth(2**31) if on_gpu else None
    print(
        f"device {record['device']} jax {record['jax']} torch {record['torch']} copy "
        f"{record['copy_GBps']:.1f} GB/s (jax), {record['torch_copy_GBps']} GB/s (torch)",
        flush=True,
    )
    if "correctness" in sections:
        recs = correctness(args.seed, args.interpret, args.limit)
        record["correctness"] = recs
        save()
        bad = [r for r in recs if not r["ok"]]
        print(f"correctness: {len(recs) - len(bad)}/{len(recs)} ok", flush=True)
        for r in bad[:8]:
            print("FAIL", json.dumps({k: v for k, v in r.items() if k != "trace"})[:600])
        if bad and "trace" in bad[0]:
            print(bad[0]["trace"])
    best = {}
    if "tune" in sections:
        rows, best = tune(args.iters, args.interpret, args.tune.split(","), args.repeats)
        record["tune"] = rows
        record["tuned"] = {k: _cfg_name(v) for k, v in best.items()}
        save()
        for r in rows:
            val = f"{r['ms']:.4f} ms {r['GBps']:.0f} GB/s" if "ms" in r else r["error"][:150]
            cfg = r["config"].replace("num_", "").replace("block_", "")
            print(f"{r['category']:<15}{cfg:<62}{val}", flush=True)
        for k, v in record["tuned"].items():
            print(f"tuned {k}: {v}")
    if "bench" in sections:
        results = []
        specs = [spec for _ in range(args.rounds) for spec in args.bench.split(",")]
        for spec in specs:
            name, dtype, pooling, weighted, *ops = spec.split(":")
            key = name if name in ("fbgemm-default", "large") and dtype == "fp32" else None

            def pick(g, dtype=dtype, key=key):
                return best.get(key) or best.get(f"{dtype}:{next_power_of_2(g.dim)}")

            results += bench.run_shape(
                bench.SHAPES[name],
                interpret=args.interpret,
                pooled_config=pick,
                sequence_config=lambda g: best.get("sequence"),
                dtype=dtype,
                pooling=pooling,
                weighted=weighted == "1",
                ops=ops[0].split("+") if ops else ("pooled",),
                iters=args.iters,
                copy_gbps=record["copy_GBps"],
                in_jit_calls=args.in_jit_calls if name in args.in_jit_shapes.split(",") else 1,
            )
            record["bench_rounds"] = results
            save()
        record["bench"] = bench.median_over_rounds(results, record["copy_GBps"])
        save()
        print(bench.format_table(record["bench"]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
