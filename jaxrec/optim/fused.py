"""The parameter node of a fused table group, and the optax glue around it.

With a fused optimizer the backward of an embedding lookup does not return a
gradient of the table: it applies the sparse optimizer to the touched rows
and hands the *updated* table, state and step count out as the cotangent of
the table's :class:`FusedTableParams`. ``jax.grad(loss)(params)`` therefore
holds, for each fused group, ``FusedTableParams(weight=new_table,
state=new_state, step=step + 1, uses=<a genuine-update marker>)``.

:func:`fused` wraps a dense optax transformation so that it transforms every
other leaf and passes those entries through untouched; :func:`apply_updates`
adds the dense updates and swaps the fused entries in::

    tx = fused(optax.adam(1e-3))
    opt_state = tx.init(params)
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = apply_updates(params, updates)

A fused entry is a finished table, not a gradient, so no optax code may add,
scale, average or decay it. ``uses`` is the float32[5] marker that tells a
genuine update of this step from anything else, and carries the count of
rows that the non-finite guard left unchanged:

===========  =================  ==========================================
index        params (at rest)   gradient of one fused lookup
===========  =================  ==========================================
0 count      0                  1 (JAX sums it: n lookups give n)
1 a          skips since apply  a = params' a + 1
2 a*a        0                  a * a (float32)
3 rest       1                  0 (a multiple of params added shows here)
4 stale      0                  1 if the params' marker was not at rest
5 nonfinite  rows skipped so    rows skipped in this step
             far (all steps)
===========  =================  ==========================================

Any linear combination other than "one genuine entry" breaks a relation:
a sum of n lookups has count n; scaling by c has count c; a mean over steps
(whose ``a`` differ, since a skipped step bumps the params' ``a``) breaks
``a*a``; ``g + w * params`` (weight decay outside :func:`fused`) has rest
``w``; ``params + update`` (``optax.apply_updates``) leaves count 1 in the
params, so the next step's gradient is stale. Zeros mean "optax skipped
this step" (``apply_if_finite``, ``MultiSteps``' in-between steps).

What is checked, and where (eagerly a ``ValueError``; under ``jit`` one
device predicate for all tables and a host callback only on misuse):

- :func:`fused` checks each entry of the gradient (one ``lax.cond`` per step).
- :func:`apply_updates` re-checks only entries that :func:`fused` did not hand
  it unchanged (anything chained after ``fused``, or no ``fused`` at all). A
  zero entry (a skipped step) leaves the table, its state and step bit for
  bit as they were; restoring them under ``jit`` needs the old table after
  the backward wrote the new one, so XLA copies the tables on that path
  only: prefer ``fused(optax.apply_if_finite(tx, n))``, which skips the dense
  step and never copies a table.
- Weight tying (a fused weight also read outside the lookup, or a loss term
  over all params, so that JAX adds a dense gradient to the updated table) is
  detected at trace time, at no run-time cost, when the gradient reaches
  :func:`fused` as ``jax.grad`` returned it: the marker is the lookup's own
  output but the weight is not. Behind a ``jit``/``remat``/``scan`` boundary
  inside the loss, or a wrapper around ``fused``, this is not detected.

Rows skipped by the non-finite guard (a row whose summed gradient holds a NaN
or an infinity keeps its weights and state, ``jaxrec.ops.nonfinite``) are
counted under ``bounds_check_mode`` WARNING (and FATAL, which also raises):
the backward puts this step's count in slot 5 of the gradient's marker and
:func:`apply_updates` adds it to the params' running total. Read it with
:func:`nonfinite_rows` (per fused entry) or ``FusedTableParams.nonfinite_rows``;
the collections also sow the total of their params into the ``"bounds_check"``
collection as ``"nonfinite_gradient_rows"``, beside ``"invalid_ids"``. The
count is a float32 slot: exact up to 2**24 skipped rows.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.optim.sparse_optimizers import SparseOptimizer

__all__ = [
    "FusedTableParams",
    "apply_updates",
    "fused",
    "init_fused_table",
    "is_fused_table",
    "lookup_cotangent",
    "nonfinite_rows",
]

_TABLE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
_COUNT, _A, _SQUARE, _REST, _STALE, _NONFINITE = range(6)
MARKER_SIZE = 6


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
      uses: float32[6] marker (module docstring): ``[0, skips, 0, 1, 0, n]`` in
        params, ``[1, a, a*a, 0, 0, k]`` in the gradient of one fused lookup, where
        ``n`` counts the rows the non-finite guard has skipped so far and ``k`` those
        it skipped in this step.
    """

    weight: jax.Array
    state: dict[str, jax.Array]
    step: jax.Array
    uses: jax.Array

    @property
    def nonfinite_rows(self) -> jax.Array:
        """int32: rows the non-finite guard left unchanged (params: so far; gradient: this step).

        Counted under ``bounds_check_mode`` WARNING and FATAL; 0 under IGNORE and NONE.
        """
        return jnp.asarray(self.uses, jnp.float32)[_NONFINITE].astype(jnp.int32)


def _rest_marker(skips: Any = 0.0, nonfinite: Any = 0.0) -> jax.Array:
    zero = jnp.zeros((), jnp.float32)
    return jnp.stack([zero, zero + skips, zero, zero + 1, zero, zero + nonfinite])


def init_fused_table(weight: jax.Array, optimizer: SparseOptimizer) -> FusedTableParams:
    """Wraps a stacked table with zero optimizer state, ``step = 0`` and a rest marker.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_rowwise_adagrad
    >>> p = init_fused_table(jnp.zeros((4, 8)), exact_rowwise_adagrad())
    >>> p.state["momentum1"].shape, float(p.step), p.uses.tolist()
    ((4,), 0.0, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
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
        uses=_rest_marker(),
    )


class _Seen:
    """Objects met at trace (or eager) time, matched by identity through weak references.

    A key maps to the objects registered with it; a dead or reused id never matches.
    """

    def __init__(self) -> None:
        self._refs: dict[int, tuple[weakref.ref, ...]] = {}

    def add(self, key: Any, *objects: Any) -> None:
        try:
            refs = tuple(weakref.ref(obj) for obj in (key, *objects))
        except TypeError:  # not weakly referenceable (e.g. a Python float): never matched
            return
        if len(self._refs) > 4096:
            self._refs = {k: v for k, v in self._refs.items() if v[0]() is not None}
        self._refs[id(key)] = refs

    def get(self, key: Any) -> tuple | None:
        refs = self._refs.get(id(key))
        if refs is None or refs[0]() is not key:
            return None
        return tuple(ref() for ref in refs[1:])


_LOOKUP_OUTPUTS = _Seen()  # marker of a lookup's cotangent -> its weight
_HANDED_OVER = _Seen()  # marker of an entry `fused` passed on -> every leaf of that entry


def lookup_cotangent(
    param: FusedTableParams,
    weight: jax.Array,
    state: dict[str, jax.Array],
    step: jax.Array,
    nonfinite: jax.Array | None = None,
) -> FusedTableParams:
    """The cotangent a fused lookup returns for ``param``: the updated table and its marker.

    ``step`` is ``param.step + 1``; ``nonfinite`` the rows the non-finite guard skipped in
    this step (counted ones only; None: 0). The marker is ``[1, a, a*a, 0, stale,
    nonfinite]`` with ``a = param.uses[1] + 1`` and ``stale = 1`` when ``param``'s marker
    is not at rest.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> p = init_fused_table(jnp.zeros((2, 2)), exact_sgd())
    >>> lookup_cotangent(p, p.weight + 1, p.state, p.step + 1, jnp.int32(2)).uses.tolist()
    [1.0, 1.0, 1.0, 0.0, 0.0, 2.0]
    """
    if jnp.shape(param.uses) != (MARKER_SIZE,):
        raise ValueError(
            f"a fused table's marker (uses) has shape {jnp.shape(param.uses)}; expected "
            f"({MARKER_SIZE},): initialise the table with init_fused_table (or the collection)"
        )
    uses = jnp.asarray(param.uses, jnp.float32)
    a = uses[_A] + 1
    stale = (uses[_COUNT] != 0) | (uses[_SQUARE] != 0) | (uses[_REST] != 1) | (uses[_STALE] != 0)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    skipped = zero if nonfinite is None else jnp.asarray(nonfinite).astype(jnp.float32)
    marker = jnp.stack([one, a, a * a, zero, stale.astype(jnp.float32), skipped])
    _LOOKUP_OUTPUTS.add(marker, weight)
    return FusedTableParams(weight=weight, state=state, step=step, uses=marker)


def is_fused_table(node: Any) -> bool:
    """Whether ``node`` is a fused table group entry (a pytree leaf for the optax glue)."""
    return isinstance(node, FusedTableParams)


def _dense_mask(tree: Any) -> Any:
    return jax.tree.map(lambda node: not is_fused_table(node), tree, is_leaf=is_fused_table)


def _fused_entries(tree: Any) -> dict[str, FusedTableParams]:
    entries, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_fused_table)
    return {jax.tree_util.keystr(path): node for path, node in entries if is_fused_table(node)}


def _genuine(uses: jax.Array, step: jax.Array, param_step: jax.Array | None) -> jax.Array:
    """Device predicate: ``uses`` and ``step`` are those of one genuine update of this step."""
    a = uses[_A]
    ok = (uses[_COUNT] == 1) & (uses[_SQUARE] == a * a) & (a >= 1)
    ok = ok & (uses[_REST] == 0) & (uses[_STALE] == 0)
    if param_step is not None:
        ok = ok & (step == param_step + 1)
    return ok


_WRAP = (
    "wrap the dense transformation instead, so that only the dense params see it: "
    "jaxrec.optim.fused(optax.chain(..., tx)), jaxrec.optim.fused(optax.MultiSteps(tx, k)"
    ".gradient_transformation()) or jaxrec.optim.fused(optax.apply_if_finite(tx, n))"
)


def _misuse_message(
    path: str, uses: Any, step: Any = None, param_step: Any = None, *, in_apply: bool = False
) -> str | None:
    """What is wrong with a fused entry carrying marker ``uses`` (None when it is genuine)."""
    uses = np.asarray(uses, np.float32).reshape(-1)
    where = f"the fused table at {path or '<root>'}"
    if uses.shape != (MARKER_SIZE,):
        return f"{where} has a marker of shape {uses.shape}; expected ({MARKER_SIZE},)"
    shown = f"uses={uses.tolist()}"
    count, a, square, rest, stale, _ = (np.float32(v) for v in uses)
    if not uses.any():
        if in_apply:
            return None  # optax skipped the step: the caller keeps the table
        return (
            f"{where} has {shown}: no fused lookup used it in this step, so its gradient is a "
            "zero table and applying it would wipe the table. Call the embedding module inside "
            "the differentiated loss, or leave this table out of the tree given to the optimizer."
        )
    if stale != 0:
        return (
            f"{where} has {shown}: the table it was computed from is not what "
            "jaxrec.optim.apply_updates leaves (the previous step's update was added to the "
            "table, e.g. by optax.apply_updates, so it holds old + new). Apply fused updates "
            "with jaxrec.optim.apply_updates, never optax.apply_updates."
        )
    if rest != 0:
        return (
            f"{where} has {shown}: a multiple of the params was added to its update (e.g. "
            "optax.add_decayed_weights or another weight decay chained outside "
            "jaxrec.optim.fused), which would add a decayed copy of the table to the updated "
            "table. Put the decay inside jaxrec.optim.fused(...) for the dense params and use "
            "the sparse optimizer's weight_decay for the tables."
        )
    n = int(count) if count >= 2 and float(count).is_integer() else 0
    if n and np.float32(square * count) == np.float32(a * a):
        return (
            f"{where} has {shown}: it entered {n} fused lookups in one step, or {n} gradients "
            f"were accumulated, and JAX summed {n} updated tables (a sum of tables, not an "
            "update). Send all features sharing the table through one lookup, use the unfused "
            "path (optimizer None) for a table also used elsewhere, and do not accumulate "
            "gradients of fused tables."
        )
    if count == 1 and square != np.float32(a * a):
        return (
            f"{where} has {shown}: the fused entries of several steps were averaged (e.g. "
            "optax.MultiSteps around jaxrec.optim.fused); an average of updated tables is not "
            f"an update. To accumulate the dense gradients only, {_WRAP}."
        )
    if count == 1 and square == np.float32(a * a) and a >= 1:
        if step is None or param_step is None or np.float32(step) == np.float32(param_step) + 1:
            return None
        return (
            f"{where} has step={float(step)} but the table's step is {float(param_step)}: the "
            "update was computed from other params (a stale gradient). Apply each step's "
            "gradient to the params it was computed from."
        )
    return (
        f"{where} has {shown}: its update was scaled, averaged or otherwise transformed after "
        "the lookup (e.g. optax.clip_by_global_norm chained after jaxrec.optim.fused, or an "
        "optax optimizer used without jaxrec.optim.fused); the fused entry already holds the "
        f"updated table and cannot be rescaled. Hand it to the optimizer unchanged: {_WRAP}."
    )


def _concrete(x: Any) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _raise_first_misuse(*values: Any, paths: tuple[str, ...], in_apply: bool) -> None:
    """Host side of the check: ``values`` holds (uses, step, param step or nan) per path."""
    for k, path in enumerate(paths):
        uses, step, param_step = values[3 * k : 3 * k + 3]
        param_step = None if np.isnan(param_step) else param_step
        message = _misuse_message(path, uses, step, param_step, in_apply=in_apply)
        if message is not None:
            raise ValueError(message)


def _check_on_device(checks: list, *, in_apply: bool) -> None:
    """One device predicate for all ``(path, update, param step, skipped)`` entries; the host
    is called only on misuse (an unconditional callback stalls every step)."""
    if not checks:
        return
    paths = tuple(path for path, _, _, _ in checks)
    values, bad = [], []
    for _, update, param_step, skipped in checks:
        uses = jnp.asarray(update.uses, jnp.float32)
        step = jnp.asarray(update.step, jnp.float32)
        misused = ~_genuine(uses, step, param_step)
        if skipped is not None:
            misused = misused & ~skipped
        bad.append(misused)
        nan = jnp.full((), jnp.nan, jnp.float32)
        values += [uses, step, nan if param_step is None else jnp.asarray(param_step, jnp.float32)]
    report = functools.partial(_raise_first_misuse, paths=paths, in_apply=in_apply)
    jax.lax.cond(
        functools.reduce(jnp.logical_or, bad),
        lambda *v: jax.debug.callback(report, *v),
        lambda *v: None,
        *values,
    )


def _check_tying(path: str, entry: FusedTableParams) -> None:
    """Trace-time: the marker is the lookup's own output but the weight is not."""
    outputs = _LOOKUP_OUTPUTS.get(entry.uses)
    if outputs is not None and outputs[0] is not entry.weight:
        raise ValueError(
            f"the fused table at {path or '<root>'} is also read outside its lookup (weight "
            "tying, or a loss term over all params): JAX added that read's gradient to the "
            "updated table. Give this table optimizer None (a plain array trained by the dense "
            "optimizer), or keep the other read out of the differentiated loss."
        )


def _check_gradient(grads: Any, params: Any) -> None:
    param_entries = {} if params is None else _fused_entries(params)
    traced = []
    for path, entry in _fused_entries(grads).items():
        _check_tying(path, entry)
        param = param_entries.get(path)
        param_step = None if param is None else param.step
        values = [_concrete(x) for x in (entry.uses, entry.step, param_step)]
        if (
            values[0] is not None
            and values[1] is not None
            and (param_step is None or values[2] is not None)
        ):
            message = _misuse_message(path, values[0], values[1], values[2])
            if message is not None:
                raise ValueError(message)
        else:
            traced.append((path, entry, param_step, None))
    _check_on_device(traced, in_apply=False)


def _hand_over(updates: Any) -> None:
    for entry in _fused_entries(updates).values():
        _HANDED_OVER.add(entry.uses, *jax.tree.leaves(entry))


def _handed_over(entry: FusedTableParams) -> bool:
    """Whether ``entry`` is, leaf for leaf, one that :func:`fused` passed on."""
    leaves = _HANDED_OVER.get(entry.uses)
    if leaves is None:
        return False
    mine = jax.tree.leaves(entry)
    return len(mine) == len(leaves) and all(a is b for a, b in zip(mine, leaves, strict=True))


def fused(
    dense_tx: optax.GradientTransformation, *, check_uses: bool = True
) -> optax.GradientTransformationExtraArgs:
    """``dense_tx`` on every leaf outside a :class:`FusedTableParams`; fused entries pass through.

    The fused entries of the gradient already hold the updated table, state
    and step (the custom VJP applied the sparse optimizer), so they are the
    update; ``dense_tx`` never sees them (nor counts them in, e.g., a global
    norm). Wrap every optax transformation here (clipping, weight decay,
    ``MultiSteps``, ``apply_if_finite``) so that it acts on the dense params
    only. With ``check_uses`` each fused entry must be one genuine update of
    this step (module docstring); otherwise a ``ValueError`` names the entry,
    the cause and what to write instead: eagerly when the values are concrete,
    and at run time (``jax.debug.callback``, surfacing as a runtime error that
    carries the message) under ``jit``, one predicate for all tables. Weight
    tying is refused at trace time either way.

    >>> import jax.numpy as jnp, optax
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> params = {"dense": jnp.ones(2), "emb": init_fused_table(jnp.zeros((3, 2)), exact_sgd())}
    >>> tx = fused(optax.sgd(0.5))
    >>> state = tx.init(params)
    >>> emb = params["emb"]
    >>> grads = {"dense": jnp.ones(2), "emb": lookup_cotangent(emb, emb.weight + 1, {}, emb.step + 1)}
    >>> updates, state = tx.update(grads, state, params)
    >>> new = apply_updates(params, updates)
    >>> new["dense"].tolist(), new["emb"].weight.sum().item(), new["emb"].step.item()
    ([0.5, 0.5], 6.0, 1.0)
    """
    inner = optax.masked(dense_tx, _dense_mask)

    def update_fn(updates, state, params=None, **extra_args):
        if check_uses:
            _check_gradient(updates, params)
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        _hand_over(new_updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _taken(param: FusedTableParams, update: FusedTableParams) -> FusedTableParams:
    """The update swapped in, in the param's dtypes, with the marker at rest.

    The update's non-finite rows of this step add to the param's running count.
    """
    nonfinite = jnp.asarray(param.uses, jnp.float32)[_NONFINITE]
    nonfinite = nonfinite + jnp.asarray(update.uses, jnp.float32)[_NONFINITE]
    return FusedTableParams(
        weight=jnp.asarray(update.weight).astype(jnp.result_type(param.weight)),
        state=jax.tree.map(lambda p, u: jnp.asarray(u).astype(p.dtype), param.state, update.state),
        step=jnp.asarray(update.step).astype(jnp.result_type(param.step)),
        uses=_rest_marker(nonfinite=nonfinite),
    )


def _kept(param: FusedTableParams) -> FusedTableParams:
    """The param unchanged after a skipped step; the marker counts the skip."""
    uses = jnp.asarray(param.uses, jnp.float32)
    return dataclasses.replace(param, uses=_rest_marker(uses[_A] + 1, uses[_NONFINITE]))


def _from_lookup(entry: FusedTableParams) -> bool:
    """Whether ``entry``'s marker and weight are a lookup's own cotangent, untouched.

    Such an entry is never a skipped step (its count is 1), so :func:`apply_updates` swaps
    it in without the ``lax.cond`` that keeps old tables, a cond that makes XLA copy every
    table (twice per step) to hold the old and the updated one at once.
    """
    outputs = _LOOKUP_OUTPUTS.get(entry.uses)
    return outputs is not None and outputs[0] is entry.weight


def apply_updates(params: Any, updates: Any) -> Any:
    """``optax.apply_updates``, except that fused entries are replaced by the update's.

    Dense leaves become ``param + update`` in the param's dtype; each
    :class:`FusedTableParams` becomes the one in ``updates`` (its weight cast
    to the param's dtype), since it already is the updated table. A zero
    entry (optax skipped the step) keeps the table, state and step bit for
    bit. An entry that :func:`fused` did not pass on unchanged is checked
    (module docstring) and a misused one raises a ``ValueError`` naming it.

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> p = {"b": jnp.zeros(2), "t": init_fused_table(jnp.zeros((2, 2)), exact_sgd())}
    >>> t = p["t"]
    >>> u = {"b": jnp.ones(2), "t": lookup_cotangent(t, jnp.full((2, 2), 7.0), {}, t.step + 1)}
    >>> out = apply_updates(p, u)
    >>> out["b"].tolist(), out["t"].weight.tolist(), out["t"].uses.tolist()
    ([1.0, 1.0], [[7.0, 7.0], [7.0, 7.0]], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    """
    checks = []

    def plan(path: tuple, param: Any, update: Any) -> Any:
        if not is_fused_table(param):
            return None if param is None else optax.apply_updates(param, update)
        where = jax.tree_util.keystr(path)
        if not is_fused_table(update):
            raise ValueError(
                f"apply_updates: the update at {where} is {type(update).__name__}, expected "
                "FusedTableParams (wrap the dense transformation with jaxrec.optim.fused)"
            )
        if _handed_over(update):
            return _taken(param, update)
        uses, step, param_step = (_concrete(x) for x in (update.uses, update.step, param.step))
        if uses is not None and step is not None and param_step is not None:
            message = _misuse_message(where, uses, step, param_step, in_apply=True)
            if message is not None:
                raise ValueError(message)
            return _kept(param) if not uses.any() else _taken(param, update)
        if _from_lookup(update):  # jax.grad's entry as the lookup made it: count 1, no skip
            checks.append((where, update, param.step, None))
            return _taken(param, update)
        skipped = jnp.all(jnp.asarray(update.uses) == 0)
        checks.append((where, update, param.step, skipped))
        return jax.lax.cond(skipped, lambda: _kept(param), lambda: _taken(param, update))

    out = jax.tree_util.tree_map_with_path(
        plan, params, updates, is_leaf=lambda node: node is None or is_fused_table(node)
    )
    _check_on_device(checks, in_apply=True)
    return out


def nonfinite_rows(tree: Any) -> dict[str, jax.Array]:
    """The rows the non-finite guard left unchanged, per fused entry of ``tree``.

    ``{path: int32 count}`` for every :class:`FusedTableParams` in ``tree`` (params,
    a collection's variables, a TBE state): in params, the running total of every step
    applied by :func:`apply_updates`; in a gradient, this step's rows. Counted under
    ``bounds_check_mode`` WARNING and FATAL (module docstring).

    >>> import jax.numpy as jnp
    >>> from jaxrec.optim.sparse_optimizers import exact_sgd
    >>> p = {"t": init_fused_table(jnp.zeros((2, 2)), exact_sgd())}
    >>> g = {"t": lookup_cotangent(p["t"], p["t"].weight, {}, p["t"].step + 1, jnp.int32(1))}
    >>> {k: int(v) for k, v in nonfinite_rows(apply_updates(p, g)).items()}
    {"['t']": 1}
    """
    return {path: entry.nonfinite_rows for path, entry in _fused_entries(tree).items()}


def _to_state_dict(node: FusedTableParams) -> dict[str, Any]:
    return {
        "weight": node.weight,
        "state": flax.serialization.to_state_dict(node.state),
        "step": node.step,
        "uses": node.uses,
    }


def _from_state_dict(target: FusedTableParams, state: dict[str, Any]) -> FusedTableParams:
    missing = sorted({"weight", "state", "step", "uses"} - set(state))
    if missing:
        raise ValueError(f"a FusedTableParams state dict lacks {missing}; it has {sorted(state)}")
    return FusedTableParams(
        weight=flax.serialization.from_state_dict(target.weight, state["weight"], name="weight"),
        state=flax.serialization.from_state_dict(target.state, state["state"], name="state"),
        step=flax.serialization.from_state_dict(target.step, state["step"], name="step"),
        uses=flax.serialization.from_state_dict(target.uses, state["uses"], name="uses"),
    )


flax.serialization.register_serialization_state(FusedTableParams, _to_state_dict, _from_state_dict)
