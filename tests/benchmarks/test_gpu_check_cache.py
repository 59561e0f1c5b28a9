"""benchmarks/gpu_check_cache.py runs on a CPU with tiny shapes, reports every number and
prints each phase as it ends; its host-side setup helpers are fast and correct."""

import argparse
import json

import numpy as np
import pytest

from benchmarks import gpu_check_cache
from jaxrec.tbe.managed import TIMED_PARTS

TINY = "--tables 2 --rows 300 --dim 4 --batch 4 --mean-len 2 --warmup 3 --steps 2"


def test_cache_timing_script_reports_the_split_hit_rate_and_progress(tmp_path, capsys):
    argv = [*TINY.split(), "--variants", "numpy,pinned_host", "--out", str(tmp_path)]
    assert gpu_check_cache.main(argv) == 0
    report = json.loads((tmp_path / "gpu_check_cache.json").read_text())
    assert (report["config"]["warmup"], report["config"]["steps"]) == (3, 2)
    for dist in ("zipf", "uniform"):
        result = report["results"][dist]
        assert result["hbm_ms"] > 0
        for variant in ("numpy", "pinned_host"):
            out = result[variant]
            for key in ("sequential", "prefetch", "device_step", "gather", "h2d", "pipelined"):
                assert out[f"{key}_ms"] > 0, (variant, key)
            assert out["d2h_ms"] >= 0 and out["write_back_ms"] >= 0
            stages = out["stages_ms"]
            assert set(stages) == set(TIMED_PARTS) and min(stages.values()) >= 0
            assert 0 <= out["unaccounted_ms"] < out["prefetch_ms"]
            assert 0 <= out["hit_rate"] <= 1 and len(out["per_step"]) == 2
            assert all(step["unique"] > 0 for step in out["per_step"])
        for key in ("pageable", "pinned_in_place", "d2h_pageable", "d2h_pinned_host"):
            assert result["transfer"][f"{key}_ms"] > 0, key
    printed = capsys.readouterr().out
    for phase in (
        "drew 7 batches",
        "host tables filled",
        "zipf hbm: 5 steps",
        "zipf numpy: warmed 3 steps",
        "uniform pinned_host pipelined",
        "wrote ",
    ):
        assert phase in printed, phase
    assert all(line.startswith("[") and " s] " in line for line in printed.splitlines())


def test_capacity_mode_trains_and_saves_the_tables_that_fit(tmp_path):
    folder = tmp_path / "ckpt"
    argv = ["--rows", "200", "--dim", "4", "--batch", "4", "--mean-len", "2", "--steps", "2",
            "--capacity-gb", "0.00001", "--checkpoint-gb", "0.0000085",
            "--checkpoint-dir", str(folder), "--out", str(tmp_path)]  # fmt: skip
    assert gpu_check_cache.main(argv) == 0
    report = json.loads((tmp_path / "gpu_check_cache_capacity.json").read_text())["capacity"]
    assert report["tables"] == 4 and len(report["step_ms"]) == 2  # 4 x 3,200 B >= 10 kB
    checkpoint = report["checkpoint"]
    assert (
        checkpoint["tables_saved"] == 2 and checkpoint["read_back_equal"]
    )  # 2 tables of 4,000 B fit
    assert sorted(p.name for p in folder.iterdir())[:2] == ["manifest.json", "t0.momentum1.npy"]


def test_bad_variant_and_steps_are_refused():
    with pytest.raises(ValueError, match="--variants"):
        gpu_check_cache.main(["--variants", "cuda"])
    with pytest.raises(ValueError, match="--steps"):
        gpu_check_cache.main(["--steps", "1"])


def test_fill_uniform_writes_every_row_within_the_bound():
    table = np.full((1000, 3), np.nan, np.float32)
    gpu_check_cache.fill_uniform(table, 0.5, block_rows=64)
    assert np.all(np.abs(table) <= 0.5) and np.unique(table).size > 100


def test_zipf_ids_follow_the_bounded_law():
    args = argparse.Namespace(tables=1, batch=2000, mean_len=20, rows=50, alpha=1.05)
    ((ids, offsets),) = gpu_check_cache.make_batches(args, "zipf", 1)
    counts = np.bincount(ids[: offsets[-1]], minlength=50)
    expected = np.diff(np.concatenate([[0], gpu_check_cache.zipf_cdf(50, 1.05)])) * offsets[-1]
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected.max())
    assert counts[0] > 10 * counts[-1]


def test_batches_have_a_fixed_capacity_and_ids_in_range():
    args = argparse.Namespace(tables=3, batch=5, mean_len=4, rows=50, alpha=1.05)
    for dist in ("zipf", "uniform"):
        batches = gpu_check_cache.make_batches(args, dist, 3)
        again = gpu_check_cache.make_batches(args, dist, 3)
        for (ids, offsets), (ids2, offsets2) in zip(batches, again, strict=True):
            assert ids.shape == (3 * 5 * 2 * 4,) and offsets.shape == (3 * 5 + 1,)
            assert ids.min() >= 0 and ids.max() < 50 and offsets[-1] <= ids.shape[0]
            np.testing.assert_array_equal(ids, ids2)
            np.testing.assert_array_equal(offsets, offsets2)


def test_trace_summarizes_the_kernels_of_the_sequential_steps(tmp_path):
    argv = [*TINY.split(), "--dists", "zipf", "--variants", "numpy", "--out", str(tmp_path),
            "--trace", str(tmp_path / "trace")]  # fmt: skip
    assert gpu_check_cache.main(argv) == 0
    report = json.loads((tmp_path / "gpu_check_cache.json").read_text())
    trace = report["results"]["zipf"]["numpy"]["trace"]
    names = [e["name"] for events in trace.values() for e in events]
    assert any("sequential" in name for name in names)  # the traced loop on the host
    assert all(e["ms"] >= 0 and e["count"] >= 1 for events in trace.values() for e in events)
