"""A collection's tables on FBGEMM's operator, each placed by its ``compute_kernel``.

TorchRec places a table in host memory by its compute kernel (``FUSED_UVM`` /
``FUSED_UVM_CACHING``). Here a collection's table configs build one
:class:`~jaxrec.tbe.SplitTableBatchedEmbeddingBagsCodegen` whose features are the
collection's, in its output order (tables in order, each table's features in order), and
whose tables are placed as their configs say (``FUSED``: ``DEVICE``; ``FUSED_UVM``:
``MANAGED``; ``FUSED_UVM_CACHING``: ``MANAGED_CACHING``). Wrapped in
:class:`~jaxrec.tbe.CachedTBE` it trains the host tables through the same cache as any
TBE, and its pooled output equals the collection's ``KeyedTensor.values()`` (the same
lookup, the same fused update: a cached table trains bit for bit as in device memory).
:func:`tbe_inputs` turns a ``KeyedJaggedTensor`` into the operator's ``indices`` and
``offsets``.

>>> import numpy as np
>>> from jaxrec import EmbeddingBagConfig, EmbeddingComputeKernel, KeyedJaggedTensor
>>> tables = [
...     EmbeddingBagConfig(name="big", embedding_dim=4, num_embeddings=100, feature_names=["f"],
...                        compute_kernel=EmbeddingComputeKernel.FUSED_UVM_CACHING),
...     EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=10, feature_names=["g"]),
... ]
>>> op, keys = collection_tbe(tables, cache_load_factor=0.2)
>>> keys, [spec[2].name for spec in op.embedding_specs]
(('f', 'g'), ['MANAGED_CACHING', 'DEVICE'])
>>> kjt = KeyedJaggedTensor(keys=["g", "f"], values=np.array([1, 2, 3]), lengths=np.array([1, 0, 2, 0]))
>>> indices, offsets = tbe_inputs(kjt, keys)
>>> indices.tolist(), offsets.tolist()
([2, 3, 1], [0, 2, 2, 3, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrec.configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingComputeKernel,
)
from jaxrec.sparse import KeyedJaggedTensor
from jaxrec.tbe.enums import ComputeDevice, EmbeddingLocation, PoolingMode, SparseType
from jaxrec.tbe.operator import SplitTableBatchedEmbeddingBagsCodegen

__all__ = ["collection_tbe", "tbe_inputs", "LOCATIONS"]

#: The TBE placement of each compute kernel.
LOCATIONS = {
    EmbeddingComputeKernel.FUSED: EmbeddingLocation.DEVICE,
    EmbeddingComputeKernel.FUSED_UVM: EmbeddingLocation.MANAGED,
    EmbeddingComputeKernel.FUSED_UVM_CACHING: EmbeddingLocation.MANAGED_CACHING,
}


def collection_tbe(
    tables: Sequence[BaseEmbeddingConfig], **kwargs: Any
) -> tuple[SplitTableBatchedEmbeddingBagsCodegen, tuple[str, ...]]:
    """FBGEMM's operator for a collection's ``tables`` and its features' names, in order.

    Args:
      tables: the collection's configs: ``EmbeddingBagConfig`` of one pooling (the operator
        has one ``pooling_mode``) or ``EmbeddingConfig`` (``PoolingMode.NONE``), one data
        type; each placed by its ``compute_kernel``.
      **kwargs: the operator's arguments (optimizer, learning rate, cache options, ...).

    Returns:
      ``(op, keys)``: the operator and the KJT keys of its features (a key looked up by
      several tables appears once per table), for :func:`tbe_inputs`.
    """
    tables = list(tables)
    if not tables or not all(isinstance(t, BaseEmbeddingConfig) for t in tables):
        raise ValueError(f"collection_tbe takes a non-empty list of table configs, got {tables!r}")
    poolings = {t.pooling.name if isinstance(t, EmbeddingBagConfig) else "NONE" for t in tables}
    data_types = {t.data_type for t in tables}
    if len(poolings) > 1 or len(data_types) > 1:
        raise ValueError(
            f"one TBE has one pooling and one precision; these tables have poolings "
            f"{sorted(poolings)} and data types {sorted(d.name for d in data_types)}: "
            "split them into several collection_tbe calls"
        )
    for key in ("embedding_specs", "feature_table_map", "pooling_mode", "weights_precision"):
        if key in kwargs:
            raise ValueError(f"collection_tbe takes {key} from the table configs, not as {key}=")
    specs, feature_table_map, keys = [], [], []
    for t, table in enumerate(tables):
        location = LOCATIONS[table.compute_kernel]
        specs.append((table.num_embeddings, table.embedding_dim, location, ComputeDevice.CUDA))
        for feature in table.feature_names:
            feature_table_map.append(t)
            keys.append(feature)
    op = SplitTableBatchedEmbeddingBagsCodegen(
        specs,
        feature_table_map=feature_table_map,
        pooling_mode=PoolingMode[poolings.pop()],
        weights_precision=SparseType[data_types.pop().name],
        **kwargs,
    )
    return op, tuple(keys)


def tbe_inputs(kjt: KeyedJaggedTensor, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, offsets)`` of ``kjt``'s features ``keys``, in that order (host arrays)."""
    lengths = np.asarray(kjt.lengths()).reshape(len(kjt.keys()), -1)
    values = np.asarray(kjt.values())
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    index = kjt.index_per_key()
    missing = [key for key in keys if key not in index]
    if missing:
        raise ValueError(f"the KJT has no feature {missing}; it has {kjt.keys()}")
    rows = [index[key] for key in keys]
    indices = np.concatenate([values[starts[k] : starts[k + 1]] for k in rows])
    offsets = np.concatenate([[0], np.cumsum(lengths[rows].reshape(-1))])
    return indices.astype(np.int32), offsets.astype(np.int32)
