"""Recommendation metrics in JAX, windowed and lifetime as TorchRec's RecMetrics keep them.

Stateful metrics (:class:`RecMetric`: ``init`` / ``update`` / ``compute``, usable inside a
jitted step): :func:`ne`, :func:`auc`, :func:`calibration`, :func:`log_loss`,
:func:`accuracy`, :func:`mse`, :func:`recall_at_k`, :func:`ndcg_at_k`, and :func:`combine`.
The formulas on one set of predictions are in :mod:`jaxrec.metrics.functional`.
"""

from jaxrec.metrics import functional
from jaxrec.metrics.rec_metrics import (
    AUCState,
    RecMetric,
    SumState,
    accuracy,
    auc,
    calibration,
    combine,
    log_loss,
    mse,
    ndcg_at_k,
    ne,
    recall_at_k,
)

__all__ = [
    "AUCState",
    "RecMetric",
    "SumState",
    "accuracy",
    "auc",
    "calibration",
    "combine",
    "functional",
    "log_loss",
    "mse",
    "ndcg_at_k",
    "ne",
    "recall_at_k",
]
