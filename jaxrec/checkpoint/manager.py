"""Saving and restoring a training state with embedding collections, on orbax.

A checkpoint of step ``s`` is one orbax step directory with three items:

- ``tables``: the canonical form of every collection named by a
  :class:`~jaxrec.checkpoint.tables.TableLayout` (whole per-table arrays under TorchRec's
  names, split by rows over the devices: each device writes its own rows);
- ``dense``: the rest of the state (dense parameters, the dense optimizer's state), as
  it is sharded, the collections' places left empty;
- ``meta``: JSON: the step, the tables' shapes and dtypes, and the caller's ``extra``
  (e.g. a data loader's position).

Orbax writes a step into a temporary directory and renames it when every item is
complete, so an interrupted save leaves the previous steps as they were and is never
listed. A restore lays the tables out as the *target's* layouts say (another plan,
another device count, a single device) by moving rows device to device.

>>> import tempfile, jax, jax.numpy as jnp
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig
>>> ebc = EmbeddingBagCollection(tables=[
...     EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])])
>>> state = {"params": {"embedding_bags": {"sum_float32_d2": jnp.ones((3, 2))},
...                     "dense": jnp.zeros(4)}}
>>> layouts = [TableLayout.single("params/embedding_bags", ebc)]
>>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
...     manager.save(10, state, layouts, extra={"loader": {"epoch": 1, "batch": 7}})
...     restored = manager.restore(jax.tree.map(jnp.zeros_like, state), layouts)
True
>>> restored.step, restored.extra, float(restored.state["params"]["embedding_bags"]["sum_float32_d2"].sum())
(10, {'loader': {'epoch': 1, 'batch': 7}}, 6.0)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrec.checkpoint.tables import (
    TableLayout,
    abstract_canonical,
    from_canonical,
    get_path,
    set_path,
    table_metadata,
    to_canonical,
)

__all__ = ["CheckpointManager", "Restored"]

FORMAT = 1


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.restore` returns."""

    state: Any
    step: int
    extra: Any


def _without_tables(state: Any, layouts: Sequence[TableLayout]) -> Any:
    for layout in layouts:
        get_path(state, layout.path)  # a clear error for a wrong path
        state = set_path(state, layout.path, None)
    return state


def _check_layouts(layouts: Sequence[TableLayout]) -> tuple[TableLayout, ...]:
    layouts = tuple(layouts)
    for layout in layouts:
        if not isinstance(layout, TableLayout):
            raise ValueError(f"layouts must be TableLayouts, got {type(layout).__name__}")
    paths = [layout.path for layout in layouts]
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if a[: len(b)] == b or b[: len(a)] == a:
                raise ValueError(f"layouts at {'/'.join(a)!r} and {'/'.join(b)!r} overlap")
    return layouts


class CheckpointManager:
    """Numbered checkpoints of a training state in ``directory`` (orbax's manager).

    Args:
      directory: where the steps are kept (created if missing).
      max_to_keep: keep the newest this many steps (``None``: all).
      async_save: write in the background after the arrays are copied off the devices
        (:meth:`wait_until_finished` waits); ``False``: :meth:`save` returns when done.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = None,
        async_save: bool = False,
    ) -> None:
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        self.directory = os.fspath(os.path.abspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # remove what an interrupted save left
            ),
        )

    # ---- steps --------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The complete steps in the directory, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest): step, tables, extra."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def _step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {self.directory} (steps {steps})")
        return int(step)

    # ---- save / restore -------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        layouts: Sequence[TableLayout] = (),
        *,
        extra: Any = None,
        force: bool = True,
    ) -> bool:
        """Save ``state`` as step ``step``; the collections at ``layouts``' paths as
        per-table arrays. ``extra``: anything JSON can hold. Returns whether it saved."""
        layouts = _check_layouts(layouts)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        tables: dict[str, Any] = {}
        info: dict[str, Any] = {}
        for layout in layouts:
            canonical = to_canonical(layout, get_path(state, layout.path))
            clash = sorted(set(canonical) & set(tables))
            if clash:
                raise ValueError(f"two layouts name the tables {clash}")
            tables.update(canonical)
            info.update(table_metadata(layout, canonical))
        dense = _without_tables(state, layouts)
        has_dense = bool(jax.tree.leaves(dense))
        meta = {"format": FORMAT, "step": step, "tables": info, "extra": extra, "dense": has_dense}
        items: dict[str, Any] = {"meta": ocp.args.JsonSave(meta)}
        if tables:
            items["tables"] = ocp.args.StandardSave(tables)
        if has_dense:
            items["dense"] = ocp.args.StandardSave(dense)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, target: Any, layouts: Sequence[TableLayout] = (), *, step: int | None = None
    ) -> Restored:
        """The state of ``step`` (default: the latest) laid out as ``target``.

        ``target`` is a state of the same structure (real arrays or
        ``jax.ShapeDtypeStruct`` with shardings, e.g. from ``jax.eval_shape``); the
        collections at ``layouts``' paths take their layouts from there (any plan, any
        device count), the rest is restored with the target's shardings.
        """
        layouts = _check_layouts(layouts)
        step = self._step(step)
        meta = self.metadata(step)
        saved = meta["tables"]
        abstract: dict[str, Any] = {}
        for layout in layouts:
            abstract.update(abstract_canonical(layout, get_path(target, layout.path), saved))
        left = sorted(set(saved) - set(abstract))
        if left:
            raise ValueError(
                f"the checkpoint of step {step} holds tables {left} that no layout restores"
            )
        dense_target = _without_tables(target, layouts)
        if bool(jax.tree.leaves(dense_target)) != meta["dense"]:
            raise ValueError(
                f"the checkpoint of step {step} {'has' if meta['dense'] else 'has no'} dense "
                f"state, the target {'has none' if meta['dense'] else 'has some'}"
            )
        items: dict[str, Any] = {}
        if abstract:
            items["tables"] = ocp.args.StandardRestore(abstract, strict=False)
        if meta["dense"]:
            items["dense"] = ocp.args.StandardRestore(dense_target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["dense"] if meta["dense"] else dense_target
        for layout in layouts:
            subtree = from_canonical(layout, restored["tables"], get_path(target, layout.path))
            state = set_path(state, layout.path, subtree)
        return Restored(state, step, meta["extra"])

    def read_tables(self, step: int | None = None) -> dict[str, dict[str, Any]]:
        """Whole per-table arrays of ``step`` on the host: ``{name: {"weight": ..., "state":
        {...}, "step": ..., "uses": ...}}`` (what an export writes)."""
        step = self._step(step)
        saved = self.metadata(step)["tables"]
        if not saved:
            return {}
        target: dict[str, Any] = {}
        for key, info in saved.items():
            rows, dim = info["rows"], info["dim"]
            record: dict[str, Any] = {"weight": np.zeros((rows, dim), info["dtype"])}
            if info["fused"]:
                record["state"] = {
                    k: np.zeros((rows,) if s["per_row"] else (rows, dim), s["dtype"])
                    for k, s in info["state"].items()
                }
                record["step"] = np.zeros((), np.float32)
                record["uses"] = np.zeros((5,), np.float32)
            target[key] = record
        args = ocp.args.Composite(tables=ocp.args.StandardRestore(target, strict=False))
        restored = self._manager.restore(step, args=args)["tables"]
        for key, record in restored.items():  # the saved arrays' padding rows dropped
            rows = saved[key]["rows"]
            record["weight"] = np.asarray(record["weight"])[:rows]
            for k, v in record.get("state", {}).items():
                record["state"][k] = np.asarray(v)[:rows]
        return restored

    def wait_until_finished(self) -> None:
        """Wait for a background save to finish (raises what it raised)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
