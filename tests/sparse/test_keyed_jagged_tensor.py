"""KeyedJaggedTensor: TorchRec's layout, accessors, reorganisation eagerly and under jit, pytree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sparse import JaggedTensor, KeyedJaggedTensor, validate_kjt

SHAPES = [(1, 1, 3), (2, 3, 4), (3, 5, 2), (4, 2, 6)]  # (num_keys, batch, max_len)


def _worked_example() -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["f1", "f2"], values=jnp.arange(8), offsets=jnp.array([0, 2, 2, 3, 4, 5, 8])
    )


def _assert_real(values, expected, *, capacity=None):
    """The first len(expected) entries equal expected; the rest are zero; total = capacity."""
    values = np.asarray(values)
    n = len(expected)
    if capacity is not None:
        assert values.shape[0] == capacity
    np.testing.assert_array_equal(values[:n], expected)
    np.testing.assert_array_equal(values[n:], np.zeros_like(values[n:]))


# --- TorchRec's worked example ----------------------------------------------------------------


def test_worked_example_bags_are_feature_major():
    kjt = _worked_example()
    assert kjt.keys() == ["f1", "f2"]
    assert kjt.stride() == 3
    np.testing.assert_array_equal(kjt.lengths(), [2, 0, 1, 1, 1, 3])
    assert [b.tolist() for b in kjt["f1"].to_dense()] == [[0, 1], [], [2]]
    assert [b.tolist() for b in kjt["f2"].to_dense()] == [[3], [4], [5, 6, 7]]
    np.testing.assert_array_equal(kjt["f2"].lengths(), [1, 1, 3])
    assert kjt.length_per_key() == [3, 5]
    assert kjt.offset_per_key() == [0, 3, 8]


def test_worked_example_to_dict_splits_by_key():
    d = _worked_example().to_dict()
    assert list(d) == ["f1", "f2"]
    np.testing.assert_array_equal(d["f1"].values(), [0, 1, 2])
    np.testing.assert_array_equal(d["f2"].offsets(), [0, 1, 2, 5])


# --- constructors and accessors ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_from_lengths_and_from_offsets_agree(make_bags, shape):
    bags = make_bags(*shape, weighted=True)
    offsets = np.concatenate([[0], np.cumsum(bags.lengths())])
    a = KeyedJaggedTensor.from_lengths_sync(
        bags.keys, bags.values(), bags.lengths(), bags.flat_weights()
    )
    b = KeyedJaggedTensor.from_offsets_sync(bags.keys, bags.values(), offsets, bags.flat_weights())
    c = KeyedJaggedTensor(bags.keys, bags.values(), bags.flat_weights(), bags.lengths(), offsets)
    for kjt in (b, c):
        chex.assert_trees_all_equal(a, kjt)
    np.testing.assert_array_equal(a.offsets(), offsets)


@pytest.mark.parametrize("shape", SHAPES)
def test_accessors_describe_the_bags(make_bags, shape):
    bags = make_bags(*shape, weighted=True)
    kjt = bags.kjt()
    num_keys, batch, _ = shape
    per_key = [int(bags.lengths([f]).sum()) for f in range(num_keys)]
    assert kjt.keys() == bags.keys and kjt.stride() == batch
    assert kjt.values().dtype == jnp.int32
    assert kjt.lengths().dtype == jnp.int32 and kjt.offsets().dtype == jnp.int32
    np.testing.assert_array_equal(kjt.values(), bags.values())
    np.testing.assert_allclose(kjt.weights(), bags.flat_weights())
    assert kjt.weights_or_none() is kjt.weights()
    assert kjt.capacity() == sum(per_key)
    assert isinstance(kjt.num_values(), jax.Array) and int(kjt.num_values()) == sum(per_key)
    assert kjt.length_per_key() == per_key
    assert kjt.offset_per_key() == np.cumsum([0, *per_key]).tolist()
    np.testing.assert_array_equal(kjt.length_per_key_array(), per_key)
    np.testing.assert_array_equal(kjt.offset_per_key_array(), kjt.offset_per_key())


def test_weights_raises_when_unweighted_and_weights_or_none_is_none(make_bags):
    kjt = make_bags(2, 2, 2).kjt()
    assert kjt.weights_or_none() is None
    with pytest.raises(ValueError, match="no weights"):
        kjt.weights()


def test_per_key_arrays_work_under_jit_and_host_lists_raise(make_bags):
    kjt = make_bags(3, 4, 3).kjt(extra_capacity=5)
    lpk, opk, n = jax.jit(
        lambda k: (k.length_per_key_array(), k.offset_per_key_array(), k.num_values())
    )(kjt)
    assert np.asarray(lpk).tolist() == kjt.length_per_key()
    assert np.asarray(opk).tolist() == kjt.offset_per_key()
    assert int(n) == kjt.offset_per_key()[-1]
    with pytest.raises(ValueError, match=r"length_per_key_array\(\)"):
        jax.jit(lambda k: jnp.asarray(k.length_per_key()))(kjt)
    with pytest.raises(ValueError, match=r"offset_per_key_array\(\)"):
        jax.jit(lambda k: jnp.asarray(k.offset_per_key()))(kjt)


def test_empty_has_zero_lengths_and_requested_capacity():
    kjt = KeyedJaggedTensor.empty(True, keys=["a", "b"], stride=3, capacity=5)
    assert kjt.keys() == ["a", "b"] and kjt.stride() == 3 and kjt.capacity() == 5
    np.testing.assert_array_equal(kjt.lengths(), np.zeros(6))
    assert kjt.weights().shape == (5,)
    validate_kjt(kjt)
    bare = KeyedJaggedTensor.empty()
    assert bare.keys() == [] and bare.stride() == 0 and bare.capacity() == 0
    assert bare.weights_or_none() is None


def test_stride_is_inferred_from_lengths_and_keys():
    kjt = KeyedJaggedTensor(["a", "b"], np.arange(3), lengths=np.array([1, 0, 2, 0]))
    assert kjt.stride() == 2


def test_int64_numpy_ids_are_stored_as_int32():
    ids = np.array([2**31 - 1, 0, 5], np.int64)
    kjt = KeyedJaggedTensor(["a"], ids, lengths=np.array([3], np.int64))
    assert kjt.values().dtype == jnp.int32 and kjt.lengths().dtype == jnp.int32
    np.testing.assert_array_equal(kjt.values(), ids)


# --- reorganisation: eager (exact) and jit (capacity) -----------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_getitem_and_to_dict_match_the_bags_eagerly_and_under_jit(make_bags, shape, weighted):
    bags = make_bags(*shape, weighted=weighted, seed=1)
    padded = bags.kjt(extra_capacity=7)
    eager = padded.to_dict()
    jitted = jax.jit(lambda k: k.to_dict())(padded)
    for f, key in enumerate(bags.keys):
        for jt, capacity in ((eager[key], len(bags.values([f]))), (jitted[key], padded.capacity())):
            assert isinstance(jt, JaggedTensor)
            _assert_real(jt.values(), bags.values([f]), capacity=capacity)
            np.testing.assert_array_equal(jt.lengths(), bags.lengths([f]))
            if weighted:
                _assert_real(jt.weights(), bags.flat_weights([f]), capacity=capacity)
            else:
                assert jt.weights_or_none() is None
        chex.assert_trees_all_equal(padded[key], eager[key])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_split_matches_the_bags_eagerly_and_under_jit(make_bags, shape, weighted):
    bags = make_bags(*shape, weighted=weighted, seed=2)
    num_keys = shape[0]
    segments = [num_keys - 1, 0, 1] if num_keys > 1 else [0, 1]
    padded = bags.kjt(extra_capacity=3)
    starts = np.cumsum([0, *segments])
    for pieces, exact in (
        (padded.split(segments), True),
        (jax.jit(lambda k: k.split(segments))(padded), False),
    ):
        assert len(pieces) == len(segments)
        for piece, lo, hi in zip(pieces, starts[:-1], starts[1:], strict=True):
            idx = list(range(lo, hi))
            expected = bags.values(idx)
            capacity = len(expected) if exact else padded.capacity()
            assert piece.keys() == bags.keys[lo:hi] and piece.stride() == bags.stride
            _assert_real(piece.values(), expected, capacity=capacity)
            np.testing.assert_array_equal(piece.lengths(), bags.lengths(idx))
            if weighted:
                _assert_real(piece.weights(), bags.flat_weights(idx), capacity=capacity)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_permute_reorders_keys_and_values_eagerly_and_under_jit(make_bags, shape, weighted):
    bags = make_bags(*shape, weighted=weighted, seed=3)
    indices = list(reversed(range(shape[0])))
    padded = bags.kjt(extra_capacity=4)
    for out, capacity in (
        (padded.permute(indices), len(bags.values())),
        (jax.jit(lambda k: k.permute(indices))(padded), padded.capacity()),
    ):
        assert out.keys() == [bags.keys[i] for i in indices]
        _assert_real(out.values(), bags.values(indices), capacity=capacity)
        np.testing.assert_array_equal(out.lengths(), bags.lengths(indices))
        if weighted:
            _assert_real(out.weights(), bags.flat_weights(indices), capacity=capacity)


def test_permute_with_repeated_keys_grows_the_traced_capacity(make_bags):
    bags = make_bags(2, 3, 4, seed=4)
    padded = bags.kjt(extra_capacity=2)
    indices = [1, 0, 1]
    out = jax.jit(lambda k: k.permute(indices))(padded)
    _assert_real(out.values(), bags.values(indices), capacity=2 * padded.capacity())
    assert out.keys() == ["f1", "f0", "f1"]
    _assert_real(
        padded.permute(indices).values(), bags.values(indices), capacity=len(bags.values(indices))
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_concat_keeps_real_values_first_and_feature_major(make_bags, shape, weighted):
    a = make_bags(*shape, weighted=weighted, seed=5)
    b = make_bags(*shape, weighted=weighted, seed=6)
    b.keys = [f"g{i}" for i in range(len(b.keys))]
    inputs = [a.kjt(extra_capacity=3), b.kjt(extra_capacity=0), a.kjt(extra_capacity=9)]
    expected_values = np.concatenate([a.values(), b.values(), a.values()])
    expected_lengths = np.concatenate([a.lengths(), b.lengths(), a.lengths()])
    total_capacity = sum(k.capacity() for k in inputs)
    for out, capacity in (
        (KeyedJaggedTensor.concat(inputs), len(expected_values)),
        (jax.jit(KeyedJaggedTensor.concat)(inputs), total_capacity),
    ):
        assert out.keys() == a.keys + b.keys + a.keys and out.stride() == a.stride
        _assert_real(out.values(), expected_values, capacity=capacity)
        np.testing.assert_array_equal(out.lengths(), expected_lengths)
        if weighted:
            expected_w = np.concatenate([a.flat_weights(), b.flat_weights(), a.flat_weights()])
            _assert_real(out.weights(), expected_w, capacity=capacity)


@pytest.mark.parametrize("shape", SHAPES)
def test_from_jt_dict_inverts_to_dict_eagerly_and_under_jit(make_bags, shape):
    bags = make_bags(*shape, weighted=True, seed=7)
    padded = bags.kjt(extra_capacity=5)
    eager = KeyedJaggedTensor.from_jt_dict(padded.to_dict())
    jitted = jax.jit(lambda k: KeyedJaggedTensor.from_jt_dict(k.to_dict()))(padded)
    for out, capacity in ((eager, len(bags.values())), (jitted, shape[0] * padded.capacity())):
        assert out.keys() == bags.keys and out.stride() == bags.stride
        _assert_real(out.values(), bags.values(), capacity=capacity)
        _assert_real(out.weights(), bags.flat_weights(), capacity=capacity)
        np.testing.assert_array_equal(out.lengths(), bags.lengths())


def test_pad_to_fills_after_the_real_values_and_can_shrink_eagerly(make_bags):
    bags = make_bags(2, 3, 3, weighted=True, seed=8)
    kjt = bags.kjt()
    n = kjt.capacity()
    padded = kjt.pad_to(n + 6, fill_value=-1)
    np.testing.assert_array_equal(padded.values(), np.concatenate([bags.values(), -np.ones(6)]))
    _assert_real(padded.weights(), bags.flat_weights(), capacity=n + 6)
    validate_kjt(padded)
    chex.assert_trees_all_equal(padded.pad_to(n), kjt)
    grown = jax.jit(lambda k: k.pad_to(n + 10))(padded)
    _assert_real(grown.values(), bags.values(), capacity=n + 10)


def test_pad_to_rejects_too_small_capacities(make_bags):
    kjt = make_bags(2, 3, 3, seed=9).kjt(extra_capacity=4)
    n = int(kjt.num_values())
    with pytest.raises(ValueError, match=rf"capacity {n - 1} is less than the {n} values"):
        kjt.pad_to(n - 1)
    with pytest.raises(ValueError, match="cannot shrink capacity"):
        jax.jit(lambda k: k.pad_to(n))(kjt)
    with pytest.raises(ValueError, match="fill_value"):
        kjt.pad_to(n + 1, fill_value=2**40)


# --- pytree -----------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_pytree_round_trips_through_flatten_and_jit(make_bags, weighted):
    kjt = make_bags(3, 4, 3, weighted=weighted, seed=10).kjt(extra_capacity=2)
    leaves, treedef = jax.tree.flatten(kjt)
    assert len(leaves) == (3 if weighted else 2)
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, leaves), kjt)
    out = jax.jit(lambda k: k)(kjt)
    assert isinstance(out, KeyedJaggedTensor)
    assert out.keys() == kjt.keys() and out.stride() == kjt.stride()
    chex.assert_trees_all_equal(out, kjt)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(kjt)[0]]
    assert paths == [".values", ".lengths"] + ([".weights"] if weighted else [])


def test_pytree_structure_holds_keys_stride_and_weighting(make_bags):
    kjt = make_bags(2, 3, 2, seed=11).kjt()
    other_keys = KeyedJaggedTensor(["x", "y"], kjt.values(), lengths=kjt.lengths())
    same_layout = KeyedJaggedTensor(kjt.keys(), kjt.values(), lengths=kjt.lengths(), stride=3)
    weighted = KeyedJaggedTensor(
        kjt.keys(), kjt.values(), jnp.ones(kjt.capacity()), lengths=kjt.lengths()
    )
    structure = jax.tree.structure(kjt)
    assert jax.tree.structure(other_keys) != structure
    assert jax.tree.structure(weighted) != structure
    assert jax.tree.structure(same_layout) == structure


def test_jit_traces_once_for_batches_of_one_capacity_and_again_for_another(make_bags):
    traces = []

    @jax.jit
    def total(kjt):
        traces.append(kjt.capacity())
        return jnp.sum(jnp.where(jnp.arange(kjt.capacity()) < kjt.num_values(), kjt.values(), 0))

    first, second = make_bags(3, 4, 3, seed=12), make_bags(3, 4, 3, seed=13)
    assert len(first.values()) != len(second.values())
    capacity = 64
    for bags in (first, second):
        kjt = bags.kjt()
        assert int(total(kjt.pad_to(capacity))) == bags.values().sum()
    assert traces == [capacity]
    total(first.kjt().pad_to(capacity + 1))
    assert traces == [capacity, capacity + 1]


def test_construction_under_jit_skips_content_checks():
    @jax.jit
    def build(values, lengths):
        return KeyedJaggedTensor(["a", "b"], values, lengths=lengths)

    kjt = build(jnp.arange(6), jnp.array([1, 2, 0, 1]))  # sums to 4 of 6: padded, fine in jit
    assert kjt.stride() == 2 and kjt.capacity() == 6
    validate_kjt(kjt)


# --- bad input --------------------------------------------------------------------------------


def test_missing_lengths_and_offsets_is_an_error():
    with pytest.raises(ValueError, match="lengths or offsets"):
        KeyedJaggedTensor(["a"], np.arange(2))


def test_lengths_not_divisible_by_keys_names_both_numbers():
    with pytest.raises(ValueError, match="5 lengths are not divisible by 2 keys"):
        KeyedJaggedTensor(["a", "b"], np.arange(5), lengths=np.ones(5, np.int32))


def test_explicit_stride_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="stride 3 with 2 keys needs 6 lengths, got 4"):
        KeyedJaggedTensor(["a", "b"], np.arange(4), lengths=np.ones(4, np.int32), stride=3)


def test_negative_length_names_key_batch_index_and_value():
    with pytest.raises(ValueError, match=r"negative length -2 for key 'b' at batch index 1"):
        KeyedJaggedTensor(["a", "b"], np.arange(2), lengths=np.array([1, 1, 2, -2]))


@pytest.mark.parametrize("num_values", [3, 7])
def test_lengths_must_sum_to_the_number_of_values(num_values):
    with pytest.raises(ValueError, match=rf"lengths sum to 5\b.* {num_values} entries"):
        KeyedJaggedTensor(["a"], np.arange(num_values), lengths=np.array([2, 3]))


def test_offsets_must_start_at_zero_and_not_decrease():
    with pytest.raises(ValueError, match=r"offsets\[0\] = 1"):
        KeyedJaggedTensor(["a"], np.arange(3), offsets=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"offsets\[2\] = 1 < offsets\[1\] = 2"):
        KeyedJaggedTensor(["a"], np.arange(3), offsets=np.array([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="disagree"):
        KeyedJaggedTensor(
            ["a"], np.arange(3), lengths=np.array([1, 2]), offsets=np.array([0, 2, 3])
        )


def test_weights_must_match_values_and_be_floating():
    with pytest.raises(ValueError, match=r"weights has shape \(2,\) but values has 3"):
        KeyedJaggedTensor(["a"], np.arange(3), np.ones(2, np.float32), lengths=np.array([3]))
    with pytest.raises(ValueError, match="weights must be floating point, got dtype int"):
        KeyedJaggedTensor(["a"], np.arange(3), np.ones(3, np.int32), lengths=np.array([3]))


def test_non_integer_values_or_lengths_are_errors():
    with pytest.raises(ValueError, match="values must hold integers, got dtype float32"):
        KeyedJaggedTensor(["a"], np.ones(2, np.float32), lengths=np.array([2]))
    with pytest.raises(ValueError, match="lengths must hold integers, got dtype float64"):
        KeyedJaggedTensor(["a"], np.arange(2), lengths=np.array([2.0]))


def test_id_outside_int32_is_named():
    ids = np.array([1, 2**31 + 5], np.int64)
    with pytest.raises(ValueError, match=rf"values\[1\] = {2**31 + 5} does not fit int32"):
        KeyedJaggedTensor(["a"], ids, lengths=np.array([2]))


def test_non_str_keys_are_errors():
    with pytest.raises(ValueError, match="keys must be str, got 3"):
        KeyedJaggedTensor(["a", 3], np.arange(2), lengths=np.array([1, 1]))


def test_unknown_key_is_named_with_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown key 'f9'; known keys: \['f1', 'f2'\]"):
        _worked_example()["f9"]


def test_bad_split_segments_and_permute_indices_are_errors():
    kjt = _worked_example()
    with pytest.raises(ValueError, match=r"segments \[1, 2\] must be >= 0 and sum to the 2 keys"):
        kjt.split([1, 2])
    with pytest.raises(ValueError, match="permute index 2 is out of range for 2 keys"):
        kjt.permute([0, 2])


def test_concat_rejects_mixed_strides_and_mixed_weighting(make_bags):
    a = make_bags(1, 2, 2, seed=14).kjt()
    b = make_bags(1, 3, 2, seed=15).kjt()
    with pytest.raises(ValueError, match=r"equal strides, got \[2, 3\]"):
        KeyedJaggedTensor.concat([a, b])
    w = make_bags(1, 2, 2, weighted=True, seed=16).kjt()
    with pytest.raises(ValueError, match="cannot mix weighted and unweighted"):
        KeyedJaggedTensor.concat([a, w])


def test_from_jt_dict_rejects_unequal_batch_sizes():
    jts = {
        "a": JaggedTensor(np.arange(2), lengths=np.array([1, 1])),
        "b": JaggedTensor(np.arange(2), lengths=np.array([2])),
    }
    with pytest.raises(ValueError, match="'b' has 1 bags, key 'a' has 2"):
        KeyedJaggedTensor.from_jt_dict(jts)


def test_validate_kjt_rejects_a_kjt_built_around_the_constructor(make_bags):
    kjt = make_bags(2, 3, 3, seed=17).kjt(extra_capacity=2)
    treedef = jax.tree.structure(kjt)
    bad_lengths = np.asarray(kjt.lengths()).copy()
    bad_lengths[4] = -3
    with pytest.raises(ValueError, match=r"negative length -3 for key 'f1' at batch index 1"):
        validate_kjt(jax.tree.unflatten(treedef, [kjt.values(), jnp.asarray(bad_lengths)]))
    too_long = np.full_like(bad_lengths, 10)
    with pytest.raises(ValueError, match=rf"lengths sum to 60, more than the {kjt.capacity()}"):
        validate_kjt(jax.tree.unflatten(treedef, [kjt.values(), jnp.asarray(too_long)]))


class TestTorchRecMembers:
    """Members a TorchRec port calls, with TorchRec's meaning."""

    def test_repeated_keys_are_refused_at_construction_with_the_key_named(self):
        with pytest.raises(ValueError, match="key 'a' appears more than once"):
            KeyedJaggedTensor(["a", "b", "a"], np.arange(3), lengths=np.ones(3, int))
        with pytest.raises(ValueError, match="key 'b' appears more than once"):
            KeyedJaggedTensor.empty(keys=["b", "b"], stride=1)

    def test_lengths_offsets_and_per_key_members(self):
        kjt = _worked_example()
        assert kjt.lengths_or_none().tolist() == [2, 0, 1, 1, 1, 3]
        assert kjt.offsets_or_none().tolist() == [0, 2, 2, 3, 4, 5, 8]
        assert kjt.length_per_key_or_none() == [3, 5]
        assert kjt.offset_per_key_or_none() == [0, 3, 8]
        assert kjt.index_per_key() == {"f1": 0, "f2": 1}
        assert kjt.lengths_offset_per_key() == [0, 3, 6]
        flat = kjt.flatten_lengths()
        assert flat.keys() == kjt.keys() and flat.lengths().tolist() == kjt.lengths().tolist()

    def test_per_key_lists_are_none_under_jit_instead_of_a_host_sync(self):
        def f(kjt):
            assert kjt.length_per_key_or_none() is None
            assert kjt.offset_per_key_or_none() is None
            return kjt.offsets_or_none()

        assert jax.jit(f)(_worked_example()).tolist() == [0, 2, 2, 3, 4, 5, 8]

    def test_empty_like_keeps_stride_and_dtypes(self):
        kjt = KeyedJaggedTensor(["a"], np.array([1, 2]), lengths=[1, 1], weights=[0.5, 1.5])
        e = KeyedJaggedTensor.empty_like(kjt)
        assert (e.keys(), e.stride(), e.capacity()) == ([], 2, 0)
        assert e.weights().dtype == kjt.weights().dtype and e.values().dtype == jnp.int32

    def test_permute_takes_indices_tensor(self):
        kjt = _worked_example()
        out = kjt.permute([1, 0], indices_tensor=jnp.array([1, 0]))
        assert out.keys() == ["f2", "f1"] and out.values().tolist() == [3, 4, 5, 6, 7, 0, 1, 2]
        with pytest.raises(ValueError, match=r"indices_tensor \[0, 1\] differs"):
            kjt.permute([1, 0], indices_tensor=np.array([0, 1]))

    def test_a_key_repeated_by_concat_resolves_to_its_last_occurrence_as_torchrec(self):
        a = KeyedJaggedTensor(["x", "y"], np.array([1, 2, 3]), lengths=[1, 2])
        b = KeyedJaggedTensor(["x"], np.array([7, 8, 9]), lengths=[3])
        kjt = KeyedJaggedTensor.concat([a, b])
        assert kjt.keys() == ["x", "y", "x"] and kjt.index_per_key() == {"x": 2, "y": 1}
        assert kjt["x"].values().tolist() == [7, 8, 9]
        assert list(kjt.to_dict()) == ["x", "y"]
        assert kjt.to_dict()["x"].values().tolist() == [7, 8, 9]
        jitted = jax.jit(lambda k: k["x"].values())(kjt)
        assert jitted.tolist()[:3] == [7, 8, 9]
        torch = pytest.importorskip("torch")
        torchrec = pytest.importorskip("torchrec")

        def theirs(k):
            return torchrec.KeyedJaggedTensor(
                keys=k.keys(),
                values=torch.as_tensor(np.asarray(k.values())),
                lengths=torch.as_tensor(np.asarray(k.lengths())),
            )

        ref = torchrec.KeyedJaggedTensor.concat([theirs(a), theirs(b)])
        assert ref.keys() == kjt.keys() and ref.index_per_key() == kjt.index_per_key()
        assert ref["x"].values().tolist() == kjt["x"].values().tolist()
        assert {k: v.values().tolist() for k, v in ref.to_dict().items()} == {
            k: v.values().tolist() for k, v in kjt.to_dict().items()
        }
        assert ref.lengths_offset_per_key() == kjt.lengths_offset_per_key()
