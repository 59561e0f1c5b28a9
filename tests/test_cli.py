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
    assert "train loss: first" in out.out and "held-out: loss" in out.out and "AUC" in out.out
    assert "20/20" in out.err  # the progress bar reached the end


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--stepz", "3"])
    assert "unrecognized arguments" in capsys.readouterr().err
