"""The parameter node of a fused table group, and the optax glue around it.

With a fused optimizer the backward of an embedding lookup does not return a
gradient of the table: it applies the sparse optimizer to the touched rows
and hands the *updated* table, state and step count out as the cotangent of
the table's :class:`FusedTableParams`. ``jax.grad(loss)(params)`` therefore
holds, for each fused group, ``FusedTableParams(weight=new_table,
state=new_state, step=step + 1, uses=1.0)``.

:func:`fused` wraps a dense optax transformation so that it transforms every
other leaf and passes those entries through untouched; :func:`apply_updates`
adds the dense updates and swaps the fused entries in::

    tx = fused(optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

``uses`` is the misuse detector. JAX adds the cotangents of an input used
twice, so a table that entered two fused lookups in one step comes back as
the *sum of two updated tables* with ``uses = 2``; a table that no fused
lookup touched comes back as zeros with ``uses = 0``. Neither may be applied.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.optim.sparse_optimizers import SparseOptimizer

__all__ = ["FusedTableParams", "apply_updates", "fused", "init_fused_table"]

_TABLE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weight", "state", "step", "uses"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class FusedTableParams:
    """One stacked table group trained by a fused sparse optimizer.

    Attributes:
      weight: ``[R, D]`` stacked table (float32, float16 or bfloat16).
      state: the optimizer's state rows, leading dim ``R`` (``{}`` for SGD).
      step: float32 scalar, fused steps applied so far; the optimizer's ``t``
        of the next step is ``step + 1``. float32 counts exactly up to 2**24
        (16.7M) steps; beyond, increments round and the count drifts.
      uses: float32 scalar marker; the backward of a fused lookup returns 1.0
        as its cotangent, so the gradient's ``uses`` counts lookups.
    """

    weight: jax.Array
    state: dict[str, jax.Array]
    step: jax.Array
    uses: jax.Array


def init_fused_table(weight: jax.Array, optimizer: SparseOptimizer) -> FusedTableParams:
    """Wraps a stacked table with zero optimizer state, ``step = 0``, ``uses = 0``.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_rowwise_adagrad
    >>> p = init_fused_table(jnp.zeros((4, 8)), exact_rowwise_adagrad())
    >>> p.state["momentum1"].shape, float(p.step), float(p.uses)
    ((4,), 0.0, 0.0)
    """
    if not isinstance(optimizer, SparseOptimizer):
        raise ValueError(
            f"init_fused_table: optimizer must be a SparseOptimizer, got {optimizer!r}"
        )
    shape = jnp.shape(weight)
    if len(shape) != 2:
        raise ValueError(f"init_fused_table: weight has shape {shape}; expected [R, D]")
    dtype = np.dtype(jnp.result_type(weight))
    if dtype not in _TABLE_DTYPES:
        raise ValueError(
            f"init_fused_table: weight has dtype {dtype}; expected float32, float16 or bfloat16"
        )
    return FusedTableParams(
        weight=jnp.asarray(weight),
        state=optimizer.init(int(shape[0]), int(shape[1])),
        step=jnp.zeros((), jnp.float32),
        uses=jnp.zeros((), jnp.float32),
    )


def _is_fused(node: Any) -> bool:
    return isinstance(node, FusedTableParams)


def _dense_mask(tree: Any) -> Any:
    return jax.tree.map(lambda node: not _is_fused(node), tree, is_leaf=_is_fused)


def _misuse_message(path: str, uses: float) -> str | None:
    """What is wrong with a fused entry whose gradient carries ``uses``."""
    if uses == 1.0:
        return None
    where = f"the fused table at {path or '<root>'}"
    if uses == 0.0:
        return (
            f"{where} has uses=0.0: no fused lookup used it in this step, so its gradient is a "
            "zero table and applying it would wipe the table. Call the embedding module inside "
            "the differentiated loss, or leave this table out of the tree given to the optimizer."
        )
    if uses > 1.0 and float(uses).is_integer():
        n = int(uses)
        return (
            f"{where} has uses={uses}: it entered {n} fused lookups in one step, or {n} gradients "
            f"were accumulated, and JAX summed {n} updated tables (a sum of tables, not an "
            "update). Send all features sharing the table through one lookup, use the unfused "
            "path for a table also used elsewhere (weight tying), and do not accumulate "
            "gradients of fused tables (e.g. optax.MultiSteps)."
        )
    return (
        f"{where} has uses={uses}: its gradient was scaled, averaged or otherwise transformed "
        "before the optimizer (the fused entry already holds the updated table and cannot be "
        "rescaled). Hand the output of jax.grad to the fused transformation unchanged."
    )


def _raise_if_misused(uses: Any, *, path: str) -> None:
    message = _misuse_message(path, float(np.asarray(uses)))
    if message is not None:
        raise ValueError(message)


def _raise_first_misuse(*uses: Any, paths: tuple[str, ...]) -> None:
    for path, value in zip(paths, uses, strict=True):
        _raise_if_misused(value, path=path)


def _check_uses(grads: Any) -> None:
    entries, _ = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_fused)
    fused_entries = [
        (jax.tree_util.keystr(key_path), node.uses) for key_path, node in entries if _is_fused(node)
    ]
    traced = []
    for path, uses in fused_entries:
        try:
            concrete = float(np.asarray(uses))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            traced.append((path, uses))
        else:
            _raise_if_misused(concrete, path=path)
    if not traced:
        return
    # One device-side predicate for all fused entries; the host is called only on misuse
    # (an unconditional callback stalls every step, and each conditional costs a round trip).
    paths = tuple(path for path, _ in traced)
    values = tuple(uses for _, uses in traced)
    report = functools.partial(_raise_first_misuse, paths=paths)
    misused = functools.reduce(jnp.logical_or, [uses != 1.0 for uses in values])
    jax.lax.cond(
        misused,
        lambda *uses: jax.debug.callback(report, *uses),
        lambda *uses: None,
        *values,
    )


def fused(
    dense_tx: optax.GradientTransformation, *, check_uses: bool = True
) -> optax.GradientTransformationExtraArgs:
    """``dense_tx`` on every leaf outside a :class:`FusedTableParams`; fused entries pass through.

    The fused entries of the gradient already hold the updated table, state
    and step (the custom VJP applied the sparse optimizer), so they are the
    update; ``dense_tx`` never sees them (nor counts them in, e.g., a global
    norm). With ``check_uses`` a fused entry whose ``uses`` is not 1 raises a
    ``ValueError`` naming the entry and the cause: eagerly when the value is
    concrete, and at run time (through ``jax.debug.callback``, surfacing as a
    runtime error that carries the message) under ``jit``.

    >>> import jax.numpy as jnp, optax
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> params = {"dense": jnp.ones(2), "emb": init_fused_table(jnp.zeros((3, 2)), exact_sgd())}
    >>> tx = fused(optax.sgd(0.5))
    >>> state = tx.init(params)
    >>> new_emb = init_fused_table(jnp.ones((3, 2)), exact_sgd())
    >>> grads = {"dense": jnp.ones(2), "emb": dataclasses.replace(new_emb, uses=jnp.float32(1))}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = apply_updates(params, updates)
    >>> new["dense"].tolist(), new["emb"].weight.sum().item()
    ([0.5, 0.5], 6.0)
    """
    inner = optax.masked(dense_tx, _dense_mask)

    def update_fn(updates, state, params=None, **extra_args):
        if check_uses:
            _check_uses(updates)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _apply_one(path: tuple, param: Any, update: Any) -> Any:
    if _is_fused(param):
        if not _is_fused(update):
            raise ValueError(
                f"apply_updates: the update at {jax.tree_util.keystr(path)} is "
                f"{type(update).__name__}, expected FusedTableParams (wrap the dense "
                "transformation with jaxrec.optim.fused)"
            )
        return FusedTableParams(
            weight=jnp.asarray(update.weight).astype(jnp.result_type(param.weight)),
            state=update.state,
            step=update.step,
            uses=update.uses,
        )
    if param is None:
        return None
    return optax.apply_updates(param, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``optax.apply_updates``, except that fused entries are replaced by the update's.

    Dense leaves become ``param + update`` in the param's dtype; each
    :class:`FusedTableParams` becomes the one in ``updates`` (its weight cast
    to the param's dtype), since it already is the updated table.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> p = {"b": jnp.zeros(2), "t": init_fused_table(jnp.zeros((2, 2)), exact_sgd())}
    >>> u = {"b": jnp.ones(2), "t": init_fused_table(jnp.full((2, 2), 7.0), exact_sgd())}
    >>> out = apply_updates(p, u)
    >>> out["b"].tolist(), out["t"].weight.tolist()
    ([1.0, 1.0], [[7.0, 7.0], [7.0, 7.0]])
    """
    return jax.tree_util.tree_map_with_path(
        _apply_one, params, updates, is_leaf=lambda node: node is None or _is_fused(node)
    )
