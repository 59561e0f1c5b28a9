"""The pooled lookup of a sharded collection inside ``jax.shard_map``, batch split over devices.

Each device holds its slice of the batch (a KJT of the same keys, stride ``B``) and its
block of every local group (:class:`~jaxrec.parallel.layout.ShardedLayout`). One call:

1. **Input distribution.** On the sender every id is checked against its global table,
   routed to the shard that owns it (row-split tables: bucketized by row range; column
   shards: one copy per shard) and rewritten to the owner's local row. The ids are gathered
   (no sort) into one capacity-padded buffer per destination; ``jax.lax.all_to_all`` moves the
   per-bag lengths, then the ids (and per-sample weights).
2. **Local lookup.** Each owner runs the ordinary :func:`jaxrec.ops.lookup.lookup` (any
   backend, the fused optimizer of each local group) on its block, with one feature per
   (source device, slot).
3. **Output distribution.** Table-wise and column shards return with ``all_to_all``;
   row-split partial sums with ``jax.lax.psum_scatter``; the source device assembles its
   ``[B, sum of dims]`` output in the collection's feature order (column shards
   concatenated, MEAN bags of row-split tables divided by their whole length).

Data-parallel tables are looked up where the batch is, on replicas: fused ones combine the
replicas' sparse gradients before the identical update (``data_parallel_axis``), plain ones
get the gradient summed over the axis. Autodiff through the collectives gives the
backward: output gradients travel back the same way and each owner updates its rows in
place. Run the caller's step inside ``jax.shard_map(..., check_vma=False)``, with the
sharded params split as :func:`jaxrec.parallel.convert.partition_specs` says.

Two devices, table ``a`` split by rows, ``b`` whole on device 1, one bag per device:

>>> import jax, jax.numpy as jnp, numpy as np
>>> from jax.sharding import Mesh, PartitionSpec as P
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.parallel import ShardingPlan, partition_specs, row_wise, shard_params, table_wise
>>> tables = [
...     EmbeddingBagConfig(name="a", embedding_dim=2, num_embeddings=4, feature_names=["fa"]),
...     EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=3, feature_names=["fb"]),
... ]
>>> layout = ShardedLayout.create(tables, ShardingPlan({"a": row_wise(), "b": table_wise(1)}), 2)
>>> params = shard_params(layout, {"sum_float32_d2": jnp.arange(14.0).reshape(7, 2)})
>>> spec = ShardedLookupSpec.create(layout, ("fa", "fb"), batch_size=1, axis="x", backend="xla")
>>> def body(p, ids, lengths):
...     offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(lengths)])
...     return sharded_lookup(spec, p, ids, offsets, None)[0]
>>> step = jax.jit(jax.shard_map(
...     body, mesh=Mesh(np.array(jax.devices()[:2]), ("x",)),
...     in_specs=(partition_specs(layout, "x"), P("x"), P("x")), out_specs=P("x"),
...     check_vma=False))
>>> # device 0: fa [0, 3], fb [2]; device 1: fa [], fb [0, 1] (3 id slots per device)
>>> step(params, jnp.array([0, 3, 2, 0, 1, 0]), jnp.array([2, 1, 0, 2])).tolist()
[[6.0, 8.0, 12.0, 13.0], [0.0, 0.0, 18.0, 20.0]]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxrec.ops.backend import BoundsCheckMode, resolve_backend
from jaxrec.ops.lookup import lookup
from jaxrec.ops.spec import LookupSpec
from jaxrec.parallel.input_dist import bags_of_positions, compact, route, routing_tables
from jaxrec.parallel.layout import ShardedLayout

__all__ = [
    "COMM_DTYPES",
    "ShardedLookupSpec",
    "checked_comm_dtype",
    "distribute_input",
    "distribute_output",
    "owner_lookup",
    "sharded_lookup",
]


COMM_DTYPES = ("bfloat16", "float16")  # ShardedLookupSpec.create's comm_dtype


def checked_comm_dtype(comm_dtype: str | None) -> str | None:
    """``comm_dtype`` as a dtype name, or a ValueError when it is not None or one of
    :data:`COMM_DTYPES`."""
    if comm_dtype is None:
        return None
    if str(comm_dtype) not in COMM_DTYPES:
        raise ValueError(
            f"comm_dtype must be None or one of {list(COMM_DTYPES)}, got {comm_dtype!r}"
        )
    return str(comm_dtype)


@dataclass(frozen=True)
class ShardedLookupSpec:
    """Static description of one sharded lookup (hashable)."""

    layout: ShardedLayout
    kjt_keys: tuple[str, ...]
    batch_size: int  # bags per feature on each device
    axis: str
    backend: str
    bounds_check: str
    ids_per_destination: int | None = None  # None: the exact bound (see input_dist)
    comm_dtype: str | None = None  # pooled outputs and their gradients travel in it

    @classmethod
    def create(
        cls,
        layout: ShardedLayout,
        kjt_keys: tuple[str, ...],
        *,
        batch_size: int,
        axis: str,
        backend: str = "auto",
        bounds_check: BoundsCheckMode | str = BoundsCheckMode.WARNING,
        ids_per_destination: int | None = None,
        comm_dtype: str | None = None,
    ) -> ShardedLookupSpec:
        """The spec of a lookup of ``layout`` for local KJTs with ``kjt_keys`` and stride
        ``batch_size``, inside ``shard_map`` over mesh axis ``axis``.

        ``ids_per_destination``: the ids one device may send one device per step (the
        input all-to-all's buffers; :func:`jaxrec.parallel.input_dist.destination_capacity`
        derives one from pooling factors); ids past it are dropped and counted as bad ids
        (FATAL raises). ``None``: the exact bound, local capacity x the most shards of one
        table on a device, which never drops an id.

        ``comm_dtype``: ``"bfloat16"`` or ``"float16"`` to send the owners' pooled outputs
        (and, in the backward, their gradients) in 16 bits, as TorchRec's quantized
        communication does: half the bytes of the output and gradient distribution, with
        16-bit rounding of what travels (row-split partial sums are also added in 16 bits).
        ``None`` (default): the lookup's own dtype, the single-device numbers exactly."""
        keys = tuple(kjt_keys)
        missing = [name for name, _ in layout.features if name not in keys]
        if missing:
            raise ValueError(f"the KJT keys {list(keys)} lack the collection's features {missing}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        mode = BoundsCheckMode(bounds_check) if isinstance(bounds_check, str) else bounds_check
        if mode is BoundsCheckMode.NONE:
            mode = BoundsCheckMode.IGNORE  # the sender checks anyway: ids are routed by value
        if ids_per_destination is not None and (
            isinstance(ids_per_destination, bool)
            or not isinstance(ids_per_destination, int | np.integer)
            or ids_per_destination < 1
        ):
            raise ValueError(
                f"ids_per_destination must be a positive int or None, got {ids_per_destination!r}"
            )
        cap = None if ids_per_destination is None else int(ids_per_destination)
        comm = checked_comm_dtype(comm_dtype)
        return cls(layout, keys, int(batch_size), axis, backend, mode.value, cap, comm)

    # ---- static routing tables -----------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _local_spec(spec: ShardedLookupSpec) -> LookupSpec:
    layout = spec.layout
    return LookupSpec.create(
        layout.local_plan,
        layout.local_keys,
        batch_size=spec.batch_size,
        bounds_check="ignore",
        backend=spec.backend,
        optimizer=tuple(layout.group_optimizer(g) for g in range(len(layout.groups))),
    )


@functools.lru_cache(maxsize=64)
def _columns(spec: ShardedLookupSpec):
    """Static column maps: the owners' output permuted to per-source blocks
    ``[A slots | R slots]``; and, for the assembled output, the column of
    ``[all-to-all result (n * Wa) | reduce-scattered (Wr) | data parallel | zero]`` each
    output column takes, with the KJT feature dividing MEAN columns of row-split tables."""
    layout = spec.layout
    n, slots = layout.num_devices, layout.slots
    local = layout.local_plan
    col_of = {f.name: f.col_offset for f in local.features} if local is not None else {}
    dims = [layout.groups[s.group].dim for s in slots]
    order = [j for j, s in enumerate(slots) if not s.reduce] + [
        j for j, s in enumerate(slots) if s.reduce
    ]
    slot_col, width_a, width = {}, 0, 0
    for j in order:
        slot_col[j] = width
        width += dims[j]
        if not slots[j].reduce:
            width_a = width
    width_r = width - width_a
    perm = [
        col_of[layout.local_key(s, j)] + c for s in range(n) for j in order for c in range(dims[j])
    ]
    single = layout.single_plan
    dp_cols = {f.name: f.col_offset for f in layout.dp_plan.features} if layout.dp_plan else {}
    dp_width = layout.dp_plan.num_columns if layout.dp_plan else 0
    zero = n * width_a + width_r + dp_width
    index = np.full(single.num_columns, zero, np.int32)
    divide_by = np.full(single.num_columns, -1, np.int32)
    for fi, feature in enumerate(single.features):
        table = layout.table(feature.table)
        shards = layout.shards_of(feature.table)
        base = feature.col_offset
        if not shards:
            index[base : base + feature.dim] = (
                n * width_a + width_r + dp_cols[feature.name] + np.arange(feature.dim)
            )
            continue
        for rank, row in enumerate(layout.assignments):
            for j, held in enumerate(row):
                if held is None or held[0] != fi:
                    continue
                shard = shards[held[1]]
                cols = np.arange(shard.num_cols)
                if slots[j].reduce:
                    index[base + cols] = n * width_a + slot_col[j] - width_a + cols
                else:
                    index[base + shard.col_offset + cols] = rank * width_a + slot_col[j] + cols
        if layout.plan[table.name].sharding_type.splits_rows and _is_mean(table):
            divide_by[base : base + feature.dim] = spec.kjt_keys.index(feature.name)
    return np.asarray(perm, np.int32), width_a, width_r, index, divide_by


def _is_mean(table) -> bool:
    return getattr(getattr(table, "pooling", None), "value", None) == "MEAN"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sum_cotangent(axis: str, x):
    """Identity whose cotangent is summed over ``axis``: a replica's gradient becomes the
    gradient of the whole batch (what ``shard_map``'s own replication rule would give)."""
    return x


def _sum_cotangent_fwd(axis, x):
    return x, None


def _sum_cotangent_bwd(axis, _, g):
    return (jax.lax.psum(g, axis),)


_sum_cotangent.defvjp(_sum_cotangent_fwd, _sum_cotangent_bwd)


def _data_parallel(spec: ShardedLookupSpec, replicated: dict, ids, offsets, weights):
    layout = spec.layout
    plan = layout.dp_plan
    optimizers = tuple(layout.optimizers[g.optimizer_tag] for g in plan.groups)
    dp_spec = LookupSpec.create(
        plan,
        spec.kjt_keys,
        batch_size=spec.batch_size,
        bounds_check=spec.bounds_check,
        backend=spec.backend,
        optimizer=optimizers,
        data_parallel_axis=spec.axis,
    )
    params = tuple(
        replicated[g.name] if o is not None else _sum_cotangent(spec.axis, replicated[g.name])
        for g, o in zip(plan.groups, optimizers, strict=True)
    )
    out, bad = lookup(dp_spec, params, ids, offsets, weights)
    return out, bad


def sharded_lookup(
    spec: ShardedLookupSpec,
    params: dict,
    ids: jax.Array,
    offsets: jax.Array,
    weights: jax.Array | None,
):
    """Pooled lookup of a sharded collection; call it inside ``shard_map`` over ``spec.axis``.

    Args:
      spec: :meth:`ShardedLookupSpec.create`.
      params: this device's view of the sharded params
        (:func:`jaxrec.parallel.convert.shard_params`): ``{"shards": {local group: block},
        "replicated": {data-parallel group: table}}``.
      ids, offsets, weights: this device's KJT slice (``values``, ``offsets`` of
        ``F * B + 1``, per-sample weights or None).

    Returns:
      ``(out [B, sum of dims], bad)``: this device's pooled output in the collection's
      feature order, and the number of ids outside their tables in the whole batch (every
      device); FATAL bounds checking raises (a checkify error) instead.
    """
    layout, axis = spec.layout, spec.axis
    try:
        size = jax.lax.axis_size(axis)
    except NameError:
        raise ValueError(f"sharded_lookup runs inside shard_map over mesh axis {axis!r}") from None
    if size != layout.num_devices:
        raise ValueError(
            f"the layout places tables on {layout.num_devices} devices but mesh axis {axis!r} "
            f"has {size}"
        )
    resolve_backend(spec.backend)
    batch = spec.batch_size
    if offsets.shape[0] != len(spec.kjt_keys) * batch + 1:
        raise ValueError(
            f"offsets has {offsets.shape[0]} entries; {len(spec.kjt_keys)} keys of stride "
            f"{batch} need {len(spec.kjt_keys) * batch + 1}"
        )
    if not layout.pooled:
        return _sequence(spec, params, ids, offsets)
    bad = jnp.zeros((), jnp.int32)
    owner_out = dp_out = None
    if layout.groups:
        values, local_offsets, local_w, bad, overflow = distribute_input(
            spec, ids, offsets, weights
        )
        owner_out = owner_lookup(spec, params, values, local_offsets, local_w)
        bad = bad + overflow
        _check_overflow(spec, overflow)
    if layout.dp_tables:
        dp_out, dp_bad = _data_parallel(spec, params["replicated"], ids, offsets, weights)
        bad = bad + dp_bad
    result = distribute_output(spec, owner_out, offsets, dp_out)
    bad = jax.lax.psum(bad, axis)
    if spec.bounds_check == BoundsCheckMode.FATAL.value:
        checkify.check(
            bad == 0, "{count} ids are outside their tables (bounds_check_mode=FATAL)", count=bad
        )
    return result, bad


def _check_overflow(spec: ShardedLookupSpec, overflow) -> None:
    if spec.bounds_check == BoundsCheckMode.FATAL.value:
        overflow = jax.lax.psum(overflow, spec.axis)
        checkify.check(
            overflow == 0,
            "{count} ids did not fit the input all-to-all's ids_per_destination="
            f"{spec.ids_per_destination} (bounds_check_mode=FATAL); raise it",
            count=overflow,
        )


def distribute_input(spec: ShardedLookupSpec, ids, offsets, weights):
    """Input distribution (inside ``shard_map``): this device's KJT slice → the ids every
    device owns, as one KJT on the owner (features: (source device, slot)).

    Returns ``(values, offsets, weights, bad, overflow)``: the owner's KJT, this device's
    count of ids outside their tables and of ids past ``spec.ids_per_destination``."""
    layout, axis = spec.layout, spec.axis
    lengths, send_ids, send_w, bad, overflow, _ = route(
        layout, spec.kjt_keys, spec.batch_size, ids, offsets, weights, spec.ids_per_destination
    )
    to_owner = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0)
    lengths, send_ids = to_owner(lengths), to_owner(send_ids)
    send_w = None if send_w is None else to_owner(send_w)
    values, local_offsets, local_w = compact(lengths, send_ids, send_w)
    return values, local_offsets, local_w, bad, overflow


def owner_lookup(spec: ShardedLookupSpec, params: dict, values, offsets, weights):
    """The owners' pooled lookup of the distributed ids (fused updates in its backward):
    ``[B, sum over (source, slot) of dims]``."""
    groups = tuple(params["shards"][g.name] for g in spec.layout.groups)
    out, _ = lookup(_local_spec(spec), groups, values, offsets, weights)
    return out


def distribute_output(spec: ShardedLookupSpec, owner_out, offsets, dp_out=None):
    """Output distribution (inside ``shard_map``): the owners' pooled results back to the
    batch-split layout (``all_to_all`` for table-wise and column shards, ``psum_scatter``
    for row-split partial sums), assembled with the data-parallel output ``dp_out`` in the
    collection's feature order, MEAN bags of row-split tables divided by their length.
    Linear in ``owner_out``: its transpose is the backward's gradient distribution."""
    layout, axis, batch = spec.layout, spec.axis, spec.batch_size
    parts = []
    perm, width_a, width_r, index, divide_by = _columns(spec)
    if owner_out is not None:
        out = _take_columns(owner_out, perm).reshape(batch, layout.num_devices, width_a + width_r)
        out = out.transpose(1, 0, 2)
        if spec.comm_dtype is not None:  # its transpose casts the gradients the same way
            out = out.astype(spec.comm_dtype)
        if width_a:
            back = jax.lax.all_to_all(out[:, :, :width_a], axis, 0, 0)
            parts.append(back.transpose(1, 0, 2).reshape(batch, -1))
        if width_r:
            parts.append(jax.lax.psum_scatter(out[:, :, width_a:], axis, scatter_dimension=0))
    if (dp_out is None) != (not layout.dp_tables):
        raise ValueError(
            f"dp_out must be given exactly when the layout has data-parallel tables "
            f"({list(layout.dp_tables)})"
        )
    if spec.comm_dtype is not None:
        parts = [part.astype(owner_out.dtype) for part in parts]
    if dp_out is not None:
        parts.append(dp_out)
    dtype = jnp.result_type(*parts)
    width = sum(part.shape[1] for part in parts)  # ``index`` reads column ``width`` as zero
    zeros = int((index == width).sum())
    if zeros:  # whole blocks of the narrowest feature, so the gather can move blocks
        unit = math.gcd(*(f.dim for f in layout.single_plan.features))
        parts.append(jnp.zeros((batch, -(-zeros // unit) * unit), dtype))
    result = _take_columns(jnp.concatenate(parts, axis=1), _distinct_zero_columns(index, width))
    if (divide_by >= 0).any():
        lengths = (offsets[1:] - offsets[:-1]).reshape(len(spec.kjt_keys), batch)
        divisor = jnp.maximum(lengths[np.maximum(divide_by, 0)].T, 1).astype(jnp.float32)
        result = jnp.where(divide_by >= 0, result / divisor, result).astype(dtype)
    return result


def _distinct_zero_columns(index: np.ndarray, zero: int) -> np.ndarray:
    """``index`` with each use of the zero column ``zero`` given its own zero column from
    ``zero`` on, so that no column is read twice."""
    index = np.asarray(index, np.int32).copy()
    at = np.flatnonzero(index == zero)
    index[at] = zero + np.arange(len(at), dtype=np.int32)
    return index


def _take_columns(x: jax.Array, index: np.ndarray) -> jax.Array:
    """``x[:, index]`` for a static ``index`` that reads no column twice.

    Its backward (the gradient distribution of :func:`distribute_output`) is a gather too:
    the cotangent's columns read back through the inverse map, the columns ``x`` gave no
    output reading a zero column. Autodiff's own transpose of a gather is a scatter-add
    into zeros, which on the GPU costs several times the gather. Where ``index`` moves whole
    aligned blocks (a feature's ``dim`` columns), both directions gather blocks, not
    single strided columns.

    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> _take_columns(x, np.array([3, 0, 1])).tolist()
    [[3.0, 0.0, 1.0], [7.0, 4.0, 5.0]]
    >>> jax.grad(lambda x: (_take_columns(x, np.array([3, 0, 1])) * 2).sum())(x).tolist()
    [[2.0, 2.0, 0.0, 2.0], [2.0, 2.0, 0.0, 2.0]]
    """
    index = np.asarray(index, np.int64)
    if len(np.unique(index)) != len(index):
        raise ValueError("_take_columns needs distinct columns")
    if np.array_equal(index, np.arange(x.shape[1])):
        return x
    return _permute_columns(_ColumnMap.create(index, x.shape[1]), x)


@dataclass(frozen=True)
class _ColumnMap:
    """A static column gather ``out[:, j] = x[:, index[j]]`` in blocks of ``block``
    columns, with its inverse (``-1`` where ``x``'s block is not read)."""

    block: int
    forward: tuple[int, ...]  # source block of each output block
    inverse: tuple[int, ...]  # output block of each source block, or -1
    width: int  # columns of ``x``

    @classmethod
    def create(cls, index: np.ndarray, width: int) -> _ColumnMap:
        block = _block_size(index, width)
        forward = index[::block] // block
        inverse = np.full(width // block, -1, np.int64)
        inverse[forward] = np.arange(len(forward))
        return cls(block, tuple(forward.tolist()), tuple(inverse.tolist()), width)


def _block_size(index: np.ndarray, width: int) -> int:
    """The largest ``b`` dividing ``width`` and ``len(index)`` such that ``index`` is made of
    whole aligned runs ``[k*b, (k+1)*b)``."""
    for b in range(math.gcd(width, len(index)), 0, -1):
        if width % b or len(index) % b:
            continue
        runs = index.reshape(-1, b)
        if np.all(runs[:, 0] % b == 0) and np.all(runs - runs[:, :1] == np.arange(b)):
            return b
    return 1


def _gather_blocks(x: jax.Array, blocks: tuple[int, ...], block: int) -> jax.Array:
    rows = x.shape[0]
    index = np.asarray(blocks, np.int32)
    out = (
        x.reshape(rows, -1, block)
        .at[:, index]
        .get(
            unique_indices=len(set(blocks)) == len(blocks),
            indices_are_sorted=bool(np.all(np.diff(index) > 0)),
        )
    )
    return out.reshape(rows, len(blocks) * block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _permute_columns(columns: _ColumnMap, x: jax.Array) -> jax.Array:
    return _gather_blocks(x, columns.forward, columns.block)


def _permute_columns_fwd(columns: _ColumnMap, x):
    return _gather_blocks(x, columns.forward, columns.block), None


def _permute_columns_bwd(columns: _ColumnMap, _, g):
    zero = len(columns.forward)  # one zero block after the cotangent's blocks
    inverse = tuple(zero if k < 0 else k for k in columns.inverse)
    if zero in inverse:
        g = jnp.concatenate([g, jnp.zeros((g.shape[0], columns.block), g.dtype)], axis=1)
    return (_gather_blocks(g, inverse, columns.block),)


_permute_columns.defvjp(_permute_columns_fwd, _permute_columns_bwd)


def _sequence(spec: ShardedLookupSpec, params: dict, ids, offsets):
    """The sequence lookup: every id's row returns to its position on the source device.

    Owners look their ids up (one row per received position), the rows go back in the
    buffers they came in (``all_to_all``), and the source scatters each into its position
    and its shard's columns. Returns one ``[capacity, dim]`` array per group of the
    single-device plan (row i: the embedding of position i, as :func:`lookup` gives).
    """
    layout, axis, batch = spec.layout, spec.axis, spec.batch_size
    n, capacity = layout.num_devices, ids.shape[0]
    single = layout.single_plan
    width = max([g.dim for g in single.groups])
    out = jnp.zeros((capacity, width), jnp.float32)
    bad = jnp.zeros((), jnp.int32)
    if layout.groups:
        lengths, send_ids, _, bad, overflow, (take, shard, real) = route(
            layout, spec.kjt_keys, batch, ids, offsets, None, spec.ids_per_destination
        )
        bad = bad + overflow
        _check_overflow(spec, overflow)
        to_owner = functools.partial(
            jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0
        )
        lengths, send_ids = to_owner(lengths), to_owner(send_ids)
        values, local_offsets, _ = compact(lengths, send_ids, None)
        groups = tuple(params["shards"][g.name] for g in layout.groups)
        rows, _ = lookup(_local_spec(spec), groups, values, local_offsets, None)
        # one row per received position, in the group of its slot, padded to ``width``
        bags, _ = bags_of_positions(local_offsets, values.shape[0])
        slot_group = jnp.asarray([slot.group for slot in layout.slots], jnp.int32)
        group_of = slot_group[(bags // batch) % len(layout.slots)]
        merged = sum(
            jnp.where(
                (group_of == g)[:, None],
                jnp.pad(r.astype(jnp.float32), ((0, 0), (0, width - r.shape[1]))),
                0.0,
            )
            for g, r in enumerate(rows)
        )
        cap = send_ids.shape[1]
        totals = lengths.reshape(n, -1).sum(axis=1)
        starts = jnp.cumsum(totals) - totals
        back_index = jnp.clip(starts[:, None] + jnp.arange(cap)[None, :], 0, n * cap - 1)
        back = jnp.where(
            (jnp.arange(cap)[None, :] < totals[:, None])[..., None], merged[back_index], 0.0
        )
        back = to_owner(back)  # [owner, cap, width], aligned with this device's send buffers
        position = take % capacity
        bags_here, _ = bags_of_positions(offsets, capacity)
        kjt = jnp.minimum(bags_here // batch, len(spec.kjt_keys) - 1)[position]
        col0 = jnp.asarray(routing_tables(layout, spec.kjt_keys)["col_offset"])[kjt, shard]
        cols = jnp.asarray(routing_tables(layout, spec.kjt_keys)["num_cols"])[kjt, shard]
        lane = jnp.arange(width)
        target = jnp.where(
            real[..., None] & (lane < cols[..., None]), col0[..., None] + lane, width
        )
        out = out.at[jnp.broadcast_to(position[..., None], target.shape), target].add(
            back, mode="drop"
        )
    bags_here, live = bags_of_positions(offsets, capacity)
    kjt = jnp.minimum(bags_here // batch, len(spec.kjt_keys) - 1)
    feature_group = np.full(len(spec.kjt_keys), -1, np.int32)
    for f in single.features:
        feature_group[spec.kjt_keys.index(f.name)] = f.group
    group_of_position = jnp.where(live, jnp.asarray(feature_group)[kjt], -1)
    dp_rows = {}
    if layout.dp_tables:
        dp_out, dp_bad = _data_parallel(spec, params["replicated"], ids, offsets, None)
        bad = bad + dp_bad
        single_of = {(g.dim, g.dtype, g.optimizer_tag): k for k, g in enumerate(single.groups)}
        for g, r in zip(layout.dp_plan.groups, dp_out, strict=True):
            dp_rows[single_of[(g.dim, g.dtype, g.optimizer_tag)]] = r
    results = []
    for k, group in enumerate(single.groups):
        rows = jnp.where((group_of_position == k)[:, None], out[:, : group.dim], 0.0)
        if k in dp_rows:
            rows = rows + jnp.where((group_of_position == k)[:, None], dp_rows[k], 0.0)
        results.append(rows.astype(group.dtype))
    bad = jax.lax.psum(bad, axis)
    if spec.bounds_check == BoundsCheckMode.FATAL.value:
        checkify.check(
            bad == 0, "{count} ids are outside their tables (bounds_check_mode=FATAL)", count=bad
        )
    return tuple(results), bad
