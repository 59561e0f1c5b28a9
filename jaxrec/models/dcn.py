"""DCN-v2 in TorchRec's ``DLRM_DCN`` layout: DLRM with a low-rank cross network as its
interaction (Wang et al., 2021, "DCN V2").

The bottom MLP maps dense features [B, num_dense] to [B, D]; the EmbeddingBagCollection pools
each of the F sparse features to [B, D]; the interaction concatenates them to
``x0`` [B, (F + 1) D] and applies :class:`LowRankCrossNet`; the top MLP maps the result to one
logit per example.

>>> import jax
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.data.synthetic import SyntheticClickData
>>> data = SyntheticClickData(num_features=2, num_rows=50, num_dense=3)
>>> tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=4, num_embeddings=50,
...                              feature_names=[f"f{i}"]) for i in range(2)]
>>> model = DCN(tables=tables, bottom_mlp=(8, 4), top_mlp=(8, 1), cross_layers=2, low_rank=3)
>>> batch = data.batch(batch_size=5, index=0)
>>> variables = model.init(jax.random.key(0), batch.dense, batch.sparse)
>>> model.apply(variables, batch.dense, batch.sparse).shape
(5,)
>>> variables["params"]["crossnet"]["V_0"].shape   # [(F + 1) D, low_rank]
(12, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.configs import EmbeddingBagConfig
from jaxrec.models.dlrm import MLP, check_widths, pooled_features
from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.sparse import KeyedJaggedTensor


class LowRankCrossNet(nn.Module):
    """``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l`` for ``num_layers`` layers.

    ``V_l`` [N, low_rank] and ``W_l`` [low_rank, N] (Xavier-normal, as TorchRec's
    ``LowRankCrossNet``), ``b_l`` [N] (zeros). Input and output are [B, N].

    >>> import jax, jax.numpy as jnp
    >>> net = LowRankCrossNet(num_layers=2, low_rank=2)
    >>> x = jnp.ones((3, 5))
    >>> variables = net.init(jax.random.key(0), x)
    >>> net.apply(variables, x).shape
    (3, 5)
    """

    num_layers: int = 3
    low_rank: int = 64

    @nn.compact
    def __call__(self, x0: jax.Array) -> jax.Array:
        if self.num_layers < 1 or self.low_rank < 1:
            raise ValueError(
                f"LowRankCrossNet needs num_layers >= 1 and low_rank >= 1, got "
                f"{self.num_layers} and {self.low_rank}"
            )
        n = x0.shape[-1]
        init = nn.initializers.xavier_normal()
        x = x0
        for layer in range(self.num_layers):
            v = self.param(f"V_{layer}", init, (n, self.low_rank))
            w = self.param(f"W_{layer}", init, (self.low_rank, n))
            b = self.param(f"bias_{layer}", nn.initializers.zeros, (n,))
            x = x0 * ((x @ v) @ w + b) + x
        return x


class DCN(nn.Module):
    """DLRM with a :class:`LowRankCrossNet` interaction (TorchRec's ``DLRM_DCN``).

    All tables share one embedding_dim, equal to the bottom MLP's last width; ``top_mlp``
    ends in 1 (the click logit). ``optimizer`` fuses the embedding update into the backward.
    """

    tables: Sequence[EmbeddingBagConfig]
    bottom_mlp: Sequence[int] = (64, 32)
    top_mlp: Sequence[int] = (64, 1)
    cross_layers: int = 3
    low_rank: int = 64
    optimizer: Any = None
    backend: str = "auto"

    @nn.compact
    def __call__(self, dense: jax.Array, sparse: KeyedJaggedTensor) -> jax.Array:
        check_widths("DCN", self.tables, self.bottom_mlp, self.top_mlp)
        ebc = EmbeddingBagCollection(
            tables=self.tables, optimizer=self.optimizer, backend=self.backend, name="sparse_arch"
        )
        sparse_rows = pooled_features(ebc(sparse))
        bottom = MLP(self.bottom_mlp, name="dense_arch")(dense)
        x0 = jnp.concatenate([bottom[:, None, :], sparse_rows], axis=1).reshape(dense.shape[0], -1)
        crossed = LowRankCrossNet(self.cross_layers, self.low_rank, name="crossnet")(x0)
        return MLP(self.top_mlp, name="over_arch")(crossed)[:, 0]
