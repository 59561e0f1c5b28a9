"""DLRM train step on one GPU: the step against its parts and against torch,
``python -m benchmarks.gpu_check_dlrm --out OUT``.

The model: :class:`jaxrec.models.DLRM` over 26 tables with Criteo 1TB's cardinalities capped
at ``--max-rows`` (1M), dim 128, fp32, fused row-wise Adagrad (lr 0.01) on the tables and
``optax.adagrad`` (lr 0.01) on the dense layers; the MLP shapes of TorchRec's DLRM example
(bottom 13 -> 512 -> 256 -> 128, top -> 1024 -> 1024 -> 512 -> 256 -> 1) in jaxrec's layout
(ReLU between layers, none after an MLP's last layer); DLRM's dot interactions. One batch of
``--batch`` (65,536) examples: tables of fewer than 1,000 rows one-hot, the others bags of
length uniform in [0, ``--max-len``] (mean 20; ``--max-len 1`` makes every feature one-hot),
ids uniform in each table, 13 normal dense features, random labels; two such batches rotate.

Timed in one process on the same batches (median ms after warmup; every array a jitted
function reads is an argument, never a closed-over constant):

- ``jaxrec_step_ms``: the full jitted train step (params and optimizer state donated);
- ``jaxrec_embedding_ms``: the EmbeddingBagCollection alone, forward and the backward with
  the fused update, given a fixed cotangent of its pooled output;
- ``jaxrec_dense_ms``: the dense part alone: MLPs and interactions forward and backward from
  pooled rows given as an input, the loss, the gradients of the pooled rows, Adagrad;
- ``step_over_parts``: the step over the sum of the two parts (target <= 1.2);
- ``torch_step_ms``: the same model in torch, one ``nn.EmbeddingBag(mode="sum",
  sparse=True)`` per table updated by ``torch.optim.Adagrad`` (torch has no row-wise sparse
  Adagrad: this is its element-wise sparse Adagrad), dense layers by ``torch.optim.Adagrad``,
  CUDA events around each step; TF32 matmuls allowed, as JAX's default precision;
- ``speedup_vs_torch``: torch's step over jaxrec's (target >= 2);
- ``copy_gbytes_per_s``: the JAX device copy (bytes read + written).

Checked in the same run: the step's compiled HLO holds no copy of the stacked table; the
losses of two runs of three steps from the same initial state are finite and equal; torch's
first loss, with its tables and layers loaded from jaxrec's initial values, matches jaxrec's.
Writes ``gpu_check_dlrm.json`` to ``--out``; exits 1 when a check fails. About 2 minutes on
an H200, compilation included. ``--small`` runs the same code on the CPU with tiny shapes
(the test suite does); torch then runs on the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxrec  # noqa: E402
from jaxrec import EmbeddingBagConfig, KeyedJaggedTensor, bench, pad_to_capacity  # noqa: E402
from jaxrec.models.dlrm import DLRM, MLP, dot_interactions  # noqa: E402

# Criteo 1TB's 26 categorical cardinalities.
CRITEO = (39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346,
          10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108,
          36)  # fmt: skip
ONE_HOT_BELOW, DENSE, LR = 1000, 13, 0.01


def _tables(args) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=f"t{i}",
            embedding_dim=args.dim,
            num_embeddings=min(c, args.max_rows),
            feature_names=[f"f{i}"],
        )
        for i, c in enumerate(CRITEO)
    ]


def _batches(tables, args, count: int = 2) -> list[tuple]:
    """``count`` batches (dense, KJT padded to one capacity, labels) as NumPy leaves."""
    rng = np.random.default_rng(0)
    raw = []
    for _ in range(count):
        one_hot = [t.num_embeddings < ONE_HOT_BELOW or args.max_len == 1 for t in tables]
        lengths = np.concatenate(
            [
                np.ones(args.batch, np.int64)
                if one
                else rng.integers(0, args.max_len + 1, args.batch)
                for one in one_hot
            ]
        )
        highs = np.repeat(np.repeat([t.num_embeddings for t in tables], args.batch), lengths)
        ids = (rng.random(int(lengths.sum())) * highs).astype(np.int32)
        kjt = KeyedJaggedTensor([f"f{i}" for i in range(len(tables))], ids, lengths=lengths)
        dense = rng.normal(size=(args.batch, DENSE)).astype(np.float32)
        labels = rng.integers(0, 2, args.batch).astype(np.float32)
        raw.append((dense, kjt, labels))
    capacity = max(k.capacity() for _, k, _ in raw)
    return [(d, pad_to_capacity(k, capacity), y) for d, k, y in raw]


def _model(tables, args) -> DLRM:
    return DLRM(
        tables=tables,
        bottom_mlp=(*args.bottom_mlp, args.dim),
        top_mlp=tuple(args.top_mlp),
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=LR),
        backend=args.backend,
    )


def _bce(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def _tx() -> optax.GradientTransformation:
    return jaxrec.optim.fused(optax.adagrad(LR))


def _time_stateful(step, state, arg_sets, iters: int) -> float:
    """Median ms of ``state = step(*state, *args)`` (the donated state carried along)."""
    holder = [state]

    def run(*args):
        holder[0] = step(*holder[0], *args)[: len(holder[0])]
        return holder[0]

    ms = bench.time_op(run, arg_sets, iters=iters, warmup=2)
    holder.clear()
    return ms


def jaxrec_step(model, batches, args, record) -> dict:
    """Compile the full train step once (HLO checked for table copies), run it twice three
    steps from the same initial state (losses recorded), then time it."""

    def loss_fn(params, dense, kjt, labels):
        return _bce(model.apply({"params": params}, dense, kjt), labels)

    tx = _tx()

    def step(p, o, dense, kjt, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, dense, kjt, labels)
        updates, o = tx.update(grads, o, p)
        return jaxrec.optim.apply_updates(p, updates), o, loss

    init = jax.jit(model.init)
    device_batches = [jax.device_put(b) for b in batches]
    params = init(jax.random.key(0), *device_batches[0][:2])["params"]
    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), *device_batches[0])
    ).compile()
    record["jaxrec_step_compile_s"] = time.perf_counter() - t0
    rows = sum(t.num_embeddings for t in model.tables)
    record["hlo_copies_of_table"] = sum(
        1
        for line in compiled.as_text().splitlines()
        if " copy(" in line and f"{rows},{args.dim}]" in line
    )
    initial = jax.tree.map(np.asarray, params)  # for torch (host copy, before donation)
    runs = []
    for _ in range(2):
        p = init(jax.random.key(0), *device_batches[0][:2])["params"]
        o = tx.init(p)
        losses = []
        for i in range(3):
            p, o, loss = compiled(p, o, *device_batches[i % len(device_batches)])
            losses.append(loss)
        runs.append([float(v) for v in losses])
    record["losses_run_1"], record["losses_run_2"] = runs
    record["losses_finite"] = bool(np.all(np.isfinite(runs)))
    record["losses_equal"] = runs[0] == runs[1]
    record["losses_max_relative_difference"] = max(
        abs(a - b) / max(abs(b), 1e-30) for a, b in zip(runs[0], runs[1], strict=True)
    )
    record["jaxrec_step_ms"] = _time_stateful(compiled, (p, o), device_batches, args.iters)
    del p, o, params
    return initial


def jaxrec_embedding_ms(tables, batches, args) -> float:
    """The EBC alone: forward, and backward with the fused update on donated tables."""
    ebc = jaxrec.EmbeddingBagCollection(
        tables=tables,
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=LR),
        backend=args.backend,
    )
    kjts = [jax.device_put(b[1]) for b in batches]
    params = jax.jit(ebc.init)(jax.random.key(0), kjts[0])["params"]
    tx = _tx()
    g = jax.random.normal(jax.random.key(1), (args.batch, len(tables) * args.dim), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, kjt, g):
        grads = jax.grad(lambda p: jnp.vdot(ebc.apply({"params": p}, kjt).values(), g))(p)
        updates, o = tx.update(grads, o, p)
        return jaxrec.optim.apply_updates(p, updates), o

    return _time_stateful(step, (params, tx.init(params)), [(k, g) for k in kjts], args.iters)


def jaxrec_dense_ms(model, batches, args) -> float:
    """The dense part alone: pooled rows in, their gradient out, Adagrad on the MLPs."""
    bottom, top = MLP(model.bottom_mlp), MLP(model.top_mlp)
    f = len(model.tables)
    rng = np.random.default_rng(1)
    pooled = [
        jnp.asarray(rng.normal(size=(args.batch, f, args.dim)).astype(np.float32)) for _ in batches
    ]
    dense = [jnp.asarray(b[0]) for b in batches]
    labels = [jnp.asarray(b[2]) for b in batches]
    pb = bottom.init(jax.random.key(0), dense[0])
    pt = top.init(jax.random.key(1), dot_interactions(bottom.apply(pb, dense[0]), pooled[0]))
    tx = optax.adagrad(LR)

    def loss(params, dense, pooled, labels):
        pb, pt = params
        logits = top.apply(pt, dot_interactions(bottom.apply(pb, dense), pooled))[:, 0]
        return _bce(logits, labels)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, dense, pooled, labels):
        grads, g_pooled = jax.grad(loss, argnums=(0, 2))(params, dense, pooled, labels)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, g_pooled

    params = (pb, pt)
    arg_sets = list(zip(dense, pooled, labels, strict=True))
    return _time_stateful(step, (params, tx.init(params)), arg_sets, args.iters)


def _torch_model(torch, tables, model, initial, device):
    """The DLRM in torch, loaded from jaxrec's initial tables and layers."""
    nn = torch.nn

    def mlp(prefix, widths, width_in):
        layers = []
        for i, width in enumerate(widths):
            linear = nn.Linear(width_in, width)
            kernel = initial[prefix][f"Dense_{i}"]
            linear.weight.data = torch.from_numpy(np.array(kernel["kernel"].T))
            linear.bias.data = torch.from_numpy(np.array(kernel["bias"]))
            layers.append(linear)
            if i + 1 < len(widths):
                layers.append(nn.ReLU())
            width_in = width
        return nn.Sequential(*layers)

    ebc = jaxrec.EmbeddingBagCollection(tables=tables)
    weights = ebc.state_dict({"params": initial["sparse_arch"]})
    f, dim = len(tables), tables[0].embedding_dim

    class TorchDLRM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = nn.ModuleList()
            for t in tables:
                bag = nn.EmbeddingBag(t.num_embeddings, dim, mode="sum", sparse=True)
                weight = np.array(weights[f"embedding_bags.{t.name}.weight"])  # a writable copy
                bag.weight.data = torch.from_numpy(weight)
                self.tables.append(bag)
            self.bottom = mlp("dense_arch", model.bottom_mlp, DENSE)
            self.top = mlp("over_arch", model.top_mlp, dim + (f + 1) * f // 2)
            self.rows, self.cols = torch.triu_indices(f + 1, f + 1, 1)

        def forward(self, dense, ids, offsets):
            b = self.bottom(dense)
            pooled = [t(i, o) for t, i, o in zip(self.tables, ids, offsets, strict=True)]
            stacked = torch.stack([b, *pooled], dim=1)
            dots = torch.bmm(stacked, stacked.transpose(1, 2))
            z = torch.cat([b, dots[:, self.rows, self.cols]], dim=1)
            return self.top(z)[:, 0]

    return TorchDLRM().to(device)


def _torch_inputs(torch, batch, num_features, device):
    dense, kjt, labels = batch
    lengths = np.asarray(kjt.lengths()).reshape(num_features, -1)
    values = np.asarray(kjt.values())[: int(lengths.sum())].astype(np.int64)
    ends = np.cumsum(lengths.sum(axis=1))
    ids = [torch.from_numpy(v).to(device) for v in np.split(values, ends[:-1])]
    offsets = [
        torch.from_numpy(np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)).to(device)
        for n in lengths
    ]
    return torch.from_numpy(dense).to(device), ids, offsets, torch.from_numpy(labels).to(device)


def torch_peer(tables, model, initial, batches, args, record) -> None:
    """torch's step on the same batches from the same initial values (CUDA if present)."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # torch's thread pool thrashes a busy host
    record["torch_device"] = torch.cuda.get_device_name() if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    net = _torch_model(torch, tables, model, initial, device)
    sparse = torch.optim.Adagrad(net.tables.parameters(), lr=LR)
    dense = torch.optim.Adagrad([*net.bottom.parameters(), *net.top.parameters()], lr=LR)
    inputs = [_torch_inputs(torch, b, len(tables), device) for b in batches]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def step(x, ids, offsets, y):
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        loss = bce(net(x, ids, offsets), y)
        loss.backward()
        sparse.step()
        dense.step()
        return loss

    first = float(step(*inputs[0]).detach())
    record["torch_first_loss"] = first
    record["torch_first_loss_relative_difference"] = abs(first - record["losses_run_1"][0]) / max(
        abs(record["losses_run_1"][0]), 1e-30
    )
    for i in range(2):
        step(*inputs[i % 2])
    times = []
    for i in range(args.iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(*inputs[i % 2])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            loss = step(*inputs[i % 2])
            times.append((time.perf_counter() - t0) * 1e3)
    record["torch_losses_finite"] = bool(np.isfinite(float(loss.detach())))
    record["torch_step_ms"] = statistics.median(times)


def run(args) -> dict:
    tables = _tables(args)
    model = _model(tables, args)
    batches = _batches(tables, args)
    record: dict = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "tables": len(tables),
        "rows": [t.num_embeddings for t in tables],
        "dim": args.dim,
        "batch": args.batch,
        "max_len": args.max_len,
        "ids_per_batch": int(np.asarray(batches[0][1].lengths()).sum()),
        "bottom_mlp": list(model.bottom_mlp),
        "top_mlp": list(model.top_mlp),
        "table_gbytes": sum(t.num_embeddings for t in tables) * args.dim * 4 / 1e9,
    }
    t0 = time.perf_counter()
    initial = jaxrec_step(model, batches, args, record)
    record["jaxrec_embedding_ms"] = jaxrec_embedding_ms(tables, batches, args)
    record["jaxrec_dense_ms"] = jaxrec_dense_ms(model, batches, args)
    parts = record["jaxrec_embedding_ms"] + record["jaxrec_dense_ms"]
    record["parts_sum_ms"] = parts
    record["step_over_parts"] = record["jaxrec_step_ms"] / parts
    record["copy_gbytes_per_s"] = bench.copy_bandwidth(args.copy_mbytes << 20, iters=args.iters)
    record["jaxrec_seconds"] = time.perf_counter() - t0
    if not args.no_torch:
        torch_peer(tables, model, initial, batches, args, record)
        record["speedup_vs_torch"] = record["torch_step_ms"] / record["jaxrec_step_ms"]
    return record


def failures(record: dict, small: bool) -> list[str]:
    """The checks of a run that did not hold (timings are reported, not judged)."""
    bad = []
    if record["hlo_copies_of_table"]:
        bad.append(f"the step's HLO copies the table {record['hlo_copies_of_table']} times")
    if not record["losses_finite"]:
        bad.append(f"non-finite losses {record['losses_run_1']}")
    if record["losses_max_relative_difference"] > 1e-6:
        bad.append(f"two runs differ: {record['losses_run_1']} vs {record['losses_run_2']}")
    if "torch_first_loss" in record:
        tolerance = 1e-5 if small else 1e-2  # TF32 matmuls on the GPU
        if record["torch_first_loss_relative_difference"] > tolerance:
            bad.append(
                f"torch's first loss {record['torch_first_loss']} is not jaxrec's "
                f"{record['losses_run_1'][0]}"
            )
        if not record["torch_losses_finite"]:
            bad.append("torch's loss is not finite")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check_dlrm.json")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--max-len", type=int, default=40, help="longest multi-hot bag")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backend", default="auto", choices=("auto", "pallas", "xla"))
    parser.add_argument("--no-torch", action="store_true", help="skip the torch peer")
    parser.add_argument("--copy-mbytes", type=int, default=1024)
    args = parser.parse_args(argv)
    args.bottom_mlp, args.top_mlp = (512, 256), (1024, 1024, 512, 256, 1)
    if args.small:
        args.max_rows, args.dim, args.batch, args.max_len = 2000, 8, 32, 4
        args.bottom_mlp, args.top_mlp = (16,), (32, 16, 1)
        args.iters, args.copy_mbytes = 3, 4
    record = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = failures(record, args.small)
    record["failures"] = bad
    (out / "gpu_check_dlrm.json").write_text(json.dumps(record, indent=1))
    for key, value in record.items():
        if key not in ("rows", "losses_run_2"):
            print(f"{key}: {value}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
