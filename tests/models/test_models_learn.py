"""Each model learns on the synthetic clicks within a few seconds of CPU."""

import jax
import numpy as np
import optax
import pytest

from jaxrec import optim
from jaxrec.configs import EmbeddingBagConfig, PoolingType
from jaxrec.data.batching import make_batch
from jaxrec.data.synthetic import SyntheticClickData
from jaxrec.metrics import functional
from jaxrec.models import DCN, DLRM, LowRankCrossNet, TwoTower, in_batch_scores
from jaxrec.train.models import loss_and_outputs, make_train_step

DATA = SyntheticClickData(num_features=4, num_rows=50, num_dense=4, seed=1)
TABLES = [
    EmbeddingBagConfig(
        name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"],
        pooling=PoolingType.MEAN,
    )
    for i in range(4)
]  # fmt: skip
SPARSE = optim.exact_rowwise_adagrad(learning_rate=0.1)


def train(model, steps=60, batch_size=256):
    first = DATA.batch(batch_size, 0)
    params = model.init(jax.random.key(0), first.dense, first.sparse)["params"]
    tx = optim.fused(optax.adam(1e-2))
    opt_state = tx.init(params)
    step = make_train_step(model, tx)
    losses = []
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, DATA.batch(batch_size, i))
        losses.append(float(loss))
    return params, losses


@pytest.mark.parametrize(
    "model",
    [
        DLRM(tables=TABLES, bottom_mlp=(16, 8), top_mlp=(16, 1), optimizer=SPARSE),
        DCN(tables=TABLES, bottom_mlp=(16, 8), top_mlp=(16, 1), low_rank=4, optimizer=SPARSE),
    ],
    ids=["dlrm", "dcn"],
)
def test_click_models_learn_a_held_out_auc_well_above_chance(model):
    params, losses = train(model)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03
    held_out = [DATA.batch(512, 10_000 + j) for j in range(2)]
    logits = np.concatenate([np.asarray(model.apply({"params": params}, b.dense, b.sparse))
                             for b in held_out])  # fmt: skip
    labels = np.concatenate([np.asarray(b.labels) for b in held_out])
    planted = np.concatenate([DATA.planted_logits(512, 10_000 + j) for j in range(2)])
    learned = float(functional.auc(logits, labels))
    best = float(functional.auc(planted, labels))
    assert learned > 0.7 and learned > best - 0.1, (learned, best)


def pairs(index, batch_size=128, rows=50):
    """Retrieval pairs: query id q's relevant candidate is PAIR[q]; every example positive."""
    rng = np.random.default_rng(index)
    query = rng.integers(0, rows, batch_size)
    ones = np.ones(batch_size, np.int32)
    return make_batch(
        ["q", "c"], [ones, ones], [query, PAIR[query]], np.zeros((batch_size, 0)),
        np.ones(batch_size), batch_size=batch_size,
    )  # fmt: skip


PAIR = np.random.default_rng(7).permutation(50)


def test_two_tower_in_batch_softmax_loss_falls_and_recall_beats_chance():
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=50, feature_names=[f])
        for f in ("q", "c")
    ]
    model = TwoTower(tables=tables, query_features=("q",), candidate_features=("c",),
                     tower_mlp=(16, 8), optimizer=SPARSE)  # fmt: skip
    first = pairs(0)
    params = model.init(jax.random.key(0), first.dense, first.sparse)["params"]
    tx = optim.fused(optax.adam(1e-2))
    opt_state = tx.init(params)
    step = make_train_step(model, tx)
    losses = []
    for i in range(150):
        params, opt_state, loss = step(params, opt_state, pairs(i))
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5
    batch = pairs(10_000)
    _, (q, c) = loss_and_outputs(model, params, batch)
    scores, relevance = in_batch_scores(q, c, batch.labels, batch.weights)
    recall = float(np.asarray(functional.recall_at_k(scores, relevance, k=10)).mean())
    # Chance is about k / (distinct candidates in the batch) < 0.3; duplicates of a pair tie.
    assert recall > 0.6, recall


def test_low_rank_cross_net_is_torchrecs_formula():
    net = LowRankCrossNet(num_layers=2, low_rank=3)
    x0 = jax.random.normal(jax.random.key(1), (4, 6))
    variables = net.init(jax.random.key(0), x0)
    p = variables["params"]
    x = np.asarray(x0, np.float64)
    expected = x
    for layer in range(2):
        v, w, b = (np.asarray(p[f"{n}_{layer}"], np.float64) for n in ("V", "W", "bias"))
        expected = x * (expected @ v @ w + b) + expected
    np.testing.assert_allclose(net.apply(variables, x0), expected, rtol=1e-5, atol=1e-5)


def test_two_tower_refuses_features_outside_or_in_both_towers():
    batch = DATA.batch(4, 0)
    model = TwoTower(tables=TABLES, query_features=("f0", "f1"), candidate_features=("f1", "f2"))
    with pytest.raises(ValueError, match="must split the tables' features"):
        model.init(jax.random.key(0), batch.dense, batch.sparse)


def test_dcn_refuses_a_bottom_mlp_that_does_not_end_in_the_embedding_dim():
    batch = DATA.batch(4, 0)
    with pytest.raises(ValueError, match="DCN needs one embedding_dim"):
        DCN(tables=TABLES, bottom_mlp=(16, 4)).init(jax.random.key(0), batch.dense, batch.sparse)
