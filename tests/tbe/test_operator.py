"""SplitTableBatchedEmbeddingBagsCodegen: FBGEMM's documented example, the API, bad input."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxrec
from jaxrec import tbe
from jaxrec.tbe import (
    BoundsCheckMode,
    ComputeDevice,
    EmbeddingLocation,
    OptimType,
    PoolingMode,
    SparseType,
    SplitTableBatchedEmbeddingBagsCodegen,
)

DEV, CUDA, CPU = EmbeddingLocation.DEVICE, ComputeDevice.CUDA, ComputeDevice.CPU

# FBGEMM's forward docstring: the printed tables and the printed output.
EXAMPLE_WEIGHTS = [
    [
        [-0.9426, 0.7046, 0.4214, -0.0419, 0.1331, -0.7856, -0.8124, -0.2021],
        [-0.5771, 0.5911, -0.7792, -0.1068, -0.6203, 0.4813, -0.1677, 0.4790],
        [-0.5587, -0.0941, 0.5754, 0.3475, -0.8952, -0.1964, 0.0810, -0.4174],
    ],
    [
        [-0.2513, -0.4039, -0.3775, 0.3273],
        [-0.5399, -0.0229, -0.1455, -0.8770],
        [-0.9520, 0.4593, -0.7169, 0.6307],
        [-0.1765, 0.8757, 0.8614, 0.2051],
        [-0.0603, -0.9980, -0.7958, -0.5826],
    ],
]
EXAMPLE_OUTPUT = [
    [-1.5197, 1.2957, -0.3578, -0.1487, -0.4873, -0.3044, -0.9801, 0.2769,
     -0.7164, 0.8528, 0.7159, -0.6719],
    [-2.0784, 1.2016, 0.2176, 0.1988, -1.3825, -0.5008, -0.8991, -0.1405,
     -1.2637, -0.9427, -1.8902, 0.3754],
    [-1.5013, 0.6105, 0.9968, 0.3057, -0.7621, -0.9821, -0.7314, -0.6195,
     -0.2513, -0.4039, -0.3775, 0.3273],
]  # fmt: skip
INDICES = [0, 1, 2, 0, 1, 2, 0, 3, 1, 4, 2, 0, 0]
OFFSETS = [0, 2, 5, 7, 9, 12, 13]


def _two_tables(**kwargs):
    return SplitTableBatchedEmbeddingBagsCodegen([(3, 8, DEV, CUDA), (5, 4, DEV, CUDA)], **kwargs)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fbgemm_documented_example(backend):
    """The printed tables give the printed output (FBGEMM's second table is MANAGED there;
    placements other than DEVICE come later)."""
    op = _two_tables(backend=backend)
    state = op.set_split_embedding_weights(op.init(), [np.array(w) for w in EXAMPLE_WEIGHTS])
    out = op(state, jnp.array(INDICES), jnp.array(OFFSETS))
    assert out.shape == (3, 12) and out.dtype == jnp.float32
    # The printed values are rounded to 4 decimals: 1e-4, plus float32's representation.
    np.testing.assert_allclose(np.asarray(out), EXAMPLE_OUTPUT, rtol=0, atol=1e-4 + 1e-6)


def test_readme_training_snippet_runs():
    """The README's TBE section runs as written and its step moves the looked-up rows."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## FBGEMM's TBE operator", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102
    before, after = scope["w0"], scope["tbe"].split_embedding_weights(scope["state"])[0]
    assert not np.allclose(np.asarray(before)[:3], np.asarray(after)[:3])


def test_columns_follow_feature_order_with_a_shared_table():
    """Feature t fills columns [sum of earlier dims, + dim), whatever table it reads."""
    op = SplitTableBatchedEmbeddingBagsCodegen(
        [(3, 2, DEV, CPU), (4, 3, DEV, CPU)], feature_table_map=[1, 0, 1]
    )
    t0, t1 = np.arange(6.0).reshape(3, 2), 10 + np.arange(12.0).reshape(4, 3)
    state = op.set_split_embedding_weights(op.init(), [t0, t1])
    out = op(state, jnp.array([3, 2, 0]), jnp.array([0, 1, 2, 3]))  # B = 1
    np.testing.assert_array_equal(np.asarray(out), [np.r_[t1[3], t0[2], t1[0]]])
    assert op.total_D == 8 and op.feature_dims == (3, 2, 3)


def test_sequence_output_one_row_per_index():
    op = SplitTableBatchedEmbeddingBagsCodegen(
        [(3, 2, DEV, CPU), (4, 2, DEV, CPU)], pooling_mode=PoolingMode.NONE
    )
    t0, t1 = np.arange(6.0).reshape(3, 2), 10 + np.arange(8.0).reshape(4, 2)
    state = op.set_split_embedding_weights(op.init(), [t0, t1])
    out = op(state, jnp.array([2, 0, 3]), jnp.array([0, 2, 2, 3, 3]))  # B = 2
    np.testing.assert_array_equal(np.asarray(out), [t0[2], t0[0], t1[3]])


def test_init_weights_and_optimizer_states():
    op = _two_tables(optimizer=OptimType.PARTIAL_ROWWISE_ADAM)
    zeros = op.init()
    assert all(float(jnp.abs(w).max()) == 0 for w in op.split_embedding_weights(zeros))
    drawn = op.split_embedding_weights(op.init(jax.random.key(0)))
    assert float(jnp.abs(drawn[0]).max()) <= 3**-0.5 and float(jnp.abs(drawn[0]).max()) > 0
    state = op.init_embedding_weights_uniform(zeros, -1, 1, jax.random.key(3))
    weights = op.split_embedding_weights(state)
    assert [w.shape for w in weights] == [(3, 8), (5, 4)]
    assert all(float(w.min()) >= -1 and float(w.max()) < 1 for w in weights)
    assert not np.allclose(np.asarray(weights[0])[:, :4], np.asarray(weights[1])[:3])
    states = op.split_optimizer_states(state)
    assert [{k: v.shape for k, v in s.items()} for s in states] == [
        {"momentum1": (3, 8), "momentum2": (3,)},
        {"momentum1": (5, 4), "momentum2": (5,)},
    ]


def test_learning_rate_is_state():
    op = _two_tables(optimizer=OptimType.EXACT_SGD, learning_rate=0.5)
    state = op.init()
    assert op.get_learning_rate(state) == 0.5
    state = op.set_learning_rate(state, 2.0)
    assert op.get_learning_rate(state) == 2.0
    g = jnp.ones((3, 12))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda s: jnp.sum(op(s, jnp.array(INDICES), jnp.array(OFFSETS)) * g))(
            state
        )
        return jaxrec.optim.apply_updates(state, grads)

    moved = op.split_embedding_weights(step(state))[0]
    np.testing.assert_allclose(np.asarray(moved)[2], -2.0 * 2)  # row 2 read twice, lr 2
    slower = op.split_embedding_weights(step(op.set_learning_rate(state, 0.25)))[0]
    np.testing.assert_allclose(np.asarray(slower)[2], -0.25 * 2)
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="learning_rate must be a finite number >= 0"):
        op.set_learning_rate(state, -1.0)


@pytest.mark.parametrize("precision", [SparseType.FP16, SparseType.BF16])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_16_bit_tables_and_outputs(precision, backend):
    """16-bit tables train with stochastic rounding; outputs in the asked type, within
    one rounding of the float32 lookup of the same tables."""
    dtype = precision.as_dtype()
    kwargs = {"optimizer": OptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}
    op16 = _two_tables(
        weights_precision=precision, output_dtype=precision, backend=backend, **kwargs
    )
    op32 = _two_tables(backend=backend, **kwargs)
    state16 = op16.set_split_embedding_weights(op16.init(), EXAMPLE_WEIGHTS)
    state32 = op32.set_split_embedding_weights(
        op32.init(), [np.asarray(w, np.float32) for w in op16.split_embedding_weights(state16)]
    )
    assert all(w.dtype == dtype for w in op16.split_embedding_weights(state16))
    indices, offsets = jnp.array(INDICES), jnp.array(OFFSETS)
    out16, out32 = op16(state16, indices, offsets), op32(state32, indices, offsets)
    assert out16.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out16, np.float32), np.asarray(out32.astype(dtype), np.float32), atol=0
    )
    g = jnp.asarray(np.random.default_rng(0).normal(size=(3, 12)), jnp.float32)

    def step(op, state):
        grads = jax.grad(lambda s: jnp.sum(op(s, indices, offsets).astype(jnp.float32) * g))(state)
        return jaxrec.optim.apply_updates(state, grads)

    new16, new32 = (
        op.split_embedding_weights(step(op, s)) for op, s in ((op16, state16), (op32, state32))
    )
    eps = float(jnp.finfo(dtype).eps)
    for a, b in zip(new16, new32, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b), rtol=2 * eps, atol=1e-6
        )


def test_feature_requires_grad_masks_weight_gradients():
    op = _two_tables(optimizer=OptimType.NONE)
    state = op.set_split_embedding_weights(op.init(), EXAMPLE_WEIGHTS)
    weights = jnp.linspace(0.5, 1.5, len(INDICES))
    indices, offsets = jnp.array(INDICES), jnp.array(OFFSETS)

    def loss(w, mask):
        return jnp.sum(op(state, indices, offsets, w, mask) ** 2)

    full = jax.grad(loss)(weights, None)
    masked = jax.grad(loss)(weights, jnp.array([0, 1]))
    np.testing.assert_array_equal(np.asarray(masked[:7]), 0)  # feature 0: positions 0..6
    np.testing.assert_allclose(np.asarray(masked[7:]), np.asarray(full[7:]))
    assert float(jnp.abs(full[:7]).max()) > 0


def test_bounds_check_inside_jit():
    op = _two_tables(bounds_check_mode=BoundsCheckMode.WARNING)
    state = op.set_split_embedding_weights(op.init(), EXAMPLE_WEIGHTS)
    bad = jnp.array(INDICES).at[0].set(7)
    out, count = jax.jit(op.lookup)(state, bad, jnp.array(OFFSETS))
    assert int(count) == 1
    np.testing.assert_allclose(np.asarray(out)[0, :8], EXAMPLE_WEIGHTS[0][1], atol=1e-7)
    fatal = _two_tables(bounds_check_mode=BoundsCheckMode.V2_FATAL)
    checked = checkify.checkify(jax.jit(lambda s, i, o: fatal(s, i, o)))
    err, _ = checked(fatal.init(), bad, jnp.array(OFFSETS))
    with pytest.raises(checkify.JaxRuntimeError, match="outside their tables"):
        err.throw()


def test_state_round_trips_through_flax_serialization():
    import flax.serialization

    op = _two_tables(optimizer=OptimType.EXACT_ADAGRAD)
    state = op.set_learning_rate(op.init(jax.random.key(0)), 0.3)
    restored = flax.serialization.from_bytes(op.init(), flax.serialization.to_bytes(state))
    assert op.get_learning_rate(restored) == pytest.approx(0.3)
    for a, b in zip(
        op.split_embedding_weights(restored), op.split_embedding_weights(state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_specs": [(3, 8, DEV, CPU), (3, 8, DEV, CUDA)]}, "one compute device"),
        ({"embedding_specs": [(0, 8, DEV, CPU)]}, r"rows must be an int >= 1"),
        ({"embedding_specs": [(3, 8, DEV)]}, r"must be \(rows, dim"),
        ({"embedding_specs": []}, "at least one table"),
        ({"feature_table_map": [0, 2]}, r"feature_table_map\[1\] = 2 is not a table index"),
        ({"feature_table_map": [0, 0]}, r"tables \[1\] are read by no feature"),
        ({"pooling_mode": PoolingMode.NONE}, "all tables of one dim"),
        ({"pooling_mode": "sum"}, "pooling_mode must be a PoolingMode"),
        ({"weights_precision": SparseType.INT4}, "weights_precision=SparseType.INT4 is not built"),
        ({"output_dtype": SparseType.INT4}, "output_dtype=SparseType.INT4 is not built"),
        ({"weight_decay": 0.1}, "EXACT_SGD has no weight decay"),
        (
            {"optimizer": OptimType.ADAM, "weight_decay_mode": tbe.WeightDecayMode.L2},
            "only EXACT_ROWWISE_ADAGRAD has L2",
        ),
        ({"max_norm": 1.0}, "only EXACT_ROWWISE_ADAGRAD clips"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"optimizer": OptimType.ADAM, "beta1": 1.0}, r"beta1 must lie in \[0, 1\)"),
        ({"cache_load_factor": -0.1}, "cache_load_factor must be a finite number >= 0"),
        ({"table_names": ["a", "a"]}, "table_names must name each"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    kwargs = {"embedding_specs": [(3, 8, DEV, CUDA), (5, 4, DEV, CUDA)], **kwargs}
    with pytest.raises(ValueError, match=message):
        SplitTableBatchedEmbeddingBagsCodegen(**kwargs)


@pytest.mark.parametrize(
    ("indices", "offsets", "weights", "mask", "message"),
    [
        (INDICES, OFFSETS[:-1], None, None, "offsets has 6 entries; with 2 features"),
        ([INDICES], OFFSETS, None, None, r"indices must be 1-D, got shape \(1, 13\)"),
        (np.array(INDICES, np.float32), OFFSETS, None, None, "indices must have an integer"),
        (INDICES, np.array(OFFSETS, np.float32), None, None, "offsets must have an integer"),
        (INDICES, OFFSETS, np.ones(12), None, "per_sample_weights has 12 entries"),
        (INDICES, OFFSETS, np.ones(13, np.int32), None, "must have a floating-point dtype"),
        (INDICES, OFFSETS, None, [1], "feature_requires_grad has 1 entries"),
        (INDICES[:-1] + [5], OFFSETS, None, None, r"feature 1 \(table 1, 5 rows\): index 5 at"),
        ([-1] + INDICES[1:], OFFSETS, None, None, r"feature 0 \(table 0, 3 rows\): index -1"),
        (INDICES, [1, 2, 5, 7, 9, 12, 13], None, None, r"offsets\[0\] must be 0"),
        (INDICES, [0, 2, 5, 4, 9, 12, 13], None, None, "bag 2 of feature 0 has a negative"),
        (INDICES, [0, 2, 5, 7, 9, 12, 14], None, None, "exceeds the 13 entries of indices"),
    ],
)
def test_bad_call_inputs(indices, offsets, weights, mask, message):
    op = _two_tables()
    with pytest.raises(ValueError, match=message):
        op(op.init(), np.asarray(indices), np.asarray(offsets), weights, mask)


def test_bad_states_and_weights():
    op, other = _two_tables(), _two_tables(optimizer=OptimType.NONE)
    state = op.init()
    with pytest.raises(ValueError, match="state must be the TBEState"):
        op.split_embedding_weights({"params": {}})
    with pytest.raises(ValueError, match="optimizer NONE keeps a plain table"):
        other.split_embedding_weights(state)
    with pytest.raises(ValueError, match=r"one array per table \(2\), got 1"):
        op.set_split_embedding_weights(state, EXAMPLE_WEIGHTS[:1])
    with pytest.raises(ValueError, match=r"arrays\[1\] \(table 't1'\) has shape \(4, 5\)"):
        op.set_split_embedding_weights(state, [EXAMPLE_WEIGHTS[0], np.ones((4, 5))])
    with pytest.raises(ValueError, match="non-finite value"):
        op.set_split_embedding_weights(state, [np.full((3, 8), np.inf), EXAMPLE_WEIGHTS[1]])
    fp16 = _two_tables(weights_precision=SparseType.FP16)
    with pytest.raises(ValueError, match="does not fit in float16"):
        fp16.set_split_embedding_weights(fp16.init(), [np.full((3, 8), 1e6), EXAMPLE_WEIGHTS[1]])
    with pytest.raises(ValueError, match="optimizer NONE keeps no optimizer state"):
        other.split_optimizer_states(other.init())
    with pytest.raises(ValueError, match="low=1.0 exceeds high=0.0"):
        op.init_embedding_weights_uniform(state, 1, 0, jax.random.key(0))
