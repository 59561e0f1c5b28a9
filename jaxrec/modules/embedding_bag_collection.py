"""EmbeddingBagCollection: pooled lookups of several tables, as TorchRec's.

Input: a :class:`~jaxrec.sparse.KeyedJaggedTensor` holding every feature of
the collection (any order; other keys are ignored, so one KJT can feed several
collections). Output: a float32 :class:`~jaxrec.sparse.KeyedTensor` of
[B, sum of feature dims], keys in the collection's feature order (tables in
order, each table's ``feature_names`` in order). A feature looked up by several
tables gives one output per table, named ``feature@table`` as TorchRec names it.
Bag b of feature f pools the rows of its ids: SUM, or MEAN (divided by the bag
length); an empty bag gives zeros; per-sample weights (``is_weighted=True``)
multiply the rows.

TorchRec's example::

    >>> import jax, jax.numpy as jnp
    >>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection(tables=[
    ...     EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"]),
    ...     EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=10, feature_names=["f2"])])
    >>> features = KeyedJaggedTensor(keys=["f1", "f2"], values=jnp.array([0, 1, 2, 3, 4, 5, 6, 7]),
    ...                              offsets=jnp.array([0, 2, 2, 3, 4, 5, 8]))
    >>> variables = ebc.init(jax.random.key(0), features)
    >>> kt = ebc.apply(variables, features)
    >>> kt.values().shape, kt.keys(), kt.offset_per_key()
    ((3, 7), ['f1', 'f2'], [0, 3, 7])
    >>> bool((kt.values()[1, :3] == 0).all())    # f1's second bag is empty
    True
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax

from jaxrec.configs import EmbeddingBagConfig, embedding_names_by_table
from jaxrec.modules.collection_base import EmbeddingCollectionBase
from jaxrec.modules.input_checks import check_features
from jaxrec.ops.lookup import sparse_gradients
from jaxrec.ops.spec import LookupSpec
from jaxrec.sparse import KeyedJaggedTensor, KeyedTensor


class EmbeddingBagCollection(EmbeddingCollectionBase):
    """Pooled embedding lookups over several tables (TorchRec's EBC).

    Attributes:
      tables: the :class:`~jaxrec.EmbeddingBagConfig` of each table.
      is_weighted: whether inputs carry per-sample weights. As in TorchRec,
        ``ebc.is_weighted()`` reads it back.
      optimizer: a fused sparse optimizer (``jaxrec.optim.exact_rowwise_adagrad(...)``
        etc.). When set, tables and their optimizer state are stored as
        :class:`~jaxrec.optim.FusedTableParams` and the backward pass updates
        the touched rows in place; train with ``jaxrec.optim.fused``.
      table_optimizers: per-table overrides of ``optimizer``, ``{table name: optimizer or
        None}``; ``None`` keeps that table a plain array with a dense gradient (e.g. a
        table that is also used outside the lookup). Tables with different optimizers are
        stacked in different groups.
      backend: ``"auto"`` (Pallas on GPU, XLA elsewhere), ``"pallas"`` or ``"xla"``.
      bounds_check_mode: what an id outside its table does inside ``jit``
        (:class:`~jaxrec.ops.BoundsCheckMode`); outside ``jit`` it always raises.
      output_dtype: dtype of the pooled output; float32 by default whatever the tables'
        dtype, as TorchRec's EBC; ``None``: the tables' dtype. Pooling accumulates in
        float32 and rounds once, except that a MEAN with a 16-bit output rounds the sum
        to that dtype before dividing, as torch's 16-bit ``EmbeddingBag`` does.
      data_parallel_axis: when the collection runs replicated inside ``shard_map`` with the
        batch split over this mesh axis, the fused backward gathers every replica's sparse
        row gradients and applies one identical update on each replica (tables stay equal).
      row_shard_axis: when the collection runs inside ``shard_map`` with its tables split by
        rows over this mesh axis (``jaxrec.parallel.row_shardings``) and the whole batch on
        every device, each device looks up and updates its own rows and the pooled output is
        summed over the axis. Outside ``shard_map`` (e.g. at ``init``) it has no effect.
    """

    CONFIG_TYPE: ClassVar[type[EmbeddingBagConfig]] = EmbeddingBagConfig
    PARAMS_NAME: ClassVar[str] = "embedding_bags"
    FLAG: ClassVar[str] = "is_weighted"

    is_weighted: bool = False

    # TorchRec's accessors -------------------------------------------------
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The table configs (a table without ``feature_names`` reads its own name)."""
        return list(self.tables)

    def embedding_names_by_table(self) -> list[list[str]]:
        """Per table, the output key of each of its features (``feature@table`` when the
        feature is looked up by several tables)."""
        return embedding_names_by_table(self.tables)

    def embedding_names(self) -> list[str]:
        """The output keys, in output order: :meth:`embedding_names_by_table` flattened."""
        return [name for names in self.embedding_names_by_table() for name in names]

    # Lookup ---------------------------------------------------------------
    @nn.compact
    def __call__(self, features: KeyedJaggedTensor) -> KeyedTensor:
        plan = self.plan
        check_features(plan, features, weighted=bool(self.is_weighted))
        out = self._lookup_groups(features, features.weights_or_none())
        return KeyedTensor(
            keys=self.embedding_names(),
            length_per_key=[f.dim for f in plan.features],
            values=out,
        )

    def sparse_gradients(
        self, features: KeyedJaggedTensor, grad_output: jax.Array
    ) -> dict[str, tuple[jax.Array, jax.Array]]:
        """The true sparse gradient of each group's table for an output cotangent.

        ``grad_output`` is the cotangent of ``kt.values()`` ([B, sum of dims]). Returns
        ``{group_name: (rows, row_grads)}``: the unique rows of the group's stacked buffer
        ``params["embedding_bags"][group_name]`` that the batch touched (ascending, then the
        sentinel ``num_rows``), and their summed gradients (see
        :func:`jaxrec.ops.sparse_gradients`). No table is needed, so no variables either.

        >>> import jax.numpy as jnp
        >>> from jaxrec import EmbeddingBagConfig, KeyedJaggedTensor
        >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        ...     name="t", embedding_dim=2, num_embeddings=5, feature_names=["f"])])
        >>> kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([3, 1, 3]), lengths=jnp.array([2, 1]))
        >>> rows, grads = ebc.sparse_gradients(kjt, jnp.array([[1.0, 1.0], [10.0, 10.0]]))["sum_float32_d2"]
        >>> rows.tolist(), grads[:2].tolist()
        ([1, 3, 5], [[1.0, 1.0], [11.0, 11.0]])
        """
        plan = self.plan
        check_features(plan, features, weighted=bool(self.is_weighted))
        spec = LookupSpec.create(
            plan, tuple(features.keys()), batch_size=features.stride(), backend="xla"
        )
        per_group = sparse_gradients(
            spec, features.values(), features.offsets(), features.weights_or_none(), grad_output
        )
        return {g.name: grads for g, grads in zip(plan.groups, per_group, strict=True)}
