"""Fused steps of a weighted collection: in place, and the weight gradient only when asked.

The weights' gradient reads the tables (``<row_i, grad_bag>``) in the backward, where the
fused update then overwrites them. Unless every one of those reads is ordered before the
writes, XLA keeps a copy of each table (two per step on the CPU). Same compiled-HLO check
as ``test_inplace.py``, with ``jax.grad`` taken w.r.t. the params and the KJT's weights.

A step that differentiates the params only must not compute the weights' gradient at all
(no ``weight_gradient`` kernel or gather in its compiled HLO), and still update in place.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_inplace import _assert_in_place, _collection

import jaxrec
from jaxrec import KeyedJaggedTensor


def _step_with_weight_gradient(backend: str, nonlinear: bool, differentiate_weights: bool = True):
    """The README's step, jitted with donated params, returning the weights' gradient too
    (``differentiate_weights``; else the gradient w.r.t. the params only)."""
    collection, kjt = _collection(backend=backend, weighted=True)
    params = jax.jit(collection.init)(jax.random.key(0), kjt)["params"]
    shape = jax.eval_shape(lambda p: collection.apply({"params": p}, kjt).values(), params)
    g = jnp.asarray(np.random.default_rng(1).normal(size=shape.shape), jnp.float32)
    tx = jaxrec.optim.fused(optax.adam(1e-3))

    def loss(params, weights):
        features = KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights
        )
        out = collection.apply({"params": params}, features).values()
        return jnp.sum((jnp.tanh(out) if nonlinear else out) * g)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, weights):
        if differentiate_weights:
            value, (grads, weights_grad) = jax.value_and_grad(loss, argnums=(0, 1))(params, weights)
        else:
            (value, grads), weights_grad = jax.value_and_grad(loss)(params, weights), None
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state, value, weights_grad

    return params, step.lower(params, tx.init(params), kjt.weights()).compile()


@pytest.mark.parametrize(
    ("backend", "nonlinear"),
    [("xla", False), ("xla", True), ("pallas", False)],
    ids=["xla-linear", "xla-nonlinear", "pallas-linear"],
)
def test_step_differentiating_the_weights_holds_no_copy_of_a_table(backend, nonlinear):
    params, compiled = _step_with_weight_gradient(backend, nonlinear)
    _assert_in_place(compiled, params)


# An op name with a weight_gradient scope (jit(_weight_gradient_xla), jaxrec_weight_gradient).
_KERNEL_OP = re.compile(r'op_name="[^"]*weight_gradient')


def _weight_gradient_ops(hlo_text: str) -> list[str]:
    """Compiled HLO instructions traced from a ``weight_gradient`` kernel (its op names)."""
    return [line for line in hlo_text.splitlines() if _KERNEL_OP.search(line)]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_step_not_differentiating_the_weights_computes_no_weight_gradient(backend):
    params, compiled = _step_with_weight_gradient(backend, False, differentiate_weights=False)
    assert _weight_gradient_ops(compiled.as_text()) == []
    _assert_in_place(compiled, params)


def test_weight_gradient_ops_are_found_when_the_weights_are_differentiated():
    """The detector above sees the kernel's gathers when they are there."""
    _, compiled = _step_with_weight_gradient("xla", False)
    assert any(" gather(" in line for line in _weight_gradient_ops(compiled.as_text()))
