"""Recommendation models built on the embedding collections."""

from jaxrec.models.dlrm import DLRM, MLP, dot_interactions

__all__ = ["DLRM", "MLP", "dot_interactions"]
