"""RecMetrics as functional state: ``init`` / ``update`` / ``compute``, jit-safe.

Each metric is a :class:`RecMetric` of three pure functions (as an optax transformation is):

- ``init()`` returns the state (a NamedTuple of arrays);
- ``update(state, predictions, labels, weights=None)`` folds in one batch (inside a jitted
  step, with static batch shapes; ``weights`` 0 drops padded examples);
- ``compute(state)`` returns ``{"window_<name>": ..., "lifetime_<name>": ...}``.

As TorchRec's RecMetrics keep them, *lifetime* covers every update so far and *window* the
most recent ones: here the last ``window_batches`` updates (TorchRec's ``window_size`` counts
examples; with batches of ``B`` examples it keeps the last ``window_size // B`` of them).
Predictions are probabilities (``jax.nn.sigmoid(logits)``) for the classification metrics,
and ``[queries, candidates]`` scores for the retrieval ones.

Sums are kept in float32 (JAX's default): per-batch sums are added, so the relative error of a
lifetime over ``m`` batches grows like ``m * 6e-8``.

>>> import jax, jax.numpy as jnp
>>> metric = combine(ne(), auc(window_batches=2), calibration())
>>> state = metric.init(batch_size=4)
>>> update = jax.jit(metric.update)
>>> state = update(state, jnp.array([0.9, 0.2, 0.6, 0.3]), jnp.array([1.0, 0.0, 1.0, 0.0]))
>>> {k: round(float(v), 4) for k, v in sorted(metric.compute(state).items())}
{'lifetime_calibration': 1.0, 'lifetime_ne': 0.4314, 'window_auc': 1.0, 'window_calibration': 1.0, 'window_ne': 0.4314}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.metrics import functional

Array = jax.Array


class RecMetric(NamedTuple):
    """A metric as pure functions: ``init(batch_size)``, ``update(state, predictions, labels,
    weights=None)``, ``compute(state) -> dict``."""

    init: Callable[..., Any]
    update: Callable[..., Any]
    compute: Callable[[Any], dict[str, Array]]


class SumState(NamedTuple):
    """Running sums: ``lifetime`` [K], ``window`` [window_batches, K] (a ring of the last
    updates' sums) and ``count``, the number of updates so far."""

    lifetime: Array
    window: Array
    count: Array


class AUCState(NamedTuple):
    """Raw (prediction, label, weight) triples: ``window`` [window_batches, 3, B] (a ring of
    the last updates), ``lifetime`` [3, lifetime_capacity], ``filled`` entries of it, and
    ``overflow`` when more examples came than it holds (lifetime AUC is then NaN)."""

    window: Array
    count: Array
    lifetime: Array
    filled: Array
    overflow: Array


def _check_window(window_batches: int) -> None:
    if window_batches < 1:
        raise ValueError(f"window_batches must be >= 1, got {window_batches}")


def _weights(predictions: Array, weights: Array | None) -> Array:
    batch = predictions.shape[0]
    if weights is None:
        return jnp.ones((batch,), jnp.float32)
    if weights.shape != (batch,):
        raise ValueError(f"weights must be [{batch}] (one per example), got {weights.shape}")
    return weights.astype(jnp.float32)


def _sum_metric(
    name: str,
    num_sums: int,
    sums: Callable[[Array, Array, Array], Array],
    finish: Callable[[Array], Array],
    window_batches: int,
) -> RecMetric:
    """A metric whose state is ``num_sums`` additive sums per batch."""
    _check_window(window_batches)

    def init(batch_size: int | None = None) -> SumState:
        del batch_size  # sums do not depend on it
        return SumState(
            lifetime=jnp.zeros((num_sums,), jnp.float32),
            window=jnp.zeros((window_batches, num_sums), jnp.float32),
            count=jnp.zeros((), jnp.int32),
        )

    def update(
        state: SumState, predictions: Array, labels: Array, weights: Array | None = None
    ) -> SumState:
        if predictions.shape != labels.shape:
            raise ValueError(
                f"{name}: predictions {predictions.shape} and labels {labels.shape} differ"
            )
        batch = sums(
            predictions.astype(jnp.float32),
            labels.astype(jnp.float32),
            _weights(predictions, weights),
        )
        slot = state.count % window_batches
        return SumState(
            lifetime=state.lifetime + batch,
            window=state.window.at[slot].set(batch),
            count=state.count + 1,
        )

    def compute(state: SumState) -> dict[str, Array]:
        return {
            f"window_{name}": finish(state.window.sum(axis=0)),
            f"lifetime_{name}": finish(state.lifetime),
        }

    return RecMetric(init, update, compute)


def _ratio(num: Array, den: Array) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def _logs(p: Array, eta: float) -> tuple[Array, Array]:
    """``log(p)`` and ``log(1 - p)`` of ``p`` clamped to ``[eta, 1 - eta]``; the clamp is applied
    to ``p`` and ``1 - p`` separately, as float32 rounds ``1 - eta`` to 1."""
    return jnp.log(jnp.maximum(p, eta)), jnp.log(jnp.maximum(1.0 - p, eta))


def _cross_entropy(p: Array, y: Array, w: Array, eta: float) -> Array:
    log_p, log_q = _logs(p, eta)
    return -w * (jnp.where(y > 0, y * log_p, 0.0) + jnp.where(y < 1, (1.0 - y) * log_q, 0.0))


def _binary_sums(p: Array, y: Array, w: Array, eta: float) -> Array:
    """[cross-entropy sum, weight sum, positive weight, negative weight]."""
    return jnp.stack(
        [_cross_entropy(p, y, w, eta).sum(), w.sum(), (w * y).sum(), (w * (1.0 - y)).sum()]
    )


def ne(window_batches: int = 100, eta: float = 1e-12) -> RecMetric:
    """Normalized entropy, TorchRec's definition: the weighted cross-entropy of the
    predictions divided by that of predicting the mean label ``p = W_pos / W``:

    ``NE = sum_i w_i CE(p_i, y_i) / (-W_pos log p - W_neg log(1 - p))``

    with predictions and ``p`` clamped to ``[eta, 1 - eta]`` (the logarithm's base cancels).
    Below 1 the model beats the base rate.
    """

    def finish(s: Array) -> Array:
        log_mean, log_rest = _logs(_ratio(s[2], jnp.maximum(s[1], eta)), eta)
        norm = -s[2] * log_mean - s[3] * log_rest
        return _ratio(s[0], norm)

    return _sum_metric("ne", 4, lambda p, y, w: _binary_sums(p, y, w, eta), finish, window_batches)


def log_loss(window_batches: int = 100, eta: float = 1e-12) -> RecMetric:
    """Weighted mean binary cross-entropy in nats, predictions clamped to ``[eta, 1 - eta]``
    (scikit-learn's ``log_loss``; TorchRec's NE ``logloss`` is the same in bits)."""
    return _sum_metric(
        "log_loss",
        4,
        lambda p, y, w: _binary_sums(p, y, w, eta),
        lambda s: _ratio(s[0], s[1]),
        window_batches,
    )


def calibration(window_batches: int = 100) -> RecMetric:
    """``sum_i w_i p_i / sum_i w_i y_i``: predicted over observed positives (1 is calibrated)."""
    return _sum_metric(
        "calibration",
        2,
        lambda p, y, w: jnp.stack([(w * p).sum(), (w * y).sum()]),
        lambda s: _ratio(s[0], s[1]),
        window_batches,
    )


def accuracy(window_batches: int = 100, threshold: float = 0.5) -> RecMetric:
    """Weighted fraction with ``(p >= threshold) == y`` (TorchRec's accuracy)."""
    return _sum_metric(
        "accuracy",
        2,
        lambda p, y, w: jnp.stack([(w * ((p >= threshold) == y)).sum(), w.sum()]),
        lambda s: _ratio(s[0], s[1]),
        window_batches,
    )


def mse(window_batches: int = 100) -> RecMetric:
    """Weighted mean squared error ``sum_i w_i (p_i - y_i)^2 / sum_i w_i``."""
    return _sum_metric(
        "mse",
        2,
        lambda p, y, w: jnp.stack([(w * (p - y) ** 2).sum(), w.sum()]),
        lambda s: _ratio(s[0], s[1]),
        window_batches,
    )


def _retrieval(
    name: str, per_query: Callable[[Array, Array], Array], window_batches: int
) -> RecMetric:
    def sums(scores: Array, labels: Array, w: Array) -> Array:
        if scores.ndim != 2:
            raise ValueError(f"{name}: scores must be [queries, candidates], got {scores.shape}")
        counted = w * (labels > 0).any(axis=1)
        return jnp.stack([(counted * per_query(scores, labels)).sum(), counted.sum()])

    return _sum_metric(name, 2, sums, lambda s: _ratio(s[0], s[1]), window_batches)


def recall_at_k(k: int, window_batches: int = 100) -> RecMetric:
    """Mean :func:`~jaxrec.metrics.functional.recall_at_k` over queries (``weights`` per
    query) that have a relevant candidate; inputs are ``[queries, candidates]``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _retrieval(f"recall@{k}", lambda s, y: functional.recall_at_k(s, y, k), window_batches)


def ndcg_at_k(k: int, window_batches: int = 100) -> RecMetric:
    """Mean :func:`~jaxrec.metrics.functional.ndcg_at_k` over queries (``weights`` per query)
    that have a relevant candidate; inputs are ``[queries, candidates]``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _retrieval(f"ndcg@{k}", lambda s, y: functional.ndcg_at_k(s, y, k), window_batches)


def auc(window_batches: int = 100, lifetime_capacity: int = 0) -> RecMetric:
    """Exact AUC (:func:`~jaxrec.metrics.functional.auc`, ties as scikit-learn) over the raw
    predictions of the last ``window_batches`` updates, as TorchRec's AUC keeps its window.

    Lifetime AUC needs every prediction: it is reported when ``lifetime_capacity > 0``, over a
    buffer of that many examples, and is NaN once more examples than that have come (never a
    silent AUC of a subset). ``init(batch_size)`` needs the static batch size.
    """
    _check_window(window_batches)
    if lifetime_capacity < 0:
        raise ValueError(f"lifetime_capacity must be >= 0, got {lifetime_capacity}")

    def init(batch_size: int) -> AUCState:
        if batch_size < 1:
            raise ValueError(f"auc.init needs the batch size (>= 1), got {batch_size}")
        return AUCState(
            window=jnp.zeros((window_batches, 3, batch_size), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            lifetime=jnp.zeros((3, lifetime_capacity), jnp.float32),
            filled=jnp.zeros((), jnp.int32),
            overflow=jnp.zeros((), bool),
        )

    def update(
        state: AUCState, predictions: Array, labels: Array, weights: Array | None = None
    ) -> AUCState:
        batch = state.window.shape[2]
        if predictions.shape != (batch,) or labels.shape != (batch,):
            raise ValueError(
                f"auc: predictions {predictions.shape} and labels {labels.shape} must be "
                f"[{batch}], the batch size given to init"
            )
        triple = jnp.stack(
            [
                predictions.astype(jnp.float32),
                labels.astype(jnp.float32),
                _weights(predictions, weights),
            ]
        )
        fits = state.filled + batch <= lifetime_capacity
        lifetime = state.lifetime
        if lifetime_capacity >= batch:
            start = jnp.minimum(state.filled, lifetime_capacity - batch)
            written = jax.lax.dynamic_update_slice(lifetime, triple, (0, start))
            lifetime = jnp.where(fits, written, lifetime)
        return AUCState(
            window=state.window.at[state.count % window_batches].set(triple),
            count=state.count + 1,
            lifetime=lifetime,
            filled=state.filled + jnp.where(fits, batch, 0),
            overflow=state.overflow | ~fits,
        )

    def compute(state: AUCState) -> dict[str, Array]:
        window = jnp.moveaxis(state.window, 1, 0).reshape(3, -1)
        out = {"window_auc": functional.auc(*window)}
        if lifetime_capacity:
            value = functional.auc(*state.lifetime)
            out["lifetime_auc"] = jnp.where(state.overflow, jnp.nan, value)
        return out

    return RecMetric(init, update, compute)


def combine(*metrics: RecMetric) -> RecMetric:
    """One metric updating and computing all of ``metrics`` (state: a tuple of theirs)."""
    if not metrics:
        raise ValueError("combine needs at least one metric")

    def init(batch_size: int | None = None) -> tuple[Any, ...]:
        return tuple(m.init(batch_size) for m in metrics)

    def update(state, predictions, labels, weights=None) -> tuple[Any, ...]:
        return tuple(
            m.update(s, predictions, labels, weights) for m, s in zip(metrics, state, strict=True)
        )

    def compute(state) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for m, s in zip(metrics, state, strict=True):
            out.update(m.compute(s))
        return out

    return RecMetric(init, update, compute)
