import pytest

from jaxrec.cli import main


def test_train_command_prints_progress_and_metrics(capsys):
    code = main(
        [
            "train",
            "--steps",
            "20",
            "--batch-size",
            "64",
            "--num-tables",
            "2",
            "--num-rows",
            "100",
            "--dim",
            "8",
            "--eval-batches",
            "1",
            "--log-every",
            "5",
        ]
    )
    out = capsys.readouterr()
    assert code == 0
    assert "held-out metric" in out.out and "planted AUC" in out.out and "\nauc " in out.out
    assert "20/20" in out.err and "ex_per_s=" in out.err  # the progress bar reached the end


def test_train_command_writes_the_curves_png(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--steps", "4", "--batch-size", "32", "--num-tables", "2", "--num-rows",
            "50", "--dim", "4", "--eval-batches", "1", "--eval-every", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"curves: {out / 'curves.png'}" in capsys.readouterr().out


def test_help_explains_every_option(capsys):
    from jaxrec.train import HELP

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, explanation in HELP.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(explanation.replace("%%", "%").split()) in text, name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--data", "movielens"], ("movielens", None)),
        (["--data", "criteo", "__FILE__"], ("criteo", "__FILE__")),
        (["--data", "criteo", "--data-path", "__FILE__"], ("criteo", "__FILE__")),
    ],
)
def test_data_takes_a_kind_and_an_optional_path(argv, expected):
    from jaxrec.cli import _train_config, _train_parser
    from jaxrec.cli_options import OneLineParser

    parser = _train_parser(OneLineParser(prog="jaxrec").add_subparsers())
    argv = [a.replace("__FILE__", __file__) for a in argv]
    config = _train_config(parser, parser.parse_args(argv))
    assert (config.data, config.data_path) == tuple(
        None if e is None else e.replace("__FILE__", __file__) for e in expected
    )


def test_every_train_config_field_has_a_flag_with_its_default():
    import dataclasses

    from jaxrec.cli import _train_config, _train_parser
    from jaxrec.cli_options import OneLineParser
    from jaxrec.train import TrainConfig

    sub = OneLineParser(prog="jaxrec").add_subparsers()
    parser = _train_parser(sub)
    assert _train_config(parser, parser.parse_args([])) == TrainConfig()
    args = parser.parse_args(["--top-mlp", "8", "1", "--seed", "3", "--data-type", "BF16"])
    config = _train_config(parser, args)
    assert (config.top_mlp, config.seed, config.data_type) == ((8, 1), 3, "BF16")
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(vars(args))


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stepz", "3"])
    assert "unrecognized arguments" in capsys.readouterr().err


# --- bad option values: one line naming the option, exit status 2, nothing run ---


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fails the test if a bad command line gets as far as training or benchmarking."""
    from jaxrec import bench, cli

    def refuse(*args, **kwargs):
        raise AssertionError("a bad command line started running")

    monkeypatch.setattr(cli, "run_training", refuse)
    monkeypatch.setattr(bench, "copy_bandwidth", refuse)
    monkeypatch.setattr(bench, "run_shape", refuse)


def fails_like_a_cli(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err


WHOLE = "expected a whole number >= 1, got"
POSITIVE = "expected a finite number > 0, got"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], f"argument --steps: {WHOLE} '0'"),
        (["--steps", "-3"], f"argument --steps: {WHOLE} '-3'"),
        (["--steps", "ten"], f"argument --steps: {WHOLE} 'ten'"),
        (["--batch-size", "0"], f"argument --batch-size: {WHOLE} '0'"),
        (["--batch-size", "2.5"], f"argument --batch-size: {WHOLE} '2.5'"),
        (["--log-every", "0"], f"argument --log-every: {WHOLE} '0'"),
        (["--eval-batches", "0"], f"argument --eval-batches: {WHOLE} '0'"),
        (["--eval-batches", "-1"], f"argument --eval-batches: {WHOLE} '-1'"),
        (["--num-tables", "0"], f"argument --num-tables: {WHOLE} '0'"),
        (["--num-rows", "-5"], f"argument --num-rows: {WHOLE} '-5'"),
        (["--dim", "0"], f"argument --dim: {WHOLE} '0'"),
        (["--embedding-lr", "0"], f"argument --embedding-lr: {POSITIVE} '0'"),
        (["--embedding-lr", "-0.1"], f"argument --embedding-lr: {POSITIVE} '-0.1'"),
        (["--embedding-lr", "nan"], f"argument --embedding-lr: {POSITIVE} 'nan'"),
        (["--dense-lr", "inf"], f"argument --dense-lr: {POSITIVE} 'inf'"),
        (["--dense-lr", "fast"], f"argument --dense-lr: {POSITIVE} 'fast'"),
        (["--seed", "-1"], "argument --seed: expected a whole number in [0, 2**63), got '-1'"),
        (["--seed", str(2**63)], "argument --seed: expected a whole number in [0, 2**63)"),
        (["--bottom-mlp", "64,32"], f"argument --bottom-mlp: {WHOLE} '64,32'"),
        (["--bottom-mlp", "64", "0"], f"argument --bottom-mlp: {WHOLE} '0'"),
        (["--top-mlp", "-1"], f"argument --top-mlp: {WHOLE} '-1'"),
        (
            ["--top-mlp", "64", "32"],
            "argument --top-mlp: expected sizes ending in 1 (the click logit), got 64 32",
        ),
        (["--data-type", "FP8"], "argument --data-type: invalid choice: 'FP8' (choose from"),
        (["--embedding-optimizer", "sgdx"], "argument --embedding-optimizer: invalid choice"),
        (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
        (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
        (["--model", "bert"], "argument --model: invalid choice: 'bert'"),
        (["--data", "imagenet"], "argument --data: expected one of synthetic, movielens, criteo"),
        (["--data", "criteo"], "data 'criteo' needs data_path (the Criteo TSV file)"),
        (["--data", "criteo", "/no/such.tsv"], "argument --data: /no/such.tsv does not exist"),
        (["--resume"], "resume needs checkpoint_dir"),
        (["--eval-every", "0"], f"argument --eval-every: {WHOLE} '0'"),
        (
            ["--embedding-weight-decay", "-1"],
            "argument --embedding-weight-decay: expected a finite number >= 0, got '-1'",
        ),
        (["--checkpoint-every", "-1"], "argument --checkpoint-every: expected a whole number >= 0"),
        (
            ["--num-tables", "8", "--num-rows", "1000000000000"],
            "--num-tables 8 --num-rows 1000000000000 --dim 16 --batch-size 512 need about",
        ),
        (["--batch-size", "100000000000"], "--batch-size 100000000000 need about"),
    ],
)
def test_bad_train_options_fail_like_a_cli(capsys, nothing_runs, argv, message):
    err = fails_like_a_cli(capsys, ["train", *argv])
    assert err.startswith("jaxrec train: error: ")
    assert message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "huge"], "argument --shapes: unknown ['huge']; expected a comma list of"),
        (["--shapes", ","], "argument --shapes: an empty list; expected a comma list of"),
        (["--dtype", "fp8"], "argument --dtype: unknown ['fp8']; expected a comma list of fp32"),
        (["--ops", "max"], "argument --ops: unknown ['max']; expected a comma list of pooled"),
        (["--impls", "xla,cuda"], "argument --impls: unknown ['xla', 'cuda']"),
        (["--pooling", "max"], "argument --pooling: invalid choice: 'max'"),
        (["--iters", "0"], f"argument --iters: {WHOLE} '0'"),
        (["--rounds", "0"], f"argument --rounds: {WHOLE} '0'"),
        (["--rounds", "-2"], f"argument --rounds: {WHOLE} '-2'"),
        (["--in-jit-calls", "0"], f"argument --in-jit-calls: {WHOLE} '0'"),
        (["--copy-mib", "-4"], f"argument --copy-mib: {WHOLE} '-4'"),
        (["--json", "/no/such/folder/b.json"], "argument --json: folder '/no/such/folder'"),
        (["--chart", "/no/such/folder/c.png"], "argument --chart: folder '/no/such/folder'"),
        (["--copy-mib", "1000000000"], "--copy-mib 1000000000 need about 1907.3 TiB"),
        (["--in-jit-calls", "1000000000"], "--shapes tiny --dtype fp32 --in-jit-calls 1000000000"),
    ],
)
def test_bad_bench_options_fail_like_a_cli(capsys, nothing_runs, argv, message):
    err = fails_like_a_cli(capsys, ["bench", "--shapes", "tiny", *argv])
    assert err.startswith("jaxrec bench: error: ")
    assert message in err


def test_memory_check_names_the_sizes_and_what_is_free(capsys):
    from jaxrec.cli_options import OneLineParser, check_memory

    parser = OneLineParser(prog="p")
    check_memory(parser, 2**31, "--x 1", (2**31, "host memory"))  # fits: nothing happens
    with pytest.raises(SystemExit) as exit_info:
        check_memory(parser, 3 * 2**30, "--x 2", (2**31, "GPU memory"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "p: error: --x 2 need about 3.0 GiB, more than the 2.0 GiB of GPU memory available; "
        "choose smaller sizes\n"
    )


def test_a_bad_option_in_a_real_process_prints_one_line_and_exits_2():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "jaxrec.cli", "train", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"jaxrec train: error: argument --steps: {WHOLE} '0'\n"
    assert done.stdout == ""
