"""benchmarks/host_gather.py runs on a CPU with tiny shapes and reports every thread count."""

import json

from benchmarks import host_gather


def test_host_gather_sweep_reports_each_thread_count(tmp_path):
    argv = ["--rows", "5000", "--count", "3000", "--threads", "1,3", "--repeats", "2",
            "--out", str(tmp_path)]  # fmt: skip
    assert host_gather.main(argv) == 0
    report = json.loads((tmp_path / "host_gather.json").read_text())
    assert report["row_bytes"] == 516 and report["count"] == 3000
    assert set(report["threads"]) == {"1", "3"}
    for entry in report["threads"].values():
        assert entry["gather_ms"] > 0 and entry["scatter_gbytes_per_s"] > 0
