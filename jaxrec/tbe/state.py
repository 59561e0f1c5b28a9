"""The explicit state of a TBE: its stacked tables (with optimizer state) and learning rate.

FBGEMM's module owns its buffers; here they travel as a pytree that ``jit``, ``grad``,
donation, flax serialization and orbax handle like any other params:

- ``groups``: one entry per stacked group of the TBE's plan (tables of one dim share a
  buffer, as FBGEMM keeps all tables in one buffer with per-table offsets), keyed by the
  group's name: a :class:`~jaxrec.optim.FusedTableParams` (table, optimizer state, step)
  or, with ``OptimType.NONE``, the plain table.
- ``learning_rate``: a float32 scalar read by the fused update at run time, so changing it
  (``set_learning_rate``) does not recompile. The lookup never differentiates it: its
  gradient is zero and :func:`jaxrec.optim.apply_updates` leaves it as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.serialization
import jax

from jaxrec.optim.fused import FusedTableParams


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["groups", "learning_rate"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class TBEState:
    """Tables and learning rate of one :class:`~jaxrec.tbe.SplitTableBatchedEmbeddingBagsCodegen`."""

    groups: dict[str, FusedTableParams | jax.Array]
    learning_rate: jax.Array


def _to_state_dict(state: TBEState) -> dict[str, Any]:
    return {
        "groups": flax.serialization.to_state_dict(state.groups),
        "learning_rate": state.learning_rate,
    }


def _from_state_dict(target: TBEState, state: dict[str, Any]) -> TBEState:
    missing = sorted({"groups", "learning_rate"} - set(state))
    if missing:
        raise ValueError(f"a TBEState state dict lacks {missing}; it has {sorted(state)}")
    return TBEState(
        groups=flax.serialization.from_state_dict(target.groups, state["groups"], name="groups"),
        learning_rate=flax.serialization.from_state_dict(
            target.learning_rate, state["learning_rate"], name="learning_rate"
        ),
    )


flax.serialization.register_serialization_state(TBEState, _to_state_dict, _from_state_dict)
