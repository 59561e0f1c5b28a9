"""Criteo's click logs in their TSV layout, streamed batch by batch.

One line per example, 40 tab-separated columns: the 0/1 label, 13 integer features
(``int_0..int_12``, possibly empty or negative) and 26 categorical features
(``cat_0..cat_25``, 32-bit hex hashes, possibly empty). The Kaggle (Display Advertising
Challenge) ``train.txt`` and the Terabyte ``day_0 .. day_23`` files share it; pass one path
or several (read in order; ``.gz`` files are decompressed on the fly).

Never more than one batch of lines is in memory. As the DLRM reference does:

- dense features are ``log(x + 1)`` with negative values clamped to 0 and empty ones 0;
- a categorical value is ``int(hex, 16) % num_embeddings[f]`` (empty is 0).

>>> import tempfile, os
>>> line = "1\\t" + "\\t".join(["5"] * 13) + "\\t" + "\\t".join(["a1b2c3d4"] * 26) + "\\n"
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = os.path.join(tmp, "train.txt")
...     _ = open(path, "w").write(line * 3)
...     batch = next(iter(CriteoTSV(path, batch_size=4, num_embeddings=1000)))
>>> batch.labels.tolist(), batch.weights.tolist(), batch.sparse.values()[:2].tolist()
([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [316, 316])
"""

from __future__ import annotations

import gzip
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from jaxrec.data.batching import make_batch
from jaxrec.data.synthetic import Batch

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES = tuple(f"int_{i}" for i in range(NUM_DENSE))
SPARSE_NAMES = tuple(f"cat_{i}" for i in range(NUM_SPARSE))
_COLUMNS = 1 + NUM_DENSE + NUM_SPARSE

# ASCII byte -> hex digit value; -1 for a byte that is not a hex digit.
_NIBBLE = np.full(256, -1, np.int64)
for _digits, _base in ((b"0123456789", 0), (b"abcdef", 10), (b"ABCDEF", 10)):
    _NIBBLE[np.frombuffer(_digits, np.uint8)] = np.arange(len(_digits)) + _base


def parse_hex(column: np.ndarray) -> np.ndarray:
    """int64 values of a bytes array of hex strings (up to 15 digits; empty is 0), vectorized.

    >>> parse_hex(np.array([b"ff", b"", b"a1b2c3d4"])).tolist()
    [255, 0, 2712847316]
    """
    column = np.asarray(column, dtype=np.bytes_)
    width = column.dtype.itemsize
    if width > 15:
        raise ValueError(f"hex values longer than 15 digits do not fit int64 (width {width})")
    raw = column.view(np.uint8).reshape(len(column), width)
    digits = _NIBBLE[raw]
    real = raw != 0  # numpy pads shorter strings with NUL bytes on the right
    bad = real & (digits < 0)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"{column[i]!r} is not a hexadecimal value")
    # Read every string as `width` digits (the NUL padding as zeros), then drop the padding's
    # digits: a string of n digits is the full-width value shifted right by 4 * (width - n).
    full = np.where(real, digits, 0) @ (16 ** np.arange(width - 1, -1, -1, dtype=np.int64))
    return full >> (4 * (width - real.sum(axis=1)))


def _table_sizes(num_embeddings: int | Sequence[int]) -> np.ndarray:
    sizes = np.broadcast_to(np.asarray(num_embeddings, np.int64), (NUM_SPARSE,))
    if (sizes < 1).any():
        raise ValueError(f"num_embeddings must be >= 1 for every feature, got {sizes.tolist()}")
    return sizes


def parse_lines(lines: list[bytes], num_embeddings: int | Sequence[int]) -> tuple[np.ndarray, ...]:
    """(dense [n, 13] float32, sparse [n, 26] int64, labels [n] float32) of Criteo TSV lines.

    >>> row = b"0\\t-3\\t\\t7" + b"\\t" * 10 + b"\\t10" + b"\\t" * 25 + b"\\n"
    >>> dense, sparse, labels = parse_lines([row], 7)
    >>> dense[0, :3].astype(float).round(4).tolist(), sparse[0, :2].tolist(), labels.tolist()
    ([0.0, 0.0, 2.0794], [2, 0], [0.0])
    """
    sizes = _table_sizes(num_embeddings)
    fields = b"\t".join(line.rstrip(b"\r\n") for line in lines).split(b"\t")
    if len(fields) != _COLUMNS * len(lines):
        for i, line in enumerate(lines):
            count = line.rstrip(b"\r\n").count(b"\t") + 1
            if count != _COLUMNS:
                raise ValueError(
                    f"line {i + 1} of the batch has {count} columns, Criteo's TSV layout has "
                    f"{_COLUMNS} (label, {NUM_DENSE} integer, {NUM_SPARSE} categorical)"
                )
    table = np.array(fields, dtype=np.bytes_).reshape(len(lines), _COLUMNS)
    numbers = table[:, : 1 + NUM_DENSE]
    try:
        ints = np.where(numbers == b"", b"0", numbers).astype(np.int64)
    except ValueError as error:
        raise ValueError(f"a label or integer feature is not an integer: {error}") from None
    labels = ints[:, 0]
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"labels must be 0 or 1, got {labels[(labels != 0) & (labels != 1)][0]}")
    dense = np.log1p(np.maximum(ints[:, 1:], 0)).astype(np.float32)
    hashes = parse_hex(table[:, 1 + NUM_DENSE :].reshape(-1)).reshape(len(lines), NUM_SPARSE)
    return dense, hashes % sizes, labels.astype(np.float32)


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"Criteo file {path} does not exist")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@dataclass(frozen=True)
class CriteoTSV:
    """Batches (dense, KJT of the 26 ``cat_*`` keys, labels) streamed from Criteo TSV files.

    ``num_embeddings`` is the table size of every feature (one int) or of each (26 ints).
    Every batch has stride ``batch_size``; the last partial one is padded (weights 0) unless
    ``drop_last``. ``max_rows`` stops early. Iterating again starts from the first file.
    """

    paths: str | os.PathLike | Sequence[str | os.PathLike]
    batch_size: int
    num_embeddings: int | Sequence[int]
    drop_last: bool = False
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        _table_sizes(self.num_embeddings)

    def _files(self) -> list[str | os.PathLike]:
        if isinstance(self.paths, (str, os.PathLike)):
            return [self.paths]
        return list(self.paths)

    def _lines(self) -> Iterator[bytes]:
        for path in self._files():
            with _open(path) as f:
                yield from (line for line in f if line.strip())

    def __iter__(self) -> Iterator[Batch]:
        lines = self._lines()
        if self.max_rows is not None:
            lines = itertools.islice(lines, self.max_rows)
        ones = [np.ones(0, np.int32)]
        while chunk := list(itertools.islice(lines, self.batch_size)):
            if self.drop_last and len(chunk) < self.batch_size:
                return
            dense, sparse, labels = parse_lines(chunk, self.num_embeddings)
            if len(ones[0]) != len(chunk):
                ones = [np.ones(len(chunk), np.int32)] * NUM_SPARSE
            yield make_batch(
                SPARSE_NAMES, ones, list(sparse.T), dense, labels, batch_size=self.batch_size
            )
