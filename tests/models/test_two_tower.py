import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.models import in_batch_scores, in_batch_softmax_loss


def test_in_batch_softmax_loss_is_the_weighted_mean_over_positives_of_the_diagonal_nll():
    q = jax.random.normal(jax.random.key(0), (5, 3))
    c = jax.random.normal(jax.random.key(1), (5, 3))
    labels = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0])
    weights = jnp.array([1.0, 1.0, 2.0, 1.0, 0.0])  # the last row is padding
    s = np.asarray(q @ c.T, np.float64)[:, :4]  # padded candidate dropped
    nll = -(s - np.log(np.exp(s).sum(axis=1, keepdims=True)))[np.arange(4), np.arange(4)]
    w = np.array([1.0, 0.0, 2.0, 1.0])
    expected = (w * nll).sum() / w.sum()
    np.testing.assert_allclose(in_batch_softmax_loss(q, c, labels, weights), expected, rtol=1e-5)


def test_in_batch_scores_mask_padded_candidates_and_mark_positive_pairs():
    scores, relevance = in_batch_scores(
        jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.array([1.0, 1.0, 0.0]), jnp.array([1.0, 0.0, 1.0])
    )
    assert np.isneginf(np.asarray(scores)[:, 1]).all()
    np.testing.assert_array_equal(relevance, np.diag([1.0, 0.0, 0.0]))
