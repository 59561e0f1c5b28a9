"""Benchmark library: inputs, byte counting, timing loop, table and JSON output (CPU, tiny)."""

import json

import numpy as np
import pytest

from jaxrec import bench


@pytest.fixture(scope="module")
def tiny():
    return bench.make_inputs(bench.SHAPES["tiny"], "fp32", weighted=True, rotations=2)


def test_inputs_stack_tables_of_one_dim_into_groups(tiny):
    shape = bench.SHAPES["tiny"]
    assert [g.dim for g in tiny.groups] == sorted({d for _, d in shape.tables})
    for g in tiny.groups:
        assert g.weights.shape == (sum(shape.tables[t][0] for t in g.tables), g.dim)
        # Row ranges of a group tile its stacked buffer; columns follow table order.
        starts = [r for _, r, _, _ in g.features]
        assert starts == list(np.cumsum([0] + [n for _, _, n, _ in g.features])[:-1])
        for t, _, n, col in g.features:
            assert n == shape.tables[t][0]
            assert col == sum(d for _, d in shape.tables[:t])
    assert tiny.num_columns == sum(d for _, d in shape.tables)


def test_rotated_id_sets_keep_lengths_and_stay_in_their_tables(tiny):
    shape = bench.SHAPES["tiny"]
    batch = shape.batch_size
    assert len(tiny.host_ids) == 2
    assert not np.array_equal(tiny.host_ids[0], tiny.host_ids[1])
    offsets = tiny.host_offsets[0]
    lengths = np.diff(offsets)
    assert lengths.min() >= 0 and lengths.max() <= 2 * shape.mean_len
    for ids in tiny.host_ids:
        for t, (rows, _) in enumerate(shape.tables):
            seg = ids[offsets[t * batch] : offsets[(t + 1) * batch]]
            assert seg.min() >= 0 and seg.max() < rows


def test_byte_counts_follow_the_documented_formula(tiny):
    shape = bench.SHAPES["tiny"]
    batch = shape.batch_size
    offsets = tiny.host_offsets[0]
    per_table = [offsets[(t + 1) * batch] - offsets[t * batch] for t in range(len(shape.tables))]
    rows = sum(n * d * 4 for n, (_, d) in zip(per_table, shape.tables, strict=True))
    n = int(offsets[-1])
    meta = 4 * n + 4 * len(offsets)
    assert bench.pooled_bytes(tiny, "fp32") == rows + meta + batch * tiny.num_columns * 4
    assert bench.pooled_bytes(tiny, "fp32", weighted=True) == (
        rows + meta + 4 * n + batch * tiny.num_columns * 4
    )
    assert bench.sequence_bytes(tiny, "fp32") == 2 * rows + meta
    assert bench.pooled_bytes(tiny, "bf16") == rows // 2 + meta + batch * tiny.num_columns * 2


def test_time_op_rotates_argument_sets_and_returns_a_positive_median():
    seen = []

    def fn(k):
        seen.append(k)
        return np.zeros(1)

    ms = bench.time_op(fn, [(0,), (1,), (2,)], iters=4, warmup=1, sync=lambda _: None)
    assert ms > 0
    assert set(seen) == {0, 1, 2}


def test_pooled_implementations_agree_on_tiny(tiny):
    args = (tiny.ids[1], tiny.offsets[1], tiny.per_sample_weights[1])
    ref = bench.pooled_fn(tiny, "xla-reference", "mean")(*args)
    naive = bench.pooled_fn(tiny, "xla-naive", "mean")(*args)
    np.testing.assert_allclose(naive, ref, rtol=1e-5, atol=1e-7)
    assert ref.shape == (bench.SHAPES["tiny"].batch_size, tiny.num_columns)


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = bench.main(
        [
            "--shapes",
            "tiny",
            "--impls",
            "xla-reference,xla-naive",
            "--ops",
            "pooled,sequence",
            "--iters",
            "2",
            "--copy-mib",
            "4",
            "--json",
            str(path),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads(path.read_text())
    assert {"device", "date", "jax", "torch", "copy_GBps", "shapes", "results"} <= set(record)
    assert record["shapes"]["tiny"]["batch_size"] == bench.SHAPES["tiny"].batch_size
    rows = record["results"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("pooled", "sequence") for impl in ("xla-reference", "xla-naive")
    }
    for r in rows:
        assert r["ms"] > 0
        assert r["GBps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
        assert r["pct_copy"] == pytest.approx(100 * r["GBps"] / record["copy_GBps"])
    assert printed.count("tiny") == len(rows)


def test_rounds_report_the_median_of_every_round(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["--shapes", "tiny", "--impls", "xla-naive", "--iters", "1", "--copy-mib", "4"]
    assert bench.main([*argv, "--rounds", "3", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["results"]
    assert len(row["ms_rounds"]) == 3
    assert row["ms"] == pytest.approx(sorted(row["ms_rounds"])[1])


def test_in_jit_calls_time_several_lookups_in_one_jitted_call(tmp_path):
    path = tmp_path / "bench.json"
    argv = ["--shapes", "tiny", "--impls", "xla-naive,xla-reference", "--iters", "1"]
    assert bench.main([*argv, "--copy-mib", "4", "--in-jit-calls", "3", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert len(rows) == 2
    assert all(r["in_jit_calls"] == 3 and r["ms_in_jit"] > 0 for r in rows)


def test_lookup_fn_many_matches_one_call_per_set(tiny):
    fn = bench.pooled_fn(tiny, "xla-reference", "sum")
    sets = [(i, o, None) for i, o in zip(tiny.ids, tiny.offsets, strict=True)]
    many = fn.many(sets)
    assert len(many) == len(sets)
    for got, s in zip(many, sets, strict=True):
        np.testing.assert_allclose(got, fn(*s), rtol=1e-6)


def test_median_over_rounds_keeps_failures_apart_from_timings():
    base = dict(op="pooled", dtype="fp32", pooling="sum", weighted=False, bytes=4_000_000)
    rows = [
        dict(base, shape="a", impl="x", ms=2.0),
        dict(base, shape="a", impl="x", ms=4.0),
        dict(base, shape="a", impl="y", error="boom"),
    ]
    merged = {r["impl"]: r for r in bench.median_over_rounds(rows, copy_gbps=4.0)}
    assert merged["x"]["ms"] == 3.0 and merged["x"]["GBps"] == pytest.approx(4 / 3)
    assert merged["x"]["pct_copy"] == pytest.approx(100 / 3)
    assert "ms" not in merged["y"] and merged["y"]["error"] == "boom"


def test_chart_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"shape": "tiny", "op": "pooled", "dtype": "fp32", "impl": i, "GBps": g}
        for i, g in (("pallas", 2.0), ("torch", 1.0))
    ]
    bench.write_chart(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_memory_estimate_counts_tables_ids_and_outputs():
    shape = bench.SHAPES["large"]
    tables = 32 * 1_000_000 * 128 * 4
    id_set = 32 * 8192 * 20 * 8 + (32 * 8192 + 1) * 4  # ids (int64 on the host) + offsets
    output = 8192 * 32 * 128 * 4

    def estimate(dtype="fp32", ops=("pooled",), impls=("pallas",), calls=1):
        return bench.estimated_bytes(shape, dtype, ops=ops, impls=impls, in_jit_calls=calls)

    assert estimate() == tables + 8 * id_set + output
    assert estimate(impls=("pallas", "torch")) == 2 * tables + 8 * id_set + 2 * output
    assert estimate("bf16") == tables // 2 + 8 * id_set + output
    assert estimate(calls=80) == tables + 80 * id_set + output
    assert estimate(ops=("sequence",)) == estimate() + 32 * 8192 * 20 * 128 * 4
