"""The output distribution's backward (the gradient distribution): it moves the gradients
back as the forward moves the outputs (gathers and one all-to-all of the same bytes), with
no scatter, and it is the exact transpose."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrec.configs import EmbeddingBagConfig, PoolingType
from jaxrec.parallel import ShardedLayout, ShardedLookupSpec
from jaxrec.parallel.sharded_lookup import distribute_output
from jaxrec.parallel.types import ShardingPlan, column_wise, data_parallel, row_wise, table_wise

N, B = 2, 3
KEYS = ("fa", "fb", "fc", "fd")
TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=9, feature_names=["fa"]),
    EmbeddingBagConfig(
        name="b", embedding_dim=4, num_embeddings=8, feature_names=["fb"], pooling=PoolingType.MEAN
    ),
    EmbeddingBagConfig(name="c", embedding_dim=6, num_embeddings=5, feature_names=["fc"]),
    EmbeddingBagConfig(name="d", embedding_dim=2, num_embeddings=5, feature_names=["fd"]),
]
PLAN = {"a": table_wise(1), "b": row_wise(), "c": column_wise([0, 1]), "d": data_parallel()}


def _ops(compiled_text: str) -> list[tuple[str, str]]:
    """(result shape, opcode) of every instruction of a compiled HLO module."""
    return re.findall(r"= (\S+(?: \S+)*?) ([a-z][\w-]*)\(", compiled_text)


def _all_to_all_shapes(compiled_text: str) -> list[str]:
    return sorted(shape for shape, op in _ops(compiled_text) if op == "all-to-all")


@pytest.mark.skipif(len(jax.devices()) < N, reason="needs 2 (forced host) devices")
@pytest.mark.parametrize("plan", [PLAN, {name: table_wise(i % N) for i, name in enumerate("abcd")}])
def test_gradient_distribution_gathers_like_its_forward_and_is_the_exact_transpose(plan):
    layout = ShardedLayout.create(TABLES, ShardingPlan(plan), N)
    spec = ShardedLookupSpec.create(layout, KEYS, batch_size=B, axis="x", backend="xla")
    mesh = Mesh(np.array(jax.devices()[:N]), ("x",))
    width = layout.local_plan.num_columns
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4, (N, len(KEYS) * B))
    offsets = np.concatenate([np.zeros((N, 1), int), np.cumsum(lengths, axis=1)], axis=1)
    offsets = jnp.asarray(offsets.reshape(-1).astype(np.int32))
    dp_width = layout.dp_plan.num_columns if layout.dp_plan else 0
    owner = jnp.asarray(rng.normal(size=(N * B, width)), jnp.float32)
    dp = jnp.asarray(rng.normal(size=(N * B, dp_width)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(N * B, layout.single_plan.num_columns)), jnp.float32)

    def forward(x, d, o):
        return distribute_output(spec, x, o, d if dp_width else None)

    def backward(g, x, d, o):
        return jax.vjp(lambda x, d: forward(x, d, o), x, d)[1](g)

    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    bwd = jax.jit(smap(backward, in_specs=(P("x"),) * 4, out_specs=(P("x"), P("x"))))
    fwd = jax.jit(smap(forward, in_specs=(P("x"),) * 3, out_specs=P("x")))
    bwd_text = bwd.lower(g, owner, dp, offsets).compile().as_text()
    fwd_text = fwd.lower(owner, dp, offsets).compile().as_text()
    assert not [op for _, op in _ops(bwd_text) if "scatter" in op]
    assert [op for _, op in _ops(bwd_text) if op == "gather"]
    # the same collectives on buffers of the same shapes (bytes) as the forward's
    assert _all_to_all_shapes(bwd_text) == _all_to_all_shapes(fwd_text)
    assert _all_to_all_shapes(fwd_text) or not layout.groups
    # <g, forward(x, d)> == <backward(g), (x, d)>: the backward is the exact transpose
    gx, gd = bwd(g, owner, dp, offsets)
    lhs = jnp.vdot(g, fwd(owner, dp, offsets))
    rhs = jnp.vdot(gx, owner) + jnp.vdot(gd, dp)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def _collective_types(jaxpr) -> set[str]:
    """Dtypes of every all-to-all and reduce-scatter operand in a jaxpr and its sub-jaxprs
    (the traced program: XLA's CPU compiler widens bfloat16 collectives afterwards)."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("all_to_all", "reduce_scatter"):
            found |= {str(v.aval.dtype) for v in eqn.invars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _collective_types(inner)
    return found


@pytest.mark.skipif(len(jax.devices()) < N, reason="needs 2 (forced host) devices")
@pytest.mark.parametrize("comm_dtype", ["bfloat16", "float16"])
def test_16_bit_communication_sends_outputs_and_gradients_in_16_bits(comm_dtype):
    """comm_dtype: the all-to-alls and reduce-scatters of both directions carry 16-bit
    values; the output stays float32 and matches the float32 distribution to 16-bit
    rounding (and is not identical to it: the rounding happened)."""
    layout = ShardedLayout.create(TABLES, ShardingPlan(PLAN), N)
    specs = {
        dtype: ShardedLookupSpec.create(
            layout, KEYS, batch_size=B, axis="x", backend="xla", comm_dtype=dtype
        )
        for dtype in (None, comm_dtype)
    }
    mesh = Mesh(np.array(jax.devices()[:N]), ("x",))
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 4, (N, len(KEYS) * B))
    offsets = np.concatenate([np.zeros((N, 1), int), np.cumsum(lengths, axis=1)], axis=1)
    offsets = jnp.asarray(offsets.reshape(-1).astype(np.int32))
    owner = jnp.asarray(rng.normal(size=(N * B, layout.local_plan.num_columns)), jnp.float32)
    dp = jnp.asarray(rng.normal(size=(N * B, layout.dp_plan.num_columns)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(N * B, layout.single_plan.num_columns)), jnp.float32)
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    results = {}
    for dtype, spec in specs.items():

        def forward(x, d, o, spec=spec):
            return distribute_output(spec, x, o, d)

        def both(g, x, d, o, forward=forward):
            out, vjp = jax.vjp(lambda x: forward(x, d, o), x)
            return out, vjp(g)[0]

        run = jax.jit(smap(both, in_specs=(P("x"),) * 4, out_specs=(P("x"), P("x"))))
        jaxpr = jax.make_jaxpr(run)(g, owner, dp, offsets).jaxpr
        results[dtype] = (*run(g, owner, dp, offsets), _collective_types(jaxpr))
    out32, grad32, types32 = results[None]
    out16, grad16, types16 = results[comm_dtype]
    assert types32 == {"float32"} and types16 == {comm_dtype}
    assert out16.dtype == jnp.float32 and grad16.dtype == jnp.float32
    tol = 2.0**-7 if comm_dtype == "bfloat16" else 2.0**-10
    for got, want in ((out16, out32), (grad16, grad32)):
        err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
        assert 0 < err < tol


def test_an_unknown_comm_dtype_is_refused():
    layout = ShardedLayout.create(TABLES, ShardingPlan(PLAN), N)
    with pytest.raises(ValueError, match=r"comm_dtype must be None or one of \['bfloat16', "):
        ShardedLookupSpec.create(layout, KEYS, batch_size=B, axis="x", comm_dtype="int8")
