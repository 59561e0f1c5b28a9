"""Which implementation runs each operation of a lookup, and how bad ids are treated.

The choice is made here, once, per operation (:data:`Operation`): ``"auto"`` takes the
implementation measured fastest on a GPU (:data:`AUTO_ON_GPU`) and the pure-XLA path
elsewhere; ``backend="pallas"`` on a machine without a GPU runs the kernels in Pallas'
interpret mode, so they can be checked anywhere. :func:`kernel` hands out the function
that runs an operation under a resolved :class:`Backend`.

>>> resolve_backend("xla")
Backend(name='xla', interpret=False)
>>> kernel("sequence", resolve_backend("xla")).__name__
'sequence_lookup_reference'
>>> BoundsCheckMode("warning") is BoundsCheckMode.WARNING
True
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
from jaxrec_kernels.pooled_lookup import pooled_lookup, pooled_lookup_reference
from jaxrec_kernels.sequence_lookup import sequence_lookup, sequence_lookup_reference
from jaxrec_kernels.sparse_update import fused_sparse_update, fused_sparse_update_reference
from jaxrec_kernels.weight_gradient import weight_gradient, weight_gradient_reference

BACKENDS = ("auto", "pallas", "xla")

BackendName = Literal["pallas", "xla"]

Operation = Literal["pooled", "sequence", "update", "weight_gradient"]
"""The operations of a lookup: the pooled and sequence forwards, the fused sparse update
of the backward, and the gradient w.r.t. per-sample weights."""

AUTO_ON_GPU: dict[Operation, BackendName] = {
    # The pooled forward kernel reaches 79-82% of peak DRAM throughput on "large" fp32
    # (BENCHMARKS.md, "What limits the pooled forward").
    "pooled": "pallas",
    # The sequence kernel copies rows at 92.5-98.5% of the JAX copy bandwidth (runs 20 and
    # 30 on "large"), ahead of XLA's gather at 90.4% (2.15-2.23 ms against 1.97-2.08 ms;
    # BENCHMARKS.md, "Sequence lookups").
    "sequence": "pallas",
    # The fused backward and the weight gradient have no XLA path that updates in place
    # with one pass over the touched rows (BENCHMARKS.md, "Fused sparse backward").
    "update": "pallas",
    "weight_gradient": "pallas",
}

_IMPLEMENTATIONS: dict[Operation, tuple[Callable, Callable]] = {
    "pooled": (pooled_lookup, pooled_lookup_reference),
    "sequence": (sequence_lookup, sequence_lookup_reference),
    "update": (fused_sparse_update, fused_sparse_update_reference),
    "weight_gradient": (weight_gradient, weight_gradient_reference),
}


class BoundsCheckMode(enum.Enum):
    """What a lookup does with an id outside its table (FBGEMM's modes).

    - FATAL: the step fails. Eagerly a ValueError; inside ``jit`` a checkify
      error, so wrap the step in ``jax.experimental.checkify.checkify``.
    - WARNING: the id contributes a zero row and is counted; the count is
      returned (functional API) or sown into the ``"bounds_check"`` collection.
    - IGNORE: the id contributes a zero row, nothing is counted.
    - NONE: the id is not checked against its table: the forward reads stacked
      row ``clip(row_offset + id, 0, R - 1)`` of its group (for a bad id, a row
      of another table of the group, or the group's first or last row), never
      memory outside the stacked buffer, on every backend; nothing is counted,
      and the fused backward does not update a row for it.

    In every mode a bag of negative length, or ending past the values'
    capacity (a traced running sum that overflowed int32 included), is emptied
    before any kernel runs (``jaxrec.ops.bags``); FATAL raises on it and WARNING
    adds it to the same count as the bad ids. A traced id outside int32 (64-bit
    ids under ``jax_enable_x64``) becomes -1, a bad id, never another row. The
    fused update's non-finite guard reports skipped rows by the same mode
    (``jaxrec.ops.nonfinite``).
    """

    FATAL = "fatal"
    WARNING = "warning"
    IGNORE = "ignore"
    NONE = "none"


class Backend(NamedTuple):
    name: BackendName
    interpret: bool  # Pallas interpret mode (no GPU)


def resolve_backend(backend: str, operation: Operation = "pooled") -> Backend:
    """Turn ``"auto" | "pallas" | "xla"`` into the implementation that runs ``operation``.

    ``"auto"``: :data:`AUTO_ON_GPU` on a GPU, XLA elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if operation not in AUTO_ON_GPU:
        raise ValueError(f"operation must be one of {tuple(AUTO_ON_GPU)}, got {operation!r}")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        backend = AUTO_ON_GPU[operation] if on_gpu else "xla"
    if backend == "pallas":
        return Backend("pallas", interpret=not on_gpu)
    return Backend("xla", interpret=False)


@functools.cache
def kernel(operation: Operation, backend: Backend) -> Callable:
    """The function that runs ``operation`` under ``backend``: the Pallas kernel's entry
    point (with ``interpret`` bound) or its XLA reference; both take the same arguments."""
    pallas, reference = _IMPLEMENTATIONS[operation]
    if backend.name == "pallas":
        return functools.wraps(pallas)(functools.partial(pallas, interpret=backend.interpret))
    return reference


def as_bounds_check_mode(mode: BoundsCheckMode | str) -> BoundsCheckMode:
    """Accept the enum or its value (case-insensitive)."""
    if isinstance(mode, BoundsCheckMode):
        return mode
    try:
        return BoundsCheckMode(str(mode).lower())
    except ValueError:
        names = [m.name for m in BoundsCheckMode]
        raise ValueError(f"bounds_check_mode must be one of {names}, got {mode!r}") from None
