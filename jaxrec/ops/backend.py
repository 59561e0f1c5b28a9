"""Which implementation runs a lookup, and how bad ids are treated.

On a GPU the Pallas kernels are the default (lookups and the fused backward);
elsewhere the pure-XLA path is. ``backend="pallas"`` on a machine without a GPU
runs the kernels in Pallas' interpret mode, so they can be checked anywhere.

>>> resolve_backend("xla")
Backend(name='xla', interpret=False)
>>> BoundsCheckMode("warning") is BoundsCheckMode.WARNING
True
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax

BACKENDS = ("auto", "pallas", "xla")


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
    name: str  # "pallas" or "xla"
    interpret: bool  # Pallas interpret mode (no GPU)


def resolve_backend(backend: str) -> Backend:
    """Turn ``"auto" | "pallas" | "xla"`` into the implementation that runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        backend = "pallas" if on_gpu else "xla"
    if backend == "pallas":
        return Backend("pallas", interpret=not on_gpu)
    return Backend("xla", interpret=False)


def as_bounds_check_mode(mode: BoundsCheckMode | str) -> BoundsCheckMode:
    """Accept the enum or its value (case-insensitive)."""
    if isinstance(mode, BoundsCheckMode):
        return mode
    try:
        return BoundsCheckMode(str(mode).lower())
    except ValueError:
        names = [m.name for m in BoundsCheckMode]
        raise ValueError(f"bounds_check_mode must be one of {names}, got {mode!r}") from None
