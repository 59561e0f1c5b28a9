"""Small Pallas helpers shared by the lookup kernels.

The Triton flavour of Pallas is spelled the same way on jax 0.10 and 0.11
(``plgpu.load(ref.at[idx], mask=..., other=...)``, ``plgpu.CompilerParams``);
this module keeps those spellings in one place, so a later API move is a
one-file change, and holds the block-shape arithmetic the kernels share.

>>> next_power_of_2(24), next_power_of_2(128), next_power_of_2(1)
(32, 128, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def next_power_of_2(n: int) -> int:
    """The smallest power of two that is at least ``n`` (Triton block sizes must be one)."""
    if n < 1:
        raise ValueError(f"next_power_of_2 needs n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    """Triton compiler parameters for ``pallas_call(compiler_params=...)``."""
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def masked_load(
    ref_view,
    mask: jax.Array,
    other=0,
    *,
    eviction_policy: str | None = None,
) -> jax.Array:
    """Load ``ref_view`` (a ``ref.at[...]`` view, gathers allowed) where ``mask`` holds.

    Lanes where ``mask`` is false read nothing and yield ``other``. ``eviction_policy`` is
    Triton's L2 hint ("evict_first", "evict_last"; ignored in interpret mode).
    """
    return plgpu.load(
        ref_view,
        mask=mask,
        other=other,
        eviction_policy=eviction_policy,
    )


def masked_store(
    ref_view, value: jax.Array, mask: jax.Array, *, eviction_policy: str | None = None
) -> None:
    """Store ``value`` into ``ref_view`` (scatters allowed) where ``mask`` holds.

    ``eviction_policy`` is Triton's L2 hint, as in :func:`masked_load`.
    """
    plgpu.store(ref_view, value, mask=mask, eviction_policy=eviction_policy)


def check_launch_shape(
    config: Any, powers_of_two: Sequence[str], at_least_one: Sequence[str] = ()
) -> None:
    """Refuse a launch-shape field of ``config`` that is not an int >= 1, or not a power of
    two where Triton needs one; the ValueError names ``Class.field`` and the value.

    >>> from typing import NamedTuple
    >>> class Launch(NamedTuple):
    ...     block: int
    ...     stages: int
    >>> check_launch_shape(Launch(block=3, stages=1), ("block",), ("stages",))
    Traceback (most recent call last):
    ValueError: Launch.block must be a power of two, got 3
    """
    name = type(config).__name__
    for field in (*powers_of_two, *at_least_one):
        v = getattr(config, field)
        if not isinstance(v, int) or v < 1 or (field in powers_of_two and v & (v - 1)):
            rule = "a power of two" if field in powers_of_two else ">= 1"
            raise ValueError(f"{name}.{field} must be {rule}, got {v!r}")


def float_dtype(dtype) -> jnp.dtype:
    """``dtype`` as a numpy dtype, checked to be one of the table dtypes (fp32, fp16, bf16)."""
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dt}")
    return dt
