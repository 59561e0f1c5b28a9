"""Moving table rows between row-block arrays on a mesh axis, device to device.

:func:`move` runs the :class:`~jaxrec.checkpoint.geometry.Copy` list of two placements
inside one jitted ``jax.shard_map``: copies within a rank are local slices; copies from
rank ``r`` to rank ``r + s`` travel in one ``jax.lax.ppermute`` per (shift ``s``, dtype),
packed into a buffer as large as the most any rank sends at that shift. No
rank ever holds more of a table than its blocks of the source and the destination plus
one such buffer, so a whole table is never gathered onto one device (unless the
destination is replicated, as data-parallel tables are).

>>> import jax, numpy as np
>>> from jax.sharding import Mesh
>>> from jaxrec.checkpoint.geometry import Copy
>>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
>>> src = jax.numpy.arange(8.0).reshape(4, 2)
>>> copies = (Copy("a", 0, 2, 0, "b", 0, 0, 0, 2, 2), Copy("a", 0, 0, 1, "b", 0, 2, 0, 1, 1))
>>> out = move(copies, {"a": src}, {"b": ArraySpec(3, 2, "float32")}, mesh, "x")
>>> out["b"].tolist()   # rows 2..3 of a, then column 1 of its row 0 into column 0
[[4.0, 5.0], [6.0, 7.0], [1.0, 0.0]]
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrec.checkpoint.geometry import Copy

__all__ = ["ArraySpec", "move"]


@dataclass(frozen=True)
class ArraySpec:
    """A destination array: ``rows`` per rank (all of it when ``replicated``), ``cols``
    columns (``ndim = 1``: one column, stored 1-D), ``dtype``."""

    rows: int
    cols: int
    dtype: str
    ndim: int = 2
    replicated: bool = False


def move(
    copies: tuple[Copy, ...],
    sources: Mapping[str, jax.Array],
    targets: Mapping[str, ArraySpec],
    mesh: Mesh,
    axis: str,
    replicated_sources: frozenset[str] = frozenset(),
) -> dict[str, jax.Array]:
    """New arrays ``targets`` (zeros where no copy writes) filled by ``copies`` from
    ``sources`` (split by rows over ``axis``, except ``replicated_sources``)."""
    names = tuple(sorted(sources))
    fn = _compiled(
        tuple(copies),
        tuple((n, n in replicated_sources) for n in names),
        tuple(sorted(targets.items())),
        mesh,
        axis,
    )
    outs = fn(*(sources[n] for n in names))
    return dict(zip(sorted(targets), outs, strict=True))


def _switch(rank, n: int, branch, *operands):
    """``branch(r, *operands)`` for the static ``r`` equal to the traced ``rank``."""
    if n == 1:
        return branch(0, *operands)
    return jax.lax.switch(rank, [functools.partial(branch, r) for r in range(n)], *operands)


@functools.lru_cache(maxsize=32)
def _compiled(copies, source_specs, target_items, mesh, axis):
    n = mesh.shape[axis]
    names = [name for name, _ in source_specs]
    targets = dict(target_items)
    # one exchange per (shift, dtype): every destination array of that dtype shares it
    batches: dict[tuple[int, str], list[Copy]] = {}
    for c in copies:
        key = ((c.dst_rank - c.src_rank) % n, targets[c.dst].dtype)
        batches.setdefault(key, []).append(c)

    def body(*locals_):
        src = {
            name: x[:, None] if x.ndim == 1 else x for name, x in zip(names, locals_, strict=True)
        }
        rank = jax.lax.axis_index(axis) if n > 1 else 0
        bufs = {name: jnp.zeros((t.rows, t.cols), t.dtype) for name, t in target_items}
        for (shift, dtype), batch in sorted(batches.items()):
            touched = tuple(dict.fromkeys(c.dst for c in batch))
            cols = max(targets[name].cols for name in touched)
            new = _exchange(
                src,
                tuple(bufs[t] for t in touched),
                touched,
                batch,
                shift,
                rank,
                n,
                axis,
                dtype,
                cols,
            )
            bufs.update(zip(touched, new, strict=True))
        return tuple(bufs[name][:, 0] if t.ndim == 1 else bufs[name] for name, t in target_items)

    def _spec(replicated):
        return P() if replicated else P(axis)

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(_spec(rep) for _, rep in source_specs),
        out_specs=tuple(_spec(targets[name].replicated) for name, _ in target_items),
        check_vma=False,
    )
    return jax.jit(smap)


def _piece(src, c: Copy):
    return src[c.src][c.src_row : c.src_row + c.rows, c.src_col : c.src_col + c.cols]


def _exchange(src, bufs, names, batch, shift, rank, n, axis, dtype, cols):
    """``bufs`` (the arrays ``names``) with the copies of one shift written in: local
    slices when the shift is 0, else one ``ppermute`` of a ``[width, cols]`` buffer."""
    index = {name: i for i, name in enumerate(names)}

    def write(b, c, piece):
        i = index[c.dst]
        rows = slice(c.dst_row, c.dst_row + c.rows)
        b = list(b)
        b[i] = b[i].at[rows, c.dst_col : c.dst_col + c.cols].set(piece.astype(b[i].dtype))
        return tuple(b)

    if shift == 0:

        def local(r, b):
            for c in (c for c in batch if c.dst_rank == r):
                b = write(b, c, _piece(src, c))
            return b

        return _switch(rank, n, local, bufs)

    sent = {r: [c for c in batch if c.src_rank == r] for r in range(n)}
    width = max(sum(c.rows for c in cs) for cs in sent.values())

    def pack(r):
        out = jnp.zeros((width, cols), dtype)
        top = 0
        for c in sent[r]:
            piece = _piece(src, c).astype(dtype)
            out = out.at[top : top + c.rows, c.dst_col : c.dst_col + c.cols].set(piece)
            top += c.rows
        return out

    send = _switch(rank, n, pack)
    pairs = [(r, (r + shift) % n) for r in range(n) if sent[r]]
    recv = jax.lax.ppermute(send, axis, pairs)

    def unpack(d, b, got):
        top = 0
        for c in sent[(d - shift) % n]:
            b = write(b, c, got[top : top + c.rows, c.dst_col : c.dst_col + c.cols])
            top += c.rows
        return b

    return _switch(rank, n, unpack, bufs, recv)
