"""The quantized GPU check's CPU mode runs: kernel vs reference on fresh inputs, timing table."""

from jaxrec_kernels.gpu_check_quantized import main


def test_cpu_mode_checks_and_times_int8_int4_and_fp32(capsys):
    main(["--interpret", "--small", "--reps", "1"])
    out = capsys.readouterr().out
    for line in ("int8: kernel vs reference", "int4: kernel vs reference", "fp32 jaxrec"):
        assert line in out
    assert "% of copy bandwidth" in out


def test_cpu_mode_times_the_tbe_against_the_collection(capsys):
    main(["--interpret", "--small", "--reps", "1", "--tbe"])
    out = capsys.readouterr().out
    assert "TBE vs EBC forward" in out and "TBE vs EBC step" in out and "ratio" in out
