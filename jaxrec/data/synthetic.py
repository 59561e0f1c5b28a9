"""A built-in click-through data set with a learnable signal.

Each example has dense features [num_dense], one bag of ids per sparse
feature (bag lengths uniform in [min_length, max_length], ids Zipf-skewed as
real categorical data is), and a 0/1 label drawn from a hidden logistic
model (the *planted* model): every (feature, id) has a hidden score, a bag
contributes the mean score of its ids, dense features contribute linearly.
A model that learns the embeddings can therefore beat the base rate, and the
loss falls. :meth:`SyntheticClickData.planted_logits` returns the planted
model's logits of a batch: their AUC is the best any model can reach on it.

Batches are :class:`~jaxrec.sparse.KeyedJaggedTensor`s padded to a capacity
bucket (see :func:`jaxrec.sparse.capacity_bucket`), so a training run
compiles a handful of times, not once per batch.

>>> data = SyntheticClickData(num_features=2, num_rows=100, num_dense=3, seed=0)
>>> batch = data.batch(batch_size=4, index=0)
>>> batch.sparse.keys(), batch.dense.shape, batch.labels.shape
(['f0', 'f1'], (4, 3), (4,))
>>> batch.sparse.capacity() >= int(batch.sparse.lengths().sum())
True
>>> data.planted_logits(batch_size=4, index=0).shape
(4,)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from jaxrec.sparse import KeyedJaggedTensor, capacity_bucket, pad_to_capacity


class Batch(NamedTuple):
    """One training batch: dense features, sparse features, labels."""

    dense: jax.Array  # [B, num_dense] float32
    sparse: KeyedJaggedTensor  # F keys, stride B
    labels: jax.Array  # [B] float32 in {0, 1}
    weights: jax.Array | None = None  # [B] float32: 1 for a real example, 0 for batch padding


@dataclass(frozen=True)
class SyntheticClickData:
    """Deterministic synthetic click data (batch `index` is the same on every call)."""

    num_features: int = 8
    num_rows: int = 10_000
    num_dense: int = 13
    min_length: int = 1
    max_length: int = 8
    zipf_exponent: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_features <= 0 or self.num_rows <= 0 or self.num_dense < 0:
            raise ValueError(
                f"num_features, num_rows must be positive and num_dense >= 0, got "
                f"{self.num_features}, {self.num_rows}, {self.num_dense}"
            )
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(
                f"need 0 <= min_length <= max_length, got {self.min_length}, {self.max_length}"
            )

    @property
    def feature_names(self) -> list[str]:
        return [f"f{i}" for i in range(self.num_features)]

    @functools.cached_property
    def _hidden(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hidden per-id scores, dense weights, and the cumulative id popularity."""
        rng = np.random.default_rng(self.seed)
        scores = rng.normal(0.0, 1.5, (self.num_features, self.num_rows))
        dense_w = rng.normal(0.0, 0.5, self.num_dense)
        ranks = np.arange(1, self.num_rows + 1, dtype=np.float64)
        popularity = ranks**-self.zipf_exponent
        return scores, dense_w, np.cumsum(popularity / popularity.sum())

    def batch(self, batch_size: int, index: int) -> Batch:
        """Batch number `index` of size `batch_size` (every example weighs 1)."""
        return self._draw(batch_size, index)[0]

    def planted_logits(self, batch_size: int, index: int) -> np.ndarray:
        """float64 [batch_size]: the planted model's logits of batch `index` (its labels are
        Bernoulli draws of their sigmoid)."""
        return self._draw(batch_size, index)[1]

    def _draw(self, batch_size: int, index: int) -> tuple[Batch, np.ndarray]:
        scores, dense_w, cdf = self._hidden
        rng = np.random.default_rng((self.seed, index))
        B, F = batch_size, self.num_features
        lengths = rng.integers(self.min_length, self.max_length + 1, (F, B))
        ids = [
            np.minimum(np.searchsorted(cdf, rng.random(int(n))), self.num_rows - 1)
            for n in lengths.sum(axis=1)
        ]
        logit = np.zeros(B)
        for f in range(F):
            bag = np.repeat(np.arange(B), lengths[f])
            total = np.bincount(bag, weights=scores[f, ids[f]], minlength=B)
            logit += total / np.maximum(lengths[f], 1)
        dense = rng.normal(0.0, 1.0, (B, self.num_dense)).astype(np.float32)
        logit = logit / np.sqrt(F) + dense @ dense_w - 0.5
        labels = (rng.random(B) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        kjt = KeyedJaggedTensor(
            keys=self.feature_names,
            values=np.concatenate(ids).astype(np.int32),
            lengths=lengths.reshape(-1).astype(np.int32),
        )
        kjt = pad_to_capacity(kjt, capacity_bucket(int(lengths.sum())))
        batch = Batch(
            dense=jax.numpy.asarray(dense),
            sparse=kjt,
            labels=jax.numpy.asarray(labels),
            weights=jax.numpy.ones(B, jax.numpy.float32),
        )
        return batch, logit
