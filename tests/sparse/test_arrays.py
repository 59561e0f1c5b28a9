"""The array helpers of jaxrec.sparse, against plain NumPy loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sparse import arrays


@pytest.mark.parametrize("jit", [False, True])
def test_gather_segments_matches_a_loop_over_segments(jit):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 3)).astype(np.float32)
    starts = np.array([4, 0, 17, 9])
    sizes = np.array([3, 0, 3, 2])
    expected = np.concatenate([data[s : s + n] for s, n in zip(starts, sizes, strict=True)])
    expected = np.concatenate([expected, np.full((4, 3), -1, np.float32)])
    gather = arrays.gather_segments
    if jit:
        gather = jax.jit(gather, static_argnums=3)
    got = gather(jnp.asarray(data), jnp.asarray(starts), jnp.asarray(sizes), 12, -1)
    chex.assert_trees_all_equal(np.asarray(got), expected)


def test_pad_bags_places_each_bag_in_a_row():
    data = jnp.arange(6)
    got = arrays.pad_bags(data, jnp.array([2, 0, 4]), -1, width=3)
    assert got.tolist() == [[0, 1, -1], [-1, -1, -1], [2, 3, 4]]


def test_lengths_from_offsets_and_disagreement():
    assert arrays.lengths_from(None, np.array([0, 1, 4])).tolist() == [1, 3]
    assert arrays.offsets_of(jnp.array([1, 3])).tolist() == [0, 1, 4]
    with pytest.raises(ValueError, match="disagree"):
        arrays.lengths_from([1, 2], [0, 1, 4])
    with pytest.raises(ValueError, match=r"offsets\[2\] = 3 < offsets\[1\] = 4"):
        arrays.lengths_from(None, [0, 4, 3])
    with pytest.raises(ValueError, match="neither"):
        arrays.lengths_from(None, None)


def test_as_int32_refuses_eagerly_and_marks_bad_under_jit():
    big = np.array([1, 2**40], np.int64)
    with pytest.raises(ValueError, match=r"ids\[1\] = 1099511627776 does not fit int32"):
        arrays.as_int32(big, "ids")
    with jax.enable_x64():
        got = jax.jit(lambda x: arrays.as_int32(x, "ids"))(jnp.asarray(big))
    assert got.dtype == jnp.int32 and got.tolist() == [1, -1]


def test_is_traced_and_require_concrete():
    assert not arrays.is_traced(jnp.ones(2), None)
    jax.jit(lambda x: assert_traced(x))(jnp.ones(2))
    with pytest.raises(ValueError, match=r"to_dense\(\) .* use to_padded_dense"):
        jax.jit(lambda x: arrays.require_concrete("to_dense", "to_padded_dense", x))(jnp.ones(2))


def assert_traced(x):
    assert arrays.is_traced(x)
    return x


def test_as_keys_refuses_a_bare_string_and_non_strings():
    assert arrays.as_keys(["a", "b"]) == ("a", "b")
    with pytest.raises(ValueError, match="the str 'ab'"):
        arrays.as_keys("ab")
    with pytest.raises(ValueError, match="got 3 of type int"):
        arrays.as_keys(["a", 3])
