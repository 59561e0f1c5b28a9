"""Embedding table configs, named and defaulted as TorchRec's.

A config describes one table: how many rows, how wide, which features look
it up, how it is initialised and (for bags) how a bag is pooled. Configs are
frozen and hashable, so collections can derive their static layout from them
once.

>>> t1 = EmbeddingBagConfig(name="t1", embedding_dim=3, num_embeddings=10, feature_names=["f1"])
>>> t1.pooling, t1.data_type
(<PoolingType.SUM: 'SUM'>, <DataType.FP32: 'FP32'>)
>>> round(t1.get_weight_init_max(), 4)
0.3162
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

# init_fn(key, shape, dtype) -> array, as Flax initializers are written.
InitFn = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


class DataType(enum.Enum):
    """Storage type of a table's weights (TorchRec's members and values).

    Only FP32, FP16 and BF16 tables can be looked up and trained here; the
    others exist so that TorchRec code naming them ports unchanged.
    """

    FP32 = "FP32"
    FP16 = "FP16"
    BF16 = "BF16"
    INT64 = "INT64"
    INT32 = "INT32"
    INT8 = "INT8"
    UINT8 = "UINT8"
    INT4 = "INT4"
    INT2 = "INT2"
    NFP8 = "NFP8"

    def __str__(self) -> str:
        return self.value


class PoolingType(enum.Enum):
    """How the rows of one bag are reduced: SUM, MEAN (sum / bag length) or NONE (no pooling)."""

    SUM = "SUM"
    MEAN = "MEAN"
    NONE = "NONE"


class EmbeddingComputeKernel(enum.Enum):
    """Where a table lives and how it is looked up (TorchRec's names and values).

    ``FUSED``: in device memory (the collections' only kernel). ``FUSED_UVM``: in host
    memory, read through the device (FBGEMM's ``MANAGED``). ``FUSED_UVM_CACHING``: in host
    memory behind a device cache (``MANAGED_CACHING``). Tables of the two host kernels are
    trained through :func:`jaxrec.tbe.collection_tbe`, which builds FBGEMM's operator for a
    collection's tables; the collections refuse them.
    """

    FUSED = "fused"
    FUSED_UVM = "fused_uvm"
    FUSED_UVM_CACHING = "fused_uvm_caching"


#: The data types that can be trained and looked up; the integer ones are
#: TorchRec's inference-only quantised types.
TRAINABLE_DATA_TYPES: dict[DataType, jnp.dtype] = {
    DataType.FP32: jnp.dtype(jnp.float32),
    DataType.FP16: jnp.dtype(jnp.float16),
    DataType.BF16: jnp.dtype(jnp.bfloat16),
}


#: What each NumPy/JAX dtype is called as a DataType (TorchRec's mapping; ml_dtypes'
#: ``int4`` and ``float8_e4m3fn`` stand for torch's packed ``quint4x2`` and ``float8_e4m3fn``).
_DTYPE_TO_DATA_TYPE: dict[jnp.dtype, DataType] = {
    jnp.dtype(jnp.float32): DataType.FP32,
    jnp.dtype(jnp.float16): DataType.FP16,
    jnp.dtype(jnp.bfloat16): DataType.BF16,
    jnp.dtype(jnp.int32): DataType.INT32,
    jnp.dtype(jnp.int64): DataType.INT64,
    jnp.dtype(jnp.int8): DataType.INT8,
    jnp.dtype(jnp.uint8): DataType.UINT8,
    jnp.dtype(jnp.int4): DataType.INT4,
    jnp.dtype(jnp.float8_e4m3fn): DataType.NFP8,
}


def dtype_to_data_type(dtype: Any) -> DataType:
    """The :class:`DataType` of a NumPy/JAX dtype, as TorchRec's ``dtype_to_data_type``.

    >>> dtype_to_data_type(jnp.float16), dtype_to_data_type("int64")
    (<DataType.FP16: 'FP16'>, <DataType.INT64: 'INT64'>)
    >>> dtype_to_data_type(jnp.complex64)
    Traceback (most recent call last):
    ...
    ValueError: no DataType stores dtype complex64; known: float32, float16, bfloat16, int32, int64, int8, uint8, int4, float8_e4m3fn
    """
    try:
        key = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{dtype!r} is not a dtype") from None
    try:
        return _DTYPE_TO_DATA_TYPE[key]
    except KeyError:
        known = ", ".join(d.name for d in _DTYPE_TO_DATA_TYPE)
        raise ValueError(f"no DataType stores dtype {key.name}; known: {known}") from None


def pooling_type_to_str(pooling_type: PoolingType) -> str:
    """``"sum"`` or ``"mean"``: a pooling type as torch's ``EmbeddingBag(mode=...)`` names it.

    >>> pooling_type_to_str(PoolingType.MEAN)
    'mean'
    >>> pooling_type_to_str(PoolingType.NONE)
    Traceback (most recent call last):
    ...
    ValueError: unsupported pooling type PoolingType.NONE: only SUM and MEAN have a mode name
    """
    if not isinstance(pooling_type, PoolingType) or pooling_type is PoolingType.NONE:
        raise ValueError(
            f"unsupported pooling type {pooling_type}: only SUM and MEAN have a mode name"
        )
    return pooling_type.value.lower()


def data_type_to_dtype(data_type: DataType) -> jnp.dtype:
    """The JAX dtype that stores a table of `data_type`.

    >>> data_type_to_dtype(DataType.BF16)
    dtype(bfloat16)
    """
    try:
        return TRAINABLE_DATA_TYPES[data_type]
    except KeyError:
        supported = ", ".join(t.name for t in TRAINABLE_DATA_TYPES)
        raise ValueError(
            f"data_type {data_type.name} is not supported for lookups and training; "
            f"use one of {supported}"
        ) from None


@dataclass(frozen=True)
class BaseEmbeddingConfig:
    """One embedding table (TorchRec's fields and defaults).

    Args:
      num_embeddings: rows of the table (> 0).
      embedding_dim: width of a row (> 0).
      name: table name, unique within a collection; names the state-dict entry.
      data_type: storage type of the weights.
      feature_names: the features (KJT keys) that look this table up; empty means
        the table's own name, as TorchRec's collections do.
      weight_init_max / weight_init_min: bounds of the default uniform
        initialiser; default ±sqrt(1 / num_embeddings), as TorchRec.
      num_embeddings_post_pruning: kept for TorchRec compatibility (unused).
      init_fn: ``init_fn(key, (num_embeddings, embedding_dim), dtype) -> array``;
        replaces the uniform initialiser when given.
      need_pos: kept for TorchRec compatibility (positional weights; unused).
      compute_kernel: where the table lives (:class:`EmbeddingComputeKernel`; TorchRec
        chooses it in the sharding plan): ``FUSED`` (device memory) or a host kernel.
    """

    num_embeddings: int
    embedding_dim: int
    name: str = ""
    data_type: DataType = DataType.FP32
    feature_names: Sequence[str] = field(default_factory=tuple)
    weight_init_max: float | None = None
    weight_init_min: float | None = None
    num_embeddings_post_pruning: int | None = None
    init_fn: InitFn | None = None
    need_pos: bool = False
    compute_kernel: EmbeddingComputeKernel = EmbeddingComputeKernel.FUSED

    def __post_init__(self) -> None:
        label = f"table {self.name!r}" if self.name else "table config"
        if not isinstance(self.compute_kernel, EmbeddingComputeKernel):
            raise ValueError(
                f"{label}: compute_kernel must be a jaxrec.EmbeddingComputeKernel, got "
                f"{self.compute_kernel!r}"
            )
        for arg in ("num_embeddings", "embedding_dim"):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label}: {arg} must be a positive int, got {value!r}")
        if not isinstance(self.data_type, DataType):
            raise ValueError(
                f"{label}: data_type must be a jaxrec.DataType, got {self.data_type!r}"
            )
        if isinstance(self.feature_names, str):
            raise ValueError(
                f"{label}: feature_names must be a list of names, got the string "
                f"{self.feature_names!r}"
            )
        names = tuple(self.feature_names) or ((self.name,) if self.name else ())
        for feature in names:
            if not isinstance(feature, str) or not feature:
                raise ValueError(
                    f"{label}: feature names must be non-empty strings, got {feature!r}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"{label}: feature_names has duplicates: {list(names)}")
        object.__setattr__(self, "feature_names", names)
        lo, hi = self.get_weight_init_min(), self.get_weight_init_max()
        if not lo <= hi:
            raise ValueError(f"{label}: weight_init_min {lo} is greater than weight_init_max {hi}")
        if self.num_embeddings_post_pruning is not None and self.num_embeddings_post_pruning <= 0:
            raise ValueError(
                f"{label}: num_embeddings_post_pruning must be positive, "
                f"got {self.num_embeddings_post_pruning}"
            )

    def get_weight_init_max(self) -> float:
        """Upper bound of the default initialiser: sqrt(1 / num_embeddings) unless set."""
        if self.weight_init_max is None:
            return math.sqrt(1.0 / self.num_embeddings)
        return float(self.weight_init_max)

    def get_weight_init_min(self) -> float:
        """Lower bound of the default initialiser: -sqrt(1 / num_embeddings) unless set."""
        if self.weight_init_min is None:
            return -math.sqrt(1.0 / self.num_embeddings)
        return float(self.weight_init_min)

    def num_features(self) -> int:
        """How many features look this table up."""
        return len(self.feature_names)

    @property
    def dtype(self) -> jnp.dtype:
        """The JAX dtype of the weights (raises for inference-only integer types)."""
        return data_type_to_dtype(self.data_type)

    def initialize(self, key: jax.Array) -> jax.Array:
        """A freshly initialised [num_embeddings, embedding_dim] table."""
        shape = (self.num_embeddings, self.embedding_dim)
        if self.init_fn is not None:
            table = jnp.asarray(self.init_fn(key, shape, self.dtype))
            if table.shape != shape:
                raise ValueError(
                    f"table {self.name!r}: init_fn returned shape {table.shape}, expected {shape}"
                )
            return table.astype(self.dtype)
        lo, hi = self.get_weight_init_min(), self.get_weight_init_max()
        return jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(self.dtype)


@dataclass(frozen=True)
class EmbeddingBagConfig(BaseEmbeddingConfig):
    """A table looked up by bags of ids that are pooled (SUM by default, or MEAN).

    >>> EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=0)
    Traceback (most recent call last):
    ...
    ValueError: table 't': num_embeddings must be a positive int, got 0
    """

    pooling: PoolingType = PoolingType.SUM

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pooling, PoolingType):
            raise ValueError(
                f"table {self.name!r}: pooling must be a PoolingType, got {self.pooling!r}"
            )
        if self.pooling is PoolingType.NONE:
            raise ValueError(
                f"table {self.name!r}: an EmbeddingBagConfig pools (SUM or MEAN); "
                "use EmbeddingConfig with EmbeddingCollection for unpooled lookups"
            )


@dataclass(frozen=True)
class EmbeddingConfig(BaseEmbeddingConfig):
    """A table looked up id by id (no pooling), as EmbeddingCollection does."""


def validate_table_set(tables: Sequence[BaseEmbeddingConfig]) -> None:
    """Check a collection's tables: unique non-empty names, each with at least one feature.

    A feature may be looked up by several tables (its outputs are then named
    ``feature@table``, see :func:`embedding_names_by_table`).

    >>> a = EmbeddingBagConfig(name="a", embedding_dim=2, num_embeddings=3, feature_names=["f"])
    >>> validate_table_set([a, a])
    Traceback (most recent call last):
    ...
    ValueError: duplicate table name 'a'
    """
    if not tables:
        raise ValueError("an embedding collection needs at least one table")
    seen_tables: set[str] = set()
    for table in tables:
        if not isinstance(table, BaseEmbeddingConfig):
            raise ValueError(f"expected embedding table configs, got {table!r}")
        if not table.name:
            raise ValueError(f"every table in a collection needs a name: {table!r}")
        if table.name in seen_tables:
            raise ValueError(f"duplicate table name {table.name!r}")
        seen_tables.add(table.name)
        if not table.feature_names:
            raise ValueError(f"table {table.name!r} has no feature_names: nothing looks it up")
        if table.compute_kernel is not EmbeddingComputeKernel.FUSED:
            raise ValueError(
                f"table {table.name!r} has compute_kernel {table.compute_kernel.name}: host "
                "tables are trained through jaxrec.tbe.collection_tbe(tables), not a collection"
            )
        data_type_to_dtype(table.data_type)


def embedding_names_by_table(tables: Sequence[BaseEmbeddingConfig]) -> list[list[str]]:
    """The output name of each (table, feature), as TorchRec's collections name them.

    A feature looked up by one table keeps its name; a feature looked up by several
    tables gives one output per table, named ``feature@table``.

    >>> a = EmbeddingBagConfig(name="a", embedding_dim=2, num_embeddings=3, feature_names=["f", "g"])
    >>> b = EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=3, feature_names=["f"])
    >>> embedding_names_by_table([a, b])
    [['f@a', 'g'], ['f@b']]
    """
    readers = Counter(f for table in tables for f in table.feature_names)
    return [
        [f"{f}@{table.name}" if readers[f] > 1 else f for f in table.feature_names]
        for table in tables
    ]
