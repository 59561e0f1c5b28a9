"""An INT8 TBE step that differentiates the per-sample weights updates its tables in place.

The weights' gradient dequantizes the rows the batch reads (``<row_i, grad_bag>``) in the
backward, where the fused update then overwrites those rows in place. Unless every one of
those reads is ordered before the writes, XLA keeps a copy of each table. The compiled HLO
of the step (state donated, ``jax.grad`` w.r.t. the state and the weights) has none.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hlo_copies import shape_strings, table_copies

import jaxrec
from jaxrec import tbe

# Two groups (dims 8 and 4) of stacked rows no batch-sized shape below equals.
ROWS, DIMS, B = 1031, (8, 4), 4


def _step():
    op = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, d, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CPU) for d in DIMS],
        weights_precision=tbe.SparseType.INT8,
        optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
    )
    state = op.init(jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, ROWS, 20), jnp.int32)
    offsets = jnp.asarray(np.linspace(0, 20, len(DIMS) * B + 1), jnp.int32)
    weights = jnp.linspace(0.5, 1.5, 20, dtype=jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=(B, sum(DIMS))), jnp.float32)

    def step(state, weights, ids, offsets, g):
        loss = lambda s, w: jnp.sum(op(s, ids, offsets, w) * g)  # noqa: E731
        grads, weights_grad = jax.grad(loss, argnums=(0, 1))(state, weights)
        return jaxrec.optim.apply_updates(state, grads), weights_grad

    jitted = jax.jit(step, donate_argnums=(0,))
    return state, jitted.lower(state, weights, ids, offsets, g).compile()


def test_int8_step_differentiating_the_weights_holds_no_copy_of_a_table():
    state, compiled = _step()
    tables = [leaf for g in state.groups.values() for leaf in (g.weight, *g.state.values())]
    # [rows, dim + 8] INT8 rows
    assert {tuple(g.weight.shape) for g in state.groups.values()} == {(ROWS, 16), (ROWS, 12)}
    assert not table_copies(compiled.as_text(), shape_strings(*tables))
