"""jaxrec: TorchRec's embedding collections and FBGEMM's table-batched embeddings for JAX.

>>> import jaxrec
>>> sorted(n for n in jaxrec.__all__ if n.startswith("Embedding"))  # doctest: +NORMALIZE_WHITESPACE
['EmbeddingBagCollection', 'EmbeddingBagConfig', 'EmbeddingCollection',
 'EmbeddingComputeKernel', 'EmbeddingConfig']
"""

from jaxrec import metrics, optim, parallel, quant, tbe
from jaxrec.configs import (
    BaseEmbeddingConfig,
    DataType,
    EmbeddingBagConfig,
    EmbeddingComputeKernel,
    EmbeddingConfig,
    PoolingType,
)
from jaxrec.modules import (
    EmbeddingBagCollection,
    EmbeddingCollection,
    FeatureProcessedEmbeddingBagCollection,
    PositionWeightedModule,
    PositionWeightedModuleCollection,
)
from jaxrec.ops import BoundsCheckMode
from jaxrec.sparse import (
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedTensor,
    capacity_bucket,
    pad_to_capacity,
)

__version__ = "0.1.0"

__all__ = [
    "BaseEmbeddingConfig",
    "BoundsCheckMode",
    "DataType",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingComputeKernel",
    "EmbeddingConfig",
    "FeatureProcessedEmbeddingBagCollection",
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "PoolingType",
    "PositionWeightedModule",
    "PositionWeightedModuleCollection",
    "capacity_bucket",
    "metrics",
    "optim",
    "pad_to_capacity",
    "quant",
    "parallel",
    "tbe",
]
