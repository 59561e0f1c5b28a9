"""jaxrec.tbe.host_table: packed host records move rows exactly, in blocks on threads."""

import numpy as np
import pytest

from jaxrec.tbe import host_table
from jaxrec.tbe.host_table import HostTable


def _table(rows=40_000, threads=4):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((rows, 6)).astype(np.float16)
    state = {"momentum1": rng.random(rows).astype(np.float32)}
    return HostTable(weight, state, threads=threads), weight, state


def test_records_are_aligned_views_of_weights_and_state():
    table, weight, state = _table(rows=10)
    assert table.row_bytes == 16 and table.fields[1][1:3] == (12, 16)  # 12 B of fp16, then f32
    np.testing.assert_array_equal(table.weight, weight)
    np.testing.assert_array_equal(table.state["momentum1"], state["momentum1"])
    assert np.shares_memory(table.weight, table.packed)


def test_threaded_gather_and_scatter_span_several_blocks():
    table, weight, state = _table()
    rows = np.random.default_rng(1).permutation(40_000)[: 3 * host_table._MIN_BLOCK_ROWS + 5]
    rows[7] = -1  # a placeholder: reads row 0
    out = np.empty((len(rows) + 3, table.row_bytes), np.uint8)
    table.gather(rows, out)
    copy = HostTable.zeros(40_000, 6, np.float16, {"momentum1": ((), np.float32)}, threads=3)
    copy.scatter(rows, out[: len(rows)])
    kept = rows[rows >= 0]
    np.testing.assert_array_equal(copy.weight[kept], weight[kept])
    np.testing.assert_array_equal(copy.state["momentum1"][kept], state["momentum1"][kept])
    untouched = np.setdiff1d(np.arange(40_000), kept)
    assert not copy.packed[untouched].any()  # the placeholder's record went nowhere
    np.testing.assert_array_equal(out[7], table.packed[0])


def test_bad_buffers_are_refused():
    table, _, _ = _table(rows=10)
    with pytest.raises(ValueError, match=r"out must be uint8 \[>= 3, 16\]"):
        table.gather(np.arange(3), np.empty((2, 16), np.uint8))
    with pytest.raises(ValueError, match=r"records must be \[3, 16\]"):
        table.scatter(np.arange(3), np.empty((3, 12), np.uint8))
    with pytest.raises(ValueError, match=r"records must be \[3, 16\] uint8, got float32"):
        table.scatter(np.arange(3), np.empty((3, 16), np.float32))
    with pytest.raises(ValueError, match="leading dim must be the table's 10 rows"):
        HostTable(np.zeros((10, 2), np.float32), {"momentum1": np.zeros(9, np.float32)})
