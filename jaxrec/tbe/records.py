"""Device side of the cache's row moves: cache rows to and from host records.

A host record (:class:`~jaxrec.tbe.host_table.HostTable`) is one row's weights and optimizer
state rows as bytes, each field at its offset. :func:`gather_records` packs cache rows into
records for one device-to-host copy; :func:`load_records` unpacks records that came in one
host-to-device copy into their cache slots, in place (the cache is donated).

>>> import jax.numpy as jnp
>>> from jaxrec.optim import exact_rowwise_adagrad, init_fused_table
>>> param = init_fused_table(jnp.arange(6.0).reshape(3, 2), exact_rowwise_adagrad())
>>> fields = (("weight", 0, 8, jnp.dtype("float32"), (2,)),
...           ("momentum1", 8, 12, jnp.dtype("float32"), ()))
>>> records = gather_records(param, jnp.array([2, 0]), size=2, fields=fields, row_bytes=12)
>>> records.shape, records.dtype
((2, 12), dtype('uint8'))
>>> moved = load_records(param, jnp.array([0, -1]), records, size=2, fields=fields)
>>> moved.weight.tolist()   # row 2's record went to slot 0; -1 is skipped
[[4.0, 5.0], [2.0, 3.0], [4.0, 5.0]]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxrec.optim.fused import FusedTableParams

__all__ = ["gather_records", "load_records"]


def _field(param: FusedTableParams, key: str) -> jax.Array:
    return param.weight if key == "weight" else param.state[key]


@functools.partial(jax.jit, static_argnames=("size", "fields", "row_bytes"))
def gather_records(param: FusedTableParams, slots: jax.Array, *, size, fields, row_bytes):
    """The cache rows ``slots[:size]`` as host records ``[size, row_bytes]`` uint8
    (:class:`~jaxrec.tbe.host_table.HostTable`'s layout), for one device-to-host copy."""
    parts, at = [], 0
    for key, start, stop, _, _ in fields:
        rows = jnp.take(_field(param, key), slots[:size], axis=0, mode="clip")
        parts.append(jnp.zeros((size, start - at), jnp.uint8))
        parts.append(jax.lax.bitcast_convert_type(rows, jnp.uint8).reshape(size, stop - start))
        at = stop
    parts.append(jnp.zeros((size, row_bytes - at), jnp.uint8))
    return jnp.concatenate(parts, axis=1)


@functools.partial(jax.jit, static_argnames=("size", "fields"), donate_argnums=(0,))
def load_records(param: FusedTableParams, slots, records, *, size: int, fields):
    """Scatter host records ``[size, row_bytes]`` into the cache rows ``slots[:size]``."""
    target = slots[:size]
    target = jnp.where(target < 0, param.weight.shape[0], target)  # -1 would wrap to the end
    out = {}
    for key, start, stop, dtype, tail in fields:
        raw = records[:, start:stop]
        if dtype.itemsize > 1:
            raw = raw.reshape(size, -1, dtype.itemsize)
        value = jax.lax.bitcast_convert_type(raw, dtype).reshape(size, *tail)
        out[key] = _field(param, key).at[target].set(value, mode="drop")
    weight = out.pop("weight")
    return dataclasses.replace(param, weight=weight, state=out)
