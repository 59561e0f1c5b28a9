"""FBGEMM's sparse optimizer update rules, as small pieces configured by keyword.

Each rule is a :class:`RowRule`: the state buffers it keeps and a pure ``step``
``(w, state, g, t, lr, dim) -> (w, state)`` on float32 rows. The Adam family is
built from two pieces, as optax chains its transforms: a :class:`Direction`
(:func:`adam_direction`, with an element-wise or row-wise second moment) and how
the row moves along it (:func:`descend`, or LAMB's :func:`descend_by_trust_ratio`).
The formulas, notation and references are in ``docs/optimizers.md``.

The steps use elementwise ``jnp`` ops and reductions over the last axis only, so
the same function runs on rows ``[U, D]`` in XLA and on a block ``[Ub, Dp]`` or a
single row ``[Dp]`` inside a Pallas kernel. Rows may be padded to ``Dp >= dim``
lanes with zeros in the weights, gradients and element-wise state: means divide by
``dim``, and padded lanes stay zero. A division by zero (only possible with
``eps = 0`` or all-zero rows) gives 0 instead of NaN.

>>> import jax.numpy as jnp
>>> rule = adagrad(eps=0.0)
>>> rule.state
(('momentum1', 'elementwise'),)
>>> w, s = rule.step(jnp.zeros(2), {"momentum1": jnp.zeros(2)}, jnp.array([2.0, -3.0]), 1.0, 1.0, 2)
>>> w.tolist(), s["momentum1"].tolist()
([-1.0, 1.0], [4.0, 9.0])
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Direction",
    "Layout",
    "RowRule",
    "WeightDecayMode",
    "adagrad",
    "adam_direction",
    "descend",
    "descend_by_trust_ratio",
    "lars",
    "rowwise_adagrad",
    "sgd",
]

State = dict[str, jax.Array]
LearningRate = float | Callable[[jax.Array], Any]
Layout = Literal["rowwise", "elementwise"]
"""``"rowwise"``: one float per row (``[rows]``); ``"elementwise"``: ``[rows, dim]``."""


class WeightDecayMode(enum.Enum):
    """FBGEMM's weight decay modes (same names and values)."""

    NONE = 0
    L2 = 1
    DECOUPLE = 2


class RowRule(NamedTuple):
    """An update rule: the state it keeps and one step on rows.

    Attributes:
      state: ``((buffer name, layout), ...)`` in FBGEMM's names.
      step: ``step(w, state, g, t, lr, dim) -> (w, state)`` on float32 rows
        ``[..., Dp]``, float32 ``t >= 1``, the traced learning rate and the
        static real width ``dim``.
    """

    state: tuple[tuple[str, Layout], ...]
    step: Callable[..., tuple[jax.Array, State]]


class Direction(NamedTuple):
    """A step direction ``r`` and the state it keeps (Adam's moments).

    Attributes:
      state: as :attr:`RowRule.state`.
      compute: ``compute(w, state, g, t, dim) -> (r, state)``.
    """

    state: tuple[tuple[str, Layout], ...]
    compute: Callable[..., tuple[jax.Array, State]]


# ----------------------------------------------------------------------------
# row arithmetic (elementwise ops, last-axis reductions)


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


# ----------------------------------------------------------------------------
# the rules


def sgd() -> RowRule:
    """EXACT_SGD: ``w <- w - lr * g``; no state."""

    def step(w, s, g, t, lr, dim):
        return w - lr * g, {}

    return RowRule((), step)


def adagrad(*, eps: float) -> RowRule:
    """EXACT_ADAGRAD: ``s <- s + g**2; w <- w - lr * g / (sqrt(s) + eps)``, ``s = momentum1``."""

    def step(w, s, g, t, lr, dim):
        m = s["momentum1"] + g * g
        return w - lr * _safe_div(g, jnp.sqrt(m) + eps), {"momentum1": m}

    return RowRule((("momentum1", "elementwise"),), step)


def rowwise_adagrad(
    *, eps: float, weight_decay: float, weight_decay_mode: WeightDecayMode, max_norm: float
) -> RowRule:
    """EXACT_ROWWISE_ADAGRAD with its weight decay modes and max-norm clipping.

    ``s <- s + mean(g'**2); m = lr / (sqrt(s) + eps); w <- c * w - m * g`` with
    ``g' = g + wd * w, c = 1 - m * wd`` (L2), ``g' = g, c = 1 - lr * wd``
    (DECOUPLE) or ``g' = g, c = 1`` (NONE); then, with ``max_norm > 0``, the row
    is scaled to norm ``max_norm`` when its norm exceeds it.
    """
    mode = weight_decay_mode

    def step(w, s, g, t, lr, dim):
        g_decayed = g + weight_decay * w if mode is WeightDecayMode.L2 else g
        acc = s["momentum1"] + _row_sum(g_decayed * g_decayed) / dim
        multiplier = _safe_div(lr, jnp.sqrt(acc) + eps)
        if mode is WeightDecayMode.L2:
            correction = 1.0 - multiplier * weight_decay
        elif mode is WeightDecayMode.DECOUPLE:
            correction = 1.0 - lr * weight_decay
        else:
            correction = jnp.ones_like(multiplier)
        new_w = _lanes(correction) * w - _lanes(multiplier) * g
        if max_norm > 0:
            norm = _row_norm(new_w)
            scale = jnp.where(norm > max_norm, _safe_div(jnp.float32(max_norm), norm), 1.0)
            new_w = new_w * _lanes(scale)
        return new_w, {"momentum1": acc}

    return RowRule((("momentum1", "rowwise"),), step)


def adam_direction(
    *, beta1: float, beta2: float, eps: float, weight_decay: float, second_moment: Layout
) -> Direction:
    """Adam's bias-corrected direction with decoupled decay, ``momentum1 [D]``.

    ``m1 <- b1 m1 + (1 - b1) g;  m2 <- b2 m2 + (1 - b2) v;
    r = m1 / (1 - b1**t) / (sqrt(m2 / (1 - b2**t)) + eps) + wd * w`` with
    ``v = g**2`` and ``momentum2 [D]`` (``second_moment="elementwise"``), or
    ``v = mean(g**2)`` and ``momentum2 [R]`` (``"rowwise"``, FBGEMM's partial
    row-wise forms).
    """
    rowwise = second_moment == "rowwise"

    def compute(w, s, g, t, dim):
        m1 = beta1 * s["momentum1"] + (1.0 - beta1) * g
        if rowwise:
            m2 = beta2 * s["momentum2"] + (1.0 - beta2) * (_row_sum(g * g) / dim)
            denom = _lanes(jnp.sqrt(m2 / _bias_correction(beta2, t)) + eps)
        else:
            m2 = beta2 * s["momentum2"] + (1.0 - beta2) * (g * g)
            denom = jnp.sqrt(m2 / _bias_correction(beta2, t)) + eps
        r = _safe_div(m1 / _bias_correction(beta1, t), denom) + weight_decay * w
        return r, {"momentum1": m1, "momentum2": m2}

    return Direction((("momentum1", "elementwise"), ("momentum2", second_moment)), compute)


def descend(direction: Direction) -> RowRule:
    """``w <- w - lr * r`` (ADAM, PARTIAL_ROWWISE_ADAM)."""

    def step(w, s, g, t, lr, dim):
        r, state = direction.compute(w, s, g, t, dim)
        return w - lr * r, state

    return RowRule(direction.state, step)


def descend_by_trust_ratio(direction: Direction) -> RowRule:
    """``w <- w - lr * (|w| / |r|) * r`` with the row norms before the step (LAMB).

    A row of zero weights (or a zero ``r``) does not move.
    """

    def step(w, s, g, t, lr, dim):
        r, state = direction.compute(w, s, g, t, dim)
        ratio = _safe_div(_row_norm(w), _row_norm(r))
        return w - _lanes(lr * ratio) * r, state

    return RowRule(direction.state, step)


def lars(*, eta: float, momentum: float, weight_decay: float) -> RowRule:
    """LARS_SGD, ``momentum1 [D]``.

    ``a = lr * eta * |w| / (|g| + wd * |w|);  m1 <- momentum * m1 + a * (g + wd * w);
    w <- w - m1`` (a row with ``|g| + wd |w| = 0`` gets ``a = 0``).
    """

    def step(w, s, g, t, lr, dim):
        w_norm = _row_norm(w)
        rate = _safe_div(lr * eta * w_norm, _row_norm(g) + weight_decay * w_norm)
        m1 = momentum * s["momentum1"] + _lanes(rate) * (g + weight_decay * w)
        return w - m1, {"momentum1": m1}

    return RowRule((("momentum1", "elementwise"),), step)
