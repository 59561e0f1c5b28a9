"""One entry point per kernel: ``<name>_reference`` is the entry with the XLA path bound, and
the entry refuses an unknown implementation and kernel options given to the reference."""

import chex
import jax.numpy as jnp
import pytest
from jaxrec_kernels.sequence_lookup import (
    SequenceConfig,
    sequence_lookup,
    sequence_lookup_reference,
)
from jaxrec_kernels.sparse_update import (
    SparseUpdateConfig,
    fused_sparse_update,
    fused_sparse_update_reference,
)
from jaxrec_kernels.weight_gradient import (
    WeightGradientConfig,
    weight_gradient,
    weight_gradient_reference,
)

from jaxrec.optim.sparse_optimizers import exact_sgd

WEIGHTS = jnp.arange(8.0).reshape(4, 2)
IDS = jnp.array([3, 0, 1, 9], jnp.int32)  # the last is padding
OFFSETS = jnp.array([0, 2, 3], jnp.int32)
FEATURES = ((0, 0, 4, 0),)
GRAD_OUT = jnp.array([[1.0, 2.0], [3.0, 4.0]])

CASES = {
    "sequence": (
        sequence_lookup,
        sequence_lookup_reference,
        (WEIGHTS, IDS, OFFSETS, FEATURES),
        dict(batch_size=2),
        SequenceConfig(),
    ),
    "weight_gradient": (
        weight_gradient,
        weight_gradient_reference,
        (WEIGHTS, IDS, OFFSETS, GRAD_OUT, FEATURES),
        dict(batch_size=2),
        WeightGradientConfig(),
    ),
    "update": (
        fused_sparse_update,
        fused_sparse_update_reference,
        (WEIGHTS, {}, 1, GRAD_OUT, IDS, OFFSETS, None, FEATURES),
        dict(batch_size=2, dim=2, pooling="sum", optimizer=exact_sgd(learning_rate=0.5)),
        SparseUpdateConfig(),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_is_the_entry_on_the_xla_path(name):
    fn, reference, args, kwargs, _ = CASES[name]
    assert reference.__name__ == f"{fn.__name__}_reference"
    chex.assert_trees_all_equal(
        reference(*args, **kwargs), fn(*args, **kwargs, implementation="xla")
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_entry_refuses_unknown_implementation_and_kernel_options_on_xla(name):
    fn, reference, args, kwargs, config = CASES[name]
    with pytest.raises(ValueError, match="implementation must be one of"):
        fn(*args, **kwargs, implementation="triton")
    for options in (dict(interpret=True), dict(config=config)):
        with pytest.raises(ValueError, match="options of the Pallas kernel"):
            reference(*args, **kwargs, **options)
