"""The options of a collection lookup, as one frozen value.

A collection's ``backend``, ``bounds_check_mode``, ``output_dtype`` and mesh axes
decide how its lookups run; :class:`LookupOptions` holds them, checked once, and
turns them into the keyword arguments of :meth:`jaxrec.ops.LookupSpec.create`.

>>> opts = LookupOptions(backend="xla", bounds_check_mode="ignore")
>>> opts.bounds_check_mode
<BoundsCheckMode.IGNORE: 'ignore'>
>>> sorted(opts.spec_arguments())
['backend', 'bounds_check', 'data_parallel_axis', 'out_dtype', 'row_shard_axis']
>>> LookupOptions(backend="cuda")
Traceback (most recent call last):
...
ValueError: backend must be one of ('auto', 'pallas', 'xla'), got 'cuda'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxrec.ops.backend import BoundsCheckMode, as_bounds_check_mode, resolve_backend
from jaxrec.ops.sharded import check_parallel_axes

__all__ = ["LookupOptions"]


@dataclasses.dataclass(frozen=True)
class LookupOptions:
    """How a collection's lookups run (static and hashable).

    Attributes:
      backend: ``"auto"`` (Pallas on GPU, XLA elsewhere), ``"pallas"`` or ``"xla"``.
      bounds_check_mode: what an id outside its table does inside ``jit``
        (:class:`~jaxrec.ops.BoundsCheckMode`, or its name).
      output_dtype: dtype of the lookup's output; ``None``: the tables' dtype.
      data_parallel_axis: the mesh axis of data-parallel replicas inside ``shard_map``.
      row_shard_axis: the mesh axis the tables' rows are split over inside ``shard_map``.
    """

    backend: str = "auto"
    bounds_check_mode: BoundsCheckMode | str = BoundsCheckMode.WARNING
    output_dtype: Any = jnp.float32
    data_parallel_axis: str | None = None
    row_shard_axis: str | None = None

    def __post_init__(self) -> None:
        resolve_backend(self.backend)
        mode = as_bounds_check_mode(self.bounds_check_mode)
        object.__setattr__(self, "bounds_check_mode", mode)  # frozen: normalise once
        check_parallel_axes(self.data_parallel_axis, self.row_shard_axis)

    def spec_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`~jaxrec.ops.LookupSpec.create` they mirror."""
        return {
            "bounds_check": self.bounds_check_mode,
            "backend": self.backend,
            "out_dtype": self.output_dtype,
            "data_parallel_axis": self.data_parallel_axis,
            "row_shard_axis": self.row_shard_axis,
        }
