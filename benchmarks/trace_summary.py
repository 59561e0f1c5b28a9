"""Where the time of a traced region went: the busiest events per device and thread.

:func:`traced` runs a function under ``jax.profiler.trace`` (with a Perfetto trace), and
:func:`summarize` reads that trace back: per process (``/device:GPU:0``, ``/host:CPU``) and
thread (a GPU stream, the Python thread), the events with the most total time, with
their count. On a GPU the device processes list kernels and copies by name, so a slow
jitted stage shows which of its kernels holds the time.

>>> import jax.numpy as jnp, tempfile
>>> folder = tempfile.mkdtemp()
>>> out = traced(lambda: jnp.sort(jnp.arange(9.0)[::-1]).block_until_ready(), folder)
>>> summary = summarize(folder)
>>> any("/host:CPU" in process for process in summary)
True
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["summarize", "traced"]


def traced(fn: Callable[[], Any], folder: str) -> Any:
    """``fn()`` under ``jax.profiler.trace(folder)``; returns what ``fn`` returns."""
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        return fn()


def summarize(folder: str, top: int = 25) -> dict[str, list[dict]]:
    """``{"process / thread": [{"name", "ms", "count"}, ...]}``: the ``top`` events by total
    time of each thread of the newest Perfetto trace under ``folder``."""
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("ph") != "X":
            continue
        where = f"{processes.get(e['pid'], e['pid'])} / {threads.get((e['pid'], e.get('tid')), '')}"
        entry = totals[where][e["name"]]
        entry[0] += float(e.get("dur", 0.0)) / 1e3
        entry[1] += 1
    out = {}
    for where, names in sorted(totals.items()):
        ranked = sorted(names.items(), key=lambda kv: -kv[1][0])[:top]
        out[where] = [{"name": n, "ms": round(ms, 4), "count": c} for n, (ms, c) in ranked]
    return out
