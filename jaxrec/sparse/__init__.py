"""Sparse data structures as JAX pytrees: JaggedTensor, KeyedJaggedTensor, KeyedTensor.

Layouts and names follow TorchRec; shapes are static and content dynamic (see
:class:`KeyedJaggedTensor`), with capacity buckets to keep compilations few.
"""

from jaxrec.sparse.capacity import capacity_bucket, pad_to_capacity
from jaxrec.sparse.jagged_tensor import JaggedTensor
from jaxrec.sparse.keyed_jagged_tensor import KeyedJaggedTensor, validate_kjt
from jaxrec.sparse.keyed_tensor import KeyedTensor

__all__ = [
    "JaggedTensor",
    "KeyedJaggedTensor",
    "KeyedTensor",
    "capacity_bucket",
    "pad_to_capacity",
    "validate_kjt",
]
