"""Placing embedding collections across devices.

Row-wise sharding of the stacked tables over a mesh axis: placements (:func:`shard_rows`,
:func:`row_shardings`, :func:`row_partition_specs`) for XLA's SPMD partitioner under
``jax.jit``, or for ``jax.shard_map`` with the collections' ``row_shard_axis``;
data-parallel replicas are the collections' ``data_parallel_axis`` inside ``shard_map``.
"""

from jaxrec.parallel.row_sharding import row_partition_specs, row_shardings, shard_rows

__all__ = ["row_partition_specs", "row_shardings", "shard_rows"]
