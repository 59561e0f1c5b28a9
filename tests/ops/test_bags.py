import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.ops.bags import checked_offsets


def wrapped_offsets(lengths):
    """Offsets as a KJT builds them: the int32 running sum (wrapping past int32)."""
    total = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])
    return jnp.asarray(total.astype(np.int32))


def test_good_offsets_are_unchanged():
    offsets = wrapped_offsets([2, 0, 3, 1])
    fixed, bad = jax.jit(checked_offsets, static_argnums=1)(offsets, 8)
    assert fixed.tolist() == offsets.tolist() and int(bad) == 0


def test_negative_length_empties_that_bag_only():
    fixed, bad = checked_offsets(wrapped_offsets([2, -1, 3]), 5)
    assert fixed.tolist() == [0, 2, 2, 5] and int(bad) == 1


def test_bags_past_the_capacity_are_emptied_and_counted():
    fixed, bad = checked_offsets(wrapped_offsets([2, 3, 0, 4]), 6)
    assert fixed.tolist() == [0, 2, 5, 5, 5] and int(bad) == 1


def test_lengths_whose_sum_wraps_int32_are_bad_not_wrapped_back_into_range():
    lengths = [2**31 - 1, 2**31 - 1, 3, 1]  # the running sum wraps to -2, then 1, 2
    offsets = wrapped_offsets(lengths)
    assert offsets.tolist()[-1] == 2  # looks like two real ids
    fixed, bad = checked_offsets(offsets, 10)
    assert fixed.tolist() == [0] * 5 and int(bad) == 4


def test_capacity_zero_and_no_bags():
    fixed, bad = checked_offsets(wrapped_offsets([0, 1]), 0)
    assert fixed.tolist() == [0, 0, 0] and int(bad) == 1
    fixed, bad = checked_offsets(jnp.zeros((1,), jnp.int32), 0)
    assert fixed.tolist() == [0] and int(bad) == 0
