"""Flax embedding collections with TorchRec's names and semantics."""

from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.modules.embedding_collection import EmbeddingCollection

__all__ = ["EmbeddingBagCollection", "EmbeddingCollection"]
