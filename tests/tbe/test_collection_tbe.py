"""jaxrec.tbe.collection_tbe: a collection's tables on FBGEMM's operator, placed per table by
their compute_kernel; a cached table trains bit for bit as in an EmbeddingBagCollection."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType, tbe
from jaxrec import EmbeddingComputeKernel as Kernel

B, STEPS = 4, 4
TABLES = [
    EmbeddingBagConfig(name="big", embedding_dim=4, num_embeddings=64, feature_names=["f", "h"]),
    EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=16, feature_names=["g"]),
]
KEYS = ["f", "h", "g"]


def _kjts():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(0, 3, len(KEYS) * B)
        rows = np.repeat([64, 64, 16], B)
        values = np.concatenate([rng.integers(0, r, n) for r, n in zip(rows, lengths, strict=True)])
        out.append(KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths))
    return out


def _train_collection(kjts, targets):
    ebc = EmbeddingBagCollection(
        tables=TABLES, optimizer=jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.1)
    )
    params = ebc.init(jax.random.key(0), kjts[0])["params"]
    initial = {k: np.asarray(v) for k, v in ebc.state_dict({"params": params}).items()}
    outputs = []
    for kjt, g in zip(kjts, targets, strict=True):
        outputs.append(np.asarray(ebc.apply({"params": params}, kjt).values()))
        loss = lambda p, kjt=kjt, g=g: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)  # noqa: E731
        params = jaxrec.optim.apply_updates(params, jax.grad(loss)(params))
    final = {k: np.asarray(v) for k, v in ebc.state_dict({"params": params}).items()}
    return initial, final, outputs


def test_a_cached_table_trains_bit_for_bit_as_in_the_collection():
    kjts = _kjts()
    keys = jax.random.split(jax.random.key(1), STEPS)
    targets = [jax.random.normal(k, (B, 4 + 4 + 8)) for k in keys]
    initial, final, outputs = _train_collection(kjts, targets)

    placed = [dataclasses.replace(TABLES[0], compute_kernel=Kernel.FUSED_UVM_CACHING), TABLES[1]]
    op, order = tbe.collection_tbe(
        placed,
        optimizer=tbe.OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        cache_load_factor=0.5,
    )
    assert order == ("f", "h", "g")
    cached = tbe.CachedTBE(op, ways=8)  # 32 slots for 64 rows: rows are evicted and reloaded
    state, caches = cached.init()
    weights = [initial[f"embedding_bags.{t.name}.weight"] for t in TABLES]
    state = cached.set_split_embedding_weights(state, caches, weights)

    @jax.jit
    def step(state, indices, offsets, g):
        grads = jax.grad(lambda s: jnp.sum(cached(s, indices, offsets) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    for kjt, g, expected in zip(kjts, targets, outputs, strict=True):
        indices, offsets = tbe.tbe_inputs(kjt, order)
        ready = cached.prefetch(state, caches, indices, offsets)
        caches = ready.caches
        np.testing.assert_array_equal(cached(ready.state, ready.indices, offsets), expected)
        state = step(ready.state, ready.indices, offsets, g)
    evictions = int(cached.cache_metrics(caches)["total"][2])
    assert evictions > 0
    for table, weight in zip(TABLES, cached.split_embedding_weights(state, caches), strict=True):
        np.testing.assert_array_equal(weight, final[f"embedding_bags.{table.name}.weight"])


def test_collections_refuse_host_tables_and_name_the_tbe_path():
    placed = dataclasses.replace(TABLES[0], compute_kernel=Kernel.FUSED_UVM)
    with pytest.raises(ValueError, match="'big' has compute_kernel FUSED_UVM.*collection_tbe"):
        EmbeddingBagCollection(tables=[placed]).init(jax.random.key(0), _kjts()[0])


def test_compute_kernels_map_to_placements():
    placed = [
        dataclasses.replace(TABLES[0], compute_kernel=Kernel.FUSED_UVM),
        dataclasses.replace(TABLES[1], compute_kernel=Kernel.FUSED_UVM_CACHING),
    ]
    op, _ = tbe.collection_tbe(placed, optimizer=tbe.OptimType.EXACT_SGD)
    assert [spec[2] for spec in op.embedding_specs] == [
        tbe.EmbeddingLocation.MANAGED,
        tbe.EmbeddingLocation.MANAGED_CACHING,
    ]
    assert tuple(op.feature_table_map) == (0, 0, 1)


def test_bad_configs_are_refused():
    mean = dataclasses.replace(TABLES[1], pooling=PoolingType.MEAN)
    with pytest.raises(ValueError, match="one pooling and one precision"):
        tbe.collection_tbe([TABLES[0], mean])
    with pytest.raises(ValueError, match="feature_table_map from the table configs"):
        tbe.collection_tbe(TABLES, feature_table_map=[0])
    with pytest.raises(ValueError, match="compute_kernel must be"):
        dataclasses.replace(TABLES[0], compute_kernel="fused_uvm")
    with pytest.raises(ValueError, match="no feature \\['x'\\]"):
        tbe.tbe_inputs(_kjts()[0], ["x"])


def test_readme_section_runs_as_written():
    from test_readme import python_block_after

    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(python_block_after("## Where tables live"), namespace)  # noqa: S102
    assert "hits, misses, evictions, unique rows: [" in printed.getvalue()
    big, small = namespace["weights"]
    assert big.shape == (1000, 8) and small.shape == (10, 4)
