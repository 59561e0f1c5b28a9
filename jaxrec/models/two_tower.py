"""A two-tower retrieval model trained with an in-batch softmax (as TorchRec's retrieval example
builds its towers, with the sampled-softmax loss of Yi et al., 2019).

One EmbeddingBagCollection pools every feature (so each table enters one fused lookup per
step); the query tower is an MLP over the concatenated pooled ``query_features``, the
candidate tower an MLP over the ``candidate_features``. Each outputs [B, D].

Training: example ``i`` whose label is 1 is a positive (query ``i``, candidate ``i``) pair; the
other candidates of the batch are its negatives. :func:`in_batch_softmax_loss` is the weighted
mean over positives of ``-log softmax_j(q_i . c_j)[i]``, candidates of weight 0 (batch padding)
masked out. :func:`in_batch_scores` gives the [B, B] scores and relevance labels that
:func:`jaxrec.metrics.recall_at_k` ranks.

>>> import jax, jax.numpy as jnp
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.data.synthetic import SyntheticClickData
>>> data = SyntheticClickData(num_features=2, num_rows=50, num_dense=0)
>>> tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50,
...                              feature_names=[f"f{i}"]) for i in range(2)]
>>> model = TwoTower(tables=tables, query_features=("f0",), candidate_features=("f1",),
...                  tower_mlp=(8, 4))
>>> batch = data.batch(batch_size=6, index=0)
>>> variables = model.init(jax.random.key(0), batch.dense, batch.sparse)
>>> query, candidate = model.apply(variables, batch.dense, batch.sparse)
>>> query.shape, candidate.shape
((6, 4), (6, 4))
>>> loss = in_batch_softmax_loss(query, candidate, batch.labels, jnp.ones(6))
>>> bool(loss > 0)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.configs import EmbeddingBagConfig
from jaxrec.models.dlrm import MLP
from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.sparse import KeyedJaggedTensor, KeyedTensor


def _select(pooled: KeyedTensor, names: Sequence[str]) -> jax.Array:
    starts = dict(zip(pooled.keys(), pooled.offset_per_key()[:-1], strict=True))
    widths = dict(zip(pooled.keys(), pooled.length_per_key(), strict=True))
    values = pooled.values()
    return jnp.concatenate([values[:, starts[n] : starts[n] + widths[n]] for n in names], axis=1)


class TwoTower(nn.Module):
    """Query and candidate towers over one pooled lookup; returns ``(query, candidate)`` [B, D].

    ``dense`` is accepted for a uniform signature and not used. Every feature of ``tables``
    belongs to exactly one of ``query_features`` and ``candidate_features``.
    """

    tables: Sequence[EmbeddingBagConfig]
    query_features: Sequence[str]
    candidate_features: Sequence[str]
    tower_mlp: Sequence[int] = (64, 32)
    optimizer: Any = None
    backend: str = "auto"

    @nn.compact
    def __call__(self, dense: jax.Array, sparse: KeyedJaggedTensor) -> tuple[jax.Array, jax.Array]:
        del dense
        features = [f for t in self.tables for f in t.feature_names]
        query, candidate = list(self.query_features), list(self.candidate_features)
        if not query or not candidate:
            raise ValueError("TwoTower needs at least one query and one candidate feature")
        if sorted(query + candidate) != sorted(features):
            raise ValueError(
                f"query_features {query} and candidate_features {candidate} must split the "
                f"tables' features {features}, each in exactly one tower"
            )
        ebc = EmbeddingBagCollection(
            tables=self.tables, optimizer=self.optimizer, backend=self.backend, name="sparse_arch"
        )
        pooled = ebc(sparse)
        q = MLP(self.tower_mlp, name="query_tower")(_select(pooled, query))
        c = MLP(self.tower_mlp, name="candidate_tower")(_select(pooled, candidate))
        return q, c


def in_batch_scores(
    query: jax.Array, candidate: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(scores, relevance)``, both [B, B]: ``q_i . c_j`` (padded candidates at -inf) and 1
    where ``j == i`` and example ``i`` is a positive.

    >>> q = c = jnp.eye(3)
    >>> scores, relevance = in_batch_scores(q, c, jnp.array([1.0, 0.0, 1.0]), jnp.ones(3))
    >>> relevance.tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    scores = query @ candidate.T
    scores = jnp.where(weights[None, :] > 0, scores, -jnp.inf)
    relevance = jnp.diag((labels > 0.5) & (weights > 0)).astype(jnp.float32)
    return scores, relevance


def in_batch_softmax_loss(
    query: jax.Array, candidate: jax.Array, labels: jax.Array, weights: jax.Array
) -> jax.Array:
    """Weighted mean over positive examples of ``-log softmax_j(q_i . c_j)[i]`` (candidates
    of weight 0 masked out). ``weights * labels`` weighs the queries.

    >>> q = c = 3.0 * jnp.eye(2)
    >>> round(float(in_batch_softmax_loss(q, c, jnp.ones(2), jnp.ones(2))), 4)   # log(1+e^-9)
    0.0001
    """
    scores, _ = in_batch_scores(query, candidate, labels, weights)
    log_p = jnp.diagonal(jax.nn.log_softmax(scores, axis=1))
    w = weights * (labels > 0.5)
    return -(w * jnp.where(w > 0, log_p, 0.0)).sum() / jnp.maximum(w.sum(), 1e-12)
