"""The layout every kernel of a stacked table group shares: features, bags, bounds modes.

A group is one stacked buffer ``weights [R, D]`` read through a KJT: ``ids [N_cap] int32``
(feature-major values, only ``ids[offsets[0]:offsets[-1]]`` real) and
``offsets [F*B+1] int32`` (bag ``b`` of KJT feature ``f`` is
``ids[offsets[f*B+b] : offsets[f*B+b+1]]``). Each feature of the group is one static
:class:`FeatureLayout`: its KJT feature, its table's rows ``[row_offset, row_offset +
num_rows)`` of ``weights`` and, pooled, its output columns ``[col_offset, col_offset + D)``.

>>> feat = FeatureLayout(kjt_index=1, row_offset=3, num_rows=3, col_offset=2)
>>> feat == (1, 3, 3, 2), feat.col_offset                  # still a (hashable) tuple
(True, 2)
>>> checks_ids("none"), counts_bad_ids("ignore"), counts_bad_ids("warning")
(False, False, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._pallas_compat import float_dtype

__all__ = [
    "BOUNDS_CHECK_MODES",
    "BoundsCheck",
    "FeatureLayout",
    "Pooling",
    "check_columns",
    "checks_ids",
    "counts_bad_ids",
    "covered_columns",
    "covers_all_columns",
    "feature_layouts",
    "feature_rounds",
    "lookup_rows",
    "position_bags",
    "validate_group",
]

BoundsCheck = Literal["fatal", "warning", "ignore", "none"]
"""What a kernel does with an id outside its table (FBGEMM's ``bounds_check_mode``):
"fatal", "warning" and "ignore" read a zero row for it ("fatal" and "warning" also count
it); "none" does not check it and reads the clamped stacked row ``clip(row_offset + id, 0,
R - 1)`` (never memory outside ``weights``)."""

BOUNDS_CHECK_MODES: tuple[BoundsCheck, ...] = ("fatal", "warning", "ignore", "none")

Pooling = Literal["sum", "mean", "none"]
"""How a group's rows combine: summed or averaged per bag, or one row per id ("none")."""


class FeatureLayout(NamedTuple):
    """Where one feature of a group reads and writes (static; hashable as the plain tuple).

    Attributes:
      kjt_index: the feature's index among the KJT's keys.
      row_offset: the first stacked row of its table in ``weights``.
      num_rows: its table's rows; a valid id is ``0 <= id < num_rows``.
      col_offset: the first column of its pooled bags in the output (0 for sequences).
    """

    kjt_index: int
    row_offset: int
    num_rows: int
    col_offset: int


def checks_ids(bounds_check: BoundsCheck) -> bool:
    """Whether ids are checked against their tables (every mode but "none")."""
    return bounds_check != "none"


def counts_bad_ids(bounds_check: BoundsCheck) -> bool:
    """Whether ids outside their tables are counted ("fatal" and "warning")."""
    return bounds_check in ("fatal", "warning")


def feature_layouts(features: Sequence[tuple[int, int, int, int]]) -> tuple[FeatureLayout, ...]:
    """``features`` as :class:`FeatureLayout` values, each checked to be four ints.

    >>> feature_layouts(((0, 0, 4, 0),))
    (FeatureLayout(kjt_index=0, row_offset=0, num_rows=4, col_offset=0),)
    """
    if not isinstance(features, tuple) or not features:
        raise ValueError(f"features must be a non-empty tuple, got {features!r}")
    for feat in features:
        if not (
            isinstance(feat, tuple) and len(feat) == 4 and all(isinstance(v, int) for v in feat)
        ):
            raise ValueError(
                f"each feature must be (kjt_feature_index, row_offset, num_rows, col_offset) "
                f"ints, got {feat!r}"
            )
    return tuple(FeatureLayout(*feat) for feat in features)


def validate_group(weights, ids, offsets, per_sample_weights, features, batch_size, bounds_check):
    """Check the static layout of one group lookup; returns the number of KJT features.

    Raises ValueError naming the offending argument and value.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be 2-D [rows, dim], got shape {weights.shape}")
    float_dtype(weights.dtype)
    if ids.ndim != 1 or jnp.dtype(ids.dtype) != jnp.int32:
        raise ValueError(f"ids must be 1-D int32, got shape {ids.shape} dtype {ids.dtype}")
    if offsets.ndim != 1 or jnp.dtype(offsets.dtype) != jnp.int32:
        raise ValueError(
            f"offsets must be 1-D int32, got shape {offsets.shape} dtype {offsets.dtype}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if (offsets.shape[0] - 1) % batch_size or offsets.shape[0] < 1:
        raise ValueError(
            f"offsets must have F*batch_size+1 entries; got {offsets.shape[0]} "
            f"with batch_size={batch_size}"
        )
    if per_sample_weights is not None and (
        per_sample_weights.shape != ids.shape
        or not jnp.issubdtype(per_sample_weights.dtype, jnp.floating)
    ):
        raise ValueError(
            f"per_sample_weights must be floating with shape {ids.shape}, got shape "
            f"{per_sample_weights.shape} dtype {per_sample_weights.dtype}"
        )
    if bounds_check not in BOUNDS_CHECK_MODES:
        raise ValueError(f"bounds_check must be one of {BOUNDS_CHECK_MODES}, got {bounds_check!r}")
    num_kjt = (offsets.shape[0] - 1) // batch_size
    rows = weights.shape[0]
    for feat in feature_layouts(features):
        if not 0 <= feat.kjt_index < num_kjt:
            raise ValueError(
                f"feature {tuple(feat)}: kjt_feature_index {feat.kjt_index} not in [0, {num_kjt})"
            )
        end = feat.row_offset + feat.num_rows
        if feat.row_offset < 0 or feat.num_rows < 1 or end > rows:
            raise ValueError(
                f"feature {tuple(feat)}: rows [{feat.row_offset}, {end}) not inside the "
                f"{rows} rows of weights"
            )
        if feat.col_offset < 0:
            raise ValueError(f"feature {tuple(feat)}: col_offset {feat.col_offset} is negative")
    return num_kjt


def check_columns(features, dim: int, num_columns: int, what: str) -> None:
    """Refuse a feature whose columns ``[col_offset, col_offset + dim)`` pass ``num_columns``
    (the width of ``what``, named in the error)."""
    for feat in feature_layouts(features):
        if feat.col_offset + dim > num_columns:
            raise ValueError(
                f"feature {tuple(feat)}: columns [{feat.col_offset}, {feat.col_offset + dim}) "
                f"exceed {what}"
            )


def covered_columns(features, dim: int, num_columns: int) -> np.ndarray:
    """``[num_columns]`` bool: which output columns the features' ranges cover."""
    covered = np.zeros(num_columns, bool)
    for feat in feature_layouts(features):
        covered[feat.col_offset : feat.col_offset + dim] = True
    return covered


def covers_all_columns(features, dim: int, num_columns: int) -> bool:
    """Whether the features' column ranges together cover every output column."""
    return bool(covered_columns(features, dim, num_columns).all())


def position_bags(offsets: jax.Array, num_ids: int) -> tuple[jax.Array, jax.Array]:
    """For every id position: its global bag index ``f*B+b`` and whether it is real.

    A position is real when ``offsets[0] <= i < offsets[-1]``; padding is not.

    >>> bags, live = position_bags(jnp.array([0, 2, 2, 3], jnp.int32), 5)
    >>> bags.tolist(), live.tolist()
    ([0, 0, 2, 2, 2], [True, True, True, False, False])
    """
    marks = jnp.zeros((num_ids,), jnp.int32).at[offsets[1:-1]].add(1, mode="drop")
    bags = jnp.minimum(jnp.cumsum(marks), offsets.shape[0] - 2)
    pos = jnp.arange(num_ids, dtype=jnp.int32)
    live = (pos >= offsets[0]) & (pos < offsets[-1])
    return bags, live


def feature_rounds(features: Sequence[tuple[int, int, int, int]]) -> list[list[int]]:
    """Split group-feature indices into rounds in which no KJT feature repeats.

    >>> feature_rounds(((0, 0, 5, 0), (1, 0, 5, 4), (0, 5, 5, 8)))
    [[0, 1], [2]]
    """
    layouts = feature_layouts(tuple(features))
    rounds: list[list[int]] = []
    for g, feat in enumerate(layouts):
        for r in rounds:
            if all(layouts[h].kjt_index != feat.kjt_index for h in r):
                r.append(g)
                break
        else:
            rounds.append([g])
    return rounds


def lookup_rows(ids, bags, live, features, group_idx, batch_size, num_kjt, checked):
    """Per position: the stacked row it reads, whether it reads one, and whether it is bad.

    Only positions of the features ``group_idx`` (distinct KJT features) take part.
    Returns ``(rows, valid, bad, slot, batch_index)`` where ``slot`` is the position's index
    into ``group_idx`` (or ``len(group_idx)`` outside the group).
    """
    layouts = feature_layouts(tuple(features))
    table = np.full((num_kjt, 3), -1, np.int32)  # kjt feature -> (slot, row_offset, num_rows)
    for slot, g in enumerate(group_idx):
        feat = layouts[g]
        table[feat.kjt_index] = (slot, feat.row_offset, feat.num_rows)
    table = jnp.asarray(table)
    kjt = bags // batch_size
    entry = table[kjt]
    in_group = live & (entry[:, 0] >= 0)
    ok = (ids >= 0) & (ids < entry[:, 2]) if checked else jnp.ones_like(in_group)
    valid = in_group & ok
    bad = in_group & ~ok
    rows = jnp.where(valid, entry[:, 1] + ids, 0)
    slot = jnp.where(in_group, entry[:, 0], len(group_idx))
    return rows, valid, bad, slot, bags % batch_size
