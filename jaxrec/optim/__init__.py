"""Fused sparse row optimizers (FBGEMM's rules, optax-style) and the dense-optimizer glue.

>>> import jaxrec.optim as optim
>>> optim.exact_rowwise_adagrad(learning_rate=0.01).name
'EXACT_ROWWISE_ADAGRAD'
"""

from jaxrec_kernels.stochastic_rounding import random_bits, seed_for_step, stochastic_round

from jaxrec.optim.fused import (
    FusedTableParams,
    apply_updates,
    fused,
    init_fused_table,
    nonfinite_rows,
)
from jaxrec.optim.sparse_optimizers import (
    SparseOptimizer,
    WeightDecayMode,
    adam,
    exact_adagrad,
    exact_rowwise_adagrad,
    exact_sgd,
    lamb,
    lars_sgd,
    partial_rowwise_adam,
    partial_rowwise_lamb,
)

__all__ = [
    "FusedTableParams",
    "SparseOptimizer",
    "WeightDecayMode",
    "adam",
    "apply_updates",
    "exact_adagrad",
    "exact_rowwise_adagrad",
    "exact_sgd",
    "fused",
    "init_fused_table",
    "lamb",
    "lars_sgd",
    "nonfinite_rows",
    "partial_rowwise_adam",
    "partial_rowwise_lamb",
    "random_bits",
    "seed_for_step",
    "stochastic_round",
]
