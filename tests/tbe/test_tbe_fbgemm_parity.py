"""jaxrec.tbe against FBGEMM's CPU TBE (skipped where fbgemm_gpu does not import).

The same specs, feature map, tables, inputs and output gradients go to both operators;
forwards, weight gradients, per-sample-weight gradients and several steps of the fused
optimizers FBGEMM's CPU path implements (EXACT_SGD, EXACT_ADAGRAD,
EXACT_ROWWISE_ADAGRAD) must agree, on the XLA path and on the Pallas kernels
(interpret mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrec
from jaxrec import tbe

torch = pytest.importorskip("torch")
fbgemm_training = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
fbgemm_common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
fbgemm_configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")

BATCH = 3
CAPACITY = 3 * BATCH * 3  # features * bags * the longest bag
# name: (table (rows, dim)s, feature_table_map, pooling, weighted). FBGEMM's CPU Adagrad
# kernels fail unless the features of a table are adjacent and in table order ("num of
# rows processed by adagrad ... does not match"), so the permuted map runs with EXACT_SGD.
CASES = {
    "shared_table_sum": ([(12, 8), (7, 4)], [0, 0, 1], "SUM", False),
    "permuted_shared_weighted": ([(12, 8), (7, 4)], [0, 1, 0], "SUM", True),
    "mean": ([(12, 8), (7, 4)], [0, 1], "MEAN", False),
    "none": ([(12, 4), (9, 4)], [0, 1, 1], "NONE", False),
    "weighted_sum": ([(12, 8), (7, 4)], [0, 0, 1], "SUM", True),
}


def _inputs(rng, specs, feature_map):
    lengths = rng.integers(0, 4, len(feature_map) * BATCH)
    lengths[1] = 0  # an empty bag
    ids = [rng.integers(0, specs[feature_map[k // BATCH]][0], n) for k, n in enumerate(lengths)]
    indices = np.concatenate(ids).astype(np.int64)
    indices[: min(2, indices.size)] = indices[0]  # a repeated id
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    weights = rng.uniform(0.5, 1.5, indices.size).astype(np.float32)
    return indices, offsets, weights


def _pair(case, optimizer, backend, lr=0.1, eps=1e-8):
    specs, feature_map, pooling, _ = CASES[case]
    ref = fbgemm_training.SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[
            (r, d, fbgemm_common.EmbeddingLocation.HOST, fbgemm_training.ComputeDevice.CPU)
            for r, d in specs
        ],
        feature_table_map=feature_map,
        optimizer=getattr(fbgemm_configs.EmbOptimType, optimizer),
        learning_rate=lr,
        eps=eps,
        pooling_mode=getattr(fbgemm_common.PoolingMode, pooling),
    )
    ours = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CPU) for r, d in specs],
        feature_table_map=feature_map,
        optimizer=getattr(tbe.OptimType, optimizer),
        learning_rate=lr,
        eps=eps,
        pooling_mode=getattr(tbe.PoolingMode, pooling),
        backend=backend,
    )
    state = ours.init(jax.random.key(1))
    with torch.no_grad():
        for weight, mine in zip(
            ref.split_embedding_weights(), ours.split_embedding_weights(state), strict=True
        ):
            weight.copy_(torch.as_tensor(np.asarray(mine)))
    return ref, ours, state


def _ref_call(ref, indices, offsets, weights):
    return ref(
        torch.as_tensor(indices),
        torch.as_tensor(offsets),
        per_sample_weights=None if weights is None else weights,
    )


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_fbgemm(case, backend):
    """Forward, the tables' gradient (OptimType.NONE against FBGEMM's EXACT_SGD step at
    lr = 1) and the per-sample weights' gradient."""
    rng = np.random.default_rng(0)
    specs, feature_map, pooling, weighted = CASES[case]
    ref, ours, state = _pair(case, "EXACT_SGD", backend, lr=1.0)
    plain = tbe.SplitTableBatchedEmbeddingBagsCodegen(
        ours.embedding_specs,
        feature_table_map=feature_map,
        optimizer=tbe.OptimType.NONE,
        pooling_mode=ours.pooling_mode,
        backend=backend,
    )
    plain_state = plain.set_split_embedding_weights(
        plain.init(), ours.split_embedding_weights(state)
    )
    indices, offsets, weights = _inputs(rng, specs, feature_map)
    psw = torch.as_tensor(weights).requires_grad_() if weighted else None
    expected = _ref_call(ref, indices, offsets, psw)
    g_out = rng.normal(size=tuple(expected.shape)).astype(np.float32)
    before = [w.clone() for w in ref.split_embedding_weights()]
    expected.backward(torch.as_tensor(g_out))
    ref_grads = [b - a for b, a in zip(before, ref.split_embedding_weights(), strict=True)]

    ours_w = jnp.asarray(weights) if weighted else None

    def loss(s, w):
        return jnp.sum(plain(s, indices, offsets, w) * g_out)

    out = plain(plain_state, indices, offsets, ours_w)
    np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    if weighted:
        grads, w_grad = jax.grad(loss, argnums=(0, 1))(plain_state, ours_w)
        np.testing.assert_allclose(np.asarray(w_grad), psw.grad.numpy(), rtol=1e-5, atol=1e-5)
    else:
        grads = jax.grad(loss)(plain_state, None)
    for mine, theirs in zip(plain.split_embedding_weights(grads), ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), rtol=1e-5, atol=1e-5)


OPTIMIZERS = ["EXACT_SGD", "EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD"]
# EXACT_ROWWISE_ADAGRAD on every case FBGEMM's CPU Adagrad runs; the other two on the
# shared table; EXACT_SGD on the permuted map. Both backends each time.
ADAGRAD_CASES = ("mean", "none", "shared_table_sum", "weighted_sum")
PARAMS = [
    *[("EXACT_ROWWISE_ADAGRAD", c, b) for c in ADAGRAD_CASES for b in ("xla", "pallas")],
    *[(o, "shared_table_sum", b) for o in OPTIMIZERS[:2] for b in ("xla", "pallas")],
    *[("EXACT_SGD", "permuted_shared_weighted", b) for b in ("xla", "pallas")],
]


@pytest.mark.parametrize(("optimizer", "case", "backend"), PARAMS)
def test_fused_steps_match_fbgemm(optimizer, case, backend):
    """Three training steps: tables, optimizer state and every forward agree, with the
    learning rate changed by set_learning_rate after the first step."""
    rng = np.random.default_rng(1)
    specs, feature_map, pooling, weighted = CASES[case]
    ref, ours, state = _pair(case, optimizer, backend)

    @jax.jit
    def step(state, indices, offsets, weights, g_out):
        def loss(s):
            out = ours(s, indices, offsets, weights)
            return jnp.sum(out * g_out), out

        grads, out = jax.grad(loss, has_aux=True)(state)
        return out, jaxrec.optim.apply_updates(state, grads)

    for k in range(3):
        if k == 1:
            ref.set_learning_rate(0.05)
            state = ours.set_learning_rate(state, 0.05)
        indices, offsets, weights = _inputs(rng, specs, feature_map)
        psw = torch.as_tensor(weights) if weighted else None
        expected = _ref_call(ref, indices, offsets, psw)
        g_out = rng.normal(size=tuple(expected.shape)).astype(np.float32)
        expected.backward(torch.as_tensor(g_out))
        # Padded to one capacity (entries past offsets[-1] are never read): one compile.
        pad = CAPACITY - indices.size
        if pooling == "NONE":
            g_out = np.pad(g_out, ((0, pad), (0, 0)))
        out, state = step(
            state,
            jnp.asarray(np.pad(indices, (0, pad)), jnp.int32),
            jnp.asarray(offsets, jnp.int32),
            jnp.asarray(np.pad(weights, (0, pad))) if weighted else None,
            g_out,
        )
        np.testing.assert_allclose(
            np.asarray(out)[: expected.shape[0]], expected.detach().numpy(), rtol=1e-5, atol=1e-5
        )
    for mine, theirs in zip(
        ours.split_embedding_weights(state), ref.split_embedding_weights(), strict=True
    ):
        np.testing.assert_allclose(np.asarray(mine), theirs.numpy(), rtol=1e-5, atol=1e-5)
    ref_states = ref.split_optimizer_states() or [[] for _ in specs]  # [] for EXACT_SGD
    for mine, theirs in zip(ours.split_optimizer_states(state), ref_states, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine.values(), theirs, strict=True):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=1e-5, atol=1e-6)
    assert step._cache_size() == 1  # the learning rate change did not recompile


def test_enums_match_fbgemm():
    """Every member here has FBGEMM's name and value, and FBGEMM's members are accepted."""
    pairs = [
        (tbe.EmbeddingLocation, fbgemm_common.EmbeddingLocation),
        (tbe.ComputeDevice, fbgemm_common.ComputeDevice),
        (tbe.PoolingMode, fbgemm_common.PoolingMode),
        (tbe.BoundsCheckMode, fbgemm_common.BoundsCheckMode),
        (tbe.CacheAlgorithm, fbgemm_common.CacheAlgorithm),
        (tbe.OptimType, fbgemm_configs.EmbOptimType),
        (tbe.SparseType, fbgemm_configs.SparseType),
        (tbe.WeightDecayMode, fbgemm_training.WeightDecayMode),
    ]
    for ours, theirs in pairs:
        for member in ours:
            assert theirs[member.name].value == member.value, (ours, member)
            assert tbe.enums.as_member(ours, theirs[member.name], "x") is member
