"""Host-side batch building: vectorized KJTs, static shapes, background prefetch.

Every batch a reader yields has the same static shapes, so a training step compiles once per
capacity bucket and never for a new batch size:

- the **batch dimension** is always ``batch_size``: a partial batch (the last of an epoch) is
  padded with empty bags, zero dense rows, zero labels and zero example weights;
  ``Batch.weights`` is 1 for a real example and 0 for padding (multiply losses and metrics by it);
- the **values** are padded to :func:`jaxrec.sparse.capacity_bucket` of the number of ids.

Building is NumPy only (no Python loop per example): bags of a CSR table are gathered with
:func:`ragged_gather` and the KJT is one concatenation. :func:`prefetch` runs a batch iterator in
a background thread so that the host builds batch ``i + 1`` while the device runs step ``i``.

>>> import numpy as np
>>> batch = make_batch(
...     keys=["user", "genre"],
...     lengths=[np.array([1, 1]), np.array([2, 0])],
...     values=[np.array([7, 8]), np.array([3, 4])],
...     dense=np.ones((2, 1)), labels=np.array([1.0, 0.0]), batch_size=4)
>>> batch.sparse.stride(), batch.sparse.lengths().tolist()
(4, [1, 1, 0, 0, 2, 0, 0, 0])
>>> batch.sparse.values()[:4].tolist(), batch.weights.tolist()
([7, 8, 3, 4], [1.0, 1.0, 0.0, 0.0])
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import jax
import numpy as np

from jaxrec.data.synthetic import Batch
from jaxrec.sparse import KeyedJaggedTensor, capacity_bucket

T = TypeVar("T")


def ragged_gather(
    offsets: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bags ``rows`` of a CSR table (``offsets`` [R + 1], ``values``): their lengths and ids.

    Vectorized: one ``np.repeat`` and one gather, whatever the number of rows.

    >>> offsets, values = np.array([0, 2, 2, 5]), np.array([10, 11, 20, 21, 22])
    >>> lengths, ids = ragged_gather(offsets, values, np.array([2, 1, 0]))
    >>> lengths.tolist(), ids.tolist()
    ([3, 0, 2], [20, 21, 22, 10, 11])
    """
    rows = np.asarray(rows)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return lengths, values[np.arange(ends[-1] if ends.size else 0) + shift]


def make_batch(
    keys: Sequence[str],
    lengths: Sequence[np.ndarray],
    values: Sequence[np.ndarray],
    dense: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    weights: np.ndarray | None = None,
    min_capacity: int = 128,
    to_device: bool = False,
) -> Batch:
    """A :class:`Batch` of stride ``batch_size`` from ``n <= batch_size`` examples.

    ``lengths[f]`` [n] and ``values[f]`` (``sum(lengths[f])`` ids) are the bags of key
    ``keys[f]``; ``dense`` is [n, D], ``labels`` [n]. Rows ``n..batch_size-1`` are padding
    (empty bags, zeros, weight 0); ``weights`` (default 1) weighs the real examples. Values
    are padded to ``capacity_bucket(total ids, minimum=min_capacity)``.

    The leaves are NumPy arrays: a jitted step takes them as they are and moves them with its
    arguments (measured on the CPU: no slower than device arrays), whereas ``jax.device_put``
    costs tens of microseconds per array. ``to_device=True`` moves them here.
    """
    n = len(labels)
    if len(keys) != len(lengths) or len(keys) != len(values):
        raise ValueError(
            f"need one lengths and one values array per key: {len(keys)} keys, "
            f"{len(lengths)} lengths, {len(values)} values"
        )
    if n > batch_size:
        raise ValueError(f"{n} examples do not fit a batch of batch_size {batch_size}")
    dense = np.asarray(dense, np.float32)
    if dense.ndim != 2 or dense.shape[0] != n:
        raise ValueError(f"dense must be [{n}, num_dense], got shape {dense.shape}")
    all_lengths = np.zeros((len(keys), batch_size), np.int32)
    for f, (key, bag_lengths, ids) in enumerate(zip(keys, lengths, values, strict=True)):
        if len(bag_lengths) != n or int(np.sum(bag_lengths)) != len(ids):
            raise ValueError(
                f"key {key!r}: {len(bag_lengths)} lengths summing to {int(np.sum(bag_lengths))} "
                f"for {n} examples and {len(ids)} ids; need {n} lengths summing to the ids"
            )
        all_lengths[f, :n] = bag_lengths
    total = int(all_lengths.sum())
    buffer = np.zeros(capacity_bucket(total, minimum=min_capacity), np.int32)
    if values:
        np.concatenate(values, out=buffer[:total], casting="unsafe")
    padded_dense = np.zeros((batch_size, dense.shape[1]), np.float32)
    padded_dense[:n] = dense
    padded_labels = np.zeros(batch_size, np.float32)
    padded_labels[:n] = labels
    example_weights = np.zeros(batch_size, np.float32)
    example_weights[:n] = 1.0 if weights is None else weights
    leaves = (padded_dense, buffer, all_lengths.reshape(-1), padded_labels, example_weights)
    dense_d, values_d, lengths_d, labels_d, weights_d = (
        jax.device_put(leaves) if to_device else leaves
    )
    # Built exactly above (lengths >= 0, their sum within the capacity): no checks needed.
    kjt = KeyedJaggedTensor._make(tuple(keys), batch_size, values_d, lengths_d)
    return Batch(dense=dense_d, sparse=kjt, labels=labels_d, weights=weights_d)


class Prefetch(Iterator[T], Generic[T]):
    """An iterator that runs ``source`` in a background thread, ``size`` items ahead.

    An exception in the source is raised here, at the item where it happened. ``close()``
    (or leaving a ``with`` block) stops the thread early.
    """

    _DONE = object()

    def __init__(self, source: Iterable[T], size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(iter(source),), daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
        except BaseException as error:  # re-raised in the consumer
            self._put((self._DONE, error))
            return
        self._put((self._DONE, None))

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._DONE:
            self._finished = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the background thread and drop what it has built."""
        self._stop.set()
        self._finished = True
        self._thread.join()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch(source: Iterable[T], size: int = 2) -> Prefetch[T]:
    """Iterate ``source`` in a background thread, keeping up to ``size`` items ready.

    >>> list(prefetch(iter(range(5))))
    [0, 1, 2, 3, 4]
    """
    return Prefetch(source, size)
