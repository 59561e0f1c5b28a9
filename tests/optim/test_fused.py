"""FusedTableParams, the fused optax glue, apply_updates and the misuse checks."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from jaxrec.optim import sparse_optimizers as so
from jaxrec.optim.fused import (
    FusedTableParams,
    apply_updates,
    fused,
    init_fused_table,
    lookup_cotangent,
)

ROWS, DIM = 6, 4


def _params(rng, optimizer=None, dtype=jnp.float32):
    optimizer = optimizer or so.exact_rowwise_adagrad(learning_rate=0.1)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "bias": jnp.zeros(2, jnp.float32),
        },
        "ebc": {
            "group_0": init_fused_table(jnp.asarray(rng.normal(size=(ROWS, DIM)), dtype), optimizer)
        },
    }


def _grads(rng, params, uses=1.0):
    """A gradient tree as jax.grad returns it: the fused entry holds the updated table.

    ``uses`` scales the marker of one genuine update (2: two lookups summed, 0: unused...).
    """
    table = params["ebc"]["group_0"]
    new_table = lookup_cotangent(
        table,
        table.weight + jnp.asarray(rng.normal(size=table.weight.shape), table.weight.dtype),
        {k: v + 1.0 for k, v in table.state.items()},
        table.step + 1,
    )
    if uses != 1.0:
        new_table = dataclasses.replace(new_table, uses=new_table.uses * uses)
    dense = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params["dense"])
    return {"dense": dense, "ebc": {"group_0": new_table}}


# ----------------------------------------------------------------------------
# the parameter node


@pytest.mark.parametrize(
    "make", [so.exact_sgd, so.exact_rowwise_adagrad, so.adam, so.partial_rowwise_lamb]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_init_fused_table_holds_table_zero_state_and_counters(make, dtype):
    optimizer = make()
    weight = jnp.ones((ROWS, DIM), dtype)
    node = init_fused_table(weight, optimizer)
    chex.assert_trees_all_equal(node.weight, weight)
    chex.assert_trees_all_equal(node.state, optimizer.init(ROWS, DIM))
    chex.assert_shape(node.step, ())
    chex.assert_type(node.step, jnp.float32)
    assert float(node.step) == 0.0
    chex.assert_type(node.uses, jnp.float32)
    assert node.uses.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the marker at rest


def test_fused_table_params_is_a_pytree_that_crosses_jit():
    node = init_fused_table(jnp.ones((ROWS, DIM)), so.adam())
    leaves, treedef = jax.tree.flatten(node)
    assert len(leaves) == 1 + 2 + 1 + 1  # weight, momentum1, momentum2, step, uses
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, FusedTableParams)
    doubled = jax.jit(lambda n: jax.tree.map(lambda x: 2 * x, n))(node)
    assert isinstance(doubled, FusedTableParams)
    chex.assert_trees_all_equal(doubled.weight, 2 * node.weight)


@pytest.mark.parametrize(
    ("weight", "optimizer", "match"),
    [
        (jnp.ones(4), so.exact_sgd(), "shape"),
        (jnp.ones((2, 2, 2)), so.exact_sgd(), "shape"),
        (jnp.ones((2, 2), jnp.int32), so.exact_sgd(), "dtype int32"),
        (jnp.ones((2, 2)), optax.adam(1e-3), "SparseOptimizer"),
    ],
)
def test_init_fused_table_rejects_bad_input(weight, optimizer, match):
    with pytest.raises(ValueError, match=match):
        init_fused_table(weight, optimizer)


# ----------------------------------------------------------------------------
# the glue


class FusedGlueTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(jnp.float32, jnp.bfloat16)
    def test_dense_leaves_get_adam_and_fused_entries_are_swapped_in(self, dtype):
        rng = np.random.default_rng(0)
        params = _params(rng, dtype=dtype)
        tx = fused(optax.adam(1e-2))
        dense_tx = optax.adam(1e-2)
        state = tx.init(params)
        dense_params, dense_state = params["dense"], dense_tx.init(params["dense"])

        @self.variant
        def train_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return apply_updates(params, updates), updates, state

        for _ in range(3):
            grads = _grads(rng, params)
            params, updates, state = train_step(params, state, grads)
            # the dense part is exactly optax.adam on the dense subtree alone
            want, dense_state = dense_tx.update(grads["dense"], dense_state, dense_params)
            dense_params = optax.apply_updates(dense_params, want)
            chex.assert_trees_all_close(updates["dense"], want, rtol=1e-6, atol=1e-7)
            chex.assert_trees_all_close(params["dense"], dense_params, rtol=1e-6, atol=1e-7)
            # the fused entry is the update and replaces the table
            chex.assert_trees_all_equal(updates["ebc"], grads["ebc"])
            table, new = params["ebc"]["group_0"], grads["ebc"]["group_0"]
            chex.assert_trees_all_equal(table.weight, new.weight)
            chex.assert_trees_all_equal(table.state, new.state)
            chex.assert_trees_all_equal(table.step, new.step)
            chex.assert_type(table.weight, dtype)
        assert float(params["ebc"]["group_0"].step) == 3.0


def test_dense_transformation_never_sees_the_fused_tables():
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads = _grads(rng, params)
    entry = grads["ebc"]["group_0"]
    grads["ebc"]["group_0"] = lookup_cotangent(
        params["ebc"]["group_0"], entry.weight * 1e6, entry.state, entry.step
    )
    dense_norm = optax.global_norm(grads["dense"])
    tx = fused(optax.chain(optax.clip_by_global_norm(float(dense_norm) * 2), optax.sgd(1.0)))
    updates, _ = tx.update(grads, tx.init(params), params)
    # not clipped: the (huge) table is not part of the global norm
    chex.assert_trees_all_close(updates["dense"], jax.tree.map(lambda g: -g, grads["dense"]))
    state = tx.init(params)
    assert all(
        leaf.shape in {(3, 2), (2,), ()} for leaf in jax.tree.leaves(state)
    )  # no optimizer state is allocated for the table


def test_apply_updates_casts_the_table_to_the_param_dtype():
    rng = np.random.default_rng(2)
    params = _params(rng, dtype=jnp.float16)
    grads = _grads(rng, params)
    entry = grads["ebc"]["group_0"]
    grads["ebc"]["group_0"] = lookup_cotangent(
        params["ebc"]["group_0"], entry.weight.astype(jnp.float32), entry.state, entry.step
    )
    tx = fused(optax.sgd(0.1))
    out = apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    chex.assert_type(out["ebc"]["group_0"].weight, jnp.float16)


def test_apply_updates_rejects_a_dense_update_for_a_fused_entry():
    rng = np.random.default_rng(3)
    params = _params(rng)
    grads = _grads(rng, params)
    grads["ebc"]["group_0"] = grads["ebc"]["group_0"].weight
    with pytest.raises(ValueError, match=r"\['ebc'\]\['group_0'\].*FusedTableParams"):
        apply_updates(params, grads)


# ----------------------------------------------------------------------------
# misuse


MISUSES = [
    (2.0, "entered 2 fused lookups"),
    (3.0, "summed 3 updated tables"),
    (0.0, "no fused lookup used it"),
    (0.5, "scaled, averaged"),
]


@pytest.mark.parametrize(("uses", "message"), MISUSES)
def test_misused_table_raises_eagerly_naming_the_entry(uses, message):
    rng = np.random.default_rng(4)
    params = _params(rng)
    tx = fused(optax.adam(1e-3))
    grads = _grads(rng, params, uses=uses)
    with pytest.raises(ValueError, match=message) as info:
        tx.update(grads, tx.init(params), params)
    assert "['ebc']['group_0']" in str(info.value) and "uses=[" in str(info.value)


@pytest.mark.parametrize(("uses", "message"), MISUSES[:1] + MISUSES[2:3])
def test_misused_table_raises_at_run_time_under_jit(uses, message):
    rng = np.random.default_rng(5)
    params = _params(rng)
    tx = fused(optax.adam(1e-3))
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    jax.block_until_ready(step(_grads(rng, params), state, params))  # a correct step runs
    with pytest.raises(Exception, match=message) as info:
        jax.block_until_ready(step(_grads(rng, params, uses=uses), state, params))
    assert "['ebc']['group_0']" in str(info.value)


def test_under_jit_the_misused_one_of_several_fused_tables_is_named():
    rng = np.random.default_rng(8)
    params = _params(rng)
    params["ebc"]["group_1"] = params["ebc"]["group_0"]
    tx = fused(optax.adam(1e-3))
    state = tx.init(params)
    grads = _grads(rng, params)
    good = grads["ebc"]["group_0"]
    bad = dataclasses.replace(good, uses=2 * good.uses)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    jax.block_until_ready(step({**grads, "ebc": {"group_0": good, "group_1": good}}, state, params))
    with pytest.raises(Exception, match="entered 2 fused lookups") as info:
        jax.block_until_ready(
            step({**grads, "ebc": {"group_0": good, "group_1": bad}}, state, params)
        )
    assert "['ebc']['group_1']" in str(info.value)


def test_check_uses_false_passes_any_entry_through():
    rng = np.random.default_rng(6)
    params = _params(rng)
    tx = fused(optax.adam(1e-3), check_uses=False)
    grads = _grads(rng, params, uses=2.0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal(updates["ebc"], grads["ebc"])


# ----------------------------------------------------------------------------
# through jax.grad, with a toy fused lookup built the way the custom VJP works


def _toy_fused_lookup(optimizer):
    """``sum_i table[ids_i]`` whose backward applies ``optimizer`` and returns the new table."""

    @jax.custom_vjp
    def lookup(node, ids):
        return node.weight[ids].sum(axis=0)

    def forward(node, ids):
        return lookup(node, ids), (node, ids)

    def backward(residual, cotangent):
        node, ids = residual
        step = node.step + 1
        rows = jnp.zeros_like(node.weight).at[ids].add(cotangent)  # dense for the toy only
        new_weight, new_state = optimizer.update(node.weight, node.state, rows, step, DIM)
        return lookup_cotangent(node, new_weight, new_state, step), None

    lookup.defvjp(forward, backward)
    return lookup


def test_grad_of_a_fused_lookup_is_the_updated_table_and_the_step_trains():
    optimizer = so.exact_sgd(learning_rate=0.5)
    lookup = _toy_fused_lookup(optimizer)
    rng = np.random.default_rng(7)
    params = _params(rng, optimizer)
    ids = jnp.array([0, 2, 2])

    def loss(params):
        pooled = lookup(params["ebc"]["group_0"], ids)
        return (
            jnp.sum(params["dense"]["kernel"][:2] @ pooled[:2, None])
            + params["dense"]["bias"].sum()
        )

    tx = fused(optax.sgd(0.1))
    grads = jax.grad(loss)(params)
    node = grads["ebc"]["group_0"]
    assert node.uses.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0] and float(node.step) == 1.0
    cotangent = np.zeros(DIM)
    cotangent[:2] = np.asarray(params["dense"]["kernel"][:2]).sum(axis=0)
    expected = np.asarray(params["ebc"]["group_0"].weight).copy()
    expected[0] -= 0.5 * cotangent
    expected[2] -= 0.5 * 2 * cotangent
    np.testing.assert_allclose(np.asarray(node.weight), expected, rtol=1e-6)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new_params["ebc"]["group_0"].weight), expected, rtol=1e-6)


def test_a_table_in_two_fused_lookups_is_refused():
    optimizer = so.exact_sgd(learning_rate=0.5)
    lookup = _toy_fused_lookup(optimizer)
    rng = np.random.default_rng(8)
    params = _params(rng, optimizer)

    def loss(params):
        node = params["ebc"]["group_0"]
        return lookup(node, jnp.array([0])).sum() + lookup(node, jnp.array([1])).sum()

    grads = jax.grad(loss)(params)
    assert float(grads["ebc"]["group_0"].uses[0]) == 2.0  # JAX summed two updated tables
    tx = fused(optax.sgd(0.1))
    with pytest.raises(ValueError, match="entered 2 fused lookups"):
        tx.update(grads, tx.init(params), params)
    step = jax.jit(functools.partial(tx.update, state=tx.init(params)))
    with pytest.raises(Exception, match="entered 2 fused lookups"):
        jax.block_until_ready(step(jax.jit(jax.grad(loss))(params), params=params))
