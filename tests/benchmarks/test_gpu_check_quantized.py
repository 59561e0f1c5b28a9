"""The quantized GPU check's CPU mode runs: kernel vs reference on fresh inputs, timing table."""

import jax.numpy as jnp
import pytest

from benchmarks import gpu_check_quantized
from benchmarks.gpu_check_quantized import main


def test_cpu_mode_checks_and_times_int8_int4_and_fp32(capsys):
    main(["--interpret", "--small", "--reps", "1", "--diagnose"])
    out = capsys.readouterr().out
    for line in ("int8: kernel vs reference", "int4: kernel vs reference", "fp32 jaxrec"):
        assert line in out
    assert "% of copy bandwidth" in out
    assert "int4 read in bytes" in out and "FAILED" not in out


def test_a_wrong_case_is_reported_with_its_place_and_not_timed(capsys, monkeypatch):
    real = gpu_check_quantized.quantized_pooled_lookup

    def nan_in_int4_table_1(*args, **kw):
        out, bad = real(*args, **kw)
        if kw["weight_type"] == "int4":
            out = out.at[3, kw["dim"] + 2].set(jnp.nan)  # bag 3, column 2 of table 1
        return out, bad

    monkeypatch.setattr(gpu_check_quantized, "quantized_pooled_lookup", nan_in_int4_table_1)
    with pytest.raises(SystemExit, match="FAILED: int4"):
        main(["--interpret", "--small", "--reps", "1"])
    out = capsys.readouterr().out
    assert "int8: kernel vs reference" in out and "(ok)" in out
    assert "non-finite outputs kernel 1, reference 0" in out
    assert "first wrong output bag 3 column 18 (table 1)" in out
    timed = [line.split()[0] for line in out.splitlines() if "G lookups/s" in line]
    assert timed == ["int8", "fp32"]


def test_cpu_mode_times_the_tbe_against_the_collection(capsys):
    main(["--interpret", "--small", "--reps", "1", "--tbe"])
    out = capsys.readouterr().out
    assert "TBE vs EBC forward" in out and "TBE vs EBC step" in out and "ratio" in out
