"""JaggedTensor: the bags of one feature as a flat value buffer plus per-bag lengths.

Layout (TorchRec's): ``values`` holds the rows of bag 0, then bag 1, ... back to back;
``lengths[b]`` is the number of rows of bag ``b`` and ``offsets()`` is
``concat([0], cumsum(lengths))``, so bag ``b`` is ``values[offsets[b]:offsets[b + 1]]``.

Shapes are static and content is dynamic: only the first ``sum(lengths)`` rows of
``values`` are real; any rows after them are padding that no operation reads (a
JaggedTensor produced under ``jax.jit`` keeps the static capacity of its source).
``values`` may be 1-D (ids, stored as int32) or N-D (e.g. ``[rows, dim]`` embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from jaxrec.sparse.arrays import (
    as_int32,
    as_values,
    as_weights,
    gather_segments,
    host_array,
    is_traced,
    lengths_from,
    offsets_of,
    pad_bags,
    require_concrete,
)


@jax.tree_util.register_pytree_with_keys_class
class JaggedTensor:
    """One feature's bags: ``values`` (rows of all bags back to back), ``lengths`` [B], optional
    per-row ``weights`` (any dtype: TorchRec's EmbeddingCollection returns the ids there).
    Pytree leaves: values, lengths, weights (when present).

    Eagerly the constructor checks lengths >= 0 and ``sum(lengths) <= len(values)``; rows past
    ``sum(lengths)`` are padding (as in a JaggedTensor returned from a jitted function).

    >>> import jax.numpy as jnp
    >>> jt = JaggedTensor(values=jnp.array([1, 2, 3, 4]), lengths=jnp.array([2, 0, 2]))
    >>> jt.offsets().tolist()
    [0, 2, 2, 4]
    >>> [bag.tolist() for bag in jt.to_dense()]
    [[1, 2], [], [3, 4]]
    >>> jt.to_padded_dense(desired_length=3, padding_value=-1).tolist()
    [[1, 2, -1], [-1, -1, -1], [3, 4, -1]]
    """

    def __init__(
        self,
        values: Any,
        lengths: Any = None,
        offsets: Any = None,
        weights: Any = None,
    ) -> None:
        values = as_values(values)
        lengths = lengths_from(lengths, offsets)
        if weights is not None:
            weights = as_weights(weights, values.shape[0], floating=False)
        self._set(values, lengths, weights)
        if not is_traced(values, lengths):
            self._check_lengths()

    def _set(self, values: Any, lengths: Any, weights: Any) -> None:
        self._values = values
        self._lengths = lengths
        self._weights = weights

    @classmethod
    def _make(cls, values: Any, lengths: Any, weights: Any = None) -> JaggedTensor:
        """Build without conversion or checks (pytree unflatten and internal results)."""
        jt = object.__new__(cls)
        jt._set(values, lengths, weights)
        return jt

    def _check_lengths(self) -> None:
        host = np.asarray(self._lengths)
        negative = np.flatnonzero(host < 0)
        if negative.size:
            b = int(negative[0])
            raise ValueError(f"lengths[{b}] = {host[b]} is negative (bag {b})")
        total, rows = int(host.sum()), self._values.shape[0]
        if total > rows:
            raise ValueError(f"lengths sum to {total} but values has only {rows} rows")

    # pytree -----------------------------------------------------------------------------
    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], bool]:
        children = [(GetAttrKey("values"), self._values), (GetAttrKey("lengths"), self._lengths)]
        if self._weights is not None:
            children.append((GetAttrKey("weights"), self._weights))
        return children, self._weights is not None

    def tree_flatten(self) -> tuple[list[Any], bool]:
        children, weighted = self.tree_flatten_with_keys()
        return [leaf for _, leaf in children], weighted

    @classmethod
    def tree_unflatten(cls, weighted: bool, children: Sequence[Any]) -> JaggedTensor:
        return cls._make(children[0], children[1], children[2] if weighted else None)

    # accessors --------------------------------------------------------------------------
    def values(self) -> jax.Array:
        """All rows (real first, then padding if any)."""
        return self._values

    def lengths(self) -> jax.Array:
        """int32 [B]: rows per bag."""
        return self._lengths

    def offsets(self) -> jax.Array:
        """int32 [B + 1]: ``concat([0], cumsum(lengths))``."""
        return offsets_of(self._lengths)

    def lengths_or_none(self) -> jax.Array:
        """The lengths (always held, so never None; TorchRec's name for ported code)."""
        return self._lengths

    def offsets_or_none(self) -> jax.Array:
        """The offsets (always computable, so never None; TorchRec's name for ported code)."""
        return self.offsets()

    @staticmethod
    def empty(
        is_weighted: bool = False,
        values_dtype: Any = None,
        weights_dtype: Any = None,
        lengths_dtype: Any = jnp.int32,
    ) -> JaggedTensor:
        """A JaggedTensor of no bags and no values (TorchRec's; dtypes default to float32,
        and lengths are int32 as everywhere in jaxrec).

        >>> JaggedTensor.empty(is_weighted=True).lengths().shape
        (0,)
        """
        if jnp.dtype(lengths_dtype) != jnp.int32:
            raise ValueError(f"lengths are stored as int32, got lengths_dtype {lengths_dtype}")
        values_dtype = jnp.float32 if values_dtype is None else values_dtype
        weights_dtype = jnp.float32 if weights_dtype is None else weights_dtype
        weights = jnp.zeros((0,), weights_dtype) if is_weighted else None
        return JaggedTensor._make(
            jnp.zeros((0,), values_dtype), jnp.zeros((0,), jnp.int32), weights
        )

    @staticmethod
    def empty_like(jt: JaggedTensor) -> JaggedTensor:
        """A JaggedTensor of no bags and no rows, with ``jt``'s dtypes and row shape.

        >>> import jax.numpy as jnp
        >>> rows = JaggedTensor(jnp.ones((3, 4), jnp.bfloat16), lengths=jnp.array([1, 2]))
        >>> e = JaggedTensor.empty_like(rows)
        >>> e.values().shape, e.values().dtype, e.lengths().shape
        ((0, 4), dtype(bfloat16), (0,))
        """
        values, weights = jt.values(), jt.weights_or_none()
        return JaggedTensor._make(
            jnp.zeros((0, *values.shape[1:]), values.dtype),
            jnp.zeros((0,), jt.lengths().dtype),
            None if weights is None else jnp.zeros((0,), weights.dtype),
        )

    def weights(self) -> jax.Array:
        """Per-row weights; ValueError when this JaggedTensor has none."""
        if self._weights is None:
            raise ValueError("this JaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> jax.Array | None:
        """Per-row weights, or None."""
        return self._weights

    def num_values(self) -> jax.Array:
        """int32 scalar ``sum(lengths)``: the number of real rows (a jnp scalar, also under jit)."""
        return jnp.sum(self._lengths, dtype=jnp.int32)

    # dense conversions ------------------------------------------------------------------
    def _bags(self, data: jax.Array) -> list[jax.Array]:
        require_concrete("to_dense", "to_padded_dense(desired_length=...)", self._lengths)
        offsets = np.asarray(self.offsets()).tolist()
        return [data[offsets[b] : offsets[b + 1]] for b in range(len(offsets) - 1)]

    def to_dense(self) -> list[jax.Array]:
        """One array per bag (eager only: the bag sizes are data-dependent)."""
        return self._bags(self._values)

    def to_dense_weights(self) -> list[jax.Array] | None:
        """One weight array per bag, or None when unweighted (eager only)."""
        return None if self._weights is None else self._bags(self._weights)

    def _padded(self, data: jax.Array, desired_length: int | None, padding_value: Any) -> jax.Array:
        if desired_length is None:
            require_concrete(
                "to_padded_dense without desired_length",
                "to_padded_dense(desired_length=...)",
                self._lengths,
            )
            desired_length = int(np.max(np.asarray(self._lengths), initial=0))
        if desired_length < 0:
            raise ValueError(f"desired_length must be >= 0, got {desired_length}")
        return pad_bags(data, self._lengths, padding_value, width=desired_length)

    def to_padded_dense(
        self, desired_length: int | None = None, padding_value: float = 0.0
    ) -> jax.Array:
        """[B, N, ...] with bag ``b``'s rows first in row ``b`` and ``padding_value`` after.

        ``N`` is ``desired_length`` (longer bags are truncated) or, eagerly, the longest bag.
        Works under jit when ``desired_length`` is given.
        """
        return self._padded(self._values, desired_length, padding_value)

    def to_padded_dense_weights(
        self, desired_length: int | None = None, padding_value: float = 0.0
    ) -> jax.Array | None:
        """Weights laid out as :meth:`to_padded_dense`, or None when unweighted."""
        if self._weights is None:
            return None
        return self._padded(self._weights, desired_length, padding_value)

    @classmethod
    def from_dense(
        cls, values: Sequence[Any], weights: Sequence[Any] | None = None
    ) -> JaggedTensor:
        """JaggedTensor whose bag ``b`` is ``values[b]`` (lengths are the static bag sizes).

        >>> import numpy as np
        >>> jt = JaggedTensor.from_dense([np.array([1, 2]), np.array([], np.int64), np.array([3])])
        >>> jt.lengths().tolist(), jt.values().tolist()
        ([2, 0, 1], [1, 2, 3])
        """
        bags = [host_array(v) for v in values]
        lengths = np.asarray([b.shape[0] for b in bags], np.int32)
        if not bags:
            return cls(values=np.zeros((0,), np.float32), lengths=lengths)
        concat = jnp.concatenate if any(isinstance(b, jax.Array) for b in bags) else np.concatenate
        flat_weights = None
        if weights is not None:
            wbags = [host_array(w) for w in weights]
            if [w.shape[0] for w in wbags] != lengths.tolist():
                raise ValueError(
                    f"weights bag sizes {[w.shape[0] for w in wbags]} differ from values bag "
                    f"sizes {lengths.tolist()}"
                )
            wconcat = jnp.concatenate if any(isinstance(w, jax.Array) for w in wbags) else concat
            flat_weights = wconcat(wbags)
        return cls(values=concat(bags), lengths=lengths, weights=flat_weights)

    @classmethod
    def from_dense_lengths(
        cls, values: Any, lengths: Any, weights: Any | None = None
    ) -> JaggedTensor:
        """JaggedTensor from a padded ``values`` [B, N, ...]: bag ``b`` is
        ``values[b, :lengths[b]]`` (``weights``, if given, is [B, N] too). Eagerly the result is
        exact-size and a length outside [0, N] is a ValueError; under jit it has ``B * N`` rows,
        real rows first, and lengths are clamped to [0, N].

        >>> import numpy as np
        >>> jt = JaggedTensor.from_dense_lengths(np.array([[1, 2, 0], [3, 4, 5]]), [1, 3])
        >>> jt.values().tolist()
        [1, 3, 4, 5]
        """
        values = as_values(values)
        lengths = as_int32(lengths, "lengths")
        if values.ndim < 2 or lengths.shape != values.shape[:1]:
            raise ValueError(
                f"values must be [B, N, ...] and lengths [B], got shapes {tuple(values.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        num_bags, width = values.shape[:2]
        if weights is not None:
            weights = host_array(weights)
            if tuple(weights.shape) != (num_bags, width):
                raise ValueError(
                    f"weights has shape {tuple(weights.shape)}, expected {(num_bags, width)} "
                    "like the first two dimensions of values"
                )
        if is_traced(values, lengths, weights):
            lengths = jnp.clip(lengths, 0, width)
            starts = jnp.arange(num_bags, dtype=jnp.int32) * width
            flat = values.reshape((num_bags * width, *values.shape[2:]))
            out_size = num_bags * width
            out_values = gather_segments(flat, starts, lengths, out_size)
            out_weights = None
            if weights is not None:
                flat_weights = jnp.reshape(weights, (-1,))
                out_weights = gather_segments(flat_weights, starts, lengths, out_size)
            return cls._make(out_values, lengths, out_weights)
        host = np.asarray(lengths)
        bad = np.flatnonzero((host < 0) | (host > width))
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"lengths[{b}] = {host[b]} is outside [0, {width}] (bag {b})")
        mask = np.arange(width)[None, :] < host[:, None]
        out_weights = None
        if weights is not None:
            out_weights = jnp.asarray(np.asarray(weights)[mask])
        return cls._make(jnp.asarray(np.asarray(values)[mask]), lengths, out_weights)

    def __repr__(self) -> str:
        weighted = self._weights is not None
        return (
            f"JaggedTensor(values={self._values!r}, lengths={self._lengths!r}"
            + (f", weights={self._weights!r}" if weighted else "")
            + ")"
        )
