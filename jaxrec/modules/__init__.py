"""Flax embedding collections with TorchRec's names and semantics."""

from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.modules.embedding_collection import EmbeddingCollection
from jaxrec.modules.feature_processor import (
    FeatureProcessedEmbeddingBagCollection,
    PositionWeightedModule,
    PositionWeightedModuleCollection,
)

__all__ = [
    "EmbeddingBagCollection",
    "EmbeddingCollection",
    "FeatureProcessedEmbeddingBagCollection",
    "PositionWeightedModule",
    "PositionWeightedModuleCollection",
]
