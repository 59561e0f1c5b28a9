"""Check and time the fused sparse backward on a GPU: ``python -m jaxrec_kernels.gpu_check_backward``.

1. ``correctness``: fresh random inputs (seed printed) on mid-size tables: the Pallas kernel
   against the XLA reference for several optimizers, poolings, dims, 16-bit tables and every
   launch shape timed below, by ``|dw - dw_ref| / |dw_ref|`` over the touched rows (``dw`` =
   new minus old rows); rows nobody touched compared bit for bit, and two runs compared bit
   for bit (determinism).
2. ``variants``: the backward alone (XLA sort/segment + kernel, tables donated) on the train
   shape at 1M rows per table for several launch shapes; the XLA preprocessing timed alone;
   the bytes it must move.
3. ``step``: the whole train step (forward + loss ``sum(out * G)`` + fused backward, tables
   donated) at 100k / 1M / 2M rows per table, fp32 and bf16 with stochastic rounding, and two
   peers from the same run: the XLA reference step (XLA forward, XLA fused update) and a
   hand-written XLA sparse step (``unique`` + ``segment_sum`` + scatter).

Train shape: 8 tables x E rows x D=128 stacked in one group, B=8192, bag lengths uniform in
0..40, row-wise Adagrad. Writes ``gpu_check_backward.json`` to ``--out`` (default ``$OUT``).
``--small --interpret`` runs every section on tiny shapes on a CPU (a smoke test of this
script). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import secrets
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.optim import sparse_optimizers as so

from .pooled_lookup import pooled_lookup, pooled_lookup_reference
from .sparse_update import (
    SparseUpdateConfig,
    _occurrences,
    _segments,
    fused_sparse_update,
    fused_sparse_update_reference,
    sparse_row_gradients,
)

VARIANTS = [
    SparseUpdateConfig(16, 1, 4, 1),
    SparseUpdateConfig(8, 1, 2, 1),
    SparseUpdateConfig(32, 1, 8, 1),
    SparseUpdateConfig(4, 2, 2, 1),
    SparseUpdateConfig(1, 4, 1, 1),
    SparseUpdateConfig(16, 1, 4, 2),
]


@dataclasses.dataclass(frozen=True)
class Sizes:
    check_tables: int = 4
    check_rows: int = 20_000
    check_batch: int = 512
    tables: int = 8
    batch: int = 8192
    max_len: int = 40
    step_rows: tuple = (1_000_000, 100_000, 2_000_000)


SMALL = Sizes(2, 50, 4, 2, 16, 6, (300, 100, 600))


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: jax.Array
    offsets: jax.Array
    psw: jax.Array | None
    features: tuple
    batch_size: int
    num_rows: int
    lookups: int


def make_batch(rng, tables, rows, batch_size, max_len, dim, padding=0, weighted=False):
    """``tables`` tables of ``rows`` rows; KJT feature t reads table t into columns t*dim..."""
    lengths = rng.integers(0, max_len + 1, tables * batch_size)
    n = int(lengths.sum())
    ids = np.concatenate([rng.integers(0, rows, n), np.full(padding, 2**31 - 1)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    psw = jnp.asarray(rng.uniform(0.5, 1.5, ids.size), jnp.float32) if weighted else None
    features = tuple((t, t * rows, rows, t * dim) for t in range(tables))
    return Batch(
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(offsets, jnp.int32),
        psw,
        features,
        batch_size,
        tables * rows,
        n,
    )


def _median_ms(fn, carry, iters=20, reps=5):
    """Median over ``reps`` of the mean time of ``iters`` chained calls ``carry = fn(carry)``."""
    for _ in range(3):
        carry = fn(carry)
    jax.block_until_ready(carry)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            carry = fn(carry)
        jax.block_until_ready(carry)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return float(np.median(times)), carry


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _error(err) -> str:
    return "".join(traceback.format_exception_only(err))[-1500:]


# --------------------------------------------------------------------------- correctness


def check_case(rng, sizes, opt, *, dim, pooling, dtype, weighted, config, interpret):
    batch = make_batch(
        rng,
        sizes.check_tables,
        sizes.check_rows,
        sizes.check_batch,
        sizes.max_len,
        0 if pooling == "none" else dim,
        1000,
        weighted,
    )
    num_rows, key = batch.num_rows, jax.random.key(int(rng.integers(2**31)))
    w = (jax.random.normal(key, (num_rows, dim)) * 0.1).astype(dtype)
    state = {
        k: jnp.abs(jax.random.normal(jax.random.fold_in(key, i), v.shape)) * 0.1
        for i, (k, v) in enumerate(sorted(opt.init(num_rows, dim).items()))
    }
    rows_out = batch.ids.shape[0] if pooling == "none" else sizes.check_batch
    cols_out = dim if pooling == "none" else sizes.check_tables * dim
    grad_out = jax.random.normal(jax.random.fold_in(key, 99), (rows_out, cols_out))
    args = (w, state, jnp.int32(7), grad_out, batch.ids, batch.offsets, batch.psw, batch.features)
    layout = dict(batch_size=batch.batch_size, dim=dim, pooling=pooling)
    got = fused_sparse_update(*args, optimizer=opt, config=config, interpret=interpret, **layout)
    again = fused_sparse_update(*args, optimizer=opt, config=config, interpret=interpret, **layout)
    want = fused_sparse_update_reference(*args, optimizer=opt, **layout)
    rows, _ = sparse_row_gradients(
        grad_out, batch.ids, batch.offsets, batch.psw, batch.features, num_rows=num_rows, **layout
    )
    rows = np.asarray(rows)
    touched = np.zeros(num_rows, bool)
    touched[rows[rows < num_rows]] = True
    w0, wg, ww = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (w, got[0], want[0]))

    def same(a, b, mask=slice(None)):
        return bool(np.array_equal(np.asarray(a)[mask], np.asarray(b)[mask]))

    result = {
        "opt": opt.name,
        "dim": dim,
        "pooling": pooling,
        "dtype": jnp.dtype(dtype).name,
        "weighted": weighted,
        "config": dataclasses.asdict(config),
        "touched": int(touched.sum()),
        "rel_dw": _rel(wg[touched] - w0[touched], ww[touched] - w0[touched]),
        "rel_state": max([_rel(got[1][k], want[1][k]) for k in state] or [0.0]),
        "untouched_bit_identical": same(got[0], w, ~touched)
        and all(same(got[1][k], state[k], ~touched) for k in state),
        "deterministic": same(got[0], again[0])
        and all(same(got[1][k], again[1][k]) for k in state),
    }
    tol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    result["ok"] = (
        result["rel_dw"] < tol
        and result["rel_state"] < 1e-5
        and result["untouched_bit_identical"]
        and result["deterministic"]
    )
    return result


def correctness(rng, sizes, interpret):
    rowwise = so.exact_rowwise_adagrad(0.05)
    default = SparseUpdateConfig()
    cases = [
        (rowwise, 128, "sum", jnp.float32, False, default),
        (rowwise, 96, "mean", jnp.float32, True, default),
        (so.exact_sgd(0.05), 128, "sum", jnp.float32, True, SparseUpdateConfig(1, 4, 1, 1)),
        (so.adam(0.05), 64, "mean", jnp.float32, False, SparseUpdateConfig(4, 2, 2, 1)),
        (so.partial_rowwise_adam(0.05), 128, "none", jnp.float32, False, default),
        (so.lamb(0.05), 128, "sum", jnp.float32, False, SparseUpdateConfig(32, 1, 8, 1)),
        (rowwise, 128, "sum", jnp.bfloat16, False, default),
        (rowwise, 128, "sum", jnp.float16, True, default),
    ] + [(rowwise, 128, "sum", jnp.float32, False, v) for v in VARIANTS[1:]]
    out = []
    for opt, dim, pooling, dtype, weighted, cfg in cases:
        try:
            r = check_case(
                rng,
                sizes,
                opt,
                dim=dim,
                pooling=pooling,
                dtype=dtype,
                weighted=weighted,
                config=cfg,
                interpret=interpret,
            )
        except Exception as err:  # report every case
            r = {
                "opt": opt.name,
                "dim": dim,
                "pooling": pooling,
                "ok": False,
                "config": dataclasses.asdict(cfg),
                "error": _error(err),
            }
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


# --------------------------------------------------------------------------- timings


def _train_inputs(rng, sizes, rows, dtype, dim=128):
    batch = make_batch(rng, sizes.tables, rows, sizes.batch, sizes.max_len, dim)
    key = jax.random.key(int(rng.integers(2**31)))
    w = (jax.random.normal(key, (batch.num_rows, dim), jnp.float32) * 0.01).astype(dtype)
    g = jax.random.normal(jax.random.fold_in(key, 1), (sizes.batch, sizes.tables * dim))
    return batch, w, g


def _update_fn(impl, config, interpret):
    if impl == "pallas":
        return functools.partial(fused_sparse_update, config=config, interpret=interpret)
    return fused_sparse_update_reference


def backward_fn(batch, opt, dim, impl, config=None, interpret=False):
    update = _update_fn(impl, config, interpret)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def bwd(carry, g):
        w, st, t = carry
        w, st = update(
            w,
            st,
            t,
            g,
            batch.ids,
            batch.offsets,
            None,
            batch.features,
            batch_size=batch.batch_size,
            dim=dim,
            pooling="sum",
            optimizer=opt,
        )
        return w, st, t + 1

    return bwd


def preprocess_fn(batch):
    @jax.jit
    def pre(ids, offsets):
        occ = _occurrences(
            ids, offsets, None, batch.features, batch.batch_size, batch.num_rows, "sum"
        )
        seg = _segments(occ.rows, batch.num_rows)
        return (
            seg.starts,
            seg.unique_rows,
            occ.src_row[seg.order],
            occ.src_col[seg.order],
            occ.scale[seg.order],
        )

    return pre


def step_fn(batch, opt, dim, impl, config=None, interpret=False):
    """A jitted train step ``carry -> carry`` (carry = (w, state, t, loss)), tables donated."""
    if impl == "xla_handwritten":
        return _handwritten_step(
            batch, dim, opt.hyperparams["learning_rate"], opt.hyperparams["eps"]
        )
    update = _update_fn(impl, config, interpret)
    lookup = (
        functools.partial(pooled_lookup, interpret=interpret)
        if impl == "pallas"
        else pooled_lookup_reference
    )

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry, g):
        w, st, t, _ = carry
        out, _ = lookup(
            w,
            batch.ids,
            batch.offsets,
            None,
            batch.features,
            batch_size=batch.batch_size,
            num_columns=g.shape[1],
            pooling="sum",
            out_dtype=jnp.float32,
        )
        loss = jnp.sum(out * g)  # d loss / d out = g
        w, st = update(
            w,
            st,
            t,
            g,
            batch.ids,
            batch.offsets,
            None,
            batch.features,
            batch_size=batch.batch_size,
            dim=dim,
            pooling="sum",
            optimizer=opt,
        )
        return w, st, t + 1, loss

    return step


def _handwritten_step(batch, dim, lr, eps):
    """What a JAX user writes without jaxrec: XLA forward, unique + segment_sum + scatter."""
    n = batch.ids.shape[0]
    tables = len(batch.features)
    lengths = batch.offsets[1:] - batch.offsets[:-1]
    bag = jnp.repeat(jnp.arange(lengths.shape[0]), lengths, total_repeat_length=n)
    rows_all = batch.ids + (bag // batch.batch_size) * (batch.num_rows // tables)

    def loss_rows(rows, g):
        pooled = jax.ops.segment_sum(rows, bag, num_segments=lengths.shape[0])
        pooled = pooled.reshape(tables, batch.batch_size, dim).transpose(1, 0, 2)
        return jnp.sum(pooled.reshape(batch.batch_size, -1) * g)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry, g):
        w, st, t, _ = carry
        loss, grow = jax.value_and_grad(loss_rows)(jnp.take(w, rows_all, axis=0), g)
        uniq, inv = jnp.unique(rows_all, return_inverse=True, size=n, fill_value=w.shape[0])
        gs = jax.ops.segment_sum(grow, inv.reshape(-1), num_segments=n)
        acc = st["momentum1"].at[uniq].add(jnp.mean(gs * gs, axis=1), mode="drop")
        a = jnp.take(acc, uniq, axis=0, mode="fill", fill_value=1.0)
        w = w.at[uniq].add(-lr * gs / (jnp.sqrt(a)[:, None] + eps), mode="drop")
        return w, {"momentum1": acc}, t + 1, loss

    return step


def _compiled_text(jitted, *args) -> str:
    return jitted.lower(*args).compile().as_text()


def _table_copies(text: str, shape) -> int:
    """Copy instructions of a table-sized buffer in compiled HLO text."""
    dims = f"[{shape[0]},{shape[1]}]"
    return sum(1 for line in text.splitlines() if " copy(" in line and dims in line)


def byte_model(batch, dim, itemsize, state_floats_per_row):
    """The bytes the backward must move through device memory (each touched row once)."""
    rows, _ = sparse_row_gradients(
        jnp.zeros((batch.batch_size, len(batch.features) * dim)),
        batch.ids,
        batch.offsets,
        None,
        batch.features,
        batch_size=batch.batch_size,
        dim=dim,
        num_rows=batch.num_rows,
        pooling="sum",
    )
    unique = int(jnp.sum(rows < batch.num_rows))
    n = batch.lookups
    table = 2 * unique * (dim * itemsize + 4 * state_floats_per_row)
    sort = 4 * 2 * n * 8  # about 4 radix passes, each reading and writing (key, value) pairs
    grad_gathers = n * dim * 4  # mostly served by L2: grad_out is B x 1024 floats
    return {
        "unique_rows": unique,
        "lookups": n,
        "table_and_state_bytes": table,
        "grad_gather_bytes": grad_gathers,
        "sort_bytes_est": sort,
        "hbm_bytes_min": table + sort,
    }


def variants(rng, sizes, deadline, interpret):
    batch, w, g = _train_inputs(rng, sizes, sizes.step_rows[0], jnp.float32)
    opt, dim = so.exact_rowwise_adagrad(0.01), 128
    res = {"bytes": byte_model(batch, dim, 4, 1)}
    pre = preprocess_fn(batch)
    res["preprocess_ms"], _ = _median_ms(lambda c: pre(batch.ids, batch.offsets), None)
    res["sort"] = "cub" if "cub" in _compiled_text(pre, batch.ids, batch.offsets).lower() else "xla"
    carry = (w, opt.init(batch.num_rows, dim), jnp.int32(1))
    res["backward"] = []
    for cfg in VARIANTS:
        if time.time() > deadline:
            break
        bwd = backward_fn(batch, opt, dim, "pallas", cfg, interpret)
        r = {"config": dataclasses.asdict(cfg)}
        try:
            r["ms"], carry = _median_ms(lambda c, bwd=bwd: bwd(c, g), carry)
            r["GBps_of_min_bytes"] = res["bytes"]["hbm_bytes_min"] / r["ms"] / 1e6
        except Exception as err:
            r["error"] = _error(err)
        print(json.dumps(r), flush=True)
        res["backward"].append(r)
    ref = backward_fn(batch, opt, dim, "xla")
    res["backward_xla_reference_ms"], carry = _median_ms(lambda c: ref(c, g), carry)
    text = _compiled_text(backward_fn(batch, opt, dim, "pallas", VARIANTS[0], interpret), carry, g)
    res["table_copies_in_backward"] = _table_copies(text, w.shape)
    best = min((r for r in res["backward"] if "ms" in r), key=lambda r: r["ms"], default=None)
    return res, best


def train_steps(rng, sizes, deadline, config, interpret):
    opt, dim = so.exact_rowwise_adagrad(0.01, eps=1e-8), 128
    cases = [(r, jnp.float32) for r in sizes.step_rows] + [(sizes.step_rows[0], jnp.bfloat16)]
    out = []
    for rows, dtype in cases:
        if time.time() > deadline:
            break
        batch, w, g = _train_inputs(rng, sizes, rows, dtype)
        r = {"rows_per_table": rows, "dtype": jnp.dtype(dtype).name, "lookups": batch.lookups}
        impls = ["pallas"]
        if dtype == jnp.float32:
            impls += ["xla", "xla_handwritten"]
        for impl in impls:
            fn = step_fn(batch, opt, dim, impl, config, interpret)
            carry = (w, opt.init(batch.num_rows, dim), jnp.int32(1), jnp.zeros(()))
            try:
                r[f"{impl}_ms"], carry = _median_ms(lambda c, fn=fn, g=g: fn(c, g), carry, 10, 5)
                if impl == "pallas":
                    r["table_copies"] = _table_copies(_compiled_text(fn, carry, g), w.shape)
            except Exception as err:
                r[f"{impl}_error"] = _error(err)
            w = carry[0]
        print(json.dumps(r), flush=True)
        out.append(r)
        del w, g, carry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default="correctness,variants,step")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else Sizes()
    deadline = time.time() + args.budget_s
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    sections = args.sections.split(",")
    results = {
        "seed": seed,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "sizes": dataclasses.asdict(sizes),
    }
    path = os.path.join(args.out, "gpu_check_backward.json")

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    config = SparseUpdateConfig()
    if "correctness" in sections:
        results["correctness"] = correctness(rng, sizes, args.interpret)
        save()
    if "variants" in sections and time.time() < deadline:
        results["variants"], best = variants(rng, sizes, deadline, args.interpret)
        if best is not None:
            config = SparseUpdateConfig(**best["config"])
        save()
    if "step" in sections and time.time() < deadline:
        results["step_config"] = dataclasses.asdict(config)
        results["step"] = train_steps(rng, sizes, deadline, config, args.interpret)
        save()
    ok = all(r.get("ok") for r in results.get("correctness", []))
    print("seed", seed, "correctness:", "all ok" if ok else "FAILURES")
    v = results.get("variants", {})
    print("bytes", v.get("bytes"), "preprocess_ms", v.get("preprocess_ms"), "sort", v.get("sort"))
    for r in v.get("backward", []):
        print("backward", r)
    print(
        "backward_xla_reference_ms",
        v.get("backward_xla_reference_ms"),
        "table_copies_in_backward",
        v.get("table_copies_in_backward"),
    )
    for r in results.get("step", []):
        print("step", r)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
