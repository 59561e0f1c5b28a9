"""The sparse optimizer type and how an update rule becomes one.

A :class:`SparseOptimizer` is a NamedTuple of two pure functions, as an optax
``GradientTransformation`` is: ``init(num_rows, dim)`` builds a table's state and
``update(weights, state, grads, step, dim)`` applies one step to the rows it is
given. :func:`build` wraps an update rule of :mod:`jaxrec.optim.rules` with the
steps every optimizer shares (argument checks, float32 casts, gradient clipping,
the learning rate at ``t - 1``). The constructors users call are in
:mod:`jaxrec.optim.sparse_optimizers`; the rules are written out in
``docs/optimizers.md``.

State stays a dict keyed by FBGEMM's buffer names (``momentum1``, ``momentum2``):
the fused-update kernels load and store each buffer by name, and the collections'
variables, ``optimizer_state_dict`` and checkpoints use the same names.

>>> from jaxrec.optim import rules
>>> opt = build("EXACT_SGD", rules.sgd(), StepOptions.checked(0.5, False, 1.0, True))
>>> opt
SparseOptimizer(EXACT_SGD, learning_rate=0.5, gradient_clipping=False, max_gradient=1.0, stochastic_rounding=True)
>>> opt.init(3, 2)
{}
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrec.optim.rules import Layout, LearningRate, RowRule, State, WeightDecayMode

__all__ = [
    "SparseOptimizer",
    "StepOptions",
    "WeightDecayMode",
    "as_weight_decay_mode",
    "beta",
    "build",
    "non_negative",
]


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
        for bit and is counted under ``bounds_check_mode`` WARNING and FATAL
        (:func:`jaxrec.optim.nonfinite_rows`; the collections' ``"bounds_check"``
        collection, ``"nonfinite_gradient_rows"``), with a runtime warning under
        WARNING and a checkify error under FATAL. ``opt._replace(skip_nonfinite=False)``
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


class Hyperparams(Mapping):
    """A read-only, hashable mapping (so an optimizer can be a static argument).

    >>> h = Hyperparams({"eps": 1e-8})
    >>> h["eps"], hash(h) == hash(Hyperparams({"eps": 1e-8}))
    (1e-08, True)
    """

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


def finite(name: str, value: object) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def non_negative(name: str, value: object) -> float:
    """``value`` as a finite float >= 0, or a ValueError naming ``name``.

    >>> non_negative("eps", -1.0)
    Traceback (most recent call last):
    ...
    ValueError: eps must be >= 0, got -1.0
    """
    number = finite(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def beta(name: str, value: object) -> float:
    """``value`` as a float in ``[0, 1)`` (a moment's decay), or a ValueError naming ``name``."""
    number = finite(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return number


def as_weight_decay_mode(value: object) -> WeightDecayMode:
    """A :class:`WeightDecayMode` from itself, its name (any case) or its value.

    >>> as_weight_decay_mode("decouple"), as_weight_decay_mode(1)
    (<WeightDecayMode.DECOUPLE: 2>, <WeightDecayMode.L2: 1>)
    """
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


class StepOptions(NamedTuple):
    """The options every optimizer takes besides its rule's hyperparameters.

    Attributes:
      learning_rate: a float >= 0 or an optax schedule ``count -> lr``
        (evaluated at ``count = t - 1``).
      gradient_clipping: clamp each element of ``g`` to ``±max_gradient`` first.
      max_gradient: the clamp bound (> 0 when clipping).
      stochastic_rounding: store 16-bit weights back with stochastic rounding.
    """

    learning_rate: LearningRate
    gradient_clipping: bool
    max_gradient: float
    stochastic_rounding: bool

    @classmethod
    def checked(
        cls,
        learning_rate: object,
        gradient_clipping: object,
        max_gradient: object,
        stochastic_rounding: object,
    ) -> StepOptions:
        """The options, checked; a ValueError names a bad one.

        >>> StepOptions.checked(0.1, True, 0.0, True)
        Traceback (most recent call last):
        ...
        ValueError: max_gradient must be > 0 with gradient_clipping, got 0.0
        """
        lr = (
            learning_rate
            if callable(learning_rate)
            else non_negative("learning_rate", learning_rate)
        )
        bound = finite("max_gradient", max_gradient)
        if gradient_clipping and bound <= 0:
            raise ValueError(
                f"max_gradient must be > 0 with gradient_clipping, got {max_gradient!r}"
            )
        return cls(lr, bool(gradient_clipping), bound, bool(stochastic_rounding))


# ----------------------------------------------------------------------------
# a rule becomes an optimizer


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _zeros(layout: Layout, num_rows: int, dim: int) -> jax.Array:
    shape = (num_rows,) if layout == "rowwise" else (num_rows, dim)
    return jnp.zeros(shape, jnp.float32)


def _make_init(name: str, state: tuple[tuple[str, Layout], ...]) -> Callable[[int, int], State]:
    def init(num_rows: int, dim: int) -> State:
        rows, width = _as_int(num_rows), _as_int(dim)
        if rows is None or rows < 0:
            raise ValueError(f"{name}.init: num_rows must be an int >= 0, got {num_rows!r}")
        if width is None or width < 1:
            raise ValueError(f"{name}.init: dim must be an int >= 1, got {dim!r}")
        return {key: _zeros(layout, rows, width) for key, layout in state}

    return init


def _learning_rate_at(learning_rate: LearningRate, step: Any) -> jax.Array:
    """The learning rate of step ``t`` (a schedule is read at ``count = t - 1``)."""
    if callable(learning_rate):
        count = jnp.asarray(step).astype(jnp.int32) - 1
        return jnp.asarray(learning_rate(count), jnp.float32)
    return jnp.float32(learning_rate)


def _make_update(name: str, rule: RowRule, options: StepOptions) -> Callable[..., Any]:
    """Wraps ``rule`` with the steps common to all optimizers.

    The rule gets float32 ``w``, ``state``, clipped ``g``, float32 ``t``, the traced
    ``lr`` and the static row width ``dim``.
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
        for key, layout in rule.state:
            want = weights.shape if layout == "elementwise" else weights.shape[:-1]
            got = jnp.shape(state[key]) if key in state else None
            if got != want:
                raise ValueError(f"{name}.update: state[{key!r}] has shape {got}; expected {want}")
        w = weights.astype(jnp.float32)
        g = grads.astype(jnp.float32)
        if options.gradient_clipping:
            g = jnp.clip(g, -options.max_gradient, options.max_gradient)
        t = jnp.asarray(step).astype(jnp.float32)
        lr = _learning_rate_at(options.learning_rate, step)
        s = {key: state[key].astype(jnp.float32) for key, _ in rule.state}
        return rule.step(w, s, g, t, lr, real)

    return update


def build(name: str, rule: RowRule, options: StepOptions, **hyperparams: object) -> SparseOptimizer:
    """The optimizer ``name`` that applies ``rule`` with ``options``.

    ``hyperparams`` are the rule's own (checked) arguments; with ``options`` they
    make the optimizer's ``hyperparams``, learning rate first and the shared
    options last, in constructor order.
    """
    settings = {
        "learning_rate": options.learning_rate,
        **hyperparams,
        "gradient_clipping": options.gradient_clipping,
        "max_gradient": options.max_gradient,
        "stochastic_rounding": options.stochastic_rounding,
    }
    return SparseOptimizer(
        name=name,
        init=_make_init(name, rule.state),
        update=_make_update(name, rule, options),
        stochastic_rounding=options.stochastic_rounding,
        hyperparams=Hyperparams(settings),
    )
