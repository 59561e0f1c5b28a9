"""A table group in host memory: its rows and optimizer state rows as NumPy arrays.

The cache (:mod:`jaxrec.tbe.cache`) moves rows between here and the device: the rows a
batch misses are read (:meth:`HostTable.read`) and sent to their cache slots, and the
rows the cache evicts come back and are written here (:meth:`HostTable.write`). Rows are
kept in the table's dtype, state rows in the optimizer's, so a row's round trip through
the cache is exact.

Host memory is NumPy's: it works with every JAX backend and lets the host gather and
scatter rows while the device computes. (JAX 0.10's CPU backend also accepts
``memory_kind="pinned_host"`` arrays and gathers from them inside ``jit`` under
``jax.experimental.compute_on("device_host")`` when the indices are placed on the host
too; ``benchmarks/gpu_check_cache.py`` times the NumPy path, which is the one built here.)

>>> import numpy as np
>>> table = HostTable(np.arange(8.0, dtype=np.float32).reshape(4, 2),
...                   {"momentum1": np.zeros(4, np.float32)})
>>> table.write(np.array([2, -1]), np.ones((2, 2), np.float32),
...             {"momentum1": np.array([5.0, 9.0], np.float32)})
>>> table.weight[2].tolist(), table.state["momentum1"].tolist()
([1.0, 1.0], [0.0, 0.0, 5.0, 0.0])
>>> w, s = table.read(np.array([2, 0]))
>>> w.tolist(), s["momentum1"].tolist()
([[1.0, 1.0], [0.0, 1.0]], [5.0, 0.0])
"""

from __future__ import annotations

import numpy as np

__all__ = ["HostTable"]


class HostTable:
    """Rows ``[R, D]`` and optimizer state rows (leading dim ``R``) in host memory.

    Args:
      weight: the group's stacked table ``[R, D]``.
      state: the optimizer's state arrays, each with leading dim ``R`` (``{}`` for SGD).
    """

    def __init__(self, weight: np.ndarray, state: dict[str, np.ndarray]) -> None:
        self.weight = np.ascontiguousarray(weight)
        if self.weight.ndim != 2:
            raise ValueError(f"a host table is [rows, dim], got shape {self.weight.shape}")
        self.state = {key: np.ascontiguousarray(value) for key, value in state.items()}
        for key, value in self.state.items():
            if value.shape[:1] != self.weight.shape[:1]:
                raise ValueError(
                    f"state {key!r} has shape {value.shape}; its leading dim must be the "
                    f"table's {self.weight.shape[0]} rows"
                )

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

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
