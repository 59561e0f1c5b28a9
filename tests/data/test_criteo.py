"""Criteo TSV: parsing, hashing, log-transformed dense features, streaming and variants."""

import gzip
import math

import numpy as np
import pytest

from jaxrec.data import criteo
from jaxrec.data.criteo import NUM_DENSE, NUM_SPARSE, SPARSE_NAMES, CriteoTSV, parse_hex


def random_rows(n, seed=0):
    """Rows as Python values (None for an empty field) and their TSV lines."""
    rng = np.random.default_rng(seed)
    rows, lines = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        ints = [
            None if rng.random() < 0.2 else int(rng.integers(-3, 5000)) for _ in range(NUM_DENSE)
        ]
        cats = [
            None if rng.random() < 0.2 else int(rng.integers(0, 2**32)) for _ in range(NUM_SPARSE)
        ]
        rows.append((label, ints, cats))
        fields = [str(label)] + ["" if v is None else str(v) for v in ints]
        fields += ["" if v is None else f"{v:08x}" for v in cats]
        lines.append("\t".join(fields) + "\n")
    return rows, "".join(lines)


def expected(rows, sizes):
    dense = [[math.log(max(v or 0, 0) + 1) for v in ints] for _, ints, _ in rows]
    sparse = [[(v or 0) % s for v, s in zip(cats, sizes, strict=True)] for _, _, cats in rows]
    return np.array(dense), np.array(sparse), np.array([r[0] for r in rows], np.float32)


def unpack(batch):
    n = int(np.sum(batch.weights))
    kjt = batch.sparse
    assert kjt.keys() == list(SPARSE_NAMES)
    lengths = np.asarray(kjt.lengths()).reshape(NUM_SPARSE, -1)
    assert (lengths[:, :n] == 1).all() and (lengths[:, n:] == 0).all()
    sparse = np.asarray(kjt.values())[: NUM_SPARSE * n].reshape(NUM_SPARSE, n).T
    return np.asarray(batch.dense)[:n], sparse, np.asarray(batch.labels)[:n]


@pytest.mark.parametrize("gz", [False, True])
def test_streams_batches_equal_to_a_row_by_row_parse(tmp_path, gz):
    rows, text = random_rows(23)
    sizes = [int(s) for s in np.random.default_rng(1).integers(1, 10**6, NUM_SPARSE)]
    path = tmp_path / ("day_0.gz" if gz else "train.txt")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    batches = list(CriteoTSV(path, batch_size=10, num_embeddings=sizes))
    assert [int(np.sum(b.weights)) for b in batches] == [10, 10, 3]
    assert {b.sparse.stride() for b in batches} == {10}
    parts = [unpack(b) for b in batches]
    dense, sparse, labels = (np.concatenate(p) for p in zip(*parts, strict=True))
    want_dense, want_sparse, want_labels = expected(rows, sizes)
    np.testing.assert_allclose(dense, want_dense, rtol=1e-6)
    np.testing.assert_array_equal(sparse, want_sparse)
    np.testing.assert_array_equal(labels, want_labels)


def test_terabyte_days_are_read_in_order_and_max_rows_stops(tmp_path):
    rows0, text0 = random_rows(4, seed=0)
    rows1, text1 = random_rows(5, seed=1)
    (tmp_path / "day_0").write_text(text0)
    (tmp_path / "day_1").write_text(text1)
    data = CriteoTSV([tmp_path / "day_0", tmp_path / "day_1"], batch_size=3, num_embeddings=97)
    labels = np.concatenate([unpack(b)[2] for b in data])
    np.testing.assert_array_equal(labels, [r[0] for r in rows0 + rows1])
    assert len(list(data)) == 3  # iterating again starts over
    short = CriteoTSV([tmp_path / "day_0", tmp_path / "day_1"], 3, 97, max_rows=6)
    assert sum(int(np.sum(b.weights)) for b in short) == 6
    assert len(list(CriteoTSV(tmp_path / "day_1", 3, 97, drop_last=True))) == 1


def test_streaming_reads_one_batch_of_lines_at_a_time(tmp_path, monkeypatch):
    _, text = random_rows(50)
    (tmp_path / "train.txt").write_text(text)
    seen = []
    parse = criteo.parse_lines
    monkeypatch.setattr(
        criteo, "parse_lines", lambda lines, n: seen.append(len(lines)) or parse(lines, n)
    )
    it = iter(CriteoTSV(tmp_path / "train.txt", batch_size=8, num_embeddings=10))
    next(it)
    assert seen == [8]


def test_parse_hex_matches_python_int():
    values = [0, 1, 255, 2**32 - 1, 0xDEADBEEF, 0xA1]
    strings = np.array([f"{v:x}".encode() for v in values] + [b"FF", b""])
    assert parse_hex(strings).tolist() == [*values, 255, 0]


def test_bad_lines_are_refused(tmp_path):
    _, text = random_rows(3)
    lines = text.splitlines(keepends=True)
    (tmp_path / "short").write_text(lines[0] + "1\t2\n")
    with pytest.raises(ValueError, match="line 2 of the batch has 2 columns"):
        list(CriteoTSV(tmp_path / "short", 4, 10))
    bad_hex = "\t".join(["1"] + ["0"] * NUM_DENSE + ["12xyz"] + ["00"] * (NUM_SPARSE - 1))
    (tmp_path / "hex").write_text(bad_hex + "\n")
    with pytest.raises(ValueError, match="not a hexadecimal"):
        list(CriteoTSV(tmp_path / "hex", 4, 10))
    (tmp_path / "label").write_text("2" + lines[0][1:])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        list(CriteoTSV(tmp_path / "label", 4, 10))
    with pytest.raises(ValueError, match="does not exist"):
        list(CriteoTSV(tmp_path / "missing", 4, 10))
    with pytest.raises(ValueError, match="num_embeddings must be >= 1"):
        CriteoTSV(tmp_path / "label", 4, [10] * 25 + [0])
    with pytest.raises(ValueError, match="batch_size"):
        CriteoTSV(tmp_path / "label", 0, 10)
