"""The TBE's train step (the README's: ``jax.grad`` then ``jaxrec.optim.apply_updates``,
jitted with the state donated) updates its tables in place, whether the tables are on the
device or cached in front of host memory: the compiled HLO copies no table-sized buffer.

A copy of a 10M-row group is a full read and write of it every step; before
``apply_updates`` recognised the lookup's own cotangent it chose between the old and the
updated table with a ``lax.cond``, and XLA copied every table twice per step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hlo_copies import shape_strings, table_copies

import jaxrec
from jaxrec import tbe
from jaxrec.tbe import records

ROWS, DIM, TABLES, B = 1031, 8, 2, 4
OPTIMIZER = tbe.OptimType.EXACT_ROWWISE_ADAGRAD


def _op(location, **kwargs):
    return tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, DIM, location, tbe.ComputeDevice.CPU)] * TABLES,
        optimizer=OPTIMIZER,
        learning_rate=0.01,
        **kwargs,
    )


def _batch():
    ids = np.random.default_rng(0).integers(0, ROWS, 20).astype(np.int32)
    offsets = np.linspace(0, 20, TABLES * B + 1).astype(np.int32)
    return ids, offsets


def _compiled_step(lookup, state, indices, offsets):
    def step(state, indices, offsets, g):
        grads = jax.grad(lambda s: jnp.sum(lookup(s, indices, offsets) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    g = jnp.ones((B, TABLES * DIM))
    jitted = jax.jit(step, donate_argnums=(0,))
    return jitted.lower(state, jnp.asarray(indices), jnp.asarray(offsets), g).compile()


def _table_shapes(state) -> set[str]:
    groups = state.groups.values()
    return shape_strings(*[leaf for g in groups for leaf in (g.weight, *g.state.values())])


def test_device_tables_train_in_place():
    op = _op(tbe.EmbeddingLocation.DEVICE)
    state = op.init(jax.random.key(0))
    compiled = _compiled_step(op, state, *_batch())
    assert not table_copies(compiled.as_text(), _table_shapes(state))


def test_cached_tables_train_in_place():
    cached = tbe.CachedTBE(_op(tbe.EmbeddingLocation.MANAGED_CACHING, cache_load_factor=0.2))
    state, caches = cached.init(seed=0)
    ids, offsets = _batch()
    ready = cached.prefetch(state, caches, ids, offsets)
    compiled = _compiled_step(cached, ready.state, ready.indices, offsets)
    assert not table_copies(compiled.as_text(), _table_shapes(ready.state))


def test_cache_loads_rows_in_place():
    cached = tbe.CachedTBE(_op(tbe.EmbeddingLocation.MANAGED_CACHING, cache_load_factor=0.2))
    state, _ = cached.init()
    (param,) = state.groups.values()
    (host,) = cached.hosts.values()
    rows = 64
    compiled = records.load_records.lower(
        param,
        jnp.zeros(rows, jnp.int32),
        jnp.zeros((rows, host.row_bytes), jnp.uint8),
        size=rows,
        fields=host.fields,
    ).compile()
    assert not table_copies(compiled.as_text(), _table_shapes(state))


def test_step_still_swaps_in_the_update():
    op = _op(tbe.EmbeddingLocation.DEVICE)
    state = op.init(jax.random.key(0))
    ids, offsets = _batch()
    before = np.asarray(state.groups["sum_float32_d8"].weight)
    compiled = _compiled_step(op, state, ids, offsets)
    after = compiled(state, jnp.asarray(ids), jnp.asarray(offsets), jnp.ones((B, TABLES * DIM)))
    changed = np.flatnonzero(np.any(np.asarray(after.groups["sum_float32_d8"].weight) != before, 1))
    touched = np.unique(ids + ROWS * (np.repeat(np.arange(TABLES * B), np.diff(offsets)) // B))
    np.testing.assert_array_equal(changed, touched)
