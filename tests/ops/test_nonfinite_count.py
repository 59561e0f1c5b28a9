"""Rows the fused update's non-finite guard skips are counted where users read bad counts.

One bag of the batch gets a NaN output cotangent, so every row it reads has a NaN summed
gradient and the guard leaves it unchanged. Under WARNING the skipped rows are counted in
the fused entry: ``jaxrec.optim.nonfinite_rows(params)`` after ``apply_updates``, and the
collections' ``"bounds_check"`` collection (``"nonfinite_gradient_rows"``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from jaxrec.optim import FusedTableParams, nonfinite_rows
from jaxrec.parallel import row_partition_specs, shard_rows
from jaxrec.tbe import (
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    SparseType,
    SplitTableBatchedEmbeddingBagsCodegen,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*non-finite gradient:RuntimeWarning")

ROWS, BATCH = 14, 4  # stacked groups of 28 and 14 rows split over 2 devices
# Two groups (dims 4 and 8), so the count is summed over groups.
TABLES = (("ta", 4, "fa"), ("tb", 4, "fb"), ("tc", 8, "fc"))
# Bag b of feature f holds IDS[f][b]; bag (fa, 1) and (fc, 2) get a NaN cotangent.
IDS = {
    "fa": [[0, 1], [2, 3, 3], [], [5]],
    "fb": [[1], [7, 8], [2], []],
    "fc": [[4], [6, 4], [9, 10, 10], [0]],
}
NAN_BAGS = (("fa", 1), ("fc", 2))


def _kjt() -> KeyedJaggedTensor:
    keys = list(IDS)
    lengths = [len(bag) for f in keys for bag in IDS[f]]
    values = [i for f in keys for bag in IDS[f] for i in bag]
    return KeyedJaggedTensor(keys=keys, values=np.array(values), lengths=np.array(lengths))


def _skipped_rows() -> int:
    """Rows with a NaN summed gradient: every (table, id) read by a NaN bag."""
    table_of = {f: t for t, _, f in TABLES}
    return len({(table_of[f], i) for f, b in NAN_BAGS for i in IDS[f][b]})


def _cotangent(dims: list[int]) -> jax.Array:
    """[B, sum of dims] ones, NaN in the columns of each NaN bag's feature."""
    g = np.ones((BATCH, sum(dims)), np.float32)
    starts = np.cumsum([0, *dims])
    for f, b in NAN_BAGS:
        k = list(IDS).index(f)
        g[b, starts[k] : starts[k + 1]] = np.nan
    return jnp.asarray(g)


def _ebc(backend: str, mode: str) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=t, embedding_dim=d, num_embeddings=ROWS, feature_names=[f])
        for t, d, f in TABLES
    ]
    return EmbeddingBagCollection(
        tables=tables,
        optimizer=jaxrec.optim.adam(learning_rate=0.1),
        backend=backend,
        bounds_check_mode=mode,
    )


def _train(ebc: EmbeddingBagCollection, steps: int):
    """``steps`` jitted fused steps on the NaN batch; (params before, after, bounds_check)."""
    kjt = _kjt()
    params = jax.jit(ebc.init)(jax.random.key(0), kjt)["params"]
    g = _cotangent([d for _, d, _ in TABLES])
    tx = jaxrec.optim.fused(optax.sgd(0.1))

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jaxrec.optim.apply_updates(params, updates), opt_state

    new, opt_state = params, tx.init(params)
    for _ in range(steps):
        new, opt_state = step(new, opt_state)
    _, sown = jax.jit(lambda p: ebc.apply({"params": p}, kjt, mutable=["bounds_check"]))(new)
    return params, new, sown


def _groups(params) -> list[FusedTableParams]:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, FusedTableParams))
    return [leaf for leaf in leaves if isinstance(leaf, FusedTableParams)]


def _skipped_rows_unchanged(ebc, before, after) -> None:
    """The rows read by NaN bags are bit-identical (weights and state); others moved."""
    old = ebc.state_dict({"params": before})
    new = ebc.state_dict({"params": after})
    old_state = ebc.optimizer_state_dict({"params": before})
    new_state = ebc.optimizer_state_dict({"params": after})
    table_of = {f: t for t, _, f in TABLES}
    for f, b in NAN_BAGS:
        name = f"embedding_bags.{table_of[f]}.weight"
        rows = IDS[f][b]
        np.testing.assert_array_equal(np.asarray(new[name])[rows], np.asarray(old[name])[rows])
        for key in ("momentum1", "momentum2"):
            want, got = np.asarray(old_state[name][key]), np.asarray(new_state[name][key])
            np.testing.assert_array_equal(got[rows], want[rows])
    moved = "embedding_bags.tb.weight"
    assert not np.array_equal(np.asarray(new[moved])[7], np.asarray(old[moved])[7])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_warning_counts_each_skipped_row_once_per_step(backend):
    ebc = _ebc(backend, "warning")
    before, after, sown = _train(ebc, steps=2)
    expected = _skipped_rows()
    assert expected == 4  # ta rows 2, 3 and tc rows 9, 10
    counts = nonfinite_rows(after)
    assert len(counts) == 2 and sum(int(c) for c in counts.values()) == 2 * expected
    assert int(sown["bounds_check"]["nonfinite_gradient_rows"][0]) == 2 * expected
    assert int(sown["bounds_check"]["invalid_ids"][0]) == 0
    _skipped_rows_unchanged(ebc, before, after)


def test_gradient_entry_holds_this_steps_rows_and_a_clean_step_adds_none():
    ebc = _ebc("xla", "warning")
    kjt = _kjt()
    params = jax.jit(ebc.init)(jax.random.key(0), kjt)["params"]
    dims = [d for _, d, _ in TABLES]

    @jax.jit
    def grads(params, g):
        return jax.grad(lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g))(params)

    nan = grads(params, _cotangent(dims))
    assert sum(int(c) for c in nonfinite_rows(nan).values()) == _skipped_rows()
    once = jaxrec.optim.apply_updates(params, nan)
    clean = grads(once, jnp.ones((BATCH, sum(dims))))
    assert all(int(c) == 0 for c in nonfinite_rows(clean).values())
    twice = jaxrec.optim.apply_updates(once, clean)
    assert sum(int(g.nonfinite_rows) for g in _groups(twice)) == _skipped_rows()


def test_ignore_skips_the_rows_without_counting_them():
    ebc = _ebc("xla", "ignore")
    before, after, sown = _train(ebc, steps=1)
    assert all(int(c) == 0 for c in nonfinite_rows(after).values())
    assert "bounds_check" not in sown or not sown["bounds_check"]
    _skipped_rows_unchanged(ebc, before, after)


def test_fatal_raises_on_a_skipped_row():
    ebc = _ebc("xla", "fatal")
    kjt = _kjt()
    # Eager: a jitted init's FATAL bounds check would need checkify.
    params = ebc.init(jax.random.key(0), kjt)["params"]
    g = _cotangent([d for _, d, _ in TABLES])
    loss = lambda p: jnp.sum(ebc.apply({"params": p}, kjt).values() * g)  # noqa: E731
    err, _ = jax.jit(checkify.checkify(jax.grad(loss)))(params)
    with pytest.raises(checkify.JaxRuntimeError, match="non-finite gradient"):
        err.throw()


def _tbe(backend: str, precision: SparseType):
    specs = [(ROWS, 4, EmbeddingLocation.DEVICE, ComputeDevice.CPU)] * 2
    specs.append((ROWS, 8, EmbeddingLocation.DEVICE, ComputeDevice.CPU))
    return SplitTableBatchedEmbeddingBagsCodegen(
        specs,
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        weights_precision=precision,
        backend=backend,
    )


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("xla", SparseType.FP32), ("pallas", SparseType.FP32), ("xla", SparseType.INT8)],
)
def test_tbe_counts_skipped_rows_in_its_state(backend, precision):
    tbe = _tbe(backend, precision)
    state = tbe.init_embedding_weights_uniform(tbe.init(), -1.0, 1.0, jax.random.key(1))
    kjt = _kjt()
    g = _cotangent([4, 4, 8])

    @jax.jit
    def step(state):
        loss = lambda s: jnp.sum(tbe(s, kjt.values(), kjt.offsets()) * g)  # noqa: E731
        return jaxrec.optim.apply_updates(state, jax.grad(loss)(state))

    new = step(state)
    assert sum(int(c) for c in nonfinite_rows(new).values()) == _skipped_rows()
    table_of = {"fa": 0, "fb": 1, "fc": 2}
    old_w, new_w = tbe.split_embedding_weights(state), tbe.split_embedding_weights(new)
    old_s, new_s = tbe.split_optimizer_states(state), tbe.split_optimizer_states(new)
    for f, b in NAN_BAGS:
        t, rows = table_of[f], IDS[f][b]
        np.testing.assert_array_equal(np.asarray(new_w[t])[rows], np.asarray(old_w[t])[rows])
        for key in old_s[t]:
            np.testing.assert_array_equal(
                np.asarray(new_s[t][key])[rows], np.asarray(old_s[t][key])[rows]
            )
    assert not np.array_equal(np.asarray(new_w[1])[7], np.asarray(old_w[1])[7])


def test_row_sharded_count_is_summed_over_the_devices_once():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 (forced host) devices")
    tables = _ebc("xla", "warning").tables
    sharded = EmbeddingBagCollection(
        tables=tables,
        optimizer=jaxrec.optim.adam(learning_rate=0.1),
        backend="xla",
        row_shard_axis="rows",
    )
    kjt = _kjt()
    params = jax.jit(sharded.init)(jax.random.key(0), kjt)["params"]
    g = _cotangent([d for _, d, _ in TABLES])
    mesh = Mesh(np.array(jax.devices()[:2]), ("rows",))
    specs = row_partition_specs(params, mesh, "rows")

    def grads(params):
        loss = lambda p: jnp.sum(sharded.apply({"params": p}, kjt).values() * g)  # noqa: E731
        return jax.grad(loss)(params)

    step = jax.shard_map(grads, mesh=mesh, in_specs=(specs,), out_specs=specs, check_vma=False)
    out = jax.jit(step)(shard_rows(params, mesh, "rows"))
    assert sum(int(c) for c in nonfinite_rows(out).values()) == _skipped_rows()


# Weighted collections: the weights' gradient is computed only when asked for; the count and
# FATAL do not depend on it.


def _weighted(backend: str, mode: str):
    """A weighted twin of ``_ebc``, its params, its KJT's weights and ``loss(params, w)``."""
    ebc = _ebc(backend, mode).clone(is_weighted=True)
    kjt = _kjt()
    weights = jnp.linspace(0.5, 1.5, kjt.values().shape[0], dtype=jnp.float32)

    def weighted_kjt(w):
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w
        )

    params = ebc.init(jax.random.key(0), weighted_kjt(weights))["params"]  # eager: FATAL checks
    g = _cotangent([d for _, d, _ in TABLES])

    def loss(params, w):
        return jnp.sum(ebc.apply({"params": params}, weighted_kjt(w)).values() * g)

    return ebc, params, weights, loss


def _expected_weight_gradient(ebc, params, g) -> np.ndarray:
    """``<table row of id i, cotangent of i's bag>`` per position i (SUM pooling)."""
    tables = ebc.state_dict({"params": params})
    starts = np.cumsum([0, *[d for _, d, _ in TABLES]])
    out = []
    for k, (t, _, f) in enumerate(TABLES):
        rows = np.asarray(tables[f"embedding_bags.{t}.weight"])
        for b, bag in enumerate(IDS[f]):
            out += [rows[i] @ np.asarray(g)[b, starts[k] : starts[k + 1]] for i in bag]
    return np.asarray(out, np.float32)


@pytest.mark.parametrize(
    ("backend", "argnums"),
    [("xla", 0), ("xla", (0, 1)), ("pallas", (0, 1))],
    ids=["xla-params", "xla-params-and-weights", "pallas-params-and-weights"],
)
def test_weighted_fatal_raises_whether_or_not_the_weights_are_differentiated(backend, argnums):
    _, params, weights, loss = _weighted(backend, "fatal")
    err, _ = jax.jit(checkify.checkify(jax.grad(loss, argnums=argnums)))(params, weights)
    with pytest.raises(checkify.JaxRuntimeError, match="non-finite gradient"):
        err.throw()


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_weighted_warning_counts_and_gives_the_weights_gradient(backend):
    ebc, params, weights, loss = _weighted(backend, "warning")
    grads, weights_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, weights)
    assert sum(int(c) for c in nonfinite_rows(grads).values()) == _skipped_rows()
    expected = _expected_weight_gradient(ebc, params, _cotangent([d for _, d, _ in TABLES]))
    assert np.isnan(expected).sum() == 6  # the positions of the two NaN bags
    np.testing.assert_allclose(np.asarray(weights_grad), expected, rtol=1e-6, atol=1e-6)
    only_params = jax.jit(jax.grad(loss))(params, weights)
    assert nonfinite_rows(only_params) == nonfinite_rows(grads)
