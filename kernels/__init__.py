"""Pallas kernels of jaxrec (installed as ``jaxrec_kernels``), each beside its XLA reference.

- :mod:`~jaxrec_kernels.layout`: what every group kernel shares: the per-feature
  :class:`~jaxrec_kernels.layout.FeatureLayout`, bag positions, bounds-check modes.
- :mod:`~jaxrec_kernels.pooled_lookup`: pooled (SUM/MEAN, weighted) lookups of a stacked group.
- :mod:`~jaxrec_kernels.quantized_lookup`: pooled lookups of row-wise quantized (int8/int4/int2)
  groups, dequantized in the kernel; :mod:`~jaxrec_kernels.rowwise_quantization`: FBGEMM's
  fused row-wise layouts.
- :mod:`~jaxrec_kernels.sequence_lookup`: one row per id (EmbeddingCollection).
- :mod:`~jaxrec_kernels.sparse_update`: the fused backward — duplicate-id reduction and a
  sparse optimizer applied to the touched rows in place; its steps:
  :mod:`~jaxrec_kernels.row_gradients` (ids to sorted rows, the true sparse gradient),
  :mod:`~jaxrec_kernels.run_chunks` (hot rows' long runs summed in chunks by many programs)
  and :mod:`~jaxrec_kernels.row_update` (the optimizer step on the touched rows).
- :mod:`~jaxrec_kernels.weight_gradient`: the gradient of a pooled lookup w.r.t. its
  per-sample weights.
"""

from jaxrec_kernels.layout import FeatureLayout
from jaxrec_kernels.pooled_lookup import (
    PooledConfig,
    default_pooled_config,
    pooled_lookup,
    pooled_lookup_reference,
)
from jaxrec_kernels.quantized_lookup import (
    default_quantized_config,
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.row_gradients import POOLINGS, sparse_row_gradients
from jaxrec_kernels.row_update import RowOptimizer, fused_update_from_row_gradients
from jaxrec_kernels.rowwise_quantization import dequantize_rows, quantize_rows, row_bytes
from jaxrec_kernels.sequence_lookup import (
    SequenceConfig,
    default_sequence_config,
    sequence_lookup,
    sequence_lookup_reference,
)
from jaxrec_kernels.sparse_update import (
    SparseUpdateConfig,
    default_update_config,
    fused_sparse_update,
    fused_sparse_update_reference,
)
from jaxrec_kernels.weight_gradient import (
    WeightGradientConfig,
    default_weight_gradient_config,
    weight_gradient,
    weight_gradient_reference,
)

__all__ = [
    "POOLINGS",
    "FeatureLayout",
    "PooledConfig",
    "RowOptimizer",
    "SequenceConfig",
    "SparseUpdateConfig",
    "WeightGradientConfig",
    "default_pooled_config",
    "default_quantized_config",
    "default_sequence_config",
    "default_update_config",
    "default_weight_gradient_config",
    "dequantize_rows",
    "fused_sparse_update",
    "fused_sparse_update_reference",
    "fused_update_from_row_gradients",
    "pooled_lookup",
    "pooled_lookup_reference",
    "quantize_rows",
    "quantized_pooled_lookup",
    "quantized_pooled_lookup_reference",
    "row_bytes",
    "sequence_lookup",
    "sequence_lookup_reference",
    "sparse_row_gradients",
    "weight_gradient",
    "weight_gradient_reference",
]
