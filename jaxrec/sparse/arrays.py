"""Array helpers shared by the ``jaxrec.sparse`` types: input coercion and checks, offsets,
segment gathers.

Each helper works on host (NumPy) and device arrays; those that check values do so eagerly
only, and under tracing fall back to the behaviour the lookup's ``bounds_check_mode`` handles.

>>> offsets_of(jnp.array([2, 0, 3])).tolist()
[0, 2, 2, 5]
>>> lengths_from(None, [0, 2, 2, 5]).tolist()
[2, 0, 3]
>>> gather_segments(jnp.arange(10), jnp.array([7, 1]), jnp.array([2, 3]), 6, fill=-1).tolist()
[7, 8, 1, 2, 3, -1]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_int32",
    "as_keys",
    "as_values",
    "as_weights",
    "check_offsets",
    "gather_segments",
    "host_array",
    "is_traced",
    "lengths_from",
    "offsets_of",
    "pad_bags",
    "require_concrete",
]

_INT32 = np.iinfo(np.int32)


def is_traced(*arrays: Any) -> bool:
    """True when any of ``arrays`` is a tracer, i.e. its content is unknown until run time."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def host_array(x: Any, empty_dtype: Any = np.int32) -> Any:
    """``x`` as an array with a dtype; plain Python sequences become NumPy (an empty one gets
    ``empty_dtype``)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    out = np.asarray(x)
    return out.astype(empty_dtype) if out.size == 0 else out


def as_int32(x: Any, what: str) -> jax.Array:
    """Integer array ``x`` as int32; eagerly, a value outside int32 is a ValueError naming it."""
    x = host_array(x)
    dtype = np.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{what} must hold integers, got dtype {dtype}")
    if np.can_cast(dtype, np.int32):
        return jnp.asarray(x, dtype=jnp.int32)
    if is_traced(x):
        # Under jit a value outside int32 cannot raise; it becomes -1 (never wrapped to
        # another value): an id outside every table, a negative length, both bad input that
        # the lookup's bounds_check_mode counts or raises.
        outside = x > jnp.asarray(_INT32.max, dtype)
        if jnp.issubdtype(dtype, jnp.signedinteger):
            outside = outside | (x < jnp.asarray(_INT32.min, dtype))
        return jnp.where(outside, -1, x).astype(jnp.int32)
    host = np.asarray(x)
    bad = np.flatnonzero((host < _INT32.min) | (host > _INT32.max))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what}[{i}] = {host.reshape(-1)[i]} does not fit int32 "
            f"(range [{_INT32.min}, {_INT32.max}]); ids and lengths are stored as int32"
        )
    return jnp.asarray(host.astype(np.int32))


def as_weights(weights: Any, num_rows: int, *, floating: bool = True) -> jax.Array:
    """Per-row weights of shape ``[num_rows]``; floating point unless ``floating=False``."""
    weights = host_array(weights, np.float32)
    dtype = np.dtype(weights.dtype)
    if floating and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"weights must be floating point, got dtype {dtype}")
    weights = jnp.asarray(weights)
    if weights.shape != (num_rows,):
        raise ValueError(
            f"weights has shape {weights.shape} but values has {num_rows} rows; "
            "weights need one entry per value"
        )
    return weights


def check_offsets(offsets: jax.Array) -> None:
    """Eager check that offsets start at 0 and never decrease."""
    host = np.asarray(offsets)
    if host[0] != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {host[0]}")
    drops = np.flatnonzero(np.diff(host) < 0)
    if drops.size:
        i = int(drops[0])
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{i + 1}] = {host[i + 1]} "
            f"< offsets[{i}] = {host[i]}"
        )


def lengths_from(lengths: Any, offsets: Any) -> jax.Array:
    """int32 lengths from ``lengths`` or ``offsets`` (``diff(offsets)``); checks both agree."""
    if lengths is None and offsets is None:
        raise ValueError("either lengths or offsets must be given, got neither")
    from_offsets = None
    if offsets is not None:
        offsets = as_int32(offsets, "offsets")
        if offsets.ndim != 1 or offsets.shape[0] < 1:
            raise ValueError(
                f"offsets must be 1-D with a leading 0, got shape {tuple(offsets.shape)}"
            )
        if is_traced(offsets):
            from_offsets = jnp.diff(offsets)
        else:
            check_offsets(offsets)
            from_offsets = jnp.asarray(np.diff(np.asarray(offsets)))
    if lengths is None:
        return from_offsets
    lengths = as_int32(lengths, "lengths")
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if from_offsets is not None:
        if from_offsets.shape != lengths.shape:
            raise ValueError(
                f"offsets has {from_offsets.shape[0] + 1} entries but lengths has "
                f"{lengths.shape[0]}; offsets need one more entry than lengths"
            )
        if not is_traced(lengths, from_offsets) and not np.array_equal(from_offsets, lengths):
            raise ValueError("lengths and offsets were both given and disagree")
    return lengths


@jax.jit
def offsets_of(lengths: jax.Array) -> jax.Array:
    """``concat([0], cumsum(lengths))`` as int32."""
    zero = jnp.zeros((1,), jnp.int32)
    return jnp.concatenate([zero, jnp.cumsum(lengths, dtype=jnp.int32)])


def gather_segments(
    data: jax.Array, starts: jax.Array, sizes: jax.Array, out_size: int, fill: Any = 0
) -> jax.Array:
    """Rows ``data[starts[s] : starts[s] + sizes[s]]`` for each segment ``s`` in order, then
    ``fill`` up to ``out_size`` rows. Vectorised (one searchsorted + one gather); ``starts`` and
    ``sizes`` may be traced, ``out_size`` is static. Rows past ``out_size`` are dropped.
    """
    shape = (out_size, *data.shape[1:])
    num_segments = sizes.shape[0]
    if out_size == 0 or num_segments == 0 or data.shape[0] == 0:
        return jnp.full(shape, fill, data.dtype)
    ends = jnp.cumsum(sizes, dtype=jnp.int32)
    pos = jnp.arange(out_size, dtype=jnp.int32)
    seg = jnp.searchsorted(ends, pos, side="right")
    real = seg < num_segments
    seg = jnp.minimum(seg, num_segments - 1)
    src = starts[seg] + pos - (ends[seg] - sizes[seg])
    rows = jnp.take(data, src, axis=0, mode="clip")
    mask = real.reshape((out_size,) + (1,) * (data.ndim - 1))
    return jnp.where(mask, rows, jnp.asarray(fill, data.dtype))


@functools.partial(jax.jit, static_argnames="width")
def pad_bags(data: jax.Array, lengths: jax.Array, fill: Any, *, width: int) -> jax.Array:
    """[B, width, ...]: row ``b`` holds bag ``b``'s first ``width`` rows, then ``fill``."""
    num_bags = lengths.shape[0]
    shape = (num_bags, width, *data.shape[1:])
    if data.shape[0] == 0 or num_bags == 0 or width == 0:
        return jnp.full(shape, fill, data.dtype)
    col = jnp.arange(width, dtype=jnp.int32)
    src = offsets_of(lengths)[:-1, None] + col[None, :]
    rows = jnp.take(data, src, axis=0, mode="clip")
    mask = (col[None, :] < lengths[:, None]).reshape(shape[:2] + (1,) * (data.ndim - 1))
    return jnp.where(mask, rows, jnp.asarray(fill, data.dtype))


def require_concrete(method: str, alternative: str, *arrays: Any) -> None:
    """ValueError when ``method`` (which needs host values) is called under tracing."""
    if is_traced(*arrays):
        raise ValueError(
            f"{method}() reads lengths on the host and cannot run under jax.jit or other "
            f"tracing; use {alternative} instead"
        )


def as_values(values: Any) -> jax.Array:
    """Values of a JaggedTensor: integer ids become int32 (checked), other dtypes pass through."""
    values = host_array(values)
    if jnp.issubdtype(np.dtype(values.dtype), jnp.integer):
        values = as_int32(values, "values")
    values = jnp.asarray(values)
    if values.ndim < 1:
        raise ValueError(f"values must have at least one dimension, got shape {values.shape}")
    return values


def as_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """``keys`` as a tuple of str; a bare str or a non-str key is a ValueError."""
    if isinstance(keys, str):
        raise ValueError(f"keys must be a sequence of str, got the str {keys!r}")
    keys = tuple(keys)
    for k in keys:
        if not isinstance(k, str):
            raise ValueError(f"keys must be str, got {k!r} of type {type(k).__name__}")
    return keys
