"""The scaling GPU check's CPU mode runs on two host devices: weak-scaling breakdown, the
capacity run (planner refusal on one device, three fused steps on two) and the checkpoint run."""

import json

import pytest

from benchmarks.gpu_check_scaling import main


def _scaling_run(out, *flags) -> dict:
    assert main(["--small", "--quick", *flags, "--out", str(out)]) == 0
    return json.loads((out / "gpu_check_scaling.json").read_text())


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    return _scaling_run(tmp_path_factory.mktemp("float32"))


def test_cpu_mode_measures_scaling_and_capacity(float32_run, tmp_path):
    record = float32_run
    assert record["devices"] == 2 and len(record["plan"]) == 26
    parts = record["sharded"]
    timed = ("input_dist_ms", "owner_lookup_forward_ms", "output_dist_ms", "gradient_dist_ms")
    timed += ("backward_fused_update_ms", "dense_and_optimizer_ms")
    assert all(parts[key] > 0 for key in timed)  # each measured, none derived
    assert parts["parts_sum_ms"] == sum(parts[key] for key in timed)
    assert parts["ids_overflowing_ids_per_destination"] == 0
    assert abs(sum(parts["share_of_parts_sum"].values()) - 1) < 1e-9
    assert parts["redistribution_ms"] == sum(
        parts[key] for key in ("input_dist_ms", "output_dist_ms", "gradient_dist_ms")
    )
    # the gradient distribution hands its collectives the bytes the output distribution does
    assert parts["gradient_dist_collective_bytes"] == parts["output_dist_collective_bytes"] > 0
    assert parts["input_dist_collective_bytes"] > 0
    assert max(parts["owner_ids_live"]) <= parts["owner_ids_capacity"]
    one = record["one_gpu"]  # the single-GPU counterpart of each owner part, same run
    for key in ("embedding_forward_ms", "backward_fused_update_ms", "dense_and_optimizer_ms"):
        assert one[key] > 0
    assert one["backward_fused_update_at_owner_capacity_ms"] > 0
    assert 0 < one["ids_live"] <= one["ids_capacity"]
    assert parts["backward_fused_update_device0_alone_ms"] > 0  # not one of the step's parts
    assert set(record["owner_vs_one_gpu"]) == {"forward", "backward_fused_update", "live_ids",
                                                "ids_capacity",
                                                "backward_fused_update_device0_alone"}  # fmt: skip
    assert record["ids_per_destination"] < record["ids_per_destination_exact_bound"]
    assert set(v[0] for v in record["plan"].values()) == {"table_wise"}
    assert record["all_to_all_gbytes_per_s"] > 0 and record["reduce_scatter_gbytes_per_s"] > 0
    assert record["redistribution_share"] > 0 and record["per_gpu_throughput_vs_one_gpu"] > 0

    assert main(["--small", "--mode", "capacity", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check_scaling.json").read_text())
    assert record["one_gpu_planner"].startswith("refused: the tables need")
    assert len(record["losses"]) == 3


def test_cpu_mode_saves_and_restores_a_sharded_checkpoint_bitwise(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    args = ["--small", "--mode", "checkpoint", "--out", str(tmp_path)]
    assert main([*args, "--checkpoint-dir", str(folder)]) == 0
    record = json.loads((tmp_path / "gpu_check_scaling.json").read_text())
    assert record["bitwise_equal"] and record["sampled_leaves"] > 0
    assert record["save_s"] > 0 and record["restore_s"] > 0
    assert record["checkpoint_gbytes_on_disk"] > 0.9 * record["table_gbytes"]
    assert not any(folder.iterdir())  # the checkpoint is removed after the check


def test_16_bit_communication_halves_the_output_and_gradient_bytes(float32_run, tmp_path):
    half = _scaling_run(tmp_path, "--comm-dtype", "float16", "--trace", str(tmp_path / "t"))
    kernels = [e for events in half["sharded"]["input_dist_trace"].values() for e in events]
    assert kernels and all(e["ms"] >= 0 and e["count"] >= 1 for e in kernels)
    assert "input_dist_trace" not in float32_run["sharded"]
    assert half["comm_dtype"] == "float16" and float32_run["comm_dtype"] is None
    for key in ("output_dist_collective_bytes", "gradient_dist_collective_bytes"):
        assert 2 * half["sharded"][key] == float32_run["sharded"][key], key
    key = "input_dist_collective_bytes"
    assert half["sharded"][key] == float32_run["sharded"][key]
