"""Check and time the fused sparse backward on a GPU: ``python -m benchmarks.gpu_check_backward``.

1. ``correctness``: fresh random inputs (seed printed) on mid-size tables: the Pallas kernel
   against the XLA reference for several optimizers, poolings, dims, 16-bit tables and every
   launch shape timed below, by ``|dw - dw_ref| / |dw_ref|`` over the touched rows (``dw`` =
   new minus old rows; at most 1e-5), 16-bit tables by the new rows within 1 ulp of the
   reference's; rows nobody touched compared bit for bit, and two runs compared bit for bit
   (determinism). Ids uniform or Zipf(1.05) (a few hot rows, as real ids are).
2. ``variants``: the backward alone (XLA sort/segment + kernel, tables donated) on the train
   shape at 1M rows per table for several launch shapes; the XLA preprocessing timed alone;
   the bytes it must move.
3. ``step``: the whole train step (forward + loss ``sum(out * G)`` + fused backward, tables
   donated) at 100k / 1M / 2M rows per table, fp32 and bf16 with stochastic rounding, and two
   peers from the same run: the XLA reference step (XLA forward, XLA fused update) and a
   hand-written XLA sparse step (``unique`` + ``segment_sum`` + scatter). At 1M rows the
   same shapes with uniform and with Zipf(1.05) ids: the kernel with hot rows cut into
   chunks (the default), without (``pallas_unchunked``) and with chunks of 256, one step of
   the kernel checked against the XLA reference on the same inputs (``check``), and the
   forward and the backward timed alone.
4. ``weights``: the gradient w.r.t. the per-sample weights (:mod:`.weight_gradient`): the
   Pallas kernel against the XLA reference (SUM/MEAN, several dims, fp32/bf16 tables; at most
   1e-5 relative, padding exactly 0), and both timed on the train shape at 1M rows per table
   with the bytes they must move. The step section stops early enough to leave this one
   ``WEIGHTS_RESERVE_S`` of ``--budget-s``.

Train shape: 8 tables x E rows x D=128 stacked in one group, B=8192, bag lengths uniform in
0..40, row-wise Adagrad. Writes ``gpu_check_backward.json`` to ``--out`` (default ``$OUT``).
``--small --interpret`` runs every section on tiny shapes on a CPU (a smoke test of this
script; ``--limit N`` keeps the first N cases of each section), as the test suite does.
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
from jaxrec_kernels import row_gradients
from jaxrec_kernels.pooled_lookup import pooled_lookup, pooled_lookup_reference, position_bags
from jaxrec_kernels.row_gradients import sparse_row_gradients
from jaxrec_kernels.sparse_update import (
    SparseUpdateConfig,
    fused_sparse_update,
    fused_sparse_update_reference,
)
from jaxrec_kernels.ulps import rounded_once_ulps
from jaxrec_kernels.weight_gradient import weight_gradient, weight_gradient_reference

from benchmarks._common import relative_error
from jaxrec.optim import sparse_optimizers as so

VARIANTS = [
    SparseUpdateConfig(4, 1, 1, 1),
    SparseUpdateConfig(8, 1, 1, 1),
    SparseUpdateConfig(2, 1, 1, 1),
    SparseUpdateConfig(4, 1, 1, 2),
    SparseUpdateConfig(4, 2, 1, 1),
    SparseUpdateConfig(8, 1, 2, 1, evict_first=True),
]


WEIGHTS_RESERVE_S = 25.0  # seconds of --budget-s kept for the weights section
ZIPF_ALPHA = 1.05  # skewed ids as real recommendation ids are: a few hot rows


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


def zipf_ids(rng, rows: int, n: int, alpha: float = ZIPF_ALPHA) -> np.ndarray:
    """``n`` ids in ``[0, rows)`` with ``P(k) ~ (k + 1)^-alpha`` (row 0 the hottest)."""
    cdf = np.cumsum(np.arange(1, rows + 1, dtype=np.float64) ** -alpha)
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n)), rows - 1)


def make_batch(
    rng, tables, rows, batch_size, max_len, dim, padding=0, weighted=False, dist="uniform"
):
    """``tables`` tables of ``rows`` rows; KJT feature t reads table t into columns t*dim...

    ``dist``: ids uniform over each table, or ``"zipf"`` (:func:`zipf_ids`, every table).
    """
    lengths = rng.integers(0, max_len + 1, tables * batch_size)
    n = int(lengths.sum())
    real = zipf_ids(rng, rows, n) if dist == "zipf" else rng.integers(0, rows, n)
    ids = np.concatenate([real, np.full(padding, 2**31 - 1)])
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


def hottest_row_occurrences(batch: Batch) -> int:
    """How many of the batch's lookups hit its most frequent row (the longest run)."""
    ids = np.asarray(batch.ids[: batch.lookups]).astype(np.int64)
    lengths = np.diff(np.asarray(batch.offsets))
    table = np.repeat(np.arange(lengths.size) // batch.batch_size, lengths)
    rows = ids + table * (batch.num_rows // len(batch.features))
    return int(np.unique(rows, return_counts=True)[1].max(initial=0))


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


def _error(err) -> str:
    return "".join(traceback.format_exception_only(err))[-1500:]


# --------------------------------------------------------------------------- correctness


def check_case(
    rng, sizes, opt, *, dim, pooling, dtype, weighted, config, interpret, dist="uniform"
):
    batch = make_batch(
        rng,
        sizes.check_tables,
        sizes.check_rows,
        sizes.check_batch,
        sizes.max_len,
        0 if pooling == "none" else dim,
        1000,
        weighted,
        dist,
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
        "dist": dist,
        "config": dataclasses.asdict(config),
        "touched": int(touched.sum()),
        "hottest_row_occurrences": hottest_row_occurrences(batch),
        "rel_dw": relative_error(wg[touched] - w0[touched], ww[touched] - w0[touched]),
        "rel_state": max([relative_error(got[1][k], want[1][k]) for k in state] or [0.0]),
        "untouched_bit_identical": same(got[0], w, ~touched)
        and all(same(got[1][k], state[k], ~touched) for k in state),
        "deterministic": same(got[0], again[0])
        and all(same(got[1][k], again[1][k]) for k in state),
    }
    if jnp.dtype(dtype) == jnp.float32:
        dw_ok = result["rel_dw"] < 1e-5
    else:  # new rows within 1 ulp: both round (or stochastically round) a float32 row once
        ulps = rounded_once_ulps(np.asarray(got[0])[touched], ww[touched], dtype)
        result["max_ulps"] = float(ulps.max(initial=0.0))
        dw_ok = result["max_ulps"] <= 1
    result["ok"] = (
        dw_ok
        and result["rel_state"] < 1e-5
        and result["untouched_bit_identical"]
        and result["deterministic"]
    )
    return result


def correctness(rng, sizes, interpret, limit=None):
    rowwise = so.exact_rowwise_adagrad(0.05)
    default = SparseUpdateConfig()
    zipf = "zipf"
    cases = [
        (rowwise, 128, "sum", jnp.float32, False, default, zipf),
        (rowwise, 128, "sum", jnp.float32, False, default, "uniform"),
        (rowwise, 96, "mean", jnp.float32, True, SparseUpdateConfig(4, 2, 2, 1), "uniform"),
        (so.exact_sgd(0.05), 128, "sum", jnp.float32, True, SparseUpdateConfig(1, 4, 1, 1), zipf),
        (so.adam(0.05), 64, "mean", jnp.float32, False, SparseUpdateConfig(16, 1, 4, 1), zipf),
        (so.partial_rowwise_adam(0.05), 128, "none", jnp.float32, False, default, zipf),
        (rowwise, 128, "sum", jnp.bfloat16, False, default, zipf),
        (rowwise, 128, "sum", jnp.float16, True, default, "uniform"),
    ] + [(rowwise, 128, "sum", jnp.float32, False, v, "uniform") for v in VARIANTS[1:4]]
    out = []
    for opt, dim, pooling, dtype, weighted, cfg, dist in cases[:limit]:
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
                dist=dist,
            )
        except Exception as err:  # report every case
            r = {
                "opt": opt.name,
                "dim": dim,
                "pooling": pooling,
                "dist": dist,
                "ok": False,
                "config": dataclasses.asdict(cfg),
                "error": _error(err),
            }
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


# --------------------------------------------------------------------------- timings
# ids and offsets are always arguments of the jitted functions: closed over, XLA would fold
# the preprocessing into constants at compile time.


def _train_inputs(rng, sizes, rows, dtype, dim=128, dist="uniform"):
    batch = make_batch(rng, sizes.tables, rows, sizes.batch, sizes.max_len, dim, dist=dist)
    key = jax.random.key(int(rng.integers(2**31)))
    w = (jax.random.normal(key, (batch.num_rows, dim), jnp.float32) * 0.01).astype(dtype)
    g = jax.random.normal(jax.random.fold_in(key, 1), (sizes.batch, sizes.tables * dim))
    return batch, w, g


def _update_fn(impl, config, interpret):
    if impl == "pallas":
        return functools.partial(fused_sparse_update, config=config, interpret=interpret)
    return fused_sparse_update_reference


def backward_fn(batch, opt, dim, impl, config=None, interpret=False):
    """Jitted ``(carry, g, ids, offsets) -> carry``, carry = (w, state, t), tables donated."""
    update = _update_fn(impl, config, interpret)
    layout = dict(batch_size=batch.batch_size, dim=dim, pooling="sum", optimizer=opt)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def bwd(carry, g, ids, offsets):
        w, st, t = carry
        w, st = update(w, st, t, g, ids, offsets, None, batch.features, **layout)
        return w, st, t + 1

    return bwd


def preprocess_fns(batch):
    """The XLA part of the fused backward, whole and by stage."""
    occurrences = functools.partial(
        row_gradients.occurrences,
        per_sample_weights=None,
        features=batch.features,
        batch_size=batch.batch_size,
        num_rows=batch.num_rows,
        pooling="sum",
    )

    @jax.jit
    def whole(ids, offsets):
        occ = occurrences(ids, offsets)
        srt = row_gradients.sort_rows(occ.rows, batch.num_rows)
        o = srt.order
        return (
            row_gradients.run_lengths(srt),
            srt.rows,
            occ.src_row[o],
            occ.src_col[o],
            occ.scale[o],
        )

    return {
        "whole": whole,
        "occurrences": jax.jit(lambda ids, offsets: occurrences(ids, offsets)),
        "sort": jax.jit(lambda rows: row_gradients.sort_rows(rows, batch.num_rows)),
    }


def step_fn(batch, opt, dim, impl, config=None, interpret=False):
    """Jitted ``(carry, g, ids, offsets) -> carry``, carry = (w, state, t, loss), donated."""
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
    layout = dict(batch_size=batch.batch_size, pooling="sum")

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry, g, ids, offsets):
        w, st, t, _ = carry
        out, _ = lookup(
            w,
            ids,
            offsets,
            None,
            batch.features,
            num_columns=g.shape[1],
            out_dtype=jnp.float32,
            **layout,
        )
        loss = jnp.sum(out * g)  # d loss / d out = g
        w, st = update(
            w, st, t, g, ids, offsets, None, batch.features, dim=dim, optimizer=opt, **layout
        )
        return w, st, t + 1, loss

    return step


def _handwritten_step(batch, dim, lr, eps):
    """What a JAX user writes without jaxrec: XLA forward, unique + segment_sum + scatter."""
    tables = len(batch.features)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry, g, ids, offsets):
        w, st, t, _ = carry
        n = ids.shape[0]
        lengths = offsets[1:] - offsets[:-1]
        bag = jnp.repeat(jnp.arange(lengths.shape[0]), lengths, total_repeat_length=n)
        rows_all = ids + (bag // batch.batch_size) * (batch.num_rows // tables)

        def loss_rows(rows):
            pooled = jax.ops.segment_sum(rows, bag, num_segments=lengths.shape[0])
            pooled = pooled.reshape(tables, batch.batch_size, dim).transpose(1, 0, 2)
            return jnp.sum(pooled.reshape(batch.batch_size, -1) * g)

        loss, grow = jax.value_and_grad(loss_rows)(jnp.take(w, rows_all, axis=0))
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


def variants(rng, sizes, deadline, interpret, limit=None):
    batch, w, g = _train_inputs(rng, sizes, sizes.step_rows[0], jnp.float32)
    ids, offsets = batch.ids, batch.offsets
    opt, dim = so.exact_rowwise_adagrad(0.01), 128
    res = {"bytes": byte_model(batch, dim, 4, 1)}
    pre = preprocess_fns(batch)
    res["preprocess_ms"], _ = _median_ms(lambda c: pre["whole"](ids, offsets), None)
    occ = pre["occurrences"](ids, offsets)
    res["occurrences_ms"], _ = _median_ms(lambda c: pre["occurrences"](ids, offsets), None)
    res["sort_ms"], _ = _median_ms(lambda c: pre["sort"](occ.rows), None)
    text = _compiled_text(pre["sort"], occ.rows).lower()
    res["sort_impl"] = "cub" if "cub" in text else "xla"
    carry = (w, opt.init(batch.num_rows, dim), jnp.int32(1))
    res["backward"] = []
    for cfg in VARIANTS[:limit]:
        if time.time() > deadline:
            break
        bwd = backward_fn(batch, opt, dim, "pallas", cfg, interpret)
        r = {"config": dataclasses.asdict(cfg)}
        try:
            r["ms"], carry = _median_ms(lambda c, bwd=bwd: bwd(c, g, ids, offsets), carry)
            r["kernel_ms_est"] = r["ms"] - res["preprocess_ms"]
            r["GBps_table_bytes_over_kernel"] = (
                res["bytes"]["table_and_state_bytes"] / r["kernel_ms_est"] / 1e6
            )
        except Exception as err:
            r["error"] = _error(err)
        print(json.dumps(r), flush=True)
        res["backward"].append(r)
    ref = backward_fn(batch, opt, dim, "xla")
    res["backward_xla_reference_ms"], carry = _median_ms(lambda c: ref(c, g, ids, offsets), carry)
    bwd = backward_fn(batch, opt, dim, "pallas", VARIANTS[0], interpret)
    res["table_copies_in_backward"] = _table_copies(
        _compiled_text(bwd, carry, g, ids, offsets), w.shape
    )
    best = min((r for r in res["backward"] if "ms" in r), key=lambda r: r["ms"], default=None)
    return res, best


def _loop_ms(op, *args, iters=20):
    """GPU time of ``op(*args)`` per call, from ``iters`` calls inside one jitted loop.

    Each call sees its first argument shifted by the loop counter (so XLA cannot hoist it) and
    every output is summed (so none is dead code); the sums are included in the time.
    """

    @jax.jit
    def loop(*args):
        def body(i, acc):
            outs = op(args[0] + i, *args[1:])
            return acc + sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(outs))

        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    ms, _ = _median_ms(lambda c: loop(*args), None, iters=3, reps=5)
    return ms / iters


def stages(rng, sizes):
    """The XLA stages of the fused backward one by one, with alternatives, on the train shape."""
    batch, _, _ = _train_inputs(rng, sizes, sizes.step_rows[0], jnp.float32)
    ids, offsets, n, r = batch.ids, batch.offsets, batch.ids.shape[0], batch.num_rows
    occ = jax.jit(
        lambda ids, offsets: row_gradients.occurrences(
            ids, offsets, None, batch.features, batch.batch_size, r, "sum"
        )
    )(ids, offsets)
    srt = jax.jit(lambda rows: row_gradients.sort_rows(rows, r))(occ.rows)
    pos = jnp.arange(n, dtype=jnp.int32)

    def bags_search(offsets):
        found = jnp.searchsorted(offsets, pos, side="right", method="scan_unrolled") - 1
        return jnp.clip(found, 0, offsets.shape[0] - 2)

    def sort_pairs(rows, stable):
        return jax.lax.sort((rows, pos), num_keys=1, is_stable=stable)

    ops = {
        "position_bags_scatter_cumsum": (lambda o: position_bags(o, n), offsets),
        "position_bags_searchsorted": (bags_search, offsets),
        "occurrences": (
            lambda i, o: row_gradients.occurrences(
                i, o, None, batch.features, batch.batch_size, r, "sum"
            ),
            ids,
            offsets,
        ),
        "sort_pairs_stable": (lambda x: sort_pairs(x, True), occ.rows),
        "sort_pairs_unstable": (lambda x: sort_pairs(x, False), occ.rows),
        "sort_keys_only": (jax.lax.sort, occ.rows),
        "run_lengths": (
            lambda rows, order, head, nv: row_gradients.run_lengths(
                row_gradients.SortedRows(rows, order, head, nv)
            ),
            *srt,
        ),
        "gather_by_order": (
            lambda order, a, b, c: (a[order], b[order], c[order]),
            srt.order,
            occ.src_row,
            occ.src_col,
            occ.scale,
        ),
        "sum_only": (lambda x: x, occ.rows),
    }
    out = {}
    for name, (op, *args) in ops.items():
        try:
            out[name + "_ms"] = _loop_ms(op, *args)
        except Exception as err:
            out[name + "_error"] = _error(err)
        print(name, out.get(name + "_ms", out.get(name + "_error")), flush=True)
    return out


# name -> (path, change of the launch shape): the step's variants timed side by side.
STEP_IMPLS = {
    "pallas": ("pallas", {}),
    # Hot rows walked by one program, as before runs were cut into chunks.
    "pallas_unchunked": ("pallas", {"chunk_occ": 2**30}),
    "pallas_chunk256": ("pallas", {"chunk_occ": 256}),
    "xla": ("xla", {}),
    "xla_handwritten": ("xla_handwritten", {}),
}


@jax.jit
def _relative_change(new, ref, old):
    """``|(new - old) - (ref - old)| / |ref - old|`` on the device (float32 sums)."""
    d = new.astype(jnp.float32) - old.astype(jnp.float32)
    e = ref.astype(jnp.float32) - old.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(d - e))) / jnp.sqrt(jnp.sum(jnp.square(e)))


def check_step(fns, batch, w, g, opt, dim) -> dict:
    """One step of the Pallas path and of the XLA reference from the same tables and inputs:
    relative errors of the weight change and the new state (at most 1e-5), and of the loss
    (the two forwards sum in different orders; recorded, not judged)."""
    outs = {}
    for impl in ("pallas", "xla"):
        carry = (jnp.copy(w), opt.init(batch.num_rows, dim), jnp.int32(1), jnp.zeros(()))
        outs[impl] = fns[impl](carry, g, batch.ids, batch.offsets)
    (wp, sp, _, lp), (wx, sx, _, lx) = outs["pallas"], outs["xla"]
    zero = {k: jnp.zeros_like(v) for k, v in sx.items()}
    r = {
        "rel_dw": float(_relative_change(wp, wx, w)),
        "rel_state": max(float(_relative_change(sp[k], sx[k], zero[k])) for k in sx),
        "rel_loss": abs(float(lp) - float(lx)) / max(abs(float(lx)), 1e-30),
    }
    r["ok"] = r["rel_dw"] <= 1e-5 and r["rel_state"] <= 1e-5  # the loss is recorded only
    return r


def step_parts_ms(batch, w, g, opt, dim, config, interpret) -> dict:
    """The Pallas step's two halves timed alone on the same inputs: the pooled forward and
    the fused backward (tables donated), to tell which one skewed ids slow down."""

    def forward(ids, w, offsets, g):
        out, _ = pooled_lookup(
            w, ids, offsets, None, batch.features, batch_size=batch.batch_size,
            pooling="sum", num_columns=g.shape[1], out_dtype=jnp.float32, interpret=interpret,
        )  # fmt: skip
        return jnp.sum(out * g)

    iters = 2 if interpret else 20
    r = {"pallas_forward_ms": _loop_ms(forward, batch.ids, w, batch.offsets, g, iters=iters)}
    bwd = backward_fn(batch, opt, dim, "pallas", config, interpret)
    carry = (jnp.copy(w), opt.init(batch.num_rows, dim), jnp.int32(1))
    r["pallas_backward_ms"], _ = _median_ms(
        lambda c: bwd(c, g, batch.ids, batch.offsets), carry, 10, 5
    )
    return r


def train_steps(rng, sizes, deadline, config, interpret, limit=None):
    opt, dim = so.exact_rowwise_adagrad(0.01, eps=1e-8), 128
    first, small, large = sizes.step_rows
    f32 = jnp.float32
    cases = [  # (rows per table, dtype, ids, step variants, time forward/backward alone)
        (first, f32, "uniform", ["pallas", "pallas_unchunked", "xla", "xla_handwritten"], True),
        (first, f32, "zipf", ["pallas", "pallas_unchunked", "pallas_chunk256", "xla"], True),
        (small, f32, "uniform", ["pallas", "xla_handwritten"], False),
        (large, f32, "uniform", ["pallas", "xla_handwritten"], False),
        (first, jnp.bfloat16, "uniform", ["pallas"], False),
    ]
    out = []
    for rows, dtype, dist, impls, parts in cases[:limit]:
        if time.time() > deadline:
            break
        batch, w, g = _train_inputs(rng, sizes, rows, dtype, dist=dist)
        args = (g, batch.ids, batch.offsets)
        r = {
            "rows_per_table": rows,
            "dtype": jnp.dtype(dtype).name,
            "dist": dist,
            "lookups": batch.lookups,
            "hottest_row_occurrences": hottest_row_occurrences(batch),
        }
        fns = {}
        for impl in impls:
            path, change = STEP_IMPLS[impl]
            cfg = dataclasses.replace(config, **change)
            fns[impl] = step_fn(batch, opt, dim, path, cfg, interpret)
        if "xla" in fns:
            try:
                r["check"] = check_step(fns, batch, w, g, opt, dim)
            except Exception as err:
                r["check"] = {"ok": False, "error": _error(err)}
        for impl, fn in fns.items():
            carry = (w, opt.init(batch.num_rows, dim), jnp.int32(1), jnp.zeros(()))
            try:
                r[f"{impl}_ms"], carry = _median_ms(
                    lambda c, fn=fn, args=args: fn(c, *args), carry, 10, 5
                )
                if impl == "pallas":
                    text = _compiled_text(fn, carry, *args)
                    r["table_copies"] = _table_copies(text, w.shape)
            except Exception as err:
                r[f"{impl}_error"] = _error(err)
            w = carry[0]
        if parts:
            try:
                r.update(step_parts_ms(batch, w, g, opt, dim, config, interpret))
            except Exception as err:
                r["parts_error"] = _error(err)
        print(json.dumps(r), flush=True)
        out.append(r)
        del w, g, carry, args, fns
    return out


def weight_gradients(rng, sizes, interpret, limit=None):
    """The per-sample weight gradient: kernel against reference, then timed on the train shape."""
    cases = [
        (dim, pooling, dtype)
        for dim in (4, 64, 128, 160)
        for pooling in ("sum", "mean")
        for dtype in (jnp.float32, jnp.bfloat16)
    ][:limit]
    checks = []
    for dim, pooling, dtype in cases:
        case = {"dim": dim, "pooling": pooling, "dtype": jnp.dtype(dtype).name}
        try:
            batch = make_batch(
                rng, sizes.check_tables, sizes.check_rows, sizes.check_batch, 20, dim, padding=9
            )
            table = jnp.asarray(rng.normal(size=(batch.num_rows, dim)), dtype)
            g = jnp.asarray(rng.normal(size=(batch.batch_size, sizes.check_tables * dim)))
            args = (table, batch.ids, batch.offsets, g, batch.features)
            kw = {"batch_size": batch.batch_size, "pooling": pooling}
            got = weight_gradient(*args, interpret=interpret, **kw)
            want = weight_gradient_reference(*args, **kw)
            case["rel_err"] = relative_error(got[: batch.lookups], want[: batch.lookups])
            case["padding_zero"] = bool(np.all(np.asarray(got[batch.lookups :]) == 0))
            case["ok"] = case["rel_err"] <= 1e-5 and case["padding_zero"]
        except Exception as err:  # record and go on: one failure must not hide the others
            case.update(ok=False, error=_error(err))
        checks.append(case)
    rows, dim = sizes.step_rows[0], 128
    batch = make_batch(rng, sizes.tables, rows, sizes.batch, sizes.max_len, dim)
    key = jax.random.key(int(rng.integers(2**31)))  # drawn on the device: 1G floats here
    table = jax.random.normal(key, (batch.num_rows, dim), jnp.float32)
    g = jax.random.normal(jax.random.fold_in(key, 1), (batch.batch_size, sizes.tables * dim))
    kw = {"features": batch.features, "batch_size": batch.batch_size}
    timing = {"lookups": batch.lookups, "rows_per_table": rows}
    # Per id: its row and its bag's cotangent slice (fp32), the id, its bag and the result.
    timing["bytes"] = batch.lookups * (2 * dim * 4 + 3 * 4)
    impls = {
        "pallas_ms": functools.partial(weight_gradient, interpret=interpret),
        "xla_reference_ms": weight_gradient_reference,
    }
    for name, impl in impls.items():
        # The table (4 GB here) and the cotangent are arguments: closed over, XLA would embed
        # them in the program as constants (it did, and timed out).
        def op(ids, table, offsets, g, impl=impl):
            return impl(table, ids, offsets, g, **kw)

        iters = 3 if interpret else 20
        timing[name] = _loop_ms(op, batch.ids, table, batch.offsets, g, iters=iters)
    timing["pallas_gb_s"] = timing["bytes"] / timing["pallas_ms"] / 1e6
    return {"checks": checks, "ok": all(c["ok"] for c in checks), "timing": timing}


def guard_cost(rng, sizes, deadline, config, interpret, limit=None):
    """The fused train step with the non-finite guard on (the default) and off.

    Same step as :func:`train_steps` (lookup + fused row-wise Adagrad, D=128 fp32), timed with
    ``optimizer.skip_nonfinite`` True and False; ``overhead`` is on/off - 1.
    """
    opt, dim = so.exact_rowwise_adagrad(0.01, eps=1e-8), 128
    out = []
    for rows in list(dict.fromkeys(sizes.step_rows))[:limit]:
        if time.time() > deadline:
            break
        batch, w, g = _train_inputs(rng, sizes, rows, jnp.float32)
        inputs = (g, batch.ids, batch.offsets)
        r = {"rows_per_table": rows, "lookups": batch.lookups}
        for impl in ("pallas", "xla"):
            for guard in (True, False):
                fn = step_fn(
                    batch, opt._replace(skip_nonfinite=guard), dim, impl, config, interpret
                )
                carry = (w, opt.init(batch.num_rows, dim), jnp.int32(1), jnp.zeros(()))
                key = f"{impl}_guard_{'on' if guard else 'off'}_ms"
                try:
                    r[key], carry = _median_ms(
                        lambda c, fn=fn, inputs=inputs: fn(c, *inputs), carry, 10, 5
                    )
                except Exception as err:
                    r[f"{key}_error"] = _error(err)
                w = carry[0]
            on, off = r.get(f"{impl}_guard_on_ms"), r.get(f"{impl}_guard_off_ms")
            if on and off:
                r[f"{impl}_overhead"] = on / off - 1
        print(json.dumps(r), flush=True)
        out.append(r)
        del w, g, carry, inputs
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default="correctness,variants,step,guard,weights")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode")
    parser.add_argument("--limit", type=int, default=None, help="first N cases of each section")
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
        results["correctness"] = correctness(rng, sizes, args.interpret, args.limit)
        save()
    if "variants" in sections and time.time() < deadline:
        results["variants"], best = variants(rng, sizes, deadline, args.interpret, args.limit)
        if best is not None:
            config = SparseUpdateConfig(**best["config"])
        save()
    if "stages" in sections:
        results["stages"] = stages(rng, sizes)
        save()
    # The weights section (~20 s on an H200) keeps its time: the step stops that much earlier.
    reserve = WEIGHTS_RESERVE_S if "weights" in sections else 0.0
    if "step" in sections and time.time() < deadline - reserve:
        results["step_config"] = dataclasses.asdict(config)
        results["step"] = train_steps(
            rng, sizes, deadline - reserve, config, args.interpret, args.limit
        )
        save()
    if "guard" in sections and time.time() < deadline:
        results["guard"] = guard_cost(rng, sizes, deadline, config, args.interpret, args.limit)
        save()
    if "weights" in sections and time.time() < deadline + reserve:
        results["weights"] = weight_gradients(rng, sizes, args.interpret, args.limit)
        save()
        print("weights", results["weights"]["timing"], "ok:", results["weights"]["ok"])
    ok = all(r.get("ok") for r in results.get("correctness", []))
    ok = ok and results.get("weights", {}).get("ok", True)
    print("seed", seed, "correctness:", "all ok" if ok else "FAILURES")
    v = results.get("variants", {})
    print("bytes", v.get("bytes"))
    for key in ("preprocess_ms", "occurrences_ms", "sort_ms", "sort_impl"):
        print(key, v.get(key))
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
