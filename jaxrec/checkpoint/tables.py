"""A collection's tables in a state pytree, to and from their canonical form.

A :class:`TableLayout` names where a collection's variables sit in a training state (a
path of keys or attributes, e.g. ``"params/ebc/embedding_bags"``) and how they are laid
out: a single-device collection's stacked groups (:meth:`TableLayout.single`) or a
sharded collection's ``{"shards": ..., "replicated": ...}``
(:meth:`TableLayout.sharded`, see :mod:`jaxrec.parallel.convert`).

The canonical form is one entry per table under TorchRec's name (the path without
``params``, then ``<table>.weight``): ``{"weight": [R, dim], "state": {name: [R] or
[R, dim]}, "step": (), "uses": [5]}``, the weight and state split by rows over the
layout's devices (``R = n * ceil(rows / n)``, padding rows at the end) and ``step`` /
``uses`` on the host. It is the bridge between layouts: :func:`to_canonical` and
:func:`from_canonical` move rows device to device (:func:`jaxrec.checkpoint.reshard.move`).

>>> import jax
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig
>>> ebc = EmbeddingBagCollection(tables=[
...     EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])])
>>> layout = TableLayout.single("params/embedding_bags", ebc)
>>> variables = {"params": {"embedding_bags": {"sum_float32_d2": jax.numpy.ones((3, 2))}}}
>>> canonical = to_canonical(layout, get_path(variables, layout.path))
>>> list(canonical), canonical["embedding_bags.t.weight"]["weight"].shape
(['embedding_bags.t.weight'], (3, 2))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.checkpoint.geometry import (
    canonical_array,
    canonical_rows,
    canonical_segments,
    copies,
    layout_segments,
    plan_segments,
)
from jaxrec.checkpoint.reshard import ArraySpec, move
from jaxrec.ops.plan import LookupPlan
from jaxrec.optim.fused import FusedTableParams
from jaxrec.parallel.layout import ShardedLayout

__all__ = [
    "TableLayout",
    "abstract_canonical",
    "from_canonical",
    "get_path",
    "set_path",
    "table_metadata",
    "to_canonical",
]

_SINGLE_AXIS = "rows"


@dataclass(frozen=True)
class TableLayout:
    """Where a collection's variables are in a state pytree, and their layout.

    Build it with :meth:`single` or :meth:`sharded`. ``plan`` is the collection's
    :class:`~jaxrec.ops.plan.LookupPlan` (single device) or a
    :class:`~jaxrec.parallel.layout.ShardedLayout` on ``mesh`` axis ``axis``.
    """

    path: tuple[str, ...]
    plan: LookupPlan | ShardedLayout
    mesh: Mesh | None = None
    axis: str | None = None

    @classmethod
    def single(cls, path: str | tuple[str, ...], collection: Any) -> TableLayout:
        """A single-device collection (a Flax collection or its ``LookupPlan``) at ``path``."""
        plan = collection if isinstance(collection, LookupPlan) else collection.plan
        if not isinstance(plan, LookupPlan):
            raise ValueError(
                f"expected a collection or a LookupPlan, got {type(collection).__name__}"
            )
        return cls(_path(path), plan)

    @classmethod
    def sharded(
        cls, path: str | tuple[str, ...], layout: ShardedLayout, mesh: Mesh, axis: str
    ) -> TableLayout:
        """A sharded collection laid out as ``layout`` over ``mesh`` axis ``axis`` at ``path``."""
        if not isinstance(layout, ShardedLayout):
            raise ValueError(f"expected a ShardedLayout, got {type(layout).__name__}")
        if axis not in mesh.shape or mesh.shape[axis] != layout.num_devices:
            raise ValueError(
                f"the layout is for {layout.num_devices} devices but the mesh axis {axis!r} "
                f"has {mesh.shape.get(axis, 0)} (mesh axes {dict(mesh.shape)})"
            )
        return cls(_path(path), layout, mesh, axis)

    @property
    def prefix(self) -> str:
        """TorchRec's name of the collection: the path without ``params``, dot-joined."""
        return ".".join(p for p in self.path if p != "params")

    @property
    def tables(self) -> tuple[tuple[str, int, int], ...]:
        """``(name, rows, dim)`` of every table, in the collection's order."""
        if isinstance(self.plan, ShardedLayout):
            return tuple((t.name, t.num_embeddings, t.embedding_dim) for t in self.plan.tables)
        return tuple((t.name, t.num_rows, t.dim) for t in self.plan.tables)

    def key(self, table: str) -> str:
        """The canonical (TorchRec) name of ``table``."""
        return f"{self.prefix}.{table}.weight" if self.prefix else f"{table}.weight"


def _path(path: str | tuple[str, ...]) -> tuple[str, ...]:
    parts = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"a path is '/'-separated names, e.g. 'params/ebc', got {path!r}")
    return parts


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    """The subtree of ``tree`` at ``path`` (mapping keys or attributes)."""
    node = tree
    for i, part in enumerate(path):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif not isinstance(node, Mapping) and hasattr(node, part):
            node = getattr(node, part)
        else:
            where = "/".join(path[:i]) or "the state"
            got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(f"{where} has no {part!r} (got {got}) on the path {'/'.join(path)!r}")
    return node


def set_path(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of ``tree`` with the subtree at ``path`` replaced (others shared)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    child = set_path(get_path(tree, (head,)), rest, value)
    if isinstance(tree, Mapping):
        return type(tree)({**tree, head: child})
    return dataclasses.replace(tree, **{head: child})


# ---- the arrays of a placed collection --------------------------------------------------


def _groups(layout: TableLayout, subtree: Any) -> dict[str, Any]:
    """``{array prefix: group entry}``: ``<group>`` (single) or ``shards/<group>`` and
    ``replicated/<group>`` (sharded)."""
    if not isinstance(subtree, Mapping):
        raise ValueError(
            f"{'/'.join(layout.path)}: expected a mapping of groups, got {type(subtree).__name__}"
        )
    if isinstance(layout.plan, ShardedLayout):
        if set(subtree) != {"shards", "replicated"}:
            raise ValueError(
                f"{'/'.join(layout.path)}: sharded params are {{'shards', 'replicated'}}, got "
                f"keys {sorted(subtree)}"
            )
        out = {f"shards/{g.name}": subtree["shards"].get(g.name) for g in layout.plan.groups}
        if layout.plan.dp_plan is not None:
            for g in layout.plan.dp_plan.groups:
                out[f"replicated/{g.name}"] = subtree["replicated"].get(g.name)
    else:
        out = {g.name: subtree.get(g.name) for g in layout.plan.groups}
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise ValueError(
            f"{'/'.join(layout.path)}: no entries for groups {missing}; the variables were "
            f"made for other tables or another layout"
        )
    return out


def _leaves(entry: Any) -> dict[str, Any]:
    """``{"weight": w, "<state>": s, ...}`` of a group entry."""
    if isinstance(entry, FusedTableParams):
        return {"weight": entry.weight, **entry.state}
    return {"weight": entry}


def _segments(layout: TableLayout, arrays: Mapping[str, str], leaf: str, per_row: bool):
    """The layout's segments of ``leaf`` restricted to groups that have it."""
    if isinstance(layout.plan, ShardedLayout):
        held = {a.rsplit("/", 1)[0] for a in arrays.values()}
        return [
            s
            for s in layout_segments(layout.plan, leaf, per_row=per_row)
            if s.array.rsplit("/", 1)[0] in held
        ]
    return plan_segments(layout.plan, {g: f"{g}/{leaf}" for g in arrays}, per_row=per_row)


def _mesh(layout: TableLayout, entries: Mapping[str, Any]) -> tuple[Mesh, str]:
    if layout.mesh is not None:
        return layout.mesh, layout.axis
    weight = _leaves(next(iter(entries.values())))["weight"]
    sharding = getattr(weight, "sharding", None)
    devices = list(sharding.device_set) if sharding is not None else [jax.devices()[0]]
    if len(devices) != 1:
        raise ValueError(
            f"{'/'.join(layout.path)}: a single-device layout's tables are on {len(devices)} "
            f"devices; describe sharded params with TableLayout.sharded"
        )
    return Mesh(np.array(devices), (_SINGLE_AXIS,)), _SINGLE_AXIS


def _table_groups(layout: TableLayout) -> dict[str, list[str]]:
    """Table name → the array prefixes holding it."""
    out: dict[str, list[str]] = {}
    if isinstance(layout.plan, ShardedLayout):
        for s in layout.plan.shards:
            out.setdefault(s.table, []).append(f"shards/{layout.plan.groups[s.group].name}")
        if layout.plan.dp_plan is not None:
            for t in layout.plan.dp_plan.tables:
                out[t.name] = [f"replicated/{layout.plan.dp_plan.groups[t.group].name}"]
    else:
        for t in layout.plan.tables:
            out[t.name] = [layout.plan.groups[t.group].name]
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def _leaf_kinds(leaves_of: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, bool], dict]:
    """``{(leaf, per_row): {array prefix: array name}}``: one optimizer's ``momentum1`` may
    be per-row and another's per-element, so a leaf name alone does not fix the shape."""
    out: dict[tuple[str, bool], dict[str, str]] = {}
    for prefix, leaves in leaves_of.items():
        for leaf, value in leaves.items():
            out.setdefault((leaf, np.ndim(value) == 1), {})[prefix] = f"{prefix}/{leaf}"
    return out


def to_canonical(layout: TableLayout, subtree: Any) -> dict[str, dict[str, Any]]:
    """The canonical form (module docstring) of a placed collection's variables."""
    entries = _groups(layout, subtree)
    mesh, axis = _mesh(layout, entries)
    n = mesh.shape[axis]
    shapes = {name: (rows, dim) for name, rows, dim in layout.tables}
    holders = _table_groups(layout)
    sources: dict[str, jax.Array] = {}
    replicated = set()
    leaves_of = {p: _leaves(e) for p, e in entries.items()}
    for prefix, leaves in leaves_of.items():
        for leaf, value in leaves.items():
            sources[f"{prefix}/{leaf}"] = value
            if prefix.startswith("replicated/"):
                replicated.add(f"{prefix}/{leaf}")
    all_copies, targets = [], {}
    for (leaf, per_row), arrays in _leaf_kinds(leaves_of).items():
        tables = {t: shapes[t] for t, ps in holders.items() if any(p in arrays for p in ps)}
        src = _segments(layout, arrays, leaf, per_row)
        dst = canonical_segments(tables, n, leaf, per_row=per_row)
        all_copies += copies(src, dst)
        for t, (rows, dim) in tables.items():
            dtype = str(sources[f"{holders[t][0]}/{leaf}"].dtype)
            targets[canonical_array(t, leaf)] = ArraySpec(
                canonical_rows(rows, n), 1 if per_row else dim, dtype, 1 if per_row else 2
            )
    moved = move(tuple(all_copies), sources, targets, mesh, axis, frozenset(replicated))
    out = {}
    for t, ps in holders.items():
        entry = entries[ps[0]]
        record: dict[str, Any] = {"weight": moved[canonical_array(t, "weight")]}
        if isinstance(entry, FusedTableParams):
            record["state"] = {k: moved[canonical_array(t, k)] for k in entry.state}
            record["step"] = np.asarray(entry.step)
            record["uses"] = np.asarray(entry.uses)
        out[layout.key(t)] = record
    return {layout.key(name): out[layout.key(name)] for name, _, _ in layout.tables}


def table_metadata(
    layout: TableLayout, canonical: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """JSON-able shapes and dtypes of a layout's canonical form: what a restore checks."""
    shapes = {layout.key(name): (rows, dim) for name, rows, dim in layout.tables}
    return {
        key: {
            "rows": shapes[key][0],
            "dim": shapes[key][1],
            "dtype": str(rec["weight"].dtype),
            "state": {
                k: {"dtype": str(v.dtype), "per_row": v.ndim == 1}
                for k, v in rec.get("state", {}).items()
            },
            "fused": "state" in rec,
        }
        for key, rec in canonical.items()
    }


def abstract_canonical(
    layout: TableLayout, target: Any, saved: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The restore target of the canonical form for ``target`` (the layout's variables),
    split over the layout's devices; ``saved``: the checkpoint's :func:`table_metadata`
    with ``rows``/``dim``. Raises ``ValueError`` naming a table that does not match."""
    entries = _groups(layout, target)
    mesh, axis = _mesh(layout, entries)
    n = mesh.shape[axis]
    split = NamedSharding(mesh, P(axis))
    holders = _table_groups(layout)
    out = {}
    for name, rows, dim in layout.tables:
        key = layout.key(name)
        entry = entries[holders[name][0]]
        leaves = _leaves(entry)
        fused = isinstance(entry, FusedTableParams)
        if key not in saved:
            raise ValueError(f"the checkpoint has no table {key!r} (it has {sorted(saved)})")
        info = saved[key]
        if (info["rows"], info["dim"]) != (rows, dim):
            raise ValueError(
                f"table {key!r}: the checkpoint holds {info['rows']} x {info['dim']}, the target "
                f"{rows} x {dim}"
            )
        want_state = sorted(k for k in leaves if k != "weight")
        if info["fused"] != fused or sorted(info["state"]) != want_state:
            raise ValueError(
                f"table {key!r}: the checkpoint's optimizer state {sorted(info['state'])}"
                f"{'' if info['fused'] else ' (not fused)'} does not match the target's "
                f"{want_state}{'' if fused else ' (not fused)'}"
            )
        k = canonical_rows(rows, n)

        def shaped(value, per_row, k=k, dim=dim):
            shape = (n * k,) if per_row else (n * k, dim)
            return jax.ShapeDtypeStruct(shape, value.dtype, sharding=split)

        record: dict[str, Any] = {"weight": shaped(leaves["weight"], False)}
        if fused:
            record["state"] = {
                s: shaped(v, np.ndim(v) == 1) for s, v in leaves.items() if s != "weight"
            }
            record["step"] = np.zeros(np.shape(entry.step), np.dtype(entry.step.dtype))
            record["uses"] = np.zeros(np.shape(entry.uses), np.dtype(entry.uses.dtype))
        out[key] = record
    return out


def from_canonical(
    layout: TableLayout, canonical: Mapping[str, Mapping[str, Any]], target: Any
) -> Any:
    """Variables laid out as ``target`` (same structure, shardings, dtypes) holding the
    canonical form ``canonical`` (restored as :func:`abstract_canonical` says)."""
    entries = _groups(layout, target)
    mesh, axis = _mesh(layout, entries)
    n = mesh.shape[axis]
    shapes = {name: (rows, dim) for name, rows, dim in layout.tables}
    holders = _table_groups(layout)
    sources, all_copies, targets = {}, [], {}
    group_rows = _group_rows(layout)
    for t in holders:
        rec = canonical[layout.key(t)]
        sources[canonical_array(t, "weight")] = rec["weight"]
        for s, v in rec.get("state", {}).items():
            sources[canonical_array(t, s)] = v
    leaves_of = {p: _leaves(e) for p, e in entries.items()}
    for (leaf, per_row), arrays in _leaf_kinds(leaves_of).items():
        tables = {t: shapes[t] for t, ps in holders.items() if any(p in arrays for p in ps)}
        src = canonical_segments(tables, n, leaf, per_row=per_row)
        dst = _segments(layout, arrays, leaf, per_row)
        all_copies += copies(src, dst)
        for p, name in arrays.items():
            value = leaves_of[p][leaf]
            targets[name] = ArraySpec(
                group_rows[p],
                1 if per_row else int(np.shape(value)[1]),
                str(value.dtype),
                1 if per_row else 2,
                p.startswith("replicated/"),
            )
    moved = move(tuple(all_copies), sources, targets, mesh, axis)
    for p, leaves in leaves_of.items():  # the target's own shardings, where it has them
        for leaf, value in leaves.items():
            sharding = getattr(value, "sharding", None)
            if sharding is not None:
                moved[f"{p}/{leaf}"] = jax.device_put(moved[f"{p}/{leaf}"], sharding)
    replicated = NamedSharding(mesh, P())
    groups: dict[str, Any] = {}
    for p, entry in entries.items():
        weight = moved[f"{p}/weight"]
        if not isinstance(entry, FusedTableParams):
            groups[p] = weight
            continue
        members = [layout.key(t) for t, ps in holders.items() if p in ps]
        steps = {float(canonical[m]["step"]) for m in members}
        if len(steps) > 1:
            raise ValueError(
                f"tables {members} share group {p!r} (one step count) but were saved with "
                f"different steps {sorted(steps)}"
            )
        first = canonical[members[0]]
        groups[p] = FusedTableParams(
            weight=weight,
            state={k: moved[f"{p}/{k}"] for k in entry.state},
            step=jax.device_put(
                np.asarray(first["step"], entry.step.dtype),
                getattr(entry.step, "sharding", None) or replicated,
            ),
            uses=jax.device_put(
                np.asarray(first["uses"], entry.uses.dtype),
                getattr(entry.uses, "sharding", None) or replicated,
            ),
        )
    if isinstance(layout.plan, ShardedLayout):
        return {
            "shards": {p.split("/", 1)[1]: v for p, v in groups.items() if p.startswith("shards/")},
            "replicated": {
                p.split("/", 1)[1]: v for p, v in groups.items() if p.startswith("replicated/")
            },
        }
    return groups


def _group_rows(layout: TableLayout) -> dict[str, int]:
    """Rows per rank of every array prefix of the layout (all rows when replicated)."""
    if isinstance(layout.plan, ShardedLayout):
        out = {f"shards/{g.name}": g.rows for g in layout.plan.groups}
        if layout.plan.dp_plan is not None:
            out.update({f"replicated/{g.name}": g.num_rows for g in layout.plan.dp_plan.groups})
        return out
    return {g.name: g.num_rows for g in layout.plan.groups}
