"""Page-locked host buffers for the cache's row moves, from JAX alone.

A copy between the device and pageable host memory runs at a few GB/s (the driver bounces
it through a page-locked buffer of its own); from page-locked memory it runs at the link's
speed. JAX allocates page-locked memory as arrays of memory kind ``pinned_host``, but its
arrays are immutable: putting NumPy data into one is itself a host copy at pageable speed,
which spends what the faster link saves. :class:`PinnedStaging` therefore allocates each
``pinned_host`` array once and hands out a writable NumPy view of its bytes
(:func:`host_view`), so the host gathers the missing rows straight into page-locked memory
and one ``device_put`` moves them on. The same view reads evicted rows that the device
wrote into a ``pinned_host`` array.

Writing into an array that JAX considers immutable is safe only while JAX holds no other
reader of it: the buffer is refilled only after the copy from it has finished, and it is
never donated or used as a computation's input. :func:`pinned_staging` checks once, on
the device, that the view really is the buffer the copy reads (and that the copy does not
alias it); where it is not, it returns ``None`` and callers stage in NumPy memory.

>>> import jax, numpy as np
>>> staging = pinned_staging(jax.devices()[0])
>>> buffer = staging.allocate((2, 4))
>>> buffer[:] = np.arange(8, dtype=np.uint8).reshape(2, 4)
>>> staging.to_device(buffer).tolist()
[[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import ctypes
from typing import Any

import jax
import numpy as np

__all__ = ["PinnedStaging", "host_view", "pinned_staging"]


def host_view(array: jax.Array) -> np.ndarray:
    """A writable NumPy view of the bytes of a single-device host-memory ``array`` (uint8,
    same shape), once the array is ready. The view is valid while ``array`` lives; keep a
    reference to it."""
    if array.dtype != np.uint8 or len(array.addressable_shards) != 1:
        raise ValueError(
            f"host_view needs a single-device uint8 array, got {array.dtype} on "
            f"{len(array.addressable_shards)} devices"
        )
    pointer = jax.block_until_ready(array).addressable_data(0).unsafe_buffer_pointer()
    raw = (ctypes.c_uint8 * max(array.size, 1)).from_address(pointer)
    return np.frombuffer(raw, np.uint8, count=array.size).reshape(array.shape)


class PinnedStaging:
    """``pinned_host`` buffers written in place and copied to ``device`` (module docstring).

    :meth:`allocate` returns a writable NumPy array backed by page-locked memory;
    :meth:`to_device` copies (a prefix of) such an array to the device and waits for it.
    """

    def __init__(self, device: jax.Device):
        self.device = device
        self.host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        self.target = jax.sharding.SingleDeviceSharding(device)
        self._owners: dict[int, jax.Array] = {}  # address of a view -> its pinned array

    def allocate(self, shape: tuple[int, ...]) -> np.ndarray:
        """A writable uint8 array of ``shape`` in page-locked memory (contents undefined)."""
        array = jax.device_put(np.zeros(shape, np.uint8), self.host)
        view = host_view(jax.block_until_ready(array))
        self._owners[view.__array_interface__["data"][0]] = array
        return view

    def release(self, view: np.ndarray) -> None:
        """Drop the pinned array behind ``view`` (the view must not be used afterwards)."""
        self._owners.pop(view.__array_interface__["data"][0], None)

    def to_device(self, view: np.ndarray, sharding: Any = None) -> jax.Array:
        """Copy an array from :meth:`allocate` (whole) to the device, waited for, so the
        buffer may be refilled afterwards."""
        array = self._owners.get(view.__array_interface__["data"][0])
        if array is None or array.shape != view.shape:
            raise ValueError("to_device takes a whole array returned by allocate()")
        return jax.block_until_ready(jax.device_put(array, sharding or self.target))


def pinned_staging(device: jax.Device) -> PinnedStaging | None:
    """:class:`PinnedStaging` for ``device``, or ``None`` where in-place ``pinned_host``
    staging does not hold (no such memory, or the copy does not read the view's bytes)."""
    kinds = {memory.kind for memory in device.addressable_memories()}
    if "pinned_host" not in kinds:
        return None
    try:
        staging = PinnedStaging(device)
        view = staging.allocate((4, 64))
        pattern = np.arange(256, dtype=np.uint8).reshape(4, 64)
        view[:] = pattern
        moved = staging.to_device(view)
        view[:] = 0  # a copy that aliased the view would change with it
        same = np.array_equal(np.asarray(moved), pattern)
        back = jax.block_until_ready(jax.device_put(moved, staging.host))  # and the way back
        same = same and np.array_equal(host_view(back), pattern)
        staging.release(view)
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return None
    return staging if same else None
