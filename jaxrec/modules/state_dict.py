"""Loading TorchRec-named table weights and fused optimizer state into stacked groups.

:mod:`jaxrec.modules.stacked_tables` makes the per-table views; this module
goes back: it checks a state dict (names, shapes, values) and writes its
arrays into the group buffers, and does the same for the fused optimizer
state. Nothing here is traced: the checks read the values on the host.

Names. Weights: ``"<prefix>.<table>.weight"`` (``prefix`` is
``embedding_bags`` for bags, ``embeddings`` for sequences), as TorchRec's
``state_dict``. Optimizer state: ``{"<prefix>.<table>.weight": {"momentum1":
rows, "momentum2": rows, "step": t}}``. TorchRec's fused optimizer keys its
``state_dict()["state"]`` by the same parameter name and names the first
state ``"<table>.momentum1"`` (the later ones after FBGEMM's buffers, e.g.
``"<table>.exp_avg_sq"``); jaxrec drops the repeated table name and keeps
FBGEMM's buffer names ``momentum1``/``momentum2``. ``step`` (FBGEMM's
``iter``) is shared by the tables of one stacked group.

>>> import numpy as np
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.ops.plan import build_plan
>>> tables = [EmbeddingBagConfig(name="t1", embedding_dim=2, num_embeddings=3, feature_names=["f1"])]
>>> plan = build_plan(tables)
>>> groups = {"sum_float32_d2": np.zeros((3, 2), np.float32)}
>>> new, keys = load_tables(plan, "embedding_bags", groups, {"embedding_bags.t1.weight": np.ones((3, 2))})
>>> float(new["sum_float32_d2"].sum()), keys
(6.0, IncompatibleKeys(missing_keys=[], unexpected_keys=[]))
>>> load_tables(plan, "embedding_bags", groups, {"embedding_bags.t1.weight": np.full((3, 2), 1e39)})
Traceback (most recent call last):
...
ValueError: embedding_bags.t1.weight: value 1e+39 at index (0, 0) does not fit in float32 (largest finite 3.40282e+38)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.ops.plan import LookupPlan
from jaxrec.optim.fused import FusedTableParams

__all__ = [
    "IncompatibleKeys",
    "check_groups",
    "load_optimizer_state",
    "load_tables",
]

# TorchRec's state-dict prefix of each collection, to name a state dict of the wrong kind.
_COLLECTION_OF_PREFIX = {
    "embedding_bags": "EmbeddingBagCollection",
    "embeddings": "EmbeddingCollection",
}


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` skipped, as torch's ``_IncompatibleKeys``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _owner(prefix: str) -> str:
    return _COLLECTION_OF_PREFIX.get(prefix, f"this collection ({prefix!r})")


def check_groups(
    plan: LookupPlan, prefix: str, variables: Any, what: str = "variables"
) -> Mapping[str, Any]:
    """The group entries of ``variables["params"][prefix]``, or a ValueError saying what is wrong.

    >>> from jaxrec.configs import EmbeddingBagConfig
    >>> from jaxrec.ops.plan import build_plan
    >>> plan = build_plan([EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3)])
    >>> check_groups(plan, "embedding_bags", {})
    Traceback (most recent call last):
    ...
    ValueError: variables has no 'params' entry (got keys []); pass what EmbeddingBagCollection.init returned, e.g. {'params': {'embedding_bags': ...}}
    """
    owner = _owner(prefix)
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            f"{what} has no 'params' entry (got keys {got}); pass what {owner}.init "
            f"returned, e.g. {{'params': {{{prefix!r}: ...}}}}"
        )
    params = variables["params"]
    if not isinstance(params, Mapping) or prefix not in params:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        other = [p for p in _COLLECTION_OF_PREFIX if p != prefix and p in got]
        hint = f": these are an {_COLLECTION_OF_PREFIX[other[0]]}'s variables" if other else ""
        raise ValueError(
            f"{what}['params'] has no {prefix!r} entry (got keys {got}){hint}; "
            f"{owner} keeps its tables under params[{prefix!r}]"
        )
    groups = params[prefix]
    for group in plan.groups:
        if not isinstance(groups, Mapping) or group.name not in groups:
            got = sorted(groups) if isinstance(groups, Mapping) else type(groups).__name__
            raise ValueError(
                f"{what}['params'][{prefix!r}] has no group {group.name!r} (got {got}): the "
                f"variables were made by a collection with other tables"
            )
        weight = groups[group.name]
        weight = weight.weight if isinstance(weight, FusedTableParams) else weight
        rows = jnp.shape(weight)[0] if jnp.ndim(weight) else None
        if rows != group.num_rows:
            raise ValueError(
                f"{what}['params'][{prefix!r}][{group.name!r}] has {rows} rows; tables "
                f"{list(group.tables)} need {group.num_rows}"
            )
    return groups


def _checked_array(name: str, value: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``value`` as a ``dtype`` array of ``shape``, refusing anything that would not load exactly.

    Refused: strings, objects and other non-numbers, complex numbers, a wrong shape,
    inf or nan, and finite values that overflow ``dtype`` (e.g. 1e6 in float16).
    """
    if isinstance(value, jax.Array):
        array: Any = value
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name}: cannot be read as an array ({error})") from None
    source = np.dtype(array.dtype)
    if source.kind == "c":
        raise ValueError(f"{name}: has complex values ({source}); tables hold real numbers")
    if source.kind not in "fiu":
        raise ValueError(f"{name}: has {source} values; expected real numbers (float or int)")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(array.shape)}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        cast = jnp.asarray(array).astype(dtype)
    if bool(jnp.isfinite(cast).all()):
        return cast
    xp = jnp if isinstance(array, jax.Array) else np
    source_finite = np.asarray(xp.isfinite(array)) if source.kind == "f" else None
    if source_finite is not None and not source_finite.all():
        where = tuple(int(i) for i in np.argwhere(~source_finite)[0])
        raise ValueError(
            f"{name}: holds a non-finite value ({np.asarray(array)[where]}) at index {where}"
        )
    where = tuple(int(i) for i in np.argwhere(~np.asarray(jnp.isfinite(cast)))[0])
    limit = float(jnp.finfo(dtype).max)
    raise ValueError(
        f"{name}: value {np.asarray(array)[where]} at index {where} does not fit in "
        f"{np.dtype(dtype).name} (largest finite {limit:g})"
    )


def _check_keys(
    prefix: str, expected: set[str], given: Mapping[str, Any], strict: bool, what: str
) -> IncompatibleKeys:
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected, key=str)
    foreign = [
        other
        for other in _COLLECTION_OF_PREFIX
        if other != prefix
        and given
        and all(str(k).startswith(other + ".") for k in given)
        and not set(given) & expected
    ]
    if foreign:
        raise ValueError(
            f"{what} is an {_COLLECTION_OF_PREFIX[foreign[0]]}'s (keys '{foreign[0]}.<table>"
            f".weight'); this {_owner(prefix)} expects '{prefix}.<table>.weight'"
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"{what} does not match the collection: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    return IncompatibleKeys(missing, [str(k) for k in unexpected])


def load_tables(
    plan: LookupPlan,
    prefix: str,
    groups: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
) -> tuple[dict[str, Any], IncompatibleKeys]:
    """Groups with every table named in ``state_dict`` replaced; the keys it skipped.

    Each array must have the table's shape and real values that fit the table's
    dtype (they are cast to it). With ``strict`` every table must be present and
    nothing else; without, missing tables keep their rows and unknown keys are
    ignored, and both are returned. Optimizer state is not touched.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state dict must be a mapping, got {type(state_dict).__name__}")
    expected = {f"{prefix}.{t.name}.weight": t for t in plan.tables}
    keys = _check_keys(prefix, set(expected), state_dict, strict, "state dict")
    new_groups = dict(groups)
    for g, group in enumerate(plan.groups):
        entry = groups[group.name]
        current = entry.weight if isinstance(entry, FusedTableParams) else entry
        parts = []
        for table in (t for t in plan.tables if t.group == g):
            name = f"{prefix}.{table.name}.weight"
            if name in state_dict:
                shape = (table.num_rows, table.dim)
                parts.append(_checked_array(name, state_dict[name], shape, group.dtype))
            else:
                rows = current[table.row_offset : table.row_offset + table.num_rows]
                parts.append(jnp.asarray(rows))
        weight = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        if isinstance(entry, FusedTableParams):
            new_groups[group.name] = dataclasses.replace(entry, weight=weight)
        else:
            new_groups[group.name] = weight
    return new_groups, keys


def _step_value(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "fiu":
        raise ValueError(
            f"{name}['step']: expected a real scalar, got {array.dtype} of shape {array.shape}"
        )
    step = float(array)
    if not np.isfinite(step) or step < 0 or step != int(step) or step >= 2**24:
        raise ValueError(
            f"{name}['step']: expected a whole number of steps in [0, 2**24), got {step!r}"
        )
    return step


def load_optimizer_state(
    plan: LookupPlan, prefix: str, groups: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> dict[str, Any]:
    """Groups with the fused optimizer state of every table taken from ``state_dict``.

    The inverse of :func:`jaxrec.modules.stacked_tables.optimizer_state_views`:
    every fused table must be present, with exactly its optimizer's state names
    and ``step``; the tables of one group must agree on ``step``. Weights are
    not touched.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"optimizer state dict must be a mapping, got {type(state_dict).__name__}")
    fused = {
        f"{prefix}.{t.name}.weight": t
        for t in plan.tables
        if isinstance(groups[plan.groups[t.group].name], FusedTableParams)
    }
    if not fused:
        raise ValueError(
            "no table of this collection has a fused optimizer, so none has optimizer state"
        )
    plain = sorted(
        set(state_dict) & {f"{prefix}.{t.name}.weight" for t in plan.tables} - set(fused)
    )
    if plain:
        raise ValueError(
            f"optimizer state dict has state for {plain}, which have no fused optimizer here"
        )
    _check_keys(prefix, set(fused), state_dict, True, "optimizer state dict")
    new_groups = dict(groups)
    for g, group in enumerate(plan.groups):
        entry = groups[group.name]
        if not isinstance(entry, FusedTableParams):
            continue
        members = [t for t in plan.tables if t.group == g]
        parts: dict[str, list[jax.Array]] = {key: [] for key in entry.state}
        steps: dict[str, float] = {}
        for table in members:
            name = f"{prefix}.{table.name}.weight"
            given = state_dict[name]
            if not isinstance(given, Mapping):
                raise ValueError(
                    f"{name}: expected a mapping of state names to arrays, "
                    f"got {type(given).__name__}"
                )
            want = {*entry.state, "step"}
            if set(given) != want:
                raise ValueError(
                    f"{name}: state names {sorted(given, key=str)} do not match the optimizer's "
                    f"{sorted(want)}"
                )
            steps[name] = _step_value(name, given["step"])
            for key, leaf in entry.state.items():
                shape = (table.num_rows, *jnp.shape(leaf)[1:])
                parts[key].append(_checked_array(f"{name}[{key!r}]", given[key], shape, leaf.dtype))
        if len(set(steps.values())) > 1:
            raise ValueError(
                f"tables {list(steps)} share one stacked group (one step count) but have "
                f"different steps {list(steps.values())}"
            )
        state = {
            key: arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=0)
            for key, arrays in parts.items()
        }
        step = jnp.asarray(next(iter(steps.values())), dtype=jnp.result_type(entry.step))
        new_groups[group.name] = dataclasses.replace(entry, state=state, step=step)
    return new_groups
