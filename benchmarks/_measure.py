"""Measuring helpers of the quantized GPU check: kernel-vs-reference reports, median
timings, the copy bandwidth and the DRAM sectors a row gather moves."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


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

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def compare(got, ref, bad_ids: int, dim: int, rtol: float = 1e-5) -> CaseReport:
    """Compare a kernel's output with its reference's (no assertion): within ``rtol``
    times the largest reference value (at least 1)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    finite = np.isfinite(ref)
    tolerance = rtol * max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
    diff = np.abs(got - ref)
    first = np.argwhere(~(diff <= tolerance))  # NaN counts as wrong
    return CaseReport(
        max_abs_diff=float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan"),
        tolerance=tolerance,
        nonfinite_kernel=int(np.sum(~np.isfinite(got))),
        nonfinite_reference=int(np.sum(~finite)),
        bad_ids=int(bad_ids),
        first_wrong=tuple(int(v) for v in first[0]) if len(first) else None,
        dim=dim,
    )


def sector_bytes(width: int) -> float:
    """Mean bytes of the 32-byte DRAM sectors one row of ``width`` bytes spans, over the
    alignments of rows stored back to back (what a random row gather really moves).

    >>> sector_bytes(512), sector_bytes(136), sector_bytes(68)   # fp32, INT8, INT4 rows
    (512.0, 160.0, 96.0)
    """
    starts = (np.arange(4096) * width) % 32
    return float(np.mean((starts + width + 31) // 32) * 32)


def median_seconds(fn, args, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median, min) seconds of ``fn(*args)``, each run waited for."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def copy_bandwidth(reps: int, small: bool) -> dict:
    """Read + write bytes per second of a jitted ``x * 2`` (the memory roofline)."""
    n = (1 << 12) if small else (1 << 30)
    x = jax.jit(lambda key: jax.random.normal(key, (n,), jnp.float32))(jax.random.key(9))
    med, _ = median_seconds(jax.jit(lambda x: x * 2.0), (x,), reps)
    return {"copy_bytes": 4 * n, "median_s": med, "tbps": 2 * 4 * n / med / 1e12}
