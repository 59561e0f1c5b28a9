"""TorchRec-style state-dict methods shared by the embedding collections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from jaxrec.modules.stacked_tables import load_table_views, optimizer_state_views, table_views
from jaxrec.ops.plan import LookupPlan


class TableStateMixin:
    """``state_dict``, ``load_state_dict`` and ``optimizer_state_dict`` over stacked groups.

    A class using it names its params entry in ``PARAMS_NAME`` (TorchRec's
    prefix: ``"embedding_bags"`` or ``"embeddings"``) and has a ``plan``.
    """

    PARAMS_NAME: ClassVar[str]
    plan: LookupPlan

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """TorchRec-named per-table arrays: ``{"<prefix>.<table>.weight": [rows, dim]}``.

        Works on any pytree shaped like the variables, e.g. ``{"params": grads}``.
        """
        return table_views(self.plan, self.PARAMS_NAME, variables["params"][self.PARAMS_NAME])

    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any]
    ) -> dict[str, Any]:
        """New variables with every table taken from ``state_dict`` (names and shapes checked)."""
        groups = load_table_views(
            self.plan, self.PARAMS_NAME, variables["params"][self.PARAMS_NAME], state_dict
        )
        return {**variables, "params": {**variables["params"], self.PARAMS_NAME: groups}}

    def optimizer_state_dict(self, variables: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
        """Per-table fused optimizer state: ``{"<prefix>.<table>.weight": {"momentum1": ..., "step": t}}``."""
        return optimizer_state_views(
            self.plan, self.PARAMS_NAME, variables["params"][self.PARAMS_NAME]
        )
