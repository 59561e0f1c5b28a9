"""Host time per MovieLens-100K batch: jaxrec's batch builder against TorchRec's KJT.

Both sides gather the same rows from the same NumPy columns (`MovieLens100K.batch`'s
vectorized gather); jaxrec then pads to its static shapes (stride and capacity bucket), while
TorchRec builds ``KeyedJaggedTensor.from_lengths_sync`` from ``torch.from_numpy`` views.
Reported: milliseconds per batch (median of repeats) for

- ``jaxrec numpy``: the complete padded batch as NumPy arrays (what a reader yields; a
  jitted step takes NumPy leaves at no extra cost);
- ``jaxrec + device_put``: the same moved with ``jax.device_put`` (``to_device=True``);
- ``torchrec kjt``: the TorchRec KJT of the same batch (and its dense and label tensors);

the three builders interleaved in each repeat, so that a change in the host's load reaches
each alike. ``--steps N`` also measures whether the prefetch hides batch building behind the
train step: ``jaxrec train``'s jitted DCN-v2 step on MovieLens (default config, the batch size
given) run N steps (after a compiling warmup) fed three ways:

- ``step, batches prebuilt``: from a list built beforehand (the step alone);
- ``step, batches built inline``: each batch built in the loop before its step;
- ``step, prefetched``: through :func:`jaxrec.data.prefetch` (a background thread two batches
  ahead), as ``jaxrec train`` runs; ``prefetch queue wait`` is the time per step the loop
  spent waiting for the next batch.

    python benchmarks/host_batching.py [--batch-size 256] [--batches 200] [--steps 300]
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


def _median_ms(fns: dict, batches: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms per batch of each builder, the builders interleaved in every repeat."""
    for fn in fns.values():
        for rows in batches[:5]:
            fn(rows)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for rows in batches:
                fn(rows)
            times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_prefetch(batch_size: int = 512, steps: int = 300) -> dict[str, float]:
    """Milliseconds per train step fed prebuilt, inline-built and prefetched batches, and
    the prefetch queue's wait per step (see the module docstring)."""
    import itertools

    import jax

    from jaxrec.data import prefetch
    from jaxrec.train.config import TrainConfig
    from jaxrec.train.loop import initial_state
    from jaxrec.train.models import make_train_step
    from jaxrec.train.sources import MovieLensSource

    config = TrainConfig(data="movielens", model="dcn", batch_size=batch_size)
    source = MovieLensSource(config)
    model, state, tx = initial_state(config, source)
    train_step = make_train_step(model, tx)
    carry = [state["params"], state["opt_state"]]

    def run(batches) -> tuple[float, float]:
        wait = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            asked = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - asked
            carry[0], carry[1], _ = train_step(carry[0], carry[1], batch)
        jax.block_until_ready(carry[0])
        return (time.perf_counter() - start) / steps * 1e3, wait / steps * 1e3

    prebuilt = list(itertools.islice(source.train_batches(0), steps))
    for batch in prebuilt[:2]:  # compile (the last partial batch is padded: one shape)
        carry[0], carry[1], _ = train_step(carry[0], carry[1], batch)
    alone, _ = run(iter(prebuilt))
    inline, _ = run(source.train_batches(0))
    with prefetch(source.train_batches(0), size=2) as batches:
        prefetched, waited = run(batches)
    return {
        "step, batches prebuilt": alone,
        "step, batches built inline": inline,
        "step, prefetched": prefetched,
        "prefetch queue wait": waited,
    }


def measure(batch_size: int = 256, num_batches: int = 200, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per batch of each builder (see the module docstring)."""
    import jax
    import torch

    torch.set_num_threads(1)  # one host thread, as NumPy (torch's pool thrashes a busy host)
    data = load_movielens_100k()
    order = np.random.default_rng(0).permutation(len(data))
    batches = [order[i : i + batch_size] for i in range(0, num_batches * batch_size, batch_size)]
    fns = {
        "jaxrec numpy": lambda r: data.batch(r, batch_size),
        "jaxrec + device_put": lambda r: jax.block_until_ready(
            data.batch(r, batch_size, to_device=True)
        ),
        "torchrec kjt": lambda r: _torchrec_batch(data, r),
    }
    return _median_ms(fns, batches, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="also time the prefetch (0: no)")
    args = parser.parse_args()
    results = measure(args.batch_size, args.batches, args.repeats)
    base = results["torchrec kjt"]
    for name, ms in results.items():
        print(f"{name:22s} {ms:8.3f} ms/batch  ({ms / base:.2f}x torchrec)")
    if args.steps:
        for name, ms in measure_prefetch(args.batch_size, args.steps).items():
            print(f"{name:28s} {ms:8.3f} ms/step")


if __name__ == "__main__":
    main()
