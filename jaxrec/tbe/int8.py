"""INT8 tables and INT8 outputs of the TBE: FBGEMM's row-wise quantized layout.

**Tables** (``weights_precision=SparseType.INT8``). Each row is stored as FBGEMM's
``FloatToFused8BitRowwiseQuantized`` row: ``dim`` bytes, then its scale and bias as
little-endian float32, ``[rows, dim + 8]`` (what FBGEMM's ``split_embedding_weights``
returns for an INT8 TBE). A value reads as ``scale * q + bias``. Lookups run through the
quantized Pallas kernel, which dequantizes every row it reads (the XLA reference off the
GPU). The state keeps the bytes viewed as ``float8_e4m3fn`` (:data:`CONTAINER`, one byte
an element, never read as floats): ``jax.grad`` differentiates float leaves only, and the
fused backward hands the updated rows out as the table's cotangent. :func:`as_bytes` and
:func:`as_container` convert, for free.

**Training** an INT8 table updates the rows the batch touched, in float32: each touched row
is dequantized, the sparse optimizer is applied to it exactly as to a float32 row (same
gradient, same optimizer state, kept in float32), and the row is quantized again. A step
therefore equals a float32 step on the dequantized table followed by a quantization of the
touched rows; its only extra error is that one requantization, at most half the row's new
scale per element (``scale = (max - min) / 255``), plus float32 rounding. Untouched rows keep
their bytes; a row the non-finite guard skips keeps its bytes too.

**Outputs** (``output_dtype=SparseType.INT8``): the float32 pooled output, each row
``[total_D]`` quantized the same way to ``[B, total_D + 8]`` bytes (the layout of FBGEMM's
quantized communication); :func:`dequantize_output` reads it back. Bytes carry no gradient:
train with a float output.

>>> import jax.numpy as jnp
>>> rows = jnp.array([[0.0, 1.0, 2.0, 3.0]])
>>> q = quantize_table(rows)
>>> q.dtype, as_bytes(q).shape
(dtype(float8_e4m3fn), (1, 12))
>>> dequantize_table(q, 4).tolist()
[[0.0, 1.0, 2.0, 3.0]]
>>> out = quantize_output(jnp.array([[0.5, -1.0, 2.0]]))
>>> out.dtype, out.shape, dequantize_output(out).round(1).tolist()   # steps of 3 / 255
(dtype('uint8'), (1, 11), [[0.5, -1.0, 2.0]])
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxrec_kernels.quantized_lookup import (
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.rowwise_quantization import dequantize_rows, quantize_8bit_rowwise
from jaxrec_kernels.sparse_update import (
    fused_update_from_row_gradients,
    skips_nonfinite,
    sparse_row_gradients,
)

from jaxrec.ops.backend import BoundsCheckMode
from jaxrec.ops.bags import checked_offsets
from jaxrec.ops.lookup import _zero_after, _zero_after_all
from jaxrec.ops.nonfinite import report_nonfinite_rows
from jaxrec.ops.spec import GroupSpec, LookupSpec
from jaxrec.optim.fused import FusedTableParams, init_fused_table, lookup_cotangent
from jaxrec.optim.sparse_optimizers import SparseOptimizer

__all__ = [
    "CONTAINER",
    "QPARAM_BYTES",
    "as_bytes",
    "as_container",
    "dequantize_output",
    "dequantize_table",
    "init_int8_group",
    "int8_lookup",
    "int8_row_update",
    "quantize_output",
    "quantize_table",
]

#: The one-byte float type that holds an INT8 table's bytes in the state.
CONTAINER = np.dtype(jnp.float8_e4m3fn)
#: Bytes of a row's scale and bias (FBGEMM's ``INT8_EMB_ROW_DIM_OFFSET``).
QPARAM_BYTES = 8


def as_bytes(table: jax.Array) -> jax.Array:
    """An INT8 table's rows as FBGEMM's ``uint8`` bytes (a bitcast)."""
    return jax.lax.bitcast_convert_type(table, jnp.uint8)


def as_container(rows: jax.Array) -> jax.Array:
    """``uint8`` rows as the :data:`CONTAINER` the state holds (a bitcast)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(rows, jnp.uint8), CONTAINER)


def quantize_table(x: jax.Array) -> jax.Array:
    """``[R, D]`` floats -> ``[R, D + 8]`` quantized rows in the state's container."""
    return as_container(quantize_8bit_rowwise(jnp.asarray(x, jnp.float32)))


def dequantize_table(table: jax.Array, dim: int, dtype: Any = jnp.float32) -> jax.Array:
    """``[R, D + 8]`` quantized rows (container or ``uint8``) -> ``[R, dim]`` floats."""
    raw = table if jnp.dtype(table.dtype) == jnp.uint8 else as_bytes(table)
    return dequantize_rows(raw, "int8", dim, dtype)


def quantize_output(out: jax.Array) -> jax.Array:
    """Pooled ``[B, C]`` floats -> ``[B, C + 8]`` uint8, each row with its own scale and bias
    (FBGEMM's ``FloatToFused8BitRowwiseQuantized``)."""
    return quantize_8bit_rowwise(jnp.asarray(out, jnp.float32))


def dequantize_output(q: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``[B, C + 8]`` uint8 from :func:`quantize_output` -> ``[B, C]``; each value is within
    half its row's scale ``(max - min) / 255`` of the float output."""
    q = jnp.asarray(q)
    if q.ndim != 2 or jnp.dtype(q.dtype) != jnp.uint8 or q.shape[1] <= QPARAM_BYTES:
        raise ValueError(
            f"an INT8 output is [B, C + {QPARAM_BYTES}] uint8, got {q.shape} {q.dtype}"
        )
    return dequantize_rows(q, "int8", q.shape[1] - QPARAM_BYTES, dtype)


def init_int8_group(table: jax.Array, optimizer: SparseOptimizer, dim: int) -> FusedTableParams:
    """A group of INT8 rows (container) with zero float32 optimizer state of ``dim`` columns."""
    rows = int(table.shape[0])
    base = init_fused_table(jnp.zeros((0, dim), jnp.float32), optimizer)
    return dataclasses.replace(base, weight=table, state=optimizer.init(rows, dim))


@functools.partial(jax.jit, static_argnames=("dim", "optimizer"))
def int8_row_update(
    table: jax.Array,
    state: dict[str, jax.Array],
    step: jax.Array,
    rows: jax.Array,
    grads: jax.Array,
    *,
    dim: int,
    optimizer: SparseOptimizer,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """One fused step on the touched rows of an INT8 table: ``(table, state, nonfinite)``.

    ``rows [M]`` are unique touched rows (sentinel ``R`` in unused slots) and ``grads [M, D]``
    their summed gradients (:func:`jaxrec_kernels.sparse_row_gradients`). The rows are
    dequantized, updated in float32 by ``optimizer`` with their float32 state, requantized
    and written back; a row whose gradient is not finite (under the guard) keeps its bytes.
    """
    num_rows, m = table.shape[0], rows.shape[0]
    raw = as_bytes(table)
    live = rows < num_rows
    local = jnp.where(live, jnp.arange(m, dtype=rows.dtype), m)
    floats = dequantize_rows(jnp.take(raw, rows, axis=0, mode="fill", fill_value=0), "int8", dim)
    gathered = {k: jnp.take(v, rows, axis=0, mode="fill", fill_value=0) for k, v in state.items()}
    new_w, new_s, nonfinite = fused_update_from_row_gradients(
        floats, gathered, step, local, grads, dim=dim, optimizer=optimizer, return_nonfinite=True
    )
    if skips_nonfinite(optimizer):
        kept = ~jnp.all(jnp.isfinite(grads), axis=-1)
        rows = jnp.where(kept, num_rows, rows)
    raw = raw.at[rows].set(quantize_8bit_rowwise(new_w), mode="drop")
    state = {k: v.at[rows].set(new_s[k].astype(v.dtype), mode="drop") for k, v in state.items()}
    return as_container(raw), state, nonfinite


# ----------------------------------------------------------------------------- the lookup


def _group_forward(spec: LookupSpec, group: GroupSpec, table, ids, offsets, weights, out):
    kwargs = dict(
        dim=group.dim,
        weight_type="int8",
        batch_size=spec.batch_size,
        num_columns=spec.num_columns,
        pooling=group.pooling,
        bounds_check=spec.bounds_check,
        out=out,
        out_dtype=spec.out_dtype or jnp.float32,
    )
    if spec.backend == "pallas":
        return quantized_pooled_lookup(
            as_bytes(table), ids, offsets, weights, group.features,
            interpret=spec.interpret, **kwargs,
        )  # fmt: skip
    return quantized_pooled_lookup_reference(
        as_bytes(table), ids, offsets, weights, group.features, **kwargs
    )


def _forward(spec: LookupSpec, params: tuple, ids, offsets, weights):
    out, bad = None, jnp.zeros((), jnp.int32)
    for group, param in zip(spec.groups, params, strict=True):
        out, count = _group_forward(spec, group, param.weight, ids, offsets, weights, out)
        bad = bad + count
    return out, bad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(spec: LookupSpec, params: tuple, ids, offsets, weights):
    return _forward(spec, params, ids, offsets, weights)


def _lookup_fwd(spec: LookupSpec, params: tuple, ids, offsets, weights):
    result = _forward(spec, params, ids, offsets, weights)
    # Every backward write of a table depends on every forward read (see jaxrec.ops.lookup).
    ids = ids + _zero_after(result).astype(ids.dtype)
    return result, (params, ids, offsets, weights)


def _weights_cotangent(spec: LookupSpec, params: tuple, ids, offsets, weights, grad_out):
    """``<dequantized row, bag cotangent>`` per position (XLA), every group summed."""

    def pooled(w):
        out = None
        for group, param in zip(spec.groups, params, strict=True):
            out, _ = quantized_pooled_lookup_reference(
                as_bytes(param.weight), ids, offsets, w, group.features,
                dim=group.dim, weight_type="int8", batch_size=spec.batch_size,
                num_columns=spec.num_columns, pooling=group.pooling, bounds_check="ignore",
                out=out, out_dtype=jnp.float32,
            )  # fmt: skip
        return out

    _, vjp = jax.vjp(pooled, weights.astype(jnp.float32))
    return vjp(grad_out.astype(jnp.float32))[0].astype(weights.dtype)


def _lookup_bwd(spec: LookupSpec, residuals, cotangents):
    params, ids, offsets, weights = residuals
    grad_out, _ = cotangents
    weights_grad = None
    if weights is not None:
        weights_grad = _weights_cotangent(spec, params, ids, offsets, weights, grad_out)
        # Read the tables for the weights' gradient before the updates overwrite them: the
        # updates' ids depend on all of it (a barrier is dropped by the CPU compiler).
        ids = ids + _zero_after_all(weights_grad).astype(ids.dtype)
    grads = []
    for group, param in zip(spec.groups, params, strict=True):
        rows, row_grads = sparse_row_gradients(
            grad_out, ids, offsets, weights, group.features, batch_size=spec.batch_size,
            dim=group.dim, num_rows=group.num_rows, pooling=group.pooling,
        )  # fmt: skip
        step = param.step + 1
        table, state, nonfinite = int8_row_update(
            param.weight, param.state, step, rows, row_grads,
            dim=group.dim, optimizer=group.optimizer,
        )  # fmt: skip
        counted = None
        if skips_nonfinite(group.optimizer):
            counted = report_nonfinite_rows(
                spec.bounds_check, nonfinite, f"{group.pooling}_int8_d{group.dim}"
            )
        grads.append(lookup_cotangent(param, table, state, step, counted))
    return tuple(grads), None, None, weights_grad


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def int8_lookup(
    spec: LookupSpec, params: tuple, ids: jax.Array, offsets: jax.Array, weights: Any
) -> tuple[jax.Array, jax.Array]:
    """The pooled lookup of INT8 groups: ``(out [B, C] float, bad_count)``.

    ``params``: one :class:`~jaxrec.optim.FusedTableParams` per group of ``spec`` (weight
    ``[rows, dim + 8]`` in :data:`CONTAINER`, float32 optimizer state). The contract is
    :func:`jaxrec.ops.lookup`'s (bounds modes, bad bags, per-sample weights); the backward
    applies each group's optimizer to the touched rows as :func:`int8_row_update` does.
    """
    if not spec.pooled:
        raise ValueError("INT8 tables are looked up pooled (SUM or MEAN), not PoolingMode.NONE")
    for group, param in zip(spec.groups, params, strict=True):
        if not isinstance(param, FusedTableParams) or group.optimizer is None:
            raise ValueError("an INT8 group is FusedTableParams trained by a fused optimizer")
        shape = (group.num_rows, group.dim + QPARAM_BYTES)
        if tuple(param.weight.shape) != shape or jnp.dtype(param.weight.dtype) != CONTAINER:
            raise ValueError(
                f"an INT8 group of dim {group.dim} holds {shape} {CONTAINER.name} rows, got "
                f"{tuple(param.weight.shape)} {param.weight.dtype}"
            )
    offsets, bad_bags = checked_offsets(offsets, ids.shape[0])
    out, bad = _lookup(spec, tuple(params), ids, offsets, weights)
    if spec.bounds_check == BoundsCheckMode.FATAL.value:
        checkify.check(
            bad + bad_bags == 0,
            "{count} ids outside their tables or bad bags (bounds_check_mode=FATAL)",
            count=bad + bad_bags,
        )
    if spec.bounds_check in (BoundsCheckMode.FATAL.value, BoundsCheckMode.WARNING.value):
        bad = bad + bad_bags
    return out, bad
