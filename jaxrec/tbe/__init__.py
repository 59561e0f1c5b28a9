"""FBGEMM's table-batched embedding operator for JAX: FBGEMM's names, explicit state.

>>> from jaxrec import tbe
>>> op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
...     [(10, 4, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CPU)],
...     optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.05)
>>> state = op.init()
>>> op.get_learning_rate(state), [w.shape for w in op.split_embedding_weights(state)]
(0.05000000074505806, [(10, 4)])
"""

from jaxrec.tbe.collection import collection_tbe, tbe_inputs
from jaxrec.tbe.enums import (
    BoundsCheckMode,
    CacheAlgorithm,
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    PoolingMode,
    SparseType,
    WeightDecayMode,
)
from jaxrec.tbe.int8 import dequantize_output, quantize_output
from jaxrec.tbe.managed import CachedTBE, Prefetched
from jaxrec.tbe.operator import SplitTableBatchedEmbeddingBagsCodegen
from jaxrec.tbe.pipeline import prefetch_pipeline
from jaxrec.tbe.state import TBEState

__all__ = [
    "BoundsCheckMode",
    "CacheAlgorithm",
    "CachedTBE",
    "ComputeDevice",
    "EmbeddingLocation",
    "OptimType",
    "PoolingMode",
    "Prefetched",
    "SparseType",
    "SplitTableBatchedEmbeddingBagsCodegen",
    "TBEState",
    "WeightDecayMode",
    "collection_tbe",
    "dequantize_output",
    "prefetch_pipeline",
    "quantize_output",
    "tbe_inputs",
]
