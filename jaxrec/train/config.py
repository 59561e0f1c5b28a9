"""What a training run is: :class:`TrainConfig` (``jaxrec train``'s flags have its names).

>>> TrainConfig(model="dcn", data="movielens").model
'dcn'
>>> TrainConfig(data="criteo")
Traceback (most recent call last):
...
ValueError: data 'criteo' needs data_path (the Criteo TSV file)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optax

from jaxrec import optim
from jaxrec.data.synthetic import SyntheticClickData

MODELS = ("dlrm", "dcn", "two-tower")
DATASETS = ("synthetic", "movielens", "criteo")
DATA_TYPES = ("FP32", "FP16", "BF16")
BACKENDS = ("auto", "pallas", "xla")
LR_SCHEDULES = ("constant", "cosine")
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

# The defaults ``data`` brings (``jaxrec train --data KIND`` and :meth:`TrainConfig.for_data`;
# a value given explicitly wins). MovieLens: chosen on a tuning split carved from the training
# split (BENCHMARKS.md, "Main job"); 785 steps are 5 epochs of the 80% split at batch 512.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "movielens": {
        "model": "dcn",
        "steps": 785,
        "eval_every": 157,
        "embedding_weight_decay": 1e-4,
        "ema_decay": 0.99,
    },
}

# What each field means; ``jaxrec train --help`` prints these.
HELP: dict[str, str] = {
    "model": "dlrm (dot interactions), dcn (DCN-v2 low-rank cross net) or two-tower "
    "(in-batch softmax retrieval, scored by recall@k)",
    "data": "synthetic (built-in clicks from a planted model), movielens (MovieLens-100K, "
    "rating >= 4, random 80/20 split) or criteo (a Criteo TSV file: pass its path)",
    "data_path": "synthetic: unused; movielens: folder of u.data/u.user/u.item or RecBole's "
    "ml-100k.* (default: the recbole wheel's copy); criteo: the TSV file (the first "
    "eval-batches batches are held out for evaluation)",
    "steps": "training steps (batches)",
    "batch_size": "examples per batch (the last partial batch is padded, weight 0)",
    "num_tables": "synthetic: sparse features, one table each",
    "num_rows": "synthetic: rows per table; criteo: hash size of every table",
    "dim": "embedding dimension (also the bottom MLP's output width)",
    "data_type": "storage type of the embedding tables",
    "embedding_optimizer": "sparse optimizer fused into the lookup's backward pass",
    "embedding_lr": "learning rate of the embedding optimizer",
    "embedding_weight_decay": "L2 weight decay of the embedding optimizer (FBGEMM's L2 mode; "
    "0: none)",
    "dense_lr": "learning rate of Adam on the dense layers",
    "lr_schedule": "constant, or cosine: both learning rates decay along a half cosine from "
    "their value to 0 at the last step",
    "rating_stats": "movielens: four more dense features read from the training split alone "
    "(each user's and item's smoothed share of other training ratings >= 4, and their count)",
    "user_history": "movielens: a sparse bag of the items the user rated in the training "
    "split (the example's own item left out), mean-pooled over its own table",
    "ema_decay": "evaluate an exponential moving average of the parameters, updated after "
    "every step with this decay (0: evaluate the parameters themselves)",
    "backend": "lookup backend: auto (Pallas on GPU, XLA elsewhere), pallas or xla",
    "eval_batches": "held-out batches per evaluation (synthetic, criteo); movielens "
    "evaluates on the whole 20%% split",
    "eval_every": "evaluate every this many steps (and after the last)",
    "log_every": "average the training loss over this many steps per progress update",
    "seed": "seed of the parameters, the synthetic data and the shuffling",
    "bottom_mlp": "hidden widths of the dense-feature MLP (dim is appended)",
    "top_mlp": "widths of the top MLP, ending in 1 (the click logit)",
    "tower_mlp": "two-tower: widths of each tower's MLP (the last is the embedding size)",
    "cross_layers": "dcn: layers of the low-rank cross network",
    "low_rank": "dcn: rank of each cross layer",
    "top_k": "two-tower: k of recall@k and NDCG@k over the in-batch candidates",
    "out": "folder for curves.png and metrics.json (created)",
    "checkpoint_dir": "folder of orbax checkpoints (params, optimizer state, data position)",
    "checkpoint_every": "save a checkpoint every this many steps (0: only after the last)",
    "resume": "continue from the latest checkpoint in checkpoint_dir",
}


@dataclass(frozen=True)
class TrainConfig:
    """What ``jaxrec train`` runs (its command-line flags have the same names; see ``HELP``)."""

    model: str = "dlrm"
    data: str = "synthetic"
    data_path: str | None = None
    steps: int = 1200
    batch_size: int = 512
    num_tables: int = 8
    num_rows: int = 1000
    dim: int = 16
    data_type: str = "FP32"
    embedding_optimizer: str = "exact_rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_weight_decay: float = 0.0
    dense_lr: float = 3e-3
    lr_schedule: str = "constant"
    rating_stats: bool = False
    user_history: bool = False
    ema_decay: float = 0.0
    backend: str = "auto"
    eval_batches: int = 16
    eval_every: int = 200
    log_every: int = 10
    seed: int = 0
    bottom_mlp: tuple[int, ...] = field(default=(64,))
    top_mlp: tuple[int, ...] = (64, 32, 1)
    tower_mlp: tuple[int, ...] = (64, 32)
    cross_layers: int = 3
    low_rank: int = 16
    top_k: int = 10
    out: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"unknown embedding_optimizer {self.embedding_optimizer!r}; "
                f"choose one of {sorted(EMBEDDING_OPTIMIZERS)}"
            )
        for name, allowed in (
            ("data_type", DATA_TYPES),
            ("backend", BACKENDS),
            ("lr_schedule", LR_SCHEDULES),
            ("model", MODELS),
            ("data", DATASETS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}"
                )
        if self.data == "criteo" and not self.data_path:
            raise ValueError("data 'criteo' needs data_path (the Criteo TSV file)")
        positive = ("steps", "batch_size", "num_tables", "num_rows", "dim")
        more = ("eval_batches", "eval_every", "log_every", "cross_layers", "low_rank", "top_k")
        for name in (*positive, *more):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir (where the checkpoints are)")
        for name in ("embedding_lr", "dense_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.embedding_weight_decay) and self.embedding_weight_decay >= 0):
            raise ValueError(
                f"embedding_weight_decay must be a finite number >= 0, got "
                f"{self.embedding_weight_decay}"
            )
        if not (math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("bottom_mlp", "top_mlp", "tower_mlp"):
            sizes = getattr(self, name)
            if not sizes or any(size <= 0 for size in sizes):
                raise ValueError(f"{name} must be one or more sizes >= 1, got {sizes}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1 (the click logit), got {self.top_mlp}")

    @classmethod
    def for_data(cls, data: str, **values: Any) -> TrainConfig:
        """A config for ``data`` with its :data:`DATA_DEFAULTS` under ``values``.

        >>> config = TrainConfig.for_data("movielens", seed=1)
        >>> config.model, config.steps, config.embedding_weight_decay, config.ema_decay
        ('dcn', 785, 0.0001, 0.99)
        """
        return cls(data=data, **{**DATA_DEFAULTS.get(data, {}), **values})

    def learning_rate(self, value: float) -> float | optax.Schedule:
        """``value`` under ``lr_schedule``: the float, or a cosine decay to 0 at ``steps``.

        >>> TrainConfig(steps=100, lr_schedule="cosine").learning_rate(0.1)(50)
        Array(0.05, dtype=float32, weak_type=True)
        """
        if self.lr_schedule == "cosine":
            return optax.cosine_decay_schedule(value, decay_steps=self.steps)
        return value

    def estimated_bytes(self) -> int:
        """About how much memory a synthetic run takes: tables, their optimizer state, the
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
