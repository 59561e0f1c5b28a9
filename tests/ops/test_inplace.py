"""The compiled fused train step updates every table in place: no copy of a table, any loss.

The backward of a fused lookup writes its tables in place. Nothing but a data dependence
orders the forward's reads of a table before those writes; a loss linear in the outputs
gives none by itself, and XLA then copies every table (twice per step on the CPU). These
tests compile the train step the README shows (``jit`` with donated params,
``jaxrec.optim.fused`` and ``jaxrec.optim.apply_updates``) and read the compiled HLO.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hlo_copies import table_copies

import jaxrec
from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)
from jaxrec.optim import FusedTableParams

# Stacked rows per group (2 tables of ROWS) differ from every batch-sized shape below.
ROWS, BATCH = 1031, 8
# Two groups of two tables: SUM at dim 8, MEAN at dim 16.
GROUPS = ((PoolingType.SUM, 8), (PoolingType.MEAN, 16))


def _kjt(keys, weighted=False):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, len(keys) * BATCH)
    values = rng.integers(0, ROWS, int(lengths.sum()))
    weights = rng.uniform(0.5, 1.5, values.shape).astype(np.float32) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def _collection(backend="xla", weighted=False, sequence=False):
    """Four tables in two groups with a fused row-wise Adagrad, and a batch for them."""
    layout = [
        (f"t{g}_{i}", pooling, dim) for g, (pooling, dim) in enumerate(GROUPS) for i in (0, 1)
    ]
    optimizer = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1)
    if sequence:
        tables = [
            EmbeddingConfig(name=n, embedding_dim=d, num_embeddings=ROWS, feature_names=[f"f{n}"])
            for n, _, d in layout
        ]
        collection = EmbeddingCollection(tables=tables, optimizer=optimizer, backend=backend)
    else:
        tables = [
            EmbeddingBagConfig(
                name=n, embedding_dim=d, num_embeddings=ROWS, feature_names=[f"f{n}"], pooling=p
            )
            for n, p, d in layout
        ]
        collection = EmbeddingBagCollection(
            tables=tables, optimizer=optimizer, backend=backend, is_weighted=weighted
        )
    return collection, _kjt([f"f{n}" for n, _, _ in layout], weighted)


def _loss_fn(collection, kjt, params, nonlinear, sequence):
    """A loss of the collection's outputs: sum(out * G), or sum(tanh(out) * G)."""

    def outputs(params):
        out = collection.apply({"params": params}, kjt)
        if sequence:
            return [rows.values() for rows in out.values()]
        return [out.values()]

    rng = np.random.default_rng(1)
    cotangents = [
        jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        for out in jax.eval_shape(outputs, params)
    ]

    def loss(params):
        total = 0.0
        for out, g in zip(outputs(params), cotangents, strict=True):
            total = total + jnp.sum((jnp.tanh(out) if nonlinear else out) * g)
        return total

    return loss


def _compiled_step(collection, kjt, nonlinear, returns_loss, sequence=False):
    """The README's train step, compiled with donated params and optimizer state.

    Returns the params and the compiled step; ``returns_loss``: the step returns the loss
    too (the forward's result is then live), else only the new params and state.
    """
    params = jax.jit(collection.init)(jax.random.key(0), kjt)["params"]
    tx = jaxrec.optim.fused(optax.adam(1e-3))
    loss = _loss_fn(collection, kjt, params, nonlinear, sequence)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new = jaxrec.optim.apply_updates(params, updates)
        return (new, opt_state, value) if returns_loss else (new, opt_state)

    return params, step.lower(params, tx.init(params)).compile()


def _fused_shapes(params) -> set[str]:
    """HLO shape strings (``[R,D]``, ``[R]``) of every row-indexed leaf of the fused groups."""
    shapes = set()
    for group in _fused_groups(params):
        for leaf in [group.weight, *jax.tree.leaves(group.state)]:
            shapes.add("[" + ",".join(map(str, leaf.shape)) + "]")
    return shapes


def test_table_copies_finds_a_copy_of_a_table():
    def double_use(table):
        return table.at[0].set(1.0), table * 2.0

    text = jax.jit(double_use).lower(jnp.ones((ROWS, 8))).compile().as_text()
    plain = jax.jit(lambda t: t.at[0].set(1.0), donate_argnums=0)
    assert table_copies(text, {f"[{ROWS},8]"})
    assert not table_copies(plain.lower(jnp.ones((ROWS, 8))).compile().as_text(), {f"[{ROWS},8]"})


def _fused_groups(params) -> list[FusedTableParams]:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FusedTableParams))
    return [leaf for leaf in leaves if isinstance(leaf, FusedTableParams)]


def _assert_in_place(compiled, params):
    """No copy of a fused leaf, every fused leaf donated, no table-sized scratch memory."""
    groups = _fused_groups(params)
    assert len(groups) > 1
    copies = table_copies(compiled.as_text(), _fused_shapes(params))
    assert not copies, "\n".join(copies)
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= sum(
        leaf.nbytes for group in groups for leaf in jax.tree.leaves(group)
    )
    smallest = min(group.weight.nbytes for group in groups)
    assert memory.temp_size_in_bytes < smallest, (memory.temp_size_in_bytes, smallest)


@pytest.mark.parametrize(
    ("nonlinear", "returns_loss"),
    [(False, True), (True, False)],
    ids=["linear-value_and_grad", "nonlinear-grad"],
)
def test_fused_step_holds_no_copy_of_a_table(nonlinear, returns_loss):
    collection, kjt = _collection()
    params, compiled = _compiled_step(collection, kjt, nonlinear, returns_loss)
    _assert_in_place(compiled, params)


def test_weighted_fused_step_holds_no_copy_of_a_table():
    collection, kjt = _collection(weighted=True)
    params, compiled = _compiled_step(collection, kjt, False, True)
    _assert_in_place(compiled, params)


def test_sequence_fused_step_holds_no_copy_of_a_table():
    collection, kjt = _collection(sequence=True)
    params, compiled = _compiled_step(collection, kjt, False, True, sequence=True)
    _assert_in_place(compiled, params)


def test_pallas_fused_step_holds_no_copy_of_a_table():
    collection, kjt = _collection(backend="pallas")
    params, compiled = _compiled_step(collection, kjt, False, True)
    _assert_in_place(compiled, params)


# The timing check: one table of SMALL or LARGE rows read by the same batch (ids below
# SMALL), so both steps touch the same rows and see the same caches; only work that grows
# with the table (a copy of it: 512 MB here, tens of ms, against a step of a few ms) can
# tell them apart.
SMALL, LARGE, TIMED_DIM = 100_000, 4_000_000, 32


def _timed_step(rows: int):
    """One compiled fused step (linear loss, loss returned) over a zero table of ``rows``."""
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="t",
                embedding_dim=TIMED_DIM,
                num_embeddings=rows,
                feature_names=["f"],
                init_fn=jax.nn.initializers.zeros,
            )
        ],
        optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01),
        backend="xla",
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 21, 1024)
    kjt = KeyedJaggedTensor(
        keys=["f"], values=rng.integers(0, SMALL, int(lengths.sum())), lengths=lengths
    )
    g = jnp.asarray(rng.normal(size=(1024, TIMED_DIM)), jnp.float32)
    state = [jax.jit(ebc.init)(jax.random.key(0), kjt)["params"]]
    tx = jaxrec.optim.fused(optax.sgd(0.1))
    state.append(tx.init(state[0]))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state):
        loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state, value

    compiled = step.lower(*state).compile()
    assert not table_copies(compiled.as_text(), _fused_shapes(state[0]))

    def run() -> float:
        """One step; the process CPU time it took (every thread of this process, no waits)."""
        start = time.process_time()
        state[0], state[1], _ = jax.block_until_ready(compiled(*state))
        return time.process_time() - start

    run()
    return run


def test_fused_step_time_does_not_grow_with_table_rows():
    # Interleaved repeats, least process CPU time of each: unlike wall time it does not
    # count waiting for other processes on a loaded machine, and the least of several runs
    # drops the ones slowed by them.
    runs = {rows: _timed_step(rows) for rows in (SMALL, LARGE)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(7):
        for rows, run in runs.items():
            best[rows] = min(best[rows], run())
    assert best[LARGE] < 1.3 * best[SMALL], best
