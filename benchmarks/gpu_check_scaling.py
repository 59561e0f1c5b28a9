"""Weak scaling and capacity of model parallelism: ``python -m benchmarks.gpu_check_scaling``.

Launch (one process drives every local GPU through ``jax.shard_map``; NVLink multicast stays
off)::

    NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \\
        python -m benchmarks.gpu_check_scaling --out "$OUT"
    NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \\
        python -m benchmarks.gpu_check_scaling --mode capacity --capacity-gb 160 --out "$OUT"

``--mode scaling`` (weak scaling): a DLRM over 26 tables with Criteo's cardinalities capped
at ``--max-rows`` (4M), dim 128, fp32, fused row-wise Adagrad, ``--batch`` (16,384) examples
per GPU; the multi-hot features draw bag lengths uniform in [0, 40] (mean 20), the tables of
fewer than 1,000 rows are one-hot, as Criteo's small features. The planner chooses the
plan from the measured link bandwidth; the input all-to-all's ``ids_per_destination`` comes
from the features' pooling factors times ``--headroom``. Times the train step of the plain
model on one GPU and of :class:`jaxrec.parallel.DistributedModelParallel` on every visible
GPU, and each part of the sharded step on its own, as a jitted function on the same batch:
input distribution (route: contiguous feature ranges gathered per destination, no sort;
all-to-alls of lengths and ids; compact), the owners' forward
lookups, the output distribution (all-to-all, reduce-scatter, assembly), the gradient
distribution (its transpose), the owners' backward with the fused update (tables donated),
the dense part (MLPs, interactions, gradient all-reduce, optimizer); their sum beside the
step; the per-GPU throughput against one GPU and the redistribution share of the step.
``--quick`` (3 timing iterations, 64 MB bandwidth buffers) keeps a 2-GPU scaling run
within about 5 minutes, compiles included::

    python -m benchmarks.gpu_check_scaling --quick --out "$OUT"

``--mode checkpoint`` (run it on its own): a sharded orbax checkpoint
(:mod:`jaxrec.checkpoint`) of 26 equal row-wise tables totalling ``--checkpoint-gb`` (40 GB
by default; the 2-GPU machine's 128 GiB disk holds it) with their row-wise Adagrad state;
save and restore timed, the restored arrays compared bitwise with the saved ones on
``--sample-rows`` random rows of every leaf. The checkpoint goes to a fresh temporary folder
(``--checkpoint-dir`` to choose where; never under ``--out``) and is removed at the end::

    python -m benchmarks.gpu_check_scaling --mode checkpoint --checkpoint-gb 40 --out "$OUT"

``--mode capacity``: 26 equal tables totalling ``--capacity-gb`` of fp32 weights, planned
over every GPU (refused on one: the message is recorded), created sharded, trained three
fused steps (each step's loss recorded).

Every mode first measure the all-to-all and reduce-scatter bandwidth of the devices (bytes
each device sends per second). ``--small`` runs the same code on a few CPU devices (the
test suite does). Writes ``gpu_check_scaling.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxrec  # noqa: E402
from benchmarks.trace_summary import summarize, traced  # noqa: E402
from jaxrec import EmbeddingBagConfig, KeyedJaggedTensor, bench, pad_to_capacity  # noqa: E402
from jaxrec.models.dlrm import DLRM, MLP, dot_interactions  # noqa: E402
from jaxrec.parallel import (  # noqa: E402
    DistributedModelParallel,
    EmbeddingShardingPlanner,
    ParameterConstraints,
    ShardedLayout,
    ShardedLookupSpec,
    ShardingType,
    Topology,
)
from jaxrec.parallel.input_dist import destination_capacity, send_capacity  # noqa: E402
from jaxrec.parallel.sharded_lookup import (  # noqa: E402
    COMM_DTYPES,
    distribute_input,
    distribute_output,
    owner_lookup,
)

# Criteo 1TB's 26 categorical cardinalities.
CRITEO = (39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346,
          10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108,
          36)  # fmt: skip
ONE_HOT_BELOW, MAX_LEN = 1000, 40
DENSE = 13


def _tables(rows: list[int], dim: int) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"f{i}"]
        )
        for i, r in enumerate(rows)
    ]


def _one_hot(tables) -> list[bool]:
    return [t.num_embeddings < ONE_HOT_BELOW for t in tables]


def _model(tables, dim, backend):
    return DLRM(
        tables=tables,
        bottom_mlp=(512, 256, dim),
        top_mlp=(1024, 1024, 512, 256, 1),
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01),
        backend=backend,
    )


def _device_batch(tables, batch, capacity, rng):
    lengths = np.concatenate(
        [
            np.ones(batch, np.int64) if one else rng.integers(0, MAX_LEN + 1, batch)
            for one in _one_hot(tables)
        ]
    )
    highs = np.repeat(np.repeat([t.num_embeddings for t in tables], batch), lengths)
    ids = (rng.random(int(lengths.sum())) * highs).astype(np.int32)
    kjt = KeyedJaggedTensor([f"f{i}" for i in range(len(tables))], ids, lengths=lengths)
    dense = rng.normal(size=(batch, DENSE)).astype(np.float32)
    labels = rng.integers(0, 2, batch).astype(np.float32)
    return dense, pad_to_capacity(kjt, capacity), labels


def _capacity(tables, batch) -> int:
    """Ids per device: the expected count plus 5%, rounded up to 1024."""
    expected = sum(1 if one else MAX_LEN / 2 for one in _one_hot(tables)) * batch
    return int(np.ceil(expected * 1.05 / 1024) * 1024)


def _loss(model):
    def loss_fn(params, dense, kjt, labels):
        logits = model.apply({"params": params}, dense, kjt)
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    return loss_fn


def _tx():
    return jaxrec.optim.fused(optax.adagrad(0.01), check_uses=False)


def _planner(args, topology: Topology, **kwargs) -> EmbeddingShardingPlanner:
    """The planner over ``topology``: 2 GiB per device kept for everything else (a tenth of
    a small device)."""
    reserve = min(2 * 2**30, topology.hbm_cap // 10)
    return EmbeddingShardingPlanner(
        topology, batch_size=args.batch, reserve_bytes=reserve, **kwargs
    )


def _time_stateful(step, state, arg_sets, iters) -> float:
    """Median ms of ``state = step(*state, *args)`` (donated state carried between calls)."""
    holder = [state]

    def run(*args):
        holder[0] = step(*holder[0], *args)[: len(holder[0])]
        return holder[0]

    ms = bench.time_op(run, arg_sets, iters=iters)
    holder.clear()
    return ms


# ---- bandwidths ---------------------------------------------------------------------------
def link_bandwidth(mesh, axis, mbytes: float, iters: int) -> dict:
    """All-to-all and reduce-scatter: bytes each device sends per second."""
    n = mesh.shape[axis]
    if n < 2:
        return {}
    per_device = max(n, int(mbytes * 2**20 / 4) // n * n)  # float32 elements
    x = jax.device_put(
        jnp.ones((n * per_device,), jnp.float32), jax.sharding.NamedSharding(mesh, P(axis))
    )
    smap = functools.partial(jax.shard_map, mesh=mesh, in_specs=P(axis), check_vma=False)
    a2a = jax.jit(
        smap(lambda v: jax.lax.all_to_all(v.reshape(n, -1), axis, 0, 0), out_specs=P(axis))
    )
    rs = jax.jit(smap(lambda v: jax.lax.psum_scatter(v, axis, tiled=True), out_specs=P(axis)))
    sent = per_device * 4 * (n - 1) / n
    out = {"collective_mbytes_per_device": per_device * 4 / 2**20}
    for name, fn in (("all_to_all", a2a), ("reduce_scatter", rs)):
        ms = bench.time_op(fn, [(x,)], iters=iters)
        out[f"{name}_ms"] = ms
        out[f"{name}_gbytes_per_s"] = sent / (ms * 1e-3) / 1e9
    return out


# ---- scaling ------------------------------------------------------------------------------
def _fused_backward_rule():
    """The lookup's custom-VJP backward (the fused update), to time it on its own: its
    residuals are its inputs (tables, ids, offsets, weights), so it runs without the
    forward. A private name of ``jaxrec.ops``: searched in its modules."""
    import importlib
    import pkgutil

    import jaxrec.ops as ops

    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"jaxrec.ops.{info.name}")
        rule = getattr(getattr(module, "_lookup", None), "bwd", None)
        if rule is not None:
            return rule
    raise RuntimeError("no custom-VJP _lookup with a backward rule in jaxrec.ops")


def _run_backward(rule, spec, primals: tuple, cotangent):
    """``rule(spec, residuals, (cotangent, None))`` for a forward that saw ``primals``
    (params, ids, offsets, no weights): the residuals are those inputs, followed by ``None``
    for each optional residual (e.g. a weight gradient not asked for) the rule's version
    keeps after them."""
    for extra in range(3):
        try:
            return rule(spec, (*primals, *(None,) * extra), (cotangent, None))[0]
        except ValueError as error:  # too few residuals for this version of the rule
            if "not enough values to unpack" not in str(error):
                raise
    raise RuntimeError("the lookup's backward rule takes an unknown residual layout")


def _copy(tree):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _collective_bytes(jitted, *args) -> int:
    """Bytes one device hands to collectives (all-to-all, reduce-scatter, all-reduce,
    all-gather) in the compiled program of ``jitted(*args)``: the sum of their operands'
    sizes, read from the optimized HLO."""
    text = jitted.lower(*args).compile().as_text()
    ops = ("all-to-all", "reduce-scatter", "all-reduce", "all-gather", "collective-permute")
    ops += tuple(f"{op}-start" for op in ops)  # the GPU's asynchronous forms
    total = 0
    for shape, op in re.findall(r"= (\S+(?: \S+)*?) ([a-z][\w-]*)\(", text):
        if op in ops:
            for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape):
                count = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
                total += count * _HLO_BYTES.get(dtype, 4)
    return total


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def _breakdown(dmp, spec, params, kjt, iters, trace=None) -> dict:
    """Each part of the sharded step timed on its own (ms), jitted over the mesh on one
    batch, each on the outputs of the part before: input distribution (route, all-to-alls,
    compact), the owners' forward lookups, the output distribution, the gradient
    distribution (its backward: ``jax.vjp`` of the output distribution, whose forward XLA
    drops), the owners' backward with the fused update (in place, tables donated). None is
    derived from another. Beside each distribution part: the bytes one device hands to its
    collectives (from the compiled program)."""
    from jaxrec.parallel.sharded_lookup import _local_spec

    layout, axis, mesh = spec.layout, dmp.axis, dmp.mesh
    emb_specs = dmp.variable_specs["params"]["sparse_arch"]["embedding_bags"]
    emb = params["sparse_arch"]["embedding_bags"]
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    ax = P(axis)

    def input_dist(kjt):
        values, offsets, _, _, overflow = distribute_input(spec, kjt.values(), kjt.offsets(), None)
        return values, offsets, jax.lax.psum(overflow, axis)

    ind = jax.jit(smap(input_dist, in_specs=(ax,), out_specs=(ax, ax, P())))
    values, local_offsets, overflow = ind(kjt)
    own = jax.jit(
        smap(
            lambda p, v, o: owner_lookup(spec, p, v, o, None),
            in_specs=(emb_specs, ax, ax),
            out_specs=ax,
        )
    )
    owner_out = own(emb, values, local_offsets)
    outd = jax.jit(
        smap(
            lambda x, kjt: distribute_output(spec, x, kjt.offsets()),
            in_specs=(ax, ax),
            out_specs=ax,
        )
    )
    pooled = outd(owner_out, kjt)
    g = jnp.ones_like(pooled) * 1e-3

    def grad_dist(g, x, kjt):
        offsets = kjt.offsets()
        return jax.vjp(lambda x: distribute_output(spec, x, offsets), x)[1](g)[0]

    gd = jax.jit(smap(grad_dist, in_specs=(ax, ax, ax), out_specs=ax))
    owner_grad = gd(g, owner_out, kjt)
    rule, local = _fused_backward_rule(), _local_spec(spec)

    def backward(p, v, o, gx):
        groups = tuple(p["shards"][grp.name] for grp in layout.groups)
        new = _run_backward(rule, local, (groups, v, o, None), gx)
        shards = {grp.name: x for grp, x in zip(layout.groups, new, strict=True)}
        return ({"shards": shards, "replicated": p["replicated"]},)

    bwd = jax.jit(
        smap(backward, in_specs=(emb_specs, ax, ax, ax), out_specs=(emb_specs,)),
        donate_argnums=(0,),
    )
    n = dmp.num_devices
    live = np.asarray(local_offsets).reshape(n, -1)[:, -1]
    # device 0's owner part alone, outside shard_map: its block, ids and gradient as
    # one-device arrays (tells the owner's data from the sharded program around it)
    first = lambda x: x.addressable_shards[0].data  # noqa: E731
    alone = jax.jit(backward, donate_argnums=(0,))
    alone_args = [tuple(first(x) for x in (values, local_offsets, owner_grad))]
    traces = {}
    if trace:  # the input distribution's kernels, three calls under the profiler
        traced(lambda: [jax.block_until_ready(ind(kjt)) for _ in range(3)], trace)
        traces["input_dist_trace"] = summarize(trace)
    return {
        **traces,
        "input_dist_ms": bench.time_op(ind, [(kjt,)], iters=iters),
        "owner_lookup_forward_ms": bench.time_op(own, [(emb, values, local_offsets)], iters=iters),
        "output_dist_ms": bench.time_op(outd, [(owner_out, kjt)], iters=iters),
        "gradient_dist_ms": bench.time_op(gd, [(g, owner_out, kjt)], iters=iters),
        "backward_fused_update_ms": _time_stateful(
            bwd, (_copy(emb),), [(values, local_offsets, owner_grad)], iters
        ),
        "backward_fused_update_device0_alone_ms": _time_stateful(
            alone, (_copy(jax.tree.map(first, emb)),), alone_args, iters
        ),
        "input_dist_collective_bytes": _collective_bytes(ind, kjt),
        "output_dist_collective_bytes": _collective_bytes(outd, owner_out, kjt),
        "gradient_dist_collective_bytes": _collective_bytes(gd, g, owner_out, kjt),
        "owner_ids_capacity": values.shape[0] // n,
        "owner_ids_live": live.tolist(),
        "owner_output_bytes": owner_out.nbytes // n,
        "ids_overflowing_ids_per_destination": int(overflow),
        "data_parallel_tables": list(layout.dp_tables),  # looked up inside the step only
    }


def _one_gpu_breakdown(model, emb, kjt, iters, owner_capacity) -> dict:
    """The one-GPU counterparts of the owners' parts, on the one-GPU model's own tables and
    batch: the embedding forward alone, the backward with the fused update alone (tables
    donated), and the same backward on the batch padded to the owners' id capacity (what a
    larger static capacity alone costs)."""
    from jaxrec.modules import EmbeddingBagCollection
    from jaxrec.ops.lookup import lookup
    from jaxrec.ops.spec import LookupSpec

    ebc = EmbeddingBagCollection(tables=model.tables, optimizer=model.optimizer)
    plan = ebc.plan
    spec = LookupSpec.create(
        plan, tuple(kjt.keys()), batch_size=kjt.stride(), backend=model.backend,
        optimizer=ebc.group_optimizers(),
    )  # fmt: skip
    rule = _fused_backward_rule()

    def forward(p, v, o):
        return lookup(spec, tuple(p[grp.name] for grp in plan.groups), v, o, None)[0]

    def backward(p, v, o, g):
        groups = tuple(p[grp.name] for grp in plan.groups)
        new = _run_backward(rule, spec, (groups, v, o, None), g)
        return ({grp.name: x for grp, x in zip(plan.groups, new, strict=True)},)

    fwd = jax.jit(forward)
    bwd = jax.jit(backward, donate_argnums=(0,))
    values, offsets = kjt.values(), kjt.offsets()
    out = fwd(emb, values, offsets)
    g = jnp.ones_like(out) * 1e-3
    padded = jnp.pad(values, (0, max(owner_capacity - values.shape[0], 0)))
    return {
        "embedding_forward_ms": bench.time_op(fwd, [(emb, values, offsets)], iters=iters),
        "backward_fused_update_ms": _time_stateful(
            bwd, (_copy(emb),), [(values, offsets, g)], iters
        ),
        "backward_fused_update_at_owner_capacity_ms": _time_stateful(
            bwd, (_copy(emb),), [(padded, offsets, g)], iters
        ),
        "ids_capacity": int(values.shape[0]),
        "ids_live": int(offsets[-1]),
        "output_bytes": int(out.nbytes),
    }


def _dense_ms(model, tables, dim, batch, iters, mesh=None) -> float:
    """The dense part of one device's step: bottom and top MLPs and interactions, forward
    and backward, the gradients summed over the mesh (when given) and the dense optimizer."""
    bottom, top = MLP(model.bottom_mlp), MLP(model.top_mlp)
    dense = jnp.ones((batch, DENSE), jnp.float32)
    sparse = jnp.ones((batch, len(tables), dim), jnp.float32)
    pb = bottom.init(jax.random.key(0), dense)
    pt = top.init(jax.random.key(1), dot_interactions(bottom.apply(pb, dense), sparse))
    tx = optax.adagrad(0.01)
    params = (pb, pt)

    def loss(params, sparse):
        pb, pt = params
        z = dot_interactions(bottom.apply(pb, dense), sparse)
        return jnp.mean(top.apply(pt, z))

    def step(params, opt, sparse):
        grads, g_sparse = jax.grad(loss, argnums=(0, 1))(params, sparse)
        if mesh is not None:
            grads = jax.lax.psum(grads, "x")
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, g_sparse

    if mesh is not None:
        step = jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P(), P()),
            check_vma=False,
        )  # fmt: skip
    fn = jax.jit(step, donate_argnums=(0, 1))
    return _time_stateful(fn, (params, tx.init(params)), [(sparse,)], iters)


def scaling(args, devices, record) -> None:
    dim, batch = args.dim, args.batch
    tables = _tables([min(c, args.max_rows) for c in CRITEO], dim)
    rng = np.random.default_rng(0)
    capacity = _capacity(tables, batch)
    per_device = [[_device_batch(tables, batch, capacity, rng) for _ in devices] for _ in range(3)]
    model = _model(tables, dim, args.backend)
    loss_fn, n = _loss(model), len(devices)
    record.update(
        tables=len(tables), rows=[t.num_embeddings for t in tables], dim=dim,
        batch_per_device=batch, ids_capacity_per_device=capacity,
        table_gbytes=sum(t.num_embeddings for t in tables) * dim * 4 / 1e9,
    )  # fmt: skip

    # the planner's plan over every device, the input all-to-all sized from the pooling factors
    mesh = Mesh(np.array(devices), ("x",))
    link = record.get("all_to_all_gbytes_per_s")
    topology = Topology(
        num_devices=n, hbm_cap=args.hbm_cap,
        **({"link_bandwidth": link * 1e9} if link else {}),
    )  # fmt: skip
    pooling = {
        t.feature_names[0]: 1.0 if one else MAX_LEN / 2
        for t, one in zip(tables, _one_hot(tables), strict=True)
    }
    pools = {
        t.name: ParameterConstraints(pooling_factors=pooling[t.feature_names[0]]) for t in tables
    }
    planner = _planner(args, topology, constraints=pools)
    plan = planner.plan(tables, optimizer=model.optimizer)
    layout = ShardedLayout.create(tables, plan, n, optimizer=model.optimizer)
    cap = destination_capacity(layout, pooling, batch, headroom=args.headroom)
    record["ids_per_destination"] = cap
    record["ids_per_destination_exact_bound"] = capacity * send_capacity(layout)

    # one device: the plain model, its step and its parts
    one = devices[0]
    whole = [jax.device_put(b[0], one) for b in per_device]
    params = jax.jit(model.init, device=one)(jax.random.key(0), *whole[0][:2])["params"]
    tx = _tx()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def single_step(p, o, *b):
        loss, grads = jax.value_and_grad(loss_fn)(p, *b)
        updates, o = tx.update(grads, o, p)
        return jaxrec.optim.apply_updates(p, updates), o, loss

    one_parts = _one_gpu_breakdown(
        model, params["sparse_arch"]["embedding_bags"], whole[0][1], args.iters, n * cap
    )
    record["one_gpu_step_ms"] = _time_stateful(
        single_step, (params, tx.init(params)), whole, args.iters
    )
    del params, whole  # donated to the timed steps
    record["one_gpu_dense_ms"] = _dense_ms(model, tables, dim, batch, args.iters)
    one_parts["dense_and_optimizer_ms"] = record["one_gpu_dense_ms"]
    record["one_gpu"] = one_parts

    dmp = DistributedModelParallel(
        model, mesh, plan=plan, ids_per_destination=cap, comm_dtype=args.comm_dtype
    )
    record["comm_dtype"] = args.comm_dtype
    batches = [dmp.shard_batch(b) for b in per_device]
    variables = dmp.init(jax.random.key(0), *batches[0][:2])
    record["plan"] = {name: [s.sharding_type.value, list(s.ranks)] for name, s in plan.items()}
    report = planner.explain(tables, plan, optimizer=model.optimizer)
    record["plan_report"] = str(report)
    record["planned_comm_ms"] = (report.comm_seconds * 1e3).tolist()
    spec = ShardedLookupSpec.create(
        layout, tuple(pooling), batch_size=batch, axis="x", backend=args.backend,
        ids_per_destination=cap, comm_dtype=args.comm_dtype,
    )  # fmt: skip
    step = dmp.make_train_step(loss_fn, tx)
    state = (variables["params"], dmp.init_optimizer(tx, variables["params"]))
    parts = _breakdown(dmp, spec, state[0], batches[0][1], args.iters, args.trace)
    parts["dense_and_optimizer_ms"] = _dense_ms(model, tables, dim, batch, args.iters, mesh)
    record["sharded_step_ms"] = _time_stateful(step, state, batches, args.iters)
    timed = ["input_dist_ms", "owner_lookup_forward_ms", "output_dist_ms", "gradient_dist_ms"]
    timed += ["backward_fused_update_ms", "dense_and_optimizer_ms"]  # the step's parts
    parts["parts_sum_ms"] = sum(parts[k] for k in timed)
    parts["step_over_parts_sum"] = record["sharded_step_ms"] / parts["parts_sum_ms"]
    parts["share_of_parts_sum"] = {k: parts[k] / parts["parts_sum_ms"] for k in timed}
    comms = parts["input_dist_ms"] + parts["output_dist_ms"] + parts["gradient_dist_ms"]
    parts["redistribution_ms"] = comms  # input + output + gradient distribution
    record["sharded"] = parts
    record["redistribution_share"] = comms / record["sharded_step_ms"]
    record["per_gpu_throughput_vs_one_gpu"] = record["one_gpu_step_ms"] / record["sharded_step_ms"]
    record["examples_per_s"] = n * batch / (record["sharded_step_ms"] * 1e-3)
    record["one_gpu_examples_per_s"] = batch / (record["one_gpu_step_ms"] * 1e-3)
    record["owner_vs_one_gpu"] = {
        "forward": parts["owner_lookup_forward_ms"] / one_parts["embedding_forward_ms"],
        "backward_fused_update": parts["backward_fused_update_ms"]
        / one_parts["backward_fused_update_ms"],
        "backward_fused_update_device0_alone": parts["backward_fused_update_device0_alone_ms"]
        / one_parts["backward_fused_update_ms"],
        "live_ids": max(parts["owner_ids_live"]) / one_parts["ids_live"],
        "ids_capacity": parts["owner_ids_capacity"] / one_parts["ids_capacity"],
    }
    gd, od = parts["gradient_dist_ms"], parts["output_dist_ms"]
    record["gradient_over_output_dist"] = {
        "time": gd / od,
        "collective_bytes": parts["gradient_dist_collective_bytes"]
        / max(parts["output_dist_collective_bytes"], 1),
    }


# ---- capacity -----------------------------------------------------------------------------
def capacity(args, devices, record) -> None:
    dim, batch = args.dim, args.batch
    count = 26
    rows = int(args.capacity_gb * 1e9 / (count * dim * 4))
    tables = _tables([rows] * count, dim)
    model = _model(tables, dim, args.backend)
    record.update(tables=count, rows_per_table=rows, dim=dim, batch_per_device=batch,
                  table_gbytes=rows * count * dim * 4 / 1e9)  # fmt: skip
    try:
        _planner(args, Topology(num_devices=1, hbm_cap=args.hbm_cap)).plan(
            tables, optimizer=model.optimizer
        )
        record["one_gpu_planner"] = "placed (the tables fit one device: raise --capacity-gb)"
    except ValueError as refused:
        record["one_gpu_planner"] = f"refused: {refused}"
    planner, dmp = _row_wise(args, tables, model, devices)
    rng = np.random.default_rng(0)
    cap = _capacity(tables, batch)
    batches = [
        dmp.shard_batch([_device_batch(tables, batch, cap, rng) for _ in devices]) for _ in range(3)
    ]
    variables = dmp.init(jax.random.key(0), *batches[0][:2])
    plan = dmp.plans["sparse_arch"]
    record["plan"] = {name: [s.sharding_type.value, list(s.ranks)] for name, s in plan.items()}
    record["plan_report"] = str(planner.explain(tables, plan, optimizer=model.optimizer))
    tx = _tx()
    step = dmp.make_train_step(_loss(model), tx)
    params, opt = variables["params"], dmp.init_optimizer(tx, variables["params"])
    losses = []
    for b in batches:
        params, opt, loss = step(params, opt, *b)
        losses.append(float(loss))
    record["losses"] = losses
    record["ok"] = bool(np.all(np.isfinite(losses))) and record["one_gpu_planner"].startswith(
        "refused"
    )


def _row_wise(args, tables, model, devices):
    """``(planner, dmp)`` placing equal tables row-wise over ``devices``: row-wise balances
    them exactly (a greedy table-wise packing strands a table's worth of free memory on each
    device)."""
    rows_only = ParameterConstraints(sharding_types=(ShardingType.ROW_WISE,))
    planner = _planner(
        args,
        Topology(num_devices=len(devices), hbm_cap=args.hbm_cap),
        constraints={t.name: rows_only for t in tables},
    )
    mesh = Mesh(np.array(devices), ("x",))
    return planner, DistributedModelParallel(model, mesh, plan=planner)


# ---- checkpoint ---------------------------------------------------------------------------
def _sample_rows(tree, rows_per_leaf: int, seed: int = 0) -> list[np.ndarray]:
    """The same random rows of every array leaf with rows (on the host), in leaf order."""
    rng = np.random.default_rng(seed)
    out = []
    for leaf in jax.tree.leaves(tree):
        if getattr(leaf, "ndim", 0) == 0:
            out.append(np.asarray(leaf))
            continue
        take = np.sort(rng.choice(leaf.shape[0], min(rows_per_leaf, leaf.shape[0]), False))
        out.append(np.asarray(jax.jit(lambda x, i: x[i])(leaf, jnp.asarray(take))))
    return out


def checkpoint(args, devices, record) -> None:
    """A sharded orbax checkpoint (:mod:`jaxrec.checkpoint`) of 26 equal row-wise tables
    totalling ``--checkpoint-gb`` (fused row-wise Adagrad state beside them): save and
    restore timed (each until the files are complete / the arrays are ready), the restored
    tables and states compared bitwise with the saved ones on ``--sample-rows`` random rows
    of every stacked group. Written under ``--checkpoint-dir`` (a fresh temporary folder by
    default, never under ``--out``) and removed at the end."""
    import shutil
    import tempfile
    import time

    from jaxrec.checkpoint import CheckpointManager, TableLayout

    dim, n, count = args.dim, len(devices), 26
    rows = int(args.checkpoint_gb * 1e9 / (count * dim * 4))
    tables = _tables([rows] * count, dim)
    model = _model(tables, dim, args.backend)
    planner, dmp = _row_wise(args, tables, model, devices)
    mesh = dmp.mesh
    rng = np.random.default_rng(0)
    batch = dmp.shard_batch(
        [_device_batch(tables, args.batch, _capacity(tables, args.batch), rng) for _ in devices]
    )
    state = {"params": dmp.init(jax.random.key(0), *batch[:2])["params"]}
    jax.block_until_ready(state)
    (path, layout), *_ = dmp.layouts.items()
    params_path = ("params", *path.split("/"), "embedding_bags")  # the EBC's variables
    layouts = [TableLayout.sharded(params_path, layout, mesh, "x")]
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    record.update(tables=count, rows_per_table=rows, dim=dim, devices=n,
                  table_gbytes=rows * count * dim * 4 / 1e9, state_gbytes=nbytes / 1e9)  # fmt: skip
    sample = _sample_rows(state, args.sample_rows)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    folder = tempfile.mkdtemp(prefix="jaxrec_ckpt_", dir=args.checkpoint_dir)
    try:
        with CheckpointManager(folder, max_to_keep=1) as manager:
            start = time.perf_counter()
            manager.save(1, state, layouts)
            manager.wait_until_finished()
            record["save_s"] = time.perf_counter() - start
            del state  # the restore needs the room
            on_disk = sum(
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
            )
            record["checkpoint_gbytes_on_disk"] = on_disk / 1e9
            start = time.perf_counter()
            restored = manager.restore(target, layouts)
            jax.block_until_ready(restored.state)
            record["restore_s"] = time.perf_counter() - start
        got = _sample_rows(restored.state, args.sample_rows)
        record["sampled_leaves"] = len(got)
        record["bitwise_equal"] = all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(sample, got, strict=True)
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record["save_gbytes_per_s"] = record["checkpoint_gbytes_on_disk"] / record["save_s"]
    record["restore_gbytes_per_s"] = record["checkpoint_gbytes_on_disk"] / record["restore_s"]
    record["ok"] = record["bitwise_equal"]
    record["plan_report"] = str(planner.explain(tables, dmp.plans[path], optimizer=model.optimizer))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--mode", choices=("scaling", "capacity", "checkpoint"), default="scaling")
    parser.add_argument("--max-rows", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16_384)
    parser.add_argument("--capacity-gb", type=float, default=160.0)
    parser.add_argument(
        "--checkpoint-gb", type=float, default=40.0, help="--mode checkpoint: GB of fp32 tables"
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where the checkpoint is written (default: a temp dir)",
    )
    parser.add_argument("--sample-rows", type=int, default=4096, help="rows compared per group")
    parser.add_argument(
        "--hbm-cap", type=int, default=None, help="bytes per device (default: measured)"
    )
    parser.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    parser.add_argument("--link-mbytes", type=float, default=256.0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--trace", default=None,
        help="--mode scaling: profile the input distribution into this folder and report "
        "its busiest kernels",
    )  # fmt: skip
    parser.add_argument(
        "--comm-dtype", default=None, choices=COMM_DTYPES,
        help="--mode scaling: pooled outputs and their gradients travel in 16 bits",
    )  # fmt: skip
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--headroom", type=float, default=1.1,
        help="ids_per_destination: expected ids per destination times this",
    )  # fmt: skip
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (the test suite)")
    parser.add_argument(
        "--quick", action="store_true",
        help="3 timing iterations, 64 MB bandwidth buffers (a scaling run in under 3 minutes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.link_mbytes = 3, min(args.link_mbytes, 64.0)
    if args.small:
        args.max_rows, args.dim, args.batch, args.link_mbytes = 2000, 8, 16, 1.0
        args.capacity_gb, args.iters, args.backend = 0.014, 2, "xla"
        args.checkpoint_gb = min(args.checkpoint_gb, 0.014)
        args.hbm_cap = args.hbm_cap or 16 * 2**20
        args.devices = args.devices or 2
    devices = jax.devices()[: args.devices]
    if args.hbm_cap is None:
        stats = devices[0].memory_stats() or {}
        args.hbm_cap = int(stats.get("bytes_limit", 141 * 10**9))
    record: dict = {**bench.environment(), "mode": args.mode, "devices": len(devices),
                    "hbm_cap": args.hbm_cap}  # fmt: skip
    mesh = Mesh(np.array(devices), ("x",))
    record.update(link_bandwidth(mesh, "x", args.link_mbytes, args.iters))
    if args.mode == "scaling":
        scaling(args, devices, record)
        record["ok"] = True
    elif args.mode == "capacity":
        capacity(args, devices, record)
    else:
        checkpoint(args, devices, record)
    print(json.dumps({k: v for k, v in record.items() if k != "plan_report"}, indent=1))
    print(record["plan_report"])
    with open(os.path.join(args.out, "gpu_check_scaling.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
