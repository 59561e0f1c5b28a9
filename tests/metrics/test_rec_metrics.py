"""Windowed and lifetime RecMetrics against scikit-learn, NumPy and TorchRec's modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, ndcg_score, roc_auc_score

from jaxrec import metrics

B, STEPS, WINDOW = 16, 7, 3


def batches(seed=0, ties=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        p = rng.random(B).astype(np.float32)
        if ties:
            p = (np.round(p * 4) + 0.5) / 5  # 5 distinct values in (0, 1)
        y = (rng.random(B) < p).astype(np.float32)
        w = (rng.random(B) + 0.5).astype(np.float32)
        w[-3:] = 0.0  # batch padding
        out.append((p, y, w))
    return out


def run(metric, data, jit=True):
    state = metric.init(B)
    update = jax.jit(metric.update) if jit else metric.update
    for p, y, w in data:
        state = update(state, jnp.asarray(p), jnp.asarray(y), jnp.asarray(w))
    return {k: float(v) for k, v in metric.compute(state).items()}


def ne_reference(p, y, w):
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    ce = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum()
    mean = (w * y).sum() / w.sum()
    return ce / (-(w * y).sum() * np.log(mean) - (w * (1 - y)).sum() * np.log(1 - mean))


REFERENCES = {
    "ne": (metrics.ne, ne_reference),
    "log_loss": (metrics.log_loss, lambda p, y, w: log_loss(y, p, sample_weight=w)),
    "calibration": (metrics.calibration, lambda p, y, w: (w * p).sum() / (w * y).sum()),
    "accuracy": (
        metrics.accuracy,
        lambda p, y, w: accuracy_score(y, p >= 0.5, sample_weight=w),
    ),
    "mse": (metrics.mse, lambda p, y, w: mean_squared_error(y, p, sample_weight=w)),
    "auc": (metrics.auc, lambda p, y, w: roc_auc_score(y, p, sample_weight=w)),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_window_and_lifetime_equal_the_reference_on_the_same_examples(name):
    make, reference = REFERENCES[name]
    data = batches(ties=True)
    metric = (
        make(window_batches=WINDOW, lifetime_capacity=B * STEPS) if name == "auc" else make(WINDOW)
    )
    got = run(metric, data)
    lifetime = [np.concatenate(x) for x in zip(*data, strict=True)]
    window = [np.concatenate(x) for x in zip(*data[-WINDOW:], strict=True)]
    np.testing.assert_allclose(got[f"lifetime_{name}"], reference(*lifetime), rtol=2e-5)
    np.testing.assert_allclose(got[f"window_{name}"], reference(*window), rtol=2e-5)
    assert got[f"window_{name}"] != pytest.approx(got[f"lifetime_{name}"], rel=1e-3)


def test_lifetime_auc_is_nan_past_its_capacity_and_absent_without_one():
    data = batches()
    assert np.isnan(run(metrics.auc(WINDOW, lifetime_capacity=B * STEPS - 1), data)["lifetime_auc"])
    assert set(run(metrics.auc(WINDOW), data)) == {"window_auc"}


def test_metrics_update_inside_a_jitted_scan():
    metric = metrics.combine(metrics.ne(WINDOW), metrics.auc(WINDOW), metrics.mse(WINDOW))
    data = batches(seed=3)
    p, y, w = (jnp.asarray(np.stack(x)) for x in zip(*data, strict=True))

    @jax.jit
    def fold(p, y, w):
        def body(state, batch):
            return metric.update(state, *batch), None

        return jax.lax.scan(body, metric.init(B), (p, y, w))[0]

    got = {k: float(v) for k, v in metric.compute(fold(p, y, w)).items()}
    want = run(metric, data, jit=False)
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)


def test_retrieval_metrics_window_and_lifetime():
    rng = np.random.default_rng(0)
    data = []
    for _ in range(STEPS):
        scores = rng.integers(0, 6, (B, 12)).astype(np.float32)
        labels = (rng.random((B, 12)) < 0.2).astype(np.float32)
        labels[:, 0] = 1.0
        data.append((scores, labels, np.ones(B, np.float32)))
    got = run(metrics.ndcg_at_k(5, window_batches=WINDOW), data)
    lifetime = ndcg_score(
        np.concatenate([d[1] for d in data]), np.concatenate([d[0] for d in data]), k=5
    )
    window = ndcg_score(
        np.concatenate([d[1] for d in data[-WINDOW:]]),
        np.concatenate([d[0] for d in data[-WINDOW:]]),
        k=5,
    )
    np.testing.assert_allclose(
        [got["lifetime_ndcg@5"], got["window_ndcg@5"]], [lifetime, window], rtol=1e-5
    )
    recall = run(metrics.recall_at_k(3, window_batches=WINDOW), data)
    assert set(recall) == {"window_recall@3", "lifetime_recall@3"}
    assert 0.0 < recall["lifetime_recall@3"] < 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window_batches"):
        metrics.ne(window_batches=0)
    with pytest.raises(ValueError, match="lifetime_capacity"):
        metrics.auc(lifetime_capacity=-1)
    with pytest.raises(ValueError, match="batch size"):
        metrics.auc().update(metrics.auc().init(4), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="weights must be"):
        metrics.mse().update(metrics.mse().init(), jnp.zeros(3), jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="k must be"):
        metrics.recall_at_k(0)
    with pytest.raises(ValueError, match="at least one"):
        metrics.combine()


TORCHREC = {"ne": "NEMetric", "calibration": "CalibrationMetric", "accuracy": "AccuracyMetric", "mse": "MSEMetric", "auc": "AUCMetric"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TORCHREC))
def test_equal_to_torchrec_metric_modules(name):
    torch = pytest.importorskip("torch")
    module = pytest.importorskip(f"torchrec.metrics.{name}")
    from torchrec.metrics.metrics_config import RecTaskInfo

    task = RecTaskInfo(name="t", label_name="l", prediction_name="p", weight_name="w")
    theirs = getattr(module, TORCHREC[name])(
        world_size=1, my_rank=0, batch_size=B, tasks=[task], window_size=WINDOW * B
    )
    data = batches(seed=7)  # no ties: TorchRec's AUC breaks them by sort order
    for p, y, w in data:
        theirs.update(
            predictions={"t": torch.from_numpy(p)},
            labels={"t": torch.from_numpy(y)},
            weights={"t": torch.from_numpy(w)},
        )
    reported = {k.split("|")[1]: float(v) for k, v in theirs.compute().items()}
    ours = run(REFERENCES[name][0](WINDOW), data)
    for key in (f"window_{name}", f"lifetime_{name}"):
        if key in reported:
            np.testing.assert_allclose(ours[key], reported[key], rtol=2e-5, err_msg=key)
    assert f"window_{name}" in reported


def test_certain_predictions_are_clamped_not_infinite():
    p = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    y = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    w = np.ones(4, np.float32)
    got = run(metrics.ne(1), [(p, y, w)], jit=False)["lifetime_ne"]
    np.testing.assert_allclose(got, ne_reference(p, y, w), rtol=1e-5)
    assert np.isfinite(got)
