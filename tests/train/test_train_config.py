"""TrainConfig's per-data defaults (``jaxrec train --data KIND``) and the cosine schedule."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import cli
from jaxrec.train import DATA_DEFAULTS, TrainConfig
from jaxrec.train.models import sparse_optimizer


@pytest.fixture
def parsed(monkeypatch):
    """``parsed(argv)``: the TrainConfig ``jaxrec`` would train with (nothing runs)."""
    seen = []
    monkeypatch.setattr(cli, "train_main", lambda config: seen.append(config) or 0)

    def parse(argv):
        assert cli.main(argv) == 0
        return seen[-1]

    return parse


def test_movielens_brings_its_defaults_and_given_flags_win(parsed):
    config = parsed(["train", "--data", "movielens", "--seed", "2"])
    assert config == TrainConfig.for_data("movielens", seed=2)
    assert (config.model, config.steps, config.eval_every) == ("dcn", 785, 157)
    assert config.embedding_weight_decay == DATA_DEFAULTS["movielens"]["embedding_weight_decay"]
    assert config.ema_decay == DATA_DEFAULTS["movielens"]["ema_decay"] == 0.99
    assert parsed(["train", "--data", "movielens", "--ema-decay", "0"]).ema_decay == 0.0
    given = parsed(["train", "--data", "movielens", "--model", "dlrm", "--steps", "10"])
    assert (given.model, given.steps, given.eval_every) == ("dlrm", 10, 157)
    assert parsed(["train"]) == TrainConfig()  # synthetic keeps the plain defaults
    assert parsed(["train", "--data", "movielens", "--rating-stats"]).rating_stats


def test_cosine_schedule_takes_both_learning_rates_to_zero_at_the_last_step():
    config = TrainConfig(
        steps=10, lr_schedule="cosine", embedding_optimizer="exact_sgd", embedding_lr=0.5
    )
    opt = sparse_optimizer(config)
    w, g = jnp.ones((2, 4)), jnp.ones((2, 4))
    np.testing.assert_allclose(opt.update(w, opt.init(2, 4), g, 1, 4)[0], 0.5)  # w - 0.5 g
    np.testing.assert_array_equal(opt.update(w, opt.init(2, 4), g, 11, 4)[0], w)
    assert float(config.learning_rate(3e-3)(10)) == 0.0
    constant = sparse_optimizer(dataclasses.replace(config, lr_schedule="constant"))
    np.testing.assert_allclose(constant.update(w, constant.init(2, 4), g, 11, 4)[0], 0.5)
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        TrainConfig(lr_schedule="linear")


def test_user_history_and_ema_decay_flags(parsed, capsys):
    config = parsed(["train", "--data", "movielens", "--user-history", "--ema-decay", "0.9"])
    assert config.user_history and config.ema_decay == 0.9
    assert not parsed(["train", "--data", "movielens", "--no-user-history"]).user_history
    for bad, message in (("1", "ema_decay must be in [0, 1), got 1.0"), ("nan", "--ema-decay")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--ema-decay", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        TrainConfig(ema_decay=1.0)
