"""kernels/gpu_check_cache.py runs on a CPU with tiny shapes and reports every number."""

import json

from jaxrec_kernels import gpu_check_cache


def test_cache_timing_script_reports_times_ratio_and_hit_rate(tmp_path):
    argv = "--tables 2 --rows 300 --dim 4 --batch 4 --mean-len 2 --steps 2 --warmup 1"
    assert gpu_check_cache.main([*argv.split(), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_cache.json").read_text())
    for dist in ("zipf", "uniform"):
        result = report["results"][dist]
        assert result["hbm_ms"] > 0 and result["cached_ms"] > 0 and result["pipelined_ms"] > 0
        assert 0 <= result["hit_rate"] <= 1 and result["metrics_total"]["unique"] > 0
