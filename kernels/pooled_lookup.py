"""Pooled embedding lookup over one stacked table group: Pallas GPU kernel + XLA reference.

Layout (FBGEMM's table-batched embedding, TorchRec's KJT):

- ``weights [R, D]``: several tables stacked by rows (fp32, fp16 or bf16).
- ``ids [N_cap] int32``: feature-major KJT values; only ``ids[:offsets[-1]]`` is real, the
  rest is padding that is never read.
- ``offsets [F*B+1] int32``: bag ``b`` of KJT feature ``f`` is
  ``ids[offsets[f*B+b] : offsets[f*B+b+1]]``.
- ``features``: one static ``(kjt_feature_index, row_offset, num_rows, col_offset)`` per group
  feature. Its table is rows ``[row_offset, row_offset+num_rows)`` of ``weights``; a valid id
  is ``0 <= id < num_rows``; its pooled bags land in columns ``[col_offset, col_offset+D)`` of
  ``out [B, num_columns]``.

``out[b, col_offset:col_offset+D] = sum_i w_i * weights[row_offset + ids[i]]`` over the bag,
accumulated in fp32 (``w_i`` = per-sample weight, or 1). MEAN divides by the bag length
(number of ids; a 16-bit output rounds the sum first, see :func:`mean_of_sums`); an empty
bag gives zeros. Bounds (as FBGEMM's ``bounds_check_mode``): an id
outside its table contributes a zero row under "fatal", "warning" and "ignore"; the second
result counts such ids under "fatal" and "warning" and is 0 otherwise. "none" does not check
an id against its table: it reads stacked row ``clip(row_offset + id, 0, R - 1)``, which for
a bad id is a row of another table of the group or the buffer's first or last row (never
memory outside ``weights``); nothing is counted. Positions outside ``[0, N_cap)`` are never
read, whatever the offsets say (a bag reaching past them reads only its positions inside);
``jaxrec.ops.bags.checked_offsets`` empties such bags before any kernel runs.

The kernel runs one program per (group feature, block of ``block_bags`` bags). Each step of
its loop gathers ``[block_bags, block_len, D]`` rows at once (the next ``block_len`` ids of
every bag in the block), so many independent row loads are in flight; lanes past a bag's end
or past ``D`` (padded to a power of two) are masked off and read nothing. The default, the
fastest measured, is one bag per program and 16 or 32 ids per step, or for many bags of
512-byte rows the "segmented" strategy (see :func:`default_pooled_config`).

>>> import jax.numpy as jnp
>>> w = jnp.arange(12.0).reshape(6, 2)            # two tables of 3 rows, D=2
>>> ids = jnp.array([0, 2, 1, 2, 0], jnp.int32)    # feature 0: [0, 2], [] ; feature 1: [1, 2], [0]
>>> offs = jnp.array([0, 2, 2, 4, 5], jnp.int32)
>>> feats = ((0, 0, 3, 0), (1, 3, 3, 2))
>>> out, bad = pooled_lookup_reference(w, ids, offs, None, feats, batch_size=2, num_columns=4)
>>> out.tolist(), int(bad)
([[4.0, 6.0, 18.0, 20.0], [0.0, 0.0, 6.0, 7.0]], 0)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._pallas_compat import (
    compiler_params,
    float_dtype,
    masked_load,
    masked_store,
    next_power_of_2,
)

Feature = tuple[int, int, int, int]
BOUNDS_CHECK_MODES = ("fatal", "warning", "ignore", "none")
POOLING_MODES = ("sum", "mean")


@dataclass(frozen=True)
class PooledConfig:
    """Launch shape of the pooled kernel.

    ``block_bags`` bags per program (power of two). ``strategy`` "bags": each loop step
    gathers the next ``block_len`` ids of every bag, ``[block_bags, block_len, D]`` rows
    (lanes past a bag's end are masked off). ``strategy`` "segmented": each step gathers the
    next ``block_len`` ids of the block's contiguous id range, ``[block_len, D]`` rows, and
    adds them to their bags with a one-hot fp32 product (no masked-off lanes however uneven
    the bags; needs ``block_bags``, ``block_len`` and the padded D to be >= 16).
    ``num_warps`` and ``num_stages`` as in Triton. ``eviction_policy`` ("evict_first",
    "evict_last"), Triton's L2 hint, applies to the row gathers only (rows are mostly read
    once). BENCHMARKS.md has the measurements.
    """

    block_bags: int = 1
    block_len: int = 16
    num_warps: int = 2
    num_stages: int = 2
    strategy: str = "bags"
    eviction_policy: str | None = None

    def __post_init__(self):
        for name in ("block_bags", "block_len", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"PooledConfig.{name} must be a power of two, got {v}")
        if self.num_stages < 1:
            raise ValueError(f"PooledConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.strategy not in ("bags", "segmented"):
            raise ValueError(f"PooledConfig.strategy must be bags|segmented, got {self.strategy!r}")
        if self.strategy == "segmented" and min(self.block_bags, self.block_len) < 16:
            raise ValueError(
                f"segmented strategy needs block_bags, block_len >= 16, got {self.block_bags}, "
                f"{self.block_len}"
            )
        if self.eviction_policy not in (None, "evict_first", "evict_last"):
            raise ValueError(
                f"PooledConfig.eviction_policy must be None|evict_first|evict_last, got "
                f"{self.eviction_policy!r}"
            )


SEGMENTED_MIN_BAGS = 1 << 17


EVICT_FIRST_MAX_OUT_BYTES = 16 << 20


def default_pooled_config(
    dim: int,
    dtype,
    num_bags: int | None = None,
    weighted: bool = False,
    out_bytes: int | None = None,
) -> PooledConfig:
    """The launch shape used when none is given: the fastest measured on an H100.

    By the padded row width in bytes: rows of at most 256 B take one warp and 16 ids per step
    (rows of at most 64 B also marked evict-first); unweighted fp32 rows of 512 B (D in
    (64, 128]) take the segmented strategy (16 bags x 32 ids, 4 warps) when there are at
    least ``SEGMENTED_MIN_BAGS`` bags (``num_bags`` = features x batch), else one bag with 32
    ids and 4 warps, its rows marked evict-first when the output (``out_bytes``) fits in
    ``EVICT_FIRST_MAX_OUT_BYTES`` (rows are read once; the output and ids then stay in L2);
    wider fp32 rows take 8 ids and 2 warps; the rest 16 ids and 2 warps (BENCHMARKS.md,
    "tuning").

    >>> cfg = default_pooled_config(128, "float32")
    >>> cfg.block_bags, cfg.block_len, cfg.num_warps, cfg.strategy, cfg.eviction_policy
    (1, 32, 4, 'bags', None)
    >>> default_pooled_config(128, "float32", out_bytes=512 * 4096 * 4).eviction_policy
    'evict_first'
    >>> default_pooled_config(128, "float32", num_bags=32 * 8192).strategy
    'segmented'
    >>> default_pooled_config(128, "float32", num_bags=32 * 8192, weighted=True).strategy
    'bags'
    >>> default_pooled_config(128, "bfloat16").num_warps
    1
    """
    dim_pad = next_power_of_2(dim)
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = dim_pad * itemsize
    if row_bytes <= 256:
        policy = "evict_first" if row_bytes <= 64 else None
        return PooledConfig(block_bags=1, block_len=16, num_warps=1, eviction_policy=policy)
    if itemsize == 4 and dim_pad == 128:
        if not weighted and num_bags is not None and num_bags >= SEGMENTED_MIN_BAGS:
            return PooledConfig(block_bags=16, block_len=32, num_warps=4, strategy="segmented")
        small_out = out_bytes is not None and out_bytes <= EVICT_FIRST_MAX_OUT_BYTES
        policy = "evict_first" if small_out else None
        return PooledConfig(block_bags=1, block_len=32, num_warps=4, eviction_policy=policy)
    if itemsize == 4 and dim_pad > 128:
        return PooledConfig(block_bags=1, block_len=8, num_warps=2)
    return PooledConfig()


def validate_group(weights, ids, offsets, per_sample_weights, features, batch_size, bounds_check):
    """Check the static layout of one group lookup; returns the number of KJT features.

    Raises ValueError naming the offending argument and value.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be 2-D [rows, dim], got shape {weights.shape}")
    float_dtype(weights.dtype)
    if ids.ndim != 1 or jnp.dtype(ids.dtype) != jnp.int32:
        raise ValueError(f"ids must be 1-D int32, got shape {ids.shape} dtype {ids.dtype}")
    if offsets.ndim != 1 or jnp.dtype(offsets.dtype) != jnp.int32:
        raise ValueError(
            f"offsets must be 1-D int32, got shape {offsets.shape} dtype {offsets.dtype}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if (offsets.shape[0] - 1) % batch_size or offsets.shape[0] < 1:
        raise ValueError(
            f"offsets must have F*batch_size+1 entries; got {offsets.shape[0]} "
            f"with batch_size={batch_size}"
        )
    if per_sample_weights is not None and (
        per_sample_weights.shape != ids.shape
        or not jnp.issubdtype(per_sample_weights.dtype, jnp.floating)
    ):
        raise ValueError(
            f"per_sample_weights must be floating with shape {ids.shape}, got shape "
            f"{per_sample_weights.shape} dtype {per_sample_weights.dtype}"
        )
    if bounds_check not in BOUNDS_CHECK_MODES:
        raise ValueError(f"bounds_check must be one of {BOUNDS_CHECK_MODES}, got {bounds_check!r}")
    num_kjt = (offsets.shape[0] - 1) // batch_size
    if not isinstance(features, tuple) or not features:
        raise ValueError(f"features must be a non-empty tuple, got {features!r}")
    rows = weights.shape[0]
    for feat in features:
        if not (
            isinstance(feat, tuple) and len(feat) == 4 and all(isinstance(v, int) for v in feat)
        ):
            raise ValueError(
                f"each feature must be (kjt_feature_index, row_offset, num_rows, col_offset) "
                f"ints, got {feat!r}"
            )
        kjt, row_offset, num_rows, col_offset = feat
        if not 0 <= kjt < num_kjt:
            raise ValueError(f"feature {feat}: kjt_feature_index {kjt} not in [0, {num_kjt})")
        if row_offset < 0 or num_rows < 1 or row_offset + num_rows > rows:
            raise ValueError(
                f"feature {feat}: rows [{row_offset}, {row_offset + num_rows}) not inside the "
                f"{rows} rows of weights"
            )
        if col_offset < 0:
            raise ValueError(f"feature {feat}: col_offset {col_offset} is negative")
    return num_kjt


def _check_pooled_args(weights, features, num_columns, pooling, out, out_dtype, batch_size):
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    if not isinstance(num_columns, int) or num_columns < 1:
        raise ValueError(f"num_columns must be a positive int, got {num_columns!r}")
    dim = weights.shape[1]
    for feat in features:
        if feat[3] + dim > num_columns:
            raise ValueError(
                f"feature {feat}: columns [{feat[3]}, {feat[3] + dim}) exceed "
                f"num_columns={num_columns}"
            )
    if out is not None:
        if out.shape != (batch_size, num_columns):
            raise ValueError(
                f"out must have shape {(batch_size, num_columns)}, got {tuple(out.shape)}"
            )
        if out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(out.dtype):
            raise ValueError(f"out_dtype {jnp.dtype(out_dtype)} differs from out.dtype {out.dtype}")
        return float_dtype(out.dtype)
    return float_dtype(weights.dtype if out_dtype is None else out_dtype)


def covered_columns(features, dim: int, num_columns: int) -> np.ndarray:
    """``[num_columns]`` bool: which output columns the features' ranges cover."""
    covered = np.zeros(num_columns, bool)
    for feat in features:
        covered[feat[3] : feat[3] + dim] = True
    return covered


def covers_all_columns(features, dim: int, num_columns: int) -> bool:
    """Whether the features' column ranges together cover every output column."""
    return bool(covered_columns(features, dim, num_columns).all())


# --------------------------------------------------------------------------- Pallas kernel


def _gather_rows(
    ids_ref,
    weights_ref,
    psw_ref,
    pos,
    active,
    row_offset,
    num_rows,
    cols,
    col_ok,
    *,
    checked,
    counted,
    config,
):
    """Rows ``weights[row_offset + ids[pos]]`` as fp32 (zero where inactive or invalid),
    times the per-sample weight when ``psw_ref`` is given, and the number of bad ids."""
    idx = masked_load(ids_ref.at[pos], active, 0)
    bad = jnp.int32(0)
    if checked:
        valid = active & (idx >= 0) & (idx < num_rows)
        if counted:
            bad = jnp.sum(active & ~valid, dtype=jnp.int32)
        idx = jnp.where(valid, idx, 0)
        rows = row_offset + idx
    else:
        valid = active
        # "none": the id is not checked against its table, but the row stays in the buffer.
        rows = jnp.clip(row_offset + idx, 0, weights_ref.shape[0] - 1)
    rows = jnp.expand_dims(rows, -1)
    leading_axes = tuple(range(valid.ndim))
    vals = masked_load(
        weights_ref.at[rows, jnp.expand_dims(cols, leading_axes)],
        jnp.expand_dims(valid, -1) & jnp.expand_dims(col_ok, leading_axes),
        0,
        eviction_policy=config.eviction_policy,
    ).astype(jnp.float32)
    if psw_ref is not None:
        psw = masked_load(psw_ref.at[pos], valid, 0).astype(jnp.float32)
        vals = vals * jnp.expand_dims(psw, -1)
    return vals, bad


def _pooled_kernel(
    meta_ref,
    offsets_ref,
    ids_ref,
    weights_ref,
    *refs,
    batch_size,
    num_ids,
    dim,
    pooling,
    checked,
    counted,
    weighted,
    aliased,
    config,
):
    refs = list(refs)
    psw_ref = refs.pop(0) if weighted else None
    if aliased:
        refs.pop(0)  # the aliased input buffer: same memory as out_ref
    out_ref, count_ref = refs
    block_bags, block_len = config.block_bags, config.block_len
    dim_pad = next_power_of_2(dim)

    g = pl.program_id(0)
    blk = pl.program_id(1)
    kjt = meta_ref[g, 0]
    row_offset = meta_ref[g, 1]
    num_rows = meta_ref[g, 2]
    col_offset = meta_ref[g, 3]

    b = blk * block_bags + jnp.arange(block_bags, dtype=jnp.int32)
    in_batch = b < batch_size
    bag = kjt * batch_size + b
    start = masked_load(offsets_ref.at[bag], in_batch, 0)
    end = masked_load(offsets_ref.at[bag + 1], in_batch, 0)
    length = end - start
    cols = jnp.arange(dim_pad, dtype=jnp.int32)
    col_ok = cols < dim
    gather = functools.partial(
        _gather_rows,
        ids_ref,
        weights_ref,
        psw_ref,
        row_offset=row_offset,
        num_rows=num_rows,
        cols=cols,
        col_ok=col_ok,
        checked=checked,
        counted=counted,
        config=config,
    )
    acc0 = jnp.zeros((block_bags, dim_pad), jnp.float32)

    if config.strategy == "bags":
        step_j = jnp.arange(block_len, dtype=jnp.int32)

        def step(s, carry):
            acc, bad = carry
            j = s * block_len + step_j
            pos = start[:, None] + j[None, :]
            active = (j[None, :] < length[:, None]) & (pos >= 0) & (pos < num_ids)
            vals, nbad = gather(pos=pos, active=active)
            return acc + jnp.sum(vals, axis=1), bad + nbad

        num_steps = (jnp.max(length) + (block_len - 1)) // block_len
    else:
        first = jnp.min(jnp.where(in_batch, start, jnp.int32(2**31 - 1)))
        last = jnp.max(jnp.where(in_batch, end, 0))
        step_p = jnp.arange(block_len, dtype=jnp.int32)

        def step(s, carry):
            acc, bad = carry
            pos = first + s * block_len + step_p
            active = (pos < last) & (pos >= 0) & (pos < num_ids)
            vals, nbad = gather(pos=pos, active=active)
            member = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
            acc = acc + jax.lax.dot(
                member.astype(jnp.float32),
                vals,
                precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32,
            )
            return acc, bad + nbad

        num_steps = (jnp.maximum(last - first, 0) + (block_len - 1)) // block_len
    acc, bad = jax.lax.fori_loop(0, num_steps, step, (acc0, jnp.int32(0)))

    if pooling == "mean":
        acc = mean_of_sums(acc, jnp.maximum(length, 1)[:, None], out_ref.dtype)
    masked_store(
        out_ref.at[b[:, None], (col_offset + cols)[None, :]],
        acc.astype(out_ref.dtype),
        in_batch[:, None] & col_ok[None, :],
    )
    count_ref[g, blk] = bad


@functools.partial(
    jax.jit,
    static_argnames=(
        "features",
        "batch_size",
        "num_columns",
        "pooling",
        "bounds_check",
        "out_dtype",
        "interpret",
        "config",
        "fill_uncovered",
    ),
)
def _pooled_pallas(
    weights,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    features,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dtype,
    interpret,
    config,
    fill_uncovered,
):
    dim = weights.shape[1]
    num_blocks = pl.cdiv(batch_size, config.block_bags)
    meta = jnp.asarray(np.asarray(features, np.int32).reshape(len(features), 4))
    weighted = per_sample_weights is not None
    if out is None and fill_uncovered and not covers_all_columns(features, dim, num_columns):
        out = jnp.zeros((batch_size, num_columns), out_dtype)
    aliased = out is not None
    inputs = [meta, offsets, ids, weights]
    if weighted:
        inputs.append(per_sample_weights)
    if aliased:
        inputs.append(out)
    kernel = functools.partial(
        _pooled_kernel,
        batch_size=batch_size,
        num_ids=ids.shape[0],
        dim=dim,
        pooling=pooling,
        checked=bounds_check != "none",
        counted=bounds_check in ("fatal", "warning"),
        weighted=weighted,
        aliased=aliased,
        config=config,
    )
    pooled, counts = pl.pallas_call(
        kernel,
        grid=(len(features), num_blocks),
        out_shape=(
            jax.ShapeDtypeStruct((batch_size, num_columns), out_dtype),
            jax.ShapeDtypeStruct((len(features), num_blocks), jnp.int32),
        ),
        input_output_aliases={len(inputs) - 1: 0} if aliased else {},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="jaxrec_pooled_lookup",
    )(*inputs)
    return pooled, jnp.sum(counts)


def pooled_lookup(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[Feature, ...],
    *,
    batch_size: int,
    num_columns: int,
    pooling: str = "sum",
    bounds_check: str = "warning",
    out: jax.Array | None = None,
    out_dtype=None,
    interpret: bool = False,
    config: PooledConfig | None = None,
    fill_uncovered: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Pooled lookup of one stacked table group with the Pallas (Triton) kernel.

    Returns ``(out [batch_size, num_columns], bad_id_count int32 scalar)``. With ``out`` given,
    only this group's columns are written into it (in place when donated); otherwise columns
    no feature covers are zeros, or, with ``fill_uncovered=False``, left unwritten (undefined)
    for later groups to fill, which saves a zero pass over the whole output when several
    groups share it. ``interpret=True`` runs the same kernel on the CPU.
    See the module docstring for the layout and bounds rules.

    >>> import jax.numpy as jnp
    >>> w = jnp.ones((4, 3), jnp.float32)
    >>> ids = jnp.array([1, 3, 9, 0], jnp.int32)            # 9 is out of range; 0 is padding
    >>> offs = jnp.array([0, 2, 3], jnp.int32)
    >>> out, bad = pooled_lookup(w, ids, offs, None, ((0, 0, 4, 0),), batch_size=2,
    ...                          num_columns=3, interpret=True)
    >>> out.tolist(), int(bad)
    ([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]], 1)
    """
    validate_group(weights, ids, offsets, per_sample_weights, features, batch_size, bounds_check)
    out_dt = _check_pooled_args(weights, features, num_columns, pooling, out, out_dtype, batch_size)
    if config is None:
        config = default_pooled_config(
            weights.shape[1],
            weights.dtype,
            num_bags=len(features) * batch_size,
            weighted=per_sample_weights is not None,
            out_bytes=batch_size * num_columns * out_dt.itemsize,
        )
    if config.strategy == "segmented" and next_power_of_2(weights.shape[1]) < 16:
        raise ValueError(f"segmented strategy needs dim > 8, got dim={weights.shape[1]}")
    if ids.shape[0] == 0:
        # No values: every bag is empty (a longer one could read nothing). The kernel needs
        # one addressable id, so it gets a never-read padding id and all-empty bags.
        ids = jnp.zeros((1,), jnp.int32)
        offsets = jnp.zeros_like(offsets)
        if per_sample_weights is not None:
            per_sample_weights = jnp.zeros((1,), per_sample_weights.dtype)
    return _pooled_pallas(
        weights,
        ids,
        offsets,
        per_sample_weights,
        out,
        features=features,
        batch_size=batch_size,
        num_columns=num_columns,
        pooling=pooling,
        bounds_check=bounds_check,
        out_dtype=out_dt,
        interpret=interpret,
        config=config,
        fill_uncovered=bool(fill_uncovered),
    )


# --------------------------------------------------------------------------- XLA reference


def position_bags(offsets: jax.Array, num_ids: int) -> tuple[jax.Array, jax.Array]:
    """For every id position: its global bag index ``f*B+b`` and whether it is real.

    A position is real when ``offsets[0] <= i < offsets[-1]``; padding is not.

    >>> bags, live = position_bags(jnp.array([0, 2, 2, 3], jnp.int32), 5)
    >>> bags.tolist(), live.tolist()
    ([0, 0, 2, 2, 2], [True, True, True, False, False])
    """
    marks = jnp.zeros((num_ids,), jnp.int32).at[offsets[1:-1]].add(1, mode="drop")
    bags = jnp.minimum(jnp.cumsum(marks), offsets.shape[0] - 2)
    pos = jnp.arange(num_ids, dtype=jnp.int32)
    live = (pos >= offsets[0]) & (pos < offsets[-1])
    return bags, live


def mean_of_sums(sums: jax.Array, lengths: jax.Array, out_dtype) -> jax.Array:
    """float32 ``sums / lengths`` for a MEAN bag whose output is ``out_dtype``.

    A 16-bit output rounds the sum to ``out_dtype`` before dividing, as torch's 16-bit
    ``EmbeddingBag(mode="mean")`` (TorchRec's EBC) does, so both round the same way.
    """
    if jnp.dtype(out_dtype).itemsize < 4:
        sums = sums.astype(out_dtype).astype(jnp.float32)
    return sums / lengths.astype(jnp.float32)


def feature_rounds(features: tuple[Feature, ...]) -> list[list[int]]:
    """Split group-feature indices into rounds in which no KJT feature repeats.

    >>> feature_rounds(((0, 0, 5, 0), (1, 0, 5, 4), (0, 5, 5, 8)))
    [[0, 1], [2]]
    """
    rounds: list[list[int]] = []
    for g, feat in enumerate(features):
        for r in rounds:
            if all(features[h][0] != feat[0] for h in r):
                r.append(g)
                break
        else:
            rounds.append([g])
    return rounds


def lookup_rows(ids, bags, live, features, group_idx, batch_size, num_kjt, checked):
    """Per position: the stacked row it reads, whether it reads one, and whether it is bad.

    Only positions of the features ``group_idx`` (distinct KJT features) take part.
    Returns ``(rows, valid, bad, slot, batch_index)`` where ``slot`` is the position's index
    into ``group_idx`` (or ``len(group_idx)`` outside the group).
    """
    table = np.full((num_kjt, 3), -1, np.int32)  # kjt feature -> (slot, row_offset, num_rows)
    for slot, g in enumerate(group_idx):
        table[features[g][0]] = (slot, features[g][1], features[g][2])
    table = jnp.asarray(table)
    kjt = bags // batch_size
    entry = table[kjt]
    in_group = live & (entry[:, 0] >= 0)
    ok = (ids >= 0) & (ids < entry[:, 2]) if checked else jnp.ones_like(in_group)
    valid = in_group & ok
    bad = in_group & ~ok
    rows = jnp.where(valid, entry[:, 1] + ids, 0)
    slot = jnp.where(in_group, entry[:, 0], len(group_idx))
    return rows, valid, bad, slot, bags % batch_size


@functools.partial(
    jax.jit,
    static_argnames=("features", "batch_size", "num_columns", "pooling", "bounds_check", "out_dt"),
)
def _pooled_xla(
    weights,
    ids,
    offsets,
    per_sample_weights,
    out,
    *,
    features,
    batch_size,
    num_columns,
    pooling,
    bounds_check,
    out_dt,
):
    dim = weights.shape[1]
    num_kjt = (offsets.shape[0] - 1) // batch_size
    bags, live = position_bags(offsets, ids.shape[0])
    if out is None:
        out = jnp.zeros((batch_size, num_columns), out_dt)
    lengths = (offsets[1:] - offsets[:-1]).reshape(num_kjt, batch_size)
    bad_total = jnp.int32(0)
    for group_idx in feature_rounds(features):
        rows, valid, bad, slot, b = lookup_rows(
            ids,
            bags,
            live,
            features,
            group_idx,
            batch_size,
            num_kjt,
            checked=bounds_check != "none",
        )
        # "none" reads clip(row, 0, R - 1), as the kernel does.
        vals = jnp.take(weights, rows, axis=0, mode="clip").astype(jnp.float32)
        scale = valid.astype(jnp.float32)
        if per_sample_weights is not None:
            scale = scale * per_sample_weights.astype(jnp.float32)
        vals = vals * scale[:, None]
        n = len(group_idx)
        pooled = jax.ops.segment_sum(vals, slot * batch_size + b, num_segments=(n + 1) * batch_size)
        pooled = pooled[: n * batch_size].reshape(n, batch_size, dim)
        if pooling == "mean":
            kjts = np.array([features[g][0] for g in group_idx])
            pooled = mean_of_sums(pooled, jnp.maximum(lengths[kjts], 1)[:, :, None], out_dt)
        pooled = pooled.astype(out_dt)
        cols = [features[g][3] for g in group_idx]
        if cols == [cols[0] + k * dim for k in range(n)]:  # contiguous: one transposed write
            block = pooled.transpose(1, 0, 2).reshape(batch_size, n * dim)
            out = jax.lax.dynamic_update_slice(out, block, (0, cols[0]))
        else:
            for k, c in enumerate(cols):
                out = jax.lax.dynamic_update_slice(out, pooled[k], (0, c))
        if bounds_check in ("fatal", "warning"):
            bad_total = bad_total + jnp.sum(bad.astype(jnp.int32))
    return out, bad_total


def pooled_lookup_reference(
    weights: jax.Array,
    ids: jax.Array,
    offsets: jax.Array,
    per_sample_weights: jax.Array | None,
    features: tuple[Feature, ...],
    *,
    batch_size: int,
    num_columns: int,
    pooling: str = "sum",
    bounds_check: str = "warning",
    out: jax.Array | None = None,
    out_dtype=None,
    fill_uncovered: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Pure-XLA pooled lookup (gather + ``segment_sum``), same contract as :func:`pooled_lookup`.

    The backend for CPU/TPU and the oracle the kernel is tested against. "none" reads the
    clamped stacked row of a bad id, as the kernel does. Uncovered columns of a fresh output are always zeros here (XLA has no
    unwritten buffers), so ``fill_uncovered`` only keeps the signatures alike.
    """
    validate_group(weights, ids, offsets, per_sample_weights, features, batch_size, bounds_check)
    out_dt = _check_pooled_args(weights, features, num_columns, pooling, out, out_dtype, batch_size)
    return _pooled_xla(
        weights,
        ids,
        offsets,
        per_sample_weights,
        out,
        features=features,
        batch_size=batch_size,
        num_columns=num_columns,
        pooling=pooling,
        bounds_check=bounds_check,
        out_dt=out_dt,
    )
