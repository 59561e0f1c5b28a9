"""Training runs: what ``jaxrec train`` runs, as a Python API.

A DLRM, DCN-v2 or two-tower model on synthetic clicks, MovieLens-100K or a Criteo TSV file;
the tables trained by a fused sparse optimizer inside the backward pass, the dense layers by
Adam through :func:`jaxrec.optim.fused`; held-out metrics from :mod:`jaxrec.metrics` every
``eval_every`` steps; orbax checkpoints that resume to the same next step, data position
included; ``curves.png`` and ``metrics.json`` in ``out``.

>>> result = run_training(TrainConfig(steps=3, batch_size=32, num_tables=2, num_rows=100,
...                                   dim=8, eval_batches=1, log_every=1))
>>> len(result.losses), 0.0 <= result.eval_auc <= 1.0, result.planted_auc > 0.5
(3, True, True)
"""

from jaxrec.train.config import (
    BACKENDS,
    DATA_DEFAULTS,
    DATA_TYPES,
    DATASETS,
    EMBEDDING_OPTIMIZERS,
    HELP,
    LR_SCHEDULES,
    MODELS,
    TrainConfig,
)
from jaxrec.train.loop import TrainResult, initial_state, planted_auc, run_training
from jaxrec.train.models import build_model, loss_and_outputs, make_eval_step, make_train_step
from jaxrec.train.plots import plot_curves, write_outputs
from jaxrec.train.sources import Source, make_source

__all__ = [
    "BACKENDS",
    "DATASETS",
    "DATA_DEFAULTS",
    "DATA_TYPES",
    "EMBEDDING_OPTIMIZERS",
    "HELP",
    "LR_SCHEDULES",
    "MODELS",
    "Source",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "initial_state",
    "loss_and_outputs",
    "make_eval_step",
    "make_source",
    "make_train_step",
    "planted_auc",
    "plot_curves",
    "run_training",
    "write_outputs",
]
