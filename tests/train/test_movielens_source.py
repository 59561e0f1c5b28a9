"""The MovieLens source with the user-history bag: its table, pooling and two-tower side."""

import numpy as np
import pytest

from jaxrec.configs import PoolingType
from jaxrec.train import TrainConfig, make_source


def test_user_history_adds_a_mean_pooled_item_sized_table_on_the_query_side():
    pytest.importorskip("recbole.dataset_example", reason="recbole wheel not installed")
    source = make_source(TrainConfig.for_data("movielens", user_history=True, batch_size=64))
    tables = {t.name: t for t in source.tables(source.config)}
    assert tables["t_history"].num_embeddings == tables["t_item"].num_embeddings == 1682
    assert tables["t_history"].pooling == PoolingType.MEAN
    assert tables["t_item"].pooling == PoolingType.SUM
    assert "history" in source.query_features
    batch = source.train_batch(0)
    lengths = np.asarray(batch.sparse["history"].lengths())
    rated = np.bincount(source.train.user, minlength=943)
    rows = source._order(0)[:64]
    np.testing.assert_array_equal(lengths, rated[source.train.user[rows]] - 1)
    plain = make_source(TrainConfig.for_data("movielens", batch_size=64))
    assert "t_history" not in {t.name for t in plain.tables(plain.config)}
