"""Fused steps of a weighted EmbeddingBagCollection with and without the weights' gradient,
``python -m benchmarks.gpu_check_weighted --out OUT``.

The collection: ``--tables`` (8) tables of ``--rows`` (1M) rows, dim 128, fp32, one group,
fused row-wise Adagrad, the Pallas backend; one batch of ``--batch`` (8,192) bags of length
uniform in [0, 40] per table, ids uniform, per-sample weights uniform in [0.5, 1.5]. Two
jitted train steps (params donated; every array an argument), loss ``sum(out * G)``:

- ``params_only_ms``: ``jax.grad`` w.r.t. the params (the weights are not differentiated,
  so the backward must not compute their gradient);
- ``params_and_weights_ms``: ``jax.grad`` w.r.t. the params and the weights (the backward
  also reads every looked-up row once more for ``<row, grad_bag>``);
- ``weights_gradient_share``: 1 - params_only / params_and_weights, the share of the step
  a weighted step that does not train its weights saves by skipping that gradient.

Checked in the same run: from the same initial params both steps give bit-identical tables
and optimizer state; the params-only step's compiled HLO holds no op of the weight-gradient
kernel and the other's does; neither copies the table. Median ms after warmup. Writes
``gpu_check_weighted.json`` to ``--out``; exits 1 when a check fails. About 1 minute on an
H200, compilation included. ``--small`` runs the same code on the CPU with tiny shapes and
the XLA backend (the test suite does).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, bench

# An op name with a weight_gradient scope (jit(_weight_gradient_xla), jaxrec_weight_gradient).
_KERNEL_OP = re.compile(r'op_name="[^"]*weight_gradient')


def _collection(args) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[f"f{i}"]
        )
        for i in range(args.tables)
    ]
    return EmbeddingBagCollection(
        tables=tables,
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01),
        backend=args.backend,
        is_weighted=True,
    )


def _batch(args) -> KeyedJaggedTensor:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, args.max_len + 1, args.tables * args.batch)
    n = int(lengths.sum())
    return KeyedJaggedTensor(
        keys=[f"f{i}" for i in range(args.tables)],
        values=rng.integers(0, args.rows, n).astype(np.int32),
        lengths=lengths.astype(np.int32),
        weights=rng.uniform(0.5, 1.5, n).astype(np.float32),
    )


def _step(collection, tx, differentiate_weights: bool):
    def loss(params, kjt, weights, g):
        kjt = KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights
        )
        return jnp.sum(collection.apply({"params": params}, kjt).values() * g)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, kjt, g):
        weights = kjt.weights()
        if differentiate_weights:
            grads, weights_grad = jax.grad(loss, argnums=(0, 2))(params, kjt, weights, g)
        else:
            grads, weights_grad = jax.grad(loss)(params, kjt, weights, g), jnp.zeros(())
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state, weights_grad

    return step


def _table_copies(text: str, shapes: set[str]) -> int:
    return sum(
        1
        for line in text.splitlines()
        if re.search(r"copy(-start)?\(", line) and any(f"[{s}]" in line for s in shapes)
    )


def run(args) -> dict:
    collection, kjt = _collection(args), _batch(args)
    params = jax.jit(collection.init)(jax.random.key(0), kjt)["params"]
    g = jax.random.normal(jax.random.key(1), (args.batch, args.tables * args.dim))
    tx = jaxrec.optim.fused(optax.sgd(0.0))
    shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves(params) if x.ndim >= 1}
    shapes = {s for s in shapes if s.startswith(str(args.tables * args.rows))}
    record: dict = {"tables": args.tables, "rows": args.rows, "dim": args.dim}
    record.update(batch=args.batch, ids=int(kjt.lengths().sum()), backend=args.backend)
    results = {}
    for name, wanted in (("params_only", False), ("params_and_weights", True)):
        step = _step(collection, tx, wanted)
        copy = jax.tree.map(jnp.copy, params)
        compiled = step.lower(copy, tx.init(copy), kjt, g).compile()
        text = compiled.as_text()
        record[f"{name}_weight_gradient_ops"] = sum(
            bool(_KERNEL_OP.search(x)) for x in text.splitlines()
        )
        record[f"{name}_table_copies"] = _table_copies(text, shapes)
        new_params, _, _ = compiled(copy, tx.init(copy), kjt, g)
        results[name] = jax.tree.map(np.asarray, new_params)
        state = (jax.tree.map(jnp.copy, params), tx.init(params))
        holder = [state]

        def once(kjt, g, compiled=compiled, holder=holder):
            holder[0] = compiled(*holder[0], kjt, g)[:2]
            return holder[0]

        record[f"{name}_ms"] = bench.time_op(once, [(kjt, g)], iters=args.iters, warmup=2)
        holder.clear()
    same = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b, equal_nan=True)),
        results["params_only"],
        results["params_and_weights"],
    )
    record["updates_bit_identical"] = all(jax.tree.leaves(same))
    record["weights_gradient_share"] = (
        1 - record["params_only_ms"] / record["params_and_weights_ms"]
    )
    record["failures"] = failures(record)
    return record


def failures(record: dict) -> list[str]:
    """The checks a record fails, each named."""
    out = []
    if not record["updates_bit_identical"]:
        out.append("the two steps updated the tables or optimizer state differently")
    if record["params_only_weight_gradient_ops"] != 0:
        out.append("the params-only step computes the weights' gradient")
    if record["params_and_weights_weight_gradient_ops"] == 0:
        out.append("no weight-gradient op found in the step that differentiates the weights")
    for name in ("params_only", "params_and_weights"):
        if record[f"{name}_table_copies"]:
            out.append(f"the {name} step copies the table")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (XLA)")
    parser.add_argument("--tables", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--max-len", type=int, default=40)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", default="pallas")
    args = parser.parse_args(argv)
    if args.small:
        args.tables, args.rows, args.dim, args.batch, args.max_len = 2, 1031, 8, 8, 4
        args.iters, args.backend = 3, "xla"
    record = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check_weighted.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
