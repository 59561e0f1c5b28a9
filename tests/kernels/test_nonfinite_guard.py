"""The fused update leaves a row whose gradient is not finite unchanged (weights and state)."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.sparse_update import (
    fused_sparse_update,
    fused_sparse_update_reference,
    fused_update_from_row_gradients,
)

from jaxrec.optim.sparse_optimizers import adam, exact_rowwise_adagrad, exact_sgd

OPTIMIZERS = {
    "sgd": exact_sgd(learning_rate=0.1),
    "rowwise_adagrad": exact_rowwise_adagrad(learning_rate=0.1),
    "adam": adam(learning_rate=0.1),
}
UPDATES = {
    "xla": fused_sparse_update_reference,
    "pallas": functools.partial(fused_sparse_update, interpret=True),
}


def setup(optimizer):
    weights = jnp.arange(12.0).reshape(4, 3) / 7
    state = {k: v + 0.5 for k, v in optimizer.init(4, 3).items()}
    ids = jnp.array([1, 2, 2], jnp.int32)  # bag 0: row 1; bag 1: row 2 twice
    offsets = jnp.array([0, 1, 3], jnp.int32)
    grad_out = jnp.array([[1.0, jnp.nan, 2.0], [0.5, -1.0, jnp.inf]])
    grad_out = grad_out.at[1, 2].set(3.0)  # bag 1 is finite
    return weights, state, ids, offsets, grad_out


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nan_row_keeps_weights_and_state_other_rows_update(backend, name):
    optimizer = OPTIMIZERS[name]
    weights, state, ids, offsets, grad_out = setup(optimizer)
    args = (weights, state, 1, grad_out, ids, offsets, None, ((0, 0, 4, 0),))
    kw = dict(batch_size=2, dim=3, pooling="sum", return_nonfinite=True)
    new_w, new_s, count = UPDATES[backend](*args, optimizer=optimizer, **kw)
    assert int(count) == 1
    np.testing.assert_array_equal(new_w[1], weights[1])
    for k in state:
        np.testing.assert_array_equal(new_s[k][1], state[k][1])
    # Row 2 updates exactly as without the NaN bag; without the guard row 1 is NaN.
    clean = grad_out.at[0].set(0.0)
    ref_w, ref_s, _ = fused_sparse_update_reference(
        weights, state, 1, clean, ids, offsets, None, ((0, 0, 4, 0),), optimizer=optimizer, **kw
    )
    np.testing.assert_allclose(new_w[2], ref_w[2], rtol=1e-6)
    assert not np.array_equal(new_w[2], weights[2])
    off = optimizer._replace(skip_nonfinite=False)
    bad_w, bad_s, none = UPDATES[backend](*args, optimizer=off, **kw)
    poisoned = [bad_w[1]] + [v[1] for v in bad_s.values()]
    assert int(none) == 0 and any(bool(jnp.isnan(x).any()) for x in poisoned)


def test_from_row_gradients_skips_an_infinite_row():
    optimizer = OPTIMIZERS["adam"]
    weights = jnp.ones((3, 2))
    state = optimizer.init(3, 2)
    rows = jnp.array([0, 2, 0, 3], jnp.int32)
    grads = jnp.array([[1.0, 1.0], [jnp.inf, 0.0], [1.0, 1.0], [0.0, 0.0]])
    new_w, new_s, count = fused_update_from_row_gradients(
        weights, state, 1, rows, grads, dim=2, optimizer=optimizer, return_nonfinite=True
    )
    assert int(count) == 1
    np.testing.assert_array_equal(new_w[2], weights[2])
    for k in state:
        np.testing.assert_array_equal(new_s[k][2], state[k][2])
    assert bool(jnp.all(new_w[0] < 1.0))
