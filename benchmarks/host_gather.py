"""Host side of a cache miss: how fast :class:`jaxrec.tbe.host_table.HostTable` gathers
and scatters records, by thread count: ``python -m benchmarks.host_gather``.

A table of ``--rows`` records of ``--row-bytes`` (the cache check's model: 10M rows of 128
fp32 weights and a row-wise Adagrad state, 516 bytes) gathers ``--count`` sorted distinct
random rows (as a prefetch gathers its misses) into a staging buffer, then scatters them
back (as a write-back does). Reported per thread count: median ms and GB/s of each, and
the single-thread ``np.take`` of the same rows as the reference. Every gather is checked
against that reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from jaxrec.tbe.host_table import HostTable

__all__ = ["main"]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--count", type=int, default=160_000)
    parser.add_argument("--threads", default="1,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    spec = {"momentum1": ((), np.float32)}
    base = HostTable.zeros(args.rows, args.dim, np.float32, spec, threads=1)
    base.packed[:] = np.random.default_rng(0).integers(0, 255, base.packed.shape, np.uint8)
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(args.rows, args.count, replace=False))
    gbytes = args.count * base.row_bytes / 1e9
    want = np.take(base.packed, rows, axis=0)
    report = {"rows": args.rows, "row_bytes": base.row_bytes, "count": args.count,
              "cpus": os.cpu_count(), "gbytes": gbytes,
              "np_take_ms": _median_ms(lambda: np.take(base.packed, rows, axis=0), args.repeats),
              "threads": {}}  # fmt: skip
    report["np_take_gbytes_per_s"] = gbytes / report["np_take_ms"] * 1e3
    out = np.empty((args.count, base.row_bytes), np.uint8)
    for threads in (int(t) for t in args.threads.split(",")):
        table = HostTable.zeros(1, args.dim, np.float32, spec, threads=threads)
        table.packed = base.packed  # the same records, another thread count
        out[:] = 0
        table.gather(rows, out)
        if not np.array_equal(out, want):
            raise AssertionError(f"{threads} threads gathered other records")
        gather = _median_ms(lambda t=table: t.gather(rows, out), args.repeats)
        scatter = _median_ms(lambda t=table: t.scatter(rows, out), args.repeats)
        report["threads"][threads] = {
            "gather_ms": gather,
            "gather_gbytes_per_s": gbytes / gather * 1e3,
            "scatter_ms": scatter,
            "scatter_gbytes_per_s": gbytes / scatter * 1e3,
        }
        print(threads, json.dumps(report["threads"][threads]), flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "threads"}))
    with open(os.path.join(args.out, "host_gather.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
