"""The TBE operator against the EmbeddingBagCollection on the same lookups: forward and
fused train step, timed in one run (part of ``benchmarks.gpu_check_quantized --tbe``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._measure import median_seconds


def time_tbe_vs_ebc(shape, reps: int, interpret: bool) -> dict:
    """Seconds per forward and per train step of the TBE and of the collection, and their
    ratios, on the same tables and ids (forward outputs checked equal first)."""
    import jaxrec
    from jaxrec import tbe

    tables, rows, dim, batch, max_len = shape
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, max_len + 1, tables * batch)
    ids = jnp.asarray(rng.integers(0, rows, int(lengths.sum())).astype(np.int32))
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    keys = [f"f{t}" for t in range(tables)]
    kjt = jaxrec.KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths)
    # Both on the Pallas kernels on a GPU; the CPU smoke run takes XLA (no interpreting).
    backend = "auto" if interpret else "pallas"
    configs = [
        jaxrec.EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=dim, num_embeddings=rows, feature_names=[keys[t]]
        )
        for t in range(tables)
    ]
    ebc = jaxrec.EmbeddingBagCollection(
        configs,
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01),
        backend=backend,
    )
    op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CUDA)] * tables,
        optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        backend=backend,
    )
    params = ebc.init(jax.random.key(0), kjt)["params"]
    views = ebc.state_dict({"params": params})
    state = op.set_split_embedding_weights(
        op.init(), [views[f"embedding_bags.t{t}.weight"] for t in range(tables)]
    )
    del views
    ebc_fwd = jax.jit(lambda p, kjt: ebc.apply({"params": p}, kjt).values())
    tbe_fwd = jax.jit(lambda s, i, o: op(s, i, o))
    a, b = ebc_fwd(params, kjt), tbe_fwd(state, ids, offsets)
    diff = float(jnp.max(jnp.abs(a - b)))
    tolerance = 1e-5 * max(1.0, float(jnp.max(jnp.abs(b))))
    del a, b
    g = jax.random.normal(jax.random.key(2), (batch, tables * dim), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=0)
    def ebc_step(p, kjt, g):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(p)
        return jaxrec.optim.apply_updates(p, grads)

    @functools.partial(jax.jit, donate_argnums=0)
    def tbe_step(s, i, o, g):
        return jaxrec.optim.apply_updates(s, jax.grad(lambda s: jnp.sum(op(s, i, o) * g))(s))

    out = {
        "backend": backend,
        "forward_max_abs_diff": diff,
        "forward_tolerance": tolerance,
        "forward_ok": diff <= tolerance,
        "forward_ebc_s": median_seconds(ebc_fwd, (params, kjt), reps)[0],
        "forward_tbe_s": median_seconds(tbe_fwd, (state, ids, offsets), reps)[0],
    }
    held = {"ebc": params, "tbe": state}
    del params, state

    def stepper(name, step, *args):
        def call():
            held[name] = step(held[name], *args)
            return held[name]

        return call

    # Steps timed in ABBA order, each side the mean of its two medians, so that a drift of
    # the device over the run favours neither (run A timed them once each, the collection
    # first). The compiled steps do the same table-sized work (tests/tbe/test_operator_step_hlo.py).
    steps = {
        "ebc": stepper("ebc", ebc_step, kjt, g),
        "tbe": stepper("tbe", tbe_step, ids, offsets, g),
    }
    medians = {"ebc": [], "tbe": []}
    for name in ("ebc", "tbe", "tbe", "ebc"):
        medians[name].append(median_seconds(steps[name], (), reps)[0])
    out["step_ebc_s"], out["step_tbe_s"] = (sum(medians[k]) / 2 for k in ("ebc", "tbe"))
    out["step_medians_s"] = medians
    out["forward_ratio"] = out["forward_tbe_s"] / out["forward_ebc_s"]
    out["step_ratio"] = out["step_tbe_s"] / out["step_ebc_s"]
    return out
