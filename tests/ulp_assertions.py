"""Assertions for 16-bit outputs: within k ulps of the exact result rounded once."""

import numpy as np
from jaxrec_kernels.ulps import rounded_once_ulps


def assert_rounded_once(actual, exact, dtype, ulps: int = 1) -> None:
    """Assert ``actual`` is within ``ulps`` ulps of ``dtype`` of ``exact`` (e.g. a float64
    sum) rounded once to ``dtype``; a sum accumulated in 16 bits fails on long bags."""
    actual, exact = np.asarray(actual), np.asarray(exact, np.float64)
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    dist = rounded_once_ulps(actual, exact, dtype)
    bad = np.argwhere(dist > ulps)
    if bad.size:
        worst = np.unravel_index(np.argmax(dist), dist.shape)
        raise AssertionError(
            f"{len(bad)} of {dist.size} elements more than {ulps} ulp of {np.dtype(dtype)} from "
            f"the exact value rounded once; worst at {tuple(map(int, worst))}: "
            f"{float(np.asarray(actual, np.float64)[worst])} vs {float(exact[worst])} "
            f"({dist[worst]:g} ulps)"
        )
