"""Moving table rows between row-block arrays on a mesh axis, device to device.

:func:`move` runs the :class:`~jaxrec.checkpoint.geometry.Copy` list of two placements
inside one jitted ``jax.shard_map``: copies within a rank are local slices; copies from
rank ``r`` to rank ``r + s`` travel in one ``jax.lax.ppermute`` per (destination array,
shift ``s``), packed into a buffer as large as the most any rank sends at that shift. No
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

    def body(*locals_):
        src = {
            name: x[:, None] if x.ndim == 1 else x for name, x in zip(names, locals_, strict=True)
        }
        rank = jax.lax.axis_index(axis) if n > 1 else 0
        outs = []
        for name, spec in target_items:
            buf = jnp.zeros((spec.rows, spec.cols), spec.dtype)
            by_shift: dict[int, list[Copy]] = {}
            for c in copies:
                if c.dst == name:
                    by_shift.setdefault((c.dst_rank - c.src_rank) % n, []).append(c)
            for shift, group in sorted(by_shift.items()):
                buf = _shifted(src, buf, group, shift, rank, n, axis, spec)
            outs.append(buf[:, 0] if spec.ndim == 1 else buf)
        return tuple(outs)

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


def _shifted(src, buf, group: list[Copy], shift: int, rank, n: int, axis: str, spec: ArraySpec):
    """``buf`` with the copies of one shift written in (local when the shift is 0)."""
    if shift == 0:

        def local(r, b):
            for c in (c for c in group if c.dst_rank == r):
                piece = _piece(src, c).astype(b.dtype)
                b = b.at[c.dst_row : c.dst_row + c.rows, c.dst_col : c.dst_col + c.cols].set(piece)
            return b

        return _switch(rank, n, local, buf)

    sent = {r: [c for c in group if c.src_rank == r] for r in range(n)}
    width = max(sum(c.rows for c in cs) for cs in sent.values())

    def pack(r):
        out = jnp.zeros((width, spec.cols), spec.dtype)
        top = 0
        for c in sent[r]:
            piece = _piece(src, c).astype(spec.dtype)
            out = out.at[top : top + c.rows, c.dst_col : c.dst_col + c.cols].set(piece)
            top += c.rows
        return out

    send = _switch(rank, n, pack)
    pairs = [(r, (r + shift) % n) for r in range(n) if sent[r]]
    recv = jax.lax.ppermute(send, axis, pairs)

    def unpack(d, b, got):
        top = 0
        for c in sent[(d - shift) % n]:
            cols = slice(c.dst_col, c.dst_col + c.cols)
            b = b.at[c.dst_row : c.dst_row + c.rows, cols].set(got[top : top + c.rows, cols])
            top += c.rows
        return b

    return _switch(rank, n, unpack, buf, recv)
