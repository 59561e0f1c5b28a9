"""Gradient of a pooled lookup with respect to its per-sample weights: Pallas kernel + XLA
reference.

Layout (the same as :mod:`~jaxrec_kernels.pooled_lookup`): ``weights [R, D]`` (one stacked
group), ``ids [N_cap] int32`` (feature-major KJT values, only ``ids[offsets[0]:offsets[-1]]``
are real), ``offsets [F*B+1] int32``, ``grad_out [B, C]`` (the cotangent of the pooled output)
and static ``features``, one ``(kjt_feature_index, row_offset, num_rows, col_offset)`` per
group feature. The forward computes
``out[b, col:col+D] = sum_i psw_i * weights[row_offset + ids[i]]`` (divided by the bag length
under MEAN), so the gradient of per-sample weight ``i`` of bag ``(f, b)`` is

``dpsw_i = <weights[row_offset + ids[i]], grad_out[b, col_offset:col_offset+D]>``
(``/ len(bag)`` under MEAN),

summed over every group feature that lists KJT feature ``f`` (a feature read by several
tables). It is 0 for padding positions, for positions of KJT features outside the group and
for ids outside ``[0, num_rows)`` (``-1`` included: those read a zero row in the forward).
Dot products are accumulated in fp32 whatever the table and cotangent dtypes. (Under
``bounds_check="none"`` the forward reads some row for a bad id; its weight still gets 0.)

The kernel runs one program per block of ``block_ids`` id positions: it gathers the block's
rows and the matching ``grad_out`` slices ``[block_ids, D]`` and reduces them along ``D``.
With ``out`` given the result is added to it in place (several groups accumulate into one
buffer without a copy).

>>> import jax.numpy as jnp
>>> w = jnp.arange(12.0).reshape(6, 2)             # two tables of 3 rows, D=2
>>> ids = jnp.array([0, 2, 1, 9, 0], jnp.int32)      # f0: [0, 2], []; f1: [1, 9], []; padding
>>> offs = jnp.array([0, 2, 2, 4, 4], jnp.int32)
>>> g = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
>>> feats = ((0, 0, 3, 0), (1, 3, 3, 2))                 # 9 is outside f1's table: no gradient
>>> weight_gradient_reference(w, ids, offs, g, feats, batch_size=2, pooling="sum").tolist()
[0.0, 4.0, 9.0, 0.0, 0.0]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._pallas_compat import (
    check_launch_shape,
    compiler_params,
    float_dtype,
    masked_load,
    masked_store,
    next_power_of_2,
)
from .entry import Implementation, check_implementation, xla_reference
from .layout import (
    FeatureLayout,
    check_columns,
    feature_layouts,
    feature_rounds,
    lookup_rows,
    position_bags,
    validate_group,
)
from .pooled_lookup import POOLING_MODES

__all__ = [
    "WeightGradientConfig",
    "default_weight_gradient_config",
    "weight_gradient",
    "weight_gradient_reference",
]


@dataclass(frozen=True)
class WeightGradientConfig:
    """Launch shape of the weight-gradient kernel: ``block_ids`` id positions per program
    (a power of two), ``num_warps`` / ``num_stages`` as in Triton.

    >>> WeightGradientConfig(block_ids=32).num_warps
    4
    """

    block_ids: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_launch_shape(self, ("block_ids", "num_warps"), ("num_stages",))


def default_weight_gradient_config(dim: int) -> WeightGradientConfig:
    """About 4096 gathered row elements per program (two ``[block_ids, D]`` tiles in flight).

    >>> default_weight_gradient_config(128).block_ids, default_weight_gradient_config(4).block_ids
    (32, 256)
    """
    return WeightGradientConfig(block_ids=max(1, min(256, 4096 // next_power_of_2(dim))))


def _static_arguments(weights, ids, offsets, grad_out, features, batch_size, pooling, out):
    """Check the entry point's arguments; returns the static arguments of the
    jitted implementations (``features`` as :class:`FeatureLayout` values)."""
    validate_group(weights, ids, offsets, None, features, batch_size, "warning")
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    if grad_out.ndim != 2 or grad_out.shape[0] != batch_size:
        raise ValueError(
            f"grad_out must be [batch_size={batch_size}, num_columns], got {grad_out.shape}"
        )
    float_dtype(grad_out.dtype)
    num_columns = grad_out.shape[1]
    check_columns(features, weights.shape[1], num_columns, f"the {num_columns} columns of grad_out")
    if out is not None and (out.shape != ids.shape or out.dtype != jnp.float32):
        raise ValueError(
            f"out must be float32 with shape {ids.shape}, got {out.dtype} {tuple(out.shape)}"
        )
    return {"features": feature_layouts(features), "batch_size": batch_size, "pooling": pooling}


def _round_tables(features: tuple[FeatureLayout, ...], num_kjt: int) -> np.ndarray:
    """``[rounds, num_kjt, 4]`` int32: per round, per KJT feature, (listed, row_offset,
    num_rows, col_offset); a round lists every KJT feature at most once."""
    features = feature_layouts(features)
    rounds = feature_rounds(features)
    table = np.zeros((len(rounds), num_kjt, 4), np.int32)
    for r, group_idx in enumerate(rounds):
        for g in group_idx:
            feat = features[g]
            table[r, feat.kjt_index] = (1, feat.row_offset, feat.num_rows, feat.col_offset)
    return table


# --------------------------------------------------------------------------- Pallas kernel


def _weight_gradient_kernel(
    meta_ref,
    offsets_ref,
    bags_ref,
    ids_ref,
    weights_ref,
    grad_ref,
    *refs,
    batch_size,
    num_kjt,
    num_rounds,
    num_ids,
    dim,
    pooling,
    aliased,
    config,
):
    if aliased:
        acc_in_ref, out_ref = refs
    else:
        (out_ref,) = refs
    block = config.block_ids
    dim_pad = next_power_of_2(dim)
    pos = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    in_buffer = pos < num_ids
    live = in_buffer & (pos >= offsets_ref[0]) & (pos < offsets_ref[num_kjt * batch_size])
    bag = masked_load(bags_ref.at[pos], live, 0)
    idx = masked_load(ids_ref.at[pos], live, -1)
    kjt = bag // batch_size
    b = bag - kjt * batch_size
    scale = jnp.ones((block,), jnp.float32)
    if pooling == "mean":
        length = masked_load(offsets_ref.at[bag + 1], live, 1) - masked_load(
            offsets_ref.at[bag], live, 0
        )
        scale = 1.0 / jnp.maximum(length, 1).astype(jnp.float32)
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    col_ok = cols < dim
    acc = jnp.zeros((block,), jnp.float32)
    for r in range(num_rounds):
        entry = (r * num_kjt + kjt) * 4
        listed = masked_load(meta_ref.at[entry], live, 0) > 0
        row_offset = masked_load(meta_ref.at[entry + 1], listed, 0)
        num_rows = masked_load(meta_ref.at[entry + 2], listed, 0)
        col = masked_load(meta_ref.at[entry + 3], listed, 0)
        valid = listed & (idx >= 0) & (idx < num_rows)
        mask = valid[:, None] & col_ok[None, :]
        row = jnp.where(valid, row_offset + idx, 0)
        vals = masked_load(weights_ref.at[row[:, None], cols[None, :]], mask, 0)
        grads = masked_load(grad_ref.at[b[:, None], (col[:, None] + cols[None, :])], mask, 0)
        acc = acc + jnp.sum(vals.astype(jnp.float32) * grads.astype(jnp.float32), axis=1)
    acc = acc * scale
    if aliased:
        acc = acc + masked_load(acc_in_ref.at[pos], in_buffer, 0.0)
    masked_store(out_ref.at[pos], acc, in_buffer)


@functools.partial(
    jax.jit, static_argnames=("features", "batch_size", "pooling", "interpret", "config")
)
def _weight_gradient_pallas(
    weights, ids, offsets, grad_out, out, *, features, batch_size, pooling, interpret, config
):
    num_ids = ids.shape[0]
    num_kjt = (offsets.shape[0] - 1) // batch_size
    meta = _round_tables(features, num_kjt)
    bags, _ = position_bags(offsets, num_ids)
    aliased = out is not None
    inputs = [jnp.asarray(meta.reshape(-1)), offsets, bags, ids, weights, grad_out]
    if aliased:
        inputs.append(out)
    kernel = functools.partial(
        _weight_gradient_kernel,
        batch_size=batch_size,
        num_kjt=num_kjt,
        num_rounds=meta.shape[0],
        num_ids=num_ids,
        dim=weights.shape[1],
        pooling=pooling,
        aliased=aliased,
        config=config,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_ids, config.block_ids),),
        out_shape=jax.ShapeDtypeStruct((num_ids,), jnp.float32),
        input_output_aliases={len(inputs) - 1: 0} if aliased else {},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="jaxrec_weight_gradient",
    )(*inputs)


# --------------------------------------------------------------------------- XLA reference


@functools.partial(jax.jit, static_argnames=("features", "batch_size", "pooling"))
def _weight_gradient_xla(weights, ids, offsets, grad_out, out, *, features, batch_size, pooling):
    features = feature_layouts(features)
    dim = weights.shape[1]
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, ids.shape[0])
    total = jnp.zeros(ids.shape, jnp.float32) if out is None else out
    lengths = offsets[bags + 1] - offsets[bags]
    for group_idx in feature_rounds(features):
        rows, valid, _, slot, b = lookup_rows(
            ids, bags, live, features, group_idx, batch_size, num_kjt, checked=True
        )
        col = jnp.asarray([features[g].col_offset for g in group_idx] + [0], jnp.int32)[slot]
        vals = jnp.take(weights, rows, axis=0).astype(jnp.float32)
        grads = grad_out[b[:, None], col[:, None] + jnp.arange(dim)].astype(jnp.float32)
        dots = jnp.where(valid, jnp.sum(vals * grads, axis=1), 0.0)
        if pooling == "mean":
            dots = dots / jnp.maximum(lengths, 1).astype(jnp.float32)
        total = total + dots
    return total


# --------------------------------------------------------------------------- entry point


def weight_gradient(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    grad_out: jax.Array,
    features: tuple[FeatureLayout, ...],
    *,
    batch_size: int,
    pooling: str = "sum",
    out: jax.Array | None = None,
    implementation: Implementation = "pallas",
    interpret: bool = False,
    config: WeightGradientConfig | None = None,
) -> jax.Array:
    """``[N_cap] float32``: the gradient of one group's pooled lookup w.r.t. its per-sample
    weights (module docstring), plus ``out`` when given.

    ``implementation="pallas"`` runs the Triton kernel (``out`` is added in place when
    donated; ``interpret=True`` runs it on the CPU; ``config``:
    :func:`default_weight_gradient_config` when None); ``"xla"``
    (:data:`weight_gradient_reference`) gathers and takes a row-wise dot: the backend for
    CPU/TPU and the kernel's oracle.

    >>> import jax.numpy as jnp
    >>> w = jnp.ones((4, 2))
    >>> ids = jnp.array([1, 3, -1, 0], jnp.int32)        # -1 reads no row; the last is padding
    >>> offs = jnp.array([0, 2, 3], jnp.int32)
    >>> g = jnp.array([[1.0, 2.0], [5.0, 5.0]])
    >>> weight_gradient(w, ids, offs, g, ((0, 0, 4, 0),), batch_size=2, pooling="mean",
    ...                 interpret=True).tolist()
    [1.5, 1.5, 0.0, 0.0]
    """
    check_implementation(implementation, interpret, config)
    static = _static_arguments(weights, ids, offsets, grad_out, features, batch_size, pooling, out)
    if implementation == "xla":
        return _weight_gradient_xla(weights, ids, offsets, grad_out, out, **static)
    if config is None:
        config = default_weight_gradient_config(weights.shape[1])
    return _weight_gradient_pallas(
        weights, ids, offsets, grad_out, out, interpret=interpret, config=config, **static
    )


weight_gradient_reference = xla_reference(weight_gradient)
