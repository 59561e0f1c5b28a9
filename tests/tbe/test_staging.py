"""jaxrec.tbe.staging: page-locked buffers written in place reach the device intact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.tbe.staging import host_view, pinned_staging


def test_rows_written_in_place_reach_the_device_and_the_buffer_can_be_refilled():
    staging = pinned_staging(jax.devices()[0])
    assert staging is not None  # the CPU has pinned_host memory
    buffer = staging.allocate((3, 5))
    first = np.arange(15, dtype=np.uint8).reshape(3, 5)
    buffer[:] = first
    moved = staging.to_device(buffer)
    buffer[:] = 200  # refilled after the copy: the copy keeps the first rows
    np.testing.assert_array_equal(np.asarray(moved), first)
    np.testing.assert_array_equal(np.asarray(staging.to_device(buffer)), np.full((3, 5), 200))


def test_host_view_reads_a_pinned_host_array_and_refuses_other_dtypes():
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    array = jax.device_put(jnp.arange(6, dtype=jnp.uint8).reshape(2, 3), pinned)
    assert host_view(array).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="uint8"):
        host_view(jnp.zeros(3, jnp.float32))


def test_to_device_takes_only_whole_allocated_buffers():
    staging = pinned_staging(jax.devices()[0])
    buffer = staging.allocate((4, 2))
    with pytest.raises(ValueError, match="allocate"):
        staging.to_device(np.zeros((4, 2), np.uint8))
    with pytest.raises(ValueError, match="allocate"):
        staging.to_device(buffer[:2])
