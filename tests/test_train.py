import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxrec.train import TrainConfig, make_source, run_training

SMALL = dict(batch_size=64, num_tables=2, num_rows=100, dim=8, eval_batches=2, log_every=2)


def test_training_lowers_the_loss_and_approaches_the_planted_auc():
    config = TrainConfig(
        steps=120, batch_size=256, num_tables=4, num_rows=300, dim=8, eval_batches=4,
        eval_every=60, log_every=10, dense_lr=1e-2,
    )  # fmt: skip
    result = run_training(config)
    assert len(result.losses) == 12 and result.eval_steps == [60, 120]
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.02
    assert result.eval_auc > 0.65 and result.planted_auc > result.eval_auc - 0.01


def test_padded_rows_weigh_nothing_in_the_loss():
    from jaxrec.train.loop import initial_state
    from jaxrec.train.models import loss_and_outputs

    config = TrainConfig(**SMALL)
    source = make_source(config)
    model, state, _ = initial_state(config, source)
    batch = source.train_batch(0)
    half = np.r_[np.ones(32), np.zeros(32)].astype(np.float32)
    garbage = batch._replace(labels=np.where(half > 0, batch.labels, 1.0 - batch.labels))
    a, _ = loss_and_outputs(model, state["params"], batch._replace(weights=half))
    b, _ = loss_and_outputs(model, state["params"], garbage._replace(weights=half))
    assert float(a) == float(b)
    full, _ = loss_and_outputs(model, state["params"], batch)
    assert float(a) != float(full)


def test_resume_gives_a_bitwise_identical_next_step(tmp_path):
    config = TrainConfig(steps=5, eval_every=100, checkpoint_dir=str(tmp_path / "c"), **SMALL)
    straight = run_training(dataclasses.replace(config, checkpoint_dir=None))
    first = run_training(config, stop_after=3)  # interrupted after step 3 (saved there)
    assert first.loss_steps[-1] == 3
    resumed = run_training(dataclasses.replace(config, resume=True))
    assert resumed.start_step == 3 and resumed.loss_steps == [4, 5]
    assert resumed.losses[-1] == straight.losses[-1]
    leaves = jax.tree.leaves(straight.state)
    assert len(leaves) == len(jax.tree.leaves(resumed.state))
    for a, b in zip(leaves, jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    config = TrainConfig(steps=2, eval_every=100, checkpoint_dir=str(tmp_path), **SMALL)
    run_training(config)
    with pytest.raises(ValueError, match="is of another run"):
        run_training(dataclasses.replace(config, steps=4, seed=1, resume=True))


def test_movielens_position_walks_epochs_and_reshuffles_each(monkeypatch):
    from jaxrec.train.sources import MovieLensSource

    source = MovieLensSource(TrainConfig(data="movielens", batch_size=4096))
    spe = source.steps_per_epoch
    assert spe == 20 and source.position(spe + 1) == {"step": spe + 1, "epoch": 1, "batch": 1}
    stream = source.train_batches(spe - 1)
    for step in (spe - 1, spe):
        np.testing.assert_array_equal(
            next(stream).sparse.values(), source.train_batch(step).sparse.values()
        )
    assert not np.array_equal(source._order(0), source._order(1))


def test_out_folder_gets_the_curves_png_and_metrics_json(tmp_path):
    import json

    out = tmp_path / "run"
    run_training(TrainConfig(steps=4, eval_every=2, out=str(out), **SMALL))
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out / "curves.png") > 10_000
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["eval_steps"] == [2, 4] and 0.5 < saved["planted_auc"] <= 1.0


@pytest.mark.parametrize("model", ["dcn", "two-tower"])
def test_every_model_trains_from_the_config(model):
    result = run_training(TrainConfig(model=model, steps=4, eval_every=4, **SMALL))
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()
    if model == "two-tower":
        assert 0.0 <= result.final["recall@10"] <= 1.0


def test_criteo_source_holds_out_the_first_batches_and_cycles_the_rest(tmp_path):
    path = tmp_path / "train.txt"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(10):
            dense = "\t".join(str(v) for v in rng.integers(0, 9, 13))
            cats = "\t".join(f"{v:08x}" for v in rng.integers(0, 2**32, 26))
            f.write(f"{i % 2}\t{dense}\t{cats}\n")
    config = TrainConfig(data="criteo", data_path=str(path), batch_size=4, eval_batches=1,
                         num_rows=50, steps=1)  # fmt: skip
    source = make_source(config)
    assert len(source.eval_batches()) == 1 and source.batches_per_pass == 2
    labels = [np.asarray(next(source.train_batches(s)).labels).tolist() for s in range(3)]
    assert labels[0] == [0.0, 1.0, 0.0, 1.0] and labels[2] == labels[0]  # rows 4..7, again


def test_embedding_weight_decay_is_fbgemms_l2_mode():
    from jaxrec.optim.rules import WeightDecayMode
    from jaxrec.train.models import sparse_optimizer

    optimizer = sparse_optimizer(TrainConfig(embedding_weight_decay=1e-3))
    assert optimizer.hyperparams["weight_decay"] == 1e-3
    assert optimizer.hyperparams["weight_decay_mode"] is WeightDecayMode.L2
    assert sparse_optimizer(TrainConfig()).hyperparams["weight_decay"] == 0.0


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="unknown embedding_optimizer 'sgdx'"):
        TrainConfig(embedding_optimizer="sgdx")
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        TrainConfig(steps=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_batches", 0, "eval_batches must be positive, got 0"),
        ("eval_every", 0, "eval_every must be positive, got 0"),
        ("log_every", -1, "log_every must be positive, got -1"),
        ("embedding_lr", 0.0, "embedding_lr must be a finite number > 0, got 0.0"),
        ("dense_lr", float("nan"), "dense_lr must be a finite number > 0, got nan"),
        ("seed", -1, r"seed must be in \[0, 2\*\*63\), got -1"),
        ("bottom_mlp", (), r"bottom_mlp must be one or more sizes >= 1, got \(\)"),
        ("bottom_mlp", (8, 0), r"bottom_mlp must be one or more sizes >= 1, got \(8, 0\)"),
        ("top_mlp", (8, 2), r"top_mlp must end in 1 \(the click logit\), got \(8, 2\)"),
        ("data_type", "FP8", "unknown data_type 'FP8'"),
        ("backend", "cuda", "unknown backend 'cuda'"),
        ("model", "bert", "unknown model 'bert'"),
        ("data", "imagenet", "unknown data 'imagenet'"),
        ("data", "criteo", "data 'criteo' needs data_path"),
        ("resume", True, "resume needs checkpoint_dir"),
        ("checkpoint_every", -1, "checkpoint_every must be >= 0, got -1"),
        ("embedding_weight_decay", -0.1, "embedding_weight_decay must be a finite number >= 0"),
    ],
)
def test_every_bad_train_config_field_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_memory_estimate_grows_with_the_tables_and_their_optimizer_state():
    small = TrainConfig(num_tables=2, num_rows=1000, dim=8)
    assert TrainConfig(num_tables=2, num_rows=2000, dim=8).estimated_bytes() > (
        small.estimated_bytes() + 2 * 1000 * 8 * 4
    )
    adam = TrainConfig(num_tables=2, num_rows=1000, dim=8, embedding_optimizer="adam")
    # Adam keeps two [rows, dim] float32 moments; row-wise Adagrad one float per row.
    assert adam.estimated_bytes() - small.estimated_bytes() == 2 * 1000 * (2 * 8 * 4 - 4)
