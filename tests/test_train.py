import numpy as np
import pytest

from jaxrec.train import TrainConfig, auc, run_training


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200), 1)  # ties included
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(labels, scores) == pytest.approx(pairwise)


def test_training_lowers_the_loss_and_beats_chance():
    config = TrainConfig(
        steps=120, batch_size=256, num_tables=4, num_rows=500, dim=8, eval_batches=4, log_every=10
    )
    result = run_training(config)
    assert len(result.losses) == 12
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.02
    assert result.eval_auc > 0.6


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="unknown embedding_optimizer 'sgdx'"):
        TrainConfig(embedding_optimizer="sgdx")
    with pytest.raises(ValueError, match="steps must be positive, got 0"):
        TrainConfig(steps=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_batches", 0, "eval_batches must be positive, got 0"),
        ("log_every", -1, "log_every must be positive, got -1"),
        ("embedding_lr", 0.0, "embedding_lr must be a finite number > 0, got 0.0"),
        ("dense_lr", float("nan"), "dense_lr must be a finite number > 0, got nan"),
        ("seed", -1, r"seed must be in \[0, 2\*\*63\), got -1"),
        ("bottom_mlp", (), r"bottom_mlp must be one or more sizes >= 1, got \(\)"),
        ("bottom_mlp", (8, 0), r"bottom_mlp must be one or more sizes >= 1, got \(8, 0\)"),
        ("top_mlp", (8, 2), r"top_mlp must end in 1 \(the click logit\), got \(8, 2\)"),
        ("data_type", "FP8", "unknown data_type 'FP8'"),
        ("backend", "cuda", "unknown backend 'cuda'"),
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
