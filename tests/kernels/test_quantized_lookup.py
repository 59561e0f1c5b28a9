"""Quantized pooled lookup: the Pallas kernel (interpret mode), its XLA reference, a float32
lookup of the dequantized table, and FBGEMM's CPU int-nbit TBE, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrec_kernels.pooled_lookup import PooledConfig
from jaxrec_kernels.quantized_lookup import (
    kernel_table,
    kernel_word_bytes,
    quantized_pooled_lookup,
    quantized_pooled_lookup_reference,
)
from jaxrec_kernels.rowwise_quantization import dequantize_rows, quantize_rows, row_bytes
from random_kjt import random_kjt


def quantized_table(seed, rows, dim, weight_type):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, dim)) * rng.uniform(0.1, 2.0, (rows, 1))
    return quantize_rows(jnp.asarray(w, jnp.float32), weight_type)


# Interpret mode runs one program per bag: tiny batches keep these cases fast. Each weight
# type, both poolings, weights, odd dims (a partly filled last byte) and a dim past one
# 16-value block are covered.
def numpy_pooled(table, ids, offsets, psw, feats, batch, num_columns, pooling):
    """The float lookup of ``table`` in NumPy (no compile): bad ids give a zero row, and
    their count."""
    table, out, bad = np.asarray(table, np.float64), np.zeros((batch, num_columns)), 0
    for kjt, row0, rows, col in feats:
        for b in range(batch):
            lo, hi = offsets[kjt * batch + b], offsets[kjt * batch + b + 1]
            for i in range(lo, hi):
                ok = 0 <= ids[i] < rows
                bad += not ok
                w = 1.0 if psw is None else float(psw[i])
                out[b, col : col + table.shape[1]] += table[row0 + ids[i]] * w if ok else 0.0
            if pooling == "mean" and hi > lo:
                out[b, col : col + table.shape[1]] /= hi - lo
    return out, bad


@pytest.mark.parametrize(
    "weight_type,dim,pooling,weighted",
    [
        ("int8", 5, "mean", True),
        ("int4", 7, "sum", True),
        ("int2", 18, "mean", False),
    ],
)
def test_kernel_reference_and_dequantized_lookup_agree(weight_type, dim, pooling, weighted):
    rng = np.random.default_rng(dim)
    batch, rows = 2, 9
    ids, offsets = random_kjt(rng, 3, batch, 6, rows)
    psw = jnp.asarray(rng.normal(size=ids.shape), jnp.float32) if weighted else None
    q = quantized_table(dim, 3 * rows, dim, weight_type)
    feats = ((0, 0, rows, 2 * dim), (1, rows, rows, 0), (2, 2 * rows, rows, dim))
    kw = dict(batch_size=batch, num_columns=3 * dim, pooling=pooling)
    args = (jnp.asarray(ids), jnp.asarray(offsets), psw, feats)
    got, bad = quantized_pooled_lookup(
        q, *args, dim=dim, weight_type=weight_type, interpret=True, **kw
    )
    ref, ref_bad = quantized_pooled_lookup_reference(
        q, *args, dim=dim, weight_type=weight_type, **kw
    )
    table = dequantize_rows(q, weight_type, dim)
    dense, _ = numpy_pooled(table, ids, offsets, psw, feats, batch, 3 * dim, pooling)
    assert got.shape == (batch, 3 * dim) and got.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(table))) * 8  # the largest bag sum's magnitude
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-7 * scale)
    np.testing.assert_allclose(got, dense, rtol=0, atol=4e-7 * scale)
    assert int(bad) == int(ref_bad) == 0
    assert float(jnp.max(jnp.abs(got))) > 0


@pytest.mark.parametrize(
    "mode,weight_type", [("warning", "int4"), ("ignore", "int8"), ("none", "int8")]
)
def test_bad_ids_as_the_float_kernels(mode, weight_type):
    rng = np.random.default_rng(3)
    batch, rows, dim = 3, 5, 8
    ids, offsets = random_kjt(rng, 2, batch, 6, rows, bad_frac=0.3)
    q = quantized_table(4, 2 * rows, dim, weight_type)
    feats = ((0, 0, rows, 0), (1, rows, rows, dim))
    kw = dict(batch_size=batch, num_columns=2 * dim, bounds_check=mode, pooling="mean")
    args = (jnp.asarray(ids), jnp.asarray(offsets), None, feats)
    got, bad = quantized_pooled_lookup(
        q, *args, dim=dim, weight_type=weight_type, interpret=True, **kw
    )
    ref, ref_bad = quantized_pooled_lookup_reference(
        q, *args, dim=dim, weight_type=weight_type, **kw
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    if mode != "none":  # NONE reads a clamped row (undefined, as documented)
        table = dequantize_rows(q, weight_type, dim)
        dense, dense_bad = numpy_pooled(table, ids, offsets, None, feats, batch, 2 * dim, "mean")
        np.testing.assert_allclose(got, dense, rtol=0, atol=1e-5)
        assert int(bad) == (dense_bad if mode == "warning" else 0) == int(ref_bad)
        assert dense_bad > 0
    else:
        assert int(bad) == int(ref_bad) == 0


def test_writes_only_its_columns_of_a_given_output_and_handles_no_ids():
    q = quantized_table(0, 4, 3, "int8")
    out = jnp.full((2, 5), 7.0, jnp.float32)
    ids = jnp.zeros((0,), jnp.int32)
    offsets = jnp.zeros((3,), jnp.int32)
    for fn, extra in (
        (quantized_pooled_lookup, {"interpret": True}),
        (quantized_pooled_lookup_reference, {}),
    ):
        got, bad = fn(
            q,
            ids,
            offsets,
            None,
            ((0, 0, 4, 1),),
            dim=3,
            weight_type="int8",
            batch_size=2,
            num_columns=5,
            out=out,
            **extra,
        )
        np.testing.assert_array_equal(got, [[7.0, 0, 0, 0, 7.0]] * 2)
        assert int(bad) == 0


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(dim=4), "have 12 bytes .*got 13"),
        (dict(weight_type="int3"), "weight_type must be one of"),
        (dict(config=PooledConfig(16, 16, strategy="segmented")), ">= 16 lanes a plane, got 8"),
        (dict(pooling="max"), "pooling must be one of"),
        (dict(num_columns=4), "exceed num_columns=4"),
    ],
)
def test_bad_arguments_are_refused_by_name(change, match):
    q = quantized_table(0, 4, 5, "int8")
    kw = dict(dim=5, weight_type="int8", batch_size=1, num_columns=5, interpret=True)
    kw.update(change)
    ids, offsets = jnp.array([1], jnp.int32), jnp.array([0, 1], jnp.int32)
    with pytest.raises(ValueError, match=match):
        quantized_pooled_lookup(q, ids, offsets, None, ((0, 0, 4, 0),), **kw)
    with pytest.raises(ValueError, match="2-D uint8"):
        quantized_pooled_lookup_reference(
            q.astype(jnp.int32),
            ids,
            offsets,
            None,
            ((0, 0, 4, 0),),
            dim=5,
            weight_type="int8",
            batch_size=1,
            num_columns=5,
        )


# The kernel equals the reference above; FBGEMM is compared with the reference (no
# interpret-mode launches), each n-bit type with one pooling.
@pytest.mark.parametrize(
    "weight_type,sparse_type,pooling", [("int4", "INT4", "SUM"), ("int2", "INT2", "MEAN")]
)
def test_matches_fbgemm_int_nbit_tbe_on_the_cpu(weight_type, sparse_type, pooling):
    torch = pytest.importorskip("torch")
    inference = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_inference")
    common = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_common")
    configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")
    rng = np.random.default_rng(11)
    batch, dims, rows = 4, (8, 16), (10, 7)
    op = inference.IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[
            (
                f"t{t}",
                rows[t],
                dims[t],
                configs.SparseType[sparse_type],
                common.EmbeddingLocation.HOST,
            )
            for t in range(2)
        ],
        device="cpu",
        pooling_mode=common.PoolingMode[pooling],
        output_dtype=configs.SparseType.FP32,
    )
    op.fill_random_weights()
    got = []
    ids_t, offsets_t = [], [0]
    for t in range(2):
        q = quantized_table(t, rows[t], dims[t], weight_type)
        values, scale_shift = op.split_embedding_weights()[t]
        values.copy_(torch.from_numpy(np.asarray(q[:, :-4])))
        scale_shift.copy_(torch.from_numpy(np.asarray(q[:, -4:])))
        ids, offsets = random_kjt(rng, 1, batch, 6, rows[t], pad=0)
        out, _ = quantized_pooled_lookup_reference(
            q,
            jnp.asarray(ids),
            jnp.asarray(offsets),
            None,
            ((0, 0, rows[t], 0),),
            dim=dims[t],
            weight_type=weight_type,
            batch_size=batch,
            num_columns=dims[t],
            pooling=pooling.lower(),
        )
        got.append(np.asarray(out))
        ids_t.append(ids)
        offsets_t.extend(offsets[1:] + offsets_t[-1])
    want = op(
        torch.from_numpy(np.concatenate(ids_t)).int(), torch.tensor(offsets_t, dtype=torch.int32)
    ).numpy()
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-6, atol=1e-6)


def test_row_bytes_are_fbgemms():
    assert quantized_table(0, 3, 128, "int8").shape == (3, row_bytes(128, "int8")) == (3, 136)
    assert quantized_table(0, 3, 128, "int4").shape == (3, 68)


# Rows no valid id reads, padding bits of a row's last byte, and the weights of positions
# that read nothing hold bytes that decode to NaN/inf: outputs must stay finite and equal
# the float oracle (a lane that reads nothing adds an exact zero, never 0 * NaN).
_POISON_FIELDS = {
    "int8": bytes([0x00, 0x00, 0xC0, 0x7F, 0x00, 0x00, 0x80, 0x7F]),  # float32 NaN, inf
    "int4": bytes([0x00, 0x7E, 0x00, 0xFC]),  # float16 NaN, -inf
    "int2": bytes([0xFF, 0x7F, 0x00, 0x7C]),  # float16 NaN, inf
}


def poisoned_table(weight_type, dim, rows, used):
    """A quantized table whose rows outside ``used`` decode to NaN/inf and whose packed
    padding bits (past ``dim``) are all ones."""
    q = np.array(quantized_table(dim, rows, dim, weight_type))
    tail = _POISON_FIELDS[weight_type]
    unused = np.setdiff1d(np.arange(rows), used)
    q[unused, : -len(tail)] = 0xFF
    q[unused, -len(tail) :] = np.frombuffer(tail, np.uint8)
    per_byte = 8 // {"int8": 8, "int4": 4, "int2": 2}[weight_type]
    spare = -dim % per_byte  # values in the last packed byte past dim
    if spare:
        last = q.shape[1] - len(tail) - 1
        q[:, last] |= np.uint8((0xFF << (8 - 8 * spare // per_byte)) & 0xFF)
    return jnp.asarray(q)


@pytest.mark.parametrize(
    "weight_type,dim,word_bytes", [("int8", 5, 4), ("int4", 7, 2), ("int2", 18, None)]
)
def test_unread_rows_padding_and_masked_lanes_never_leak_nan(weight_type, dim, word_bytes):
    rng = np.random.default_rng(7)
    batch = 2
    feats = ((0, 2, 5, 0), (1, 9, 4, dim))  # rows 0-1, 7-8 and 13-15 belong to no feature
    used = np.r_[2:7, 9:13]
    q = poisoned_table(weight_type, dim, 16, used)
    ids, offsets = random_kjt(rng, 2, batch, 6, 4, bad_frac=0.3)  # bad ids: row 0 if read
    psw = rng.normal(size=ids.shape).astype(np.float32)
    n = int(offsets[-1])
    bad = (ids[:n] < 0) | (ids[:n] >= np.repeat([5, 4], np.diff(offsets).reshape(2, -1).sum(1)))
    psw[:n][bad] = np.nan  # weights of bad ids and of the padding are never read
    psw[n:] = np.inf
    assert bad.any()
    kw = dict(batch_size=batch, num_columns=2 * dim, dim=dim, weight_type=weight_type)
    args = (jnp.asarray(ids), jnp.asarray(offsets), jnp.asarray(psw), feats)
    table = np.asarray(dequantize_rows(q, weight_type, dim))
    assert np.isnan(table[0]).all() and np.isfinite(table[used]).all()
    for pooling in ("sum", "mean"):
        dense, dense_bad = numpy_pooled(table, ids, offsets, psw, feats, batch, 2 * dim, pooling)
        ref, ref_bad = quantized_pooled_lookup_reference(q, *args, pooling=pooling, **kw)
        got, got_bad = quantized_pooled_lookup(
            q, *args, pooling=pooling, interpret=True, word_bytes=word_bytes, **kw
        )
        atol = 4e-7 * float(np.max(np.abs(table[used]))) * 8
        for out in (ref, got):
            assert np.isfinite(np.asarray(out)).all()
            np.testing.assert_allclose(out, dense, rtol=0, atol=atol)
        assert int(ref_bad) == int(got_bad) == dense_bad > 0


def test_every_word_view_reads_the_same_bits():
    rng = np.random.default_rng(5)
    dim, batch = 5, 2  # int4 rows of 3 + 4 bytes: words of 2 and 4 bytes pad the rows
    q = quantized_table(1, 6, dim, "int4")
    ids, offsets = random_kjt(rng, 1, batch, 5, 6)
    args = (q, jnp.asarray(ids), jnp.asarray(offsets), None, ((0, 0, 6, 0),))
    kw = dict(dim=dim, weight_type="int4", batch_size=batch, num_columns=dim, interpret=True)
    outs = [quantized_pooled_lookup(*args, word_bytes=w, **kw)[0] for w in (1, 2, 4)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    assert float(jnp.max(jnp.abs(outs[0]))) > 0
    with pytest.raises(ValueError, match="word_bytes must be 1, 2 or 4, got 3"):
        quantized_pooled_lookup(*args, word_bytes=3, **kw)


@pytest.mark.parametrize("weight_type,dim,views", [("int8", 6, (2, 4)), ("int4", 9, (1, 4))])
def test_one_scale_bias_read_equals_one_read_per_field_on_every_view(weight_type, dim, views):
    # int8 rows of 6 + 8 bytes and int4 rows of 5 + 4 bytes: in 4-byte words the scale and
    # bias straddle words, so the one-load tile and its split are exercised at every offset.
    rng = np.random.default_rng(12)
    batch, rows = 4, 7
    q = quantized_table(2, rows, dim, weight_type)
    ids, offsets = random_kjt(rng, 1, batch, 6, rows)
    args = (q, jnp.asarray(ids), jnp.asarray(offsets), None, ((0, 0, rows, 0),))
    kw = dict(dim=dim, weight_type=weight_type, batch_size=batch, num_columns=dim)
    ref, _ = quantized_pooled_lookup_reference(*args, **kw)
    for word_bytes in views:
        one, two = (
            quantized_pooled_lookup(
                *args, word_bytes=word_bytes, one_scale_bias_read=once, interpret=True, **kw
            )[0]
            for once in (True, False)
        )
        np.testing.assert_array_equal(one, two)
        np.testing.assert_allclose(one, ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(ref))) > 1


def test_a_word_view_the_lowering_cannot_address_is_refused():
    # INT4 "large": 2.28 GB of bytes has byte offsets past 2**31 under 32-bit addressing.
    table = jax.ShapeDtypeStruct((32 << 20, row_bytes(128, "int4")), jnp.uint8)
    ids, offsets = jnp.zeros((4,), jnp.int32), jnp.array([0, 2, 4], jnp.int32)

    def lookup(q, word_bytes):
        kw = dict(dim=128, weight_type="int4", batch_size=2, num_columns=128, interpret=True)
        return quantized_pooled_lookup(
            q, ids, offsets, None, ((0, 0, 32 << 20, 0),), word_bytes=word_bytes, **kw
        )

    with pytest.raises(ValueError, match="word_bytes=1: a .* 32-bit offsets"):
        jax.eval_shape(lambda q: lookup(q, 1), table)
    assert jax.eval_shape(lambda q: lookup(q, 2), table)[0].shape == (2, 128)


def test_the_default_launch_is_one_table_entry_per_precision(monkeypatch):
    from jaxrec_kernels import quantized_lookup as ql

    assert ql.default_quantized_config(128, "int8").block_len == 16
    launch = ql.QuantizedLaunch(row_bytes_per_warp=8 * 136, num_warps=2, block_bags=4)
    monkeypatch.setitem(ql.DEFAULT_LAUNCH, "int8", launch._replace(word_bytes=1))
    cfg = ql.default_quantized_config(128, "int8")
    assert (cfg.block_bags, cfg.block_len, cfg.num_warps) == (4, 16, 2)
    assert ql.kernel_word_bytes(1 << 25, 136, ql.DEFAULT_LAUNCH["int8"].word_bytes) == 1


@pytest.mark.parametrize("width", [68, 136, 36, 7, 14])
@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("edge", [2**31, 2**32])
def test_kernel_offsets_fit_32_bit_signed_where_the_lowering_uses_them(width, delta, edge):
    # JAX's Triton lowering uses 32-bit signed element offsets for operands of at most
    # 2**32 bytes: every element the kernel addresses there must be below 2**31.
    rows = edge // width + delta
    view = jax.eval_shape(
        lambda q: kernel_table(q, kernel_word_bytes(rows, width)),
        jax.ShapeDtypeStruct((rows, width), jnp.uint8),
    )
    nbytes = view.shape[0] * view.shape[1] * view.dtype.itemsize
    assert view.shape[0] == rows and nbytes >= rows * width
    if nbytes <= 2**32:
        assert view.shape[0] * view.shape[1] <= 2**31
    if rows * width < 2**31 or rows * width > 2**32:
        assert nbytes == rows * width  # outside the 32-bit range: a view, never a copy


def test_the_large_int4_table_is_read_in_words():
    rows = 32 << 20  # the GPU check's "large": 32 tables x 1M rows x 128, 68 bytes a row
    assert kernel_word_bytes(rows, row_bytes(128, "int4")) == 4
    view = jax.eval_shape(lambda q: kernel_table(q, 4), jax.ShapeDtypeStruct((rows, 68), jnp.uint8))
    assert (view.shape, view.dtype) == ((rows, 17), jnp.uint32)


def test_words_tables_and_the_segmented_strategy_read_as_the_bytes_do():
    # A table held as words (kernel_table) is read as it is, by the kernel and the
    # reference; int8 rows of 64 values are 16 words of 4 planes, enough lanes for the
    # segmented strategy the quantized kernel shares with the float one.
    rng = np.random.default_rng(3)
    dim, batch, rows = 64, 16, 7
    q = quantized_table(2, rows, dim, "int8")
    ids, offsets = random_kjt(rng, 1, batch, 5, rows)
    args = (jnp.asarray(ids), jnp.asarray(offsets), None, ((0, 0, rows, 0),))
    kw = dict(dim=dim, weight_type="int8", batch_size=batch, num_columns=dim)
    ref, _ = quantized_pooled_lookup_reference(q, *args, **kw)
    words = kernel_table(q, 4)
    assert words.shape == (rows, 18) and words.dtype == jnp.uint32
    ref_words, _ = quantized_pooled_lookup_reference(words, *args, **kw)
    np.testing.assert_array_equal(ref_words, ref)
    segmented = PooledConfig(16, 16, num_warps=4, strategy="segmented")
    for table, config in ((words, None), (q, segmented)):
        got, _ = quantized_pooled_lookup(table, *args, interpret=True, config=config, **kw)
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * float(np.abs(ref).max()))
    with pytest.raises(ValueError, match="18 uint32 elements"):
        quantized_pooled_lookup(words[:, :17], *args, interpret=True, **kw)
