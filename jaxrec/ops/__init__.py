"""Functional table-batched lookups: static plans and specs, backends, the custom VJP.

- :mod:`~jaxrec.ops.plan`: which tables stack into which group buffer (from the configs).
- :mod:`~jaxrec.ops.spec`: what one lookup's kernels need (:class:`LookupSpec`).
- :mod:`~jaxrec.ops.backend`: which implementation runs each operation; bounds-check modes.
- :mod:`~jaxrec.ops.lookup`: :func:`lookup` and its custom VJP (the fused update).
- :mod:`~jaxrec.ops.sharded`: row-sharded views of a lookup inside ``shard_map``.
- :mod:`~jaxrec.ops.bags`, :mod:`~jaxrec.ops.nonfinite`: bag checks, non-finite reports.
"""

from jaxrec.ops.backend import Backend, BoundsCheckMode, resolve_backend
from jaxrec.ops.lookup import lookup, sparse_gradients
from jaxrec.ops.plan import FeaturePlacement, GroupLayout, LookupPlan, TablePlacement, build_plan
from jaxrec.ops.spec import GroupSpec, LookupSpec

__all__ = [
    "Backend",
    "BoundsCheckMode",
    "FeaturePlacement",
    "GroupLayout",
    "GroupSpec",
    "LookupPlan",
    "LookupSpec",
    "TablePlacement",
    "build_plan",
    "lookup",
    "resolve_backend",
    "sparse_gradients",
]
