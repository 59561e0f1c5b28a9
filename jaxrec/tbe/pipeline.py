"""A training loop that prefetches the next batch's rows while the current step runs.

:func:`prefetch_pipeline` drives :class:`~jaxrec.tbe.CachedTBE` as TorchRec's prefetch
pipeline drives FBGEMM's cache: batch ``n + 2``'s inputs are checked on a thread while
step ``n`` runs; for batch ``n + 1`` it maps the ids onto the caches and
reads the victims' rows *before* dispatching step ``n`` (the victims are never slots of
batch ``n``: those are locked, as FBGEMM locks them), then, while step ``n`` runs (JAX
dispatches it asynchronously), writes the victims back to host memory and gathers the
missing rows, and finally loads them into step ``n``'s output. Shapes are fixed, so
nothing recompiles per batch, and the tables equal the sequential run's bit for bit.

>>> import jax, numpy as np
>>> from jaxrec import tbe
>>> op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
...     [(50, 4, tbe.EmbeddingLocation.MANAGED_CACHING, tbe.ComputeDevice.CPU)],
...     optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD, cache_load_factor=0.5)
>>> cached = tbe.CachedTBE(op, ways=5)
>>> state, caches = cached.init(seed=0)
>>> batches = [(np.array([1, 2, 3]), np.array([0, 1, 3])), (np.array([3, 9]), np.array([0, 1, 2]))]
>>> def step(state, indices, batch):
...     return state, float(cached(state, indices, batch[1]).sum())
>>> state, caches, outs = prefetch_pipeline(cached, step, state, caches, batches)
>>> len(outs)
2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxrec.tbe.cache import CacheState
from jaxrec.tbe.managed import CachedTBE
from jaxrec.tbe.state import TBEState

__all__ = ["prefetch_pipeline"]


def prefetch_pipeline(
    cached: CachedTBE,
    step: Callable[[TBEState, Any, Any], tuple[TBEState, Any]],
    state: TBEState,
    caches: dict[str, CacheState],
    batches: Iterable[Any],
    *,
    indices_and_offsets: Callable[[Any], tuple[Any, Any]] = lambda batch: (batch[0], batch[1]),
) -> tuple[TBEState, dict[str, CacheState], list[Any]]:
    """Run ``step`` over ``batches`` with each next batch prefetched during the current step.

    Args:
      cached: the host-backed TBE.
      step: ``step(state, indices, batch) -> (state, output)``: one training step (usually
        jitted, donating ``state``) on the prefetched ``indices`` (slot ids) of ``batch``.
      state, caches: what :meth:`CachedTBE.init` (or an earlier run) returned.
      batches: any iterable; ``indices_and_offsets(batch)`` gives its TBE inputs (default:
        the batch's first two entries).

    Returns:
      ``(state, caches, outputs)``: the last state and cache metadata, and each step's output.
    """
    outputs: list[Any] = []
    iterator = iter(batches)
    current = next(iterator, None)
    if current is None:
        return state, caches, outputs
    ready = cached.prefetch(state, caches, *indices_and_offsets(current))
    state, caches = ready.state, ready.caches
    with ThreadPoolExecutor(1, thread_name_prefix="jaxrec-input-checks") as checker:

        def check(batch):  # on the thread, while the main thread runs a step and a prefetch
            return (
                None
                if batch is None
                else checker.submit(cached.check_inputs, *indices_and_offsets(batch))
            )

        following = next(iterator, None)
        checking = check(following)
        while current is not None:
            pending = None
            if following is not None:
                pending = cached.begin_prefetch(
                    state, caches, None, None, locked=ready.slots, checked=checking.result()
                )
            after = next(iterator, None)
            checking = check(after)
            state, output = step(state, ready.indices, current)
            outputs.append(output)
            if pending is not None:
                ready = cached.finish_prefetch(state, pending)
                state, caches = ready.state, pending.caches
            current, following = following, after
    return state, caches, outputs
