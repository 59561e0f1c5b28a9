"""Benchmarks of the forward lookup kernels against their peers (``jaxrec bench``).

Each named shape is a set of tables, one KJT feature per table, a batch size and bags whose
lengths are uniform in ``[0, 2*mean_len]``; ids are uniform over each table. Tables of one dim
are stacked into one group (as FBGEMM does) and each group writes its columns of one
``[B, sum(dims)]`` output. Implementations timed in the same run:

- ``pallas``: :func:`jaxrec_kernels.pooled_lookup.pooled_lookup` (GPU, or interpret if asked),
- ``xla-reference``: the pure-XLA reference beside the kernel (the CPU/TPU backend),
- ``xla-naive``: ``jnp.take`` + ``segment_sum`` with bag ids computed on the host, what a JAX
  user writes without jaxrec,
- ``torch``: ``torch.nn.functional.embedding_bag`` over each stacked table (when importable),
- ``copy``: a large device-to-device copy, the bandwidth ceiling.

Effective bytes: rows read (``n * D * itemsize`` per group) + ids + offsets (+ per-sample
weights) + output written (sequence lookups: rows read + rows written + ids + offsets).
A time is the median over samples; a sample runs the op back to back enough times to last
about 2 ms of device time, then waits for the device, and divides. Id sets rotate when the
rows touched per call would fit in about four L2 caches.

>>> shape = SHAPES["tiny"]
>>> inputs = make_inputs(shape, "fp32", weighted=False, seed=0)
>>> [g.dim for g in inputs.groups], inputs.num_columns
([16, 32], 96)
>>> lookups = np.diff(inputs.host_offsets[0]).reshape(4, 64).sum(axis=1)   # per table
>>> rows_read = int(4 * (16 * (lookups[0] + lookups[2]) + 32 * (lookups[1] + lookups[3])))
>>> pooled_bytes(inputs, "fp32") == rows_read + 4 * inputs.num_lookups + 4 * 257 + 4 * 64 * 96
True
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.layout import FeatureLayout
from jaxrec_kernels.pooled_lookup import pooled_lookup, pooled_lookup_reference
from jaxrec_kernels.sequence_lookup import sequence_lookup, sequence_lookup_reference

from jaxrec.cli_options import (
    OneLineParser,
    available_memory,
    check_memory,
    comma_list,
    positive_int,
    writable_path,
)

DTYPES = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}
IMPLS = ("pallas", "xla-reference", "xla-naive", "torch")


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """A benchmark model: ``tables`` as ``(rows, dim)``, one feature each."""

    name: str
    tables: tuple[tuple[int, int], ...]
    batch_size: int
    mean_len: int


def _mixed_dims() -> tuple[tuple[int, int], ...]:
    dims = (16, 32, 64, 128, 256)
    return tuple((1_000_000, dims[t % len(dims)]) for t in range(26))


SHAPES: dict[str, BenchShape] = {
    "tiny": BenchShape("tiny", ((1000, 16), (500, 32), (1000, 16), (2000, 32)), 64, 5),
    "fbgemm-default": BenchShape("fbgemm-default", ((100_000, 128),) * 32, 512, 20),
    "large": BenchShape("large", ((1_000_000, 128),) * 32, 8192, 20),
    "mixed-dim": BenchShape("mixed-dim", _mixed_dims(), 8192, 20),
    "train": BenchShape("train", ((1_000_000, 128),) * 8, 8192, 20),
}


@dataclasses.dataclass
class Group:
    """One stacked table group of a bench model and its layout."""

    dim: int
    tables: list[int]
    weights: jax.Array
    features: tuple[FeatureLayout, ...]


@dataclasses.dataclass
class BenchInputs:
    """Tables and KJT id sets (several when they rotate) of one bench model."""

    shape: BenchShape
    groups: list[Group]
    num_columns: int
    ids: list[jax.Array]
    offsets: list[jax.Array]
    per_sample_weights: list[jax.Array] | None
    num_lookups: int
    host_ids: list[np.ndarray]
    host_offsets: list[np.ndarray]


def _draw_kjt(shape: BenchShape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    num_tables, batch = len(shape.tables), shape.batch_size
    lengths = rng.integers(0, 2 * shape.mean_len + 1, num_tables * batch)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    rows = np.array([r for r, _ in shape.tables])
    highs = np.repeat(np.repeat(rows, batch), lengths)
    ids = (rng.random(int(offsets[-1])) * highs).astype(np.int32)
    return ids, offsets


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_table(key, rows, dim, dtype):
    return (jax.random.normal(key, (rows, dim), jnp.float32) * 0.01).astype(dtype)


def make_inputs(
    shape: BenchShape,
    dtype: str,
    *,
    weighted: bool,
    seed: int = 0,
    rotations: int = 1,
) -> BenchInputs:
    """Random tables (normal * 0.01) and ``rotations`` KJT id sets with equal total length.

    Every set keeps the first set's bag lengths (so byte counts agree) with fresh ids.
    """
    rng = np.random.default_rng(seed)
    ids0, offsets0 = _draw_kjt(shape, rng)
    host_ids, host_offsets = [ids0], [offsets0]
    batch = shape.batch_size
    rows = np.array([r for r, _ in shape.tables])
    lengths = np.diff(offsets0)
    for _ in range(rotations - 1):
        highs = np.repeat(np.repeat(rows, batch), lengths)
        host_ids.append((rng.random(ids0.shape[0]) * highs).astype(np.int32))
        host_offsets.append(offsets0)
    put = jax.device_put
    groups, col, col_of = [], 0, []
    for _, dim in shape.tables:
        col_of.append(col)
        col += dim
    key = jax.random.key(seed)
    for dim in sorted({d for _, d in shape.tables}):
        tables = [t for t, (_, d) in enumerate(shape.tables) if d == dim]
        feats, row = [], 0
        for t in tables:
            feats.append(FeatureLayout(t, row, shape.tables[t][0], col_of[t]))
            row += shape.tables[t][0]
        key, sub = jax.random.split(key)
        w = _random_table(sub, row, dim, DTYPES[dtype])
        groups.append(Group(dim, tables, w, tuple(feats)))
    psw = None
    if weighted:
        psw = [put(rng.random(ids0.shape[0]).astype(np.float32)) for _ in host_ids]
    return BenchInputs(
        shape=shape,
        groups=groups,
        num_columns=col,
        ids=[put(i) for i in host_ids],
        offsets=[put(o) for o in host_offsets],
        per_sample_weights=psw,
        num_lookups=int(ids0.shape[0]),
        host_ids=host_ids,
        host_offsets=host_offsets,
    )


def _lookups_per_group(inputs: BenchInputs) -> list[int]:
    batch = inputs.shape.batch_size
    offsets = inputs.host_offsets[0]
    per_table = [
        int(offsets[(t + 1) * batch] - offsets[t * batch]) for t in range(len(offsets) // batch)
    ]
    return [sum(per_table[t] for t in g.tables) for g in inputs.groups]


def pooled_bytes(inputs: BenchInputs, dtype: str, weighted: bool = False) -> int:
    """Fewest bytes a pooled forward moves: rows, ids, offsets, (weights), output."""
    item = jnp.dtype(DTYPES[dtype]).itemsize
    rows = sum(
        n * g.dim * item for n, g in zip(_lookups_per_group(inputs), inputs.groups, strict=True)
    )
    n = inputs.num_lookups
    offsets = inputs.host_offsets[0].shape[0] * 4
    out = inputs.shape.batch_size * inputs.num_columns * item
    return int(rows + n * 4 + offsets + (n * 4 if weighted else 0) + out)


def sequence_bytes(inputs: BenchInputs, dtype: str) -> int:
    """Fewest bytes a sequence forward moves: rows read and written, ids, offsets."""
    item = jnp.dtype(DTYPES[dtype]).itemsize
    rows = sum(
        n * g.dim * item for n, g in zip(_lookups_per_group(inputs), inputs.groups, strict=True)
    )
    return int(2 * rows + inputs.num_lookups * 4 + inputs.host_offsets[0].shape[0] * 4)


def time_op(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    *,
    iters: int = 20,
    warmup: int = 3,
    sync: Callable[[Any], None] = jax.block_until_ready,
    target_s: float = 2e-3,
) -> float:
    """Median milliseconds per call of ``fn`` over rotating ``arg_sets`` (see module doc)."""
    out = None
    for i in range(warmup):
        out = fn(*arg_sets[i % len(arg_sets)])
    sync(out)
    t0 = time.perf_counter()
    sync(fn(*arg_sets[0]))
    reps = max(1, min(200, math.ceil(target_s / max(time.perf_counter() - t0, 1e-6))))
    samples = []
    k = 0
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*arg_sets[k % len(arg_sets)])
            k += 1
        sync(out)
        samples.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int, iters: int = 20) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of an ``nbytes`` fp32 buffer."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    scale = jnp.float32(1.0)
    fn = jax.jit(lambda x, s: x * s)
    ms = time_op(fn, [(x, scale)], iters=iters)
    return 2 * nbytes / ms / 1e6


class LookupFn:
    """A jitted lookup over fixed arguments: ``fn(ids, offsets, psw)`` runs one id set;
    ``fn.many(sets)`` runs several id sets in one jitted call (one executable, no host
    dispatch between them), which times short lookups by the device rather than the host.

    ``body(fixed, ids, offsets, psw)`` is traced once per form; ``fixed`` (tables and any
    precomputed index arrays) is passed as an argument, never baked into the program.
    """

    def __init__(self, body: Callable[..., Any], fixed: Any):
        self.fixed = fixed
        self._one = jax.jit(body)
        self._many = jax.jit(lambda fixed, sets: [body(fixed, *s) for s in sets])

    def __call__(self, ids, offsets, psw=None):
        return self._one(self.fixed, ids, offsets, psw)

    def many(self, sets: Sequence[tuple]) -> list:
        """Outputs of every ``(ids, offsets, psw)`` set, from one jitted call."""
        return self._many(self.fixed, tuple(tuple(s) for s in sets))


def pooled_fn(
    inputs: BenchInputs,
    impl: str,
    pooling: str,
    interpret: bool = False,
    config: Callable[[Group], Any] | None = None,
):
    """A :class:`LookupFn` ``fn(ids, offsets, psw) -> out`` for one implementation.

    ``config(group)`` picks the Pallas launch shape of a group (default: the kernel's own).
    """
    shape, cols = inputs.shape, inputs.num_columns
    groups = inputs.groups
    tables = [g.weights for g in groups]

    if impl in ("pallas", "xla-reference"):
        lookup = pooled_lookup if impl == "pallas" else pooled_lookup_reference

        def fn(tables, ids, offsets, psw):
            out = None
            for g, w in zip(groups, tables, strict=True):
                extra = {}
                if impl == "pallas":  # the groups cover every column: no zero fill
                    extra = {
                        "interpret": interpret,
                        "config": config(g) if config else None,
                        "fill_uncovered": False,
                    }
                out, _ = lookup(
                    w,
                    ids,
                    offsets,
                    psw,
                    g.features,
                    batch_size=shape.batch_size,
                    num_columns=cols,
                    pooling=pooling,
                    out=out,
                    **extra,
                )
            return out

        return LookupFn(fn, tables)
    if impl == "xla-naive":
        return _naive_xla_fn(inputs, pooling)
    raise ValueError(f"unknown impl {impl!r}")


def _naive_xla_fn(inputs: BenchInputs, pooling: str):
    """take + segment_sum per group with host-computed global rows and bag ids."""
    shape = inputs.shape
    batch = shape.batch_size
    offsets = inputs.host_offsets[0]
    lengths = np.diff(offsets)
    bag_of_pos = np.repeat(np.arange(lengths.shape[0]), lengths)
    table_of_pos = bag_of_pos // batch
    per_group = []
    for g in inputs.groups:
        slot = np.full(len(shape.tables), -1)
        row_off = np.zeros(len(shape.tables), np.int64)
        for k, feat in enumerate(g.features):
            slot[feat.kjt_index], row_off[feat.kjt_index] = k, feat.row_offset
        sel = np.nonzero(slot[table_of_pos] >= 0)[0]
        seg = slot[table_of_pos[sel]] * batch + bag_of_pos[sel] % batch
        cnt = np.maximum(lengths.reshape(-1, batch)[g.tables], 1).astype(np.float32)
        per_group.append(
            (
                jnp.asarray(sel, jnp.int32),
                jnp.asarray(row_off[table_of_pos[sel]], jnp.int32),
                jnp.asarray(seg, jnp.int32),
                jnp.asarray(cnt),
            )
        )
    order = sorted(
        ((t, gi, k) for gi, g in enumerate(inputs.groups) for k, t in enumerate(g.tables))
    )
    tables = [g.weights for g in inputs.groups]

    def fn(fixed, ids, offsets, psw):
        del offsets  # bag layout precomputed on the host
        tables, meta = fixed
        pooled = []
        for g, w, (sel, row_off, seg, cnt) in zip(inputs.groups, tables, meta, strict=True):
            vals = jnp.take(w, row_off + ids[sel], axis=0)
            if psw is not None:
                vals = vals * psw[sel][:, None].astype(vals.dtype)
            p = jax.ops.segment_sum(vals, seg, num_segments=len(g.tables) * batch)
            p = p.reshape(len(g.tables), batch, g.dim)
            if pooling == "mean":
                p = p / cnt[:, :, None].astype(p.dtype)
            pooled.append(p)
        return jnp.concatenate([pooled[gi][k] for _, gi, k in order], axis=1)

    return LookupFn(fn, (tables, per_group))


def _torch_setup(inputs: BenchInputs, pooling: str, op: str):
    """A torch callable and sync over the same tables (shared by DLPack on one device)."""
    import torch  # optional dependency
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"

    def to_torch(x):
        try:
            t = torch.from_dlpack(x)
        except Exception:
            t = torch.from_numpy(np.asarray(jax.device_get(x)).astype(np.float32))
        return t.to(dev)

    batch = inputs.shape.batch_size
    offsets = inputs.host_offsets[0]
    lengths = np.diff(offsets)
    table_of_pos = np.repeat(np.arange(lengths.shape[0]) // batch, lengths)
    weights = [to_torch(g.weights) for g in inputs.groups]
    sets = []
    for host_ids in inputs.host_ids:
        calls = []
        for g in inputs.groups:
            row_off = np.zeros(len(inputs.shape.tables), np.int64)
            slot = np.zeros(len(inputs.shape.tables), bool)
            for feat in g.features:
                row_off[feat.kjt_index], slot[feat.kjt_index] = feat.row_offset, True
            sel = slot[table_of_pos]
            gl = lengths.reshape(-1, batch)[g.tables].reshape(-1)
            goffs = np.concatenate([[0], np.cumsum(gl)])[:-1]
            calls.append(
                (
                    torch.as_tensor(host_ids[sel] + row_off[table_of_pos[sel]], device=dev),
                    torch.as_tensor(goffs, device=dev),
                    torch.as_tensor(np.nonzero(sel)[0], device=dev),
                )
            )
        sets.append(calls)
    psw_all = None
    if inputs.per_sample_weights is not None:
        psw_all = [to_torch(p) for p in inputs.per_sample_weights]
    order = sorted(
        ((t, gi, k) for gi, g in enumerate(inputs.groups) for k, t in enumerate(g.tables))
    )

    def pooled(k):
        pooled = []
        for g, w, (ids, offs, sel) in zip(inputs.groups, weights, sets[k], strict=True):
            psw = None if psw_all is None else psw_all[k][sel].to(w.dtype)
            p = F.embedding_bag(ids, w, offs, mode=pooling, per_sample_weights=psw)
            pooled.append(p.view(len(g.tables), batch, g.dim))
        return torch.cat([pooled[gi][j] for _, gi, j in order], dim=1)

    def sequence(k):
        return [F.embedding(ids, w) for w, (ids, _, _) in zip(weights, sets[k], strict=True)]

    def sync(_):
        if dev == "cuda":
            torch.cuda.synchronize()

    return (pooled if op == "pooled" else sequence), sync, torch.__version__


def run_shape(
    shape: BenchShape,
    *,
    dtype: str = "fp32",
    pooling: str = "sum",
    weighted: bool = False,
    ops: Sequence[str] = ("pooled",),
    impls: Sequence[str] = IMPLS,
    iters: int = 20,
    interpret: bool = False,
    copy_gbps: float | None = None,
    l2_bytes: int = 50 * 2**20,
    pooled_config: Callable[[Group], Any] | None = None,
    sequence_config: Callable[[Group], Any] | None = None,
    in_jit_calls: int = 1,
) -> list[dict]:
    """Time every implementation of every op on one shape; one result dict per timing.

    ``pooled_config`` / ``sequence_config`` pick the Pallas launch shape per group. With
    ``in_jit_calls=k > 1`` the JAX implementations are also timed as ``k`` lookups over
    distinct id sets inside one jitted call: ``ms_in_jit`` is that time / k, the cost of a
    lookup inside a larger jitted step, free of per-call host dispatch.
    """
    if in_jit_calls < 1:
        raise ValueError(f"in_jit_calls must be >= 1, got {in_jit_calls}")
    on_gpu = jax.default_backend() == "gpu"
    item = jnp.dtype(DTYPES[dtype]).itemsize
    dims = sorted({d for _, d in shape.tables})
    approx_touched = sum(
        len([t for t in shape.tables if t[1] == d]) * shape.batch_size * shape.mean_len * d * item
        for d in dims
    )
    rotations = max(1, min(8, math.ceil(4 * l2_bytes / max(approx_touched, 1))), in_jit_calls)
    inputs = make_inputs(shape, dtype, weighted=weighted, rotations=rotations)
    psw = inputs.per_sample_weights or [None] * rotations
    arg_sets = list(zip(inputs.ids, inputs.offsets, psw, strict=True))
    results = []
    for op in ops:
        nbytes = (
            pooled_bytes(inputs, dtype, weighted)
            if op == "pooled"
            else sequence_bytes(inputs, dtype)
        )
        for impl in impls:
            if impl == "pallas" and not (on_gpu or interpret):
                continue
            row = {
                "shape": shape.name,
                "op": op,
                "impl": impl,
                "dtype": dtype,
                "pooling": pooling if op == "pooled" else "none",
                "weighted": weighted,
                "lookups": inputs.num_lookups,
                "bytes": nbytes,
            }
            try:
                if impl == "torch":
                    fn, sync, _ = _torch_setup(inputs, pooling, op)
                    ms = time_op(fn, [(k,) for k in range(rotations)], iters=iters, sync=sync)
                else:
                    fn = (
                        pooled_fn(inputs, impl, pooling, interpret, pooled_config)
                        if op == "pooled"
                        else sequence_fn(inputs, impl, interpret, sequence_config)
                    )
                    ms = time_op(fn, arg_sets, iters=iters)
                    if in_jit_calls > 1:
                        k = in_jit_calls
                        groups = [
                            tuple(arg_sets[(i * k + j) % rotations] for j in range(k))
                            for i in range(max(1, rotations // k))
                        ]
                        row["ms_in_jit"] = time_op(fn.many, [(g,) for g in groups], iters=iters) / k
                        row["in_jit_calls"] = k
            except ImportError as ex:
                row["skipped"] = f"{type(ex).__name__}: {ex}"
                results.append(row)
                continue
            except Exception as ex:  # a failing peer must not hide the others
                row["error"] = f"{type(ex).__name__}: {str(ex)[:400]}"
                results.append(row)
                continue
            row["ms"] = ms
            row["GBps"] = nbytes / ms / 1e6
            if copy_gbps:
                row["pct_copy"] = 100 * row["GBps"] / copy_gbps
            results.append(row)
    return results


def sequence_fn(
    inputs: BenchInputs,
    impl: str,
    interpret: bool = False,
    config: Callable[[Group], Any] | None = None,
):
    """A :class:`LookupFn` ``fn(ids, offsets, psw) -> [per-group outputs]`` (sequence lookup)."""
    shape = inputs.shape
    if impl not in ("pallas", "xla-reference"):
        if impl == "xla-naive":
            tables = [g.weights for g in inputs.groups]
            offs = inputs.host_offsets[0]
            table_of_pos = np.repeat(np.arange(len(offs) - 1) // shape.batch_size, np.diff(offs))
            row_offs = []
            for g in inputs.groups:
                ro = np.full(len(shape.tables), -1, np.int64)
                for feat in g.features:
                    ro[feat.kjt_index] = feat.row_offset
                row_offs.append(jnp.asarray(ro[table_of_pos], jnp.int32))

            def naive(fixed, ids, offsets, psw):
                del offsets, psw
                tables, row_offs = fixed
                return [
                    jnp.where((ro >= 0)[:, None], jnp.take(w, jnp.maximum(ro, 0) + ids, axis=0), 0)
                    for w, ro in zip(tables, row_offs, strict=True)
                ]

            return LookupFn(naive, (tables, row_offs))
        raise ValueError(f"unknown impl {impl!r}")
    lookup = sequence_lookup if impl == "pallas" else sequence_lookup_reference
    groups = inputs.groups

    def extra(g):
        if impl != "pallas":
            return {}
        return {"interpret": interpret, "config": config(g) if config else None}

    def fn(tables, ids, offsets, psw):
        del psw
        return [
            lookup(w, ids, offsets, g.features, batch_size=shape.batch_size, **extra(g))[0]
            for g, w in zip(groups, tables, strict=True)
        ]

    return LookupFn(fn, [g.weights for g in groups])


def environment() -> dict:
    """Device, date and library versions for the JSON record."""
    env = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
    }
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


RESULT_KEY = ("shape", "op", "impl", "dtype", "pooling", "weighted")


def median_over_rounds(results: Sequence[dict], copy_gbps: float | None = None) -> list[dict]:
    """One row per timed configuration: the median ms of its rounds (``ms_rounds`` keeps all).

    Rounds are whole passes over every implementation, so a slow moment of the device
    touches every peer alike instead of one figure.

    >>> rows = [dict(shape="s", op="pooled", impl="x", dtype="fp32", pooling="sum",
    ...              weighted=False, bytes=10**6, ms=t, GBps=10**6 / t / 1e6) for t in (1, 3, 2)]
    >>> [(r["ms"], r["ms_rounds"]) for r in median_over_rounds(rows)]
    [(2.0, [1, 3, 2])]
    """
    merged: dict[tuple, dict] = {}
    for r in results:
        key = tuple(r[k] for k in RESULT_KEY)
        row = merged.setdefault(
            key,
            {k: v for k, v in r.items() if k not in ("ms", "GBps", "pct_copy", "ms_in_jit")},
        )
        for field in ("ms", "ms_in_jit"):
            if field in r:
                row.setdefault(f"{field}_rounds", []).append(r[field])
    for row in merged.values():
        if "ms_in_jit_rounds" in row:
            row["ms_in_jit"] = float(statistics.median(row["ms_in_jit_rounds"]))
        if "ms_rounds" in row:
            row.pop("error", None)
            row["ms"] = float(statistics.median(row["ms_rounds"]))
            row["GBps"] = row["bytes"] / row["ms"] / 1e6
            if copy_gbps:
                row["pct_copy"] = 100 * row["GBps"] / copy_gbps
    return list(merged.values())


def format_table(results: Sequence[dict]) -> str:
    """The results as a fixed-width text table."""
    head = f"{'shape':<15}{'op':<9}{'impl':<14}{'dtype':<6}{'pool':<6}{'w':<3}"
    head += f"{'ms':>10}{'GB/s':>10}{'%copy':>8}{'in-jit ms':>11}"
    lines = [head]
    for r in results:
        line = (
            f"{r['shape']:<15}{r['op']:<9}{r['impl']:<14}{r['dtype']:<6}{r['pooling']:<6}"
            f"{'y' if r['weighted'] else 'n':<3}"
        )
        if "ms" in r:
            pct = f"{r['pct_copy']:8.1f}" if "pct_copy" in r else f"{'':>8}"
            line += f"{r['ms']:10.4f}{r['GBps']:10.1f}{pct}"
            if "ms_in_jit" in r:
                line += f"{r['ms_in_jit']:11.4f}"
        else:
            line += "  " + r.get("error", r.get("skipped", ""))[:60]
        lines.append(line)
    return "\n".join(lines)


def write_chart(results: Sequence[dict], path: str) -> None:
    """A bar chart of GB/s per (shape, op) and implementation (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if "GBps" in r]
    cases = list(dict.fromkeys(f"{r['shape']}\n{r['op']} {r['dtype']}" for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        vals = [
            next(
                (
                    r["GBps"]
                    for r in timed
                    if r["impl"] == impl and f"{r['shape']}\n{r['op']} {r['dtype']}" == c
                ),
                0.0,
            )
            for c in cases
        ]
        ax.bar(np.arange(len(cases)) + k * width, vals, width, label=impl)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2, cases)
    ax.set_ylabel("effective GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def estimated_bytes(
    shape: BenchShape, dtype: str, *, ops: Sequence[str], impls: Sequence[str], in_jit_calls: int
) -> int:
    """About how much memory :func:`run_shape` takes for one shape and dtype.

    Tables (twice with ``torch``, which keeps its own copy), up to ``max(8,
    in_jit_calls)`` id sets of the mean total length, the pooled output, and the
    sequence output when timed.

    >>> estimated_bytes(SHAPES["tiny"], "fp32", ops=["pooled"], impls=["xla-reference"],
    ...                 in_jit_calls=1) > 4 * (1000 * 16 + 500 * 32 + 1000 * 16 + 2000 * 32)
    True
    """
    item = jnp.dtype(DTYPES[dtype]).itemsize
    tables = sum(rows * dim for rows, dim in shape.tables) * item
    copies = 2 if "torch" in impls else 1
    ids = len(shape.tables) * shape.batch_size * shape.mean_len
    id_sets = max(8, in_jit_calls) * (ids * 8 + (len(shape.tables) * shape.batch_size + 1) * 4)
    columns = sum(dim for _, dim in shape.tables)
    pooled = shape.batch_size * columns * 4 * copies
    widest = max(dim for _, dim in shape.tables)
    sequence = ids * widest * item * copies if "sequence" in ops else 0
    return tables * copies + id_sets + pooled + sequence


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="jaxrec bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes",
        type=comma_list(list(SHAPES)),
        default=None,
        help=f"comma list of {sorted(SHAPES)} (default: tiny on CPU, "
        "fbgemm-default,large,mixed-dim on GPU)",
    )
    p.add_argument(
        "--dtype",
        type=comma_list(list(DTYPES)),
        default=["fp32"],
        help="comma list of fp32, fp16, bf16",
    )
    p.add_argument("--pooling", default="sum", choices=("sum", "mean"))
    p.add_argument("--weighted", action="store_true", help="use per-sample weights")
    p.add_argument(
        "--ops",
        type=comma_list(["pooled", "sequence"]),
        default=["pooled"],
        help="comma list of pooled, sequence",
    )
    p.add_argument(
        "--impls", type=comma_list(IMPLS), default=list(IMPLS), help="comma list of implementations"
    )
    p.add_argument("--iters", type=positive_int, default=20)
    p.add_argument(
        "--rounds", type=positive_int, default=1, help="passes over everything; report each median"
    )
    p.add_argument(
        "--in-jit-calls",
        type=positive_int,
        default=1,
        help="also time this many lookups inside one jitted call (device time, no dispatch)",
    )
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels interpreted")
    p.add_argument("--copy-mib", type=positive_int, default=None, help="copy-bandwidth buffer size")
    p.add_argument("--json", type=writable_path, default=None, help="write results here")
    p.add_argument(
        "--chart",
        type=writable_path,
        default=None,
        help="write a bar chart here (needs matplotlib)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxrec bench``; prints a table and writes JSON / a chart if asked.

    A bad option value, or sizes that do not fit in the free memory, end in one line
    naming the option and exit status 2, before anything is allocated.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    shapes = args.shapes or (["fbgemm-default", "large", "mixed-dim"] if on_gpu else ["tiny"])
    dtypes, ops, impls = args.dtype, args.ops, args.impls
    available = available_memory()
    for name, dtype in ((n, d) for n in shapes for d in dtypes):
        need = estimated_bytes(
            SHAPES[name], dtype, ops=ops, impls=impls, in_jit_calls=args.in_jit_calls
        )
        check_memory(
            parser,
            need,
            f"--shapes {name} --dtype {dtype} --in-jit-calls {args.in_jit_calls}",
            available,
        )
    copy_mib = args.copy_mib or (1024 if on_gpu else 64)
    check_memory(parser, 2 * copy_mib * 2**20, f"--copy-mib {copy_mib}", available)
    copy_gbps = copy_bandwidth(copy_mib * 2**20)
    results = []
    for _, name, dtype in ((r, n, d) for r in range(args.rounds) for n in shapes for d in dtypes):
        results += run_shape(
            SHAPES[name],
            dtype=dtype,
            pooling=args.pooling,
            weighted=args.weighted,
            ops=ops,
            impls=impls,
            iters=args.iters,
            interpret=args.interpret,
            copy_gbps=copy_gbps,
            in_jit_calls=args.in_jit_calls,
        )
    results = median_over_rounds(results, copy_gbps)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s ({copy_mib} MiB buffer, read + write)")
    print(format_table(results))
    if args.json:
        record = {
            **environment(),
            "copy_GBps": copy_gbps,
            "shapes": {n: dataclasses.asdict(SHAPES[n]) for n in shapes},
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if args.chart:
        write_chart(results, args.chart)
    return 0
