"""The host batching benchmark (benchmarks/host_batching.py) runs and reports each builder."""

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "host_batching.py"


def test_host_batching_benchmark_reports_each_builder():
    pytest.importorskip("torchrec")
    pytest.importorskip("recbole.dataset_example", reason="recbole wheel not installed")
    measure = runpy.run_path(str(SCRIPT))["measure"]
    results = measure(batch_size=64, num_batches=6, repeats=1)
    assert set(results) == {"jaxrec numpy", "jaxrec + device_put", "torchrec kjt"}
    assert all(ms > 0 for ms in results.values())


def test_host_batching_benchmark_times_the_step_with_and_without_prefetch():
    pytest.importorskip("recbole.dataset_example", reason="recbole wheel not installed")
    measure_prefetch = runpy.run_path(str(SCRIPT))["measure_prefetch"]
    results = measure_prefetch(batch_size=64, steps=6)
    assert set(results) == {
        "step, batches prebuilt",
        "step, batches built inline",
        "step, prefetched",
        "prefetch queue wait",
    }
    assert all(ms > 0 for ms in results.values())
    assert results["prefetch queue wait"] < results["step, prefetched"]
