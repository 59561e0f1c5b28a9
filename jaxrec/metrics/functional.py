"""Metric formulas as pure JAX functions of one set of predictions (jit-safe, static shapes).

Weights of 0 remove an example (batch padding), so the padded batches of :mod:`jaxrec.data`
are scored by passing their ``weights``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _weights_like(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.ones_like(x, jnp.float32) if weights is None else weights.astype(jnp.float32)


def auc(predictions: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Exact area under the ROC curve, ties counted half (scikit-learn's ``roc_auc_score``).

    ``AUC = sum_{pos i, neg j} w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos W_neg)``,
    computed in ``O(n log n)`` by one sort and per-tie-group sums. NaN when either class has
    no weight.

    >>> float(auc(jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([0, 0, 1, 1])))
    0.75
    >>> float(auc(jnp.array([0.5, 0.5, 0.9]), jnp.array([1, 0, 1])))
    0.75
    """
    s = predictions.reshape(-1)
    y = labels.reshape(-1).astype(jnp.float32)
    w = _weights_like(s, None if weights is None else weights.reshape(-1))
    order = jnp.argsort(s)
    s, y, w = s[order], y[order], w[order]
    first_of_group = jnp.concatenate([jnp.ones(1, bool), s[1:] != s[:-1]])
    group = jnp.cumsum(first_of_group) - 1
    n = s.shape[0]
    pos = jax.ops.segment_sum(w * y, group, n)
    neg = jax.ops.segment_sum(w * (1.0 - y), group, n)
    neg_below = jnp.cumsum(neg) - neg
    area = jnp.sum(pos * (neg_below + 0.5 * neg))
    total = jnp.sum(pos) * jnp.sum(neg)
    return jnp.where(total > 0, area / jnp.where(total > 0, total, 1.0), jnp.nan)


def _tie_averaged_at_k(
    scores: jax.Array, values: jax.Array, position_weights: jax.Array
) -> jax.Array:
    """Per row: ``sum_i values[rank i] * position_weights[i]`` with each group of tied scores
    given its mean value (the expectation over orders of the ties, as scikit-learn's NDCG)."""

    def row(s: jax.Array, v: jax.Array) -> jax.Array:
        order = jnp.argsort(-s)
        s, v = s[order], v[order]
        first = jnp.concatenate([jnp.ones(1, bool), s[1:] != s[:-1]])
        group = jnp.cumsum(first) - 1
        n = s.shape[0]
        size = jax.ops.segment_sum(jnp.ones_like(v), group, n)
        mean = jax.ops.segment_sum(v, group, n) / jnp.maximum(size, 1.0)
        return jnp.sum(mean * jax.ops.segment_sum(position_weights, group, n))

    return jax.vmap(row)(scores, values)


def _check_k(scores: jax.Array, labels: jax.Array, k: int) -> None:
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both be [queries, candidates], got {scores.shape} and "
            f"{labels.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per query [Q]: the fraction of its relevant candidates (``labels > 0``) ranked in the top
    ``k`` by ``scores``; a tie across the cut counts each tied candidate's expected share.
    0 for a query without relevant candidates.

    >>> recall_at_k(jnp.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]]),
    ...             jnp.array([[1, 1, 0], [0, 0, 1]]), k=2).tolist()
    [0.5, 0.0]
    """
    _check_k(scores, labels, k)
    relevant = (labels > 0).astype(jnp.float32)
    in_top_k = (jnp.arange(scores.shape[1]) < k).astype(jnp.float32)
    hits = _tie_averaged_at_k(scores, relevant, in_top_k)
    total = relevant.sum(axis=1)
    return jnp.where(total > 0, hits / jnp.maximum(total, 1.0), 0.0)


def ndcg_at_k(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per query [Q]: ``DCG@k / ideal DCG@k`` with linear gains ``labels`` and discount
    ``1 / log2(rank + 1)``; ties averaged and 0 without relevant candidates, as
    scikit-learn's ``ndcg_score(labels, scores, k=k)`` (which averages these over queries).

    >>> ndcg_at_k(jnp.array([[0.9, 0.1, 0.5]]), jnp.array([[0, 1, 1]]), k=2)
    Array([0.38685283], dtype=float32)
    """
    _check_k(scores, labels, k)
    gains = labels.astype(jnp.float32)
    ranks = jnp.arange(scores.shape[1])
    discount = jnp.where(ranks < k, 1.0 / jnp.log2(ranks + 2.0), 0.0)
    dcg = _tie_averaged_at_k(scores, gains, discount)
    ideal = jnp.sum(-jnp.sort(-gains, axis=1) * discount, axis=1)
    return jnp.where(ideal > 0, dcg / jnp.where(ideal > 0, ideal, 1.0), 0.0)
