"""FBGEMM's sparse optimizer rules in float64 NumPy, written from docs/optimizers.md.

The independent reference that the optimizer tests (rule by rule, and end to end through the
collections) compare jaxrec against.
"""

import numpy as np

ELEMENTWISE = {"momentum1": True, "momentum2": True}
ROWWISE_STATE = {
    "EXACT_ROWWISE_ADAGRAD": {"momentum1"},
    "PARTIAL_ROWWISE_ADAM": {"momentum2"},
    "PARTIAL_ROWWISE_LAMB": {"momentum2"},
}


def row_norm(x):
    return np.sqrt(np.sum(x * x, axis=-1))


def reference_step(name, hp, w, state, g, t):
    """One step of optimizer ``name`` in float64 on rows ``[..., D]``."""
    w = np.asarray(w, np.float64)
    g = np.asarray(g, np.float64)
    state = {k: np.asarray(v, np.float64) for k, v in state.items()}
    lr = hp["learning_rate"]
    lr = float(lr(t - 1)) if callable(lr) else lr
    if hp.get("gradient_clipping", False):
        g = np.clip(g, -hp["max_gradient"], hp["max_gradient"])
    if name == "EXACT_SGD":
        return w - lr * g, {}
    if name == "EXACT_ADAGRAD":
        s = state["momentum1"] + g * g
        return w - lr * g / (np.sqrt(s) + hp["eps"]), {"momentum1": s}
    if name == "EXACT_ROWWISE_ADAGRAD":
        wd, mode = hp["weight_decay"], hp["weight_decay_mode"]
        g_for_state = g + wd * w if mode == "L2" else g
        s = state["momentum1"] + np.mean(g_for_state**2, axis=-1)
        m = (lr / (np.sqrt(s) + hp["eps"]))[..., None]
        if mode == "L2":
            new_w = (1 - m * wd) * w - m * g
        elif mode == "DECOUPLE":
            new_w = (1 - lr * wd) * w - m * g
        else:
            new_w = w - m * g
        if hp["max_norm"] > 0:
            n = row_norm(new_w)[..., None]
            new_w = np.where(n > hp["max_norm"], new_w * hp["max_norm"] / n, new_w)
        return new_w, {"momentum1": s}
    if name in ("ADAM", "PARTIAL_ROWWISE_ADAM", "LAMB", "PARTIAL_ROWWISE_LAMB"):
        b1, b2, eps, wd = hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
        m1 = b1 * state["momentum1"] + (1 - b1) * g
        if name.startswith("PARTIAL"):
            m2 = b2 * state["momentum2"] + (1 - b2) * np.mean(g * g, axis=-1)
            v_hat = (m2 / (1 - b2**t))[..., None]
        else:
            m2 = b2 * state["momentum2"] + (1 - b2) * g * g
            v_hat = m2 / (1 - b2**t)
        r = m1 / (1 - b1**t) / (np.sqrt(v_hat) + eps) + wd * w
        if name.endswith("LAMB"):
            new_w = w - lr * (row_norm(w) / row_norm(r))[..., None] * r
        else:
            new_w = w - lr * r
        return new_w, {"momentum1": m1, "momentum2": m2}
    if name == "LARS_SGD":
        eta, mom, wd = hp["eta"], hp["momentum"], hp["weight_decay"]
        a = lr * eta * row_norm(w) / (row_norm(g) + wd * row_norm(w))
        m1 = mom * state["momentum1"] + a[..., None] * (g + wd * w)
        return w - m1, {"momentum1": m1}
    raise AssertionError(name)


def zero_state(name, lead, dim):
    keys = {
        "EXACT_SGD": [],
        "EXACT_ADAGRAD": ["momentum1"],
        "EXACT_ROWWISE_ADAGRAD": ["momentum1"],
        "LARS_SGD": ["momentum1"],
    }.get(name, ["momentum1", "momentum2"])
    rowwise = ROWWISE_STATE.get(name, set())
    return {k: np.zeros(lead if k in rowwise else (*lead, dim)) for k in keys}
