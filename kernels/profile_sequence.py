"""Run the sequence lookup once per implementation, for a profiler to look at.

``ncu --kernel-name regex:sequence|gather python -m jaxrec_kernels.profile_sequence`` profiles
the Pallas kernel (``jaxrec_sequence_lookup``) and XLA's gather on the "large" ids
(32 x 1M x 128, B=8192, bags 0..40), so their memory traffic can be compared.
"""

from __future__ import annotations

import jax

from jaxrec import bench


def main() -> None:
    inputs = bench.make_inputs(bench.SHAPES["large"], "fp32", weighted=False, seed=0)
    args = (inputs.ids[0], inputs.offsets[0], None)
    for impl in ("pallas", "xla-reference"):
        fn = bench.sequence_fn(inputs, impl)
        jax.block_until_ready(fn(*args))  # compile + first run
        jax.block_until_ready(fn(*args))  # the profiled run


if __name__ == "__main__":
    main()
