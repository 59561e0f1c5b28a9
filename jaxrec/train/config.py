"""A DLRM training run on the built-in synthetic click data.

The embedding tables are trained by a fused sparse optimizer inside the
backward pass; the dense layers by an optax optimizer through
:func:`jaxrec.optim.fused`. This is what ``jaxrec train`` runs.

>>> config = TrainConfig(steps=3, batch_size=32, num_tables=2, num_rows=100, dim=8,
...                      eval_batches=1, log_every=1)
>>> result = run_training(config)
>>> len(result.losses), 0.0 <= result.eval_auc <= 1.0
(3, True)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec import optim
from jaxrec.configs import DataType, EmbeddingBagConfig
from jaxrec.data.synthetic import Batch, SyntheticClickData
from jaxrec.models.dlrm import DLRM

DATA_TYPES = ("FP32", "FP16", "BF16")
BACKENDS = ("auto", "pallas", "xla")
EMBEDDING_OPTIMIZERS: dict[str, Callable[..., optim.SparseOptimizer]] = {
    "exact_sgd": optim.exact_sgd,
    "exact_adagrad": optim.exact_adagrad,
    "exact_rowwise_adagrad": optim.exact_rowwise_adagrad,
    "adam": optim.adam,
    "partial_rowwise_adam": optim.partial_rowwise_adam,
    "lamb": optim.lamb,
    "partial_rowwise_lamb": optim.partial_rowwise_lamb,
    "lars_sgd": optim.lars_sgd,
}


@dataclass(frozen=True)
class TrainConfig:
    """What ``jaxrec train`` runs (its command-line flags have the same names)."""

    steps: int = 300
    batch_size: int = 512
    num_tables: int = 8
    num_rows: int = 10_000
    dim: int = 16
    data_type: str = "FP32"
    embedding_optimizer: str = "exact_rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    backend: str = "auto"
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    bottom_mlp: tuple[int, ...] = field(default=(64,))
    top_mlp: tuple[int, ...] = (64, 32, 1)

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"unknown embedding_optimizer {self.embedding_optimizer!r}; "
                f"choose one of {sorted(EMBEDDING_OPTIMIZERS)}"
            )
        for name, allowed in (("data_type", DATA_TYPES), ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}"
                )
        positive = ("steps", "batch_size", "num_tables", "num_rows", "dim")
        for name in (*positive, "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("embedding_lr", "dense_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("bottom_mlp", "top_mlp"):
            sizes = getattr(self, name)
            if not sizes or any(size <= 0 for size in sizes):
                raise ValueError(f"{name} must be one or more sizes >= 1, got {sizes}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 (the click logit), got {self.top_mlp}")

    def estimated_bytes(self) -> int:
        """About how much memory a run takes: tables, their optimizer state, the
        synthetic data's hidden per-id scores, one batch and its activations.

        >>> TrainConfig(num_tables=2, num_rows=1000, dim=8).estimated_bytes() > 2 * 1000 * 8 * 4
        True
        """
        itemsize = {"FP32": 4, "FP16": 2, "BF16": 2}[self.data_type]
        rows = self.num_tables * self.num_rows
        optimizer = EMBEDDING_OPTIMIZERS[self.embedding_optimizer](learning_rate=self.embedding_lr)
        state_per_row = sum(leaf.nbytes for leaf in optimizer.init(1, self.dim).values())
        tables = rows * (self.dim * itemsize + state_per_row)
        hidden = rows * 8 + self.num_rows * 24  # float64 scores, ranks, popularity, cdf
        widest = max(self.dim, *self.bottom_mlp, *self.top_mlp)
        features = self.num_tables * SyntheticClickData.max_length
        batch = self.batch_size * (features * 4 + 4 * widest * (self.num_tables + 2) * 4)
        return tables + hidden + batch


@dataclass
class TrainResult:
    losses: list[float]  # mean training loss of each logging window
    accuracies: list[float]  # mean training accuracy of each logging window
    eval_loss: float
    eval_auc: float
    examples_per_second: float


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney rank statistic; ties averaged).

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    labels = np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average_rank, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def build_model(config: TrainConfig) -> tuple[DLRM, SyntheticClickData]:
    data = SyntheticClickData(
        num_features=config.num_tables, num_rows=config.num_rows, seed=config.seed
    )
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}",
            embedding_dim=config.dim,
            num_embeddings=config.num_rows,
            feature_names=[name],
            data_type=DataType[config.data_type],
        )
        for i, name in enumerate(data.feature_names)
    ]
    optimizer = EMBEDDING_OPTIMIZERS[config.embedding_optimizer](learning_rate=config.embedding_lr)
    model = DLRM(
        tables=tables,
        bottom_mlp=(*config.bottom_mlp, config.dim),
        top_mlp=config.top_mlp,
        optimizer=optimizer,
        backend=config.backend,
    )
    return model, data


def _loss(model: DLRM, params, batch: Batch):
    logits = model.apply({"params": params}, batch.dense, batch.sparse)
    loss = optax.sigmoid_binary_cross_entropy(logits, batch.labels).mean()
    return loss, logits


def make_train_step(model: DLRM, tx: optax.GradientTransformation):
    """A jitted step ``(params, opt_state, batch) -> (params, opt_state, loss, accuracy)``.

    Params and optimizer state are donated: the tables are updated in place.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch: Batch):
        (loss, logits), grads = jax.value_and_grad(functools.partial(_loss, model), has_aux=True)(
            params, batch
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        accuracy = jnp.mean((logits > 0) == (batch.labels > 0.5))
        return params, opt_state, loss, accuracy

    return step


def run_training(
    config: TrainConfig, progress: Callable[[int, dict[str, float]], None] | None = None
) -> TrainResult:
    """Train for ``config.steps`` steps, then evaluate on held-out batches."""
    model, data = build_model(config)
    first = data.batch(config.batch_size, 0)
    params = model.init(jax.random.key(config.seed), first.dense, first.sparse)["params"]
    tx = optim.fused(optax.adam(config.dense_lr))
    opt_state = tx.init(params)
    step = make_train_step(model, tx)
    losses, accuracies = [], []
    window_loss, window_accuracy, window = jnp.zeros(()), jnp.zeros(()), 0
    start = time.perf_counter()
    for i in range(config.steps):
        batch = data.batch(config.batch_size, i)
        params, opt_state, loss, accuracy = step(params, opt_state, batch)
        # Summed on the device; read back (a host sync) only when a window closes.
        window_loss, window_accuracy, window = (
            window_loss + loss,
            window_accuracy + accuracy,
            window + 1,
        )
        if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
            losses.append(float(window_loss) / window)
            accuracies.append(float(window_accuracy) / window)
            window_loss, window_accuracy, window = jnp.zeros(()), jnp.zeros(()), 0
            if progress is not None:
                progress(i + 1, {"loss": losses[-1], "accuracy": accuracies[-1]})
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - start

    evaluate = jax.jit(functools.partial(_loss, model))
    eval_losses, labels, scores = [], [], []
    for j in range(config.eval_batches):
        batch = data.batch(config.batch_size, 1_000_000 + j)
        loss, logits = evaluate(params, batch)
        eval_losses.append(float(loss))
        labels.append(np.asarray(batch.labels))
        scores.append(np.asarray(logits))
    return TrainResult(
        losses=losses,
        accuracies=accuracies,
        eval_loss=float(np.mean(eval_losses)) if eval_losses else float("nan"),
        eval_auc=auc(np.concatenate(labels), np.concatenate(scores)) if labels else float("nan"),
        examples_per_second=config.steps * config.batch_size / elapsed,
    )
