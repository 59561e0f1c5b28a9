"""Reporting the rows that the fused update's non-finite guard left unchanged.

The fused backward skips a row whose summed gradient holds a NaN or an infinity
(``kernels.sparse_update``; the optimizer's ``skip_nonfinite``). The lookup's bad
count is an output of the forward pass, which has run before any gradient
exists, so the backward counts skipped rows in the fused entry it returns (slot 5
of the marker, :mod:`jaxrec.optim.fused`): :func:`jaxrec.optim.apply_updates`
adds them to the params' running total, read with
:func:`jaxrec.optim.nonfinite_rows` or from the collections' ``"bounds_check"``
collection (``"nonfinite_gradient_rows"``). By ``bounds_check_mode``:

- FATAL: counted, and a checkify error naming the count (wrap the train step in
  ``jax.experimental.checkify.checkify``, as for bad ids);
- WARNING: counted, and a ``RuntimeWarning`` with the count, raised on the host
  through ``jax.debug.callback`` only on a step where some row was skipped (one
  device-side predicate per group; the host is not called otherwise);
- IGNORE and NONE: not counted (the rows are still skipped).

>>> import jax.numpy as jnp
>>> from jaxrec.ops.backend import BoundsCheckMode
>>> int(report_nonfinite_rows(BoundsCheckMode.IGNORE.value, jnp.int32(3), "sum_float32_d4"))
0
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


def report_nonfinite_rows(bounds_check: str, count: jax.Array, group: str) -> jax.Array:
    """Report ``count`` rows of ``group`` skipped by the guard, as ``bounds_check`` says.

    Returns the count to carry in the fused entry: ``count`` under FATAL and WARNING,
    else an int32 zero.
    """
    count = jnp.asarray(count, jnp.int32)
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
            count,
        )
    if bounds_check in (BoundsCheckMode.FATAL.value, BoundsCheckMode.WARNING.value):
        return count
    return jnp.zeros((), jnp.int32)
