"""Whole per-table arrays for serving: a checkpoint exported to ``.npz`` and loaded back.

The file maps TorchRec's names (``"<collection path>.<table>.weight"``, the path without
``params``) to ``[rows, dim]`` weights; with ``optimizer_state=True`` also
``"<name>/<state>"`` (``[rows]`` or ``[rows, dim]``), ``"<name>/step"`` and
``"<name>/uses"``. :func:`load_exported` reads it as a plain dict (a TorchRec-style
state dict, ``prefix`` stripped on request); :func:`import_tables` writes it into a state
of any layout, each device receiving only its rows.

>>> import os, tempfile, jax.numpy as jnp, numpy as np
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig
>>> from jaxrec.checkpoint import CheckpointManager, TableLayout
>>> ebc = EmbeddingBagCollection(tables=[
...     EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])])
>>> groups = {"sum_float32_d2": jnp.arange(6.0).reshape(3, 2)}
>>> state = {"params": {"ebc": {"embedding_bags": groups}}}
>>> layouts = [TableLayout.single("params/ebc/embedding_bags", ebc)]
>>> folder = tempfile.mkdtemp()
>>> with CheckpointManager(os.path.join(folder, "ckpt")) as manager:
...     _ = manager.save(1, state, layouts)
...     export_tables(manager, os.path.join(folder, "tables.npz"))
>>> exported = load_exported(os.path.join(folder, "tables.npz"))
>>> {k: v.shape for k, v in exported.items()}
{'ebc.embedding_bags.t.weight': (3, 2)}
>>> state_dict = load_exported(os.path.join(folder, "tables.npz"), prefix="ebc")
>>> list(state_dict) == list(ebc.state_dict({"params": state["params"]["ebc"]}))
True
>>> zeros = {"params": {"ebc": {"embedding_bags": {"sum_float32_d2": jnp.zeros((3, 2))}}}}
>>> new = import_tables(zeros, layouts, exported)
>>> new["params"]["ebc"]["embedding_bags"]["sum_float32_d2"].tolist()
[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.checkpoint.manager import CheckpointManager
from jaxrec.checkpoint.tables import (
    TableLayout,
    from_canonical,
    get_path,
    set_path,
    to_canonical,
)

__all__ = ["export_tables", "import_tables", "load_exported"]


def export_tables(
    manager: CheckpointManager,
    path: str | os.PathLike,
    *,
    step: int | None = None,
    optimizer_state: bool = False,
) -> None:
    """Write the tables of ``step`` (default: the latest) to the ``.npz`` file ``path``.

    Only the process of index 0 writes. The tables pass through its host memory.
    """
    tables = manager.read_tables(step)
    arrays: dict[str, np.ndarray] = {}
    for name, record in tables.items():
        arrays[name] = np.asarray(record["weight"])
        if optimizer_state and "state" in record:
            for key, value in record["state"].items():
                arrays[f"{name}/{key}"] = np.asarray(value)
            arrays[f"{name}/step"] = np.asarray(record["step"])
            arrays[f"{name}/uses"] = np.asarray(record["uses"])
    if jax.process_index() == 0:
        with open(path, "wb") as f:
            np.savez(f, **arrays)


def load_exported(path: str | os.PathLike, *, prefix: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an exported file; with ``prefix``, only the names under ``prefix + "."``,
    without it (e.g. ``prefix="ebc"`` gives a collection's ``state_dict`` names)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if prefix is None:
        return arrays
    head = prefix + "."
    chosen = {k[len(head) :]: v for k, v in arrays.items() if k.startswith(head)}
    if not chosen:
        raise ValueError(
            f"no array of {os.fspath(path)!r} is under {prefix!r} (names {sorted(arrays)[:5]}...)"
        )
    return chosen


def import_tables(
    state: Any, layouts: Sequence[TableLayout], arrays: Mapping[str, Any], *, strict: bool = True
) -> Any:
    """``state`` with the collections at ``layouts``' paths holding the whole tables of
    ``arrays`` (as :func:`load_exported` returns): weights, and optimizer state where the
    arrays have it (else the state keeps its own). ``strict``: every table present and no
    unknown name; raises ``ValueError`` naming what does not match."""
    known: set[str] = set()
    for layout in layouts:
        subtree = get_path(state, layout.path)
        canonical = to_canonical(layout, subtree)
        mesh = canonical and next(iter(canonical.values()))["weight"].sharding.mesh
        split = NamedSharding(mesh, P(mesh.axis_names[0])) if canonical else None
        for key, record in canonical.items():
            known.update({key} | {f"{key}/{k}" for k in ("step", "uses", *record.get("state", {}))})
            if key not in arrays:
                if strict:
                    raise ValueError(f"no array for table {key!r}")
                continue
            record["weight"] = _placed(key, arrays[key], record["weight"], split)
            for k in record.get("state", {}):
                if f"{key}/{k}" in arrays:
                    record["state"][k] = _placed(
                        f"{key}/{k}", arrays[f"{key}/{k}"], record["state"][k], split
                    )
            for k in ("step", "uses"):
                if "state" in record and f"{key}/{k}" in arrays:
                    record[k] = np.asarray(arrays[f"{key}/{k}"], record[k].dtype)
        state = set_path(state, layout.path, from_canonical(layout, canonical, subtree))
    unknown = sorted(set(arrays) - known)
    if strict and unknown:
        raise ValueError(f"arrays {unknown} name no table of the layouts")
    return state


def _placed(name: str, value: Any, like: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``value`` (whole rows) as ``like``'s padded canonical array, each device given its rows."""
    value = np.asarray(value)
    rows = like.shape[0]
    want = value.shape[1:] == like.shape[1:] and value.shape[0] <= rows
    if not want or value.dtype.kind not in "fiu":
        raise ValueError(
            f"{name}: expected a real array of {like.shape[1:] or 'rows'} columns and at most "
            f"{rows} rows, got {value.dtype} {value.shape}"
        )
    padded = np.zeros(like.shape, like.dtype)
    padded[: value.shape[0]] = value
    return jax.make_array_from_callback(like.shape, sharding, lambda index: padded[index])
