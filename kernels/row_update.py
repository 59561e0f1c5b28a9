"""The optimizer step on a table's touched rows, shared by the fused update's two paths.

A group's sparse optimizer (``jaxrec.optim.SparseOptimizer`` satisfies
:class:`RowOptimizer`) updates only the rows a batch touched: gather each unique row and its
state, ``optimizer.update`` them in float32, store them back (16-bit tables with stochastic
rounding when the optimizer asks for it: :func:`store_rows`). The non-finite guard
(:func:`skips_nonfinite`) leaves a row whose summed gradient holds a NaN or an infinity
unchanged, bit for bit. The XLA path runs :func:`apply_unique_rows`; the Pallas kernel of
``sparse_update`` applies the same rule to each block of rows it owns.

>>> from typing import NamedTuple
>>> import jax.numpy as jnp
>>> class SGD(NamedTuple):                  # the smallest RowOptimizer: stateless SGD
...     learning_rate: float = 1.0
...     stochastic_rounding: bool = False
...     def init(self, rows, dim):
...         return {}
...     def update(self, w, state, g, step, dim):
...         return w - self.learning_rate * g, state
>>> w, _, skipped = apply_unique_rows(jnp.zeros((3, 1)), {}, 1, jnp.array([0, 2, 3], jnp.int32),
...                                   jnp.array([[1.0], [jnp.nan], [5.0]]), dim=1, optimizer=SGD())
>>> w[:, 0].tolist(), int(skipped)                # row 2 keeps its weight; row 3 is the sentinel
([-1.0, 0.0, 0.0], 1)
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from ._pallas_compat import float_dtype
from .row_gradients import segments
from .stochastic_rounding import seed_for_step, stochastic_round

__all__ = [
    "RowOptimizer",
    "apply_unique_rows",
    "check_table",
    "fused_update_from_row_gradients",
    "skips_nonfinite",
    "store_rows",
]


class RowOptimizer(Protocol):
    """What the fused update needs of a sparse optimizer (hashable: it is a static argument).

    ``init(rows, dim)`` gives the state, a dict of ``[rows]`` (row-wise) or ``[rows, dim]``
    arrays; ``update(w, state, g, step, dim)`` maps float32 rows, their state and summed
    gradients at step ``step`` (t >= 1) to new rows and state. ``stochastic_rounding``: store
    16-bit rows with stochastic rounding. An optional ``skip_nonfinite`` (default True)
    turns the non-finite guard off when False.
    """

    stochastic_rounding: bool

    def init(self, rows: int, dim: int) -> dict[str, jax.Array]: ...

    def update(
        self, w: jax.Array, state: dict[str, jax.Array], g: jax.Array, step: Any, dim: int
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def check_table(
    weights: jax.Array, state: dict[str, jax.Array], dim: int, optimizer: RowOptimizer
) -> None:
    """Refuse a table, state or optimizer the update cannot run on (ValueError naming it)."""
    if jnp.ndim(weights) != 2 or weights.shape[1] != dim:
        raise ValueError(f"weights must have shape [rows, dim={dim}], got {jnp.shape(weights)}")
    float_dtype(weights.dtype)
    for attr in ("init", "update", "stochastic_rounding"):
        if not hasattr(optimizer, attr):
            raise ValueError(f"optimizer must be a jaxrec.optim.SparseOptimizer, got {optimizer!r}")
    rows = weights.shape[0]
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict of arrays, got {type(state).__name__}")
    expected = jax.eval_shape(lambda: optimizer.init(rows, dim))
    if set(state) != set(expected):
        raise ValueError(f"state has keys {sorted(state)}; the optimizer needs {sorted(expected)}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(
                f"state[{name!r}] has shape {tuple(state[name].shape)}; expected "
                f"{tuple(want.shape)}"
            )


def skips_nonfinite(optimizer: RowOptimizer) -> bool:
    """Whether the fused update leaves rows with a non-finite gradient unchanged (default on).

    Read from the optimizer's ``skip_nonfinite`` setting (``jaxrec.optim.SparseOptimizer``).
    """
    return bool(getattr(optimizer, "skip_nonfinite", True))


def store_rows(
    new_rows: jax.Array,
    dtype: Any,
    optimizer: RowOptimizer,
    seed: jax.Array,
    row_ids: jax.Array,
) -> jax.Array:
    """Cast float32 rows to the table dtype: stochastic rounding for 16-bit when asked.

    ``seed`` is the step's :func:`~jaxrec_kernels.stochastic_rounding.seed_for_step`; the
    rounding of a row depends on it and on the row's id only.
    """
    if jnp.dtype(dtype) != jnp.float32 and optimizer.stochastic_rounding:
        return stochastic_round(new_rows, dtype, seed, row_ids)
    return new_rows.astype(dtype)


def _finite_rows(rows, grads, num_rows):
    """(rows with each non-finite gradient's row turned into the sentinel, how many there were)."""
    nonfinite = (rows < num_rows) & ~jnp.all(jnp.isfinite(grads), axis=-1)
    return jnp.where(nonfinite, num_rows, rows), jnp.sum(nonfinite.astype(jnp.int32))


def apply_unique_rows(
    weights: jax.Array,
    state: dict[str, jax.Array],
    step: Any,
    rows: jax.Array,
    grads: jax.Array,
    *,
    dim: int,
    optimizer: RowOptimizer,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Gather the unique ``rows`` (sentinel ``R`` dropped), update them, scatter them back.

    Returns ``(weights, state, nonfinite)``: with the guard on (:func:`skips_nonfinite`) a row
    whose summed gradient holds a NaN or an infinity is dropped like the sentinel (weights and
    state bit-for-bit unchanged) and counted in ``nonfinite``.
    """
    nonfinite = jnp.zeros((), jnp.int32)
    if skips_nonfinite(optimizer):
        rows, nonfinite = _finite_rows(rows, grads, weights.shape[0])
    w = jnp.take(weights, rows, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    s = {k: jnp.take(v, rows, axis=0, mode="fill", fill_value=0) for k, v in state.items()}
    new_w, new_s = optimizer.update(w, s, grads, step, dim)
    new_w = store_rows(new_w, weights.dtype, optimizer, seed_for_step(step), rows)
    weights = weights.at[rows].set(new_w, mode="drop")
    state = {k: v.at[rows].set(new_s[k].astype(v.dtype), mode="drop") for k, v in state.items()}
    return weights, state, nonfinite


@functools.partial(jax.jit, static_argnames=("dim", "optimizer", "return_nonfinite"))
def fused_update_from_row_gradients(
    weights: jax.Array,
    state: dict[str, jax.Array],
    step: Any,
    rows: jax.Array,
    grads: jax.Array,
    *,
    dim: int,
    optimizer: RowOptimizer,
    return_nonfinite: bool = False,
) -> tuple[jax.Array, ...]:
    """One fused optimizer step from row gradients that may repeat a row (XLA).

    ``rows [M]`` (sentinel ``R`` = ``weights.shape[0]`` for unused slots) and
    ``grads [M, D]`` are e.g. the
    :func:`~jaxrec_kernels.row_gradients.sparse_row_gradients` of several data-parallel
    replicas gathered together: gradients of the same row are summed (stable sort, fixed
    order), then the optimizer updates each touched row once. Every replica that runs this on
    the same gathered inputs gets bitwise the same table. A row whose summed gradient is not
    finite is left unchanged (:func:`apply_unique_rows`); with
    ``return_nonfinite`` their number is returned third.

    >>> from typing import NamedTuple
    >>> import jax.numpy as jnp
    >>> class SGD(NamedTuple):              # a RowOptimizer: stateless SGD
    ...     learning_rate: float = 1.0
    ...     stochastic_rounding: bool = False
    ...     def init(self, rows, dim):
    ...         return {}
    ...     def update(self, w, state, g, step, dim):
    ...         return w - self.learning_rate * g, state
    >>> new_w, _ = fused_update_from_row_gradients(
    ...     jnp.zeros((3, 1)), {}, 1, jnp.array([2, 0, 2, 3], jnp.int32),
    ...     jnp.ones((4, 1)), dim=1, optimizer=SGD())
    >>> new_w[:, 0].tolist()
    [-1.0, 0.0, -2.0]
    """
    num_rows = weights.shape[0]
    seg = segments(rows, num_rows)
    m = rows.shape[0]
    summed = jax.ops.segment_sum(
        grads[seg.order].astype(jnp.float32), seg.segment, num_segments=m, indices_are_sorted=True
    )
    new_w, new_s, nonfinite = apply_unique_rows(
        weights, dict(state), step, seg.unique_rows, summed, dim=dim, optimizer=optimizer
    )
    return (new_w, new_s, nonfinite) if return_nonfinite else (new_w, new_s)
