"""KeyedJaggedTensor (KJT): the sparse features of a batch, as one pytree.

Layout (TorchRec's): feature-major and contiguous per key. With keys ``f_0..f_{F-1}`` and
stride (batch size) ``B``, ``lengths[f * B + b]`` is the length of bag ``b`` of key ``f``, and
``values`` holds all bags of ``f_0``, then all bags of ``f_1``, ... Static shapes, dynamic
content: ``values`` (and ``weights``) have a static *capacity*; only the first ``sum(lengths)``
entries are real and the rest is padding that no operation reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from jaxrec.sparse.arrays import (
    as_int32,
    as_keys,
    as_weights,
    gather_segments,
    is_traced,
    lengths_from,
    offsets_of,
    require_concrete,
)
from jaxrec.sparse.jagged_tensor import JaggedTensor


def _infer_stride(num_keys: int, num_lengths: int, stride: int | None) -> int:
    if stride is not None:
        stride = int(stride)
        if stride < 0 or num_keys * stride != num_lengths:
            raise ValueError(
                f"stride {stride} with {num_keys} keys needs {num_keys * stride} lengths, "
                f"got {num_lengths}"
            )
        return stride
    if num_keys == 0:
        if num_lengths:
            raise ValueError(f"no keys but {num_lengths} lengths")
        return 0
    if num_lengths % num_keys:
        raise ValueError(
            f"cannot infer the stride: {num_lengths} lengths are not divisible by {num_keys} keys"
        )
    return num_lengths // num_keys


def _refuse_repeated(keys: tuple[str, ...]) -> None:
    """ValueError naming the first key that appears twice."""
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise ValueError(
                f"key {k!r} appears more than once in keys {list(keys)}; each key holds one "
                "feature (KeyedJaggedTensor.concat and permute may repeat keys on purpose)"
            )
        seen.add(k)


def validate_kjt(kjt: KeyedJaggedTensor) -> None:
    """Check a KJT's invariants; raise ValueError naming the offending key, bag and value.

    Static facts are always checked: 1-D integer values, ``len(lengths) == F * B``, floating
    weights of the values' shape. When the lengths are concrete (not under tracing) also:
    every length >= 0 and ``sum(lengths) <= capacity`` (a padded KJT passes).

    >>> import numpy as np
    >>> kjt = KeyedJaggedTensor(["f"], np.array([7, 8]), lengths=np.array([2, 0]))
    >>> validate_kjt(kjt.pad_to(4))
    """
    values, lengths, weights = kjt.values(), kjt.lengths(), kjt.weights_or_none()
    keys, stride = kjt.keys(), kjt.stride()
    if values.ndim != 1 or not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(
            f"values must be 1-D integer ids, got shape {tuple(values.shape)} dtype {values.dtype}"
        )
    if lengths.shape != (len(keys) * stride,):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)}, expected ({len(keys) * stride},) for "
            f"{len(keys)} keys and stride {stride}"
        )
    if weights is not None:
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise ValueError(f"weights must be floating point, got dtype {weights.dtype}")
        if weights.shape != values.shape:
            raise ValueError(
                f"weights has shape {tuple(weights.shape)} but values has "
                f"{tuple(values.shape)}; weights need one entry per value"
            )
    if is_traced(lengths):
        return
    host = np.asarray(lengths)
    negative = np.flatnonzero(host < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(
            f"negative length {host[i]} for key {keys[i // stride]!r} at batch index {i % stride}"
        )
    total, capacity = int(host.sum()), values.shape[0]
    if total > capacity:
        raise ValueError(f"lengths sum to {total}, more than the {capacity} entries of values")


@jax.tree_util.register_pytree_with_keys_class
class KeyedJaggedTensor:
    """Keyed, jagged sparse features: per key ``B`` bags of ids (optionally weighted).

    Pytree leaves: ``values`` [capacity] int32, ``lengths`` [F * B] int32 and ``weights``
    [capacity] (when weighted). Aux data: the keys and the stride. It passes through
    ``jax.jit`` as an argument and a return value; a new capacity means a new compilation.

    Eager construction is exact: ``sum(lengths)`` must equal ``len(values)``. Padded KJTs come
    from :meth:`pad_to` / :func:`jaxrec.sparse.pad_to_capacity`. Ids may be any integer dtype
    (NumPy int64 included) and are stored as int32.

    Example (TorchRec's), stride 3::

        #        bag 0    bag 1   bag 2
        # "f1"   [0, 1]   []      [2]
        # "f2"   [3]      [4]     [5, 6, 7]

    >>> import jax.numpy as jnp
    >>> kjt = KeyedJaggedTensor(
    ...     keys=["f1", "f2"],
    ...     values=jnp.arange(8),
    ...     offsets=jnp.array([0, 2, 2, 3, 4, 5, 8]),
    ... )
    >>> kjt.stride(), kjt.lengths().tolist()
    (3, [2, 0, 1, 1, 1, 3])
    >>> kjt["f2"].lengths().tolist(), kjt["f2"].values().tolist()
    ([1, 1, 3], [3, 4, 5, 6, 7])
    >>> kjt.length_per_key(), kjt.offset_per_key()
    ([3, 5], [0, 3, 8])
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: Any,
        weights: Any = None,
        lengths: Any = None,
        offsets: Any = None,
        stride: int | None = None,
    ) -> None:
        keys = as_keys(keys)
        _refuse_repeated(keys)
        values = as_int32(values, "values")
        if values.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
        lengths = lengths_from(lengths, offsets)
        stride = _infer_stride(len(keys), lengths.shape[0], stride)
        if weights is not None:
            weights = as_weights(weights, values.shape[0])
        self._set(keys, stride, values, lengths, weights)
        validate_kjt(self)
        if not self._traced():
            total = int(np.asarray(lengths).sum())
            if total != values.shape[0]:
                raise ValueError(
                    f"lengths sum to {total} but values has {values.shape[0]} entries; they "
                    "must match exactly (pad with pad_to / pad_to_capacity)"
                )

    def _set(self, keys: tuple[str, ...], stride: int, values: Any, lengths: Any, weights: Any):
        self._keys = keys
        self._stride = stride
        self._values = values
        self._lengths = lengths
        self._weights = weights

    @classmethod
    def _make(
        cls, keys: tuple[str, ...], stride: int, values: Any, lengths: Any, weights: Any = None
    ) -> KeyedJaggedTensor:
        """Build without conversion or checks (pytree unflatten and internal results)."""
        kjt = object.__new__(cls)
        kjt._set(keys, stride, values, lengths, weights)
        return kjt

    # pytree -----------------------------------------------------------------------------
    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        children = [(GetAttrKey("values"), self._values), (GetAttrKey("lengths"), self._lengths)]
        if self._weights is not None:
            children.append((GetAttrKey("weights"), self._weights))
        return children, (self._keys, self._stride, self._weights is not None)

    def tree_flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        children, aux = self.tree_flatten_with_keys()
        return [leaf for _, leaf in children], aux

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: Sequence[Any]) -> KeyedJaggedTensor:
        keys, stride, weighted = aux
        weights = children[2] if weighted else None
        return cls._make(keys, stride, children[0], children[1], weights)

    # constructors -----------------------------------------------------------------------
    @staticmethod
    def from_offsets_sync(
        keys: Sequence[str],
        values: Any,
        offsets: Any,
        weights: Any = None,
        stride: int | None = None,
    ) -> KeyedJaggedTensor:
        """KJT from offsets ([F * B + 1], starting at 0)."""
        return KeyedJaggedTensor(keys, values, weights=weights, offsets=offsets, stride=stride)

    @staticmethod
    def from_lengths_sync(
        keys: Sequence[str],
        values: Any,
        lengths: Any,
        weights: Any = None,
        stride: int | None = None,
    ) -> KeyedJaggedTensor:
        """KJT from lengths ([F * B])."""
        return KeyedJaggedTensor(keys, values, weights=weights, lengths=lengths, stride=stride)

    @staticmethod
    def empty(
        is_weighted: bool = False,
        *,
        keys: Sequence[str] = (),
        stride: int = 0,
        capacity: int = 0,
        weights_dtype: Any = jnp.float32,
    ) -> KeyedJaggedTensor:
        """KJT with all bags empty: ``keys`` x ``stride`` zero lengths, ``capacity`` zero ids.

        >>> KeyedJaggedTensor.empty(keys=["a", "b"], stride=2, capacity=4).lengths().tolist()
        [0, 0, 0, 0]
        """
        keys = as_keys(keys)
        _refuse_repeated(keys)
        if stride < 0 or capacity < 0:
            raise ValueError(f"stride and capacity must be >= 0, got {stride} and {capacity}")
        weights = jnp.zeros((capacity,), weights_dtype) if is_weighted else None
        return KeyedJaggedTensor._make(
            keys,
            stride,
            jnp.zeros((capacity,), jnp.int32),
            jnp.zeros((len(keys) * stride,), jnp.int32),
            weights,
        )

    @staticmethod
    def empty_like(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """A KJT with no keys and no values, with ``kjt``'s stride and dtypes (TorchRec's).

        >>> import numpy as np
        >>> kjt = KeyedJaggedTensor(["a"], np.array([1, 2]), lengths=np.array([1, 1]))
        >>> e = KeyedJaggedTensor.empty_like(kjt)
        >>> e.keys(), e.stride(), e.capacity()
        ([], 2, 0)
        """
        weights = kjt.weights_or_none()
        return KeyedJaggedTensor._make(
            (),
            kjt.stride(),
            jnp.zeros((0,), kjt.values().dtype),
            jnp.zeros((0,), kjt.lengths().dtype),
            None if weights is None else jnp.zeros((0,), weights.dtype),
        )

    @staticmethod
    def from_jt_dict(jt_dict: Mapping[str, JaggedTensor]) -> KeyedJaggedTensor:
        """KJT whose key ``k`` holds the bags of ``jt_dict[k]`` (all with the same batch size).

        >>> import numpy as np
        >>> jts = {"a": JaggedTensor(np.array([1, 2]), lengths=np.array([2, 0])),
        ...        "b": JaggedTensor(np.array([3]), lengths=np.array([0, 1]))}
        >>> KeyedJaggedTensor.from_jt_dict(jts).values().tolist()
        [1, 2, 3]
        """
        if not jt_dict:
            raise ValueError("from_jt_dict needs at least one JaggedTensor, got an empty dict")
        keys = as_keys(list(jt_dict))
        jts = list(jt_dict.values())
        stride = jts[0].lengths().shape[0]
        for k, jt in jt_dict.items():
            if jt.lengths().shape[0] != stride:
                raise ValueError(
                    f"JaggedTensor {k!r} has {jt.lengths().shape[0]} bags, key {keys[0]!r} has "
                    f"{stride}; all keys need the same batch size"
                )
        for k, jt in jt_dict.items():
            if jt.values().ndim != 1 or not jnp.issubdtype(jt.values().dtype, jnp.integer):
                raise ValueError(
                    f"JaggedTensor {k!r} must hold 1-D integer ids, got shape "
                    f"{tuple(jt.values().shape)} dtype {jt.values().dtype}"
                )
            w = jt.weights_or_none()
            if w is not None and not jnp.issubdtype(w.dtype, jnp.floating):
                raise ValueError(
                    f"JaggedTensor {k!r} has weights of dtype {w.dtype}; KJT weights must be "
                    "floating point"
                )
        return _concat_parts(
            keys, stride, [(jt.values(), jt.lengths(), jt.weights_or_none()) for jt in jts]
        )

    @staticmethod
    def concat(kjts: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
        """One KJT with the keys of all ``kjts`` in order (same stride required).

        Real values stay first and feature-major even when the inputs are padded; under
        tracing the capacity is the sum of the input capacities, eagerly it is exact.

        >>> import numpy as np
        >>> a = KeyedJaggedTensor(["a"], np.array([1]), lengths=np.array([1, 0]))
        >>> b = KeyedJaggedTensor(["b"], np.array([2, 3]), lengths=np.array([1, 1]))
        >>> KeyedJaggedTensor.concat([a.pad_to(4), b]).values().tolist()
        [1, 2, 3]
        """
        kjts = list(kjts)
        if not kjts:
            raise ValueError("concat needs at least one KeyedJaggedTensor, got none")
        strides = [k.stride() for k in kjts]
        if len(set(strides)) != 1:
            raise ValueError(f"concat needs equal strides, got {strides}")
        keys = sum((tuple(k.keys()) for k in kjts), ())
        parts = [(k.values(), k.lengths(), k.weights_or_none()) for k in kjts]
        return _concat_parts(keys, strides[0], parts)

    # accessors --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The feature names, in layout order."""
        return list(self._keys)

    def values(self) -> jax.Array:
        """int32 [capacity]: real ids first (``num_values()`` of them), then padding."""
        return self._values

    def weights(self) -> jax.Array:
        """Per-id weights; ValueError when this KJT has none."""
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> jax.Array | None:
        """Per-id weights, or None."""
        return self._weights

    def lengths(self) -> jax.Array:
        """int32 [F * B]: ``lengths[f * B + b]`` is the length of bag ``b`` of key ``f``."""
        return self._lengths

    def offsets(self) -> jax.Array:
        """int32 [F * B + 1]: ``concat([0], cumsum(lengths))``."""
        return offsets_of(self._lengths)

    def lengths_or_none(self) -> jax.Array:
        """The lengths (always held, so never None; TorchRec's name for ported code)."""
        return self._lengths

    def offsets_or_none(self) -> jax.Array:
        """The offsets (always computable, so never None; TorchRec's name for ported code)."""
        return self.offsets()

    def length_per_key_or_none(self) -> list[int] | None:
        """:meth:`length_per_key` where the lengths are on the host; None under tracing
        (never a host sync inside ``jit``)."""
        return None if is_traced(self._lengths) else self.length_per_key()

    def offset_per_key_or_none(self) -> list[int] | None:
        """:meth:`offset_per_key` where the lengths are on the host; None under tracing."""
        return None if is_traced(self._lengths) else self.offset_per_key()

    def index_per_key(self) -> dict[str, int]:
        """``{key: position in keys()}``; a repeated key maps to its last position, as in
        TorchRec.

        >>> import numpy as np
        >>> a = KeyedJaggedTensor(["a", "b"], np.array([1, 2]), lengths=np.array([1, 1]))
        >>> KeyedJaggedTensor.concat([a, a.split([1, 1])[0]]).index_per_key()
        {'a': 2, 'b': 1}
        """
        return {k: i for i, k in enumerate(self._keys)}

    def lengths_offset_per_key(self) -> list[int]:
        """Start of each key's bags in ``lengths()``, then the total: ``[0, B, 2B, ..., F*B]``."""
        return [i * self._stride for i in range(len(self._keys) + 1)]

    def flatten_lengths(self) -> KeyedJaggedTensor:
        """This KJT with 1-D lengths; jaxrec's lengths are always 1-D, so the same data."""
        return KeyedJaggedTensor._make(
            self._keys, self._stride, self._values, self._lengths, self._weights
        )

    def stride(self) -> int:
        """The batch size B (static)."""
        return self._stride

    def capacity(self) -> int:
        """Static length of ``values``; at least ``num_values()``."""
        return self._values.shape[0]

    def num_values(self) -> jax.Array:
        """int32 scalar ``sum(lengths)``: the number of real ids (a jnp scalar, also under jit)."""
        return jnp.sum(self._lengths, dtype=jnp.int32)

    def length_per_key_array(self) -> jax.Array:
        """int32 [F]: number of ids of each key. Works under jit."""
        return jnp.sum(
            self._lengths.reshape(len(self._keys), self._stride), axis=1, dtype=jnp.int32
        )

    def offset_per_key_array(self) -> jax.Array:
        """int32 [F + 1]: start of each key's ids in ``values``, then the total. Works under jit."""
        return offsets_of(self.length_per_key_array())

    def length_per_key(self) -> list[int]:
        """Number of ids of each key, on the host (eager only; see length_per_key_array)."""
        require_concrete("length_per_key", "length_per_key_array()", self._lengths)
        return self._host_per_bag().sum(axis=1).tolist()

    def offset_per_key(self) -> list[int]:
        """Start of each key's ids, then the total, on the host (eager only; see
        offset_per_key_array)."""
        require_concrete("offset_per_key", "offset_per_key_array()", self._lengths)
        return np.cumsum([0, *self.length_per_key()]).tolist()

    def _traced(self) -> bool:
        return is_traced(self._values, self._lengths, self._weights)

    def _host_per_bag(self) -> np.ndarray:
        """Concrete lengths on the host as [F, B]."""
        return np.asarray(self._lengths).reshape(len(self._keys), self._stride)

    def _key_index(self, key: str) -> int:
        """Position of ``key``; the last one for a repeated key (TorchRec's rule)."""
        if key not in self._keys:
            raise ValueError(f"unknown key {key!r}; known keys: {list(self._keys)}")
        return len(self._keys) - 1 - self._keys[::-1].index(key)

    # reorganisation ---------------------------------------------------------------------
    def _select(self, indices: Sequence[int], traced_capacity: int) -> KeyedJaggedTensor:
        """KJT of the keys ``indices`` (in that order). Its capacity is exact eagerly and
        ``traced_capacity`` under tracing."""
        indices = tuple(int(i) for i in indices)
        if not self._traced():
            return _select_keys_host(self, indices)
        values, lengths, weights = _select_keys(
            self._values,
            self._lengths,
            self._weights,
            indices=indices,
            num_keys=len(self._keys),
            stride=self._stride,
            out_size=traced_capacity,
        )
        keys = tuple(self._keys[i] for i in indices)
        return KeyedJaggedTensor._make(keys, self._stride, values, lengths, weights)

    def __getitem__(self, key: str) -> JaggedTensor:
        """The bags of ``key``: exact-size eagerly; under jit ``values`` keeps the capacity
        (the key's ids first, zeros after)."""
        piece = self._select([self._key_index(key)], self.capacity())
        return JaggedTensor._make(piece.values(), piece.lengths(), piece.weights_or_none())

    def to_dict(self) -> dict[str, JaggedTensor]:
        """``{key: self[key]}`` for every key. A repeated key keeps its first place in the
        dict and the bags of its last occurrence, as in TorchRec."""
        return {k: self[k] for k in dict.fromkeys(self._keys)}

    def split(self, segments: Sequence[int]) -> list[KeyedJaggedTensor]:
        """Consecutive KJTs holding ``segments[i]`` keys each (``sum(segments)`` = number of
        keys). Eagerly each piece is exact-size; under jit each keeps the capacity.

        >>> import numpy as np
        >>> kjt = KeyedJaggedTensor(["a", "b", "c"], np.arange(3), lengths=np.ones(3, int))
        >>> [piece.keys() for piece in kjt.split([1, 2])]
        [['a'], ['b', 'c']]
        """
        segments = [int(s) for s in segments]
        if any(s < 0 for s in segments) or sum(segments) != len(self._keys):
            raise ValueError(
                f"segments {segments} must be >= 0 and sum to the {len(self._keys)} keys"
            )
        starts = np.cumsum([0, *segments]).tolist()
        return [
            self._select(range(starts[i], starts[i + 1]), self.capacity())
            for i in range(len(segments))
        ]

    def permute(self, indices: Sequence[int], indices_tensor: Any = None) -> KeyedJaggedTensor:
        """KJT with keys ``[keys[i] for i in indices]`` (repeats allowed) and their bags.

        Eagerly the result is exact-size; under jit its capacity is the input's capacity times
        the largest number of times an index repeats. ``indices_tensor`` (TorchRec's device
        copy of ``indices``) is accepted; the static ``indices`` decide, and a concrete
        ``indices_tensor`` that differs from them is a ValueError.

        >>> import numpy as np
        >>> kjt = KeyedJaggedTensor(["a", "b"], np.array([1, 2, 3]), lengths=np.array([1, 2]))
        >>> kjt.permute([1, 0]).values().tolist()
        [2, 3, 1]
        """
        indices = [int(i) for i in indices]
        if indices_tensor is not None and not is_traced(indices_tensor):
            given = np.asarray(indices_tensor).reshape(-1).tolist()
            if given != indices:
                raise ValueError(f"indices_tensor {given} differs from indices {indices}")
        for i in indices:
            if not 0 <= i < len(self._keys):
                raise ValueError(
                    f"permute index {i} is out of range for {len(self._keys)} keys {self.keys()}"
                )
        repeats = int(np.bincount(np.asarray(indices, np.int64)).max(initial=0))
        return self._select(indices, self.capacity() * repeats)

    def pad_to(self, capacity: int, fill_value: int = 0) -> KeyedJaggedTensor:
        """This KJT with ``values`` (and ``weights``) of length ``capacity``: real entries
        first, then ``fill_value`` (weights 0). Eagerly ``capacity`` may shrink down to
        ``num_values()``; under tracing it cannot go below the current capacity.

        >>> import numpy as np
        >>> kjt = KeyedJaggedTensor(["a"], np.array([5, 6]), lengths=np.array([2]))
        >>> kjt.pad_to(4, fill_value=-1).values().tolist()
        [5, 6, -1, -1]
        """
        capacity = int(capacity)
        as_int32(np.asarray([fill_value]), "fill_value")
        current = self.capacity()
        if self._traced():
            if capacity < current:
                raise ValueError(
                    f"cannot shrink capacity {current} to {capacity} under tracing (the number "
                    "of real values is unknown); shrink eagerly"
                )
            real = jnp.arange(capacity, dtype=jnp.int32) < self.num_values()
            values = _pad_traced(self._values, real, fill_value)
            weights = None if self._weights is None else _pad_traced(self._weights, real, 0)
            return KeyedJaggedTensor._make(self._keys, self._stride, values, self._lengths, weights)
        total = int(self._host_per_bag().sum())
        if capacity < total:
            raise ValueError(f"capacity {capacity} is less than the {total} values of the KJT")

        def resize(x: jax.Array, fill: Any) -> jax.Array:
            out = np.full((capacity,), fill, np.dtype(x.dtype))
            out[:total] = np.asarray(x)[:total]
            return jnp.asarray(out)

        weights = None if self._weights is None else resize(self._weights, 0)
        values = resize(self._values, fill_value)
        return KeyedJaggedTensor._make(self._keys, self._stride, values, self._lengths, weights)

    def __repr__(self) -> str:
        return (
            f"KeyedJaggedTensor(keys={list(self._keys)}, stride={self._stride}, "
            f"capacity={self.capacity()}, weighted={self._weights is not None})"
        )


def _select_keys_host(kjt: KeyedJaggedTensor, indices: tuple[int, ...]) -> KeyedJaggedTensor:
    """Eager :meth:`KeyedJaggedTensor._select` on the host: exact-size, no compilation."""
    per_bag = kjt._host_per_bag()
    bounds = np.cumsum([0, *per_bag.sum(axis=1)])

    def pick(x: jax.Array) -> jax.Array:
        host = np.asarray(x)
        return jnp.asarray(
            np.concatenate([host[:0], *(host[bounds[i] : bounds[i + 1]] for i in indices)])
        )

    keys, weights = kjt.keys(), kjt.weights_or_none()
    return KeyedJaggedTensor._make(
        tuple(keys[i] for i in indices),
        kjt.stride(),
        pick(kjt.values()),
        jnp.asarray(per_bag[list(indices)].reshape(-1)),
        None if weights is None else pick(weights),
    )


def _select_keys(
    values: jax.Array,
    lengths: jax.Array,
    weights: jax.Array | None,
    *,
    indices: tuple[int, ...],
    num_keys: int,
    stride: int,
    out_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(values, lengths, weights) of the keys ``indices``, real values first, ``out_size`` long."""
    per_key = lengths.reshape(num_keys, stride)
    idx = np.asarray(indices, np.int32)
    sizes = jnp.sum(per_key, axis=1, dtype=jnp.int32)
    starts = offsets_of(sizes)[idx]
    sizes = sizes[idx]
    out_values = gather_segments(values, starts, sizes, out_size)
    out_weights = None if weights is None else gather_segments(weights, starts, sizes, out_size)
    out_lengths = per_key[idx].reshape(-1)
    return out_values, out_lengths, out_weights


def _pad_traced(x: jax.Array, real: jax.Array, fill: Any) -> jax.Array:
    """Traced ``x`` grown to ``real.shape[0]`` entries; entries where ``real`` is False filled."""
    x = jnp.pad(x, (0, real.shape[0] - x.shape[0]))
    return jnp.where(real, x, jnp.asarray(fill, x.dtype))


def _concat_parts(
    keys: tuple[str, ...], stride: int, parts: Sequence[tuple[Any, Any, Any]]
) -> KeyedJaggedTensor:
    """KJT from (values, lengths, weights) blocks laid one after another, each with its real
    values first; the result has all real values first (exact-size eagerly, capacity = sum of
    capacities under tracing)."""
    weighted = [w is not None for _, _, w in parts]
    if any(weighted) and not all(weighted):
        raise ValueError(f"cannot mix weighted and unweighted inputs (weighted: {weighted})")
    values, lengths, weights = (list(col) for col in zip(*parts, strict=True))
    weights = weights if all(weighted) else None
    if is_traced(*values, *lengths, *(weights or ())):
        out = _concat_blocks(values, lengths, weights, out_size=sum(v.shape[0] for v in values))
        return KeyedJaggedTensor._make(keys, stride, *out)
    counts = [int(np.asarray(n).sum()) for n in lengths]

    def real_first(blocks: list[jax.Array]) -> jax.Array:
        host = [np.asarray(b)[:n] for b, n in zip(blocks, counts, strict=True)]
        return jnp.asarray(np.concatenate(host))

    out_lengths = jnp.asarray(np.concatenate([np.asarray(n) for n in lengths]).astype(np.int32))
    out_weights = None if weights is None else real_first(weights)
    return KeyedJaggedTensor._make(keys, stride, real_first(values), out_lengths, out_weights)


def _concat_blocks(
    values: list[jax.Array],
    lengths: list[jax.Array],
    weights: list[jax.Array] | None,
    *,
    out_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Traced blocks' real values back to back (``out_size`` long), lengths concatenated."""
    capacities = [v.shape[0] for v in values]
    starts = jnp.asarray(np.cumsum([0, *capacities[:-1]]), jnp.int32)
    sizes = jnp.stack([jnp.sum(n, dtype=jnp.int32) for n in lengths])
    out_values = gather_segments(jnp.concatenate(values), starts, sizes, out_size)
    out_weights = None
    if weights is not None:
        out_weights = gather_segments(jnp.concatenate(weights), starts, sizes, out_size)
    out_lengths = jnp.concatenate([n.astype(jnp.int32) for n in lengths])
    return out_values, out_lengths, out_weights
