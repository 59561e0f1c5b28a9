"""MovieLens-100K as a click task: did the user rate the movie 4 or 5?

Each of the 100,000 ratings is one example with label ``rating >= 4`` and eight sparse
features, one bag each (all single ids but ``genre``, a multi-hot bag of the movie's genres):

=============  ===========================================================================
``user``       the user (943 rows)
``item``       the movie (1,682 rows)
``age``        age bucket: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ (7 rows)
``gender``     M / F
``occupation`` one of the 21 occupations
``zip``        the first ``zip_prefix_length`` characters of the zip code
``year``       the release year (one row for "unknown")
``genre``      the movie's genres among GroupLens' 19 (a bag of 1 to 6 ids)
=============  ===========================================================================

Dense features (2): ``age / 100`` and ``(release year - 1900) / 100`` (0 when unknown).
:attr:`MovieLens100K.num_embeddings` gives each feature's number of rows, to size the tables.
:func:`add_user_history` adds a ninth sparse feature, ``history`` (the items the user rated in
the training split), and :func:`add_rating_statistics` four dense ones, both read from the
training split alone.

The files are read from GroupLens' layout (``u.data``, ``u.user``, ``u.item``) or RecBole's
atomic files (``ml-100k.inter``, ``ml-100k.user``, ``ml-100k.item``). Without a path, the copy
of ml-100k inside the ``recbole`` wheel is used, installed for its data alone::

    pip install --no-deps recbole

Example on the wheel's copy::

    >>> data = load_movielens_100k()
    >>> train, test = data.split("random", train_fraction=0.8, seed=0)
    >>> batch = next(train.batches(batch_size=256, shuffle=True))
    >>> batch.sparse.keys()
    ['user', 'item', 'age', 'gender', 'occupation', 'zip', 'year', 'genre']
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxrec.data.batching import make_batch, ragged_gather
from jaxrec.data.synthetic import Batch

FEATURES = ("user", "item", "age", "gender", "occupation", "zip", "year", "genre")
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)  # lower bounds of buckets 1..6; bucket 0 is under 18
RECBOLE_INSTALL = "pip install --no-deps recbole"


@dataclass(frozen=True, eq=False)
class MovieLens100K:
    """Ratings as click examples, with the user and item side tables they index.

    Per example (``N``): ``user``, ``item`` (rows of the side tables), ``rating``,
    ``timestamp``. Per user (``U``): ``user_sparse`` [U, 4] (age bucket, gender, occupation,
    zip prefix) and ``user_age``. Per item (``I``): ``item_year`` (row of the year table),
    ``item_year_value`` (0 when unknown) and the genres as CSR (``genre_offsets`` [I + 1],
    ``genre_ids``).
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    user_sparse: np.ndarray
    user_age: np.ndarray
    item_year: np.ndarray
    item_year_value: np.ndarray
    genre_offsets: np.ndarray
    genre_ids: np.ndarray
    num_embeddings: dict[str, int]
    extra_dense: np.ndarray | None = None  # [N, k] per example, after the 2 dense features
    history_offsets: np.ndarray | None = None  # [U + 1]: CSR of the items each user rated
    history_ids: np.ndarray | None = None
    history_leave_out: bool = False  # drop the example's own item from its history bag

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The sparse features of a batch: :data:`FEATURES`, and ``history`` when added."""
        return FEATURES if self.history_ids is None else (*FEATURES, "history")

    def __len__(self) -> int:
        return len(self.user)

    @property
    def labels(self) -> np.ndarray:
        """float32 [N]: 1 where the rating is 4 or 5."""
        return (self.rating >= 4).astype(np.float32)

    def subset(self, rows: np.ndarray) -> MovieLens100K:
        """The examples ``rows`` (the side tables are shared)."""
        rows = np.asarray(rows)
        return dataclasses.replace(
            self,
            user=self.user[rows],
            item=self.item[rows],
            rating=self.rating[rows],
            timestamp=self.timestamp[rows],
            extra_dense=None if self.extra_dense is None else self.extra_dense[rows],
        )

    def split(
        self, kind: str = "random", train_fraction: float = 0.8, seed: int = 0
    ) -> tuple[MovieLens100K, MovieLens100K]:
        """(train, test): ``"random"`` (a seeded permutation) or ``"time"`` (the earliest
        ``train_fraction`` of the ratings train, the latest test)."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        if kind == "random":
            order = np.random.default_rng(seed).permutation(len(self))
        elif kind == "time":
            order = np.argsort(self.timestamp, kind="stable")
        else:
            raise ValueError(f"unknown split kind {kind!r}; choose 'random' or 'time'")
        cut = int(round(train_fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])

    def batch(
        self, rows: np.ndarray, batch_size: int | None = None, to_device: bool = False
    ) -> Batch:
        """The examples ``rows`` as one :class:`Batch` of stride ``batch_size``
        (default ``len(rows)``), built with NumPy alone (see :func:`make_batch`)."""
        rows = np.asarray(rows)
        user, item = self.user[rows], self.item[rows]
        n = len(rows)
        side = self.user_sparse[user]
        single = (user, item, side[:, 0], side[:, 1], side[:, 2], side[:, 3], self.item_year[item])
        genre_lengths, genre_values = ragged_gather(self.genre_offsets, self.genre_ids, item)
        ones = np.ones(n, np.int32)
        dense = np.stack([self.user_age[user] / 100.0, self.item_year_value[item]], axis=1)
        if self.extra_dense is not None:
            dense = np.concatenate([dense, self.extra_dense[rows]], axis=1)
        lengths, values = [ones] * len(single) + [genre_lengths], [*single, genre_values]
        if self.history_ids is not None:
            history = self._history(user, item)
            lengths, values = [*lengths, history[0]], [*values, history[1]]
        return make_batch(
            self.feature_names,
            lengths,
            values,
            dense,
            self.labels[rows],
            batch_size=n if batch_size is None else batch_size,
            to_device=to_device,
        )

    def _history(self, user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The history bags of examples ``(user, item)``, without the own item if asked."""
        assert self.history_offsets is not None and self.history_ids is not None
        lengths, ids = ragged_gather(self.history_offsets, self.history_ids, user)
        if not self.history_leave_out:
            return lengths, ids
        example = np.repeat(np.arange(len(user)), lengths)
        keep = ids != item[example]
        return np.bincount(example[keep], minlength=len(user)), ids[keep]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        to_device: bool = False,
    ) -> Iterator[Batch]:
        """One epoch of batches of stride ``batch_size``; the last partial batch is padded
        (weights 0) unless ``drop_last``. Wrap in :func:`jaxrec.data.prefetch` to overlap the
        host work with the training step."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else None
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            yield self.batch(rows if order is None else order[rows], batch_size, to_device)


def add_rating_statistics(
    train: MovieLens100K, test: MovieLens100K, prior_count: float = 10.0
) -> tuple[MovieLens100K, MovieLens100K]:
    """``(train, test)`` with four dense features read from the training split alone.

    For the user and for the item of each example: the share of their *other* training
    ratings that are >= 4, smoothed towards the training split's share by ``prior_count``
    pseudo-ratings (the share, too, without the example's own rating), and ``log1p`` of how many other training ratings they have over
    ``log(1000)``. "Other" leaves a training example's own rating out (its label never feeds
    its features); a test example sees all the training ratings and nothing of the test split.

    >>> data = load_movielens_100k()
    >>> train, test = add_rating_statistics(*data.split("random", seed=0))
    >>> train.batch(np.arange(4)).dense.shape, test.extra_dense.shape
    ((4, 6), (20000, 4))
    """
    if prior_count <= 0:
        raise ValueError(f"prior_count must be > 0, got {prior_count}")
    labels = train.labels.astype(np.float64)
    columns: list[tuple[np.ndarray, np.ndarray]] = []
    for key in ("user", "item"):
        rows = max(int(getattr(train, key).max()), int(getattr(test, key).max())) + 1
        sums = np.bincount(getattr(train, key), labels, minlength=rows)
        counts = np.bincount(getattr(train, key), minlength=rows).astype(np.float64)
        own = (labels, 1.0), (0.0, 0.0)  # the rating left out: train's own, none for test
        for split, (own_label, own_count) in zip((train, test), own, strict=True):
            ids = getattr(split, key)
            n = counts[ids] - own_count
            prior = (labels.sum() - own_label) / (len(labels) - own_count) * prior_count
            rate = (sums[ids] - own_label + prior) / (n + prior_count)
            columns.append((rate, np.log1p(n) / np.log(1000.0)))
    extra = [
        np.stack([c for pair in columns[i::2] for c in pair], axis=1).astype(np.float32)
        for i in range(2)
    ]
    return (
        dataclasses.replace(train, extra_dense=extra[0]),
        dataclasses.replace(test, extra_dense=extra[1]),
    )


def add_user_history(
    train: MovieLens100K, test: MovieLens100K
) -> tuple[MovieLens100K, MovieLens100K]:
    """``(train, test)`` with a sparse feature ``history``: the items the user rated in the
    training split, a multi-hot bag over a table of the items' size (pool it with MEAN).

    The bag holds every rated item whatever the rating (which movies a user chose to watch),
    so it carries no label: a bag of the liked items alone would differ between a user's
    positive examples (their own item left out) and negative ones, and give the label away.
    A training example's own item is left out of its bag, so that a training bag looks like
    a test bag (whose item the training split never saw for that user); the test split never
    feeds the bags.

    >>> data = load_movielens_100k()
    >>> train, test = add_user_history(*data.split("random", seed=0))
    >>> batch = train.batch(np.arange(2))
    >>> batch.sparse.keys()[-1], train.num_embeddings["history"]
    ('history', 1682)
    >>> n = np.bincount(train.user, minlength=943)  # training ratings per user
    >>> batch.sparse["history"].lengths().tolist() == (n[train.user[:2]] - 1).tolist()
    True
    """
    users = len(train.user_sparse)
    order = np.lexsort((train.item, train.user))
    offsets = np.zeros(users + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(train.user, minlength=users))
    sizes = {**train.num_embeddings, "history": train.num_embeddings["item"]}
    common = dict(
        history_offsets=offsets, history_ids=train.item[order].astype(np.int32),
        num_embeddings=sizes,
    )  # fmt: skip
    return (
        dataclasses.replace(train, history_leave_out=True, **common),
        dataclasses.replace(test, history_leave_out=False, **common),
    )


def recbole_ml100k_path() -> Path:
    """The ml-100k folder shipped inside the ``recbole`` wheel (not imported: only located)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no path given and the recbole wheel (whose ml-100k copy is the default) is not "
            f"installed; install it for its data alone with `{RECBOLE_INSTALL}` or pass the "
            "folder of u.data/u.user/u.item or ml-100k.inter/.user/.item"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"


def load_movielens_100k(
    path: str | Path | None = None, zip_prefix_length: int = 2
) -> MovieLens100K:
    """Read MovieLens-100K from ``path`` (GroupLens' or RecBole's files; default: the recbole
    wheel's copy, see :func:`recbole_ml100k_path`)."""
    folder = recbole_ml100k_path() if path is None else Path(path)
    if zip_prefix_length < 1:
        raise ValueError(f"zip_prefix_length must be >= 1, got {zip_prefix_length}")
    if (folder / "u.data").exists():
        inter, users, items = _read_grouplens(folder)
    elif (folder / "ml-100k.inter").exists():
        inter, users, items = _read_recbole(folder)
    else:
        raise ValueError(
            f"{folder} holds neither GroupLens' u.data/u.user/u.item nor RecBole's "
            "ml-100k.inter/.user/.item"
        )
    return _assemble(inter, users, items, zip_prefix_length)


def _lines(path: Path, sep: str, skip_header: bool) -> list[list[str]]:
    if not path.exists():
        raise ValueError(f"missing MovieLens file {path}")
    text = path.read_text(encoding="latin-1").splitlines()
    return [line.split(sep) for line in text[int(skip_header) :] if line.strip()]


def _year(text: str) -> int:
    """The year of '01-Jan-1995' or '1995'; 0 when unknown."""
    tail = text.strip()[-4:]
    return int(tail) if tail.isdigit() else 0


def _read_grouplens(folder: Path):
    inter = np.loadtxt(folder / "u.data", dtype=np.int64, ndmin=2)
    users = [row[:5] for row in _lines(folder / "u.user", "|", False)]
    items = []
    for row in _lines(folder / "u.item", "|", False):
        flags = np.asarray(row[-19:], dtype=np.int64)
        items.append((row[0], _year(row[2]), [GENRES[g] for g in np.flatnonzero(flags)]))
    return inter, users, items


def _read_recbole(folder: Path):
    inter = np.loadtxt(folder / "ml-100k.inter", dtype=np.float64, skiprows=1, ndmin=2)
    users = [row[:5] for row in _lines(folder / "ml-100k.user", "\t", True)]
    items = [
        (row[0], _year(row[2]), row[3].split() if len(row) > 3 else [])
        for row in _lines(folder / "ml-100k.item", "\t", True)
    ]
    return inter.astype(np.int64), users, items


def _vocabulary(tokens: list[str]) -> tuple[np.ndarray, int]:
    """Rows of ``tokens`` in their sorted vocabulary, and its size."""
    vocab, rows = np.unique(np.asarray(tokens), return_inverse=True)
    return rows.astype(np.int32), len(vocab)


def _rows_of(ids: np.ndarray, known: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(known)
    pos = np.searchsorted(known, ids, sorter=order).clip(0, len(known) - 1)
    rows = order[pos]
    bad = np.flatnonzero(known[rows] != ids)
    if bad.size:
        raise ValueError(f"rating {bad[0]} names {what} {ids[bad[0]]}, absent from the {what} file")
    return rows.astype(np.int32)


def _assemble(inter: np.ndarray, users, items, zip_prefix_length: int) -> MovieLens100K:
    if inter.ndim != 2 or inter.shape[1] < 4:
        raise ValueError(
            f"ratings need 4 columns (user, item, rating, timestamp), got {inter.shape}"
        )
    user_ids = np.asarray([int(u[0]) for u in users])
    ages = np.asarray([int(u[1]) for u in users])
    age_bucket = np.searchsorted(np.asarray(AGE_BUCKETS), ages, side="right").astype(np.int32)
    gender, n_gender = _vocabulary([u[2] for u in users])
    occupation, n_occupation = _vocabulary([u[3] for u in users])
    zips, n_zip = _vocabulary([u[4][:zip_prefix_length] for u in users])
    item_ids = np.asarray([int(i[0]) for i in items])
    years = np.asarray([i[1] for i in items])
    year_rows, n_year = _vocabulary([str(y) for y in years])
    genre_index = {g: k for k, g in enumerate(GENRES)}
    unknown = [g for i in items for g in i[2] if g not in genre_index]
    if unknown:
        raise ValueError(f"unknown genre {unknown[0]!r}; MovieLens-100K's genres are {GENRES}")
    genre_lengths = np.asarray([len(i[2]) for i in items])
    genre_offsets = np.concatenate([[0], np.cumsum(genre_lengths)]).astype(np.int64)
    genre_ids = np.asarray([genre_index[g] for i in items for g in i[2]], np.int32)
    return MovieLens100K(
        user=_rows_of(inter[:, 0], user_ids, "user"),
        item=_rows_of(inter[:, 1], item_ids, "item"),
        rating=inter[:, 2].astype(np.float32),
        timestamp=inter[:, 3].astype(np.int64),
        user_sparse=np.stack([age_bucket, gender, occupation, zips], axis=1),
        user_age=ages.astype(np.float32),
        item_year=year_rows,
        item_year_value=np.where(years > 0, (years - 1900) / 100.0, 0.0).astype(np.float32),
        genre_offsets=genre_offsets,
        genre_ids=genre_ids,
        num_embeddings={
            "user": len(user_ids),
            "item": len(item_ids),
            "age": len(AGE_BUCKETS) + 1,
            "gender": n_gender,
            "occupation": n_occupation,
            "zip": n_zip,
            "year": n_year,
            "genre": len(GENRES),
        },
    )
