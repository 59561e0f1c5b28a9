"""Optax code around a fused table never changes it silently: each misuse raises, naming the
table, or (a step optax skips) leaves the table, its state and step exactly as they were."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.optim import sparse_optimizers as so
from jaxrec.optim.fused import apply_updates, fused, init_fused_table, lookup_cotangent

ROWS, DIM = 6, 4
IDS = jnp.array([0, 2, 2])
WHERE = "['emb']"


def _lookup():
    """``sum_i table[ids_i]`` whose backward applies row-wise Adagrad, as the real lookup."""
    optimizer = so.exact_rowwise_adagrad(learning_rate=0.5)

    @jax.custom_vjp
    def lookup(node, ids):
        return node.weight[ids].sum(axis=0)

    def forward(node, ids):
        return lookup(node, ids), (node, ids)

    def backward(residual, cotangent):
        node, ids = residual
        rows = jnp.zeros_like(node.weight).at[ids].add(cotangent)
        weight, state = optimizer.update(node.weight, node.state, rows, node.step + 1, DIM)
        return lookup_cotangent(node, weight, state, node.step + 1), None

    lookup.defvjp(forward, backward)
    return lookup, optimizer


LOOKUP, OPTIMIZER = _lookup()


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": jnp.asarray(rng.normal(size=DIM), jnp.float32),
        "emb": init_fused_table(jnp.asarray(rng.normal(size=(ROWS, DIM)), jnp.float32), OPTIMIZER),
    }


def _loss(params, scale, tied=False):
    pooled = LOOKUP(params["emb"], IDS)
    loss = jnp.sum(jnp.tanh(pooled * params["dense"])) * scale
    if tied:
        loss = loss + jnp.sum(params["emb"].weight[1] * params["dense"])
    return loss


def _step(tx, *, jit, tied=False, applier=apply_updates):
    def step(params, state, scale):
        grads = jax.grad(_loss)(params, scale, tied)
        updates, state = tx.update(grads, state, params)
        return applier(params, updates), state

    return jax.jit(step) if jit else step


def _assert_same_table(a, b):
    for x, y in zip(
        jax.tree.leaves((a.weight, a.state, a.step)),
        jax.tree.leaves((b.weight, b.state, b.step)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _raises(match, fn, *args):
    with pytest.raises(Exception, match=match) as info:
        jax.block_until_ready(fn(*args))
    assert WHERE in str(info.value)


jit_or_not = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


@jit_or_not
def test_apply_if_finite_skips_a_nan_step_leaving_the_table_bit_for_bit(jit):
    tx = optax.apply_if_finite(fused(optax.sgd(0.1)), max_consecutive_errors=3)
    step = _step(tx, jit=jit)
    params = _params()
    state = tx.init(params)
    skipped, state = step(params, state, jnp.float32(jnp.nan))
    _assert_same_table(skipped["emb"], params["emb"])
    trained, _ = step(skipped, state, jnp.float32(1.0))
    assert float(trained["emb"].step) == 1.0
    reference, _ = _step(fused(optax.sgd(0.1)), jit=False)(
        params, fused(optax.sgd(0.1)).init(params), 1.0
    )
    np.testing.assert_allclose(trained["emb"].weight, reference["emb"].weight, rtol=1e-6)


@jit_or_not
def test_multisteps_around_fused_keeps_the_table_then_refuses_the_average(jit):
    tx = optax.MultiSteps(fused(optax.sgd(0.1)), every_k_schedule=2)
    step = _step(tx, jit=jit)
    params = _params()
    state = tx.init(params)
    between, state = step(params, state, jnp.float32(1.0))
    _assert_same_table(between["emb"], params["emb"])
    _raises(r"averaged.*fused\(optax.MultiSteps", step, between, state, jnp.float32(2.0))


@jit_or_not
def test_clipping_chained_after_fused_is_refused(jit):
    tx = optax.chain(fused(optax.sgd(0.1)), optax.clip_by_global_norm(1e-3))
    params = _params()
    _raises("scaled", _step(tx, jit=jit), params, tx.init(params), jnp.float32(1.0))


@jit_or_not
def test_weight_decay_before_fused_is_refused_on_the_first_step(jit):
    tx = optax.chain(optax.add_decayed_weights(1e-2), fused(optax.sgd(0.1)))
    params = _params()
    _raises("multiple of the params", _step(tx, jit=jit), params, tx.init(params), jnp.float32(1.0))


@jit_or_not
def test_plain_adam_then_jaxrec_apply_updates_is_refused(jit):
    tx = optax.adam(1e-2)
    params = _params()
    _raises(
        "without jaxrec.optim.fused", _step(tx, jit=jit), params, tx.init(params), jnp.float32(1.0)
    )


@jit_or_not
def test_optax_apply_updates_is_refused_on_the_next_step_before_applying(jit):
    tx = fused(optax.sgd(0.1))
    step = _step(tx, jit=jit, applier=optax.apply_updates)
    params = _params()
    state = tx.init(params)
    old_plus_new, state = step(params, state, jnp.float32(1.0))
    _raises(r"old \+ new.*never optax.apply_updates", step, old_plus_new, state, jnp.float32(1.0))


@jit_or_not
def test_weight_tying_is_refused(jit):
    tx = fused(optax.sgd(0.1))
    params = _params()
    _raises(
        "also read outside its lookup",
        _step(tx, jit=jit, tied=True),
        params,
        tx.init(params),
        jnp.float32(1.0),
    )


@jit_or_not
def test_the_compositions_the_messages_recommend_train_every_step(jit):
    params = _params()
    for tx in (
        fused(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation()),
        fused(optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)),
    ):
        step, state, current = _step(tx, jit=jit), tx.init(params), params
        for k in range(3):
            current, state = step(current, state, jnp.float32(1.0))
            assert float(current["emb"].step) == k + 1


def test_a_checked_jit_step_has_one_conditional_and_copies_no_table():
    tx = fused(optax.adam(1e-3))
    params = _params()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        grads = jax.grad(_loss)(params, 1.0)
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    hlo = step.lower(params, tx.init(params)).compile().as_text()
    assert hlo.count(" conditional(") == 1  # fused's check; apply_updates adds none
    assert not [line for line in hlo.splitlines() if " copy(" in line and f"[{ROWS},{DIM}]" in line]
