"""Quantized EmbeddingBagCollection: pooled lookups from row-wise quantized tables.

The counterpart of TorchRec's ``torchrec.quant.embedding_modules.EmbeddingBagCollection``:
a trained float :class:`jaxrec.EmbeddingBagCollection` is quantized table by table
(:meth:`EmbeddingBagCollection.from_float`) to INT8 (FBGEMM's 8-bit rows: ``dim`` bytes
and a float32 scale and bias), INT4/INT2 (packed values and a float16 scale and bias) or
FP16, and looked up from the quantized tables: the Pallas kernel dequantizes each row it
reads on a GPU, the XLA reference does elsewhere. Tables are stacked by (pooling, dim) as
in the float collection; the input and output are the float collection's.

>>> import jax, jax.numpy as jnp, jaxrec
>>> from jaxrec.configs import DataType
>>> tables = [jaxrec.EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10,
...                                     feature_names=["f1"])]
>>> kjt = jaxrec.KeyedJaggedTensor(keys=["f1"], values=jnp.array([1, 2, 3]),
...                                lengths=jnp.array([2, 1]))
>>> ebc = jaxrec.EmbeddingBagCollection(tables)
>>> variables = ebc.init(jax.random.key(0), kjt)
>>> qebc, qvariables = EmbeddingBagCollection.from_float(ebc, variables, DataType.INT8)
>>> qebc.state_dict(qvariables)["embedding_bags.t1.weight"].shape    # 4 bytes + scale, bias
(10, 12)
>>> diff = qebc.apply(qvariables, kjt).values() - ebc.apply(variables, kjt).values()
>>> bool(jnp.abs(diff).max() < 0.01)
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jaxrec_kernels import (
    pooled_lookup,
    pooled_lookup_reference,
    quantize_rows,
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.rowwise_quantization import dequantize_rows

from jaxrec.configs import DataType, EmbeddingBagConfig, embedding_names_by_table
from jaxrec.modules.input_checks import check_features, report_invalid_ids
from jaxrec.modules.stacked_tables import group_weight, init_groups
from jaxrec.modules.state_dict import check_groups
from jaxrec.ops.backend import BoundsCheckMode, as_bounds_check_mode, resolve_backend
from jaxrec.ops.bags import checked_offsets
from jaxrec.ops.plan import LookupPlan, build_plan
from jaxrec.sparse import KeyedJaggedTensor, KeyedTensor

__all__ = ["QUANT_DATA_TYPES", "EmbeddingBagCollection"]

#: The storage types of quantized tables (TorchRec's DataType names).
QUANT_DATA_TYPES = ("INT8", "INT4", "INT2", "FP16")
_WEIGHT_TYPE = {DataType.INT8: "int8", DataType.INT4: "int4", DataType.INT2: "int2"}


def _data_type(value: Any) -> DataType:
    try:
        data_type = value if isinstance(value, DataType) else DataType(str(value).upper())
    except ValueError:
        data_type = None
    if data_type is None or data_type.value not in QUANT_DATA_TYPES:
        raise ValueError(f"data_type must be one of {QUANT_DATA_TYPES}, got {value!r}")
    return data_type


def quantize_group(weight: jax.Array, data_type: DataType) -> jax.Array:
    """A stacked float group as stored by a quantized collection of ``data_type``."""
    if data_type is DataType.FP16:
        return jnp.asarray(weight, jnp.float16)
    return quantize_rows(jnp.asarray(weight), _WEIGHT_TYPE[data_type])


class EmbeddingBagCollection(nn.Module):
    """Pooled lookups from quantized tables (TorchRec's quant ``EmbeddingBagCollection``).

    Attributes:
      tables: the :class:`~jaxrec.EmbeddingBagConfig` of each table (their float configs).
      data_type: the storage of every table: ``DataType.INT8``, ``INT4``, ``INT2`` (row-wise
        quantized, FBGEMM's fused layouts, see :mod:`jaxrec_kernels.rowwise_quantization`)
        or ``FP16``. A value's error is at most half its row's scale (int4/int2 add the
        float16 rounding of the scale and bias).
      is_weighted: whether inputs carry per-sample weights.
      backend: ``"auto"`` (Pallas on GPU, XLA elsewhere), ``"pallas"`` or ``"xla"``.
      bounds_check_mode: as the float collection's.
      output_dtype: dtype of the pooled output (float32; pooling accumulates in float32).

    Variables: ``{"params": {"embedding_bags": {group name: stacked buffer}}}``, a buffer
    ``[rows, row_bytes] uint8`` (``float16 [rows, dim]`` for FP16) per group of the plan.
    """

    PARAMS_NAME: ClassVar[str] = "embedding_bags"

    tables: Sequence[EmbeddingBagConfig]
    data_type: DataType | str = DataType.INT8
    is_weighted: bool = False
    backend: str = "auto"
    bounds_check_mode: BoundsCheckMode | str = BoundsCheckMode.WARNING
    output_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "data_type", _data_type(self.data_type))
        for table in self.tables:
            if not isinstance(table, EmbeddingBagConfig):
                raise ValueError(f"takes EmbeddingBagConfigs, got {type(table).__name__}")
        self.plan  # noqa: B018 (raises on an invalid table set)
        resolve_backend(self.backend)
        as_bounds_check_mode(self.bounds_check_mode)
        super().__post_init__()

    @property
    def plan(self) -> LookupPlan:
        """The static group layout of the tables (as the float collection's)."""
        return build_plan(self.tables)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        variables: Mapping[str, Any],
        data_type: DataType | str = DataType.INT8,
        **fields: Any,
    ) -> tuple[EmbeddingBagCollection, dict[str, Any]]:
        """``(quantized collection, its variables)`` from a float collection and its variables.

        ``fields`` override the copied ``is_weighted``, ``backend``, ``bounds_check_mode``
        and ``output_dtype``. The float tables' optimizer state is dropped.
        """
        options = {
            "is_weighted": bool(module.is_weighted),
            "backend": module.backend,
            "bounds_check_mode": module.bounds_check_mode,
            "output_dtype": module.output_dtype or jnp.float32,
        }
        options.update(fields)
        qmodule = cls(tables=module.tables, data_type=data_type, **options)
        groups = module._groups(variables)
        quantized = {
            g.name: quantize_group(group_weight(groups[g.name]), qmodule.data_type)
            for g in qmodule.plan.groups
        }
        return qmodule, {"params": {cls.PARAMS_NAME: quantized}}

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self.tables)

    def embedding_names(self) -> list[str]:
        """The output keys, in output order (as the float collection's)."""
        return [name for names in embedding_names_by_table(self.tables) for name in names]

    def state_dict(
        self, variables: Mapping[str, Any], dequantize: bool = False
    ) -> dict[str, jax.Array]:
        """``{"embedding_bags.<table>.weight": rows}``: the stored (quantized) rows, or with
        ``dequantize=True`` float32 ``[rows, dim]`` arrays."""
        groups = check_groups(self.plan, self.PARAMS_NAME, variables)
        out = {}
        for table in self.plan.tables:
            rows = groups[self.plan.groups[table.group].name][
                table.row_offset : table.row_offset + table.num_rows
            ]
            if dequantize:
                rows = self._dequantize(rows, table.dim)
            out[f"{self.PARAMS_NAME}.{table.name}.weight"] = rows
        return out

    def _dequantize(self, rows: jax.Array, dim: int) -> jax.Array:
        if self.data_type is DataType.FP16:
            return rows.astype(jnp.float32)
        return dequantize_rows(rows, _WEIGHT_TYPE[self.data_type], dim)

    @nn.compact
    def __call__(self, features: KeyedJaggedTensor) -> KeyedTensor:
        plan = self.plan
        check_features(plan, features, weighted=bool(self.is_weighted))

        def init(key):
            floats = init_groups(plan, self.tables, None, key)
            return {name: quantize_group(w, self.data_type) for name, w in floats.items()}

        groups = self.param(self.PARAMS_NAME, init)
        mode = as_bounds_check_mode(self.bounds_check_mode)
        backend = resolve_backend(self.backend)
        ids = features.values().astype(jnp.int32)
        offsets, bad_bags = checked_offsets(features.offsets(), ids.shape[0])
        weights = features.weights_or_none()
        keys = tuple(features.keys())
        out, bad = None, jnp.zeros((), jnp.int32)
        for g, group in enumerate(plan.groups):
            kw = dict(
                batch_size=features.stride(),
                num_columns=plan.num_columns,
                pooling=group.pooling,
                bounds_check=mode.value,
                out=out,
                out_dtype=self.output_dtype,
            )
            if backend.name == "pallas":
                kw["interpret"] = backend.interpret
            if self.data_type is DataType.FP16:
                fn = pooled_lookup if backend.name == "pallas" else pooled_lookup_reference
            else:
                fn = quantized_pooled_lookup
                if backend.name != "pallas":
                    fn = quantized_pooled_lookup_reference
                kw.update(dim=group.dim, weight_type=_WEIGHT_TYPE[self.data_type])
            out, count = fn(
                groups[group.name], ids, offsets, weights, plan.kernel_features(g, keys), **kw
            )
            bad = bad + count
        if mode is BoundsCheckMode.FATAL:
            checkify.check(bad + bad_bags == 0, "ids outside their tables or bad bags (FATAL)")
        if mode in (BoundsCheckMode.FATAL, BoundsCheckMode.WARNING):
            bad = bad + bad_bags
        report_invalid_ids(self, mode, bad)
        return KeyedTensor(
            keys=self.embedding_names(),
            length_per_key=[f.dim for f in plan.features],
            values=out,
        )
