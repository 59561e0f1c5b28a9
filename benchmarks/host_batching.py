"""Host time per MovieLens-100K batch: jaxrec's batch builder against TorchRec's KJT.

Both sides gather the same rows from the same NumPy columns (`MovieLens100K.batch`'s
vectorized gather); jaxrec then pads to its static shapes (stride and capacity bucket), while
TorchRec builds ``KeyedJaggedTensor.from_lengths_sync`` from ``torch.from_numpy`` views.
Reported: milliseconds per batch (median of repeats) for

- ``jaxrec numpy``: the complete padded batch as NumPy arrays (what a reader yields; a
  jitted step takes NumPy leaves at no extra cost);
- ``jaxrec + device_put``: the same moved with ``jax.device_put`` (``to_device=True``);
- ``torchrec kjt``: the TorchRec KJT of the same batch (and its dense and label tensors);

    python benchmarks/host_batching.py [--batch-size 256] [--batches 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from jaxrec.data.movielens import FEATURES, load_movielens_100k


def _torchrec_batch(data, rows):
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchKJT

    from jaxrec.data.batching import ragged_gather

    user, item = data.user[rows], data.item[rows]
    side = data.user_sparse[user]
    single = (user, item, side[:, 0], side[:, 1], side[:, 2], side[:, 3], data.item_year[item])
    genre_lengths, genre_values = ragged_gather(data.genre_offsets, data.genre_ids, item)
    ones = np.ones(len(rows), np.int32)
    lengths = np.concatenate([ones] * len(single) + [genre_lengths.astype(np.int32)])
    values = np.concatenate([*single, genre_values]).astype(np.int64)
    dense = np.stack([data.user_age[user] / 100.0, data.item_year_value[item]], axis=1)
    kjt = TorchKJT.from_lengths_sync(
        keys=list(FEATURES), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    return torch.from_numpy(dense.astype(np.float32)), kjt, torch.from_numpy(data.labels[rows])


def _median_ms(fn, batches: list[np.ndarray], repeats: int) -> float:
    for rows in batches[:5]:
        fn(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for rows in batches:
            fn(rows)
        times.append((time.perf_counter() - start) / len(batches) * 1e3)
    return statistics.median(times)


def measure(batch_size: int = 256, num_batches: int = 200, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each builder (see the module docstring)."""
    import jax
    import torch

    torch.set_num_threads(1)  # one host thread, as NumPy (torch's pool thrashes a busy host)
    data = load_movielens_100k()
    order = np.random.default_rng(0).permutation(len(data))
    batches = [order[i : i + batch_size] for i in range(0, num_batches * batch_size, batch_size)]
    return {
        "jaxrec numpy": _median_ms(lambda r: data.batch(r, batch_size), batches, repeats),
        "jaxrec + device_put": _median_ms(
            lambda r: jax.block_until_ready(data.batch(r, batch_size, to_device=True)),
            batches,
            repeats,
        ),
        "torchrec kjt": _median_ms(lambda r: _torchrec_batch(data, r), batches, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = measure(args.batch_size, args.batches, args.repeats)
    base = results["torchrec kjt"]
    for name, ms in results.items():
        print(f"{name:22s} {ms:8.3f} ms/batch  ({ms / base:.2f}x torchrec)")


if __name__ == "__main__":
    main()
