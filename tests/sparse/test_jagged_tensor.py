"""JaggedTensor: construction, dense conversions eagerly and under jit, pytree, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sparse import JaggedTensor

SHAPES = [(1, 3), (4, 2), (6, 5)]  # (num_bags, max_len)


def _random_bags(num_bags, max_len, seed=0, dim=None):
    """Per-bag arrays (ids, or [n, dim] floats) and matching float weights."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, max_len + 1, size=num_bags)
    if dim is None:
        bags = [rng.integers(0, 100, size=n) for n in sizes]
    else:
        bags = [rng.normal(size=(n, dim)).astype(np.float32) for n in sizes]
    weights = [rng.random(n).astype(np.float32) for n in sizes]
    return bags, weights


def _padded_reference(bags, width, fill):
    """NumPy [B, width, ...]: each bag's first `width` rows, then `fill`."""
    tail = bags[0].shape[1:] if bags else ()
    out = np.full((len(bags), width, *tail), fill, dtype=np.float64)
    for b, bag in enumerate(bags):
        n = min(len(bag), width)
        out[b, :n] = bag[:n]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_lengths_and_offsets_describe_the_same_bags(shape):
    bags, _ = _random_bags(*shape)
    lengths = np.array([len(b) for b in bags])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(bags)
    from_lengths = JaggedTensor(values, lengths=lengths)
    from_offsets = JaggedTensor(values, offsets=offsets)
    chex.assert_trees_all_equal(from_lengths, from_offsets)
    np.testing.assert_array_equal(from_lengths.offsets(), offsets)
    assert from_lengths.lengths().dtype == jnp.int32 and from_lengths.offsets().dtype == jnp.int32
    assert int(from_lengths.num_values()) == len(values)


def test_integer_values_are_int32_and_float_rows_keep_their_dtype():
    ids = JaggedTensor(np.array([3, 4], np.int64), lengths=np.array([2]))
    assert ids.values().dtype == jnp.int32
    rows = JaggedTensor(jnp.ones((3, 4), jnp.bfloat16), lengths=np.array([1, 2]))
    assert rows.values().dtype == jnp.bfloat16 and rows.values().shape == (3, 4)


def test_weights_accessors():
    jt = JaggedTensor(np.arange(3), lengths=np.array([3]), weights=np.array([0.5, 1.0, 2.0]))
    np.testing.assert_allclose(jt.weights(), [0.5, 1.0, 2.0])
    assert jt.weights_or_none() is jt.weights()
    bare = JaggedTensor(np.arange(3), lengths=np.array([3]))
    assert bare.weights_or_none() is None
    with pytest.raises(ValueError, match="no weights"):
        bare.weights()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [None, 3])
def test_to_dense_returns_each_bag(shape, dim):
    bags, weights = _random_bags(*shape, seed=1, dim=dim)
    jt = JaggedTensor.from_dense(bags, weights)
    for got, want in zip(jt.to_dense(), bags, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jt.to_dense_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jt.lengths(), [len(b) for b in bags])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [None, 2])
@pytest.mark.parametrize("desired_length", [None, 1, 7])
def test_to_padded_dense_matches_reference_eagerly_and_under_jit(shape, dim, desired_length):
    bags, weights = _random_bags(*shape, seed=2, dim=dim)
    jt = JaggedTensor.from_dense(bags, weights)
    width = max(len(b) for b in bags) if desired_length is None else desired_length
    expected = _padded_reference(bags, width, -1.0)
    eager = jt.to_padded_dense(desired_length, padding_value=-1.0)
    np.testing.assert_allclose(eager, expected, rtol=1e-6)
    jitted = jax.jit(lambda j: j.to_padded_dense(width, padding_value=-1.0))(jt)
    np.testing.assert_allclose(jitted, expected, rtol=1e-6)
    np.testing.assert_allclose(
        jt.to_padded_dense_weights(width), _padded_reference(weights, width, 0.0), rtol=1e-6
    )


def test_to_padded_dense_ignores_padding_rows():
    jt = jax.jit(lambda v, n: JaggedTensor(v, lengths=n))(jnp.arange(1, 7), jnp.array([1, 2]))
    np.testing.assert_array_equal(jt.to_padded_dense(), [[1, 0], [2, 3]])


def test_dense_conversions_without_a_static_length_refuse_to_trace():
    jt = JaggedTensor(np.arange(3), lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"to_padded_dense\(desired_length=...\)"):
        jax.jit(lambda j: j.to_padded_dense())(jt)
    with pytest.raises(ValueError, match="to_dense"):
        jax.jit(lambda j: j.to_dense()[0])(jt)


@pytest.mark.parametrize("shape", SHAPES)
def test_from_dense_lengths_takes_each_rows_prefix_eagerly_and_under_jit(shape):
    num_bags, width = shape
    rng = np.random.default_rng(3)
    dense = rng.integers(0, 100, size=(num_bags, width))
    dense_weights = rng.random((num_bags, width)).astype(np.float32)
    lengths = rng.integers(0, width + 1, size=num_bags)
    expected = np.concatenate([dense[b, : lengths[b]] for b in range(num_bags)])
    expected_w = np.concatenate([dense_weights[b, : lengths[b]] for b in range(num_bags)])
    eager = JaggedTensor.from_dense_lengths(dense, lengths, dense_weights)
    np.testing.assert_array_equal(eager.values(), expected)
    np.testing.assert_allclose(eager.weights(), expected_w)
    jitted = jax.jit(JaggedTensor.from_dense_lengths)(dense, lengths, dense_weights)
    assert jitted.values().shape == (num_bags * width,)
    n = len(expected)
    np.testing.assert_array_equal(jitted.values()[:n], expected)
    np.testing.assert_array_equal(jitted.values()[n:], 0)
    np.testing.assert_allclose(jitted.weights()[:n], expected_w)
    np.testing.assert_array_equal(jitted.lengths(), lengths)


@pytest.mark.parametrize("weighted", [False, True])
def test_pytree_round_trips_through_flatten_and_jit(weighted):
    bags, weights = _random_bags(5, 4, seed=4)
    jt = JaggedTensor.from_dense(bags, weights if weighted else None)
    leaves, treedef = jax.tree.flatten(jt)
    assert len(leaves) == (3 if weighted else 2)
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, leaves), jt)
    out = jax.jit(lambda j: j)(jt)
    assert isinstance(out, JaggedTensor)
    chex.assert_trees_all_equal(out, jt)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(jt)[0]]
    assert paths == [".values", ".lengths"] + ([".weights"] if weighted else [])


def test_padding_rows_after_the_real_rows_are_allowed():
    jt = JaggedTensor(np.zeros((5, 2), np.float32), lengths=np.array([1, 2]))
    assert jt.values().shape == (5, 2) and int(jt.num_values()) == 3


# --- bad input --------------------------------------------------------------------------------


def test_missing_lengths_and_offsets_is_an_error():
    with pytest.raises(ValueError, match="lengths or offsets"):
        JaggedTensor(np.arange(3))


def test_negative_length_names_the_bag_and_value():
    with pytest.raises(ValueError, match=r"lengths\[1\] = -1 is negative"):
        JaggedTensor(np.arange(3), lengths=np.array([2, -1, 2]))


def test_lengths_longer_than_values_are_an_error():
    with pytest.raises(ValueError, match="lengths sum to 4 but values has only 3 rows"):
        JaggedTensor(np.arange(3), lengths=np.array([2, 2]))


def test_bad_offsets_are_named():
    with pytest.raises(ValueError, match=r"offsets\[0\] = 2"):
        JaggedTensor(np.arange(3), offsets=np.array([2, 3]))
    with pytest.raises(ValueError, match=r"offsets\[2\] = 1 < offsets\[1\] = 3"):
        JaggedTensor(np.arange(3), offsets=np.array([0, 3, 1]))
    with pytest.raises(ValueError, match="disagree"):
        JaggedTensor(np.arange(3), lengths=np.array([1, 2]), offsets=np.array([0, 2, 3]))


def test_non_integer_lengths_and_out_of_range_ids_are_errors():
    with pytest.raises(ValueError, match="lengths must hold integers, got dtype float32"):
        JaggedTensor(np.arange(3), lengths=np.array([3.0], np.float32))
    with pytest.raises(ValueError, match=rf"values\[0\] = {-(2**31) - 1} does not fit int32"):
        JaggedTensor(np.array([-(2**31) - 1]), lengths=np.array([1]))


def test_weights_of_the_wrong_length_are_an_error():
    with pytest.raises(ValueError, match=r"weights has shape \(2,\) but values has 3 rows"):
        JaggedTensor(np.arange(3), lengths=np.array([3]), weights=np.ones(2))


def test_from_dense_rejects_mismatched_weights_and_from_dense_lengths_long_bags():
    with pytest.raises(
        ValueError, match=r"weights bag sizes \[1\] differ from values bag sizes \[2\]"
    ):
        JaggedTensor.from_dense([np.arange(2)], [np.ones(1)])
    with pytest.raises(ValueError, match=r"lengths\[1\] = 4 is outside \[0, 3\]"):
        JaggedTensor.from_dense_lengths(np.zeros((2, 3), np.int32), np.array([1, 4]))


def test_torchrec_members_lengths_offsets_or_none_empty_and_empty_like():
    jt = JaggedTensor(jnp.array([1, 2, 3]), lengths=jnp.array([2, 1]), weights=jnp.ones(3))
    assert jt.lengths_or_none().tolist() == [2, 1] and jt.offsets_or_none().tolist() == [0, 2, 3]
    e = JaggedTensor.empty(is_weighted=True, values_dtype=jnp.int32)
    assert e.values().shape == (0,) and e.values().dtype == jnp.int32
    assert e.lengths().shape == (0,) and e.weights().dtype == jnp.float32
    assert JaggedTensor.empty().weights_or_none() is None
    with pytest.raises(ValueError, match="lengths are stored as int32"):
        JaggedTensor.empty(lengths_dtype=jnp.int64)
    like = JaggedTensor.empty_like(jt)
    assert like.values().dtype == jnp.int32 and like.values().shape == (0,)
    assert like.weights().dtype == jt.weights().dtype and like.lengths().shape == (0,)
