"""Check and time what a user runs on a GPU: ``python -m benchmarks.gpu_check_modules``.

Sections (``--sections``, comma-separated):

- ``modules``: the collections on fresh random inputs (mixed dims, shared tables, MEAN,
  per-sample weights, padding): Pallas (the GPU default) against the XLA backend (float32 to
  1e-5 relative; fp16 and bf16 tables with 16-bit outputs within 1 ulp); a fused
  row-wise Adagrad training loop through the modules and ``jaxrec.optim.fused`` on both
  backends; two runs from the same start give bitwise-equal tables.
- ``sequence``: launch variants of the sequence kernel against the XLA reference on the
  "large" ids (32 x 1M x 128, B=8192, bags 0..40), with the copy bandwidth of the same run.
- ``train``: the full train step as a user writes it (EBC with a fused optimizer, loss =
  sum(out * G), ``jax.grad`` + ``fused(optax)`` + ``apply_updates``, jit with donation) on
  8 tables x {100k, 1M, 2M} rows x 128, B=8192, fp32 and bf16 with stochastic rounding;
  peers in the same run: ``jax.grad`` of the table + ``optax.adagrad``, and a plain-XLA
  sparse step (unique + segment_sum + scatter, donated).

Writes ``gpu_check_modules.json`` to ``--out`` (default ``$OUT``). ``--sections modules
--small`` runs the first section on a CPU (Pallas in interpret mode), as the test suite does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxrec_kernels.sequence_lookup import SequenceConfig
from jaxrec_kernels.ulps import rounded_once_ulps

import jaxrec
from benchmarks._common import relative_error
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
    bench,
    pad_to_capacity,
)


def _random_kjt(rng, keys, rows, batch, max_len, weighted=False, capacity=None):
    lengths = rng.integers(0, max_len + 1, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[k * batch : (k + 1) * batch].sum())
            for k in range(len(keys))
        ]
    )
    weights = rng.uniform(0.5, 1.5, values.shape).astype(np.float32) if weighted else None
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
    return pad_to_capacity(kjt, capacity)


def _ulps(a, b) -> float:
    """Largest distance in ulps of 16-bit outputs (both round a float32 sum once)."""
    return float(rounded_once_ulps(np.asarray(a), np.asarray(b, np.float64), a.dtype).max())


def check_modules(seed: int, small: bool = False) -> dict:
    """Pallas against XLA through the collections; ``small``: CPU-sized inputs, the Pallas
    collections in interpret mode (``backend="pallas"``), for a smoke test of this check."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    # small: 4 features x 16 bags of at most 8 ids fill the capacity of 512 at most; tables
    # of a tenth of the rows (interpret mode's cost grows with them).
    batch, max_len, capacity = (16, 8, 512) if small else (256, 30, 32768)
    pallas_backend = "pallas" if small else "auto"  # auto: Pallas on GPU
    a_rows, b_rows, c_rows, e_rows = (500, 2000, 300, 700) if small else (5000, 20000, 300, 7000)
    tables = [
        EmbeddingBagConfig(
            name="a", embedding_dim=24, num_embeddings=a_rows, feature_names=["fa", "fb"]
        ),
        EmbeddingBagConfig(
            name="b", embedding_dim=128, num_embeddings=b_rows, feature_names=["fc"]
        ),
        EmbeddingBagConfig(
            name="c",
            embedding_dim=48,
            num_embeddings=c_rows,
            feature_names=["fd"],
            pooling=PoolingType.MEAN,
        ),
    ]
    keys, rows = ["fa", "fb", "fc", "fd"], [a_rows, a_rows, b_rows, c_rows]
    for weighted in (False, True):
        kjt = _random_kjt(rng, keys, rows, batch, max_len, weighted)
        pallas = EmbeddingBagCollection(tables=tables, is_weighted=weighted, backend=pallas_backend)
        xla = EmbeddingBagCollection(tables=tables, is_weighted=weighted, backend="xla")
        variables = jax.jit(xla.init)(jax.random.key(seed), kjt)
        a = jax.jit(pallas.apply)(variables, kjt).values()
        b = jax.jit(xla.apply)(variables, kjt).values()
        out[f"ebc_weighted={weighted}_relerr"] = relative_error(a, b)
    # 16-bit tables, long weighted bags, 16-bit outputs: within 1 ulp (a kernel that summed
    # in 16 bits would be several ulps off).
    for name, data_type in (("fp16", jaxrec.DataType.FP16), ("bf16", jaxrec.DataType.BF16)):
        low = [dataclasses.replace(t, data_type=data_type) for t in tables]
        dtype = {"fp16": jnp.float16, "bf16": jnp.bfloat16}[name]
        kjt = _random_kjt(rng, keys, rows, batch, 2 * max_len, weighted=True)
        collections = [
            EmbeddingBagCollection(
                tables=low, is_weighted=True, backend=backend, output_dtype=dtype
            )
            for backend in (pallas_backend, "xla")
        ]
        variables = jax.jit(collections[1].init)(jax.random.key(seed), kjt)
        a, b = (jax.jit(c.apply)(variables, kjt).values() for c in collections)
        out[f"ebc_{name}_max_ulps"] = _ulps(a, b)
    ec_tables = [
        EmbeddingConfig(name="e", embedding_dim=64, num_embeddings=e_rows, feature_names=["x", "y"])
    ]
    kjt = _random_kjt(rng, ["x", "y"], [e_rows, e_rows], batch // 2, max_len)
    ec_p, ec_x = (
        EmbeddingCollection(tables=ec_tables, backend="pallas"),
        EmbeddingCollection(tables=ec_tables, backend="xla"),
    )
    variables = jax.jit(ec_x.init)(jax.random.key(seed), kjt)
    a, b = jax.jit(ec_p.apply)(variables, kjt), jax.jit(ec_x.apply)(variables, kjt)
    out["ec_relerr"] = max(relative_error(a[k].values(), b[k].values()) for k in a)

    # Fused training through the modules, both backends, 3 steps.
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.05)
    batches = [_random_kjt(rng, keys, rows, batch, max_len, capacity=capacity) for _ in range(3)]
    g_outs = [
        jnp.asarray(rng.normal(size=(batch, 24 * 2 + 128 + 48)), jnp.float32) for _ in range(3)
    ]
    finals = {}
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    steps = {}
    # The Pallas run is repeated with the same compiled step: its tables must match bit
    # for bit (no order-dependent accumulation in the fused backward).
    for backend in ("pallas", "xla", "pallas-again"):
        name = pallas_backend if backend.startswith("pallas") else backend
        ebc = EmbeddingBagCollection(tables=tables, optimizer=optimizer, backend=name)
        params = jax.jit(ebc.init)(jax.random.key(seed), batches[0])["params"]
        opt_state = tx.init(params)
        if name not in steps:

            @functools.partial(jax.jit, donate_argnums=(0, 1))
            def step(params, opt_state, kjt, g, ebc=ebc):
                loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)  # noqa: E731
                updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
                return jaxrec.optim.apply_updates(params, updates), opt_state

            steps[name] = step
        step = steps[name]
        for kjt, g in zip(batches, g_outs, strict=True):
            params, opt_state = step(params, opt_state, kjt, g)
        finals[backend] = {k: np.asarray(v) for k, v in ebc.state_dict({"params": params}).items()}
    out["fused_train_pallas_vs_xla_relerr"] = max(
        relative_error(finals["pallas"][k], finals["xla"][k]) for k in finals["xla"]
    )
    out["fused_train_bitwise_deterministic"] = all(
        np.array_equal(finals["pallas"][k], finals["pallas-again"][k]) for k in finals["xla"]
    )
    out["ok"] = (
        max(v for k, v in out.items() if k.endswith("relerr")) < 1e-5
        and max(v for k, v in out.items() if k.endswith("max_ulps")) <= 1
        and out["fused_train_bitwise_deterministic"]
    )
    return out


SEQUENCE_VARIANTS = {
    "default": None,
    "default-again": None,  # the same shape timed twice: the spread is the noise
    "64x8x8w": SequenceConfig(64, 8, 8, 2),
    "16x8x4w": SequenceConfig(16, 8, 4, 2),
    "32x16x4w": SequenceConfig(32, 16, 4, 2),
}


def check_sequence(seed: int, iters: int) -> dict:
    inputs = bench.make_inputs(
        bench.SHAPES["large"], "fp32", weighted=False, seed=seed, rotations=2
    )
    nbytes = bench.sequence_bytes(inputs, "fp32")
    copy = bench.copy_bandwidth(2 * 1024**3)
    results: dict = {"copy_GBps": copy, "bytes": nbytes, "lookups": inputs.num_lookups}
    args = [(i, o, None) for i, o in zip(inputs.ids, inputs.offsets, strict=True)]
    reference = bench.sequence_fn(inputs, "xla-reference")
    want = reference(*args[0])
    for name, cfg in [("xla-reference", None), *SEQUENCE_VARIANTS.items()]:
        if name == "xla-reference":
            fn = reference
        else:
            fn = bench.sequence_fn(inputs, "pallas", config=(lambda g, cfg=cfg: cfg))
        try:
            got = fn(*args[0])
            err = max(relative_error(a, b) for a, b in zip(got, want, strict=True))
            ms = bench.time_op(fn, args, iters=iters)
            results[name] = {
                "ms": ms,
                "GBps": nbytes / ms / 1e6,
                "pct_copy": 100 * nbytes / ms / 1e6 / copy,
                "relerr": err,
            }
        except Exception as exc:  # a variant that fails to compile is reported, not fatal
            results[name] = {"error": repr(exc)[:400]}
    return results


def _train_inputs(rows: int, seed: int, rotations: int = 2):
    shape = bench.BenchShape(f"train-{rows}", ((rows, 128),) * 8, 8192, 20)
    rng = np.random.default_rng(seed)
    kjts = []
    for _ in range(rotations):
        lengths = rng.integers(0, 41, 8 * 8192)
        values = rng.integers(0, rows, int(lengths.sum())).astype(np.int32)
        kjts.append(
            KeyedJaggedTensor(keys=[f"f{t}" for t in range(8)], values=values, lengths=lengths)
        )
    capacity = max(k.capacity() for k in kjts)
    kjts = [pad_to_capacity(k, capacity) for k in kjts]
    return shape, kjts


def time_train(rows: int, dtype: str, seed: int, iters: int, peers: bool) -> dict:
    data_type = {"fp32": jaxrec.DataType.FP32, "bf16": jaxrec.DataType.BF16}[dtype]
    tables = [
        EmbeddingBagConfig(
            name=f"t{t}",
            embedding_dim=128,
            num_embeddings=rows,
            feature_names=[f"f{t}"],
            data_type=data_type,
        )
        for t in range(8)
    ]
    ebc = EmbeddingBagCollection(
        tables=tables, optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
    )
    _, kjts = _train_inputs(rows, seed)
    g = jax.random.normal(jax.random.key(1), (8192, 8 * 128), jnp.float32)
    result = {"rows": rows, "dtype": dtype, "lookups": int(kjts[0].num_values())}
    for label, check_uses in (("jaxrec_step_ms", True), ("jaxrec_step_ms_no_use_check", False)):
        params = ebc.init(jax.random.key(0), kjts[0])["params"]
        tx = jaxrec.optim.fused(optax.sgd(0.0), check_uses=check_uses)
        opt_state = tx.init(params)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, opt_state, kjt, tx=tx):
            loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values().astype(jnp.float32) * g)
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return jaxrec.optim.apply_updates(params, updates), opt_state

        state = [params, opt_state]

        def run(kjt, state=state, step=step):
            state[0], state[1] = step(state[0], state[1], kjt)
            return state[0]

        result[label] = bench.time_op(run, [(k,) for k in kjts], iters=iters)
        compiled = step.lower(state[0], state[1], kjts[0]).compile().as_text()
        result["hlo_copies_of_table"] = sum(
            1 for line in compiled.splitlines() if " copy(" in line and f"{8 * rows},128" in line
        )
        del state, params, opt_state
    if not peers:
        return result
    # Peers, same run: what a JAX user writes without jaxrec.
    w = jax.random.normal(jax.random.key(0), (8 * rows, 128), jnp.float32) * 0.01
    host = [(np.asarray(k.values()), np.asarray(k.offsets())) for k in kjts]
    peer_args = []
    for values, offsets in host:
        n = int(offsets[-1])
        bag = np.repeat(np.arange(8 * 8192), np.diff(offsets))
        ids = values[:n] + (bag // 8192) * rows
        peer_args.append((jnp.asarray(ids, jnp.int32), jnp.asarray(bag, jnp.int32)))

    def loss_rows(rows_, bag):
        pooled = jax.ops.segment_sum(rows_, bag, num_segments=8 * 8192)
        return jnp.sum(pooled.reshape(8, 8192, 128).transpose(1, 0, 2).reshape(8192, -1) * g)

    adagrad = optax.adagrad(0.01, initial_accumulator_value=0.0, eps=1e-8)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def dense_step(w, st, ids, bag):
        grad = jax.grad(lambda w: loss_rows(jnp.take(w, ids, axis=0), bag))(w)
        u, st = adagrad.update(grad, st, w)
        return optax.apply_updates(w, u), st

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def sparse_step(w, acc, ids, bag):
        gr = jax.grad(loss_rows)(jnp.take(w, ids, axis=0), bag)
        uniq, inv = jnp.unique(ids, return_inverse=True, size=ids.shape[0], fill_value=w.shape[0])
        gs = jax.ops.segment_sum(gr, inv.reshape(-1), num_segments=ids.shape[0])
        acc = acc.at[uniq].add(jnp.mean(gs * gs, axis=1), mode="drop")
        a = jnp.take(acc, uniq, axis=0, mode="fill", fill_value=1.0)
        return w.at[uniq].add(-0.01 * gs / (jnp.sqrt(a)[:, None] + 1e-8), mode="drop"), acc

    peer_state = [w, jnp.zeros((8 * rows,), jnp.float32)]

    def run_sparse(ids, bag):
        peer_state[0], peer_state[1] = sparse_step(peer_state[0], peer_state[1], ids, bag)
        return peer_state[0]

    result["xla_sparse_step_ms"] = bench.time_op(run_sparse, peer_args, iters=iters)
    del peer_state[:]
    if rows == 1_000_000:
        result.update(time_torch_train(rows, kjts[0], iters))
    peer_state.extend([jax.random.normal(jax.random.key(0), (8 * rows, 128)) * 0.01, None])
    if rows <= 1_000_000:
        peer_state[1] = adagrad.init(peer_state[0])

        def run_dense(ids, bag):
            peer_state[0], peer_state[1] = dense_step(peer_state[0], peer_state[1], ids, bag)
            return peer_state[0]

        result["xla_dense_grad_adagrad_ms"] = bench.time_op(
            run_dense, peer_args, iters=max(5, iters // 3)
        )
    return result


def time_torch_train(rows: int, kjt: KeyedJaggedTensor, iters: int) -> dict:
    """torch ``embedding_bag`` over the 8 stacked tables + Adagrad, sparse and dense gradients."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    dev = "cuda"
    offsets = torch.as_tensor(np.asarray(kjt.offsets()), dtype=torch.int64, device=dev)
    n = int(offsets[-1])
    bag_table = torch.arange(8 * 8192, device=dev) // 8192
    lengths = offsets[1:] - offsets[:-1]
    ids = torch.as_tensor(np.asarray(kjt.values())[:n], dtype=torch.int64, device=dev)
    ids = ids + torch.repeat_interleave(bag_table, lengths) * rows
    g = torch.randn(8 * 8192, 128, device=dev)
    out = {}
    for label, sparse in (
        ("torch_sparse_adagrad_step_ms", True),
        ("torch_dense_adagrad_step_ms", False),
    ):
        weight = torch.nn.Parameter(torch.randn(8 * rows, 128, device=dev) * 0.01)
        opt = torch.optim.Adagrad([weight], lr=0.01)

        def step(weight=weight, opt=opt, sparse=sparse):
            opt.zero_grad(set_to_none=True)
            pooled = F.embedding_bag(ids, weight, offsets[:-1], mode="sum", sparse=sparse)
            (pooled * g).sum().backward()
            opt.step()

        out[label] = bench.time_op(
            lambda step=step: step(), [()], iters=iters, sync=lambda _: torch.cuda.synchronize()
        )
        del weight, opt
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default="modules,sequence,train")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument(
        "--small", action="store_true", help="modules section on CPU-sized inputs (smoke test)"
    )
    args = parser.parse_args(argv)
    report: dict = {"environment": bench.environment(), "seed": args.seed}
    sections = args.sections.split(",")
    failed = False
    for name in sections:
        t0 = time.perf_counter()
        try:
            if name == "modules":
                report["modules"] = check_modules(args.seed, args.small)
                failed |= not report["modules"]["ok"]
            elif name == "sequence":
                report["sequence"] = check_sequence(args.seed, args.iters)
            elif name == "train":
                report["train"] = [
                    time_train(1_000_000, "fp32", args.seed, args.iters, peers=True),
                    time_train(100_000, "fp32", args.seed, args.iters, peers=True),
                    time_train(2_000_000, "fp32", args.seed, args.iters, peers=True),
                    time_train(1_000_000, "bf16", args.seed, args.iters, peers=False),
                ]
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception:
            failed = True
            report[name] = {"error": traceback.format_exc()[-3000:]}
        print(
            f"[{name}] {time.perf_counter() - t0:.1f}s",
            json.dumps(report.get(name), indent=1),
            flush=True,
        )
    with open(os.path.join(args.out, "gpu_check_modules.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
