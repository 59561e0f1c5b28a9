"""Stacked group buffers and their TorchRec-named per-table views.

A collection stores one buffer per group (see :mod:`jaxrec.ops.plan`). These
functions create the buffers and view them under TorchRec's state-dict names
(``embedding_bags.<table>.weight`` for bags, ``embeddings.<table>.weight`` for
sequences); :mod:`jaxrec.modules.state_dict` loads them back. The per-table
arrays are views made on demand, never kept.

>>> import jax
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.ops.plan import build_plan
>>> tables = [EmbeddingBagConfig(name="t1", embedding_dim=2, num_embeddings=3, feature_names=["f1"]),
...           EmbeddingBagConfig(name="t2", embedding_dim=2, num_embeddings=4, feature_names=["f2"])]
>>> plan = build_plan(tables)
>>> groups = init_groups(plan, tables, None, jax.random.key(0))
>>> {name: g.shape for name, g in groups.items()}
{'sum_float32_d2': (7, 2)}
>>> {k: v.shape for k, v in table_views(plan, "embedding_bags", groups).items()}
{'embedding_bags.t1.weight': (3, 2), 'embedding_bags.t2.weight': (4, 2)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxrec.configs import BaseEmbeddingConfig
from jaxrec.ops.plan import LookupPlan
from jaxrec.ops.sharded import group_weight
from jaxrec.optim.fused import FusedTableParams, init_fused_table
from jaxrec.optim.sparse_optimizers import SparseOptimizer


def init_groups(
    plan: LookupPlan,
    tables: Sequence[BaseEmbeddingConfig],
    optimizers: Any,
    key: jax.Array,
) -> dict[str, jax.Array | FusedTableParams]:
    """Initialise every group buffer; each table from its own config's initialiser.

    ``optimizers``: one fused optimizer (or None) for every group, or one per group.
    """
    if not isinstance(optimizers, list | tuple) or isinstance(optimizers, SparseOptimizer):
        optimizers = (optimizers,) * len(plan.groups)
    by_name = {t.name: t for t in tables}
    index = {t.name: i for i, t in enumerate(tables)}
    groups: dict[str, jax.Array | FusedTableParams] = {}
    for group, optimizer in zip(plan.groups, optimizers, strict=True):
        parts = [
            by_name[name].initialize(jax.random.fold_in(key, index[name])) for name in group.tables
        ]
        weight = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        groups[group.name] = weight if optimizer is None else init_fused_table(weight, optimizer)
    return groups


def table_views(plan: LookupPlan, prefix: str, groups: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``{"<prefix>.<table>.weight": rows of that table}`` for any group-shaped pytree."""
    out: dict[str, jax.Array] = {}
    for table in plan.tables:
        weight = group_weight(groups[plan.groups[table.group].name])
        out[f"{prefix}.{table.name}.weight"] = weight[
            table.row_offset : table.row_offset + table.num_rows
        ]
    return out


def optimizer_state_views(
    plan: LookupPlan, prefix: str, groups: Mapping[str, Any]
) -> dict[str, dict[str, jax.Array]]:
    """Per-table optimizer state of the fused tables:
    ``{"<prefix>.<table>.weight": {"momentum1": rows, "step": t}}``."""
    out: dict[str, dict[str, jax.Array]] = {}
    for table in plan.tables:
        entry = groups[plan.groups[table.group].name]
        if not isinstance(entry, FusedTableParams):
            continue
        rows = slice(table.row_offset, table.row_offset + table.num_rows)
        state = {name: value[rows] for name, value in entry.state.items()}
        state["step"] = entry.step
        out[f"{prefix}.{table.name}.weight"] = state
    if not out:
        raise ValueError(
            "no table of this collection has a fused optimizer, so none has optimizer state"
        )
    return out
