"""The DLRM GPU check's CPU mode: tiny shapes, every part timed, torch's CPU model run from
jaxrec's initial values (its first loss must be jaxrec's), the checks that can fail."""

import json

from benchmarks.gpu_check_dlrm import failures, main


def test_cpu_mode_times_step_parts_and_torch(tmp_path):
    assert main(["--small", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check_dlrm.json").read_text())
    assert record["tables"] == 26 and record["failures"] == []
    assert record["ids_per_batch"] > 26 * record["batch"]  # multi-hot bags present
    timed = ("jaxrec_step_ms", "jaxrec_embedding_ms", "jaxrec_dense_ms", "torch_step_ms")
    assert all(record[key] > 0 for key in timed)
    parts = record["jaxrec_embedding_ms"] + record["jaxrec_dense_ms"]
    assert record["parts_sum_ms"] == parts
    assert record["step_over_parts"] == record["jaxrec_step_ms"] / parts
    assert record["speedup_vs_torch"] == record["torch_step_ms"] / record["jaxrec_step_ms"]
    assert record["losses_run_1"] == record["losses_run_2"]
    assert record["torch_first_loss_relative_difference"] < 1e-5
    assert record["hlo_copies_of_table"] == 0 and record["copy_gbytes_per_s"] > 0


def test_failures_name_each_broken_check():
    good = {
        "hlo_copies_of_table": 0,
        "losses_finite": True,
        "losses_run_1": [0.7, 0.6],
        "losses_run_2": [0.7, 0.6],
        "losses_max_relative_difference": 0.0,
        "torch_first_loss": 0.7,
        "torch_first_loss_relative_difference": 0.0,
        "torch_losses_finite": True,
    }
    assert failures(good, small=True) == []
    broken = {
        **good,
        "hlo_copies_of_table": 2,
        "losses_max_relative_difference": 1e-3,
        "torch_first_loss_relative_difference": 1e-3,
    }
    found = failures(broken, small=True)
    assert len(found) == 3 and "copies the table 2 times" in found[0]
    assert failures({**good, "torch_first_loss_relative_difference": 1e-3}, small=False) == []
