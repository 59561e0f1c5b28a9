"""Pallas kernels of jaxrec (installed as ``jaxrec_kernels``), each beside its XLA reference.

- :mod:`~jaxrec_kernels.pooled_lookup`: pooled (SUM/MEAN, weighted) lookups of a stacked group.
- :mod:`~jaxrec_kernels.sequence_lookup`: one row per id (EmbeddingCollection).
- :mod:`~jaxrec_kernels.sparse_update`: the fused backward — duplicate-id reduction and a
  sparse optimizer applied to the touched rows in place — and the true sparse gradient.
"""

from jaxrec_kernels.pooled_lookup import (
    PooledConfig,
    default_pooled_config,
    pooled_lookup,
    pooled_lookup_reference,
)
from jaxrec_kernels.sequence_lookup import (
    SequenceConfig,
    default_sequence_config,
    sequence_lookup,
    sequence_lookup_reference,
)
from jaxrec_kernels.sparse_update import (
    POOLINGS,
    SparseUpdateConfig,
    default_update_config,
    fused_sparse_update,
    fused_sparse_update_reference,
    fused_update_from_row_gradients,
    sparse_row_gradients,
)

__all__ = [
    "POOLINGS",
    "PooledConfig",
    "SequenceConfig",
    "SparseUpdateConfig",
    "default_pooled_config",
    "default_sequence_config",
    "default_update_config",
    "fused_sparse_update",
    "fused_sparse_update_reference",
    "fused_update_from_row_gradients",
    "pooled_lookup",
    "pooled_lookup_reference",
    "sequence_lookup",
    "sequence_lookup_reference",
    "sparse_row_gradients",
]
