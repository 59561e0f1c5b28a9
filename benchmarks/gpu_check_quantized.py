"""GPU check of the quantized pooled lookup and of the TBE operator: correctness, then timing.

One lean run on "large" (32 tables x 1M rows x 128, B=8192, bags of 0..40 ids), every
array passed to the jitted functions as an argument (nothing closed over, so nothing is
constant-folded):

1. correctness: each Pallas kernel timed below (fp32, fp16, and INT8/INT4 at every launch
   shape of the sweep) against its XLA reference on the same inputs; torch's fp32
   ``embedding_bag`` against the fp32 kernel (the same ids and table, shared through
   DLPack). A wrong case is reported with its first wrong bag, column and table and is
   not timed; the run exits non-zero at the end, after writing the JSON.
2. timing (warmup, then the median of ``--reps`` runs, each after ``block_until_ready``):
   the jaxrec forward on fp32, fp16, INT8 and INT4 tables (INT8 and INT4 at ~11 forms
   each: bags, ids per step, warps, words or bytes, so one run picks the defaults; the
   finalists are timed again round-robin and the best is printed as the line of
   ``DEFAULT_LAUNCH`` that makes it the default, see :mod:`benchmarks._quantized_sweep`),
   torch's ``embedding_bag`` (sum, offsets) on fp32 and fp16 tables, and a JAX copy
   (``x * 2`` over 4 GiB) for the bandwidth they are measured against.
3. ``--tbe``: the TBE operator against the EmbeddingBagCollection on the same tables and
   ids (both on the Pallas kernels on a GPU): the forward, and the fused
   EXACT_ROWWISE_ADAGRAD train step on donated tables.

The JSON written to ``--out`` (``gpu_check_quantized.json``) explains its own fields
(its ``about`` entry) and states each target of issue 12 with its measured value.

    python -m benchmarks.gpu_check_quantized --tbe --out results/quantized      # GPU
    python -m benchmarks.gpu_check_quantized --interpret --small --tbe --out /tmp/q  # CPU
"""

from __future__ import annotations

import os

# JAX must not take most of the GPU up front: torch's tables live in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jaxrec_kernels.pooled_lookup import (  # noqa: E402
    PooledConfig,
    default_pooled_config,
    pooled_lookup,
    pooled_lookup_reference,
)
from jaxrec_kernels.quantized_lookup import (  # noqa: E402
    kernel_table,
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.rowwise_quantization import quantize_rows, row_bytes  # noqa: E402

from benchmarks._measure import (  # noqa: E402
    compare,
    copy_bandwidth,
    median_seconds,
    sector_bytes,
)
from benchmarks._quantized_sweep import (  # noqa: E402
    Variant,
    retime_finalists,
    suggested_defaults,
    sweep_variants,
)
from benchmarks._tbe_vs_ebc import time_tbe_vs_ebc  # noqa: E402

LARGE = (32, 1 << 20, 128, 8192, 40)
SMALL = (2, 50, 16, 4, 6)

ABOUT = {
    "shape": "tables x rows x dim, batch B, bags of 0..max_bag ids; lookups = ids looked up",
    "copy": "a jitted x * 2 over copy_bytes of float32: tbps = (read + written bytes) / s",
    "correctness": (
        "each kernel (name as in timings) against its reference on the same inputs: "
        "max_abs_diff <= tolerance (1e-5 x max |reference|), no non-finite output, no bad "
        "id counted; first_wrong = (bag, column) of the first wrong output"
    ),
    "timings": (
        "median_ms over reps runs after warmup (min_ms too); glookups_per_s = lookups / "
        "median / 1e9; bytes_read = lookups x stored row bytes; pct_of_copy = bytes_read / "
        "median / copy tbps; config = the launch shape (block_bags, block_len, num_warps, "
        "strategy) of a jaxrec kernel; sector_bytes_read = lookups x the 32-byte DRAM "
        "sectors a stored row spans (a random gather moves whole sectors: 512 B for an fp32 "
        "row of 128, 160 B for an INT8 row of 136 B, 96 B for an INT4 row of 68 B), "
        "sector_pct_of_copy the same against the copy bandwidth; other_bytes = the ids, "
        "offsets and output bytes a lookup also moves (jaxrec: int32 ids/offsets, float32 "
        "output; torch: int64 ids/offsets, output of the table's dtype)"
    ),
    "best": "per precision, the fastest correct launch shape of the sweep",
    "sweep": (
        "INT8 and INT4 timings named '<precision> jaxrec <form>': 'default' is what "
        "quantized_pooled_lookup runs with no config (kernels/quantized_lookup.py "
        "DEFAULT_LAUNCH); the others read e{element bytes the table is read in: 4 words, 2 "
        "half-words, 1 bytes}_{bags per program}x{ids per loop step}_w{warps}, '_2reads' "
        "= the scale and bias read by two loads (run A's form; else one load of the "
        "elements they span); word_bytes and one_scale_bias_read are in each timing. A form "
        "whose byte offsets would pass 2**31 in a table of at most 2**32 bytes is read in "
        "the widest safe element instead (the INT4 table of 2.28 GB is never read in bytes)"
    ),
    "uint8 table": (
        "'<precision> jaxrec default, uint8 table': the default kernel given the uint8 "
        "table, viewed as words inside the jitted call: the same kernel reading the same "
        "words as 'default', so its gap to 'default' is the run-to-run spread of one kernel "
        "(no byte loads are involved)"
    ),
    "rounds_ms": (
        "in the INT8/INT4 timings of the default and the 3 fastest forms: the first median "
        "and those of 2 more rounds, the finalists timed round-robin after the sweep"
    ),
    "suggested_defaults": (
        "per quantized precision: the correct form with the least mean of rounds_ms, that "
        "mean (best_ms) and the default's, "
        "and the one line of kernels/quantized_lookup.py (DEFAULT_LAUNCH) that makes it the "
        "default"
    ),
    "targets": (
        "issue 12's targets (int8_fp16_output_over_fp32_jaxrec: the INT8 lookup writing a "
        "float16 output, beside the target): value = measured ratio (lookups/s of the first over the second; "
        "for tbe_* the TBE's time over the collection's), met = whether it meets target, "
        "sector_bound = the ratio the DRAM sectors moved (rows' sectors + other_bytes: ids, "
        "offsets, output) allow (the ceiling at equal "
        "bandwidth efficiency)"
    ),
    "tbe_vs_ebc": (
        "seconds per forward and per fused EXACT_ROWWISE_ADAGRAD step of the TBE operator "
        "and of the EmbeddingBagCollection on the same tables and ids, and their ratios; "
        "the steps are timed in ABBA order (step_medians_s), each side the mean of its two "
        "medians"
    ),
}


def config_fields(config: PooledConfig | None) -> dict | None:
    return None if config is None else dataclasses.asdict(config)


def make_inputs(seed: int, tables: int, rows: int, dim: int, batch: int, max_len: int):
    """Host ids/offsets (numpy), and the fp32 table drawn on the device."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, tables * batch)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(0, rows, int(offsets[-1])).astype(np.int32)
    draw = jax.jit(lambda key: jax.random.normal(key, (tables * rows, dim), jnp.float32))
    feats = tuple((t, t * rows, rows, t * dim) for t in range(tables))
    return draw(jax.random.key(seed)), ids, offsets, feats


class Run:
    """The cases of one run: correctness reports, timings, failures."""

    def __init__(self, lookups: int, reps: int):
        self.lookups, self.reps = lookups, reps
        self.other_bytes = 0  # ids, offsets and the float32 output of a jaxrec lookup
        self.correctness, self.timings, self.failed = [], [], []
        self.forms = {}  # name -> (timed function, its arguments) of the forms being swept

    def check(self, name: str, got, bad, ref, dim: int, rtol: float = 1e-5) -> bool:
        report = compare(got, ref, int(bad), dim, rtol)
        print(f"{name}: kernel vs reference {report}", flush=True)
        self.correctness.append({"name": name, **report.as_json()})
        if not report.ok:
            self.failed.append(f"{name}: {report}")
        return report.ok

    def time(
        self, name, fn, args, row_nbytes, precision, impl, config=None, variant=None, other=0
    ) -> None:
        """Time ``fn(*args)``; ``variant``: the quantized form (element bytes, scale/bias
        read); ``other``: bytes it moves beside the rows (ids, offsets and the output;
        jaxrec's default: ``self.other_bytes``)."""
        med, low = median_seconds(fn, args, self.reps)
        self.timings.append(
            {
                "name": name,
                "precision": precision,
                "impl": impl,
                "config": config_fields(config),
                **({} if variant is None else variant.fields()),
                "median_ms": med * 1e3,
                "min_ms": low * 1e3,
                "glookups_per_s": self.lookups / med / 1e9,
                "bytes_read": self.lookups * row_nbytes,
                "sector_bytes_read": self.lookups * sector_bytes(row_nbytes),
                "other_bytes": other or self.other_bytes,
            }
        )
        print(f"{name:34s} {med * 1e3:9.3f} ms  {self.lookups / med / 1e9:7.2f} G lookups/s")


def run_float(run: Run, w, ids, offsets, feats, kw, interpret: bool) -> dict:
    """fp32 and fp16 tables: the kernel against the reference, then timed. Returns the
    fp32 kernel's output (torch's fp32 embedding_bag is checked against it)."""
    outputs = {}
    for precision, table in (("fp32", w), ("fp16", w.astype(jnp.float16))):
        config = default_pooled_config(  # what pooled_lookup picks, recorded with the timing
            table.shape[1],
            table.dtype,
            num_bags=len(feats) * kw["batch_size"],
            out_bytes=kw["batch_size"] * kw["num_columns"] * 4,
        )
        kernel = jax.jit(
            functools.partial(
                pooled_lookup,
                features=feats,
                interpret=interpret,
                out_dtype=jnp.float32,
                config=config,
                **kw,
            )
        )
        reference = jax.jit(
            functools.partial(pooled_lookup_reference, features=feats, out_dtype=jnp.float32, **kw)
        )
        name = f"{precision} jaxrec"
        got, bad = kernel(table, ids, offsets, None)
        ref, _ = reference(table, ids, offsets, None)
        if run.check(name, got, bad, ref, table.shape[1]):
            fwd = lambda t, i, o, k=kernel: k(t, i, o, None)[0]  # noqa: E731
            row_nbytes = table.shape[1] * table.dtype.itemsize
            args = (table, ids, offsets)
            run.time(name, fwd, args, row_nbytes, precision, "jaxrec pallas", config)
        outputs[precision] = got
        del table, ref
    return outputs["fp32"]


PALLAS = "jaxrec pallas"


def quantized_forward(config=None, **opts):
    """The jitted quantized kernel with ``opts`` bound, and its forward as timed (the
    output alone)."""
    kernel = jax.jit(functools.partial(quantized_pooled_lookup, config=config, **opts))
    return kernel, lambda t, i, o: kernel(t, i, o, None)[0]


def run_variant(run: Run, name, variant: Variant, table, ids, offsets, ref, opts) -> None:
    """One form of the kernel against the reference, then timed; an error (a form that
    does not compile) is recorded as a failed case and the sweep goes on."""
    wt, dim = opts["weight_type"], opts["dim"]
    try:
        kernel, fwd = quantized_forward(
            config=variant.config, one_scale_bias_read=variant.one_scale_bias_read, **opts
        )
        got, bad = kernel(table, ids, offsets, None)
    except Exception as err:  # noqa: BLE001 -- recorded, and the sweep goes on
        print(f"{name} FAILED: {err!r}", flush=True)
        run.correctness.append({"name": name, "ok": False, "error": repr(err)[:2000]})
        run.failed.append(f"{name}: {err!r}"[:500])
        return
    if run.check(name, got, bad, ref, dim):
        args = (table, ids, offsets)
        run.time(name, fwd, args, row_bytes(dim, wt), wt, PALLAS, variant.config, variant)
        run.forms[name] = (fwd, args)


def run_quantized(run: Run, w, ids, offsets, feats, kw, interpret: bool, small: bool) -> None:
    """INT8 and INT4 tables held as the elements the kernel reads: every form of the sweep
    against the reference, then timed."""
    dim, num_rows = w.shape[1], w.shape[0]
    for wt in ("int8", "int4"):
        q = quantize_rows(w, wt)
        variants = sweep_variants(dim, wt, num_rows, small)
        views = {v.word_bytes for v in variants.values()}
        tables = {wb: kernel_table(q, wb) for wb in sorted(views)}
        default_view = variants["default"].word_bytes
        del q
        reference = jax.jit(
            functools.partial(
                quantized_pooled_lookup_reference, features=feats, dim=dim, weight_type=wt, **kw
            )
        )
        ref, _ = reference(tables[default_view], ids, offsets, None)
        for wb, table in tables.items():
            print(f"{wt}: table {table.nbytes / 1e9:.2f} GB held in {wb}-byte elements")
        opts = dict(features=feats, dim=dim, weight_type=wt, interpret=interpret, **kw)
        for label, variant in variants.items():
            name = f"{wt} jaxrec {label}"
            table = tables[variant.word_bytes]
            run_variant(run, name, variant, table, ids, offsets, ref, opts)
        retime_finalists(run, wt)
        table = tables[default_view]
        # The cases below run the default form: only when it compiled and was right.
        default_ok = any(t["name"] == f"{wt} jaxrec default" for t in run.timings)
        if wt == "int8" and default_ok:
            # float16 output: the output write is a sixth of INT8's traffic in float32
            # (see sector_bound); both sides round the same float32 sums once.
            kernel, fwd = quantized_forward(**dict(opts, out_dtype=jnp.float16))
            half = dict(kw, out_dtype=jnp.float16)
            reference = functools.partial(
                quantized_pooled_lookup_reference, features=feats, dim=dim, weight_type=wt, **half
            )
            ref16, _ = jax.jit(reference)(table, ids, offsets, None)
            name = "int8 jaxrec default, fp16 output"
            got, bad = kernel(table, ids, offsets, None)
            if run.check(name, got, bad, ref16, dim, rtol=2.0**-10):  # one fp16 ulp at the max
                other = run.other_bytes - 2 * kw["batch_size"] * kw["num_columns"]
                args, precision = (table, ids, offsets), "int8 (fp16 output)"
                run.time(name, fwd, args, row_bytes(dim, wt), precision, PALLAS, other=other)
            del got, ref16
        del tables
        if default_view > 1 and default_ok:
            # The default kernel given the uint8 table: the word view is made inside the
            # jitted call. It reads as the default does (the same kernel and words), so
            # it shows whether the view is free (a bitcast) and how much two timings of
            # one kernel differ (run A: 0.735 vs 0.847 ms, see "about").
            q = quantize_rows(w, wt)
            _, fwd = quantized_forward(**opts)
            name, precision = f"{wt} jaxrec default, uint8 table", f"{wt} (uint8 table)"
            run.time(name, fwd, (q, ids, offsets), row_bytes(dim, wt), precision, PALLAS)
            del q
        del table, ref


def run_torch(run: Run, w, ids, offsets, shape, fp32_out) -> dict:
    """torch's embedding_bag (sum, offsets) on the same ids over the fp32 table (shared
    through DLPack; checked against jaxrec's fp32 kernel) and over its fp16 copy."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available() or jax.default_backend() != "gpu":
        return {"skipped": "torch and JAX do not both have a GPU"}
    tables, rows, dim, batch, _ = shape
    per_table = np.diff(offsets).reshape(tables, batch).sum(1)
    stacked = ids.astype(np.int64) + np.repeat(np.arange(tables, dtype=np.int64) * rows, per_table)
    t_ids = torch.from_numpy(stacked).cuda()
    t_offsets = torch.from_numpy(offsets[:-1].astype(np.int64)).cuda()
    jax.block_until_ready(w)
    info = {"torch_version": torch.__version__}
    try:
        t_w32 = torch.from_dlpack(w)  # the same memory: the same table as jaxrec's
    except Exception as err:  # noqa: BLE001 -- timed on a table of its own, not checked
        info["dlpack_error"] = repr(err)
        t_w32 = torch.randn(tables * rows, dim, device="cuda")

    def bag(table):
        out = torch.nn.functional.embedding_bag(t_ids, table, t_offsets, mode="sum")
        return out.reshape(tables, batch, dim).permute(1, 0, 2).reshape(batch, tables * dim)

    if "dlpack_error" not in info:
        report = compare(bag(t_w32).float().cpu().numpy(), fp32_out, 0, dim)
        print(f"torch fp32 embedding_bag vs jaxrec fp32: {report}", flush=True)
        name = "torch fp32 embedding_bag vs fp32 jaxrec"
        run.correctness.append({"name": name, **report.as_json()})
        if not report.ok:
            run.failed.append(f"{name}: {report}")
    for precision, table in (("fp32", t_w32), ("fp16", t_w32.half())):

        def call(table=table):
            out = torch.nn.functional.embedding_bag(t_ids, table, t_offsets, mode="sum")
            torch.cuda.synchronize()
            return out

        name = f"{precision} torch embedding_bag"
        # int64 ids and offsets, the [F*B, dim] output of the table's dtype
        other = 8 * (len(stacked) + len(offsets)) + batch * tables * dim * table.element_size()
        row = dim * table.element_size()
        run.time(name, call, (), row, precision, "torch embedding_bag", other=other)
        del table
    del t_w32
    torch.cuda.empty_cache()
    return info


def summarize(result: dict) -> None:
    """Add pct_of_copy to each timing, the best launch shape per precision and the
    targets with their measured values."""
    tbps = result["copy"]["tbps"]
    by_name = {}
    for t in result["timings"]:
        for what in ("bytes_read", "sector_bytes_read"):
            pct = 100 * t[what] / (t["median_ms"] / 1e3) / (tbps * 1e12)
            t["pct_of_copy" if what == "bytes_read" else "sector_pct_of_copy"] = pct
        by_name[t["name"]] = t
    best = {}
    for t in result["timings"]:
        key = f"{t['precision']} {t['impl']}"
        if key not in best or t["median_ms"] < best[key]["median_ms"]:
            best[key] = t
    result["best"] = {k: v["name"] for k, v in best.items()}
    result["suggested_defaults"] = suggested_defaults(result)

    def speed(key):
        return best[key]["glookups_per_s"] if key in best else None

    def target(num, den, goal, inverse=False, keys=None):
        if num is None or den is None:
            return {"value": None, "target": goal, "met": None}
        value = num / den
        bound = float(goal.split()[-1])
        met = value <= bound if inverse else (value >= bound if ">=" in goal else value > bound)
        entry = {"value": value, "target": goal, "met": met}
        if keys:  # the ratio the sectors allow, were both at one fraction of the bandwidth
            slow, fast = (best[k]["sector_bytes_read"] + best[k]["other_bytes"] for k in keys)
            entry["sector_bound"] = slow / fast
        return entry

    int8, int4 = speed("int8 jaxrec pallas"), speed("int4 jaxrec pallas")
    fp32, torch16 = speed("fp32 jaxrec pallas"), speed("fp16 torch embedding_bag")
    targets = {
        "int8_over_fp32_jaxrec": target(
            int8, fp32, ">= 3", keys=("fp32 jaxrec pallas", "int8 jaxrec pallas")
        ),
        "int8_over_torch_fp16": target(
            int8, torch16, "> 1", keys=("fp16 torch embedding_bag", "int8 jaxrec pallas")
        ),
        "int8_fp16_output_over_fp32_jaxrec": target(
            speed("int8 (fp16 output) jaxrec pallas"),
            fp32,
            ">= 3",
            keys=("fp32 jaxrec pallas", "int8 (fp16 output) jaxrec pallas"),
        ),
        "int4_over_int8": target(
            int4, int8, ">= 1.5", keys=("int8 jaxrec pallas", "int4 jaxrec pallas")
        ),
    }
    tbe = result.get("tbe_vs_ebc")
    if tbe and "error" not in tbe:
        targets["tbe_forward_over_ebc"] = target(
            tbe["forward_tbe_s"], tbe["forward_ebc_s"], "<= 1.03", True
        )
        targets["tbe_step_over_ebc"] = target(tbe["step_tbe_s"], tbe["step_ebc_s"], "<= 1.03", True)
    result["targets"] = targets


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for gpu_check_quantized.json")
    p.add_argument("--interpret", action="store_true", help="run the kernels on the CPU")
    p.add_argument("--small", action="store_true", help=f"shape {SMALL} instead of {LARGE}")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tbe", action="store_true", help="also time the TBE against the collection")
    args = p.parse_args(argv)
    started = time.perf_counter()
    shape = SMALL if args.small else LARGE
    tables, rows, dim, batch, max_len = shape
    w, ids_np, offsets_np, feats = make_inputs(0, *shape)
    ids, offsets = jnp.asarray(ids_np), jnp.asarray(offsets_np)
    lookups = int(offsets_np[-1])
    kw = dict(batch_size=batch, num_columns=tables * dim)
    result = {
        "about": ABOUT,
        "command": "python -m benchmarks.gpu_check_quantized "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "interpret": args.interpret,
        "shape": dict(
            tables=tables, rows=rows, dim=dim, batch=batch, max_bag=max_len, lookups=lookups
        ),
        "reps": args.reps,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(lookups, args.reps)
    run.other_bytes = 4 * (lookups + len(offsets_np)) + 4 * batch * tables * dim

    def save() -> None:
        """Write what is measured so far (a later phase that fails loses nothing)."""
        result.update(correctness=run.correctness, timings=run.timings, failed=run.failed)
        result["seconds"] = time.perf_counter() - started
        summarize(result)
        (out / "gpu_check_quantized.json").write_text(json.dumps(result, indent=1))

    def phase(name, fn, *fn_args):
        try:
            value = fn(*fn_args)
        except Exception as err:  # noqa: BLE001 -- recorded, and the run goes on
            print(f"{name} FAILED: {err!r}", flush=True)
            run.failed.append(f"{name}: {err!r}")
            value = {"error": repr(err)}
        result[name] = value
        save()
        return value

    result["copy"] = copy_bandwidth(args.reps, args.small)
    print(f"copy: {result['copy']['tbps']:.2f} TB/s", flush=True)
    fp32_out = run_float(run, w, ids, offsets, feats, kw, args.interpret)
    save()
    run_quantized(run, w, ids, offsets, feats, kw, args.interpret, args.small)
    save()
    fp32_out = np.asarray(fp32_out)
    phase("torch", run_torch, run, w, ids_np, offsets_np, shape, fp32_out)
    del w, fp32_out
    if args.tbe:
        tbe = phase("tbe_vs_ebc", time_tbe_vs_ebc, shape, args.reps, args.interpret)
        if tbe.get("forward_ok") is False:
            run.failed.append("tbe_vs_ebc: the TBE's forward differs from the collection's")
            save()
    for name, t in result["targets"].items():
        print(f"target {name}: {t}", flush=True)
    for wt, t in result["suggested_defaults"].items():
        print(
            f"best {wt}: {t['best']} {t['best_ms']:.3f} ms (default {t['default_ms']} ms); "
            f"to make it the default, in kernels/quantized_lookup.py: {t['line']}",
            flush=True,
        )
    print(f"wrote {out / 'gpu_check_quantized.json'} after {result['seconds']:.0f} s", flush=True)
    if run.failed:
        raise SystemExit("FAILED: " + "; ".join(run.failed))
    return result


if __name__ == "__main__":
    main()
