"""Random sparse batches described bag by bag, the reference the sparse tests compare against."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxrec.sparse import KeyedJaggedTensor


@dataclasses.dataclass
class Bags:
    """``ids[f][b]`` (and ``weights[f][b]``) are the contents of bag ``b`` of key ``keys[f]``."""

    keys: list[str]
    ids: list[list[np.ndarray]]
    weights: list[list[np.ndarray]] | None

    @property
    def stride(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    def lengths(self, key_indices: list[int] | None = None) -> np.ndarray:
        idx = range(len(self.keys)) if key_indices is None else key_indices
        return np.array([len(bag) for f in idx for bag in self.ids[f]], np.int32)

    def values(self, key_indices: list[int] | None = None) -> np.ndarray:
        idx = range(len(self.keys)) if key_indices is None else key_indices
        return np.concatenate([np.zeros(0, np.int64)] + [bag for f in idx for bag in self.ids[f]])

    def flat_weights(self, key_indices: list[int] | None = None) -> np.ndarray | None:
        if self.weights is None:
            return None
        idx = range(len(self.keys)) if key_indices is None else key_indices
        return np.concatenate(
            [np.zeros(0, np.float32)] + [bag for f in idx for bag in self.weights[f]]
        )

    def kjt(self, extra_capacity: int = 0) -> KeyedJaggedTensor:
        """The KJT of these bags (NumPy int64 ids), padded by ``extra_capacity`` entries."""
        kjt = KeyedJaggedTensor(
            keys=self.keys,
            values=self.values(),
            weights=self.flat_weights(),
            lengths=self.lengths(),
            stride=self.stride,
        )
        return kjt.pad_to(kjt.capacity() + extra_capacity) if extra_capacity else kjt


@pytest.fixture
def make_bags():
    """Factory: ``make_bags(num_keys, batch, max_len, weighted=False, seed=0)`` -> Bags.

    Lengths are uniform in [0, max_len], so empty bags are common; ids may repeat.
    """

    def make(num_keys: int, batch: int, max_len: int, weighted: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(0, max_len + 1, size=(num_keys, batch))
        ids = [[rng.integers(0, 50, size=n).astype(np.int64) for n in row] for row in sizes]
        weights = None
        if weighted:
            weights = [[rng.random(n).astype(np.float32) for n in row] for row in sizes]
        return Bags([f"f{i}" for i in range(num_keys)], ids, weights)

    return make
