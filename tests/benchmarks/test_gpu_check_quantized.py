"""The quantized GPU check's CPU mode: every kernel against its reference, timings, the TBE
against the collection, and a self-explaining JSON."""

import json

import jax.numpy as jnp
import pytest
from jaxrec_kernels.quantized_lookup import DEFAULT_LAUNCH, default_quantized_config

from benchmarks import gpu_check_quantized
from benchmarks.gpu_check_quantized import main


def test_cpu_mode_checks_times_and_writes_the_targets(tmp_path, capsys):
    result = main(["--interpret", "--small", "--reps", "1", "--tbe", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "gpu_check_quantized.json").read_text())
    assert written["targets"] == json.loads(json.dumps(result["targets"]))
    names = [c["name"] for c in written["correctness"]]
    assert names == [
        "fp32 jaxrec",
        "fp16 jaxrec",
        "int8 jaxrec default",
        "int8 jaxrec e4_1x16_w1_2reads",
        "int8 jaxrec e1_2x16_w1",
        "int8 jaxrec default, fp16 output",
        "int4 jaxrec default",
        "int4 jaxrec e4_1x16_w1_2reads",
        "int4 jaxrec e2_1x64_w1",
    ]
    assert all(c["ok"] and c["max_abs_diff"] <= c["tolerance"] for c in written["correctness"])
    timed = [t["name"] for t in written["timings"]]
    assert [n for n in timed if "uint8 table" not in n] == names
    assert [n for n in timed if "uint8 table" in n] == [
        "int8 jaxrec default, uint8 table",
        "int4 jaxrec default, uint8 table",
    ]
    int8 = next(t for t in written["timings"] if t["name"] == "int8 jaxrec default")
    shape = written["shape"]
    assert int8["bytes_read"] == shape["lookups"] * (shape["dim"] + 8)  # int8 row bytes
    launch = DEFAULT_LAUNCH["int8"]  # the default form is the one the table names
    expected = default_quantized_config(shape["dim"], "int8")
    assert int8["config"]["block_len"] == expected.block_len and int8["pct_of_copy"] > 0
    assert (int8["word_bytes"], int8["one_scale_bias_read"]) == (
        launch.word_bytes,
        launch.one_scale_bias_read,
    )
    swept = {t["name"]: t for t in written["timings"] if "word_bytes" in t}
    assert swept["int8 jaxrec e1_2x16_w1"]["word_bytes"] == 1
    assert swept["int4 jaxrec e4_1x16_w1_2reads"]["one_scale_bias_read"] is False
    for wt in ("int8", "int4"):
        suggested = written["suggested_defaults"][wt]
        finalists = [t for t in swept.values() if t["precision"] == wt and "rounds_ms" in t]
        assert f"{wt} jaxrec default" in [t["name"] for t in finalists]
        assert all(
            len(t["rounds_ms"]) == 3 and t["rounds_ms"][0] == t["median_ms"] for t in finalists
        )
        best = min(finalists, key=lambda t: sum(t["rounds_ms"]))
        assert suggested["best"] == best["name"]
        assert suggested["best_ms"] == pytest.approx(sum(best["rounds_ms"]) / 3)
        assert suggested["line"].startswith(f'DEFAULT_LAUNCH["{wt}"] = QuantizedLaunch(')
        assert f"word_bytes={best['word_bytes']}," in suggested["line"]
        assert f"best {wt}: {best['name']}" in printed and suggested["line"] in printed
    precisions = ("fp32", "fp16", "int8", "int4", "int8 (uint8 table)", "int4 (uint8 table)")
    precisions += ("int8 (fp16 output)",)
    assert set(written["best"]) == {f"{p} jaxrec pallas" for p in precisions}
    assert written["targets"]["int8_over_fp32_jaxrec"]["target"] == ">= 3"
    assert written["targets"]["int8_over_torch_fp16"]["met"] is None  # no GPU: not measured
    tbe = written["tbe_vs_ebc"]
    assert tbe["forward_ok"] and tbe["forward_max_abs_diff"] <= tbe["forward_tolerance"]
    assert written["targets"]["tbe_step_over_ebc"]["value"] == tbe["step_ratio"]
    medians = tbe["step_medians_s"]
    assert [len(medians["ebc"]), len(medians["tbe"])] == [2, 2]
    assert tbe["step_tbe_s"] == sum(medians["tbe"]) / 2
    assert {"shape", "copy", "correctness", "timings", "targets", "tbe_vs_ebc"} <= set(
        written["about"]
    )
    assert written["failed"] == [] and "wrote" in printed


def test_a_wrong_case_is_reported_with_its_place_and_not_timed(tmp_path, capsys, monkeypatch):
    real = gpu_check_quantized.quantized_pooled_lookup

    def nan_in_int4_table_1(*args, **kw):
        config = kw.get("config")
        if kw["weight_type"] == "int8" and config is not None and config.block_bags == 2:
            raise RuntimeError("no lowering for this form")  # a form that does not compile
        out, bad = real(*args, **kw)
        if (
            kw["weight_type"] == "int4"
            and kw.get("config") is not None
            and kw["config"].block_len == 16
            and not kw["one_scale_bias_read"]
        ):
            out = out.at[3, kw["dim"] + 2].set(jnp.nan)  # bag 3, column 2 of table 1
        return out, bad

    monkeypatch.setattr(gpu_check_quantized, "quantized_pooled_lookup", nan_in_int4_table_1)
    with pytest.raises(SystemExit, match="FAILED: int8 jaxrec e1_2x16_w1: .*no lowering") as err:
        main(["--interpret", "--small", "--reps", "1", "--out", str(tmp_path)])
    assert "int4 jaxrec e4_1x16_w1_2reads: max abs diff" in str(err.value)
    out = capsys.readouterr().out
    assert "int4 jaxrec default: kernel vs reference" in out and "(ok)" in out
    assert "non-finite outputs kernel 1, reference 0" in out
    assert "first wrong output bag 3 column 18 (table 1)" in out
    written = json.loads((tmp_path / "gpu_check_quantized.json").read_text())
    wrong = [c for c in written["correctness"] if not c["ok"]]
    assert [(c["name"], c.get("first_wrong")) for c in wrong] == [
        ("int8 jaxrec e1_2x16_w1", None),
        ("int4 jaxrec e4_1x16_w1_2reads", [3, 18]),
    ]
    assert "no lowering" in wrong[0]["error"]
    timed = [t["name"] for t in written["timings"]]
    assert "int8 jaxrec default, fp16 output" in timed and "int8 jaxrec e1_2x16_w1" not in timed
    assert "int4 jaxrec default" in timed and "int4 jaxrec e4_1x16_w1_2reads" not in timed
    assert written["best"]["int4 jaxrec pallas"] in timed  # the fastest of the correct forms
