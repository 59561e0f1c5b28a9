"""What the GPU check scripts share."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def relative_error(actual, expected) -> float:
    """``|actual - expected| / |expected|`` in float64 (Frobenius norms); inf if ``actual``
    holds a non-finite value.

    >>> relative_error([1.0, 2.0], [1.0, 2.0])
    0.0
    >>> relative_error([float("nan")], [1.0])
    inf
    """
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
