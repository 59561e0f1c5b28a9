"""FBGEMM's ``optimizer=OptimType...`` and its keyword arguments, as a jaxrec sparse optimizer.

The TBE keeps its learning rate in its state, so the optimizer is rebuilt around the
traced learning rate at every trace (:func:`make_optimizer`); the arguments are checked
once, at construction, by building it around the constructor's learning rate.

>>> from jaxrec.tbe.enums import OptimType
>>> args = OptimizerArgs(OptimType.EXACT_ROWWISE_ADAGRAD, eps=1e-8)
>>> make_optimizer(args, 0.05)
SparseOptimizer(EXACT_ROWWISE_ADAGRAD, learning_rate=0.05, eps=1e-08, weight_decay=0.0, weight_decay_mode=<WeightDecayMode.NONE: 0>, max_norm=0.0, gradient_clipping=False, max_gradient=1.0, stochastic_rounding=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxrec.optim import sparse_optimizers as so
from jaxrec.tbe.enums import OptimType, WeightDecayMode

_ADAM_LIKE = {
    OptimType.ADAM: so.adam,
    OptimType.PARTIAL_ROWWISE_ADAM: so.partial_rowwise_adam,
    OptimType.LAMB: so.lamb,
    OptimType.PARTIAL_ROWWISE_LAMB: so.partial_rowwise_lamb,
}
_DECAYING = (*_ADAM_LIKE, OptimType.LARS_SGD, OptimType.EXACT_ROWWISE_ADAGRAD)


@dataclass(frozen=True)
class OptimizerArgs:
    """The optimizer arguments of FBGEMM's constructor (static, hashable)."""

    optimizer: OptimType
    stochastic_rounding: bool = True
    gradient_clipping: bool = False
    max_gradient: float = 1.0
    max_norm: float = 0.0
    eps: float = 1.0e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_mode: WeightDecayMode = WeightDecayMode.NONE
    eta: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999

    def check(self) -> None:
        """Refuse combinations FBGEMM's optimizers do not define."""
        name = self.optimizer.name
        if self.weight_decay and self.optimizer not in _DECAYING:
            raise ValueError(
                f"weight_decay={self.weight_decay}: {name} has no weight decay (FBGEMM's "
                "neither); use EXACT_ROWWISE_ADAGRAD, ADAM, LAMB, their partial row-wise "
                "forms or LARS_SGD"
            )
        if (
            self.weight_decay_mode is WeightDecayMode.L2
            and self.optimizer is not OptimType.EXACT_ROWWISE_ADAGRAD
        ):
            raise ValueError(
                f"weight_decay_mode=L2: only EXACT_ROWWISE_ADAGRAD has L2 weight decay; {name}'s "
                "weight decay is decoupled (weight_decay_mode NONE or DECOUPLE)"
            )
        if self.max_norm and self.optimizer is not OptimType.EXACT_ROWWISE_ADAGRAD:
            raise ValueError(
                f"max_norm={self.max_norm}: only EXACT_ROWWISE_ADAGRAD clips rows to a max norm"
            )


def make_optimizer(args: OptimizerArgs, learning_rate: Any) -> so.SparseOptimizer | None:
    """The fused optimizer of ``args`` at ``learning_rate`` (a float, or a callable
    ``count -> lr`` such as one returning a traced scalar); ``None`` for ``OptimType.NONE``."""
    common = {
        "gradient_clipping": args.gradient_clipping,
        "max_gradient": args.max_gradient,
        "stochastic_rounding": args.stochastic_rounding,
    }
    kind = args.optimizer
    if kind is OptimType.NONE:
        return None
    if kind in (OptimType.SGD, OptimType.EXACT_SGD):
        return so.exact_sgd(learning_rate, **common)
    if kind is OptimType.EXACT_ADAGRAD:
        return so.exact_adagrad(learning_rate, args.eps, **common)
    if kind is OptimType.EXACT_ROWWISE_ADAGRAD:
        return so.exact_rowwise_adagrad(
            learning_rate,
            args.eps,
            args.weight_decay,
            args.weight_decay_mode,
            args.max_norm,
            **common,
        )
    if kind is OptimType.LARS_SGD:
        return so.lars_sgd(learning_rate, args.eta, args.momentum, args.weight_decay, **common)
    return _ADAM_LIKE[kind](
        learning_rate, args.beta1, args.beta2, args.eps, args.weight_decay, **common
    )
