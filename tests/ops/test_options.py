"""LookupOptions: checked once, frozen, and the keyword arguments of LookupSpec.create."""

import jax.numpy as jnp
import pytest

from jaxrec.configs import EmbeddingBagConfig
from jaxrec.ops import BoundsCheckMode, LookupSpec, build_plan
from jaxrec.ops.options import LookupOptions


def test_bounds_mode_is_normalised_and_options_are_hashable():
    a = LookupOptions(bounds_check_mode="FATAL")
    b = LookupOptions(bounds_check_mode=BoundsCheckMode.FATAL)
    assert a == b and hash(a) == hash(b)
    assert a.bounds_check_mode is BoundsCheckMode.FATAL
    with pytest.raises(AttributeError):
        a.backend = "xla"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(backend="cuda"), "backend"),
        (dict(bounds_check_mode="loud"), "bounds_check_mode"),
        (dict(data_parallel_axis="d", row_shard_axis="r"), "cannot be combined"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LookupOptions(**kwargs)


def test_spec_arguments_make_the_spec_the_separate_arguments_make():
    plan = build_plan([EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3)])
    options = LookupOptions(backend="xla", bounds_check_mode="ignore", output_dtype=jnp.bfloat16)
    got = LookupSpec.create(plan, ("t",), batch_size=2, **options.spec_arguments())
    want = LookupSpec.create(
        plan, ("t",), batch_size=2, bounds_check="ignore", backend="xla", out_dtype=jnp.bfloat16
    )
    assert got == want
