"""Eager checks of a KeyedJaggedTensor against a collection's layout.

Outside ``jit`` a collection checks its input before any kernel runs and
raises a ValueError that names the feature, the table and the bad value.
Inside ``jit`` the content is not known; ``bounds_check_mode`` decides then.

>>> import jax.numpy as jnp
>>> from jaxrec.configs import EmbeddingBagConfig
>>> from jaxrec.ops.plan import build_plan
>>> from jaxrec.sparse import KeyedJaggedTensor
>>> plan = build_plan([EmbeddingBagConfig(name="t1", embedding_dim=2, num_embeddings=4,
...                                       feature_names=["f1"])])
>>> kjt = KeyedJaggedTensor(keys=["f1"], values=jnp.array([1, 7]), lengths=jnp.array([2]))
>>> check_features(plan, kjt, weighted=False)
Traceback (most recent call last):
...
ValueError: feature 'f1' (table 't1', 4 rows): id 7 at position 1 is outside [0, 4)
"""

from __future__ import annotations

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.ops.backend import BoundsCheckMode
from jaxrec.ops.plan import LookupPlan
from jaxrec.optim.fused import nonfinite_rows
from jaxrec.sparse import KeyedJaggedTensor, validate_kjt
from jaxrec.sparse.arrays import is_traced


def check_keys(plan: LookupPlan, kjt: KeyedJaggedTensor) -> None:
    """The KJT must hold every feature of the collection, once; other keys are ignored."""
    keys = list(kjt.keys())
    expected = tuple(dict.fromkeys(plan.feature_names))
    missing = [f for f in expected if f not in keys]
    if missing:
        raise ValueError(f"missing feature keys {missing}: the input has keys {keys}")
    repeated = [f for f in expected if keys.count(f) > 1]
    if repeated:
        raise ValueError(
            f"feature key {repeated[0]!r} appears {keys.count(repeated[0])} times in the input "
            f"keys {keys}; a collection reads each feature from one key"
        )


def check_weighting(kjt: KeyedJaggedTensor, weighted: bool) -> None:
    """Per-sample weights are required by a weighted collection and refused otherwise."""
    weights = kjt.weights_or_none()
    if weighted and weights is None:
        raise ValueError(
            "this collection is weighted (is_weighted=True) but the input has no weights"
        )
    if not weighted and weights is not None:
        raise ValueError(
            "the input has per-sample weights but this collection is not weighted; "
            "construct it with is_weighted=True to use them"
        )
    if weights is not None and not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"per-sample weights must be floating point, got dtype {weights.dtype}")


def check_ids(plan: LookupPlan, kjt: KeyedJaggedTensor) -> None:
    """Every id must lie in its feature's table (needs concrete values)."""
    values = np.asarray(kjt.values())
    bounds = kjt.offset_per_key()
    keys = kjt.keys()
    for feature in plan.features:
        key = feature.name
        k = keys.index(key)
        segment = values[bounds[k] : bounds[k + 1]]
        bad = np.flatnonzero((segment < 0) | (segment >= feature.num_rows))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"feature {key!r} (table {feature.table!r}, {feature.num_rows} rows): "
                f"id {int(segment[i])} at position {bounds[k] + i} is outside "
                f"[0, {feature.num_rows})"
                + (f" ({bad.size} bad ids in this feature)" if bad.size > 1 else "")
            )


def check_features(plan: LookupPlan, kjt: KeyedJaggedTensor, *, weighted: bool) -> None:
    """All static checks, plus the content checks when the KJT is concrete."""
    if not isinstance(kjt, KeyedJaggedTensor):
        raise ValueError(f"expected a KeyedJaggedTensor, got {type(kjt).__name__}")
    check_keys(plan, kjt)
    check_weighting(kjt, weighted)
    if not jnp.issubdtype(kjt.values().dtype, jnp.integer):
        raise ValueError(f"KJT values must be integer ids, got dtype {kjt.values().dtype}")
    if not is_traced(kjt.values(), kjt.lengths(), kjt.weights_or_none()):
        validate_kjt(kjt)
        check_ids(plan, kjt)


def report_nonfinite_rows(module: nn.Module, mode: BoundsCheckMode, groups: Any) -> None:
    """Under WARNING, sow the rows the fused update's non-finite guard has skipped so far.

    The total over the fused groups of ``groups`` (``jaxrec.optim.nonfinite_rows``: every
    step applied to these params by ``jaxrec.optim.apply_updates``), as
    ``"nonfinite_gradient_rows"`` in the ``"bounds_check"`` collection, beside
    ``"invalid_ids"``. Sown only when some group is fused.
    """
    if mode is not BoundsCheckMode.WARNING or module.is_initializing():
        return
    counts = list(nonfinite_rows(groups).values())
    if counts:
        module.sow("bounds_check", "nonfinite_gradient_rows", jax.lax.stop_gradient(sum(counts)))


def report_invalid_ids(module: nn.Module, mode: BoundsCheckMode, count: jax.Array) -> None:
    """Under WARNING, sow the count of ids outside their tables into ``"bounds_check"``.

    Read it with ``module.apply(variables, kjt, mutable=["bounds_check"])``.
    """
    if mode is not BoundsCheckMode.WARNING or module.is_initializing():
        return
    module.sow("bounds_check", "invalid_ids", count)
    if not is_traced(count) and int(count):
        warnings.warn(f"{int(count)} ids were outside their tables", stacklevel=3)
