"""DLRM (Naumov et al., 2019): a bottom MLP for dense features, an
EmbeddingBagCollection for sparse features, pairwise dot-product
interactions, and a top MLP that outputs one logit per example.

>>> import jax
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.data.synthetic import SyntheticClickData
>>> data = SyntheticClickData(num_features=2, num_rows=50, num_dense=3)
>>> tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50,
...                              feature_names=[f"f{i}"]) for i in range(2)]
>>> model = DLRM(tables=tables, bottom_mlp=(8, 4), top_mlp=(8, 1))
>>> batch = data.batch(batch_size=5, index=0)
>>> variables = model.init(jax.random.key(0), batch.dense, batch.sparse)
>>> model.apply(variables, batch.dense, batch.sparse).shape
(5,)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.configs import EmbeddingBagConfig
from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.sparse import KeyedJaggedTensor, KeyedTensor


class MLP(nn.Module):
    """Dense layers with ReLU between them (none after the last)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i + 1 < len(self.features):
                x = nn.relu(x)
        return x


def pooled_features(pooled: KeyedTensor) -> jax.Array:
    """A pooled KeyedTensor of F equal-width features [B, F * D] as [B, F, D]."""
    return pooled.values().reshape(pooled.values().shape[0], len(pooled.keys()), -1)


def dot_interactions(dense: jax.Array, sparse: jax.Array) -> jax.Array:
    """DLRM's interaction: [dense, pairwise dots of (dense, *sparse) above the diagonal].

    dense [B, D], sparse [B, F, D] -> [B, D + (F + 1) F / 2].
    """
    stacked = jnp.concatenate([dense[:, None, :], sparse], axis=1)
    dots = jnp.einsum("bfd,bgd->bfg", stacked, stacked)
    rows, cols = jnp.triu_indices(stacked.shape[1], k=1)
    return jnp.concatenate([dense, dots[:, rows, cols]], axis=1)


def check_widths(model: str, tables, bottom_mlp, top_mlp) -> None:
    """Refuse tables of several dims, a bottom MLP not ending in that dim, or a top MLP not
    ending in 1 (the click logit)."""
    dims = {t.embedding_dim for t in tables}
    if len(dims) != 1 or bottom_mlp[-1] not in dims:
        raise ValueError(
            f"{model} needs one embedding_dim for all tables equal to the bottom MLP's last "
            f"width; got dims {sorted(dims)} and bottom_mlp {tuple(bottom_mlp)}"
        )
    if top_mlp[-1] != 1:
        raise ValueError(f"the top MLP must end in width 1, got {tuple(top_mlp)}")


class DLRM(nn.Module):
    """A DLRM over equal-width tables; ``optimizer`` fuses the embedding update.

    The bottom MLP's last width must equal the tables' embedding_dim.
    """

    tables: Sequence[EmbeddingBagConfig]
    bottom_mlp: Sequence[int] = (64, 32)
    top_mlp: Sequence[int] = (64, 1)
    optimizer: Any = None
    backend: str = "auto"

    @nn.compact
    def __call__(self, dense: jax.Array, sparse: KeyedJaggedTensor) -> jax.Array:
        check_widths("DLRM", self.tables, self.bottom_mlp, self.top_mlp)
        ebc = EmbeddingBagCollection(
            tables=self.tables, optimizer=self.optimizer, backend=self.backend, name="sparse_arch"
        )
        pooled = ebc(sparse)
        sparse_rows = pooled_features(pooled)
        bottom = MLP(self.bottom_mlp, name="dense_arch")(dense)
        logits = MLP(self.top_mlp, name="over_arch")(dot_interactions(bottom, sparse_rows))
        return logits[:, 0]
