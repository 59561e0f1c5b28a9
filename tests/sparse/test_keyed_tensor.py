"""KeyedTensor: per-key slices, from_tensor_list, regroup, pytree, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.sparse import KeyedTensor

CASES = [([2, 3], 1, 4), ([1], 1, 2), ([4, 1, 2], 0, 3)]  # (length_per_key, key_dim, batch)


def _tensors(length_per_key, key_dim, batch, seed=0):
    """One random tensor per key, ``length_per_key[k]`` wide along ``key_dim``."""
    rng = np.random.default_rng(seed)
    shape = lambda n: (batch, n) if key_dim == 1 else (n, batch)
    return [rng.normal(size=shape(n)).astype(np.float32) for n in length_per_key]


@pytest.mark.parametrize(("length_per_key", "key_dim", "batch"), CASES)
def test_slices_and_to_dict_return_each_keys_tensor(length_per_key, key_dim, batch):
    keys = [f"k{i}" for i in range(len(length_per_key))]
    tensors = _tensors(length_per_key, key_dim, batch)
    kt = KeyedTensor(keys, length_per_key, np.concatenate(tensors, axis=key_dim), key_dim=key_dim)
    assert kt.keys() == keys and kt.key_dim() == key_dim
    assert kt.length_per_key() == length_per_key
    assert kt.offset_per_key() == np.cumsum([0, *length_per_key]).tolist()
    for k, t in zip(keys, tensors, strict=True):
        np.testing.assert_array_equal(kt[k], t)
        np.testing.assert_array_equal(kt.to_dict()[k], t)


@pytest.mark.parametrize(("length_per_key", "key_dim", "batch"), CASES)
def test_from_tensor_list_concatenates_along_key_dim(length_per_key, key_dim, batch):
    keys = [f"k{i}" for i in range(len(length_per_key))]
    tensors = _tensors(length_per_key, key_dim, batch, seed=1)
    kt = KeyedTensor.from_tensor_list(keys, tensors, key_dim=key_dim)
    np.testing.assert_array_equal(kt.values(), np.concatenate(tensors, axis=key_dim))
    assert kt.length_per_key() == length_per_key


def test_negative_key_dim_is_normalised():
    kt = KeyedTensor(["a", "b"], [1, 2], jnp.zeros((4, 3)), key_dim=-1)
    assert kt.key_dim() == 1 and kt["b"].shape == (4, 2)


@pytest.mark.parametrize("key_dim", [0, 1])
def test_regroup_concatenates_keys_from_several_keyed_tensors(key_dim):
    a = _tensors([2, 3], key_dim, 4, seed=2)
    b = _tensors([1, 4], key_dim, 4, seed=3)
    kt1 = KeyedTensor.from_tensor_list(["a0", "a1"], a, key_dim=key_dim)
    kt2 = KeyedTensor.from_tensor_list(["b0", "b1"], b, key_dim=key_dim)
    groups = [["b1", "a0"], ["a1"], ["b0", "a1", "b1"]]
    by_key = {"a0": a[0], "a1": a[1], "b0": b[0], "b1": b[1]}
    expected = [np.concatenate([by_key[k] for k in g], axis=key_dim) for g in groups]
    for got, want in zip(KeyedTensor.regroup([kt1, kt2], groups), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    as_dict = KeyedTensor.regroup_as_dict([kt1, kt2], groups, ["x", "y", "z"])
    assert list(as_dict) == ["x", "y", "z"]
    np.testing.assert_array_equal(as_dict["z"], expected[2])
    jitted = jax.jit(lambda kts: KeyedTensor.regroup(kts, groups))([kt1, kt2])
    chex.assert_trees_all_equal(jitted, KeyedTensor.regroup([kt1, kt2], groups))


def test_pytree_round_trips_through_jit_with_static_layout():
    kt = KeyedTensor(["a", "b"], [1, 2], jnp.arange(6.0).reshape(2, 3))
    leaves, treedef = jax.tree.flatten(kt)
    assert len(leaves) == 1
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, leaves), kt)
    out = jax.jit(lambda k: KeyedTensor(k.keys(), k.length_per_key(), 2 * k.values()))(kt)
    assert out.keys() == ["a", "b"] and out.length_per_key() == [1, 2]
    np.testing.assert_array_equal(out["b"], 2 * np.array([[1.0, 2.0], [4.0, 5.0]]))
    other = KeyedTensor(["a", "b"], [2, 1], jnp.arange(6.0).reshape(2, 3))
    assert jax.tree.structure(other) != treedef


# --- bad input --------------------------------------------------------------------------------


def test_keys_and_lengths_must_pair_up():
    with pytest.raises(ValueError, match="2 keys but 1 entries in length_per_key"):
        KeyedTensor(["a", "b"], [3], jnp.zeros((2, 3)))


def test_lengths_must_sum_to_the_key_dim():
    with pytest.raises(ValueError, match=r"values has 3 entries along key_dim 1 .* sums to 4"):
        KeyedTensor(["a", "b"], [1, 3], jnp.zeros((2, 3)))


def test_negative_length_and_bad_key_dim_are_named():
    with pytest.raises(ValueError, match="key 'b' is negative: -1"):
        KeyedTensor(["a", "b"], [4, -1], jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="key_dim 2 is out of range"):
        KeyedTensor(["a"], [3], jnp.zeros((2, 3)), key_dim=2)


def test_unknown_keys_are_named_with_the_known_keys():
    kt = KeyedTensor(["a", "b"], [1, 2], jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"unknown key 'c'; known keys: \['a', 'b'\]"):
        kt["c"]
    with pytest.raises(ValueError, match=r"unknown key 'c' in group \['a', 'c'\]"):
        KeyedTensor.regroup([kt], [["a", "c"]])


def test_regroup_rejects_mixed_key_dims_and_group_key_count_mismatch():
    kt0 = KeyedTensor(["a"], [2], jnp.zeros((2, 3)), key_dim=0)
    kt1 = KeyedTensor(["b"], [3], jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"one key_dim .* got \[0, 1\]"):
        KeyedTensor.regroup([kt0, kt1], [["a", "b"]])
    with pytest.raises(ValueError, match="1 keys for 2 groups"):
        KeyedTensor.regroup_as_dict([kt1], [["b"], ["b"]], ["x"])


def test_from_tensor_list_rejects_mismatched_batch_shapes():
    with pytest.raises(ValueError, match=r"key 'b' has shape \(3, 2\)"):
        KeyedTensor.from_tensor_list(["a", "b"], [jnp.zeros((2, 1)), jnp.zeros((3, 2))])


def test_from_tensor_list_takes_cat_dim_equal_to_key_dim():
    kt = KeyedTensor.from_tensor_list(["a", "b"], [jnp.ones((2, 1)), jnp.zeros((2, 3))], cat_dim=1)
    assert kt.length_per_key() == [1, 3] and kt.values().shape == (2, 4)
    one = KeyedTensor.from_tensor_list(["a"], [jnp.ones((2, 3))], key_dim=1, cat_dim=0)
    assert one.values().shape == (2, 3)
    with pytest.raises(ValueError, match="cat_dim 0 differs from key_dim 1"):
        KeyedTensor.from_tensor_list(["a", "b"], [jnp.ones((2, 3))] * 2, key_dim=1, cat_dim=0)


def test_a_repeated_key_resolves_to_its_last_occurrence_as_torchrec():
    values = np.arange(12.0, dtype=np.float32).reshape(2, 6)
    kt1 = KeyedTensor(["a", "b", "a"], [1, 2, 3], jnp.asarray(values))
    kt2 = KeyedTensor(["b"], [1], jnp.asarray(values[:, :1] + 100))
    assert kt1["a"].tolist() == values[:, 3:].tolist()
    assert list(kt1.to_dict()) == ["a", "b"] and kt1.to_dict()["a"].shape == (2, 3)
    groups = [["a", "b"], ["b"]]
    got = KeyedTensor.regroup([kt1, kt2], groups)
    torch = pytest.importorskip("torch")
    torchrec = pytest.importorskip("torchrec")
    t1 = torchrec.KeyedTensor(["a", "b", "a"], [1, 2, 3], torch.as_tensor(values))
    t2 = torchrec.KeyedTensor(["b"], [1], torch.as_tensor(values[:, :1] + 100))
    assert t1["a"].tolist() == kt1["a"].tolist()
    assert {k: v.tolist() for k, v in t1.to_dict().items()} == {
        k: v.tolist() for k, v in kt1.to_dict().items()
    }
    for ours, theirs in zip(got, torchrec.KeyedTensor.regroup([t1, t2], groups), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
