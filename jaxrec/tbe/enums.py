"""FBGEMM's TBE enums, with FBGEMM's member names and values.

Code written against ``fbgemm_gpu`` ports by changing the import:

>>> from jaxrec.tbe import EmbeddingLocation, OptimType, PoolingMode, SparseType
>>> EmbeddingLocation.DEVICE.value, PoolingMode.MEAN.value, str(SparseType.BF16)
(0, 1, 'bf16')
>>> OptimType.EXACT_ROWWISE_ADAGRAD.value
'exact_row_wise_adagrad'

Members of another enum with the same name (e.g. ``fbgemm_gpu``'s own) are accepted
wherever these are, matched by name (:func:`as_member`).
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

from jaxrec.ops.backend import BoundsCheckMode as LookupBoundsCheckMode
from jaxrec.optim.sparse_optimizers import WeightDecayMode

__all__ = [
    "BoundsCheckMode",
    "CacheAlgorithm",
    "ComputeDevice",
    "EmbeddingLocation",
    "OptimType",
    "PoolingMode",
    "SparseType",
    "WeightDecayMode",
    "as_member",
]


class EmbeddingLocation(enum.IntEnum):
    """Where a table lives: DEVICE (whole in device memory); HOST, MANAGED and
    MANAGED_CACHING (host memory behind a device cache, :class:`jaxrec.tbe.CachedTBE`)."""

    DEVICE = 0
    MANAGED = 1
    MANAGED_CACHING = 2
    HOST = 3


class ComputeDevice(enum.IntEnum):
    """Where a lookup runs: CUDA runs the Pallas kernels on a GPU and the same computation
    in XLA elsewhere; CPU runs the XLA path."""

    CPU = 0
    CUDA = 1


class PoolingMode(enum.IntEnum):
    """How a bag is reduced: SUM, MEAN (sum / bag length) or NONE (one row per index)."""

    SUM = 0
    MEAN = 1
    NONE = 2


class BoundsCheckMode(enum.IntEnum):
    """What an index outside its table does inside ``jit`` (FBGEMM's members and values).

    FATAL, WARNING, IGNORE and NONE behave as :class:`jaxrec.ops.BoundsCheckMode`'s
    members of the same name (a bad index gives a zero row, never row 0 as FBGEMM's
    WARNING/IGNORE do); the ``V2_`` members are FBGEMM's second implementation of the
    same modes and map to them.
    """

    FATAL = 0
    WARNING = 1
    IGNORE = 2
    NONE = 3
    V2_IGNORE = 4
    V2_WARNING = 5
    V2_FATAL = 6

    def as_lookup_mode(self) -> LookupBoundsCheckMode:
        """The :class:`jaxrec.ops.BoundsCheckMode` that implements this mode.

        >>> BoundsCheckMode.V2_WARNING.as_lookup_mode()
        <BoundsCheckMode.WARNING: 'warning'>
        """
        return LookupBoundsCheckMode[self.name.removeprefix("V2_")]


class CacheAlgorithm(enum.Enum):
    """Eviction policy of the HBM cache of MANAGED_CACHING tables."""

    LRU = 0
    LFU = 1


class OptimType(enum.Enum):
    """The optimizer fused into the backward (FBGEMM's ``EmbOptimType``).

    ``SGD`` is FBGEMM's non-deterministic SGD (duplicate ids added with atomics); here it
    is EXACT_SGD: duplicates are summed first, which differs from FBGEMM's SGD only in the
    order of float additions. ``NONE`` applies no update: the tables are plain arrays and
    ``jax.grad`` returns their true (dense) gradient.
    """

    SGD = "sgd"
    EXACT_SGD = "exact_sgd"
    LAMB = "lamb"
    ADAM = "adam"
    EXACT_ADAGRAD = "exact_adagrad"
    EXACT_ROWWISE_ADAGRAD = "exact_row_wise_adagrad"
    LARS_SGD = "lars_sgd"
    PARTIAL_ROWWISE_ADAM = "partial_row_wise_adam"
    PARTIAL_ROWWISE_LAMB = "partial_row_wise_lamb"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


class SparseType(enum.Enum):
    """Storage and output types (FBGEMM's members and values)."""

    FP32 = "fp32"
    FP16 = "fp16"
    FP8 = "fp8"
    NFP8 = "nfp8"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    BF16 = "bf16"
    MX4 = "mx4"

    def __str__(self) -> str:
        return self.value

    def is_float(self) -> bool:
        """Whether this is FP32, FP16 or BF16 (the types tables are trained in here)."""
        return self in _FLOAT_DTYPES

    def as_dtype(self) -> np.dtype:
        """The JAX dtype of an FP32/FP16/BF16 array.

        >>> SparseType.FP16.as_dtype()
        dtype('float16')
        """
        if self not in _FLOAT_DTYPES:
            raise ValueError(f"SparseType.{self.name} has no float dtype")
        return _FLOAT_DTYPES[self]

    def bit_rate(self) -> int:
        """Bits per element, as FBGEMM's ``bit_rate``.

        >>> SparseType.INT4.bit_rate(), SparseType.BF16.bit_rate()
        (4, 16)
        """
        return _BIT_RATES[self]


_FLOAT_DTYPES = {
    SparseType.FP32: np.dtype(jnp.float32),
    SparseType.FP16: np.dtype(jnp.float16),
    SparseType.BF16: np.dtype(jnp.bfloat16),
}
_BIT_RATES = {
    SparseType.FP32: 32,
    SparseType.FP16: 16,
    SparseType.BF16: 16,
    SparseType.FP8: 8,
    SparseType.NFP8: 8,
    SparseType.INT8: 8,
    SparseType.INT4: 4,
    SparseType.INT2: 2,
    SparseType.MX4: 4,
}

E = TypeVar("E", bound=enum.Enum)


def as_member(enum_type: type[E], value: Any, argument: str) -> E:
    """``value`` as a member of ``enum_type``: a member, a member of another enum with the
    same name (``fbgemm_gpu``'s), or a member's value; else a ValueError naming ``argument``.

    >>> as_member(PoolingMode, "MEAN", "pooling_mode")
    Traceback (most recent call last):
    ...
    ValueError: pooling_mode must be a PoolingMode (SUM, MEAN, NONE), got 'MEAN'
    >>> as_member(PoolingMode, 1, "pooling_mode")
    <PoolingMode.MEAN: 1>
    """
    if isinstance(value, enum_type):
        return value
    if isinstance(value, enum.Enum) and value.name in enum_type.__members__:
        return enum_type[value.name]
    if not isinstance(value, bool | enum.Enum):
        for member in enum_type:
            if type(member.value) is type(value) and member.value == value:
                return member
    names = ", ".join(enum_type.__members__)
    raise ValueError(f"{argument} must be a {enum_type.__name__} ({names}), got {value!r}")
