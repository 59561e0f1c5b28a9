"""GPU check of the quantized pooled lookup: correctness on fresh random inputs and timing.

On "large" (32 tables x 1M rows x 128, B=8192, bags of 0..40 ids) it times the INT8 and
INT4 kernels against the fp32 Pallas forward and torch's ``embedding_bag`` on fp16 tables
(when torch with CUDA is present), each with the bytes it reads and the % of the copy
bandwidth (``--copy-tbps``). ``--interpret --small`` runs it on the CPU (the tests do).
Each case prints its comparison with the XLA reference (max difference, non-finite
outputs on either side, the first wrong bag and column with its table) before anything is
timed; a wrong case is not timed, the others still are, and the run exits non-zero at the
end. ``--diagnose`` also checks INT4 read in bytes (the view that overflowed 32-bit
offsets on a 2.3 GB table).

``--tbe`` adds the TBE operator against the EmbeddingBagCollection on the same lookups
(the same float32 tables and ids, "large"): the forward and an EXACT_ROWWISE_ADAGRAD train
step of each, timed in the same run, with their ratio (the target is within 3%).

    python -m benchmarks.gpu_check_quantized --tbe      # on the GPU
    python -m benchmarks.gpu_check_quantized --interpret --small --tbe
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.pooled_lookup import pooled_lookup
from jaxrec_kernels.quantized_lookup import (
    kernel_word_bytes,
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.rowwise_quantization import quantize_rows, row_bytes


def inputs(seed, tables, rows, dim, batch, max_len):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, tables * batch)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(0, rows, int(offsets[-1])).astype(np.int32)
    w = jax.random.normal(jax.random.key(seed), (tables * rows, dim), jnp.float32)
    feats = tuple((t, t * rows, rows, t * dim) for t in range(tables))
    return w, jnp.asarray(ids), jnp.asarray(offsets), feats, int(offsets[-1])


@dataclasses.dataclass(frozen=True)
class CaseReport:
    """The kernel against the reference on one case: what a failure needs to be located."""

    max_abs_diff: float
    tolerance: float
    nonfinite_kernel: int
    nonfinite_reference: int
    bad_ids: int
    first_wrong: tuple[int, int] | None  # (bag, column) of the first wrong output
    dim: int

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_diff <= self.tolerance
            and self.nonfinite_kernel == self.nonfinite_reference == 0
            and self.bad_ids == 0
        )

    def __str__(self) -> str:
        text = f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        if self.ok:
            return text + " (ok)"
        text += (
            f" FAILED: non-finite outputs kernel {self.nonfinite_kernel}, reference "
            f"{self.nonfinite_reference}; bad ids counted {self.bad_ids}"
        )
        if self.first_wrong is not None:
            bag, col = self.first_wrong
            text += f"; first wrong output bag {bag} column {col} (table {col // self.dim})"
        return text


def check_case(q, ids, offsets, feats, dim, wt, interpret, kw, word_bytes=None) -> CaseReport:
    """Run the kernel and the XLA reference on ``q`` and compare them (no assertion)."""
    got, bad = quantized_pooled_lookup(
        q,
        ids,
        offsets,
        None,
        feats,
        dim=dim,
        weight_type=wt,
        interpret=interpret,
        word_bytes=word_bytes,
        **kw,
    )
    ref, _ = quantized_pooled_lookup_reference(
        q, ids, offsets, None, feats, dim=dim, weight_type=wt, **kw
    )
    got, ref = np.asarray(got), np.asarray(ref)
    finite = np.isfinite(ref)
    tolerance = 1e-5 * max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
    wrong = ~(np.abs(got - ref) <= tolerance)  # NaN counts as wrong
    diff = np.abs(got - ref)
    first = np.argwhere(wrong)
    return CaseReport(
        max_abs_diff=float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan"),
        tolerance=tolerance,
        nonfinite_kernel=int(np.sum(~np.isfinite(got))),
        nonfinite_reference=int(np.sum(~finite)),
        bad_ids=int(bad),
        first_wrong=tuple(int(v) for v in first[0]) if len(first) else None,
        dim=dim,
    )


def timed(fn, reps):
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def time_tbe_vs_ebc(shape, reps: int) -> dict:
    """Seconds per forward and per train step of the TBE and of the collection, and their
    ratios, on the same tables and ids (outputs checked equal first)."""
    import functools

    import jaxrec
    from jaxrec import tbe

    tables, rows, dim, batch, max_len = shape
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, max_len + 1, tables * batch)
    ids = rng.integers(0, rows, int(lengths.sum())).astype(np.int32)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    keys = [f"f{t}" for t in range(tables)]
    kjt = jaxrec.KeyedJaggedTensor(keys=keys, values=jnp.asarray(ids), lengths=lengths)
    backend = "auto"  # Pallas on the GPU; XLA on the CPU (the smoke test need not interpret)
    ebc = jaxrec.EmbeddingBagCollection(
        [
            jaxrec.EmbeddingBagConfig(
                name=f"t{t}", embedding_dim=dim, num_embeddings=rows, feature_names=[keys[t]]
            )
            for t in range(tables)
        ],
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01),
        backend=backend,
    )
    op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CUDA)] * tables,
        optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        backend=backend,
    )
    params = ebc.init(jax.random.key(0), kjt)["params"]
    views = ebc.state_dict({"params": params})
    state = op.set_split_embedding_weights(
        op.init(), [views[f"embedding_bags.t{t}.weight"] for t in range(tables)]
    )
    del views
    ids_j = jnp.asarray(ids)
    ebc_fwd = jax.jit(lambda p: ebc.apply({"params": p}, kjt).values())
    tbe_fwd = jax.jit(lambda s: op(s, ids_j, offsets))
    diff = float(jnp.max(jnp.abs(ebc_fwd(params) - tbe_fwd(state))))
    assert diff <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(tbe_fwd(state))))), diff
    g = jax.random.normal(jax.random.key(2), (batch, tables * dim), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=0)
    def ebc_step(p):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(p)
        return jaxrec.optim.apply_updates(p, grads)

    @functools.partial(jax.jit, donate_argnums=0)
    def tbe_step(s):
        return jaxrec.optim.apply_updates(
            s, jax.grad(lambda s: jnp.sum(op(s, ids_j, offsets) * g))(s)
        )

    held = {"ebc": params, "tbe": state}

    def run(name, step):
        held[name] = step(held[name])
        return held[name]

    out = {
        "forward_ebc_s": timed(lambda: ebc_fwd(held["ebc"]), reps),
        "forward_tbe_s": timed(lambda: tbe_fwd(held["tbe"]), reps),
        "step_ebc_s": timed(lambda: run("ebc", ebc_step), reps),
        "step_tbe_s": timed(lambda: run("tbe", tbe_step), reps),
    }
    out["forward_ratio"] = out["forward_tbe_s"] / out["forward_ebc_s"]
    out["step_ratio"] = out["step_tbe_s"] / out["step_ebc_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--copy-tbps", type=float, default=3.69)
    p.add_argument("--tbe", action="store_true", help="also time the TBE against the collection")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="after the timings, also check the INT4 kernel reading the table in bytes",
    )
    args = p.parse_args(argv)
    shape = (2, 50, 16, 4, 6) if args.small else (32, 1 << 20, 128, 8192, 40)
    tables, rows, dim, batch, max_len = shape
    w, ids, offsets, feats, n = inputs(0, *shape)
    kw = dict(batch_size=batch, num_columns=tables * dim)
    results, failed = {}, []
    for wt in ("int8", "int4"):
        q = quantize_rows(w, wt)
        words = kernel_word_bytes(*q.shape)
        report = check_case(q, ids, offsets, feats, dim, wt, args.interpret, kw)
        print(
            f"{wt}: kernel vs reference {report} (table {q.nbytes / 1e9:.2f} GB read in "
            f"{words}-byte elements)",
            flush=True,
        )
        if not report.ok:
            failed.append((wt, report))
            continue  # time only what is correct
        fn = jax.jit(
            lambda q, wt=wt: quantized_pooled_lookup(
                q,
                ids,
                offsets,
                None,
                feats,
                dim=dim,
                weight_type=wt,
                interpret=args.interpret,
                **kw,
            )[0]
        )
        results[wt] = (timed(lambda fn=fn, q=q: fn(q), args.reps), n * row_bytes(dim, wt))
        del q
    fp32 = jax.jit(
        lambda w: pooled_lookup(w, ids, offsets, None, feats, interpret=args.interpret, **kw)[0]
    )
    results["fp32 jaxrec"] = (timed(lambda: fp32(w), args.reps), n * dim * 4)
    try:
        import torch

        if torch.cuda.is_available() and not args.interpret:
            tw = torch.randn(tables * rows, dim, device="cuda", dtype=torch.float16)
            ti = torch.from_numpy(np.asarray(ids)).cuda().long()
            off = np.asarray(offsets).copy()
            ti = (
                ti
                + torch.from_numpy(
                    np.repeat(np.arange(tables) * rows, np.diff(off).reshape(tables, batch).sum(1))
                ).cuda()
            )
            to = torch.from_numpy(off[:-1]).cuda().long()
            f = lambda: torch.nn.functional.embedding_bag(ti, tw, to, mode="sum")  # noqa: E731
            f()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.reps):
                f()
            torch.cuda.synchronize()
            results["torch fp16 embedding_bag"] = (
                (time.perf_counter() - start) / args.reps,
                n * dim * 2,
            )
    except ImportError:
        pass
    for name, (sec, nbytes) in results.items():
        pct = 100 * nbytes / sec / (args.copy_tbps * 1e12)
        print(
            f"{name:26s} {sec * 1e3:9.3f} ms  {n / sec / 1e9:7.2f} G lookups/s  "
            f"{nbytes / 1e9:7.3f} GB read  {pct:5.1f}% of copy bandwidth",
            flush=True,
        )
    if args.diagnose:
        q = quantize_rows(w, "int4")
        report = check_case(q, ids, offsets, feats, dim, "int4", args.interpret, kw, word_bytes=1)
        print(
            f"int4 read in bytes (the former view, expected to fail on a table of 2**31 to "
            f"2**32 bytes): {report}",
            flush=True,
        )
        del q
    if args.tbe and not failed:
        del w, results
        t = time_tbe_vs_ebc(shape, args.reps)
        for what in ("forward", "step"):
            print(
                f"TBE vs EBC {what:8s}: TBE {t[f'{what}_tbe_s'] * 1e3:9.3f} ms  "
                f"EBC {t[f'{what}_ebc_s'] * 1e3:9.3f} ms  ratio {t[f'{what}_ratio']:.3f} "
                "(target <= 1.03)"
            )
    if failed:
        raise SystemExit("FAILED: " + "; ".join(f"{wt}: {report}" for wt, report in failed))


if __name__ == "__main__":
    main()
