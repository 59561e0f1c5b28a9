"""Checks of a TBE call's ``indices``, ``offsets`` and ``per_sample_weights``.

FBGEMM's layout: ``indices [N]`` holds the ids of every bag, feature-major; ``offsets``
has ``B * T + 1`` entries and bag ``b`` of feature ``t`` is
``indices[offsets[t * B + b] : offsets[t * B + b + 1]]``. Shapes and dtypes are checked
always (they are static); values only when they are concrete (outside ``jit``), where a
bad one raises a ValueError naming the feature, its table and the value. Inside ``jit``
the TBE's ``bounds_check_mode`` decides.

>>> import numpy as np
>>> TBEInputs.check(np.array([0, 1, 5]), np.array([0, 2, 3]), None, None,
...                 num_features=2, feature_rows=(3, 4), feature_tables=(0, 1))
Traceback (most recent call last):
...
ValueError: feature 1 (table 1, 4 rows): index 5 at position 2 is outside [0, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _one_d(name: str, value: Any, kind: str) -> Any:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        value = np.asarray(value)
    if len(value.shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    ok = jnp.issubdtype(value.dtype, jnp.integer if kind == "int" else jnp.floating)
    if not ok:
        want = "an integer" if kind == "int" else "a floating-point"
        raise ValueError(f"{name} must have {want} dtype, got {value.dtype}")
    return value


@dataclass(frozen=True)
class TBEInputs:
    """Checked inputs: int32 ``indices``/``offsets``, weights as given, the batch size."""

    indices: jax.Array
    offsets: jax.Array
    per_sample_weights: jax.Array | None
    feature_requires_grad: jax.Array | None
    batch_size: int

    @classmethod
    def check(
        cls,
        indices: Any,
        offsets: Any,
        per_sample_weights: Any,
        feature_requires_grad: Any,
        *,
        num_features: int,
        feature_rows: tuple[int, ...],
        feature_tables: tuple[int, ...],
    ) -> TBEInputs:
        """Check the call's inputs against ``num_features`` features reading tables of
        ``feature_rows`` rows (``feature_tables``: each feature's table index)."""
        indices = _one_d("indices", indices, "int")
        offsets = _one_d("offsets", offsets, "int")
        size = offsets.shape[0]
        if size < num_features + 1 or (size - 1) % num_features:
            raise ValueError(
                f"offsets has {size} entries; with {num_features} features it needs "
                f"B * {num_features} + 1 (B >= 1 the batch size)"
            )
        batch = (size - 1) // num_features
        if per_sample_weights is not None:
            per_sample_weights = _one_d("per_sample_weights", per_sample_weights, "float")
            if per_sample_weights.shape != indices.shape:
                raise ValueError(
                    f"per_sample_weights has {per_sample_weights.shape[0]} entries but indices "
                    f"has {indices.shape[0]}; one weight per index"
                )
        if feature_requires_grad is not None:
            feature_requires_grad = _one_d("feature_requires_grad", feature_requires_grad, "int")
            if feature_requires_grad.shape != (num_features,):
                raise ValueError(
                    f"feature_requires_grad has {feature_requires_grad.shape[0]} entries; "
                    f"expected one per feature ({num_features})"
                )
        if _is_concrete(offsets):
            _check_offsets(np.asarray(offsets), indices.shape[0], batch)
            if _is_concrete(indices):
                _check_ids(
                    np.asarray(indices), np.asarray(offsets), batch, feature_rows, feature_tables
                )
        return cls(
            indices=jnp.asarray(indices, jnp.int32),
            offsets=jnp.asarray(offsets, jnp.int32),
            per_sample_weights=None
            if per_sample_weights is None
            else jnp.asarray(per_sample_weights),
            feature_requires_grad=None
            if feature_requires_grad is None
            else jnp.asarray(feature_requires_grad),
            batch_size=batch,
        )


def _check_offsets(offsets: np.ndarray, num_indices: int, batch: int) -> None:
    if offsets[0] != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    drops = np.flatnonzero(np.diff(offsets) < 0)
    if drops.size:
        i = int(drops[0])
        t, b = divmod(i, batch)
        raise ValueError(
            f"offsets must not decrease: offsets[{i + 1}] = {int(offsets[i + 1])} < "
            f"offsets[{i}] = {int(offsets[i])} (bag {b} of feature {t} has a negative length)"
        )
    if offsets[-1] > num_indices:
        raise ValueError(
            f"offsets[-1] = {int(offsets[-1])} exceeds the {num_indices} entries of indices"
        )


def _check_ids(
    indices: np.ndarray,
    offsets: np.ndarray,
    batch: int,
    feature_rows: tuple[int, ...],
    feature_tables: tuple[int, ...],
) -> None:
    for t, (rows, table) in enumerate(zip(feature_rows, feature_tables, strict=True)):
        start, end = int(offsets[t * batch]), int(offsets[(t + 1) * batch])
        segment = indices[start:end]
        bad = np.flatnonzero((segment < 0) | (segment >= rows))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"feature {t} (table {table}, {rows} rows): index {int(segment[i])} at "
                f"position {start + i} is outside [0, {rows})"
                + (f" ({bad.size} bad indices in this feature)" if bad.size > 1 else "")
            )
