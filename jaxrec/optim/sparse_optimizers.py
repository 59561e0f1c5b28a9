"""FBGEMM's fused sparse row optimizers, written optax-style.

A :class:`SparseOptimizer` is a NamedTuple of pure functions. ``init(num_rows,
dim)`` builds the per-row state of a table (float32 zeros, FBGEMM's names
``momentum1`` / ``momentum2``: shape ``[num_rows]`` for row-wise state,
``[num_rows, dim]`` for element-wise state). ``update(weights, state, grads,
step, dim)`` applies one step to the rows it is given and nothing else (lazy
updates: untouched rows keep their weights and state).

``update`` is built from elementwise ``jnp`` ops and reductions over the last
axis only, so the same function runs on rows ``[U, D]`` in XLA and on a block
``[Ub, Dp]`` or a single row ``[Dp]`` inside a Pallas Triton kernel. Rows may
be padded to ``Dp >= dim`` lanes with zeros in ``weights``, ``grads`` and the
element-wise state: means divide by ``dim``; the padded output lanes stay
finite (zero).

Notation of the rules (FBGEMM's; see OPTIMIZERS.md): ``g`` the row's gradient
summed over its occurrences in the batch, ``w`` the row's weights before the
step, ``t >= 1`` this optimizer's step count, ``lr`` the learning rate at
count ``t - 1``; means and norms run over the ``dim`` lanes of the row. With
``gradient_clipping`` every element of ``g`` is first clamped to
``[-max_gradient, max_gradient]``. Divisions whose denominator is zero (only
possible with ``eps = 0`` or all-zero rows) give 0 instead of NaN.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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

State = dict[str, jax.Array]
LearningRate = float | Callable[[jax.Array], Any]
Rule = Callable[[jax.Array, State, jax.Array, jax.Array, jax.Array, int], tuple[jax.Array, State]]


class WeightDecayMode(enum.Enum):
    """FBGEMM's weight decay modes (same names and values)."""

    NONE = 0
    L2 = 1
    DECOUPLE = 2


class SparseOptimizer(NamedTuple):
    """A fused row optimizer: pure ``init`` / ``update`` plus its settings.

    Attributes:
      name: FBGEMM's ``EmbOptimType`` name, e.g. ``"EXACT_ROWWISE_ADAGRAD"``.
      init: ``init(num_rows, dim) -> state``; ``{}`` when stateless.
      update: ``update(weights, state, grads, step, dim) -> (weights, state)``
        on float32 rows ``[..., Dp]``, state ``[...]`` (row-wise) or
        ``[..., Dp]`` (element-wise), traced ``step`` t >= 1 and static ``dim``.
      stochastic_rounding: whether 16-bit weights are stored back with
        stochastic rounding.
      hyperparams: the constructor's arguments.
      skip_nonfinite: the fused update's non-finite guard (default on): a row whose
        summed gradient holds a NaN or an infinity keeps its weights and state bit
        for bit and is reported (a checkify error under ``bounds_check_mode`` FATAL,
        a runtime warning under WARNING). ``opt._replace(skip_nonfinite=False)``
        turns it off, e.g. to measure its cost.
    """

    name: str
    init: Callable[[int, int], State]
    update: Callable[..., tuple[jax.Array, State]]
    stochastic_rounding: bool
    hyperparams: Mapping[str, object]
    skip_nonfinite: bool = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"SparseOptimizer({self.name}, {args})"


class _Hyperparams(Mapping):
    """A read-only, hashable mapping (so an optimizer can be a static argument)."""

    def __init__(self, items: Mapping[str, object]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


# ----------------------------------------------------------------------------
# validation (at construction, outside jit)


def _finite(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _non_negative(name: str, value: object) -> float:
    number = _finite(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def _beta(name: str, value: object) -> float:
    number = _finite(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return number


def _learning_rate(value: object) -> LearningRate:
    if callable(value):
        return value
    return _non_negative("learning_rate", value)


def _clipping(gradient_clipping: bool, max_gradient: object) -> float:
    number = _finite("max_gradient", max_gradient)
    if gradient_clipping and number <= 0:
        raise ValueError(f"max_gradient must be > 0 with gradient_clipping, got {max_gradient!r}")
    return number


def _weight_decay_mode(value: object) -> WeightDecayMode:
    if isinstance(value, WeightDecayMode):
        return value
    if isinstance(value, str) and value.upper() in WeightDecayMode.__members__:
        return WeightDecayMode[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        for mode in WeightDecayMode:
            if mode.value == value:
                return mode
    names = ", ".join(WeightDecayMode.__members__)
    raise ValueError(f"weight_decay_mode must be one of {names}, got {value!r}")


# ----------------------------------------------------------------------------
# building blocks of the rules (elementwise ops, last-axis reductions)


def _row_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=-1)


def _row_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def _lanes(per_row: jax.Array) -> jax.Array:
    """Broadcasts a per-row value ``[...]`` against rows ``[..., Dp]``."""
    return per_row[..., None]


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def _bias_correction(beta: float, t: jax.Array) -> jax.Array | float:
    """``1 - beta**t`` for float32 ``t``, without cancellation near t = 1."""
    if beta == 0.0:
        return 1.0
    return -jnp.expm1(t * math.log(beta))


def _zeros_rowwise(num_rows: int, dim: int) -> jax.Array:
    del dim
    return jnp.zeros((num_rows,), jnp.float32)


def _zeros_elementwise(num_rows: int, dim: int) -> jax.Array:
    return jnp.zeros((num_rows, dim), jnp.float32)


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _make_init(layout: Mapping[str, Callable[[int, int], jax.Array]], name: str):
    def init(num_rows: int, dim: int) -> State:
        rows, width = _as_int(num_rows), _as_int(dim)
        if rows is None or rows < 0:
            raise ValueError(f"{name}.init: num_rows must be an int >= 0, got {num_rows!r}")
        if width is None or width < 1:
            raise ValueError(f"{name}.init: dim must be an int >= 1, got {dim!r}")
        return {key: make(rows, width) for key, make in layout.items()}

    return init


def _make_update(
    name: str,
    rule: Rule,
    learning_rate: LearningRate,
    gradient_clipping: bool,
    max_gradient: float,
    state_layout: Mapping[str, str],
):
    """Wraps a rule with the steps common to all optimizers.

    The rule gets float32 ``w``, ``state``, clipped ``g``, float32 ``t`` and
    the traced ``lr``.
    """

    def update(
        weights: jax.Array, state: State, grads: jax.Array, step: jax.Array, dim: int
    ) -> tuple[jax.Array, State]:
        width = weights.shape[-1] if weights.ndim else 0
        if weights.ndim < 1 or grads.shape != weights.shape:
            raise ValueError(
                f"{name}.update: weights {weights.shape} and grads {grads.shape} must be rows "
                "[..., Dp] of the same shape"
            )
        real = _as_int(dim)
        if real is None or not 1 <= real <= width:
            raise ValueError(f"{name}.update: dim must be an int in [1, {width}], got {dim!r}")
        for key, kind in state_layout.items():
            want = weights.shape if kind == "elementwise" else weights.shape[:-1]
            got = jnp.shape(state[key]) if key in state else None
            if got != want:
                raise ValueError(f"{name}.update: state[{key!r}] has shape {got}; expected {want}")
        w = weights.astype(jnp.float32)
        g = grads.astype(jnp.float32)
        if gradient_clipping:
            g = jnp.clip(g, -max_gradient, max_gradient)
        t = jnp.asarray(step).astype(jnp.float32)
        if callable(learning_rate):
            count = jnp.asarray(step).astype(jnp.int32) - 1
            lr = jnp.asarray(learning_rate(count), jnp.float32)
        else:
            lr = jnp.float32(learning_rate)
        s = {key: state[key].astype(jnp.float32) for key in state_layout}
        return rule(w, s, g, t, lr, real)

    return update


def _build(
    name: str,
    rule: Rule,
    state_layout: Mapping[str, str],
    hyperparams: dict[str, object],
) -> SparseOptimizer:
    makers = {"rowwise": _zeros_rowwise, "elementwise": _zeros_elementwise}
    update = _make_update(
        name,
        rule,
        hyperparams["learning_rate"],  # type: ignore[arg-type]
        bool(hyperparams["gradient_clipping"]),
        float(hyperparams["max_gradient"]),  # type: ignore[arg-type]
        state_layout,
    )
    return SparseOptimizer(
        name=name,
        init=_make_init({k: makers[v] for k, v in state_layout.items()}, name),
        update=update,
        stochastic_rounding=bool(hyperparams["stochastic_rounding"]),
        hyperparams=_Hyperparams(hyperparams),
    )


def _common(
    learning_rate: object, gradient_clipping: bool, max_gradient: object, stochastic_rounding: bool
) -> dict[str, object]:
    return {
        "learning_rate": _learning_rate(learning_rate),
        "gradient_clipping": bool(gradient_clipping),
        "max_gradient": _clipping(gradient_clipping, max_gradient),
        "stochastic_rounding": bool(stochastic_rounding),
    }


def _ordered(hyper: dict[str, object]) -> dict[str, object]:
    """Constructor order: learning rate first, the shared options last."""
    first = ["learning_rate"]
    last = ["gradient_clipping", "max_gradient", "stochastic_rounding"]
    middle = [k for k in hyper if k not in first + last]
    return {k: hyper[k] for k in first + middle + last}


# ----------------------------------------------------------------------------
# the optimizers


def exact_sgd(
    learning_rate: LearningRate = 0.01,
    *,
    gradient_clipping: bool = False,
    max_gradient: float = 1.0,
    stochastic_rounding: bool = True,
) -> SparseOptimizer:
    """FBGEMM's EXACT_SGD: ``w <- w - lr * g``. No state.

    Args:
      learning_rate: a float >= 0 or an optax schedule ``count -> lr``
        (evaluated at ``count = t - 1``).
      gradient_clipping: clamp each element of ``g`` to ``±max_gradient`` first.
      max_gradient: the clamp bound (> 0 when clipping).
      stochastic_rounding: store 16-bit weights back with stochastic rounding.

    >>> import jax.numpy as jnp
    >>> opt = exact_sgd(learning_rate=0.5)
    >>> w, s = opt.update(jnp.ones((1, 2)), opt.init(1, 2), jnp.ones((1, 2)), 1, dim=2)
    >>> w.tolist(), s
    ([[0.5, 0.5]], {})
    """

    def rule(w, s, g, t, lr, dim):
        return w - lr * g, {}

    hyper = _common(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    return _build("EXACT_SGD", rule, {}, _ordered(hyper))


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
    hyper = _common(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    eps = hyper["eps"] = _non_negative("eps", eps)

    def rule(w, s, g, t, lr, dim):
        m = s["momentum1"] + g * g
        return w - lr * _safe_div(g, jnp.sqrt(m) + eps), {"momentum1": m}

    return _build("EXACT_ADAGRAD", rule, {"momentum1": "elementwise"}, _ordered(hyper))


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
    hyper = _common(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    eps = hyper["eps"] = _non_negative("eps", eps)
    wd = hyper["weight_decay"] = _non_negative("weight_decay", weight_decay)
    mode = hyper["weight_decay_mode"] = _weight_decay_mode(weight_decay_mode)
    max_norm = hyper["max_norm"] = _non_negative("max_norm", max_norm)

    def rule(w, s, g, t, lr, dim):
        g_decayed = g + wd * w if mode is WeightDecayMode.L2 else g
        acc = s["momentum1"] + _row_sum(g_decayed * g_decayed) / dim
        multiplier = _safe_div(lr, jnp.sqrt(acc) + eps)
        if mode is WeightDecayMode.L2:
            correction = 1.0 - multiplier * wd
        elif mode is WeightDecayMode.DECOUPLE:
            correction = 1.0 - lr * wd
        else:
            correction = jnp.ones_like(multiplier)
        new_w = _lanes(correction) * w - _lanes(multiplier) * g
        if max_norm > 0:
            norm = _row_norm(new_w)
            scale = jnp.where(norm > max_norm, _safe_div(jnp.float32(max_norm), norm), 1.0)
            new_w = new_w * _lanes(scale)
        return new_w, {"momentum1": acc}

    return _build("EXACT_ROWWISE_ADAGRAD", rule, {"momentum1": "rowwise"}, _ordered(hyper))


def _adam_like(
    name: str,
    rowwise_m2: bool,
    lamb_ratio: bool,
    learning_rate: LearningRate,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    gradient_clipping: bool,
    max_gradient: float,
    stochastic_rounding: bool,
) -> SparseOptimizer:
    hyper = _common(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    b1 = hyper["beta1"] = _beta("beta1", beta1)
    b2 = hyper["beta2"] = _beta("beta2", beta2)
    eps = hyper["eps"] = _non_negative("eps", eps)
    wd = hyper["weight_decay"] = _non_negative("weight_decay", weight_decay)

    def rule(w, s, g, t, lr, dim):
        m1 = b1 * s["momentum1"] + (1.0 - b1) * g
        if rowwise_m2:
            m2 = b2 * s["momentum2"] + (1.0 - b2) * (_row_sum(g * g) / dim)
            denom = _lanes(jnp.sqrt(m2 / _bias_correction(b2, t)) + eps)
        else:
            m2 = b2 * s["momentum2"] + (1.0 - b2) * (g * g)
            denom = jnp.sqrt(m2 / _bias_correction(b2, t)) + eps
        r = _safe_div(m1 / _bias_correction(b1, t), denom) + wd * w
        if lamb_ratio:
            ratio = _safe_div(_row_norm(w), _row_norm(r))
            new_w = w - _lanes(lr * ratio) * r
        else:
            new_w = w - lr * r
        return new_w, {"momentum1": m1, "momentum2": m2}

    layout = {"momentum1": "elementwise", "momentum2": "rowwise" if rowwise_m2 else "elementwise"}
    return _build(name, rule, layout, _ordered(hyper))


def adam(
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
    """FBGEMM's ADAM (lazy), state ``momentum1 [D]``, ``momentum2 [D]``.

    ``m1 <- b1 m1 + (1 - b1) g;  m2 <- b2 m2 + (1 - b2) g**2;
    w <- w - lr * (m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w)``

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = adam(learning_rate=0.1)
    >>> w, s = opt.update(jnp.ones(2), {k: jnp.zeros(2) for k in ("momentum1", "momentum2")},
    ...                   jnp.array([1.0, -1.0]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()   # the first bias-corrected step moves each lane by lr
    [0.9, 1.1]
    """
    return _adam_like(
        "ADAM",
        False,
        False,
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
        gradient_clipping,
        max_gradient,
        stochastic_rounding,
    )


def partial_rowwise_adam(
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
    """FBGEMM's PARTIAL_ROWWISE_ADAM, state ``momentum1 [D]``, ``momentum2 [R]``.

    ``m2 <- b2 m2 + (1 - b2) mean(g**2);  m1 <- b1 m1 + (1 - b1) g;
    w <- w - lr * (m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w)``

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = partial_rowwise_adam(learning_rate=0.1)
    >>> w, s = opt.update(jnp.ones((1, 2)), opt.init(1, 2), jnp.array([[3.0, 4.0]]), 1, 2)
    >>> round(float(s["momentum2"][0]), 6)   # (1 - b2) * mean(g*g) = 0.001 * 12.5
    0.0125
    >>> np.asarray(w, float).round(4).tolist()
    [[0.9151, 0.8869]]
    """
    return _adam_like(
        "PARTIAL_ROWWISE_ADAM",
        True,
        False,
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
        gradient_clipping,
        max_gradient,
        stochastic_rounding,
    )


def lamb(
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
    """FBGEMM's LAMB, state ``momentum1 [D]``, ``momentum2 [D]``.

    ``m1, m2`` as in :func:`adam`;
    ``r = m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w;
    w <- w - lr * (|w| / |r|) * r`` with row norms ``|.|`` of the weights
    before the step. A row of zero weights (or a zero ``r``) does not move.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = lamb(learning_rate=0.1)
    >>> w, _ = opt.update(jnp.array([[3.0, 4.0]]), opt.init(1, 2), jnp.array([[1.0, 1.0]]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()   # r ~ [1, 1]; the step has norm lr * |w| = 0.5
    [[2.6464, 3.6464]]
    """
    return _adam_like(
        "LAMB",
        False,
        True,
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
        gradient_clipping,
        max_gradient,
        stochastic_rounding,
    )


def partial_rowwise_lamb(
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
    """FBGEMM's PARTIAL_ROWWISE_LAMB, state ``momentum1 [D]``, ``momentum2 [R]``.

    ``m2`` as in :func:`partial_rowwise_adam`, ``m1`` as in :func:`adam`;
    ``r = m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w;
    w <- w - lr * (|w| / |r|) * r``. A row of zero weights (or a zero ``r``)
    does not move.

    >>> import jax.numpy as jnp, numpy as np
    >>> opt = partial_rowwise_lamb(learning_rate=0.1)
    >>> w, _ = opt.update(jnp.array([[3.0, 4.0]]), opt.init(1, 2), jnp.array([[1.0, 1.0]]), 1, 2)
    >>> np.asarray(w, float).round(4).tolist()
    [[2.6464, 3.6464]]
    """
    return _adam_like(
        "PARTIAL_ROWWISE_LAMB",
        True,
        True,
        learning_rate,
        beta1,
        beta2,
        eps,
        weight_decay,
        gradient_clipping,
        max_gradient,
        stochastic_rounding,
    )


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
    hyper = _common(learning_rate, gradient_clipping, max_gradient, stochastic_rounding)
    eta = hyper["eta"] = _non_negative("eta", eta)
    mu = hyper["momentum"] = _non_negative("momentum", momentum)
    wd = hyper["weight_decay"] = _non_negative("weight_decay", weight_decay)

    def rule(w, s, g, t, lr, dim):
        w_norm = _row_norm(w)
        rate = _safe_div(lr * eta * w_norm, _row_norm(g) + wd * w_norm)
        m1 = mu * s["momentum1"] + _lanes(rate) * (g + wd * w)
        return w - m1, {"momentum1": m1}

    return _build("LARS_SGD", rule, {"momentum1": "elementwise"}, _ordered(hyper))
