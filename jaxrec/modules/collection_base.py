"""What the embedding collections share: field checks, the lookup call, state dicts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal, overload

import jax

from jaxrec.modules.callable_flag import CallableFlag
from jaxrec.modules.input_checks import report_invalid_ids
from jaxrec.modules.stacked_tables import init_groups, optimizer_state_views, table_views
from jaxrec.modules.state_dict import (
    IncompatibleKeys,
    check_groups,
    load_optimizer_state,
    load_tables,
)
from jaxrec.ops.backend import as_bounds_check_mode, resolve_backend
from jaxrec.ops.lookup import LookupSpec, check_parallel_axes, lookup
from jaxrec.ops.plan import LookupPlan, build_plan
from jaxrec.parallel.collection_sharding import sharded_collection_lookup
from jaxrec.parallel.row_sharding import local_row_block
from jaxrec.sparse import KeyedJaggedTensor


class CollectionMixin:
    """Shared behaviour of the Flax embedding collections over stacked groups.

    A class using it is a Flax module with the fields ``tables``, ``optimizer``,
    ``table_optimizers``, ``backend``, ``bounds_check_mode``, ``output_dtype``,
    ``data_parallel_axis`` and ``row_shard_axis``, and names its params entry in
    ``PARAMS_NAME`` (TorchRec's prefix: ``"embedding_bags"`` or ``"embeddings"``).
    """

    PARAMS_NAME: ClassVar[str]

    def _optimizer_of_tables(self) -> tuple[tuple[int, ...], tuple[Any, ...]]:
        """(a tag per table, the optimizer of each tag); tag 0 is ``optimizer``'s."""
        distinct: list[Any] = [self.optimizer]
        tags = []
        overrides = self.table_optimizers or {}
        for table in self.tables:
            chosen = overrides.get(table.name, self.optimizer)
            index = next((i for i, o in enumerate(distinct) if o is chosen), None)
            if index is None:
                distinct.append(chosen)
                index = len(distinct) - 1
            tags.append(index)
        return tuple(tags), tuple(distinct)

    @property
    def plan(self) -> LookupPlan:
        """The static group layout of the tables (computed once per table set)."""
        return build_plan(self.tables, self._optimizer_of_tables()[0])

    def _group_optimizers(self) -> tuple[Any, ...]:
        """The fused optimizer (or None) of each group of the plan."""
        optimizers = self._optimizer_of_tables()[1]
        return tuple(optimizers[g.optimizer_tag] for g in self.plan.groups)

    def _check_fields(self, config_type: type, flag: str) -> None:
        """Normalise and check the fields at construction (called from ``__post_init__``)."""
        object.__setattr__(self, "tables", tuple(self.tables))
        if not isinstance(getattr(self, flag), CallableFlag):
            object.__setattr__(self, flag, CallableFlag(getattr(self, flag), flag))
        for table in self.tables:
            if not isinstance(table, config_type):
                raise ValueError(
                    f"{type(self).__name__} takes {config_type.__name__}s, got {type(table).__name__}"
                )
        unknown = sorted(set(self.table_optimizers or {}) - {t.name for t in self.tables})
        if unknown:
            raise ValueError(f"table_optimizers names unknown tables {unknown}")
        check_parallel_axes(self.data_parallel_axis, self.row_shard_axis)
        self.plan  # noqa: B018 (builds the plan: raises on an invalid table set)
        resolve_backend(self.backend)
        as_bounds_check_mode(self.bounds_check_mode)

    def _lookup_groups(self, features: KeyedJaggedTensor, weights: jax.Array | None):
        """Declare the group params and look every group up (inside the compact ``__call__``)."""
        sharded = sharded_collection_lookup(self, features, weights)
        if sharded is not None:  # placed by a sharding plan (DistributedModelParallel)
            return sharded
        plan = self.plan
        optimizers = self._group_optimizers()

        def init(key):
            groups = init_groups(plan, self.tables, optimizers, key)
            if self.row_shard_axis is None:
                return groups
            return local_row_block(groups, self.row_shard_axis)

        groups = self.param(self.PARAMS_NAME, init)
        mode = as_bounds_check_mode(self.bounds_check_mode)
        spec = LookupSpec.create(
            plan,
            tuple(features.keys()),
            batch_size=features.stride(),
            bounds_check=mode,
            backend=self.backend,
            out_dtype=self.output_dtype,
            optimizer=optimizers,
            data_parallel_axis=self.data_parallel_axis,
            row_shard_axis=self.row_shard_axis,
        )
        out, bad = lookup(
            spec,
            tuple(groups[g.name] for g in plan.groups),
            features.values(),
            features.offsets(),
            weights,
        )
        report_invalid_ids(self, mode, bad)
        return out

    def _groups(self, variables: Any, what: str = "variables") -> Mapping[str, Any]:
        return check_groups(self.plan, self.PARAMS_NAME, variables, what)

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """TorchRec-named per-table arrays: ``{"<prefix>.<table>.weight": [rows, dim]}``.

        Works on any pytree shaped like the variables, e.g. ``{"params": grads}``.
        Variables without this collection's tables (``{}``, another collection's)
        raise a ValueError saying what they hold.
        """
        return table_views(self.plan, self.PARAMS_NAME, self._groups(variables))

    def named_parameters(
        self, variables: Mapping[str, Any], prefix: str = ""
    ) -> Iterator[tuple[str, jax.Array]]:
        """``(name, table)`` for every table, TorchRec's ``named_parameters``.

        The names are the :meth:`state_dict` names, behind ``prefix + "."`` when
        ``prefix`` is given (as a parent module's name).
        """
        for name, table in self.state_dict(variables).items():
            yield (f"{prefix}.{name}" if prefix else name), table

    @overload
    def load_state_dict(
        self,
        variables: Mapping[str, Any],
        state_dict: Mapping[str, Any],
        strict: Literal[True] = True,
    ) -> dict[str, Any]: ...

    @overload
    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any], strict: Literal[False]
    ) -> tuple[dict[str, Any], IncompatibleKeys]: ...

    def load_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any], strict: bool = True
    ) -> dict[str, Any] | tuple[dict[str, Any], IncompatibleKeys]:
        """New variables with the tables of ``state_dict`` loaded (TorchRec's names).

        Refused with the key named: a missing or unexpected key (with ``strict``), a
        wrong shape, strings or other non-numbers, complex values, inf/nan, values
        that overflow the table's dtype (e.g. 1e6 into float16), and a state dict
        of the other collection type. The arrays are cast to the table dtype.

        ``strict=True`` returns the new variables. ``strict=False``, as TorchRec's,
        leaves missing tables as they are, ignores unknown keys, and returns
        ``(variables, IncompatibleKeys(missing_keys, unexpected_keys))``.

        The fused optimizer state is kept as it was: loaded weights go on training
        with the momentum of the tables they replaced. To resume a checkpoint, load
        its state too (:meth:`load_optimizer_state_dict`); to start training afresh
        from loaded weights, load them into freshly initialised variables.
        """
        groups, keys = load_tables(
            self.plan,
            self.PARAMS_NAME,
            self._groups(variables),
            state_dict,
            strict=strict,
        )
        new = {**variables, "params": {**variables["params"], self.PARAMS_NAME: groups}}
        return new if strict else (new, keys)

    def optimizer_state_dict(self, variables: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
        """Per-table fused optimizer state: ``{"<prefix>.<table>.weight": {"momentum1": ..., "step": t}}``.

        TorchRec's fused optimizer keys its ``state_dict()["state"]`` by the same
        parameter names, with inner names ``"<table>.momentum1"`` etc.; see
        :mod:`jaxrec.modules.state_dict` for the mapping.
        """
        return optimizer_state_views(self.plan, self.PARAMS_NAME, self._groups(variables))

    def load_optimizer_state_dict(
        self, variables: Mapping[str, Any], state_dict: Mapping[str, Any]
    ) -> dict[str, Any]:
        """New variables with the fused optimizer state of :meth:`optimizer_state_dict`'s form.

        Every fused table must be present with exactly its optimizer's state names
        and ``step`` (tables of one group sharing a step); shapes, dtypes and values
        are checked as in :meth:`load_state_dict`. Weights are not touched.
        """
        groups = load_optimizer_state(
            self.plan, self.PARAMS_NAME, self._groups(variables), state_dict
        )
        return {**variables, "params": {**variables["params"], self.PARAMS_NAME: groups}}
