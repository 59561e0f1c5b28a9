"""The training loop: steps, periodic evaluation, checkpoints, curves.

>>> config = TrainConfig(steps=4, batch_size=32, num_tables=2, num_rows=100, dim=8,
...                      eval_batches=1, eval_every=2, log_every=2)
>>> result = run_training(config)
>>> result.loss_steps, result.eval_steps, 0.0 <= result.final["auc"] <= 1.0
([2, 4], [2, 4], True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import optim
from jaxrec.data.batching import prefetch
from jaxrec.metrics import functional
from jaxrec.train.config import TrainConfig
from jaxrec.train.models import build_model, collection, make_eval_step, make_train_step
from jaxrec.train.sources import Source, make_source

Progress = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What a run learned: training-loss curve, held-out metrics at each evaluation."""

    description: str
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean training loss per log window
    eval_steps: list[int] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    planted_auc: float | None = None  # the planted model's AUC on the eval data (synthetic)
    examples_per_second: float = float("nan")  # training steps after the first log window
    start_step: int = 0  # > 0 when resumed from a checkpoint
    state: Any = field(default=None, repr=False)  # the trained params and optimizer state

    @property
    def final(self) -> dict[str, float]:
        """The last evaluation's metrics."""
        return self.evals[-1] if self.evals else {}

    @property
    def eval_auc(self) -> float:
        return self.final.get("auc", float("nan"))

    @property
    def eval_loss(self) -> float:
        return self.final.get("loss", float("nan"))


def planted_auc(source: Source) -> float | None:
    """AUC of the planted model's logits on ``source``'s eval examples (None without one)."""
    planted = source.planted_logits()
    if planted is None:
        return None
    batches = source.eval_batches()
    labels = np.concatenate([np.asarray(b.labels) for b in batches])
    weights = np.concatenate([np.asarray(b.weights) for b in batches])
    return float(functional.auc(jnp.asarray(planted), jnp.asarray(labels), jnp.asarray(weights)))


def initial_state(config: TrainConfig, source: Source) -> tuple[Any, dict[str, Any], Any]:
    """``(model, {"params", "opt_state"}, tx)`` before the first step (seeded by ``config``);
    with ``config.ema_decay`` the state also holds ``"ema"``, the averaged parameters."""
    model = build_model(config, source)
    first = source.train_batch(0)
    params = model.init(jax.random.key(config.seed), first.dense, first.sparse)["params"]
    tx = optim.fused(optax.adam(config.learning_rate(config.dense_lr)))
    state = {"params": params, "opt_state": tx.init(params)}
    if config.ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)  # params are donated to the step
    return model, state, tx


def make_ema_step(decay: float) -> Callable[[Any, Any], Any]:
    """A jitted ``(ema, params) -> decay * ema + (1 - decay) * params`` (``ema`` donated).

    >>> step = make_ema_step(0.75)
    >>> step({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})["w"].tolist()
    [0.25, 0.25]
    """
    return jax.jit(
        lambda ema, params: optax.incremental_update(params, ema, step_size=1.0 - decay),
        donate_argnums=(0,),
    )


def _run_key(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to resume (the data and the shapes of the state)."""
    keys = ("model", "data", "batch_size", "num_tables", "num_rows", "dim", "seed")
    key = {k: getattr(config, k) for k in (*keys, "rating_stats", "user_history")}
    return {**key, "ema": config.ema_decay > 0}


def _layouts(config: TrainConfig, source: Source) -> list:
    from jaxrec.checkpoint import TableLayout

    return [TableLayout.single("params/sparse_arch/embedding_bags", collection(config, source))]


def resume(manager: Any, config: TrainConfig, source: Source, state: dict) -> tuple[dict, int]:
    """The latest checkpoint's state and its step; ``ValueError`` if it is another run's."""
    restored = manager.restore(state, _layouts(config, source))
    extra = restored.extra or {}
    if extra.get("run") != _run_key(config):
        raise ValueError(
            f"the checkpoint in {config.checkpoint_dir} is of another run ({extra.get('run')}); "
            f"this one is {_run_key(config)}"
        )
    if extra.get("data") != source.position(restored.step):
        raise ValueError(
            f"the checkpoint's data position {extra.get('data')} is not where step "
            f"{restored.step} reads ({source.position(restored.step)})"
        )
    return restored.state, restored.step


def run_training(
    config: TrainConfig,
    progress: Progress | None = None,
    source: Source | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config.steps`` steps (from the latest checkpoint with ``config.resume``),
    evaluating every ``config.eval_every`` steps and after the last; save checkpoints and
    ``curves.png`` / ``metrics.json`` as the config asks.

    ``progress(step, values)`` is called after each log window (``loss``, ``examples_per_s``)
    and each evaluation (``eval_*``). ``stop_after`` ends the run early after that many steps
    (a checkpoint is saved there), as an interrupted run would.
    """
    source = make_source(config) if source is None else source
    model, state, tx = initial_state(config, source)
    result = TrainResult(description=source.description, planted_auc=planted_auc(source))
    manager = None
    if config.checkpoint_dir:
        from jaxrec.checkpoint import CheckpointManager

        manager = CheckpointManager(config.checkpoint_dir, max_to_keep=2)
    start = 0
    if config.resume and manager is not None and manager.latest_step() is not None:
        state, start = resume(manager, config, source, state)
    result.start_step = start
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    train_step = make_train_step(model, tx)
    ema_step = make_ema_step(config.ema_decay) if "ema" in state else None
    eval_batches = source.eval_batches()
    eval_init, eval_step, eval_finish = make_eval_step(model, config, len(eval_batches))

    def evaluate(step: int) -> None:
        metric_state = eval_init
        evaluated = state.get("ema", state["params"])
        for batch in eval_batches:
            metric_state = eval_step(evaluated, metric_state, batch)
        result.eval_steps.append(step)
        result.evals.append(eval_finish(metric_state))
        if progress is not None:
            progress(step, {f"eval_{k}": v for k, v in result.final.items()})

    def save(step: int) -> None:
        extra = {"run": _run_key(config), "data": source.position(step)}
        manager.save(step, state, _layouts(config, source), extra=extra)

    params, opt_state, ema = state["params"], state["opt_state"], state.get("ema")
    window_loss, window = jnp.zeros(()), 0
    window_began = time.perf_counter()
    timed_steps, timed_seconds = 0, 0.0  # after the first window (which compiles)
    with prefetch(source.train_batches(start), size=2) as batches:
        for step in range(start + 1, end + 1):
            params, opt_state, loss = train_step(params, opt_state, next(batches))
            if ema_step is not None:
                ema = ema_step(ema, params)
            window_loss, window = window_loss + loss, window + 1  # read back once per window
            if step % config.log_every == 0 or step == end:
                result.loss_steps.append(step)
                result.losses.append(float(window_loss) / window)
                seconds = time.perf_counter() - window_began
                if len(result.loss_steps) > 1:
                    timed_steps, timed_seconds = timed_steps + window, timed_seconds + seconds
                if progress is not None:
                    rate = window * config.batch_size / seconds
                    progress(step, {"loss": result.losses[-1], "examples_per_s": rate})
                window_loss, window = jnp.zeros(()), 0
            state = {"params": params, "opt_state": opt_state}
            if ema is not None:
                state["ema"] = ema
            if step % config.eval_every == 0 or step == end:
                evaluate(step)
            if manager is not None and (
                step == end or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                save(step)
            if window == 0:  # evaluation and saving are not training time
                window_began = time.perf_counter()
    jax.block_until_ready(params)
    if timed_steps:
        result.examples_per_second = timed_steps * config.batch_size / timed_seconds
    if manager is not None:
        manager.close()
    result.state = state
    if config.out:
        from jaxrec.train.plots import write_outputs

        write_outputs(result, config)
    return result
