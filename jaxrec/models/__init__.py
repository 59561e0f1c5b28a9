"""Recommendation models built on the embedding collections: DLRM, DCN-v2, two-tower."""

from jaxrec.models.dcn import DCN, LowRankCrossNet
from jaxrec.models.dlrm import DLRM, MLP, dot_interactions, pooled_features
from jaxrec.models.two_tower import TwoTower, in_batch_scores, in_batch_softmax_loss

__all__ = [
    "DCN",
    "DLRM",
    "MLP",
    "LowRankCrossNet",
    "TwoTower",
    "dot_interactions",
    "in_batch_scores",
    "in_batch_softmax_loss",
    "pooled_features",
]
