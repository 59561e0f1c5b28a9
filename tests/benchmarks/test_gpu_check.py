"""The GPU check scripts' CPU modes (Pallas in interpret mode, small inputs), so a broken
check, or a kernel that fails one, shows up before a GPU run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.pooled_lookup import PooledConfig

from benchmarks import gpu_check, gpu_check_backward, gpu_check_modules
from jaxrec import bench


def test_first_correctness_cases_pass_in_interpret_mode():
    records = gpu_check.correctness(seed=3, interpret=True, limit=3)
    assert len(records) == 3
    assert all(r["ok"] for r in records), records
    # fp32 to 1e-6 relative; fp16 and bf16 within 1 ulp of the reference rounded once.
    assert [r["dtype"] for r in records] == ["fp32", "fp16", "bf16"]
    assert records[0]["relerr"] <= 1e-6 and all(r["max_ulps"] <= 1 for r in records[1:])


@pytest.mark.parametrize("weighted", [False, True])
def test_variant_and_gather_timings_on_a_tiny_model(weighted):
    inputs = bench.make_inputs(bench.SHAPES["tiny"], "fp32", weighted=weighted, rotations=2)
    arg_sets = list(zip(inputs.ids, inputs.offsets, strict=True))
    nbytes = bench.pooled_bytes(inputs, "fp32")
    rec = gpu_check._time_variant(
        inputs, "pooled", PooledConfig(1, 16, 2), arg_sets, nbytes, iters=2, interpret=True
    )
    assert rec["ms"] > 0 and "error" not in rec
    gather = gpu_check._time_gather(inputs, arg_sets, iters=2)
    rows = sum(
        g.dim * 4 * n for g, n in zip(inputs.groups, bench._lookups_per_group(inputs), strict=True)
    )
    assert gather["bytes"] == rows and gather["ms"] > 0
    seq = gpu_check._time_variant(
        inputs, "sequence", None, arg_sets, 2 * rows, iters=2, interpret=True
    )
    assert seq["ms"] > 0 and seq["config"] == "default"


def test_every_candidate_launch_shape_is_distinct_and_valid():
    assert len(set(gpu_check.POOLED_VARIANTS)) == len(gpu_check.POOLED_VARIANTS)
    lists = gpu_check.SHORT_ROW_VARIANTS, gpu_check.WIDE_ROW_VARIANTS, gpu_check.BF16_VARIANTS
    assert set().union(*lists) == set(gpu_check.POOLED_VARIANTS)
    assert np.all([c.num_warps in (1, 2, 4, 8) for c in gpu_check.POOLED_VARIANTS])


def test_bench_section_runs_rounds_and_in_jit_timing_in_interpret_mode(tmp_path, capsys):
    argv = ["--interpret", "--sections", "bench", "--bench", "tiny:fp32:sum:1", "--rounds", "2"]
    argv += ["--in-jit-shapes", "tiny", "--in-jit-calls", "2", "--iters", "1"]
    assert gpu_check.main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    pallas = [r for r in record["bench"] if r["impl"] == "pallas"]
    assert len(pallas) == 1 and len(pallas[0]["ms_rounds"]) == 2
    assert pallas[0]["ms_in_jit"] > 0 and pallas[0]["weighted"]
    assert len(record["bench_rounds"]) == 2 * len(record["bench"])
    assert "in-jit ms" in capsys.readouterr().out


def test_backward_check_runs_every_section_on_small_shapes(tmp_path):
    argv = ["--small", "--interpret", "--limit", "1", "--out", str(tmp_path)]
    assert gpu_check_backward.main(argv) == 0
    record = json.loads((tmp_path / "gpu_check_backward.json").read_text())
    assert len(record["correctness"]) == 1 and record["correctness"][0]["ok"]
    assert record["variants"]["backward"][0]["ms"] > 0
    assert record["variants"]["table_copies_in_backward"] == 0
    assert record["step"][0]["pallas_ms"] > 0 and "xla_handwritten_ms" in record["step"][0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_backward_check_holds_16_bit_tables_to_one_ulp(dtype):
    rng = np.random.default_rng(5)
    opt = gpu_check_backward.so.exact_rowwise_adagrad(0.05, stochastic_rounding=True)
    result = gpu_check_backward.check_case(
        rng,
        gpu_check_backward.SMALL,
        opt,
        dim=16,
        pooling="sum",
        dtype=dtype,
        weighted=True,
        config=gpu_check_backward.SparseUpdateConfig(),
        interpret=True,
    )
    assert result["ok"] and result["max_ulps"] <= 1, result


def test_modules_check_runs_on_small_inputs_in_interpret_mode(tmp_path):
    argv = ["--sections", "modules", "--small", "--seed", "1", "--out", str(tmp_path)]
    assert gpu_check_modules.main(argv) == 0
    record = json.loads((tmp_path / "gpu_check_modules.json").read_text())["modules"]
    assert record["ok"] and record["fused_train_bitwise_deterministic"]
    assert record["ebc_fp16_max_ulps"] <= 1 and record["ebc_bf16_max_ulps"] <= 1
