"""The model, loss and jitted steps of a training run.

Every loss weighs examples by ``batch.weights`` (padded rows weigh 0): ``(l * w).sum() / w.sum()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrec import metrics, optim
from jaxrec.data.synthetic import Batch
from jaxrec.models import DCN, DLRM, TwoTower, in_batch_scores, in_batch_softmax_loss
from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.train.config import EMBEDDING_OPTIMIZERS, TrainConfig
from jaxrec.train.sources import Source


def sparse_optimizer(config: TrainConfig) -> optim.SparseOptimizer:
    """The fused embedding optimizer of ``config`` (L2 weight decay when it is > 0)."""
    make = EMBEDDING_OPTIMIZERS[config.embedding_optimizer]
    lr = config.learning_rate(config.embedding_lr)
    if config.embedding_weight_decay > 0:
        return make(
            learning_rate=lr,
            weight_decay=config.embedding_weight_decay,
            weight_decay_mode="L2",
        )
    return make(learning_rate=lr)


def build_model(config: TrainConfig, source: Source) -> Any:
    """The Flax model ``config.model`` names, over ``source``'s tables."""
    tables = source.tables(config)
    common = dict(tables=tables, optimizer=sparse_optimizer(config), backend=config.backend)
    if config.model == "two-tower":
        return TwoTower(
            query_features=source.query_features,
            candidate_features=source.candidate_features,
            tower_mlp=config.tower_mlp,
            **common,
        )
    bottom = (*config.bottom_mlp, config.dim)
    if config.model == "dcn":
        return DCN(
            bottom_mlp=bottom,
            top_mlp=config.top_mlp,
            cross_layers=config.cross_layers,
            low_rank=config.low_rank,
            **common,
        )
    return DLRM(bottom_mlp=bottom, top_mlp=config.top_mlp, **common)


def collection(config: TrainConfig, source: Source) -> EmbeddingBagCollection:
    """The model's EmbeddingBagCollection as a standalone module (for checkpoint layouts)."""
    return EmbeddingBagCollection(
        tables=source.tables(config), optimizer=sparse_optimizer(config), backend=config.backend
    )


def _weights(batch: Batch) -> jax.Array:
    return jnp.ones_like(batch.labels) if batch.weights is None else batch.weights


def loss_and_outputs(model: Any, params: Any, batch: Batch) -> tuple[jax.Array, Any]:
    """The weighted mean loss and the model's outputs (logits, or the two towers)."""
    w = _weights(batch)
    out = model.apply({"params": params}, batch.dense, batch.sparse)
    if isinstance(model, TwoTower):
        return in_batch_softmax_loss(*out, batch.labels, w), out
    ce = optax.sigmoid_binary_cross_entropy(out, batch.labels)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1e-12), out


def make_train_step(model: Any, tx: optax.GradientTransformation) -> Callable:
    """A jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    Params and optimizer state are donated: the tables are updated in place.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch: Batch):
        (loss, _), grads = jax.value_and_grad(
            functools.partial(loss_and_outputs, model), has_aux=True
        )(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, loss

    return step


def eval_metrics(config: TrainConfig, num_batches: int) -> metrics.RecMetric:
    """The held-out metrics: AUC, NE, log loss, calibration, accuracy (click models); AUC of
    the pair score, recall@k and NDCG@k over the in-batch candidates (two-tower)."""
    exact_auc = metrics.auc(window_batches=1, lifetime_capacity=num_batches * config.batch_size)
    if config.model == "two-tower":
        return metrics.combine(exact_auc)
    return metrics.combine(
        exact_auc,
        metrics.ne(window_batches=1),
        metrics.log_loss(window_batches=1),
        metrics.calibration(window_batches=1),
        metrics.accuracy(window_batches=1),
    )


def make_eval_step(
    model: Any, config: TrainConfig, num_batches: int
) -> tuple[Any, Callable, Callable[[Any], dict[str, float]]]:
    """``(init_state, step, finish)``: ``step(params, state, batch) -> state`` (jitted) folds
    one held-out batch into the metric states and the weighted loss sums; ``finish(state)``
    gives the lifetime metrics and ``loss``."""
    click = eval_metrics(config, num_batches)
    retrieval = metrics.combine(
        metrics.recall_at_k(config.top_k, window_batches=1),
        metrics.ndcg_at_k(config.top_k, window_batches=1),
    )
    two_tower = config.model == "two-tower"
    init = (
        click.init(batch_size=config.batch_size),
        retrieval.init() if two_tower else (),
        jnp.zeros(2),
    )

    @jax.jit
    def step(params, state, batch: Batch):
        click_state, retrieval_state, sums = state
        w = _weights(batch)
        loss, out = loss_and_outputs(model, params, batch)
        if two_tower:
            scores, relevance = in_batch_scores(*out, batch.labels, w)
            retrieval_state = retrieval.update(
                retrieval_state, scores, relevance, w * (batch.labels > 0.5)
            )
            logits = jnp.sum(out[0] * out[1], axis=1)
        else:
            logits = out
        click_state = click.update(click_state, jax.nn.sigmoid(logits), batch.labels, w)
        return click_state, retrieval_state, sums + jnp.stack([loss * w.sum(), w.sum()])

    def finish(state) -> dict[str, float]:
        click_state, retrieval_state, sums = state
        values = dict(click.compute(click_state))
        if two_tower:
            values.update(retrieval.compute(retrieval_state))
        out = {k[len("lifetime_") :]: float(v) for k, v in values.items() if "lifetime_" in k}
        out["loss"] = float(sums[0] / sums[1])
        return out

    return (init, step, finish)
