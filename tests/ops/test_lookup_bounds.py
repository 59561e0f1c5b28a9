"""Traced input that cannot read outside a buffer or change meaning (every backend)."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from jaxrec.configs import EmbeddingBagConfig, EmbeddingConfig
from jaxrec.modules.embedding_collection import EmbeddingCollection
from jaxrec.ops.lookup import lookup
from jaxrec.ops.plan import build_plan
from jaxrec.ops.spec import LookupSpec
from jaxrec.sparse import KeyedJaggedTensor

BACKENDS = ["xla", "pallas"]


def three_groups():
    """Tables of dims 2, 4, 6 (one group each), 4 rows, features f0, f1, f2."""
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=2 + 2 * i, num_embeddings=4, feature_names=[f"f{i}"]
        )
        for i in range(3)
    ]
    plan = build_plan(tables)
    params = tuple(
        jnp.arange(4 * g.dim, dtype=jnp.float32).reshape(4, g.dim) + 1 for g in plan.groups
    )
    return plan, params


def run(plan, params, ids, lengths, backend, mode, batch_size=1):
    spec = LookupSpec.create(
        plan, plan.feature_names, batch_size=batch_size, bounds_check=mode, backend=backend
    )
    offsets = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.asarray(lengths, jnp.int32))]
    )
    fn = jax.jit(lambda p, i, o: lookup(spec, p, i, o, None))
    if mode == "fatal":
        err, result = jax.jit(checkify.checkify(fn))(params, ids, offsets)
        return err, result
    return None, fn(params, ids, offsets)


def raw_lengths(values):
    """int32 lengths from int64 values, wrapped as a traced int32 running sum would be."""
    return np.asarray(values, np.int64).astype(np.int32)


@pytest.mark.parametrize(
    "backend, lengths, expected_bad",
    [
        ("xla", [1, -1, 2], 1),  # a negative length
        ("pallas", [1, -1, 2], 1),
        ("xla", [1, 1, 9], 1),  # the last bag ends past the capacity
        ("pallas", [1, 1, 9], 1),
        ("xla", [2**31 - 1, 2**31 - 1, 3], 3),  # the running sum wraps int32 back to 1
    ],
)
def test_bad_lengths_read_nothing_outside_and_are_counted(backend, lengths, expected_bad):
    plan, params = three_groups()
    ids = jnp.array([1, 2, 3], jnp.int32)
    _, (out, bad) = run(plan, params, ids, raw_lengths(lengths), backend, "warning")
    assert bool(jnp.all(jnp.isfinite(out)))
    assert int(bad) == expected_bad
    # Good bags look up as usual; bad bags pool to zeros.
    for f, length in enumerate(lengths):
        cols = slice(sum(2 + 2 * k for k in range(f)), sum(2 + 2 * k for k in range(f + 1)))
        if length < 0 or length > 3 or expected_bad == 3:
            np.testing.assert_array_equal(out[0, cols], 0)
    if expected_bad == 1 and lengths[0] == 1:
        np.testing.assert_array_equal(out[0, :2], params[0][1])
    _, (_, ignored) = run(plan, params, ids, raw_lengths(lengths), backend, "ignore")
    assert int(ignored) == 0
    err, _ = run(plan, params, ids, raw_lengths(lengths), backend, "fatal")
    assert err.get() is not None and "bags have a negative length" in err.get()


@pytest.mark.parametrize(
    "backend, group", [("xla", 0), ("xla", 1), ("xla", 2), ("pallas", 0), ("pallas", 2)]
)
def test_a_bad_id_is_counted_in_every_group(backend, group):
    plan, params = three_groups()
    ids = jnp.array([1, 1, 1], jnp.int32).at[group].set(4)
    _, (out, bad) = run(plan, params, ids, [1, 1, 1], backend, "warning")
    assert int(bad) == 1
    err, _ = run(plan, params, ids, [1, 1, 1], backend, "fatal")
    assert err.get() is not None and "outside their tables" in err.get()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_check_none_reads_the_clamped_stacked_row(backend):
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=2, num_embeddings=3, feature_names=[f])
        for n, f in (("a", "fa"), ("b", "fb"))
    ]
    plan = build_plan(tables)  # one group of 6 rows: a = rows 0-2, b = rows 3-5
    table = jnp.arange(12.0).reshape(6, 2)
    ids = jnp.array([4, -7, 9], jnp.int32)  # fa: 4 -> row 4 (b's); fb: -7 -> 0, 9 -> 5
    _, (out, bad) = run(plan, (table,), ids, [1, 2], backend, "none")
    assert int(bad) == 0
    np.testing.assert_array_equal(out[0], np.concatenate([table[4], table[0] + table[5]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_of_capacity_zero(backend):
    plan, params = three_groups()
    _, (out, bad) = run(plan, params, jnp.zeros((0,), jnp.int32), [0, 0, 0], backend, "warning")
    np.testing.assert_array_equal(out, np.zeros((1, 12)))
    assert int(bad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_collection_with_negative_lengths_gives_no_nan_rows(backend):
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=4, feature_names=["f", "g"])
        ],
        backend=backend,
    )
    good = KeyedJaggedTensor(
        keys=["f", "g"], values=jnp.array([1, 2, 3]), lengths=jnp.array([1, 2])
    )
    variables = ec.init(jax.random.key(0), good)

    def apply(values, lengths):
        kjt = KeyedJaggedTensor(keys=["f", "g"], values=values, lengths=lengths)
        return ec.apply(variables, kjt, mutable=["bounds_check"])

    out, state = jax.jit(apply)(jnp.array([1, 2, 3]), jnp.array([-2, 5]))
    for jt in out.values():
        assert bool(jnp.all(jnp.isfinite(jt.values())))
    assert int(state["bounds_check"]["invalid_ids"][0]) == 2


def test_groups_beyond_int32_rows_are_refused_naming_the_group():
    tables = [
        EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=2**30 + 1, feature_names=[n])
        for n in ("x", "y")
    ]
    with pytest.raises(ValueError, match=r"table group 'sum_float32_d4' \(tables \['x', 'y'\]\)"):
        build_plan(tables)


X64_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.experimental import checkify
    from jaxrec.configs import EmbeddingBagConfig
    from jaxrec.modules.embedding_bag_collection import EmbeddingBagCollection
    from jaxrec.sparse import KeyedJaggedTensor

    with jax.enable_x64(True):
        for backend in ("xla", "pallas"):
            for mode in ("warning", "fatal"):
                ebc = EmbeddingBagCollection(
                    tables=[EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4,
                                               feature_names=["f"])],
                    backend=backend, bounds_check_mode=mode)
                kjt = KeyedJaggedTensor(keys=["f"], values=jnp.array([1]),
                                        lengths=jnp.array([1]))
                v = ebc.init(jax.random.key(0), kjt)

                def f(values):
                    kjt = KeyedJaggedTensor(keys=["f"], values=values,
                                            lengths=jnp.array([2], jnp.int64))
                    out, st = ebc.apply(v, kjt, mutable=["bounds_check"])
                    return out.values(), st

                ids = jnp.array([2**32 + 1, 3], jnp.int64)  # would wrap to row 1
                row3 = v["params"]["embedding_bags"]["sum_float32_d2"][3]
                if mode == "warning":
                    out, st = jax.jit(f)(ids)
                    assert int(st["bounds_check"]["invalid_ids"][0]) == 1, st
                    assert jnp.array_equal(out[0], row3), (out, row3)
                else:
                    err, _ = jax.jit(checkify.checkify(f))(ids)
                    assert "outside their tables" in err.get(), err.get()
    print("ok")
    """
)


def test_64_bit_ids_outside_int32_are_bad_ids_not_wrapped():
    result = subprocess.run(
        [sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
