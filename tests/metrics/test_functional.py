"""Metric formulas against scikit-learn and brute force, with and without jit."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from jaxrec.metrics import functional


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_auc_equals_sklearn_with_ties_and_weights(jit, weighted):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 500) / 20.0  # many ties
    labels = (rng.random(500) < 0.3 + 0.5 * scores).astype(np.float32)
    weights = rng.random(500).astype(np.float32) if weighted else None
    fn = jax.jit(functional.auc) if jit else functional.auc
    got = fn(
        jnp.asarray(scores), jnp.asarray(labels), None if weights is None else jnp.asarray(weights)
    )
    want = roc_auc_score(labels, scores, sample_weight=weights)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_auc_ignores_zero_weight_padding():
    rng = np.random.default_rng(1)
    scores, labels = rng.random(64), (rng.random(64) < 0.5).astype(np.float32)
    padded_scores = np.r_[scores, np.zeros(16)]
    padded_labels = np.r_[labels, np.ones(16)]
    weights = np.r_[np.ones(64), np.zeros(16)]
    got = functional.auc(
        jnp.asarray(padded_scores), jnp.asarray(padded_labels), jnp.asarray(weights)
    )
    np.testing.assert_allclose(float(got), roc_auc_score(labels, scores), rtol=1e-6)


def test_auc_is_nan_with_one_class():
    assert np.isnan(float(functional.auc(jnp.array([0.1, 0.9]), jnp.array([1.0, 1.0]))))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ndcg_equals_sklearn_with_ties_and_graded_labels(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 5, (40, 10)).astype(np.float32)  # ties across the cut
    labels = rng.integers(0, 4, (40, 10)).astype(np.float32)
    labels[:, 0] = np.maximum(labels[:, 0], 1)  # every query has a relevant item
    got = jax.jit(functional.ndcg_at_k, static_argnames="k")(
        jnp.asarray(scores), jnp.asarray(labels), k=k
    )
    np.testing.assert_allclose(float(got.mean()), ndcg_score(labels, scores, k=k), rtol=1e-5)


def _brute_recall(scores, labels, k):
    """Mean recall@k over every order of the ties (exhaustive)."""
    out = []
    for s, y in zip(scores, labels, strict=True):
        values = []
        for perm in itertools.permutations(range(len(s))):
            order = sorted(perm, key=lambda i: -s[i])  # stable: ties in the permuted order
            values.append(sum(y[i] > 0 for i in order[:k]) / max(sum(y > 0), 1))
        out.append(np.mean(values))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_recall_equals_the_expectation_over_tie_orders(k):
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 3, (12, 5)).astype(np.float32)
    labels = (rng.random((12, 5)) < 0.4).astype(np.float32)
    got = functional.recall_at_k(jnp.asarray(scores), jnp.asarray(labels), k)
    np.testing.assert_allclose(
        np.asarray(got), _brute_recall(scores, labels, k), rtol=1e-6, atol=1e-7
    )


def test_recall_without_ties_counts_relevant_items_in_the_top_k():
    rng = np.random.default_rng(5)
    scores, labels = rng.random((30, 50)), (rng.random((30, 50)) < 0.1).astype(np.float32)
    top = np.argsort(-scores, axis=1)[:, :5]
    hits = np.take_along_axis(labels, top, axis=1).sum(axis=1)
    want = np.where(labels.sum(1) > 0, hits / np.maximum(labels.sum(1), 1), 0.0)
    got = functional.recall_at_k(jnp.asarray(scores, jnp.float32), jnp.asarray(labels), 5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_retrieval_inputs_are_checked():
    with pytest.raises(ValueError, match="queries, candidates"):
        functional.recall_at_k(jnp.zeros(3), jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        functional.ndcg_at_k(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0)
