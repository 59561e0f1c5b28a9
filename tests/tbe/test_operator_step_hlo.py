"""The TBE's fused train step compiles to no more table-sized work than the collection's
on the same lookups: the TBE is the collections' lookup behind FBGEMM's names, so its
learning rate held in the state, its offsets input and its feature_table_map add no pass
over a table (no copy, no extra scatter)."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

import jaxrec
from jaxrec import tbe

TABLES, ROWS, DIM, BATCH = 3, 1237, 8, 16  # 3711 stacked rows: a size no other array has


def compiled_ops(step, *args) -> tuple[collections.Counter, collections.Counter]:
    """(every op of the optimized HLO by kind, the ops whose result has a table's rows)."""
    text = jax.jit(step, donate_argnums=0).lower(*args).compile().as_text()
    ops, table_sized = collections.Counter(), collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) ([\w-]+)\(", line)
        if not m or m.group(2) == "parameter":
            continue
        ops[m.group(2)] += 1
        if re.search(rf"\[{TABLES * ROWS}[\],]", m.group(1)):
            table_sized[m.group(2)] += 1
    return ops, table_sized


def test_tbe_step_has_no_more_table_sized_ops_than_the_collections():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 5, TABLES * BATCH)
    ids = jnp.asarray(rng.integers(0, ROWS, int(lengths.sum())), jnp.int32)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
    keys = [f"f{t}" for t in range(TABLES)]
    kjt = jaxrec.KeyedJaggedTensor(keys=keys, values=ids, lengths=lengths)
    configs = [
        jaxrec.EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[keys[t]]
        )
        for t in range(TABLES)
    ]
    ebc = jaxrec.EmbeddingBagCollection(
        configs, optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.05)
    )
    op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, DIM, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CUDA)] * TABLES,
        optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.05,
    )
    g = jnp.ones((BATCH, TABLES * DIM), jnp.float32)

    def ebc_step(p, kjt, g):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(p)
        return jaxrec.optim.apply_updates(p, grads)

    def tbe_step(s, i, o, g):
        return jaxrec.optim.apply_updates(s, jax.grad(lambda s: jnp.sum(op(s, i, o) * g))(s))

    params = ebc.init(jax.random.key(0), kjt)["params"]
    ebc_ops, ebc_big = compiled_ops(ebc_step, params, kjt, g)
    tbe_ops, tbe_big = compiled_ops(tbe_step, op.init(jax.random.key(0)), ids, offsets, g)
    # The collection's step touches the stacked table and its row state in place: a
    # scatter each, nothing that copies them (the count would catch a copy of either).
    assert ebc_big["scatter"] + ebc_big["fusion"] >= 2 and ebc_big["copy"] == 0
    for kind in set(ebc_big) | set(tbe_big):
        assert tbe_big[kind] <= ebc_big[kind], (kind, dict(tbe_big), dict(ebc_big))
    assert sum(tbe_big.values()) <= sum(ebc_big.values())
    assert sum(tbe_ops.values()) <= sum(ebc_ops.values())
