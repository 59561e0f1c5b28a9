"""Position-weighted features, as TorchRec's feature processors.

A position-weighted feature learns one weight per position in the bag: the id at position
``p`` of its bag is pooled with per-sample weight ``position_weight[p]``. The weights start at
ones (the plain SUM/MEAN) and train as ordinary dense params (``jaxrec.optim.fused`` hands
them to its dense transformation); their gradient flows through the lookup's per-sample
weight gradient.

- :class:`PositionWeightedModule`: one feature (a :class:`~jaxrec.sparse.JaggedTensor`),
  param ``position_weight [max_feature_length]``.
- :class:`PositionWeightedModuleCollection`: several features of a
  :class:`~jaxrec.sparse.KeyedJaggedTensor`, params ``position_weights.<feature>``.
- :class:`FeatureProcessedEmbeddingBagCollection`: the processors in front of a weighted
  :class:`~jaxrec.EmbeddingBagCollection`.

The per-sample weights the processors write replace any the input carries; a feature
without a processor gets weight 1, as in TorchRec. A bag longer than its feature's
``max_feature_length`` raises a ValueError naming the feature (TorchRec's gather raises
too) when the lengths are concrete; under ``jit`` the ids past the last position weight get
weight 0 (they are dropped, as by a truncation) and nothing is read out of bounds.

>>> import jax, jax.numpy as jnp
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
>>> ebc = EmbeddingBagCollection(
...     tables=[EmbeddingBagConfig(name="t1", embedding_dim=2, num_embeddings=4, feature_names=["f1"])],
...     is_weighted=True)
>>> fp_ebc = FeatureProcessedEmbeddingBagCollection(
...     ebc, PositionWeightedModuleCollection({"f1": 3}))
>>> kjt = KeyedJaggedTensor(keys=["f1"], values=jnp.array([1, 2, 3]), lengths=jnp.array([2, 1]))
>>> variables = fp_ebc.init(jax.random.key(0), kjt)
>>> sorted(fp_ebc.state_dict(variables))
['_embedding_bag_collection.embedding_bags.t1.weight', '_feature_processors.position_weights.f1']
>>> fp_ebc.apply(variables, kjt).values().shape
(2, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxrec_kernels.pooled_lookup import position_bags

from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
from jaxrec.sparse import JaggedTensor, KeyedJaggedTensor, KeyedTensor

__all__ = [
    "FeatureProcessedEmbeddingBagCollection",
    "PositionWeightedModule",
    "PositionWeightedModuleCollection",
    "position_weights",
]


def _check_bag_lengths(
    offsets: jax.Array, keys: tuple[str, ...], stride: int, sizes: Mapping[str, int]
) -> None:
    """Refuse (eagerly) a bag longer than its feature's position weights, naming both."""
    if isinstance(offsets, jax.core.Tracer):
        return
    lengths = np.diff(np.asarray(offsets)).reshape(len(keys), stride)
    for k, key in enumerate(keys):
        if key in sizes and lengths[k].size and lengths[k].max() > sizes[key]:
            b = int(lengths[k].argmax())
            raise ValueError(
                f"feature {key!r}: bag {b} has {int(lengths[k, b])} ids, more than its "
                f"{sizes[key]} position weights (max_feature_length)"
            )


def position_weights(
    offsets: jax.Array,
    capacity: int,
    keys: tuple[str, ...],
    stride: int,
    tables: Mapping[str, jax.Array],
) -> jax.Array:
    """``[capacity]`` per-sample weights: ``tables[key][p]`` for the id at position ``p`` of
    its bag, 1 for the ids of a key without a table, 0 for padding.

    ``offsets`` are the KJT's ``[len(keys) * stride + 1]`` offsets. A bag longer than its
    table raises a ValueError when ``offsets`` are concrete; under ``jit`` the ids past the
    table's end get 0.

    >>> import jax.numpy as jnp
    >>> offsets = jnp.array([0, 3, 3, 5, 5], jnp.int32)  # "a": [x, x, x], []; "b": [x, x], []
    >>> position_weights(offsets, 6, ("a", "b"), 2, {"a": jnp.array([1.0, 0.5, 0.25])}).tolist()
    [1.0, 0.5, 0.25, 1.0, 1.0, 0.0]
    """
    unknown = sorted(set(tables) - set(keys))
    if unknown:
        raise ValueError(f"position weights for features {unknown} that the input lacks")
    sizes = {key: int(table.shape[0]) for key, table in tables.items()}
    _check_bag_lengths(offsets, keys, stride, sizes)
    if capacity == 0:
        return jnp.zeros((0,), jnp.float32)
    bags, live = position_bags(offsets, capacity)
    key_of = bags // stride
    position = jnp.arange(capacity, dtype=jnp.int32) - offsets[bags]
    size = np.array([sizes.get(key, 0) for key in keys], np.int32)
    base = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int32)
    listed = jnp.asarray(size)[key_of] > 0
    inside = listed & (position < jnp.asarray(size)[key_of])
    if tables:
        flat = jnp.concatenate([tables[key].astype(jnp.float32) for key in keys if key in tables])
        gathered = flat[jnp.where(inside, jnp.asarray(base)[key_of] + position, 0)]
    else:
        gathered = jnp.ones((capacity,), jnp.float32)
    weights = jnp.where(listed, jnp.where(inside, gathered, 0.0), 1.0)
    return jnp.where(live, weights, 0.0)


def _check_vector(key: str, value: Any, length: int, dtype: Any) -> jax.Array:
    """A loaded position-weight vector, checked (shape, real finite numbers) and cast."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{key}: expected real numbers, got dtype {array.dtype}")
    if array.shape != (length,):
        raise ValueError(f"{key}: expected shape ({length},), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{key}: holds a non-finite value")
    return jnp.asarray(array, dtype)


def _check_keys(expected: set[str], state_dict: Mapping[str, Any]) -> None:
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict: missing keys {missing}, unexpected keys {unexpected}")


class PositionWeightedModule(nn.Module):
    """One feature's position weights (TorchRec's ``PositionWeightedModule``).

    Attributes:
      max_feature_length: the number of position weights (TorchRec's truncation size).
      param_dtype: dtype of ``position_weight``.

    ``__call__`` takes a :class:`~jaxrec.sparse.JaggedTensor` and returns it with ``weights``
    set to ``position_weight[position in bag]``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxrec import JaggedTensor
    >>> pw = PositionWeightedModule(max_feature_length=3)
    >>> jt = JaggedTensor(values=jnp.array([4, 5, 6]), lengths=jnp.array([2, 1]))
    >>> variables = pw.init(jax.random.key(0), jt)
    >>> variables = pw.load_state_dict(variables, {"position_weight": [1.0, 0.5, 0.25]})
    >>> pw.apply(variables, jt).weights().tolist()
    [1.0, 0.5, 1.0]
    """

    max_feature_length: int
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if not isinstance(self.max_feature_length, int) or self.max_feature_length < 1:
            raise ValueError(
                f"max_feature_length must be a positive int, got {self.max_feature_length!r}"
            )
        super().__post_init__()

    def setup(self) -> None:
        self.position_weight = self.param(
            "position_weight", nn.initializers.ones, (self.max_feature_length,), self.param_dtype
        )

    def table(self) -> jax.Array:
        """The ``position_weight`` param [max_feature_length]."""
        return self.position_weight

    def __call__(self, features: JaggedTensor) -> JaggedTensor:
        lengths = features.lengths()
        weights = position_weights(
            features.offsets(),
            features.values().shape[0],
            ("feature",),
            lengths.shape[0],
            {"feature": self.position_weight},
        )
        return JaggedTensor._make(features.values(), lengths, weights)

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``{"position_weight": [max_feature_length]}``, TorchRec's name."""
        return {"position_weight": variables["params"]["position_weight"]}

    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any]
    ) -> dict[str, Any]:
        """New variables with ``position_weight`` from ``state_dict`` (name, shape checked)."""
        _check_keys({"position_weight"}, state_dict)
        value = _check_vector(
            "position_weight",
            state_dict["position_weight"],
            self.max_feature_length,
            self.param_dtype,
        )
        return {**variables, "params": {**variables["params"], "position_weight": value}}


class PositionWeightedModuleCollection(nn.Module):
    """Position weights of several features of a KJT (TorchRec's
    ``PositionWeightedModuleCollection``).

    Attributes:
      max_feature_lengths: ``{feature: number of position weights}``.
      param_dtype: dtype of the weights.

    ``__call__`` returns the KJT with ``weights`` set: ``position_weights[f][p]`` for the id at
    position ``p`` of a bag of feature ``f``, 1 for features without position weights.

    >>> import jax, jax.numpy as jnp
    >>> from jaxrec import KeyedJaggedTensor
    >>> pwc = PositionWeightedModuleCollection({"f1": 2})
    >>> kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=jnp.array([1, 2, 3, 4]),
    ...                         lengths=jnp.array([2, 0, 1, 1]))
    >>> variables = pwc.init(jax.random.key(0), kjt)
    >>> list(pwc.state_dict(variables))
    ['position_weights.f1']
    >>> pwc.apply(variables, kjt).weights().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """

    max_feature_lengths: Mapping[str, int]
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for key, length in dict(self.max_feature_lengths).items():
            if not isinstance(length, int) or length < 1:
                raise ValueError(
                    f"max_feature_lengths[{key!r}] must be a positive int, got {length!r}"
                )
        super().__post_init__()

    @nn.compact
    def __call__(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        lengths = dict(self.max_feature_lengths)

        def init(key: jax.Array) -> dict[str, jax.Array]:
            return {k: jnp.ones((n,), self.param_dtype) for k, n in lengths.items()}

        tables = self.param("position_weights", init)
        weights = position_weights(
            features.offsets(),
            features.capacity(),
            tuple(features.keys()),
            features.stride(),
            tables,
        )
        return KeyedJaggedTensor._make(
            tuple(features.keys()),
            features.stride(),
            features.values(),
            features.lengths(),
            weights,
        )

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``{"position_weights.<feature>": [max length]}``, TorchRec's names."""
        tables = variables["params"]["position_weights"]
        return {f"position_weights.{key}": tables[key] for key in self.max_feature_lengths}

    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any]
    ) -> dict[str, Any]:
        """New variables with every feature's weights from ``state_dict`` (names, shapes)."""
        lengths = dict(self.max_feature_lengths)
        _check_keys({f"position_weights.{key}" for key in lengths}, state_dict)
        tables = {
            key: _check_vector(
                f"position_weights.{key}",
                state_dict[f"position_weights.{key}"],
                n,
                self.param_dtype,
            )
            for key, n in lengths.items()
        }
        return {**variables, "params": {**variables["params"], "position_weights": tables}}


class FeatureProcessedEmbeddingBagCollection(nn.Module):
    """Feature processors in front of a weighted EmbeddingBagCollection (TorchRec's
    ``FeatureProcessedEmbeddingBagCollection``).

    Attributes:
      embedding_bag_collection: an :class:`~jaxrec.EmbeddingBagCollection` with
        ``is_weighted=True``.
      feature_processors: ``{feature: PositionWeightedModule}`` naming every feature of the
        collection, or one :class:`PositionWeightedModuleCollection`.

    Output: the collection's :class:`~jaxrec.sparse.KeyedTensor` for the processed input.
    ``state_dict`` names: ``_embedding_bag_collection.embedding_bags.<table>.weight`` and
    ``_feature_processors.<feature>.position_weight`` (a dict of modules) or
    ``_feature_processors.position_weights.<feature>`` (a collection), as TorchRec's.

    >>> import jax, jax.numpy as jnp
    >>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
    ...     name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])], is_weighted=True)
    >>> fp_ebc = FeatureProcessedEmbeddingBagCollection(ebc, {"f": PositionWeightedModule(2)})
    >>> kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1, 1, 2]), lengths=jnp.array([2, 1]))
    >>> variables = fp_ebc.init(jax.random.key(0), kjt)
    >>> state = dict(fp_ebc.state_dict(variables))
    >>> state["_embedding_bag_collection.embedding_bags.t.weight"] = jnp.ones((3, 2))
    >>> state["_feature_processors.f.position_weight"] = jnp.array([1.0, 0.5])
    >>> variables = fp_ebc.load_state_dict(variables, state)
    >>> fp_ebc.apply(variables, kjt).values().tolist()
    [[1.5, 1.5], [1.0, 1.0]]
    """

    embedding_bag_collection: EmbeddingBagCollection
    feature_processors: Mapping[str, PositionWeightedModule] | PositionWeightedModuleCollection

    EBC_PREFIX = "_embedding_bag_collection."
    FP_PREFIX = "_feature_processors."

    def __post_init__(self) -> None:
        ebc = self.embedding_bag_collection
        if not isinstance(ebc, EmbeddingBagCollection):
            raise ValueError(
                f"embedding_bag_collection must be an EmbeddingBagCollection, got {type(ebc)}"
            )
        if not bool(ebc.is_weighted):
            raise ValueError(
                "FeatureProcessedEmbeddingBagCollection needs an EmbeddingBagCollection "
                "with is_weighted=True"
            )
        processors = self.feature_processors
        if not isinstance(processors, PositionWeightedModuleCollection):
            if not isinstance(processors, Mapping) or not all(
                isinstance(p, PositionWeightedModule) for p in processors.values()
            ):
                raise ValueError(
                    "feature_processors must be {feature: PositionWeightedModule} or a "
                    f"PositionWeightedModuleCollection, got {processors!r}"
                )
            names = {f for t in ebc.tables for f in t.feature_names}
            if set(processors) != names:
                raise ValueError(
                    f"feature_processors name {sorted(processors)} but the collection's "
                    f"features are {sorted(names)}; name each feature once"
                )
        super().__post_init__()

    def is_weighted(self) -> bool:
        return True

    @nn.compact
    def __call__(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if isinstance(self.feature_processors, PositionWeightedModuleCollection):
            processed = self.feature_processors(features)
        else:
            weights = position_weights(
                features.offsets(),
                features.capacity(),
                tuple(features.keys()),
                features.stride(),
                {key: p.table() for key, p in self.feature_processors.items()},
            )
            processed = KeyedJaggedTensor._make(
                tuple(features.keys()),
                features.stride(),
                features.values(),
                features.lengths(),
                weights,
            )
        return self.embedding_bag_collection(processed)

    # State dicts ----------------------------------------------------------
    def _processor_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(self.feature_processors, PositionWeightedModuleCollection):
            return {"": params["feature_processors"]}
        return {f"{key}.": params[f"feature_processors_{key}"] for key in self.feature_processors}

    def _processors(self) -> dict[str, Any]:
        if isinstance(self.feature_processors, PositionWeightedModuleCollection):
            return {"": self.feature_processors}
        return {f"{key}.": p for key, p in self.feature_processors.items()}

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """TorchRec-named arrays of the tables and the position weights."""
        params = variables["params"]
        ebc = self.embedding_bag_collection.state_dict(
            {"params": params["embedding_bag_collection"]}
        )
        out = {self.EBC_PREFIX + name: value for name, value in ebc.items()}
        processor_params = self._processor_params(params)
        for sub, processor in self._processors().items():
            for name, value in processor.state_dict({"params": processor_params[sub]}).items():
                out[self.FP_PREFIX + sub + name] = value
        return out

    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any]
    ) -> dict[str, Any]:
        """New variables with the tables and position weights of ``state_dict`` (TorchRec's
        names; every key must be there, none more)."""
        _check_keys(set(self.state_dict(variables)), state_dict)
        params = dict(variables["params"])
        ebc_state = {
            k[len(self.EBC_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(self.EBC_PREFIX)
        }
        params["embedding_bag_collection"] = self.embedding_bag_collection.load_state_dict(
            {"params": params["embedding_bag_collection"]}, ebc_state
        )["params"]
        processor_params = self._processor_params(params)
        for sub, processor in self._processors().items():
            prefix = self.FP_PREFIX + sub
            sub_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            loaded = processor.load_state_dict({"params": processor_params[sub]}, sub_state)
            name = "feature_processors" if sub == "" else f"feature_processors_{sub[:-1]}"
            params[name] = loaded["params"]
        return {**variables, "params": params}
