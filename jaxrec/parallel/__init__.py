"""Placing embedding collections across devices.

Row-wise sharding of the stacked tables over a mesh axis: placements (:func:`shard_rows`,
:func:`row_shardings`, :func:`row_partition_specs`) for XLA's SPMD partitioner under
``jax.jit``, or for ``jax.shard_map`` with the collections' ``row_shard_axis``;
data-parallel replicas are the collections' ``data_parallel_axis`` inside ``shard_map``.
With the batch split over devices: sharding types and plans (:mod:`~jaxrec.parallel.types`),
the per-device shard layout, the sharded lookup and the params conversion.
"""

from jaxrec.parallel.convert import TableState, partition_specs, shard_params, unshard_params
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.model_parallel import DistributedModelParallel
from jaxrec.parallel.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    PlanReport,
    Topology,
)
from jaxrec.parallel.row_sharding import row_partition_specs, row_shardings, shard_rows
from jaxrec.parallel.sharded_lookup import ShardedLookupSpec, sharded_lookup
from jaxrec.parallel.types import (
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
    column_wise,
    data_parallel,
    row_wise,
    table_column_wise,
    table_row_wise,
    table_wise,
)

__all__ = [
    "DistributedModelParallel",
    "EmbeddingShardingPlanner",
    "ParameterConstraints",
    "PlanReport",
    "Topology",
    "ParameterSharding",
    "ShardMetadata",
    "ShardedLayout",
    "ShardedLookupSpec",
    "ShardingPlan",
    "ShardingType",
    "TableState",
    "column_wise",
    "data_parallel",
    "partition_specs",
    "row_partition_specs",
    "row_shardings",
    "row_wise",
    "shard_params",
    "shard_rows",
    "sharded_lookup",
    "table_column_wise",
    "table_row_wise",
    "table_wise",
    "unshard_params",
]
