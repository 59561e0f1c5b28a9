"""Offsets that every kernel can trust, whatever lengths came in under ``jit``.

A KJT's offsets are the int32 running sum of its lengths. Traced lengths are not
checked on the host, so they may be negative, or sum past the capacity of the
values (or past int32, where the running sum wraps). :func:`checked_offsets`
recomputes the offsets from the lengths with a sum that saturates instead of
wrapping and empties every bag that is

- of negative length, or
- not empty and ending past the values' capacity (it and every later non-empty bag).

Such a bag pools to zeros (a sequence lookup gives it no rows) and is counted as a
bad bag: under ``bounds_check_mode`` WARNING the count is added to the lookup's
bad count (the same number as the ids outside their tables), under FATAL it
raises. The kernels then only ever see non-decreasing offsets inside
``[0, capacity]``.

>>> import jax.numpy as jnp
>>> offsets = jnp.array([0, 2, 1, 4, 9], jnp.int32)   # lengths 2, -1, 3, 5 over 6 values
>>> fixed, bad = checked_offsets(offsets, 6)
>>> fixed.tolist(), int(bad)
([0, 2, 2, 5, 5], 2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def checked_offsets(offsets: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """``(offsets, bad_bags)``: offsets with every bad bag emptied, and their number.

    ``offsets [F*B+1] int32`` as a KJT builds them (``offsets[0]`` is the first real
    position; it is clamped into ``[0, capacity]``); ``capacity`` is the length of the
    values. The lengths are recovered as ``diff(offsets)`` in int32, which undoes a
    wrapped running sum exactly, so a sum of lengths past int32 is caught too.
    """
    offsets = offsets.astype(jnp.int32)
    limit = jnp.int32(capacity + 1)  # saturation value: "past the capacity"
    lengths = offsets[1:] - offsets[:-1]
    clamped = jnp.clip(lengths, 0, limit)
    start = jnp.clip(offsets[0], 0, capacity)

    def saturating_add(a, b):
        # min(a + b, limit) for 0 <= a, b <= limit without leaving int32.
        return a + jnp.minimum(b, limit - a)

    if lengths.shape[0] == 0:
        return start[None], jnp.zeros((), jnp.int32)
    ends = saturating_add(start, jax.lax.associative_scan(saturating_add, clamped))
    inside = ends <= capacity
    last_inside = jnp.max(jnp.where(inside, ends, start))
    fixed = jnp.concatenate([start[None], jnp.where(inside, ends, last_inside)])
    bad = (lengths < 0) | ((lengths > 0) & ~inside)
    return fixed, jnp.sum(bad.astype(jnp.int32))
