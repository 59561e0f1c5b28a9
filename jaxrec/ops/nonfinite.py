"""Reporting the rows that the fused update's non-finite guard left unchanged.

The fused backward skips a row whose summed gradient holds a NaN or an infinity
(``kernels.sparse_update``; the optimizer's ``skip_nonfinite``). The lookup's bad
count is an output of the forward pass, which has run before any gradient
exists, so the backward reports skipped rows itself, by ``bounds_check_mode``:

- FATAL: a checkify error naming the count (wrap the train step in
  ``jax.experimental.checkify.checkify``, as for bad ids);
- WARNING: a ``RuntimeWarning`` with the count, raised on the host through
  ``jax.debug.callback`` only on a step where some row was skipped (one
  device-side predicate per group; the host is not called otherwise);
- IGNORE and NONE: nothing (the rows are still skipped).

>>> import jax.numpy as jnp
>>> from jaxrec.ops.backend import BoundsCheckMode
>>> report_nonfinite_rows(BoundsCheckMode.IGNORE.value, jnp.int32(3), "sum_float32_d4")
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxrec.ops.backend import BoundsCheckMode


def _warn(count, *, group: str) -> None:
    warnings.warn(
        f"{int(count)} rows of table group {group} had a non-finite gradient and were left "
        "unchanged (weights and optimizer state)",
        RuntimeWarning,
        stacklevel=2,
    )


def report_nonfinite_rows(bounds_check: str, count: jax.Array, group: str) -> None:
    """Report ``count`` rows of ``group`` skipped by the guard, as ``bounds_check`` says."""
    if bounds_check == BoundsCheckMode.FATAL.value:
        checkify.check(
            count == 0,
            f"{{count}} rows of table group {group} had a non-finite gradient "
            "(bounds_check_mode=FATAL); they were left unchanged",
            count=count,
        )
    elif bounds_check == BoundsCheckMode.WARNING.value:
        jax.lax.cond(
            count > 0,
            lambda c: jax.debug.callback(functools.partial(_warn, group=group), c),
            lambda c: None,
            jnp.asarray(count, jnp.int32),
        )
