"""EmbeddingCollection: one embedding row per id (no pooling), as TorchRec's.

Input: a :class:`~jaxrec.sparse.KeyedJaggedTensor` holding every feature of
the collection (other keys are ignored). Output: ``dict[name, JaggedTensor]``
whose values are the float32 [rows, dim] embeddings of that feature's ids,
with the feature's lengths (and, with
``need_indices=True``, the ids in the JaggedTensor's ``weights``, as TorchRec
does). ``name`` is the feature, or ``feature@table`` for a feature that
several tables look up (TorchRec's names). Eagerly each feature's values have exactly its number of ids; inside
``jit`` they have the KJT's static capacity, real rows first, zeros after.

TorchRec's example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    >>> ec = EmbeddingCollection(tables=[
    ...     EmbeddingConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
    ...     EmbeddingConfig(name="t2", embedding_dim=3, num_embeddings=10, feature_names=["f2"])])
    >>> features = KeyedJaggedTensor.from_offsets_sync(
    ...     keys=["f1", "f2"], values=jnp.array([0, 1, 2, 3, 4, 5, 6, 7]),
    ...     offsets=jnp.array([0, 2, 2, 3, 4, 5, 8]))
    >>> variables = ec.init(jax.random.key(0), features)
    >>> out = ec.apply(variables, features)
    >>> out["f2"].values().shape, out["f2"].lengths().tolist()
    ((5, 3), [1, 1, 3])
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.configs import EmbeddingConfig, embedding_names_by_table
from jaxrec.modules.collection_base import EmbeddingCollectionBase
from jaxrec.modules.input_checks import check_features
from jaxrec.sparse import JaggedTensor, KeyedJaggedTensor
from jaxrec.sparse.arrays import is_traced


def _feature_rows(rows: jax.Array, start, end, capacity: int, concrete: bool) -> jax.Array:
    """Rows [start, end) of a group's per-position output: exact eagerly, capacity-long in jit."""
    if concrete:
        return rows[int(start) : int(end)]
    position = jnp.arange(capacity, dtype=jnp.int32)
    source = start + position
    # Traced lengths may be negative or overrun the capacity: never gather outside it.
    valid = (position < (end - start)) & (source >= 0) & (source < capacity)
    picked = jnp.take(rows, jnp.where(valid, source, 0), axis=0)
    return jnp.where(valid[:, None], picked, jnp.zeros((), rows.dtype))


class EmbeddingCollection(EmbeddingCollectionBase):
    """Unpooled embedding lookups over several tables (TorchRec's EC).

    Attributes:
      tables: the :class:`~jaxrec.EmbeddingConfig` of each table.
      need_indices: also return each feature's ids (in the JaggedTensor's
        weights, as TorchRec). ``ec.need_indices()`` reads it back.
      output_dtype: dtype of the embeddings; float32 by default whatever the tables'
        dtype, as TorchRec's EC; ``None``: the tables' dtype.
      optimizer, table_optimizers, backend, bounds_check_mode,
        data_parallel_axis, row_shard_axis: as for
        :class:`~jaxrec.EmbeddingBagCollection`.
    """

    CONFIG_TYPE: ClassVar[type[EmbeddingConfig]] = EmbeddingConfig
    PARAMS_NAME: ClassVar[str] = "embeddings"
    FLAG: ClassVar[str] = "need_indices"

    need_indices: bool = False

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return list(self.tables)

    def embedding_dim(self) -> int:
        """The common row width of the tables (TorchRec's EC requires one)."""
        dims = sorted({t.embedding_dim for t in self.tables})
        if len(dims) != 1:
            raise ValueError(f"the tables of this collection have several dims: {dims}")
        return dims[0]

    def embedding_names_by_table(self) -> list[list[str]]:
        """Per table, the output key of each of its features (``feature@table`` when the
        feature is looked up by several tables)."""
        return embedding_names_by_table(self.tables)

    @nn.compact
    def __call__(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        plan = self.plan
        check_features(plan, features, weighted=False)
        group_rows = self._lookup_groups(features, None)
        keys = tuple(features.keys())

        concrete = not is_traced(features.values(), features.lengths())
        bounds = features.offset_per_key() if concrete else features.offset_per_key_array()
        capacity = features.capacity()
        batch = features.stride()
        lengths, values = features.lengths(), features.values()
        out: dict[str, JaggedTensor] = {}
        names = [name for names in self.embedding_names_by_table() for name in names]
        for feature, name in zip(plan.features, names, strict=True):
            k = keys.index(feature.name)
            start, end = bounds[k], bounds[k + 1]
            rows = _feature_rows(group_rows[feature.group], start, end, capacity, concrete)
            ids = None
            if self.need_indices:
                ids = _feature_rows(values[:, None], start, end, capacity, concrete)[:, 0]
            out[name] = JaggedTensor(
                values=rows, lengths=lengths[k * batch : (k + 1) * batch], weights=ids
            )
        return out
