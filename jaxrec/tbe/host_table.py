"""A table group in host memory: each row's weights and optimizer state in one packed record.

The cache (:mod:`jaxrec.tbe.cache`) moves rows between here and the device. A row of the
group is stored as one record of ``row_bytes`` bytes: its weights, then each optimizer
state row (e.g. row-wise Adagrad's ``momentum1``), each field aligned to its item size.
``weight`` and ``state`` are strided NumPy views into the records, so a table is still read
and written as ``[R, D]`` (checkpoints, ``split_*`` views), while a cache miss moves one
contiguous record per row:

- :meth:`HostTable.gather` copies the records of the missing rows into a staging buffer
  (``np.take`` in row blocks on a few threads, no allocation), which goes to the device in
  one transfer;
- :meth:`HostTable.scatter` writes the evicted records that came back in one transfer.

Rows round-trip exactly (bytes are copied, never converted).

>>> import numpy as np
>>> table = HostTable(np.arange(8.0, dtype=np.float32).reshape(4, 2),
...                   {"momentum1": np.zeros(4, np.float32)})
>>> table.row_bytes, table.fields[1][:3]
(12, ('momentum1', 8, 12))
>>> table.write(np.array([2, -1]), np.ones((2, 2), np.float32),
...             {"momentum1": np.array([5.0, 9.0], np.float32)})
>>> table.weight[2].tolist(), table.state["momentum1"].tolist()
([1.0, 1.0], [0.0, 0.0, 5.0, 0.0])
>>> staging = np.empty((4, table.row_bytes), np.uint8)
>>> table.gather(np.array([2, 0]), staging)
>>> table.scatter(np.array([3, -1]), staging[:2])   # record of row 2 copied to row 3
>>> table.weight[3].tolist(), float(table.state["momentum1"][3])
([1.0, 1.0], 5.0)
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["HostTable", "Field"]

Field = tuple[str, int, int, np.dtype, tuple[int, ...]]  # key, byte start, stop, dtype, tail
_MIN_BLOCK_ROWS = 1 << 11  # fewest rows per thread task of a gather or scatter


def _layout(dim: int, dtype: np.dtype, state: dict[str, tuple[tuple[int, ...], np.dtype]]):
    """Fields ``(key, start, stop, dtype, tail shape)`` of a record and its padded size."""
    fields, at, align = [], 0, dtype.itemsize
    for key, (tail, field_dtype) in [("weight", ((dim,), dtype)), *state.items()]:
        field_dtype = np.dtype(field_dtype)
        at = -(-at // field_dtype.itemsize) * field_dtype.itemsize
        size = math.prod(tail) * field_dtype.itemsize
        fields.append((key, at, at + size, field_dtype, tuple(tail)))
        at += size
        align = max(align, field_dtype.itemsize)
    return tuple(fields), max(align, -(-at // align) * align)


class HostTable:
    """Rows ``[R, D]`` and optimizer state rows (leading dim ``R``) in host memory.

    Args:
      weight: the group's stacked table ``[R, D]`` (copied into the records).
      state: the optimizer's state arrays, each with leading dim ``R`` (``{}`` for SGD).
      threads: threads of :meth:`gather` / :meth:`scatter` (default: up to 16 of the CPUs).

    :meth:`zeros` makes one without a source (zero-filled by the OS as pages are first
    touched, so a large table costs nothing until it is written).
    """

    def __init__(
        self, weight: np.ndarray, state: dict[str, np.ndarray], *, threads: int | None = None
    ) -> None:
        weight = np.asarray(weight)
        if weight.ndim != 2:
            raise ValueError(f"a host table is [rows, dim], got shape {weight.shape}")
        specs = {}
        for key, value in state.items():
            value = np.asarray(value)
            if value.shape[:1] != weight.shape[:1]:
                raise ValueError(
                    f"state {key!r} has shape {value.shape}; its leading dim must be the "
                    f"table's {weight.shape[0]} rows"
                )
            specs[key] = (value.shape[1:], value.dtype)
        self._build(weight.shape[0], weight.shape[1], weight.dtype, specs, threads)
        self.weight[...] = weight
        for key, value in state.items():
            self.state[key][...] = value

    @classmethod
    def zeros(
        cls,
        num_rows: int,
        dim: int,
        dtype: np.dtype,
        state: dict[str, tuple[tuple[int, ...], np.dtype]],
        *,
        threads: int | None = None,
    ) -> HostTable:
        """A zero table of ``num_rows x dim`` with state fields ``{key: (tail shape, dtype)}``.

        >>> t = HostTable.zeros(3, 2, np.float16, {"momentum1": ((), np.float32)})
        >>> t.weight.shape, t.state["momentum1"].dtype, t.row_bytes
        ((3, 2), dtype('float32'), 8)
        """
        table = cls.__new__(cls)
        table._build(num_rows, dim, np.dtype(dtype), state, threads)
        return table

    def _build(self, rows: int, dim: int, dtype: np.dtype, state: dict, threads: int | None):
        self.fields, self.row_bytes = _layout(dim, np.dtype(dtype), state)
        self.packed = np.zeros((rows, self.row_bytes), np.uint8)
        views = {}
        for key, start, stop, field_dtype, tail in self.fields:
            view = self.packed[:, start:stop].view(field_dtype)
            views[key] = view[:, 0] if tail == () else view.reshape(rows, *tail)
        self.weight = views.pop("weight")
        self.state = views
        self._threads = threads or min(16, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.packed.shape[0])

    def _blocks(self, count: int, work) -> None:
        """``work(start, stop)`` over ``[0, count)`` in one equal block per thread (blocks of
        at least ``_MIN_BLOCK_ROWS`` rows), so no thread is left with a second round."""
        size = max(_MIN_BLOCK_ROWS, -(-count // self._threads))
        starts = range(0, count, size)
        if self._threads == 1 or count <= size:
            for start in starts:
                work(start, min(start + size, count))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads)
        list(self._pool.map(lambda s: work(s, min(s + size, count)), starts))

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy the records of ``rows`` into ``out[:len(rows)]`` (``[>= n, row_bytes]`` uint8,
        C-contiguous). Negative rows read row 0, a placeholder the caller drops."""
        rows = np.maximum(np.asarray(rows), 0)
        if out.dtype != np.uint8 or out.shape[1:] != (self.row_bytes,) or len(out) < len(rows):
            raise ValueError(
                f"out must be uint8 [>= {len(rows)}, {self.row_bytes}], got {out.dtype} {out.shape}"
            )

        def take(start: int, stop: int) -> None:
            np.take(self.packed, rows[start:stop], axis=0, out=out[start:stop], mode="clip")

        self._blocks(len(rows), take)

    def scatter(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Store ``records[i]`` (``[n, row_bytes]`` uint8) at ``rows[i]``; negative rows are
        skipped."""
        rows = np.asarray(rows)
        records = np.asarray(records)
        if records.dtype != np.uint8 or records.shape != (len(rows), self.row_bytes):
            raise ValueError(
                f"records must be [{len(rows)}, {self.row_bytes}] uint8, got "
                f"{records.dtype} {records.shape}"
            )

        # One void item per record: np.put copies whole records, and a block without
        # placeholders goes straight from the buffer (no masked copy of it first).
        target = self.packed.view(np.dtype((np.void, self.row_bytes))).reshape(-1)
        source = np.ascontiguousarray(records).view(target.dtype).reshape(-1)

        def put(start: int, stop: int) -> None:
            block, records = rows[start:stop], source[start:stop]
            keep = block >= 0
            if not keep.all():  # placeholders: copy out only the kept records
                block, records = block[keep], records[keep]
            np.put(target, block, records)

        self._blocks(len(rows), put)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Copies of ``rows`` (negative entries read row 0, a placeholder the caller drops)."""
        rows = np.maximum(np.asarray(rows), 0)
        return self.weight[rows], {key: value[rows] for key, value in self.state.items()}

    def write(self, rows: np.ndarray, weight: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Store ``weight[i]`` and each ``state[key][i]`` at ``rows[i]``; negative rows are skipped."""
        rows = np.asarray(rows)
        keep = rows >= 0
        if not keep.any():
            return
        target = rows[keep]
        self.weight[target] = np.asarray(weight)[keep]
        for key, value in self.state.items():
            value[target] = np.asarray(state[key])[keep]
