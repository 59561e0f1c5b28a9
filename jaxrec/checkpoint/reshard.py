"""Moving table rows between row-block arrays on a mesh axis, device to device.

:func:`move` runs the :class:`~jaxrec.checkpoint.geometry.Copy` list of two placements
inside one jitted ``jax.shard_map``. The program is the same on every rank: which rows a
rank sends and where it writes what it receives are read from small constant tables
indexed by ``jax.lax.axis_index`` (no branch per rank). Copies within a rank are local;
copies from rank ``r`` to rank ``r + s`` travel in one ``jax.lax.ppermute`` per shift
``s``. Copies that agree in source, destination and columns share a *slot* per rank, so
each slot moves as one contiguous block: a dynamic slice and update when every rank
moves the same number of rows, else a row gather and a scatter that drops the padding.
No rank ever holds more of a table than its blocks of the source and the destination plus
one shift's pieces in flight, so a whole table is never gathered onto one device (unless
the destination is replicated, as data-parallel tables are).

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
import numpy as np
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


@dataclass(frozen=True)
class _Slot:
    """The ``j``-th copy of one kind (source, destination, columns) that each rank sends
    at one shift: per sending rank its source row, destination row and row count (0: that
    rank sends nothing in this slot); ``width`` rows travel."""

    src: str
    dst: str
    src_col: int
    dst_col: int
    cols: int
    src_row: tuple[int, ...]
    dst_row: tuple[int, ...]
    rows: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.rows)

    @property
    def even(self) -> bool:
        """Every rank sends ``width`` rows: contiguous slices suffice."""
        return min(self.rows) == self.width


def _slots(copies: list[Copy], n: int) -> list[_Slot]:
    kinds: dict[tuple, list[list[Copy]]] = {}
    for c in copies:
        key = (c.src, c.dst, c.src_col, c.dst_col, c.cols)
        kinds.setdefault(key, [[] for _ in range(n)])[c.src_rank].append(c)
    slots = []
    for (src, dst, src_col, dst_col, cols), per_rank in sorted(kinds.items()):
        for r in range(n):
            per_rank[r].sort(key=lambda c: -c.rows)
        for j in range(max(len(cs) for cs in per_rank)):
            picked = [cs[j] if j < len(cs) else None for cs in per_rank]
            slots.append(
                _Slot(
                    src,
                    dst,
                    src_col,
                    dst_col,
                    cols,
                    tuple(c.src_row if c else 0 for c in picked),
                    tuple(c.dst_row if c else 0 for c in picked),
                    tuple(c.rows if c else 0 for c in picked),
                )
            )
    return slots


def _at(table: tuple[int, ...], rank) -> jax.Array:
    """``table[rank]`` for a traced ``rank``: a constant lookup, not a branch."""
    return jnp.asarray(np.asarray(table, np.int32))[rank]


def _read(x: jax.Array, slot: _Slot, rank) -> jax.Array:
    """The ``[width, cols]`` block ``rank`` sends in ``slot`` (rows past its count are
    whatever the clamped read finds; the receiver drops them)."""
    start = _at(slot.src_row, rank)
    if slot.even:
        return jax.lax.dynamic_slice(x, (start, slot.src_col), (slot.width, slot.cols))
    rows = jnp.clip(start + jnp.arange(slot.width, dtype=jnp.int32), 0, x.shape[0] - 1)
    return x[rows, slot.src_col : slot.src_col + slot.cols]


def _write(buf: jax.Array, slot: _Slot, sender, piece: jax.Array) -> jax.Array:
    """``buf`` with the first ``slot.rows[sender]`` rows of ``piece`` written in."""
    start = _at(slot.dst_row, sender)
    piece = piece.astype(buf.dtype)
    if slot.even:
        return jax.lax.dynamic_update_slice(buf, piece, (start, slot.dst_col))
    offset = jnp.arange(slot.width, dtype=jnp.int32)
    rows = jnp.where(offset < _at(slot.rows, sender), start + offset, buf.shape[0])
    return buf.at[rows, slot.dst_col : slot.dst_col + slot.cols].set(piece, mode="drop")


@functools.lru_cache(maxsize=32)
def _compiled(copies, source_specs, target_items, mesh, axis):
    n = mesh.shape[axis]
    names = [name for name, _ in source_specs]
    by_shift: dict[int, list[Copy]] = {}
    for c in copies:
        by_shift.setdefault((c.dst_rank - c.src_rank) % n, []).append(c)
    plan = {shift: _slots(cs, n) for shift, cs in sorted(by_shift.items())}

    def body(*locals_):
        src = {
            name: x[:, None] if x.ndim == 1 else x for name, x in zip(names, locals_, strict=True)
        }
        rank = jax.lax.axis_index(axis) if n > 1 else jnp.int32(0)
        bufs = {name: jnp.zeros((t.rows, t.cols), t.dtype) for name, t in target_items}
        for shift, slots in plan.items():
            pieces = tuple(_read(src[s.src], s, rank) for s in slots)
            sender = rank
            if shift:
                senders = sorted({c.src_rank for c in by_shift[shift]})
                pairs = [(r, (r + shift) % n) for r in senders]
                pieces = jax.lax.ppermute(pieces, axis, pairs)
                sender = (rank - shift) % n
            for s, piece in zip(slots, pieces, strict=True):
                bufs[s.dst] = _write(bufs[s.dst], s, sender, piece)
        return tuple(bufs[name][:, 0] if t.ndim == 1 else bufs[name] for name, t in target_items)

    def _spec(replicated):
        return P() if replicated else P(axis)

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(_spec(rep) for _, rep in source_specs),
        out_specs=tuple(_spec(t.replicated) for _, t in target_items),
        check_vma=False,
    )
    return jax.jit(smap)
