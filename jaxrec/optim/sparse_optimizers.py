"""FBGEMM's fused sparse row optimizers, as optax-style constructors.

Each constructor checks its arguments and builds a :class:`SparseOptimizer`
from an update rule of :mod:`jaxrec.optim.rules` (see :mod:`jaxrec.optim.base`).
``init(num_rows, dim)`` builds the per-row state of a table (float32 zeros,
FBGEMM's names ``momentum1`` / ``momentum2``: shape ``[num_rows]`` for row-wise
state, ``[num_rows, dim]`` for element-wise state). ``update(weights, state,
grads, step, dim)`` applies one step to the rows it is given and nothing else
(lazy updates: untouched rows keep their weights and state).

The rules, their notation (``g`` the row's gradient summed over its occurrences
in the batch, ``w`` the row before the step, ``t >= 1`` the step count, ``lr``
the learning rate at count ``t - 1``), weight decay, gradient clipping and
stochastic rounding are written out in ``docs/optimizers.md``, with FBGEMM's
table-batched embedding operator as the reference.

Every constructor takes, after its own hyperparameters, the keyword-only
options of :class:`~jaxrec.optim.base.StepOptions`:

- ``gradient_clipping``: clamp each element of ``g`` to ``±max_gradient`` first.
- ``max_gradient``: the clamp bound (> 0 when clipping).
- ``stochastic_rounding``: store 16-bit weights back with stochastic rounding.

``learning_rate`` is a float >= 0 or an optax schedule ``count -> lr``.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxrec.optim import rules
from jaxrec.optim.base import (
    SparseOptimizer,
    StepOptions,
    WeightDecayMode,
    as_weight_decay_mode,
    beta,
    build,
    non_negative,
)
from jaxrec.optim.rules import Direction, Layout, LearningRate, RowRule

__all__ = [
    "SparseOptimizer",
    "WeightDecayMode",
    "adam",
    "exact_adagrad",
    "exact_rowwise_adagrad",
    "exact_sgd",
    "lamb",
    "lars_sgd",
    "partial_rowwise_adam",
    "partial_rowwise_lamb",
]


def exact_sgd(
    learning_rate: LearningRate = 0.01,
    *,
    gradient_clipping: bool = False,
    max_gradient: float = 1.0,
    stochastic_rounding: bool = True,
) -> SparseOptimizer:
    """FBGEMM's EXACT_SGD: ``w <- w - lr * g``. No state.

    >>> import jax.numpy as jnp
    >>> opt = exact_sgd(learning_rate=0.5)
    >>> w, s = opt.update(jnp.ones((1, 2)), opt.init(1, 2), jnp.ones((1, 2)), 1, dim=2)
    >>> w.tolist(), s
    ([[0.5, 0.5]], {})
    """
    opts = StepOptions.checked(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    return build("EXACT_SGD", rules.sgd(), opts)


def exact_adagrad(
    learning_rate: LearningRate = 0.01,
    eps: float = 1.0e-8,
    *,
    gradient_clipping: bool = False,
    max_gradient: float = 1.0,
    stochastic_rounding: bool = True,
) -> SparseOptimizer:
    """FBGEMM's EXACT_ADAGRAD, element-wise state ``momentum1 [D]``.

    ``s <- s + g**2;  w <- w - lr * g / (sqrt(s) + eps)``

    >>> import jax.numpy as jnp
    >>> opt = exact_adagrad(learning_rate=1.0, eps=0.0)
    >>> w, s = opt.update(jnp.zeros(2), {"momentum1": jnp.zeros(2)}, jnp.array([2.0, -3.0]), 1, 2)
    >>> w.tolist(), s["momentum1"].tolist()
    ([-1.0, 1.0], [4.0, 9.0])
    """
    opts = StepOptions.checked(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    eps = non_negative("eps", eps)
    return build("EXACT_ADAGRAD", rules.adagrad(eps=eps), opts, eps=eps)


def exact_rowwise_adagrad(
    learning_rate: LearningRate = 0.01,
    eps: float = 1.0e-8,
    weight_decay: float = 0.0,
    weight_decay_mode: WeightDecayMode | str | int = WeightDecayMode.NONE,
    max_norm: float = 0.0,
    *,
    gradient_clipping: bool = False,
    max_gradient: float = 1.0,
    stochastic_rounding: bool = True,
) -> SparseOptimizer:
    """FBGEMM's EXACT_ROWWISE_ADAGRAD, one float of state per row (``momentum1 [R]``).

    - NONE:     ``s <- s + mean(g**2); m = lr / (sqrt(s) + eps); w <- w - m * g``
    - L2:       ``g' = g + wd * w; s <- s + mean(g'**2); m = lr / (sqrt(s) + eps);
      w <- (1 - m * wd) * w - m * g``
    - DECOUPLE: ``s <- s + mean(g**2); m = lr / (sqrt(s) + eps);
      w <- (1 - lr * wd) * w - m * g``

    ``weight_decay`` is ignored with mode NONE. With ``max_norm > 0`` the
    updated row is then scaled to norm ``max_norm`` when its norm exceeds it
    (FBGEMM's GPU max-norm clipping; here applied to the float32 row before a
    16-bit table stores it back).

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = exact_rowwise_adagrad(learning_rate=1.0, eps=0.0)
    >>> w, s = opt.update(jnp.zeros((1, 2)), opt.init(1, 2), jnp.array([[3.0, 4.0]]), 1, 2)
    >>> s["momentum1"].tolist(), np.asarray(w, float).round(4).tolist()   # mean(g*g) = 12.5
    ([12.5], [[-0.8485, -1.1314]])
    """
    opts = StepOptions.checked(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    settings = dict(
        eps=non_negative("eps", eps),
        weight_decay=non_negative("weight_decay", weight_decay),
        weight_decay_mode=as_weight_decay_mode(weight_decay_mode),
        max_norm=non_negative("max_norm", max_norm),
    )
    return build("EXACT_ROWWISE_ADAGRAD", rules.rowwise_adagrad(**settings), opts, **settings)


def _adam_family(
    name: str,
    *,
    second_moment: Layout,
    descent: Callable[[Direction], RowRule],
) -> Callable[..., SparseOptimizer]:
    """The constructor of one Adam-family optimizer: Adam's direction with the
    given second moment, followed along by ``descent`` (documented where it is made)."""

    def constructor(
        learning_rate: LearningRate = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1.0e-8,
        weight_decay: float = 0.0,
        *,
        gradient_clipping: bool = False,
        max_gradient: float = 1.0,
        stochastic_rounding: bool = True,
    ) -> SparseOptimizer:
        opts = StepOptions.checked(
            learning_rate, gradient_clipping, max_gradient, stochastic_rounding
        )
        settings = dict(
            beta1=beta("beta1", beta1),
            beta2=beta("beta2", beta2),
            eps=non_negative("eps", eps),
            weight_decay=non_negative("weight_decay", weight_decay),
        )
        direction = rules.adam_direction(**settings, second_moment=second_moment)
        return build(name, descent(direction), opts, **settings)

    constructor.__name__ = constructor.__qualname__ = name.lower()
    return constructor


adam = _adam_family("ADAM", second_moment="elementwise", descent=rules.descend)
adam.__doc__ = """FBGEMM's ADAM (lazy), state ``momentum1 [D]``, ``momentum2 [D]``.

    ``m1 <- b1 m1 + (1 - b1) g;  m2 <- b2 m2 + (1 - b2) g**2;
    w <- w - lr * (m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w)``

    Arguments: ``learning_rate``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``
    (FBGEMM's defaults 0.01, 0.9, 0.999, 1e-8, 0), then the keyword-only options.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = adam(learning_rate=0.1)
    >>> w, s = opt.update(jnp.ones(2), {k: jnp.zeros(2) for k in ("momentum1", "momentum2")},
    ...                   jnp.array([1.0, -1.0]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()   # the first bias-corrected step moves each lane by lr
    [0.9, 1.1]
    """

partial_rowwise_adam = _adam_family(
    "PARTIAL_ROWWISE_ADAM", second_moment="rowwise", descent=rules.descend
)
partial_rowwise_adam.__doc__ = """FBGEMM's PARTIAL_ROWWISE_ADAM, state ``momentum1 [D]``, ``momentum2 [R]``.

    ``m2 <- b2 m2 + (1 - b2) mean(g**2);  m1 <- b1 m1 + (1 - b1) g;
    w <- w - lr * (m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w)``

    Arguments as :func:`adam`.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = partial_rowwise_adam(learning_rate=0.1)
    >>> w, s = opt.update(jnp.ones((1, 2)), opt.init(1, 2), jnp.array([[3.0, 4.0]]), 1, 2)
    >>> round(float(s["momentum2"][0]), 6)   # (1 - b2) * mean(g*g) = 0.001 * 12.5
    0.0125
    >>> np.asarray(w, float).round(4).tolist()
    [[0.9151, 0.8869]]
    """

lamb = _adam_family("LAMB", second_moment="elementwise", descent=rules.descend_by_trust_ratio)
lamb.__doc__ = """FBGEMM's LAMB, state ``momentum1 [D]``, ``momentum2 [D]``.

    ``m1, m2`` as in :func:`adam`;
    ``r = m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w;
    w <- w - lr * (|w| / |r|) * r`` with row norms ``|.|`` of the weights
    before the step. A row of zero weights (or a zero ``r``) does not move.

    Arguments as :func:`adam`.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = lamb(learning_rate=0.1)
    >>> w, _ = opt.update(jnp.array([[3.0, 4.0]]), opt.init(1, 2), jnp.array([[1.0, 1.0]]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()   # r ~ [1, 1]; the step has norm lr * |w| = 0.5
    [[2.6464, 3.6464]]
    """

partial_rowwise_lamb = _adam_family(
    "PARTIAL_ROWWISE_LAMB", second_moment="rowwise", descent=rules.descend_by_trust_ratio
)
partial_rowwise_lamb.__doc__ = """FBGEMM's PARTIAL_ROWWISE_LAMB, state ``momentum1 [D]``, ``momentum2 [R]``.

    :func:`lamb`'s trust-ratio step ``w <- w - lr * (|w| / |r|) * r`` on the
    direction of :func:`partial_rowwise_adam` (its second moment ``m2`` is the
    row's running ``mean(g**2)``). Arguments as :func:`adam`.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = partial_rowwise_lamb(learning_rate=0.1)
    >>> state = opt.init(1, 2)
    >>> state["momentum2"].shape   # one second moment per row
    (1,)
    >>> w, _ = opt.update(jnp.array([[3.0, 4.0]]), state, jnp.array([[1.0, -7.0]]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()   # lamb's step here: [[2.6464, 4.3536]]
    [[2.9293, 4.495]]
    """


def lars_sgd(
    learning_rate: LearningRate = 0.01,
    eta: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    gradient_clipping: bool = False,
    max_gradient: float = 1.0,
    stochastic_rounding: bool = True,
) -> SparseOptimizer:
    """FBGEMM's LARS_SGD, state ``momentum1 [D]``.

    ``a = lr * eta * |w| / (|g| + wd * |w|);  m1 <- momentum * m1 + a * (g + wd * w);
    w <- w - m1`` (a row with ``|g| + wd |w| = 0`` gets ``a = 0``).

    >>> import jax.numpy as jnp
    >>> opt = lars_sgd(learning_rate=1.0, eta=0.5)
    >>> w, s = opt.update(jnp.array([3.0, 4.0]), {"momentum1": jnp.zeros(2)},
    ...                   jnp.array([0.0, 10.0]), 1, 2)
    >>> w.tolist()   # a = 0.5 * 5 / 10
    [3.0, 1.5]
    """
    opts = StepOptions.checked(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    settings = dict(
        eta=non_negative("eta", eta),
        momentum=non_negative("momentum", momentum),
        weight_decay=non_negative("weight_decay", weight_decay),
    )
    return build("LARS_SGD", rules.lars(**settings), opts, **settings)
