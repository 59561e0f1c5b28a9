"""One collection built twice, as jaxrec's module and as TorchRec's, for the parity tests.

A table is given once as ``(name, embedding_dim, num_embeddings, feature_names)``; both
collections get the same tables, jaxrec's weights are loaded into TorchRec's by the
state-dict names they share, and both run on the same batch. Importing this module skips
the importing test module where torch or TorchRec does not import.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest

from jaxrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

torch = pytest.importorskip("torch")
torchrec = pytest.importorskip("torchrec")

TableSpec = tuple[str, int, int, list[str]]
"""``(name, embedding_dim, num_embeddings, feature_names)`` of one table."""


def _config(cls, spec: TableSpec, options: dict[str, Any]):
    name, dim, rows, features = spec
    return cls(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, **options)


def _torchrec_enum(value):
    """TorchRec's member of the same name (``PoolingType.MEAN``, ``DataType.FP16``, ...)."""
    return getattr(getattr(torchrec, type(value).__name__), value.name)


def ebc_twins(specs: Sequence[TableSpec], *, is_weighted: bool = False, **table_options):
    """``(jaxrec EBC, TorchRec EBC)`` over ``specs``; ``table_options`` (``pooling``,
    ``data_type``: jaxrec's enums) go to every table of both."""
    torch_options = {k: _torchrec_enum(v) for k, v in table_options.items()}
    ours = EmbeddingBagCollection(
        tables=[_config(EmbeddingBagConfig, s, table_options) for s in specs],
        is_weighted=is_weighted,
    )
    theirs = torchrec.EmbeddingBagCollection(
        tables=[_config(torchrec.EmbeddingBagConfig, s, torch_options) for s in specs],
        is_weighted=is_weighted,
    )
    return ours, theirs


def ec_twins(specs: Sequence[TableSpec]):
    """``(jaxrec EC, TorchRec EC)`` over ``specs``."""
    ours = EmbeddingCollection(tables=[_config(EmbeddingConfig, s, {}) for s in specs])
    theirs = torchrec.EmbeddingCollection(
        tables=[_config(torchrec.EmbeddingConfig, s, {}) for s in specs]
    )
    return ours, theirs


def random_jagged(rng, keys: Sequence[str], rows: dict[str, int], batch: int, max_len: int):
    """``(values, lengths)``: ``batch`` bags of 0..max_len ids per key, ids inside ``rows[key]``."""
    lengths = rng.integers(0, max_len + 1, len(keys) * batch)
    values = np.concatenate(
        [
            rng.integers(0, rows[k], lengths[i * batch : (i + 1) * batch].sum())
            for i, k in enumerate(keys)
        ]
    )
    return values, lengths


def _as_long(array):
    return None if array is None else torch.as_tensor(array, dtype=torch.int64)


class Twins(NamedTuple):
    """Both outputs on one batch, with jaxrec's variables and KJT for further calls."""

    got: Any
    expected: Any
    variables: Any
    kjt: KeyedJaggedTensor


def run_twins(
    ours,
    theirs,
    keys: list[str],
    values,
    *,
    lengths=None,
    offsets=None,
    weights=None,
    prepare: Callable[[Any], Any] | None = None,
) -> Twins:
    """Init ``ours`` on the batch (``prepare`` may change its variables), load its weights
    into ``theirs`` and run both on the same KJT."""
    kjt = KeyedJaggedTensor(
        keys=keys, values=values, lengths=lengths, offsets=offsets, weights=weights
    )
    variables = ours.init(jax.random.key(0), kjt)
    if prepare is not None:
        variables = prepare(variables)
    theirs.load_state_dict(
        {k: torch.as_tensor(np.asarray(v)) for k, v in ours.state_dict(variables).items()}
    )
    torch_kjt = torchrec.KeyedJaggedTensor(
        keys=keys,
        values=_as_long(values),
        lengths=_as_long(lengths),
        offsets=_as_long(offsets),
        weights=None if weights is None else torch.as_tensor(weights),
    )
    return Twins(ours.apply(variables, kjt), theirs(torch_kjt), variables, kjt)
