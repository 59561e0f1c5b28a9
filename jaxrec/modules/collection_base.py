"""The base of the Flax embedding collections: fields, checks, the lookup over stacked groups.

:class:`EmbeddingCollectionBase` declares what :class:`~jaxrec.EmbeddingBagCollection`
and :class:`~jaxrec.EmbeddingCollection` share: the tables (positional), the fused
optimizer and its per-table overrides, and the lookup options (keyword-only fields, read
together as a frozen :class:`~jaxrec.ops.options.LookupOptions`). A subclass names its
table config type, its params entry (TorchRec's prefix) and its TorchRec flag, a boolean
field that also reads back when called (``ebc.is_weighted()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, overload

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.configs import BaseEmbeddingConfig
from jaxrec.modules.callable_flag import CallableFlag
from jaxrec.modules.input_checks import report_invalid_ids, report_nonfinite_rows
from jaxrec.modules.stacked_tables import init_groups, optimizer_state_views, table_views
from jaxrec.modules.state_dict import (
    IncompatibleKeys,
    check_groups,
    load_optimizer_state,
    load_tables,
)
from jaxrec.ops.backend import BoundsCheckMode
from jaxrec.ops.lookup import lookup
from jaxrec.ops.options import LookupOptions
from jaxrec.ops.plan import LookupPlan, build_plan, optimizer_tags
from jaxrec.ops.sharded import local_row_block
from jaxrec.ops.spec import LookupSpec
from jaxrec.optim.sparse_optimizers import SparseOptimizer
from jaxrec.parallel.collection_sharding import sharded_collection_lookup
from jaxrec.sparse import KeyedJaggedTensor

__all__ = ["EmbeddingCollectionBase"]


def _keyword(default: Any) -> Any:
    return dataclasses.field(default=default, kw_only=True)


class EmbeddingCollectionBase(nn.Module):
    """A Flax module over stacked table groups (subclassed by the collections).

    Attributes:
      tables: the table configs (of the subclass's ``CONFIG_TYPE``).
      optimizer: the fused sparse optimizer of every table, or ``None`` (plain arrays).
      table_optimizers: per-table overrides of ``optimizer``, ``{table name: optimizer
        or None}``.
      backend, bounds_check_mode, output_dtype, data_parallel_axis, row_shard_axis: the
        lookup options (see :class:`~jaxrec.ops.options.LookupOptions`), also readable
        as one value, :attr:`lookup_options`.

    Class attributes a subclass sets: ``CONFIG_TYPE`` (its table config class),
    ``PARAMS_NAME`` (its params entry: ``"embedding_bags"`` or ``"embeddings"``) and
    ``FLAG`` (the name of its TorchRec boolean field).
    """

    CONFIG_TYPE: ClassVar[type[BaseEmbeddingConfig]]
    PARAMS_NAME: ClassVar[str]
    FLAG: ClassVar[str]

    tables: Sequence[BaseEmbeddingConfig]
    optimizer: SparseOptimizer | None = _keyword(None)
    table_optimizers: Mapping[str, SparseOptimizer | None] | None = _keyword(None)
    backend: str = _keyword("auto")
    bounds_check_mode: BoundsCheckMode | str = _keyword(BoundsCheckMode.WARNING)
    output_dtype: Any = _keyword(jnp.float32)
    data_parallel_axis: str | None = _keyword(None)
    row_shard_axis: str | None = _keyword(None)

    def __post_init__(self) -> None:
        """Normalise and check the fields at construction."""
        self.tables = tuple(self.tables)
        flag = getattr(self, self.FLAG)
        if not isinstance(flag, CallableFlag):
            setattr(self, self.FLAG, CallableFlag(flag, self.FLAG))
        for table in self.tables:
            if not isinstance(table, self.CONFIG_TYPE):
                raise ValueError(
                    f"{type(self).__name__} takes {self.CONFIG_TYPE.__name__}s, "
                    f"got {type(table).__name__}"
                )
        self.plan  # noqa: B018 (builds the plan: raises on an invalid table set)
        self.lookup_options  # noqa: B018 (checks the options)
        super().__post_init__()

    @property
    def lookup_options(self) -> LookupOptions:
        """The lookup options of the collection, as one frozen value."""
        return LookupOptions(
            backend=self.backend,
            bounds_check_mode=self.bounds_check_mode,
            output_dtype=self.output_dtype,
            data_parallel_axis=self.data_parallel_axis,
            row_shard_axis=self.row_shard_axis,
        )

    def _optimizer_tags(self) -> tuple[tuple[int, ...], tuple[SparseOptimizer | None, ...]]:
        return optimizer_tags(self.tables, self.optimizer, self.table_optimizers)

    @property
    def plan(self) -> LookupPlan:
        """The static group layout of the tables (computed once per table set)."""
        return build_plan(self.tables, self._optimizer_tags()[0])

    def group_optimizers(self) -> tuple[SparseOptimizer | None, ...]:
        """The fused optimizer (or None) of each group of :attr:`plan`."""
        optimizers = self._optimizer_tags()[1]
        return tuple(optimizers[g.optimizer_tag] for g in self.plan.groups)

    def _lookup_groups(self, features: KeyedJaggedTensor, weights: jax.Array | None):
        """Declare the group params and look every group up (inside the compact ``__call__``)."""
        sharded = sharded_collection_lookup(self, features, weights)
        if sharded is not None:  # placed by a sharding plan (DistributedModelParallel)
            return sharded
        plan = self.plan
        optimizers = self.group_optimizers()
        options = self.lookup_options

        def init(key):
            groups = init_groups(plan, self.tables, optimizers, key)
            if options.row_shard_axis is None:
                return groups
            return local_row_block(groups, options.row_shard_axis)

        groups = self.param(self.PARAMS_NAME, init)
        spec = LookupSpec.create(
            plan,
            tuple(features.keys()),
            batch_size=features.stride(),
            optimizer=optimizers,
            **options.spec_arguments(),
        )
        out, bad = lookup(
            spec,
            tuple(groups[g.name] for g in plan.groups),
            features.values(),
            features.offsets(),
            weights,
        )
        report_invalid_ids(self, options.bounds_check_mode, bad)
        report_nonfinite_rows(self, options.bounds_check_mode, groups)
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
