"""MovieLens-100K: both file layouts, the click label, features, splits and batches."""

import dataclasses

import numpy as np
import pytest

from jaxrec.data.movielens import (
    FEATURES,
    GENRES,
    add_rating_statistics,
    add_user_history,
    load_movielens_100k,
)

# (user, item, rating, timestamp)
RATINGS = [(1, 10, 5, 300), (2, 10, 3, 100), (1, 20, 4, 200), (3, 30, 1, 400), (2, 30, 4, 500)]
# (user, age, gender, occupation, zip)
USERS = [(1, 24, "M", "technician", "85711"), (2, 53, "F", "other", "94043"),
         (3, 17, "M", "student", "T8H1N")]  # fmt: skip
# (item, title, year, genres)
ITEMS = [(10, "A", 1995, ["Animation", "Children's", "Comedy"]), (20, "B", None, ["Drama"]),
         (30, "C", 1977, ["Sci-Fi"])]  # fmt: skip


def write_grouplens(folder):
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (folder / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in USERS))
    lines = []
    for item, title, year, genres in ITEMS:
        date = f"01-Jan-{year}" if year else ""
        flags = ["1" if g in genres else "0" for g in GENRES]
        lines.append("|".join([str(item), title, date, "", "http://x", *flags]))
    (folder / "u.item").write_text("\n".join(lines) + "\n")


def write_recbole(folder):
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
    )
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join("\t".join(map(str, u)) + "\n" for u in USERS)
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{t}\t{y or 'unknown'}\t{' '.join(g)}\n" for i, t, y, g in ITEMS)
    )


@pytest.fixture(params=["grouplens", "recbole"])
def data(request, tmp_path):
    (write_grouplens if request.param == "grouplens" else write_recbole)(tmp_path)
    return load_movielens_100k(tmp_path)


def _rows_by_key(batch):
    """{key: list of per-example id lists} of a batch's real examples."""
    kjt, n = batch.sparse, int(np.sum(batch.weights))
    lengths = np.asarray(kjt.lengths()).reshape(len(kjt.keys()), -1)
    values = np.asarray(kjt.values())
    out, start = {}, 0
    for key, row in zip(kjt.keys(), lengths, strict=True):
        bags = []
        for length in row:
            bags.append(values[start : start + length].tolist())
            start += length
        out[key] = bags[:n]
    return out


def test_both_layouts_give_the_same_examples_and_features(data):
    assert len(data) == 5
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 0, 1])
    assert data.num_embeddings == {
        "user": 3, "item": 3, "age": 7, "gender": 2, "occupation": 3, "zip": 3, "year": 3,
        "genre": 19,
    }  # fmt: skip
    bags = _rows_by_key(data.batch(np.arange(5)))
    assert list(bags) == list(FEATURES)
    assert bags["user"] == [[0], [1], [0], [2], [1]]
    assert bags["item"] == [[0], [0], [1], [2], [2]]
    assert bags["age"] == [[1], [5], [1], [0], [5]]  # 18-24 is bucket 1, 50-55 is 5, <18 is 0
    assert bags["gender"] == [[1], [0], [1], [1], [0]]  # F < M
    assert bags["occupation"] == [[2], [0], [2], [1], [0]]  # other, student, technician
    assert bags["zip"] == [[0], [1], [0], [2], [1]]  # "85" < "94" < "T8"
    assert bags["year"] == [[2], [2], [0], [1], [1]]  # "0" (unknown) < "1977" < "1995"
    animation = [GENRES.index(g) for g in ("Animation", "Children's", "Comedy")]
    assert (
        bags["genre"]
        == [animation, animation, [GENRES.index("Drama")]] + [[GENRES.index("Sci-Fi")]] * 2
    )
    dense = np.asarray(data.batch(np.arange(5)).dense)
    np.testing.assert_allclose(dense[:, 0], [0.24, 0.53, 0.24, 0.17, 0.53], rtol=1e-6)
    np.testing.assert_allclose(dense[:, 1], [0.95, 0.95, 0.0, 0.77, 0.77], rtol=1e-6)


def test_random_split_is_a_seeded_partition(data):
    train, test = data.split("random", train_fraction=0.6, seed=3)
    assert (len(train), len(test)) == (3, 2)
    pairs = sorted(
        zip(np.r_[train.timestamp, test.timestamp], np.r_[train.user, test.user], strict=True)
    )
    assert pairs == sorted(zip(data.timestamp, data.user, strict=True))
    again, _ = data.split("random", train_fraction=0.6, seed=3)
    np.testing.assert_array_equal(again.timestamp, train.timestamp)


def test_time_split_trains_on_the_earliest_ratings(data):
    train, test = data.split("time", train_fraction=0.6)
    assert sorted(train.timestamp.tolist()) == [100, 200, 300]
    assert sorted(test.timestamp.tolist()) == [400, 500]


def test_batches_pad_the_last_partial_batch(data):
    batches = list(data.batches(batch_size=2))
    assert len(batches) == 3
    assert {b.sparse.stride() for b in batches} == {2}
    np.testing.assert_array_equal(batches[-1].weights, [1, 0])
    assert len(list(data.batches(batch_size=2, drop_last=True))) == 2
    shuffled = list(data.batches(batch_size=2, shuffle=True, seed=1))
    labels = np.concatenate([b.labels[b.weights > 0] for b in shuffled])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())


def test_bad_input_is_refused(tmp_path, data):
    with pytest.raises(ValueError, match="neither GroupLens"):
        load_movielens_100k(tmp_path / "nothing")
    with pytest.raises(ValueError, match="split kind"):
        data.split("user")
    with pytest.raises(ValueError, match="train_fraction"):
        data.split("random", train_fraction=1.0)
    write_grouplens(tmp_path)
    (tmp_path / "u.data").write_text("9\t10\t5\t1\n")
    with pytest.raises(ValueError, match="user 9"):
        load_movielens_100k(tmp_path)


def test_missing_recbole_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps recbole"):
        load_movielens_100k()


def test_the_recbole_wheel_copy():
    pytest.importorskip("recbole.dataset_example", reason="recbole wheel not installed")
    data = load_movielens_100k()
    assert len(data) == 100_000
    assert data.num_embeddings["user"] == 943 and data.num_embeddings["item"] == 1682
    assert data.labels.sum() == 55_375  # ratings of 4 or 5
    train, test = data.split("random")
    assert (len(train), len(test)) == (80_000, 20_000)
    batch = next(train.batches(batch_size=512, shuffle=True))
    ids = _rows_by_key(batch)
    for key, bags in ids.items():
        assert max(max(b) for b in bags if b) < data.num_embeddings[key], key


def test_rating_statistics_read_the_training_split_and_leave_each_own_rating_out(data):
    train, test = data.subset(np.arange(4)), data.subset(np.array([4]))
    stats_train, stats_test = add_rating_statistics(train, test, prior_count=10.0)
    one = np.log1p(1.0) / np.log(1000.0)
    # train labels [1, 0, 1, 0]; example 0: the others' share 1/3, user 1's other rating
    # (example 2) is a 4, item 10's other rating (example 1) a 3
    np.testing.assert_allclose(stats_train.extra_dense[0], [13 / 33, one, 10 / 33, one], rtol=1e-6)
    # the test example (user 2, item 30) sees every training rating (share 1/2): one 3 each
    np.testing.assert_allclose(stats_test.extra_dense[0], [5 / 11, one, 5 / 11, one], rtol=1e-6)
    # an example's own rating never feeds its features; a test rating feeds nothing
    flipped = dataclasses.replace(train, rating=np.where(np.arange(4) == 0, 1, train.rating))
    again_train, again_test = add_rating_statistics(flipped, test)
    np.testing.assert_array_equal(again_train.extra_dense[0], stats_train.extra_dense[0])
    assert again_train.extra_dense[2, 0] < stats_train.extra_dense[2, 0]  # user 1's other
    other_test = dataclasses.replace(test, rating=np.array([1]))
    np.testing.assert_array_equal(add_rating_statistics(train, other_test)[1].extra_dense,
                                  stats_test.extra_dense)  # fmt: skip
    batch = stats_train.batch(np.array([0, 2]), batch_size=4)
    assert batch.dense.shape == (4, 6)
    np.testing.assert_array_equal(batch.dense[:2, 2:], stats_train.extra_dense[[0, 2]])
    assert stats_train.subset(np.array([2])).extra_dense.tolist() == [
        stats_train.extra_dense[2].tolist()
    ]
    with pytest.raises(ValueError, match="prior_count must be > 0"):
        add_rating_statistics(train, test, prior_count=0.0)


def test_user_history_bags_hold_the_training_items_and_leave_each_own_item_out(data):
    train, test = data.subset(np.arange(4)), data.subset(np.array([4]))
    with_train, with_test = add_user_history(train, test)
    assert with_train.num_embeddings["history"] == data.num_embeddings["item"] == 3
    assert with_train.feature_names == (*FEATURES, "history")
    # training (user, item): (1, 10), (2, 10), (1, 20), (3, 30); items 10, 20, 30 are rows 0-2
    bags = _rows_by_key(with_train.batch(np.arange(4), batch_size=6))
    assert bags["history"] == [[1], [], [0], []]
    assert _rows_by_key(with_test.batch(np.array([0])))["history"] == [[0]]  # user 2 saw 10
    # the bags carry no label (ratings do not enter), and test ratings never feed them
    relabelled = dataclasses.replace(train, rating=5 - train.rating)
    assert _rows_by_key(add_user_history(relabelled, test)[0].batch(np.arange(4)))["history"] == [
        [1], [], [0], []
    ]  # fmt: skip
    other_test = data.subset(np.array([1]))  # user 2 again, now in the test split
    assert _rows_by_key(add_user_history(train, other_test)[1].batch(np.array([0])))["history"] == [
        [0]
    ]
    # the subsets of a split keep its bags
    assert _rows_by_key(with_train.subset(np.array([2])).batch(np.array([0])))["history"] == [[0]]
