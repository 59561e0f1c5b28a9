"""Placing embedding collections across devices.

Row-wise sharding of the stacked tables over a mesh axis (:func:`shard_rows`), run by
XLA's SPMD partitioner under ``jax.jit``; data-parallel replicas are the collections'
``data_parallel_axis`` inside ``shard_map``.
"""

from jaxrec.parallel.row_sharding import row_shardings, shard_rows

__all__ = ["row_shardings", "shard_rows"]
