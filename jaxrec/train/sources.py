"""The data of a training run: where batch ``step`` comes from, and the held-out batches.

A source is deterministic in the step: batch ``step`` is the same whether a run gets there
directly or resumes from a checkpoint, which stores :meth:`position` in its metadata.

>>> from jaxrec.train.config import TrainConfig
>>> source = make_source(TrainConfig(num_tables=2, num_rows=50, batch_size=8, eval_batches=1))
>>> source.position(3), source.train_batch(3).sparse.keys()
({'step': 3, 'batch': 3}, ['f0', 'f1'])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxrec.configs import EmbeddingBagConfig, PoolingType
from jaxrec.data.synthetic import Batch, SyntheticClickData
from jaxrec.train.config import TrainConfig

EVAL_OFFSET = 1_000_000  # synthetic eval batches are numbered from here, apart from training's


@dataclass
class Source:
    """Batches of one data set, their tables and the two-tower split of the features."""

    description: str
    feature_sizes: dict[str, int]  # feature -> number of rows of its table
    query_features: tuple[str, ...]
    candidate_features: tuple[str, ...]
    pooling: PoolingType = PoolingType.SUM
    poolings: dict[str, PoolingType] = field(default_factory=dict)  # per feature, over pooling

    def tables(self, config: TrainConfig) -> list[EmbeddingBagConfig]:
        from jaxrec.configs import DataType

        return [
            EmbeddingBagConfig(
                name=f"t_{name}",
                embedding_dim=config.dim,
                num_embeddings=rows,
                feature_names=[name],
                pooling=self.poolings.get(name, self.pooling),
                data_type=DataType[config.data_type],
            )
            for name, rows in self.feature_sizes.items()
        ]

    def position(self, step: int) -> dict[str, int]:
        """Where batch ``step`` is in the data (stored in checkpoints)."""
        return {"step": step, "batch": step}

    def train_batch(self, step: int) -> Batch:
        raise NotImplementedError

    def train_batches(self, start: int) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` (wrap in :func:`jaxrec.data.prefetch`)."""
        return (self.train_batch(step) for step in itertools.count(start))

    def eval_batches(self) -> list[Batch]:
        raise NotImplementedError

    def planted_logits(self) -> np.ndarray | None:
        """The planted model's logits of the eval examples, when the data has one."""
        return None


class SyntheticSource(Source):
    def __init__(self, config: TrainConfig) -> None:
        self.data = SyntheticClickData(
            num_features=config.num_tables, num_rows=config.num_rows, seed=config.seed
        )
        self.config = config
        names = self.data.feature_names
        half = max(1, len(names) // 2)
        super().__init__(
            description=f"synthetic clicks ({config.num_tables} features x {config.num_rows} "
            "ids, labels from a planted model)",
            feature_sizes={name: config.num_rows for name in names},
            query_features=tuple(names[:half]),
            candidate_features=tuple(names[half:]) or tuple(names[:half]),
            pooling=PoolingType.MEAN,  # the planted model scores a bag by its mean
        )

    def train_batch(self, step: int) -> Batch:
        return self.data.batch(self.config.batch_size, step)

    def eval_batches(self) -> list[Batch]:
        c = self.config
        return [self.data.batch(c.batch_size, EVAL_OFFSET + j) for j in range(c.eval_batches)]

    def planted_logits(self) -> np.ndarray:
        c = self.config
        return np.concatenate(
            [self.data.planted_logits(c.batch_size, EVAL_OFFSET + j) for j in range(c.eval_batches)]
        )


def movielens_features(train: Any, test: Any, config: TrainConfig) -> tuple[Any, Any]:
    """``(train, test)`` MovieLens splits with the features ``config`` adds, read from
    ``train`` alone: rating statistics (``rating_stats``), the user-history bag
    (``user_history``)."""
    from jaxrec.data.movielens import add_rating_statistics, add_user_history

    if config.rating_stats:
        train, test = add_rating_statistics(train, test)
    if config.user_history:
        train, test = add_user_history(train, test)
    return train, test


class MovieLensSource(Source):
    """MovieLens-100K, random 80/20 split (seed 0); each epoch reshuffled by (seed, epoch)."""

    def __init__(self, config: TrainConfig) -> None:
        from jaxrec.data.movielens import load_movielens_100k

        data = load_movielens_100k(config.data_path)
        self.train, self.test = movielens_features(
            *data.split("random", train_fraction=0.8, seed=0), config
        )
        self.config = config
        self.steps_per_epoch = -(-len(self.train) // config.batch_size)
        features = self.train.feature_names
        history = ("history",) if "history" in features else ()
        super().__init__(
            description=f"MovieLens-100K ({len(self.train):,} train / {len(self.test):,} "
            "held-out ratings, label rating >= 4)",
            feature_sizes={name: self.train.num_embeddings[name] for name in features},
            query_features=("user", "age", "gender", "occupation", "zip", *history),
            candidate_features=("item", "year", "genre"),
            poolings={"history": PoolingType.MEAN},  # bags of 1 to ~600 rated items
        )

    def position(self, step: int) -> dict[str, int]:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch": batch}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.config.seed, epoch)).permutation(len(self.train))

    def train_batch(self, step: int) -> Batch:
        where = self.position(step)
        b = self.config.batch_size
        rows = self._order(where["epoch"])[where["batch"] * b : (where["batch"] + 1) * b]
        return self.train.batch(rows, b)

    def train_batches(self, start: int) -> Iterator[Batch]:
        epoch, order = None, None
        b = self.config.batch_size
        for step in itertools.count(start):
            where = self.position(step)
            if where["epoch"] != epoch:
                epoch, order = where["epoch"], self._order(where["epoch"])
            yield self.train.batch(order[where["batch"] * b : (where["batch"] + 1) * b], b)

    def eval_batches(self) -> list[Batch]:
        return list(self.test.batches(self.config.batch_size))


class CriteoSource(Source):
    """A Criteo TSV file: the first ``eval_batches`` batches are held out, training streams
    the rest and starts the file over when it ends."""

    def __init__(self, config: TrainConfig) -> None:
        from jaxrec.data.criteo import SPARSE_NAMES, CriteoTSV

        self.reader = CriteoTSV(config.data_path, config.batch_size, config.num_rows)
        self.config = config
        names = list(SPARSE_NAMES)
        super().__init__(
            description=f"Criteo TSV {config.data_path} (hashed to {config.num_rows} rows)",
            feature_sizes={name: config.num_rows for name in names},
            query_features=tuple(names[:13]),
            candidate_features=tuple(names[13:]),
        )
        self._held_out = list(itertools.islice(iter(self.reader), config.eval_batches))
        lines = sum(1 for _ in self.reader._lines())  # counted, not parsed
        self.batches_per_pass = -(-lines // config.batch_size) - len(self._held_out)
        if self.batches_per_pass < 1:
            raise ValueError(
                f"{config.data_path} holds {len(self._held_out)} batches of {config.batch_size}; "
                f"need more than eval_batches ({config.eval_batches}) to train on"
            )

    def position(self, step: int) -> dict[str, int]:
        epoch, batch = divmod(step, self.batches_per_pass)
        return {"step": step, "epoch": epoch, "batch": batch}

    def train_batches(self, start: int) -> Iterator[Batch]:
        skip = len(self._held_out) + self.position(start)["batch"]
        while True:
            yield from itertools.islice(iter(self.reader), skip, skip + self.batches_per_pass)
            skip = len(self._held_out)

    def train_batch(self, step: int) -> Batch:
        return next(self.train_batches(step))

    def eval_batches(self) -> list[Batch]:
        return self._held_out


def make_source(config: TrainConfig) -> Source:
    """The :class:`Source` that ``config.data`` names."""
    kinds: dict[str, Any] = {
        "synthetic": SyntheticSource,
        "movielens": MovieLensSource,
        "criteo": CriteoSource,
    }
    return kinds[config.data](config)
