"""Run one lookup per implementation twice, for a profiler to look at.

``ncu --kernel-name regex:jaxrec python -m benchmarks.profile_lookup --op pooled
--shape large`` profiles the Pallas kernels (``jaxrec_pooled_lookup``,
``jaxrec_sequence_lookup``) on a :mod:`jaxrec.bench` shape; ``--impls`` adds the XLA paths.
"""

from __future__ import annotations

import argparse

import jax

from jaxrec import bench


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("pooled", "sequence"), default="pooled")
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="large")
    parser.add_argument("--impls", default="pallas")
    args = parser.parse_args(argv)
    inputs = bench.make_inputs(bench.SHAPES[args.shape], "fp32", weighted=False, seed=0)
    call_args = (inputs.ids[0], inputs.offsets[0], None)
    for impl in args.impls.split(","):
        if args.op == "pooled":
            fn = bench.pooled_fn(inputs, impl, "sum")
        else:
            fn = bench.sequence_fn(inputs, impl)
        jax.block_until_ready(fn(*call_args))  # compile + first run
        jax.block_until_ready(fn(*call_args))  # the profiled run


if __name__ == "__main__":
    main()
