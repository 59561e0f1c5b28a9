"""The weighted-step GPU check's CPU mode: both steps timed, the checks that can fail."""

import json

from benchmarks.gpu_check_weighted import failures, main


def test_cpu_mode_times_both_steps_and_passes_its_checks(tmp_path):
    assert main(["--small", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check_weighted.json").read_text())
    assert record["failures"] == [] and record["updates_bit_identical"]
    assert record["params_only_ms"] > 0 and record["params_and_weights_ms"] > 0
    assert record["params_only_weight_gradient_ops"] == 0
    assert record["params_and_weights_weight_gradient_ops"] > 0


def test_failures_name_each_broken_check():
    good = {
        "updates_bit_identical": True,
        "params_only_weight_gradient_ops": 0,
        "params_and_weights_weight_gradient_ops": 3,
        "params_only_table_copies": 0,
        "params_and_weights_table_copies": 0,
    }
    assert failures(good) == []
    bad = {**good, "updates_bit_identical": False, "params_only_weight_gradient_ops": 2}
    bad["params_and_weights_table_copies"] = 1
    assert len(failures(bad)) == 3
