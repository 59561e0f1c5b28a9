"""Functional table-batched lookups: static plans, backends, the custom VJP."""

from jaxrec.ops.backend import Backend, BoundsCheckMode, resolve_backend
from jaxrec.ops.lookup import GroupSpec, LookupSpec, lookup, sparse_gradients
from jaxrec.ops.plan import FeaturePlacement, GroupLayout, LookupPlan, TablePlacement, build_plan

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
