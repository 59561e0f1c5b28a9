"""KeyedTensor (KT): dense per-key tensors laid side by side along one dimension.

Layout (TorchRec's): with the default ``key_dim=1``, ``values`` is ``[B, sum(length_per_key)]``
and key ``k`` owns columns ``offset_per_key[k] : offset_per_key[k + 1]``. This is what an
EmbeddingBagCollection returns: one pooled embedding of width ``dim_k`` per key and sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from jaxrec.sparse.arrays import as_keys


@jax.tree_util.register_pytree_with_keys_class
class KeyedTensor:
    """Per-key tensors concatenated along ``key_dim``; keys, lengths and key_dim are static.

    Pytree leaf: ``values``. Aux data: keys, length_per_key, key_dim.

    >>> import jax.numpy as jnp
    >>> kt = KeyedTensor(["a", "b"], [2, 3], jnp.arange(10.0).reshape(2, 5))
    >>> kt.offset_per_key()
    [0, 2, 5]
    >>> kt["b"].shape
    (2, 3)
    >>> kt["a"].tolist()
    [[0.0, 1.0], [5.0, 6.0]]
    """

    def __init__(
        self, keys: Sequence[str], length_per_key: Sequence[int], values: Any, key_dim: int = 1
    ) -> None:
        keys = as_keys(keys)
        length_per_key = tuple(int(n) for n in length_per_key)
        if len(keys) != len(length_per_key):
            raise ValueError(
                f"{len(keys)} keys but {len(length_per_key)} entries in length_per_key"
            )
        for k, n in zip(keys, length_per_key, strict=True):
            if n < 0:
                raise ValueError(f"length_per_key for key {k!r} is negative: {n}")
        values = jnp.asarray(values)
        if not -values.ndim <= key_dim < values.ndim:
            raise ValueError(
                f"key_dim {key_dim} is out of range for values of shape {values.shape}"
            )
        key_dim %= values.ndim
        if values.shape[key_dim] != sum(length_per_key):
            raise ValueError(
                f"values has {values.shape[key_dim]} entries along key_dim {key_dim} but "
                f"length_per_key {list(length_per_key)} sums to {sum(length_per_key)}"
            )
        self._set(keys, length_per_key, key_dim, values)

    def _set(self, keys: tuple[str, ...], lengths: tuple[int, ...], key_dim: int, values: Any):
        self._keys = keys
        self._length_per_key = lengths
        self._key_dim = key_dim
        self._values = values

    # pytree -----------------------------------------------------------------------------
    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        aux = (self._keys, self._length_per_key, self._key_dim)
        return [(GetAttrKey("values"), self._values)], aux

    def tree_flatten(self) -> tuple[list[Any], tuple[Any, ...]]:
        return [self._values], (self._keys, self._length_per_key, self._key_dim)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: Sequence[Any]) -> KeyedTensor:
        kt = object.__new__(cls)
        kt._set(*aux, children[0])
        return kt

    # accessors --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The keys, in layout order."""
        return list(self._keys)

    def values(self) -> jax.Array:
        """All per-key tensors concatenated along ``key_dim``."""
        return self._values

    def key_dim(self) -> int:
        """The dimension along which the keys are laid out (non-negative)."""
        return self._key_dim

    def length_per_key(self) -> list[int]:
        """Width of each key along ``key_dim``."""
        return list(self._length_per_key)

    def offset_per_key(self) -> list[int]:
        """Start of each key along ``key_dim``, then the total width."""
        return np.cumsum([0, *self._length_per_key]).tolist()

    def _slice(self, i: int) -> jax.Array:
        start = sum(self._length_per_key[:i])
        return jax.lax.slice_in_dim(
            self._values, start, start + self._length_per_key[i], axis=self._key_dim
        )

    def index_per_key(self) -> dict[str, int]:
        """``{key: position}``; a repeated key maps to its last position, as in TorchRec."""
        return {k: i for i, k in enumerate(self._keys)}

    def __getitem__(self, key: str) -> jax.Array:
        """The tensor of ``key`` (e.g. ``[B, dim]``); the last one for a repeated key."""
        index = self.index_per_key()
        if key not in index:
            raise ValueError(f"unknown key {key!r}; known keys: {list(self._keys)}")
        return self._slice(index[key])

    def to_dict(self) -> dict[str, jax.Array]:
        """``{key: self[key]}`` for every key (a repeated key: first place, last tensor)."""
        return {k: self._slice(i) for k, i in self.index_per_key().items()}

    # constructors and regrouping --------------------------------------------------------
    @staticmethod
    def from_tensor_list(
        keys: Sequence[str], tensors: Sequence[Any], key_dim: int = 1, cat_dim: int | None = None
    ) -> KeyedTensor:
        """KeyedTensor of ``tensors`` (one per key) concatenated along ``cat_dim``.

        As in TorchRec, each key's length is its tensor's size along ``key_dim``, so
        ``cat_dim`` must be ``key_dim`` (its default here) or there must be one tensor:
        concatenating along another dimension would give keys that do not tile ``values``
        (a ValueError).

        >>> import jax.numpy as jnp
        >>> kt = KeyedTensor.from_tensor_list(["a", "b"], [jnp.ones((4, 2)), jnp.zeros((4, 3))])
        >>> kt.values().shape, kt.length_per_key()
        ((4, 5), [2, 3])
        """
        tensors = [jnp.asarray(t) for t in tensors]
        if not tensors or len(tensors) != len(keys):
            raise ValueError(f"need one tensor per key: {len(keys)} keys, {len(tensors)} tensors")
        ndim = tensors[0].ndim
        cat_dim = key_dim if cat_dim is None else cat_dim
        if len(tensors) > 1 and not (
            -ndim <= cat_dim < ndim and -ndim <= key_dim < ndim and cat_dim % ndim == key_dim % ndim
        ):
            raise ValueError(
                f"cat_dim {cat_dim} differs from key_dim {key_dim}: the keys' lengths are "
                f"along key_dim, so {len(tensors)} tensors must be concatenated along it"
            )
        _check_same_shape_but(tensors, key_dim, list(keys))
        return KeyedTensor(
            keys,
            [t.shape[key_dim] for t in tensors],
            jnp.concatenate(tensors, axis=key_dim),
            key_dim=key_dim,
        )

    @staticmethod
    def regroup(
        keyed_tensors: Sequence[KeyedTensor], groups: Sequence[Sequence[str]]
    ) -> list[jax.Array]:
        """For each group, the tensors of its keys (found in any of ``keyed_tensors``)
        concatenated along the shared ``key_dim``. A key held more than once resolves to
        its last occurrence (the last KeyedTensor holding it), as in TorchRec.

        >>> import jax.numpy as jnp
        >>> kt1 = KeyedTensor(["a", "b"], [1, 2], jnp.ones((2, 3)))
        >>> kt2 = KeyedTensor(["c"], [4], jnp.zeros((2, 4)))
        >>> [g.shape for g in KeyedTensor.regroup([kt1, kt2], [["c", "a"], ["b"]])]
        [(2, 5), (2, 2)]
        """
        keyed_tensors = list(keyed_tensors)
        if not keyed_tensors:
            raise ValueError("regroup needs at least one KeyedTensor, got none")
        key_dims = [kt.key_dim() for kt in keyed_tensors]
        if len(set(key_dims)) != 1:
            raise ValueError(f"regroup needs one key_dim for all KeyedTensors, got {key_dims}")
        owner = {k: (kt, i) for kt in keyed_tensors for k, i in kt.index_per_key().items()}
        out = []
        for group in groups:
            if isinstance(group, str) or not group:
                raise ValueError(f"each group must be a non-empty list of keys, got {group!r}")
            for k in group:
                if k not in owner:
                    raise ValueError(
                        f"unknown key {k!r} in group {list(group)}; known: {list(owner)}"
                    )
            pieces = [owner[k][0]._slice(owner[k][1]) for k in group]
            _check_same_shape_but(pieces, key_dims[0], list(group))
            out.append(jnp.concatenate(pieces, axis=key_dims[0]))
        return out

    @staticmethod
    def regroup_as_dict(
        keyed_tensors: Sequence[KeyedTensor],
        groups: Sequence[Sequence[str]],
        keys: Sequence[str],
    ) -> dict[str, jax.Array]:
        """:meth:`regroup`, with the ``i``-th group stored under ``keys[i]``."""
        if len(keys) != len(groups):
            raise ValueError(f"{len(keys)} keys for {len(groups)} groups; need one key per group")
        return dict(zip(keys, KeyedTensor.regroup(keyed_tensors, groups), strict=True))

    def __repr__(self) -> str:
        return (
            f"KeyedTensor(keys={list(self._keys)}, length_per_key={list(self._length_per_key)}, "
            f"key_dim={self._key_dim}, values={self._values!r})"
        )


def _check_same_shape_but(tensors: Sequence[jax.Array], key_dim: int, keys: list[str]) -> None:
    """ValueError unless all tensors agree in rank and in every dimension except ``key_dim``."""
    ref = tensors[0].shape
    for k, t in zip(keys, tensors, strict=True):
        if not -t.ndim <= key_dim < t.ndim:
            raise ValueError(f"key_dim {key_dim} is out of range for {k!r} of shape {t.shape}")
        same = len(t.shape) == len(ref) and all(
            a == b
            for d, (a, b) in enumerate(zip(t.shape, ref, strict=True))
            if d != key_dim % t.ndim
        )
        if not same:
            raise ValueError(
                f"tensor of key {k!r} has shape {t.shape}, which differs from {ref} outside "
                f"key_dim {key_dim}"
            )
