"""FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` for JAX, with explicit state.

The operator is the static part (specs, feature map, optimizer, pooling, precisions);
its tables, optimizer state and learning rate live in a :class:`~jaxrec.tbe.TBEState`
that ``init`` makes and every call takes. It runs on the same plan, lookup and fused
backward as the collections (:mod:`jaxrec.ops`): tables of one dim share one stacked
buffer, each buffer is looked up with one launch, and with an optimizer the backward
updates the touched rows in place and hands the updated tables out as the gradient,
which :func:`jaxrec.optim.apply_updates` swaps in.

FBGEMM's documented example, with ``torch.tensor`` -> ``jnp.array`` and explicit state:

>>> import jax, jax.numpy as jnp
>>> from jaxrec.tbe import ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen
>>> embedding_specs = [
...     (3, 8, EmbeddingLocation.DEVICE, ComputeDevice.CUDA),
...     (5, 4, EmbeddingLocation.DEVICE, ComputeDevice.CUDA),
... ]
>>> tbe = SplitTableBatchedEmbeddingBagsCodegen(embedding_specs)
>>> state = tbe.init_embedding_weights_uniform(tbe.init(), -1, 1, jax.random.key(0))
>>> [w.shape for w in tbe.split_embedding_weights(state)]
[(3, 8), (5, 4)]
>>> indices = jnp.array([0, 1, 2, 0, 1, 2, 0, 3, 1, 4, 2, 0, 0])
>>> offsets = jnp.array([0, 2, 5, 7, 9, 12, 13])       # B = 3 bags of T = 2 features
>>> tbe(state, indices, offsets).shape                 # [B, total_D]
(3, 12)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.configs import DataType, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from jaxrec.modules.stacked_tables import init_groups, table_views
from jaxrec.modules.state_dict import load_tables
from jaxrec.ops.backend import resolve_backend
from jaxrec.ops.lookup import lookup
from jaxrec.ops.plan import LookupPlan, build_plan
from jaxrec.ops.spec import LookupSpec
from jaxrec.optim.fused import FusedTableParams, init_fused_table
from jaxrec.tbe.enums import (
    BoundsCheckMode,
    CacheAlgorithm,
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    PoolingMode,
    SparseType,
    WeightDecayMode,
    as_member,
)
from jaxrec.tbe.inputs import TBEInputs
from jaxrec.tbe.int8 import (
    QPARAM_BYTES,
    as_bytes,
    as_container,
    dequantize_table,
    init_int8_group,
    int8_lookup,
    quantize_output,
    quantize_table,
)
from jaxrec.tbe.optimizers import OptimizerArgs, make_optimizer
from jaxrec.tbe.state import TBEState

__all__ = ["SplitTableBatchedEmbeddingBagsCodegen"]

_PREFIX = "tbe"  # the state-dict prefix of the per-table names used in error messages


def _number(name: str, value: Any, *, low: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    return number


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _parse_specs(
    embedding_specs: Any,
) -> tuple[tuple[int, int, EmbeddingLocation, ComputeDevice], ...]:
    """``(rows, dim, location, compute_device)`` per table."""
    if isinstance(embedding_specs, str) or not isinstance(embedding_specs, Sequence):
        raise ValueError(
            "embedding_specs must be a list of (rows, dim, EmbeddingLocation, ComputeDevice) "
            f"tuples, got {embedding_specs!r}"
        )
    if not embedding_specs:
        raise ValueError("embedding_specs is empty; a TBE needs at least one table")
    parsed = []
    for t, spec in enumerate(embedding_specs):
        if not isinstance(spec, Sequence) or len(spec) != 4:
            raise ValueError(
                f"embedding_specs[{t}] must be (rows, dim, EmbeddingLocation, ComputeDevice), "
                f"got {spec!r}"
            )
        rows = _count(f"embedding_specs[{t}] rows", spec[0], 1)
        dim = _count(f"embedding_specs[{t}] dim", spec[1], 1)
        location = as_member(EmbeddingLocation, spec[2], f"embedding_specs[{t}] location")
        device = as_member(ComputeDevice, spec[3], f"embedding_specs[{t}] compute device")
        parsed.append((rows, dim, location, device))
    devices = {device for _, _, _, device in parsed}
    if len(devices) > 1:
        raise ValueError(
            "all tables of a TBE must share one compute device (as FBGEMM's), got "
            f"{sorted(d.name for d in devices)}"
        )
    return tuple(parsed)


def _parse_feature_map(feature_table_map: Any, num_tables: int) -> tuple[int, ...]:
    if feature_table_map is None:
        return tuple(range(num_tables))
    features = tuple(feature_table_map)
    if not features:
        raise ValueError("feature_table_map is empty; a TBE needs at least one feature")
    for i, table in enumerate(features):
        if isinstance(table, bool) or not isinstance(table, int | np.integer):
            raise ValueError(f"feature_table_map[{i}] must be a table index, got {table!r}")
        if not 0 <= table < num_tables:
            raise ValueError(
                f"feature_table_map[{i}] = {table} is not a table index in [0, {num_tables})"
            )
    unread = sorted(set(range(num_tables)) - set(features))
    if unread:
        raise ValueError(
            f"tables {unread} are read by no feature of feature_table_map {list(features)}; "
            "leave them out of embedding_specs"
        )
    return tuple(int(t) for t in features)


def _float_type(name: str, value: Any, *, int8: bool = False) -> SparseType:
    member = as_member(SparseType, value, name)
    if not (member.is_float() or (int8 and member is SparseType.INT8)):
        built = "FP32, FP16, BF16 and INT8 are" if int8 else "FP32, FP16 and BF16 are"
        raise ValueError(f"{name}=SparseType.{member.name} is not built yet; {built}")
    return member


class SplitTableBatchedEmbeddingBagsCodegen:
    """FBGEMM's table-batched embedding operator: FBGEMM's arguments and defaults.

    Args:
      embedding_specs: one ``(rows, dim, EmbeddingLocation, ComputeDevice)`` per table.
        ``HOST``, ``MANAGED`` and ``MANAGED_CACHING`` tables live in host memory behind a
        device cache: train them through :class:`jaxrec.tbe.CachedTBE` (this operator's
        own state and call hold every table on the device).
        ``ComputeDevice.CUDA`` runs the Pallas kernels where a GPU is present and the same
        computation in XLA elsewhere; ``ComputeDevice.CPU`` runs the XLA path. All tables
        share one compute device. Any ``dim >= 1`` works (FBGEMM's GPU kernels want
        multiples of 4).
      feature_table_map: ``feature_table_map[t]`` is the table that feature ``t`` reads
        (default: feature t reads table t). A table may be read by several features; every
        table must be read by at least one.
      cache_algorithm, cache_load_factor, cache_sets, cache_reserved_memory,
        cache_precision, enforce_hbm, prefetch_pipeline: the HBM cache of
        MANAGED_CACHING tables; checked and kept, without effect on DEVICE tables.
      weights_precision: the tables' type, FP32, FP16, BF16 or INT8 (16-bit tables are
        updated in float32 and stored back with ``stochastic_rounding``). INT8 tables are
        FBGEMM's row-wise quantized rows (``dim`` bytes, float32 scale and bias), looked up
        through the dequantizing kernel; the fused update dequantizes the touched rows,
        applies the optimizer in float32 (float32 state) and requantizes them, at most half
        a row's scale from the float32 step (:mod:`jaxrec.tbe.int8`). INT8 needs a fused
        optimizer and SUM or MEAN pooling.
      output_dtype: the output's type, FP32, FP16, BF16 (pooling accumulates in float32) or
        INT8: each float32 output row quantized to ``[total_D + 8]`` bytes with its scale and
        bias (:func:`jaxrec.tbe.dequantize_output` reads it back; bytes carry no gradient).
      optimizer: the :class:`OptimType` fused into the backward (``NONE``: plain tables
        with a true dense gradient). ``stochastic_rounding``, ``gradient_clipping``,
        ``max_gradient``, ``max_norm``, ``learning_rate``, ``eps``, ``momentum``,
        ``weight_decay``, ``weight_decay_mode``, ``eta``, ``beta1`` and ``beta2`` are its
        hyperparameters, as FBGEMM's (see :mod:`jaxrec.optim`); one that the chosen
        optimizer does not define (e.g. weight decay with EXACT_ADAGRAD) is refused rather
        than ignored.
      pooling_mode: SUM, MEAN or NONE (one row per index; all tables of one dim).
      bounds_check_mode: what an index outside its table does inside ``jit``
        (:class:`BoundsCheckMode`); outside ``jit`` a bad index always raises.
      table_names: names of the tables (default ``t0, t1, ...``), used in messages.
      backend: jaxrec's override of the compute device's choice: ``"auto"``, ``"pallas"``
        (interpret mode without a GPU) or ``"xla"``.
    """

    def __init__(
        self,
        embedding_specs: Sequence[tuple[int, int, EmbeddingLocation, ComputeDevice]],
        feature_table_map: Sequence[int] | None = None,
        cache_algorithm: CacheAlgorithm = CacheAlgorithm.LRU,
        cache_load_factor: float = 0.2,
        cache_sets: int = 0,
        cache_reserved_memory: float = 0.0,
        cache_precision: SparseType | None = None,
        weights_precision: SparseType = SparseType.FP32,
        output_dtype: SparseType = SparseType.FP32,
        enforce_hbm: bool = False,
        optimizer: OptimType = OptimType.EXACT_SGD,
        stochastic_rounding: bool = True,
        gradient_clipping: bool = False,
        max_gradient: float = 1.0,
        max_norm: float = 0.0,
        learning_rate: float = 0.01,
        eps: float = 1.0e-8,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        weight_decay_mode: WeightDecayMode = WeightDecayMode.NONE,
        eta: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        pooling_mode: PoolingMode = PoolingMode.SUM,
        bounds_check_mode: BoundsCheckMode = BoundsCheckMode.WARNING,
        prefetch_pipeline: bool = False,
        table_names: Sequence[str] | None = None,
        *,
        backend: str | None = None,
    ) -> None:
        specs = _parse_specs(embedding_specs)
        self.embedding_specs = specs
        self.feature_table_map = _parse_feature_map(feature_table_map, len(specs))
        self.cache_algorithm = as_member(CacheAlgorithm, cache_algorithm, "cache_algorithm")
        self.cache_load_factor = _number("cache_load_factor", cache_load_factor)
        self.cache_sets = _count("cache_sets", cache_sets, 0)
        self.cache_reserved_memory = _number("cache_reserved_memory", cache_reserved_memory)
        self.cache_precision = (
            None if cache_precision is None else _float_type("cache_precision", cache_precision)
        )
        self.enforce_hbm = bool(enforce_hbm)
        self.prefetch_pipeline = bool(prefetch_pipeline)
        self.weights_precision = _float_type("weights_precision", weights_precision, int8=True)
        self.output_dtype = _float_type("output_dtype", output_dtype, int8=True)
        self.pooling_mode = as_member(PoolingMode, pooling_mode, "pooling_mode")
        self.bounds_check_mode = as_member(BoundsCheckMode, bounds_check_mode, "bounds_check_mode")
        self.optimizer = as_member(OptimType, optimizer, "optimizer")
        self.learning_rate = _number("learning_rate", learning_rate)
        self._optimizer_args = OptimizerArgs(
            optimizer=self.optimizer,
            stochastic_rounding=bool(stochastic_rounding),
            gradient_clipping=bool(gradient_clipping),
            max_gradient=_number("max_gradient", max_gradient, low=-math.inf),
            max_norm=_number("max_norm", max_norm),
            eps=_number("eps", eps),
            momentum=_number("momentum", momentum),
            weight_decay=_number("weight_decay", weight_decay),
            weight_decay_mode=as_member(WeightDecayMode, weight_decay_mode, "weight_decay_mode"),
            eta=_number("eta", eta),
            beta1=_number("beta1", beta1),
            beta2=_number("beta2", beta2),
        )
        self._optimizer_args.check()
        make_optimizer(self._optimizer_args, self.learning_rate)  # checks the ranges
        if table_names is None:
            table_names = [f"t{t}" for t in range(len(specs))]
        self.table_names = tuple(str(name) for name in table_names)
        if len(self.table_names) != len(specs) or len(set(self.table_names)) != len(specs):
            raise ValueError(
                f"table_names must name each of the {len(specs)} tables once, got {table_names!r}"
            )
        device = specs[0][3]
        self.backend = backend or ("auto" if device is ComputeDevice.CUDA else "xla")
        resolve_backend(self.backend)
        if self.pooling_mode is PoolingMode.NONE:
            dims = sorted({dim for _, dim, _, _ in specs})
            if len(dims) > 1:
                raise ValueError(
                    f"PoolingMode.NONE needs all tables of one dim (as FBGEMM's), got dims {dims}"
                )
        if self._int8 and (self.optimizer is OptimType.NONE or not self.plan.pooled):
            raise ValueError(
                "weights_precision=SparseType.INT8 needs a fused optimizer (not OptimType.NONE) "
                f"and pooling SUM or MEAN, got optimizer {self.optimizer.name} and pooling "
                f"{self.pooling_mode.name}"
            )
        self.plan  # noqa: B018 (builds the plan: raises on an invalid table set)

    # Layout -----------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        """T, the number of features (the length of ``feature_table_map``)."""
        return len(self.feature_table_map)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Each feature's dim: its table's."""
        return tuple(self.embedding_specs[t][1] for t in self.feature_table_map)

    @property
    def total_D(self) -> int:  # noqa: N802 (FBGEMM's name)
        """Width of the pooled output: the sum of the features' dims."""
        return sum(self.feature_dims)

    @property
    def _int8(self) -> bool:
        return self.weights_precision is SparseType.INT8

    @property
    def _configs(self) -> tuple[EmbeddingBagConfig | EmbeddingConfig, ...]:
        # INT8 tables are stacked as float32 ones are; only their storage differs.
        data_type = DataType.FP32 if self._int8 else DataType[self.weights_precision.name]
        configs = []
        for t, (rows, dim, _, _) in enumerate(self.embedding_specs):
            features = [f"f{i}" for i, table in enumerate(self.feature_table_map) if table == t]
            common = {
                "name": self.table_names[t],
                "embedding_dim": dim,
                "num_embeddings": rows,
                "feature_names": features,
                "data_type": data_type,
            }
            if self.pooling_mode is PoolingMode.NONE:
                configs.append(EmbeddingConfig(**common))
            else:
                pooling = PoolingType[self.pooling_mode.name]
                configs.append(EmbeddingBagConfig(**common, pooling=pooling))
        return tuple(configs)

    @property
    def plan(self) -> LookupPlan:
        """The stacked groups of the tables (one buffer per dim), as the collections'."""
        return build_plan(self._configs)

    @property
    def _fused(self) -> bool:
        return self.optimizer is not OptimType.NONE

    def _lookup_spec(self, batch_size: int, optimizer: Any) -> LookupSpec:
        """The lookup of every group, with the pooled columns in FBGEMM's feature order."""
        plan = self.plan
        spec = LookupSpec.create(
            plan,
            tuple(f"f{i}" for i in range(self.num_features)),
            batch_size=batch_size,
            bounds_check=self.bounds_check_mode.as_lookup_mode(),
            backend=self.backend,
            out_dtype=jnp.float32
            if self.output_dtype is SparseType.INT8
            else self.output_dtype.as_dtype(),
            optimizer=optimizer,
        )
        if not plan.pooled:
            return spec
        columns = np.concatenate([[0], np.cumsum(self.feature_dims)]).tolist()
        groups = tuple(
            dataclasses.replace(
                group,
                features=tuple(
                    (feature, row, rows, columns[feature])
                    for feature, row, rows, _ in group.features
                ),
            )
            for group in spec.groups
        )
        return dataclasses.replace(spec, groups=groups)

    # State ------------------------------------------------------------------------------
    def init(self, key: jax.Array | None = None) -> TBEState:
        """Tables, zero optimizer state and the learning rate.

        Without ``key`` the tables are zeros, as FBGEMM's constructor leaves them (then call
        :meth:`init_embedding_weights_uniform` or :meth:`set_split_embedding_weights`);
        with ``key`` each table is drawn uniformly in ``±sqrt(1 / rows)`` (TorchRec's
        default, as the collections do).
        """
        hosted = [
            n
            for n, s in zip(self.table_names, self.embedding_specs, strict=True)
            if s[2] is not EmbeddingLocation.DEVICE
        ]
        if hosted:
            raise ValueError(
                f"tables {hosted} are placed in host memory (HOST/MANAGED/MANAGED_CACHING); "
                "this state holds every table on the device. Train them with "
                "jaxrec.tbe.CachedTBE(op), which keeps them in host memory behind a cache"
            )
        optimizer = make_optimizer(self._optimizer_args, self.learning_rate)
        plan = self.plan
        if self._int8:
            drawn = None if key is None else init_groups(plan, self._configs, None, key)
            groups = {}
            for g in plan.groups:
                floats = jnp.zeros((g.num_rows, g.dim)) if drawn is None else drawn[g.name]
                groups[g.name] = init_int8_group(quantize_table(floats), optimizer, g.dim)
        elif key is None:
            groups = {}
            for g in plan.groups:
                zeros = jnp.zeros((g.num_rows, g.dim), jnp.dtype(g.dtype))
                groups[g.name] = zeros if optimizer is None else init_fused_table(zeros, optimizer)
        else:
            groups = init_groups(plan, self._configs, optimizer, key)
        return TBEState(groups=groups, learning_rate=jnp.float32(self.learning_rate))

    def _with_weights(self, groups: dict[str, Any], weights: dict[str, jax.Array]) -> dict:
        out = {}
        for name, entry in groups.items():
            if isinstance(entry, FusedTableParams):
                out[name] = dataclasses.replace(entry, weight=weights[name])
            else:
                out[name] = weights[name]
        return out

    def _groups(self, state: Any) -> dict[str, Any]:
        """The group entries of ``state``, checked against this TBE's plan."""
        if not isinstance(state, TBEState):
            raise ValueError(
                f"state must be the TBEState that init returned, got {type(state).__name__}"
            )
        plan = self.plan
        expected = [g.name for g in plan.groups]
        if sorted(state.groups) != sorted(expected):
            raise ValueError(
                f"state holds groups {sorted(state.groups)}; this TBE's tables need {expected}"
            )
        for group in plan.groups:
            entry = state.groups[group.name]
            if isinstance(entry, FusedTableParams) != self._fused:
                kind = "FusedTableParams" if self._fused else "a plain table"
                raise ValueError(
                    f"state.groups[{group.name!r}] is {type(entry).__name__}; optimizer "
                    f"{self.optimizer.name} keeps {kind}"
                )
            weight = entry.weight if isinstance(entry, FusedTableParams) else entry
            width = group.dim + (QPARAM_BYTES if self._int8 else 0)
            if tuple(jnp.shape(weight)) != (group.num_rows, width):
                raise ValueError(
                    f"state.groups[{group.name!r}] has shape {tuple(jnp.shape(weight))}; "
                    f"tables {list(group.tables)} need {(group.num_rows, width)}"
                )
        return dict(state.groups)

    def split_embedding_weights(self, state: TBEState, dequantize: bool = False) -> list[jax.Array]:
        """Each table's weights ``[rows, dim]``, in ``embedding_specs`` order.

        INT8 tables, as FBGEMM's: ``[rows, dim + 8]`` uint8, each row its ``dim`` bytes then
        its float32 scale and bias; with ``dequantize=True`` float32 ``[rows, dim]``.
        """
        groups = self._groups(state)
        if self._int8:
            out = []
            for name in self.table_names:
                table = self.plan.table(name)
                entry = groups[self.plan.groups[table.group].name]
                raw = as_bytes(entry.weight[table.row_offset : table.row_offset + table.num_rows])
                out.append(dequantize_table(raw, table.dim) if dequantize else raw)
            return out
        views = table_views(self.plan, _PREFIX, groups)
        return [views[f"{_PREFIX}.{name}.weight"] for name in self.table_names]

    def set_split_embedding_weights(self, state: TBEState, arrays: Sequence[Any]) -> TBEState:
        """``state`` holding ``arrays`` (one ``[rows, dim]`` array per table) as its tables.

        Each is cast to ``weights_precision``; a wrong count or shape, non-real, non-finite
        or overflowing values are refused naming the table. Optimizer state is kept. INT8
        tables take FBGEMM's bytes (``[rows, dim + 8]`` uint8, as
        :meth:`split_embedding_weights` gives them) or floats ``[rows, dim]``, quantized.
        """
        groups = self._groups(state)
        arrays = list(arrays)
        if len(arrays) != len(self.embedding_specs):
            raise ValueError(
                f"set_split_embedding_weights takes one array per table "
                f"({len(self.embedding_specs)}), got {len(arrays)}"
            )
        if self._int8:
            return dataclasses.replace(state, groups=self._set_int8(groups, arrays))
        named = {}
        for t, (array, (rows, dim, _, _)) in enumerate(
            zip(arrays, self.embedding_specs, strict=True)
        ):
            shape = tuple(np.shape(array))
            if shape != (rows, dim):
                raise ValueError(
                    f"arrays[{t}] (table {self.table_names[t]!r}) has shape {shape}; expected "
                    f"{(rows, dim)}"
                )
            named[f"{_PREFIX}.{self.table_names[t]}.weight"] = array
        groups, _ = load_tables(self.plan, _PREFIX, groups, named, strict=True)
        return dataclasses.replace(state, groups=groups)

    def _set_int8(self, groups: dict[str, Any], arrays: list[Any]) -> dict[str, Any]:
        """``groups`` with the INT8 tables of ``arrays`` (bytes, or floats quantized here)."""
        named: dict[str, jax.Array] = {}
        for t, (array, (rows, dim, _, _)) in enumerate(
            zip(arrays, self.embedding_specs, strict=True)
        ):
            name = self.table_names[t]
            shape, dtype = tuple(np.shape(array)), np.dtype(jnp.result_type(array))
            if dtype == np.uint8 and shape == (rows, dim + QPARAM_BYTES):
                scale_bias = np.asarray(array)[:, dim:].copy().view(np.float32)
                if not np.isfinite(scale_bias).all():
                    raise ValueError(
                        f"arrays[{t}] (table {name!r}) has non-finite scales or biases"
                    )
                rows_q = jnp.asarray(array, jnp.uint8)
            elif np.issubdtype(dtype, np.floating) and shape == (rows, dim):
                if not np.isfinite(np.asarray(array, np.float32)).all():
                    raise ValueError(f"arrays[{t}] (table {name!r}) has non-finite values")
                rows_q = as_bytes(quantize_table(array))
            else:
                raise ValueError(
                    f"arrays[{t}] (table {name!r}) is {shape} {dtype}; an INT8 table takes "
                    f"{(rows, dim + QPARAM_BYTES)} uint8 bytes or {(rows, dim)} floats"
                )
            named[name] = rows_q
        out = {}
        for group in self.plan.groups:
            raw = [named[name] for name in group.tables]
            weight = as_container(raw[0] if len(raw) == 1 else jnp.concatenate(raw))
            out[group.name] = dataclasses.replace(groups[group.name], weight=weight)
        return out

    def init_embedding_weights_uniform(
        self, state: TBEState, low: float, high: float, key: jax.Array
    ) -> TBEState:
        """``state`` with every table drawn uniformly from ``[low, high)`` (table t from
        ``fold_in(key, t)``), in ``weights_precision``. Optimizer state is kept."""
        low, high = (_number(n, v, low=-math.inf) for n, v in (("low", low), ("high", high)))
        if low > high:
            raise ValueError(f"init_embedding_weights_uniform: low={low} exceeds high={high}")
        groups = self._groups(state)
        plan = self.plan
        index = {name: t for t, name in enumerate(self.table_names)}
        weights = {}
        for group in plan.groups:
            parts = [
                jax.random.uniform(
                    jax.random.fold_in(key, index[name]),
                    (self.embedding_specs[index[name]][0], group.dim),
                    jnp.float32,
                    low,
                    high,
                ).astype(group.dtype)
                for name in group.tables
            ]
            weights[group.name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
            if self._int8:
                weights[group.name] = quantize_table(weights[group.name])
        return dataclasses.replace(state, groups=self._with_weights(groups, weights))

    def split_optimizer_states(self, state: TBEState) -> list[dict[str, jax.Array]]:
        """Each table's optimizer state under FBGEMM's names, in FBGEMM's order.

        One dict per table: ``{}`` for EXACT_SGD; ``momentum1`` (``[rows]`` for
        EXACT_ROWWISE_ADAGRAD, ``[rows, dim]`` for EXACT_ADAGRAD and LARS_SGD); for ADAM
        and LAMB ``momentum1`` and ``momentum2`` (``[rows]`` in the PARTIAL_ROWWISE forms).
        ``list(d.values())`` is FBGEMM's list for the table.
        """
        if not self._fused:
            raise ValueError("optimizer NONE keeps no optimizer state")
        groups = self._groups(state)
        out = []
        for name in self.table_names:
            table = self.plan.table(name)
            entry = groups[self.plan.groups[table.group].name]
            rows = slice(table.row_offset, table.row_offset + table.num_rows)
            out.append({key: entry.state[key][rows] for key in sorted(entry.state)})
        return out

    def set_learning_rate(self, state: TBEState, lr: Any) -> TBEState:
        """``state`` with learning rate ``lr`` (a float, or a traced scalar under ``jit``).

        The fused update reads it at run time: changing it does not recompile.
        """
        if not self._fused:
            raise ValueError("optimizer NONE has no learning rate")
        self._groups(state)
        if not isinstance(lr, jax.core.Tracer):
            _number("learning_rate", np.asarray(lr).item() if np.ndim(lr) == 0 else lr)
        return dataclasses.replace(state, learning_rate=jnp.asarray(lr, jnp.float32))

    def get_learning_rate(self, state: TBEState) -> float | jax.Array:
        """The learning rate of ``state`` (a float outside ``jit``, else the traced scalar)."""
        if not isinstance(state, TBEState):
            raise ValueError(f"state must be a TBEState, got {type(state).__name__}")
        lr = state.learning_rate
        return lr if isinstance(lr, jax.core.Tracer) else float(lr)

    # Lookup -----------------------------------------------------------------------------
    def lookup(
        self,
        state: TBEState,
        indices: Any,
        offsets: Any,
        per_sample_weights: Any = None,
        feature_requires_grad: Any = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``(output, bad_count)``: the call's output and the number of bad indices and bags
        met inside ``jit`` under WARNING/FATAL (0 otherwise; see :func:`jaxrec.ops.lookup`)."""
        groups = self._groups(state)
        rows = tuple(self.embedding_specs[t][0] for t in self.feature_table_map)
        inputs = TBEInputs.check(
            indices,
            offsets,
            per_sample_weights,
            feature_requires_grad,
            num_features=self.num_features,
            feature_rows=rows,
            feature_tables=self.feature_table_map,
        )
        optimizer = None
        if self._fused:
            lr = jax.lax.stop_gradient(jnp.asarray(state.learning_rate, jnp.float32))
            optimizer = make_optimizer(self._optimizer_args, lambda count: lr)
        spec = self._lookup_spec(inputs.batch_size, optimizer)
        weights = inputs.per_sample_weights
        if weights is not None and inputs.feature_requires_grad is not None:
            weights = _detach_features(weights, inputs)
        out, bad = (int8_lookup if self._int8 else lookup)(
            spec,
            tuple(groups[g.name] for g in self.plan.groups),
            inputs.indices,
            inputs.offsets,
            weights,
        )
        out = out if self.plan.pooled else out[0]
        if self.output_dtype is SparseType.INT8:
            out = quantize_output(out)
        return out, bad

    def __call__(
        self,
        state: TBEState,
        indices: Any,
        offsets: Any,
        per_sample_weights: Any = None,
        feature_requires_grad: Any = None,
    ) -> jax.Array:
        """Look up every feature's bags.

        Args:
          state: what :meth:`init` returned (or a later step's state).
          indices: ``[N]`` integer ids, feature-major.
          offsets: ``[B * T + 1]``; bag ``b`` of feature ``t`` is
            ``indices[offsets[t * B + b] : offsets[t * B + b + 1]]``.
          per_sample_weights: ``[N]`` floats multiplying the rows, or None.
          feature_requires_grad: ``[T]``; where 0, that feature's per-sample weights get
            no gradient (FBGEMM's flag; here ``jax.grad`` asks for the weights' gradient).

        Returns:
          ``[B, total_D]`` in ``output_dtype``, feature t in columns
          ``[sum(dims of features < t), + dim)``; with ``PoolingMode.NONE`` ``[N, D]``, row
          i the embedding of ``indices[i]``. Differentiable: with an optimizer the gradient
          of ``state`` holds the updated tables (apply it with
          :func:`jaxrec.optim.apply_updates`); with ``OptimType.NONE`` the true gradient.
        """
        return self.lookup(state, indices, offsets, per_sample_weights, feature_requires_grad)[0]


def _detach_features(weights: jax.Array, inputs: TBEInputs) -> jax.Array:
    """``weights`` whose entries in features with ``feature_requires_grad == 0`` carry no
    gradient."""
    starts = inputs.offsets[:: inputs.batch_size]  # T + 1 feature boundaries
    positions = jnp.arange(weights.shape[0], dtype=jnp.int32)
    feature = jnp.searchsorted(starts, positions, side="right") - 1
    num_features = inputs.feature_requires_grad.shape[0]
    wanted = inputs.feature_requires_grad[jnp.clip(feature, 0, num_features - 1)] != 0
    return jnp.where(wanted, weights, jax.lax.stop_gradient(weights))
