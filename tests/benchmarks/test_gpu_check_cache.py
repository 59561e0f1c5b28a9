"""benchmarks/gpu_check_cache.py runs on a CPU with tiny shapes, reports every number and
prints each phase as it ends; its host-side setup helpers are fast and correct."""

import argparse
import json

import numpy as np

from benchmarks import gpu_check_cache


def test_cache_timing_script_reports_times_ratio_hit_rate_and_progress(tmp_path, capsys):
    argv = "--tables 2 --rows 300 --dim 4 --batch 4 --mean-len 2 --quick"
    assert gpu_check_cache.main([*argv.split(), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_cache.json").read_text())
    assert (report["config"]["warmup"], report["config"]["steps"]) == (1, 3)
    for dist in ("zipf", "uniform"):
        result = report["results"][dist]
        assert result["hbm_ms"] > 0 and result["cached_ms"] > 0 and result["pipelined_ms"] > 0
        assert 0 <= result["hit_rate"] <= 1 and result["metrics_total"]["unique"] > 0
    out = capsys.readouterr().out
    for phase in (
        "drew 4 batches",
        "HBM baseline tables drawn",
        "host tables filled",
        "zipf hbm: 4 steps",
        "zipf cached step 4/4",
        "uniform pipelined: 4 steps",
        "wrote ",
    ):
        assert phase in out, phase
    assert all(line.startswith("[") and " s] " in line for line in out.splitlines())


def test_fill_uniform_writes_every_row_within_the_bound():
    table = np.full((1000, 3), np.nan, np.float32)
    gpu_check_cache.fill_uniform(table, 0.5, block_rows=64)
    assert np.all(np.abs(table) <= 0.5) and np.unique(table).size > 100


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
