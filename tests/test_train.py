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
