"""Parameter averaging (``ema_decay``): what it averages, what it evaluates, resuming."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrec.train import TrainConfig, make_source, run_training
from jaxrec.train.loop import initial_state
from jaxrec.train.models import make_eval_step

SMALL = dict(batch_size=64, num_tables=2, num_rows=100, dim=8, eval_batches=2, log_every=1)


def _float_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating)]


def test_ema_averages_every_step_and_evaluation_reads_the_average():
    config = TrainConfig(steps=2, eval_every=100, **SMALL)
    source = make_source(config)
    p0 = initial_state(config, source)[1]["params"]
    p1 = run_training(config, stop_after=1, source=source).state["params"]
    plain = run_training(config, source=source)
    averaged = run_training(dataclasses.replace(config, ema_decay=0.5), source=source)
    # training itself is unchanged by the average
    for a, b in zip(
        _float_leaves(plain.state["params"]), _float_leaves(averaged.state["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    expected = jax.tree.map(
        lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p1, plain.state["params"]
    )
    ema = averaged.state["ema"]
    for want, got in zip(_float_leaves(expected), _float_leaves(ema), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    init, step, finish = make_eval_step(initial_state(config, source)[0], config, 2)
    state = init
    for batch in source.eval_batches():
        state = step(ema, state, batch)
    assert finish(state) == averaged.final
    assert averaged.final["loss"] != plain.final["loss"]


def test_resume_with_ema_gives_a_bitwise_identical_next_step(tmp_path):
    config = TrainConfig(
        steps=4, eval_every=100, ema_decay=0.9, checkpoint_dir=str(tmp_path / "c"), **SMALL
    )
    straight = run_training(dataclasses.replace(config, checkpoint_dir=None))
    run_training(config, stop_after=2)
    resumed = run_training(dataclasses.replace(config, resume=True))
    assert resumed.start_step == 2 and resumed.final == straight.final
    for a, b in zip(jax.tree.leaves(straight.state["ema"]), jax.tree.leaves(resumed.state["ema"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a checkpoint with the average does not resume a run without one
    with pytest.raises(ValueError, match="ema"):
        run_training(dataclasses.replace(config, ema_decay=0.0, resume=True))
