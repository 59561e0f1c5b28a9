"""INT8 tables and outputs of jaxrec.tbe: storage, training against a float32 TBE whose
touched rows are requantized after each step (bit for bit), the requantization bound,
FBGEMM's bytes and forward, and the INT8 output against FBGEMM's quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.rowwise_quantization import (
    dequantize_rows,
    quantize_8bit_rowwise,
    row_scale_bias,
)

import jaxrec
from jaxrec import tbe
from jaxrec.tbe.int8 import as_bytes, int8_row_update, quantize_table

SPECS = [(9, 8), (7, 4)]
FEATURES = [0, 1, 0]  # table 0 read by two features
BATCH = 3
# feature-major bags of B=3 for each of the 3 features; row 2 of table 0 is read twice
INDICES = np.array([2, 5, 2, 0, 8, 1, 6, 6, 3, 2, 7], np.int32)
OFFSETS = np.array([0, 2, 2, 5, 6, 8, 8, 9, 10, 11], np.int32)
WEIGHTS = np.linspace(0.5, 1.5, INDICES.size).astype(np.float32)


def _op(precision, optimizer="EXACT_ROWWISE_ADAGRAD", backend="xla", **kw):
    return tbe.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CUDA) for r, d in SPECS],
        feature_table_map=FEATURES,
        weights_precision=getattr(tbe.SparseType, precision),
        optimizer=getattr(tbe.OptimType, optimizer),
        learning_rate=0.3,
        backend=backend,
        **kw,
    )


def _touched():
    """The rows each table's features read."""
    starts = OFFSETS[::BATCH]
    rows = [set() for _ in SPECS]
    for f, table in enumerate(FEATURES):
        rows[table].update(INDICES[starts[f] : starts[f + 1]].tolist())
    return [np.array(sorted(r)) for r in rows]


def _grad_out(step):
    total_d = sum(SPECS[t][1] for t in FEATURES)
    return jax.random.normal(jax.random.key(step), (BATCH, total_d))


def _trainer(op, weighted=False):
    """A jitted ``(state, grad_out) -> (output, state after one fused step)``."""
    weights = jnp.asarray(WEIGHTS) if weighted else None
    ids, offsets = jnp.asarray(INDICES), jnp.asarray(OFFSETS)

    @jax.jit
    def step(state, grad_out):
        out, vjp = jax.vjp(lambda s: op(s, ids, offsets, weights), state)
        return out, jaxrec.optim.apply_updates(state, vjp(grad_out.astype(out.dtype))[0])

    return step


@pytest.mark.parametrize(
    ("optimizer", "backend", "weighted"),
    [
        ("EXACT_ROWWISE_ADAGRAD", "xla", False),
        ("ADAM", "xla", True),
        ("EXACT_SGD", "pallas", True),
    ],
)
def test_training_equals_float32_steps_with_touched_rows_requantized(optimizer, backend, weighted):
    op8, op32 = _op("INT8", optimizer, backend), _op("FP32", optimizer, "xla")
    s8 = op8.init(jax.random.key(1))
    s32 = op32.set_split_embedding_weights(
        op32.init(), op8.split_embedding_weights(s8, dequantize=True)
    )
    touched = _touched()
    train8, train32 = _trainer(op8, weighted), _trainer(op32, weighted)
    for step in range(3):
        out8, s8 = train8(s8, _grad_out(step))
        out32, s32 = train32(s32, _grad_out(step))
        np.testing.assert_allclose(out8, out32, rtol=1e-6, atol=1e-6)
        tables = [np.array(t) for t in op32.split_embedding_weights(s32)]
        for t, rows in enumerate(touched):
            expected = quantize_8bit_rowwise(jnp.asarray(tables[t][rows]))
            np.testing.assert_array_equal(op8.split_embedding_weights(s8)[t][rows], expected)
            tables[t][rows] = dequantize_rows(expected, "int8", SPECS[t][1])
        s32 = op32.set_split_embedding_weights(s32, tables)
        for a, b in zip(
            op8.split_optimizer_states(s8), op32.split_optimizer_states(s32), strict=True
        ):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(op8.split_embedding_weights(s8, dequantize=True), tables, strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_step_is_within_half_a_scale_of_the_float32_step():
    rng = np.random.default_rng(0)
    table = quantize_table(rng.normal(size=(6, 16)).astype(np.float32))
    rows = jnp.array([1, 4, 5, 6, 6], jnp.int32)  # 6 is the sentinel
    grads = jnp.asarray(rng.normal(size=(5, 16)).astype(np.float32)).at[2].set(jnp.nan)
    sgd = jaxrec.optim.exact_sgd(learning_rate=0.7)
    new, _, nonfinite = int8_row_update(
        table, {}, jnp.float32(1), rows, grads, dim=16, optimizer=sgd
    )
    before, after = (np.asarray(tbe.int8.dequantize_table(t, 16)) for t in (table, new))
    exact = before[[1, 4]] - 0.7 * np.asarray(grads[:2])
    scale, _ = row_scale_bias(as_bytes(new)[jnp.array([1, 4])], "int8")
    bound = np.asarray(scale)[:, None] / 2 * (1 + 1e-5) + 1e-6 * np.abs(exact)
    assert (np.abs(after[[1, 4]] - exact) <= bound).all()
    assert np.abs(after[[1, 4]] - exact).max() > 0  # the requantization is not a no-op
    raw_before, raw_after = np.asarray(as_bytes(table)), np.asarray(as_bytes(new))
    np.testing.assert_array_equal(
        raw_after[[0, 2, 3, 5]], raw_before[[0, 2, 3, 5]]
    )  # untouched, NaN
    assert int(nonfinite) == 1


def test_weights_as_fbgemm_bytes_and_floats():
    op = _op("INT8")
    state = op.init(jax.random.key(0))
    raw = op.split_embedding_weights(state)
    assert [(w.shape, w.dtype) for w in raw] == [((9, 16), jnp.uint8), ((7, 12), jnp.uint8)]
    floats = [np.full((r, d), 0.25, np.float32) * np.arange(d) for r, d in SPECS]
    state = op.set_split_embedding_weights(state, floats)
    for w, f in zip(op.split_embedding_weights(state), floats, strict=True):
        np.testing.assert_array_equal(w, quantize_8bit_rowwise(jnp.asarray(f)))
    state = op.set_split_embedding_weights(state, [np.asarray(w) for w in raw])
    for a, b in zip(op.split_embedding_weights(state), raw, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(op.split_embedding_weights(state, dequantize=True), raw, strict=True):
        np.testing.assert_array_equal(a, dequantize_rows(b, "int8"))
    uniform = op.init_embedding_weights_uniform(state, -0.5, 0.5, jax.random.key(2))
    w = op.split_embedding_weights(uniform, dequantize=True)[0]
    assert w.shape == (9, 8) and 0.4 < float(jnp.abs(w).max()) <= 0.5
    with pytest.raises(ValueError, match=r"table 't1'.*\(7, 12\) uint8 bytes or \(7, 4\)"):
        op.set_split_embedding_weights(state, [raw[0], np.zeros((7, 5), np.float32)])
    bad = np.array(raw[1])
    bad[0, -4:] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="non-finite scales or biases"):
        op.set_split_embedding_weights(state, [raw[0], bad])


def test_int8_refusals():
    with pytest.raises(ValueError, match="INT8 needs a fused optimizer"):
        _op("INT8", "NONE")
    with pytest.raises(ValueError, match="pooling SUM or MEAN"):
        tbe.SplitTableBatchedEmbeddingBagsCodegen(
            [(4, 4, tbe.EmbeddingLocation.DEVICE, tbe.ComputeDevice.CPU)],
            weights_precision=tbe.SparseType.INT8,
            pooling_mode=tbe.PoolingMode.NONE,
        )
    with pytest.raises(ValueError, match="INT4 is not built yet"):
        _op("INT4")


def test_int8_output_is_the_float_output_quantized_per_row():
    op32 = _op("FP32", backend="pallas")
    op_q = _op("FP32", backend="pallas", output_dtype=tbe.SparseType.INT8)
    state = op32.init(jax.random.key(3))
    args = (jnp.asarray(INDICES), jnp.asarray(OFFSETS))
    out, out_q = op32(state, *args), op_q(state, *args)
    assert out_q.dtype == jnp.uint8 and out_q.shape == (BATCH, out.shape[1] + 8)
    np.testing.assert_array_equal(out_q, quantize_8bit_rowwise(out))
    back = tbe.dequantize_output(out_q)
    scale, _ = row_scale_bias(out_q, "int8")
    assert (np.abs(back - out) <= np.asarray(scale)[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    with pytest.raises(ValueError, match=r"\[B, C \+ 8\] uint8"):
        tbe.dequantize_output(out)


def test_int8_output_and_tables_match_fbgemm():
    torch = pytest.importorskip("torch")
    training = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")
    op = _op("INT8", "EXACT_SGD", pooling_mode=tbe.PoolingMode.MEAN)
    state = op.init(jax.random.key(4))
    ref = training.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, common.EmbeddingLocation.HOST, training.ComputeDevice.CPU) for r, d in SPECS],
        feature_table_map=FEATURES,
        weights_precision=configs.SparseType.INT8,
        optimizer=configs.EmbOptimType.EXACT_SGD,
        pooling_mode=common.PoolingMode.MEAN,
    )
    for theirs, ours in zip(
        ref.split_embedding_weights(), op.split_embedding_weights(state), strict=True
    ):
        assert tuple(theirs.shape) == ours.shape and theirs.dtype == torch.uint8
        theirs.copy_(torch.from_numpy(np.array(ours)))
    expected = ref(torch.from_numpy(INDICES).long(), torch.from_numpy(OFFSETS).long())
    out = op(state, jnp.asarray(INDICES), jnp.asarray(OFFSETS))
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-6, atol=1e-6)
    theirs_q = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(torch.from_numpy(np.array(out)))
    np.testing.assert_array_equal(tbe.quantize_output(out), theirs_q.numpy())
