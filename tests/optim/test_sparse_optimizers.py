"""The fused row optimizers against an independent float64 NumPy version of docs/optimizers.md."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from float64_optimizers import ROWWISE_STATE, reference_step, zero_state

from jaxrec.optim import sparse_optimizers as so

NUM_STEPS = 6

# (case id, constructor, its keyword arguments); every hyper-parameter is
# spelled out so the reference below needs no defaults of its own.
CASES = [
    ("sgd", so.exact_sgd, dict(learning_rate=0.1)),
    (
        "sgd_clipped",
        so.exact_sgd,
        dict(learning_rate=0.1, gradient_clipping=True, max_gradient=0.3),
    ),
    ("adagrad", so.exact_adagrad, dict(learning_rate=0.1, eps=1e-8)),
    (
        "rowwise_adagrad",
        so.exact_rowwise_adagrad,
        dict(learning_rate=0.1, eps=1e-8, weight_decay=0.0, weight_decay_mode="NONE", max_norm=0.0),
    ),
    (
        "rowwise_adagrad_l2",
        so.exact_rowwise_adagrad,
        dict(learning_rate=0.1, eps=1e-8, weight_decay=0.2, weight_decay_mode="L2", max_norm=0.0),
    ),
    (
        "rowwise_adagrad_decouple",
        so.exact_rowwise_adagrad,
        dict(
            learning_rate=0.1,
            eps=1e-8,
            weight_decay=0.2,
            weight_decay_mode="DECOUPLE",
            max_norm=0.0,
        ),
    ),
    (
        "rowwise_adagrad_max_norm",
        so.exact_rowwise_adagrad,
        dict(learning_rate=0.3, eps=1e-8, weight_decay=0.0, weight_decay_mode="NONE", max_norm=0.8),
    ),
    (
        "rowwise_adagrad_clipped",
        so.exact_rowwise_adagrad,
        dict(
            learning_rate=0.1,
            eps=1e-8,
            weight_decay=0.1,
            weight_decay_mode="L2",
            max_norm=0.0,
            gradient_clipping=True,
            max_gradient=0.25,
        ),
    ),
    ("adam", so.adam, dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)),
    (
        "adam_wd",
        so.adam,
        dict(learning_rate=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
    ),
    (
        "partial_rowwise_adam",
        so.partial_rowwise_adam,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
    ),
    ("lamb", so.lamb, dict(learning_rate=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)),
    (
        "partial_rowwise_lamb",
        so.partial_rowwise_lamb,
        dict(learning_rate=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
    ),
    (
        "lars_sgd",
        so.lars_sgd,
        dict(learning_rate=0.5, eta=0.01, momentum=0.9, weight_decay=0.1),
    ),
    (
        "lars_sgd_clipped",
        so.lars_sgd,
        dict(
            learning_rate=0.5,
            eta=0.01,
            momentum=0.5,
            weight_decay=0.0,
            gradient_clipping=True,
            max_gradient=0.5,
        ),
    ),
]
CASES_BY_ID = {case_id: (make, kwargs) for case_id, make, kwargs in CASES}


def _random_rows(rng, lead, dim, steps):
    w = rng.normal(0.0, 0.5, size=(*lead, dim))
    grads = [rng.normal(0.0, 1.0, size=(*lead, dim)) for _ in range(steps)]
    return w, grads


def _run(update, w, state, grads, steps_as=jnp.float32):
    w = jnp.asarray(w, jnp.float32)
    state = {k: jnp.asarray(v, jnp.float32) for k, v in state.items()}
    history = []
    for t, g in enumerate(grads, start=1):
        w, state = update(w, state, jnp.asarray(g, jnp.float32), jnp.asarray(t, steps_as))
        history.append((w, state))
    return history


def _run_reference(name, hp, w, state, grads):
    history = []
    for t, g in enumerate(grads, start=1):
        w, state = reference_step(name, hp, w, state, g, t)
        history.append((w, state))
    return history


def _assert_history_close(got, want, rtol=2e-5, atol=2e-6):
    for (w, s), (w_ref, s_ref) in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(w), w_ref, rtol=rtol, atol=atol)
        assert set(s) == set(s_ref)
        for key in s_ref:
            np.testing.assert_allclose(np.asarray(s[key]), s_ref[key], rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# the rules


def _check_against_reference(case_id, lead, wrap, seed=0):
    make, kwargs = CASES_BY_ID[case_id]
    opt = make(**kwargs)
    dim = 6
    rng = np.random.default_rng(seed)
    w, grads = _random_rows(rng, lead, dim, NUM_STEPS)
    state = zero_state(opt.name, lead, dim)
    got = _run(wrap(functools.partial(opt.update, dim=dim)), w, state, grads)
    want = _run_reference(opt.name, kwargs, w, state, grads)
    _assert_history_close(got, want)
    for (new_w, new_s), (_, ref_s) in zip(got, want, strict=True):
        chex.assert_shape(new_w, (*lead, dim))
        chex.assert_type(new_w, jnp.float32)
        for key in ref_s:
            chex.assert_shape(new_s[key], ref_s[key].shape)


# One case per optimizer runs with and without jit on single rows [D] and
# blocks of rows [U, D]; the other settings (decay modes, clipping, max_norm)
# run under jit. The full sweep is marked slow.
ONE_PER_OPTIMIZER = [
    "sgd", "adagrad", "rowwise_adagrad_l2", "adam_wd", "partial_rowwise_adam", "lamb",
    "partial_rowwise_lamb", "lars_sgd",
]  # fmt: skip


class ReferenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*ONE_PER_OPTIMIZER)
    def test_update_matches_float64_reference_on_rows_and_single_row(self, case_id):
        for seed, lead in enumerate([(), (5,)]):
            _check_against_reference(case_id, lead, self.variant, seed)


@pytest.mark.parametrize("case_id", [c[0] for c in CASES if c[0] not in ONE_PER_OPTIMIZER])
def test_update_settings_match_float64_reference(case_id):
    _check_against_reference(case_id, (5,), jax.jit)


@pytest.mark.slow
class ReferenceSweepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(case_id=[case[0] for case in CASES], lead=[(), (7,), (2, 3)])
    def test_update_matches_float64_reference_over_steps(self, case_id, lead):
        _check_against_reference(case_id, lead, self.variant, seed=len(lead))


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
@pytest.mark.parametrize(
    ("dim", "padded"),
    [
        (5, 8),
        pytest.param(6, 16, marks=pytest.mark.slow),
        pytest.param(1, 4, marks=pytest.mark.slow),
    ],
)
def test_zero_padded_lanes_leave_real_lanes_unchanged(case_id, dim, padded):
    make, kwargs = CASES_BY_ID[case_id]
    opt = make(**kwargs)
    rng = np.random.default_rng(2)
    lead = (3,)
    w, grads = _random_rows(rng, lead, dim, 4)
    state = zero_state(opt.name, lead, dim)

    def pad(x):
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - dim)])

    rowwise = ROWWISE_STATE.get(opt.name, set())
    padded_state = {k: v if k in rowwise else pad(v) for k, v in state.items()}
    update = jax.jit(opt.update, static_argnums=4)
    plain = _run(lambda *a: update(*a, dim), w, state, grads)
    wide = _run(lambda *a: update(*a, dim), pad(w), padded_state, [pad(g) for g in grads])
    for (pw, ps), (ww, ws) in zip(plain, wide, strict=True):
        chex.assert_tree_all_finite((ww, ws))
        np.testing.assert_allclose(np.asarray(ww[..., :dim]), np.asarray(pw), rtol=1e-6, atol=1e-7)
        for key in ps:
            got = ws[key] if key in rowwise else ws[key][..., :dim]
            np.testing.assert_allclose(np.asarray(got), np.asarray(ps[key]), rtol=1e-6, atol=1e-7)


def test_decay_modes_differ_and_none_ignores_weight_decay():
    rng = np.random.default_rng(3)
    w, (g,) = _random_rows(rng, (4,), 8, 1)
    results = {}
    for mode in so.WeightDecayMode:
        opt = so.exact_rowwise_adagrad(learning_rate=0.1, weight_decay=0.5, weight_decay_mode=mode)
        update = jax.jit(opt.update, static_argnums=4)
        results[mode.name] = update(jnp.asarray(w), opt.init(4, 8), jnp.asarray(g), 1, 8)[0]
    no_decay = so.exact_rowwise_adagrad(learning_rate=0.1)
    plain = no_decay.update(jnp.asarray(w), no_decay.init(4, 8), jnp.asarray(g), 1, 8)[0]
    chex.assert_trees_all_close(results["NONE"], plain)
    assert not np.allclose(results["L2"], results["DECOUPLE"])
    assert not np.allclose(results["L2"], results["NONE"])


def test_max_norm_bounds_the_updated_row_norm():
    opt = so.exact_rowwise_adagrad(learning_rate=1.0, max_norm=0.5)
    rng = np.random.default_rng(4)
    w, (g,) = _random_rows(rng, (16,), 8, 1)
    new_w, _ = opt.update(jnp.asarray(w) * 4, opt.init(16, 8), jnp.asarray(g), 1, 8)
    norms = np.linalg.norm(np.asarray(new_w), axis=-1)
    assert np.all(norms <= 0.5 * (1 + 1e-6))
    np.testing.assert_allclose(norms, 0.5, rtol=1e-6)  # every row was above the bound


def test_gradient_clipping_clamps_each_element():
    opt = so.exact_sgd(learning_rate=1.0, gradient_clipping=True, max_gradient=0.5)
    g = jnp.array([[-3.0, -0.2, 0.0, 0.4, 9.0]])
    new_w, _ = opt.update(jnp.zeros((1, 5)), {}, g, 1, 5)
    np.testing.assert_allclose(np.asarray(new_w), -np.clip(np.asarray(g), -0.5, 0.5))


@pytest.mark.parametrize("case_id", ["sgd", "rowwise_adagrad_l2", "adam_wd", "lamb", "lars_sgd"])
def test_schedule_learning_rate_is_traced_and_evaluated_at_step_minus_one(case_id):
    make, kwargs = CASES_BY_ID[case_id]
    traces = []
    schedule = optax.linear_schedule(init_value=0.2, end_value=0.01, transition_steps=4)

    def counted(count):
        traces.append(count)
        return schedule(count)

    opt = make(**{**kwargs, "learning_rate": counted})
    rng = np.random.default_rng(5)
    w, grads = _random_rows(rng, (3,), 4, NUM_STEPS)
    state = zero_state(opt.name, (3,), 4)
    update = jax.jit(opt.update, static_argnums=4)
    got = _run(lambda *a: update(*a, 4), w, state, grads)
    assert len(traces) == 1  # one trace for all steps: lr(t - 1) is traced, not baked in
    want = _run_reference(opt.name, {**kwargs, "learning_rate": schedule}, w, state, grads)
    _assert_history_close(got, want)


@pytest.mark.parametrize("case_id", ["adam", "partial_rowwise_lamb"])
def test_int32_and_float32_steps_agree(case_id):
    make, kwargs = CASES_BY_ID[case_id]
    opt = make(**kwargs)
    rng = np.random.default_rng(6)
    w, grads = _random_rows(rng, (2,), 4, 3)
    state = zero_state(opt.name, (2,), 4)
    update = jax.jit(functools.partial(opt.update, dim=4))
    as_float = _run(update, w, state, grads, steps_as=jnp.float32)
    as_int = _run(update, w, state, grads, steps_as=jnp.int32)
    chex.assert_trees_all_close(as_float, as_int)


def test_zero_eps_with_zero_gradient_stays_finite():
    for opt in (
        so.exact_adagrad(eps=0.0),
        so.exact_rowwise_adagrad(eps=0.0),
        so.adam(eps=0.0),
        so.partial_rowwise_lamb(eps=0.0),
        so.lars_sgd(),
    ):
        w = jnp.zeros((2, 4))
        state = opt.init(2, 4)
        new_w, new_state = opt.update(w, state, jnp.zeros((2, 4)), 1, 4)
        chex.assert_tree_all_finite((new_w, new_state))
        chex.assert_trees_all_close(new_w, w)


def test_update_uses_only_elementwise_ops_and_last_axis_reductions():
    allowed = {
        "abs", "add", "broadcast_in_dim", "clamp", "convert_element_type", "div", "eq", "exp",
        "expm1", "ge", "gt", "integer_pow", "le", "lt", "max", "min", "mul", "ne", "neg", "pjit",
        "pow", "reduce_sum", "reshape", "select_n", "sqrt", "squeeze", "sub", "square", "jit",
        "expand_dims", "cos",
    }  # fmt: skip
    schedule = optax.cosine_decay_schedule(0.1, 100)
    for _, make, kwargs in CASES:
        opt = make(**{**kwargs, "learning_rate": schedule})
        for lead in [(), (3,)]:
            w = jnp.zeros((*lead, 8))
            state = {
                k: jnp.zeros(v.shape[1:] if not lead else v.shape)
                for k, v in opt.init(3, 8).items()
            }
            jaxpr = jax.make_jaxpr(lambda w, s, g, t, opt=opt: opt.update(w, s, g, t, 6))(
                w, state, w, jnp.float32(2)
            )
            for eqn in _equations(jaxpr.jaxpr):
                assert eqn.primitive.name in allowed, (opt.name, eqn.primitive.name)
                if eqn.primitive.name == "reduce_sum":
                    assert tuple(eqn.params["axes"]) == (len(lead),), (opt.name, eqn.params)


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


# ----------------------------------------------------------------------------
# construction, state, validation


@pytest.mark.parametrize(
    ("make", "name", "layout"),
    [
        (so.exact_sgd, "EXACT_SGD", {}),
        (so.exact_adagrad, "EXACT_ADAGRAD", {"momentum1": "e"}),
        (so.exact_rowwise_adagrad, "EXACT_ROWWISE_ADAGRAD", {"momentum1": "r"}),
        (so.adam, "ADAM", {"momentum1": "e", "momentum2": "e"}),
        (so.partial_rowwise_adam, "PARTIAL_ROWWISE_ADAM", {"momentum1": "e", "momentum2": "r"}),
        (so.lamb, "LAMB", {"momentum1": "e", "momentum2": "e"}),
        (so.partial_rowwise_lamb, "PARTIAL_ROWWISE_LAMB", {"momentum1": "e", "momentum2": "r"}),
        (so.lars_sgd, "LARS_SGD", {"momentum1": "e"}),
    ],
)
@pytest.mark.parametrize(("num_rows", "dim"), [(0, 1), (5, 3), (11, 16)])
def test_init_builds_float32_zero_state_with_fbgemm_names(make, name, layout, num_rows, dim):
    opt = make()
    assert opt.name == name
    state = opt.init(num_rows, dim)
    assert set(state) == set(layout)
    for key, kind in layout.items():
        chex.assert_shape(state[key], (num_rows,) if kind == "r" else (num_rows, dim))
        chex.assert_type(state[key], jnp.float32)
        assert not np.any(np.asarray(state[key]))


def test_defaults_are_fbgemm_tbe_constructor_defaults():
    # SplitTableBatchedEmbeddingBagsCodegen: learning_rate=0.01, eps=1e-8,
    # momentum=0.9, weight_decay=0.0, weight_decay_mode=NONE, eta=0.001,
    # beta1=0.9, beta2=0.999, max_norm=0.0, stochastic_rounding=True,
    # gradient_clipping=False, max_gradient=1.0.
    fbgemm = dict(
        learning_rate=0.01,
        eps=1e-8,
        momentum=0.9,
        weight_decay=0.0,
        weight_decay_mode=so.WeightDecayMode.NONE,
        eta=0.001,
        beta1=0.9,
        beta2=0.999,
        max_norm=0.0,
        stochastic_rounding=True,
        gradient_clipping=False,
        max_gradient=1.0,
    )
    for make in (
        so.exact_sgd,
        so.exact_adagrad,
        so.exact_rowwise_adagrad,
        so.adam,
        so.partial_rowwise_adam,
        so.lamb,
        so.partial_rowwise_lamb,
        so.lars_sgd,
    ):
        opt = make()
        for key, value in opt.hyperparams.items():
            assert value == fbgemm[key], (opt.name, key)
        assert opt.stochastic_rounding is True


def test_optimizer_is_hashable_and_repr_names_its_settings():
    opt = so.exact_rowwise_adagrad(learning_rate=0.5, weight_decay_mode="decouple")
    assert hash(opt) == hash(opt)
    assert opt.hyperparams["weight_decay_mode"] is so.WeightDecayMode.DECOUPLE
    text = repr(opt)
    assert "EXACT_ROWWISE_ADAGRAD" in text and "learning_rate=0.5" in text
    assert so.exact_rowwise_adagrad(weight_decay_mode=2).hyperparams["weight_decay_mode"] is (
        so.WeightDecayMode.DECOUPLE
    )


@pytest.mark.parametrize(
    ("make", "kwargs", "argument"),
    [
        (so.exact_sgd, dict(learning_rate=-0.1), "learning_rate"),
        (so.exact_sgd, dict(learning_rate=float("nan")), "learning_rate"),
        (so.exact_sgd, dict(learning_rate="fast"), "learning_rate"),
        (so.exact_adagrad, dict(eps=-1e-8), "eps"),
        (so.exact_rowwise_adagrad, dict(weight_decay_mode="L1"), "weight_decay_mode"),
        (so.exact_rowwise_adagrad, dict(weight_decay_mode=7), "weight_decay_mode"),
        (so.exact_rowwise_adagrad, dict(weight_decay=-0.1), "weight_decay"),
        (so.exact_rowwise_adagrad, dict(max_norm=-1.0), "max_norm"),
        (so.adam, dict(beta1=1.0), "beta1"),
        (so.adam, dict(beta2=-0.1), "beta2"),
        (so.partial_rowwise_adam, dict(beta2=1.5), "beta2"),
        (so.lamb, dict(beta1=float("inf")), "beta1"),
        (so.partial_rowwise_lamb, dict(eps=-1.0), "eps"),
        (so.lars_sgd, dict(eta=-0.1), "eta"),
        (so.lars_sgd, dict(momentum=-0.9), "momentum"),
        (so.exact_sgd, dict(gradient_clipping=True, max_gradient=0.0), "max_gradient"),
    ],
)
def test_bad_hyperparameters_raise_naming_argument_and_value(make, kwargs, argument):
    value = kwargs[argument]
    with pytest.raises(ValueError, match=argument) as info:
        make(**kwargs)
    assert repr(value) in str(info.value)


def test_init_accepts_numpy_integers():
    state = so.lamb().init(np.int64(3), np.int32(2))
    chex.assert_shape(state["momentum1"], (3, 2))


def test_init_rejects_bad_sizes():
    opt = so.adam()
    with pytest.raises(ValueError, match="num_rows"):
        opt.init(-1, 4)
    with pytest.raises(ValueError, match="dim"):
        opt.init(4, 0)


def test_update_rejects_inconsistent_shapes():
    opt = so.partial_rowwise_adam()
    state = opt.init(3, 4)
    w = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="dim"):
        opt.update(w, state, w, 1, 5)
    with pytest.raises(ValueError, match="grads"):
        opt.update(w, state, jnp.zeros((3, 2)), 1, 4)
    with pytest.raises(ValueError, match="momentum2"):
        opt.update(w, {**state, "momentum2": jnp.zeros((3, 4))}, w, 1, 4)
