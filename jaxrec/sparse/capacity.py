"""Capacity buckets: a fixed ladder of value-buffer sizes so that jit compiles a handful of times.

A KJT's capacity (the static length of ``values``) is part of the compiled program. Batches
whose number of ids varies are padded to the smallest bucket of a fixed geometric ladder:

    bucket_k = 128 * ceil(minimum * growth**k / 128),   k = 0, 1, 2, ...

i.e. ``minimum * growth**k`` rounded up to a multiple of 128. With the defaults
(``minimum=128``, ``growth=1.25``) the ladder starts 128, 256, 384, 512, 640, 768, 1024, 1280,
1536, 1920, 2432, ... (below ~1000 the rounding to 128 dominates) and grows by about 25% a
step from there: a padded batch wastes under a fifth of its buffer, and id counts that drift by
a few percent between batches stay in one or two buckets.
"""

from __future__ import annotations

import math

import numpy as np

from jaxrec.sparse.arrays import is_traced
from jaxrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor

_ALIGN = 128


def capacity_bucket(n: int, *, minimum: int = 128, growth: float = 1.25) -> int:
    """The smallest bucket of the ladder ``128 * ceil(minimum * growth**k / 128)`` that is >= n.

    >>> [capacity_bucket(n) for n in (0, 128, 129, 300, 1000, 1025)]
    [128, 128, 256, 384, 1024, 1280]
    >>> capacity_bucket(1000, minimum=1024)
    1024
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, (int, np.integer)) or minimum < 1:
        raise ValueError(f"minimum must be a positive int, got {minimum!r}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1, got {growth!r}")
    k = 0
    while True:
        bucket = _ALIGN * math.ceil(minimum * growth**k / _ALIGN)
        if bucket >= n:
            return bucket
        k += 1


def pad_to_capacity(
    kjt: KeyedJaggedTensor, capacity: int | None = None, fill_value: int = 0
) -> KeyedJaggedTensor:
    """``kjt`` with values (and weights) padded to ``capacity`` entries, real ids first.

    ``capacity=None`` picks ``capacity_bucket(num_values)`` (eager only: it reads the number
    of ids on the host). A capacity below the number of ids is a ValueError naming both.

    >>> import numpy as np
    >>> kjt = KeyedJaggedTensor(["f"], np.arange(5), lengths=np.array([2, 3]))
    >>> pad_to_capacity(kjt).capacity(), pad_to_capacity(kjt, 8).values().tolist()
    (128, [0, 1, 2, 3, 4, 0, 0, 0])
    """
    if capacity is None:
        if is_traced(kjt.lengths()):
            raise ValueError(
                "pad_to_capacity(capacity=None) reads the number of ids on the host and cannot "
                "run under tracing; pass an explicit capacity"
            )
        capacity = capacity_bucket(int(kjt.num_values()))
    return kjt.pad_to(capacity, fill_value=fill_value)
