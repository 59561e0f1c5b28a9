"""Distances in units in the last place (ulps) of 16-bit floats.

A lookup over fp16/bf16 rows accumulates in float32 and rounds once to the output dtype, so
its result is within one ulp of the exact sum rounded once (the float32 sum differs from the
exact one far below a 16-bit ulp). Summing in 16 bits instead rounds after every row and
drifts by several ulps on long bags. The checks of the tests and of the GPU check scripts
measure that distance with :func:`rounded_once_ulps`.

>>> import jax.numpy as jnp, numpy as np
>>> x = np.array([1.0, 1.0, -0.0], jnp.bfloat16)
>>> y = np.array([1.0078125, 0.9921875, 0.0], jnp.bfloat16)  # the neighbours of 1.0
>>> ulp_distance(x, y).tolist()
[1.0, 2.0, 0.0]
>>> rounded_once_ulps(np.float16([3.0]), np.array([3.0015]), np.float16).tolist()
[1.0]
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_INT = {2: np.int16, 4: np.int32}
FLOOR = 2.0**-17  # the float32 sum's own error, relative to the largest output
_FLOATS = tuple(np.dtype(t) for t in (np.float16, jnp.bfloat16, np.float32))


def _ordered(x: np.ndarray) -> np.ndarray:
    """Integers in the order of the floats, neighbouring floats one apart (-0 equals +0)."""
    bits = x.view(_INT[x.dtype.itemsize]).astype(np.int64)
    sign = np.int64(1) << (8 * x.dtype.itemsize - 1)
    return np.where(bits < 0, -(bits & (sign - 1)), bits)


def ulp_distance(a, b) -> np.ndarray:
    """How many representable values of their (common, 16- or 32-bit float) dtype lie between
    ``a`` and ``b``, elementwise, as float64; ``inf`` where either is not finite."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.dtype not in _FLOATS:
        raise ValueError(
            "ulp_distance needs two arrays of one 16- or 32-bit float dtype, "
            f"got {a.dtype} and {b.dtype}"
        )
    finite = np.isfinite(a.astype(np.float32)) & np.isfinite(b.astype(np.float32))
    dist = np.abs(_ordered(a) - _ordered(b)).astype(np.float64)
    return np.where(finite, dist, np.inf)


def rounded_once_ulps(actual, exact, dtype, floor: float = FLOOR) -> np.ndarray:
    """Ulps of ``dtype`` between ``actual`` (converted to ``dtype``) and ``exact`` (e.g. a
    float64 sum) rounded once to ``dtype``, elementwise.

    Elements within ``floor * max|exact|`` of ``exact`` count as 0: a float32 sum that
    cancels to nearly 0 carries an absolute error (about ``2**-24`` times the sum of the
    magnitudes of its terms) that can exceed the tiny 16-bit ulp there. Summing in 16 bits
    errs by far more than that floor (a 16-bit ulp of the partial sums).
    """
    dtype = np.dtype(dtype)
    exact = np.asarray(exact, np.float64)
    dist = ulp_distance(np.asarray(actual).astype(dtype), exact.astype(dtype))
    scale = float(np.abs(exact).max(initial=0.0))
    close = np.abs(np.asarray(actual).astype(np.float64) - exact) <= floor * scale
    return np.where(close, 0.0, dist)
