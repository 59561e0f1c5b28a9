"""The planner: its choices, the user's constraints, its refusals, its report, and a chosen
plan run through the sharded lookup on 8 forced host devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxrec
from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from jaxrec.parallel.convert import partition_specs, shard_params
from jaxrec.parallel.cost_model import H200_HBM_BYTES, Topology, state_bytes_per_row
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.planner import EmbeddingShardingPlanner, ParameterConstraints
from jaxrec.parallel.sharded_lookup import ShardedLookupSpec, sharded_lookup
from jaxrec.parallel.types import ShardingPlan, ShardingType, column_wise, row_wise, table_wise

TW, RW, DP = ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.DATA_PARALLEL
ADAGRAD = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
GB = 10**9


def table(name, rows, dim=128, features=1, pooling=PoolingType.SUM):
    feats = [f"{name}_f{i}" for i in range(features)]
    return EmbeddingBagConfig(
        name=name, num_embeddings=rows, embedding_dim=dim, feature_names=feats, pooling=pooling
    )


def planner(n, *, hbm=H200_HBM_BYTES, batch=16384, **kwargs):
    return EmbeddingShardingPlanner(
        Topology(num_devices=n, hbm_cap=hbm), batch_size=batch, **kwargs
    )


def kinds(plan):
    return {name: s.sharding_type for name, s in plan.items()}


def test_tiny_plain_tables_go_data_parallel():
    tables = [table(f"t{i}", 10, dim=16) for i in range(4)]
    plan = planner(8).plan(tables, optimizer=None)
    assert set(kinds(plan).values()) == {DP}


def test_tiny_fused_tables_go_table_wise_spread_over_devices():
    # a fused replica all-gathers (N - 1) B p gradient rows on every device, as much as a
    # table-wise owner receives: spread over the owners, table-wise costs less.
    tables = [table(f"t{i}", 10, dim=16) for i in range(16)]
    plan = planner(8).plan(tables, optimizer=ADAGRAD)
    assert set(kinds(plan).values()) == {TW}
    ranks = [s.ranks[0] for s in plan.values()]
    assert sorted(np.bincount(ranks, minlength=8)) == [2] * 8


def test_data_parallel_only_for_small_tables_unless_allowed():
    big = [table("big", 100_000, dim=64)]  # 25.6 MB with its optimizer state, > 16 MiB
    assert kinds(planner(8).plan(big, optimizer=None))["big"] is not DP
    only_dp = {"big": ParameterConstraints(sharding_types=(DP,))}
    assert kinds(planner(8, constraints=only_dp).plan(big, optimizer=None))["big"] is DP


def test_table_bigger_than_one_device_goes_row_wise():
    tables = [table("huge", 3_000_000), table("a", 100_000), table("b", 100_000)]
    p = planner(4, hbm=1 * GB, memory_budget=0.9, reserve_bytes=0)
    plan = p.plan(tables, optimizer=ADAGRAD)  # huge: 1.55 GB of a 0.9 GB budget
    assert kinds(plan) == {"huge": RW, "a": TW, "b": TW}


def test_very_hot_table_goes_row_wise():
    hot = {"hot": ParameterConstraints(pooling_factors=500.0)}
    tables = [table("hot", 100_000)] + [table(f"t{i}", 100_000) for i in range(7)]
    plan = planner(8, constraints=hot).plan(tables, optimizer=ADAGRAD)
    assert kinds(plan)["hot"] is RW
    assert all(kinds(plan)[f"t{i}"] is TW for i in range(7))
    cold = planner(8).plan(tables, optimizer=ADAGRAD)
    assert kinds(cold)["hot"] is TW


# Criteo's cardinalities capped at 4M rows (the GPU scaling check's model): the multi-hot
# features (>= 1000 rows) draw ~20 ids per bag, the others one.
CRITEO_CAPPED = [min(r, 4_000_000) for r in (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)]  # fmt: skip


def test_criteo_capped_tables_all_go_table_wise_balanced_on_two_devices():
    # Every table fits one device and none is hot: table-wise, packed by estimated time.
    # (A greedy on each table's maximum time put 18 of them row-wise, which reduce-scatter
    # twice the bytes of table-wise outputs at 2 devices.)
    tables = [table(f"t{i}", rows) for i, rows in enumerate(CRITEO_CAPPED)]
    pools = {
        t.name: ParameterConstraints(pooling_factors=1.0 if t.num_embeddings < 1000 else 20.0)
        for t in tables
    }
    p = planner(2, constraints=pools)
    plan = p.plan(tables, optimizer=ADAGRAD)
    assert set(kinds(plan).values()) == {TW}
    assert sorted(np.bincount([s.ranks[0] for s in plan.values()])) == [13, 13]
    report = p.explain(tables, plan, optimizer=ADAGRAD)
    assert report.imbalance < 1.05
    all_rw = p.explain(
        tables, ShardingPlan({t.name: row_wise() for t in tables}), optimizer=ADAGRAD
    )
    np.testing.assert_allclose(all_rw.comm_seconds / report.comm_seconds, 2.0, rtol=0.06)


def test_tables_are_packed_by_estimated_time_not_by_count():
    pools = {"heavy": ParameterConstraints(pooling_factors=200.0)}
    pools |= {f"t{i}": ParameterConstraints(pooling_factors=20.0) for i in range(10)}
    tables = [table("heavy", 1000)] + [table(f"t{i}", 1000) for i in range(10)]
    p = planner(2, constraints=pools)
    plan = p.plan(tables, optimizer=ADAGRAD)
    assert set(kinds(plan).values()) == {TW}
    heavy = plan["heavy"].ranks[0]
    beside = [n for n, s in plan.items() if n != "heavy" and s.ranks[0] == heavy]
    assert len(beside) <= 2
    assert p.explain(tables, plan, optimizer=ADAGRAD).imbalance < 1.1


def test_equal_tables_balance_across_devices():
    tables = [table(f"t{i}", 500_000, features=2) for i in range(32)]
    p = planner(8)
    plan = p.plan(tables, optimizer=ADAGRAD)
    report = p.explain(tables, plan, optimizer=ADAGRAD)
    assert report.imbalance < 1.01
    assert report.held.max() / report.held.mean() < 1.01


def test_pinned_shardings_are_honoured():
    tables = [table(f"t{i}", 1000, dim=32) for i in range(6)]
    pins = {"t0": table_wise(5), "t3": row_wise([1, 2], sizes=[10, 990]), "t4": column_wise([7, 0])}
    constraints = {n: ParameterConstraints(pinned=s) for n, s in pins.items()}
    plan = planner(8, constraints=constraints).plan(tables, optimizer=ADAGRAD)
    for name, sharding in pins.items():
        assert plan[name] == sharding


def test_allowed_types_are_honoured():
    allowed = {
        "a": ParameterConstraints(sharding_types=("column_wise",)),
        "b": ParameterConstraints(sharding_types=(ShardingType.TABLE_ROW_WISE,)),
        "c": ParameterConstraints(sharding_types=(DP,)),
    }
    tables = [table("a", 1000), table("b", 1000), table("c", 1000), table("d", 1000)]
    plan = planner(8, constraints=allowed).plan(tables, optimizer=ADAGRAD)
    assert kinds(plan)["a"] is ShardingType.COLUMN_WISE
    assert all(s[1] >= 32 for s in (m.shard_sizes for m in plan["a"].shards(tables[0], 8)))
    assert kinds(plan)["b"] is ShardingType.TABLE_ROW_WISE
    assert kinds(plan)["c"] is DP


def test_planned_memory_is_what_the_layout_allocates():
    tables = [table("a", 5000, dim=64), table("b", 3000, dim=64), table("c", 700, dim=32)]
    tables += [table("d", 40, dim=64, pooling=PoolingType.MEAN), table("e", 2000, dim=64)]
    pins = {
        "a": ParameterConstraints(pinned=row_wise()),
        "b": ParameterConstraints(pinned=table_wise(2)),
        "e": ParameterConstraints(pinned=table_wise(2)),
        "d": ParameterConstraints(sharding_types=(DP,)),
    }
    p = planner(4, constraints=pins)
    plan = p.plan(tables, optimizer=ADAGRAD)
    report = p.explain(tables, plan, optimizer=ADAGRAD)
    layout = ShardedLayout.create(tables, plan, 4, optimizer=ADAGRAD)
    want = sum(g.rows * (g.dim * 4 + state_bytes_per_row(ADAGRAD, g.dim)) for g in layout.groups)
    want += sum(
        t.num_embeddings * (t.embedding_dim * 4 + 4) for t in tables if t.name in layout.dp_tables
    )
    np.testing.assert_array_equal(report.allocated, [want] * 4)
    assert report.held.sum() == sum(
        t.num_embeddings * (t.embedding_dim * 4 + 4) for t in tables
    ) + 3 * (40 * (64 * 4 + 4))


def test_refuses_a_model_over_the_total_budget_naming_the_totals():
    tables = [table(f"t{i}", 1_000_000) for i in range(4)]  # 4 x 516 MB
    with pytest.raises(ValueError) as err:
        planner(2, hbm=GB, memory_budget=0.5, reserve_bytes=0).plan(tables, optimizer=ADAGRAD)
    message = str(err.value)
    assert "the tables need 2.06 GB (weights 2.05 GB" in message
    assert "2 x 500.00 MB = 1.00 GB" in message
    assert "1.06 GB short; use at least 5 devices, raise memory_budget" in message


def test_refuses_a_pinned_sharding_that_overflows_a_device():
    tables = [table("a", 1_000_000), table("b", 100)]
    pins = {"a": ParameterConstraints(pinned=row_wise([0, 1], sizes=[900_000, 100_000]))}
    p = planner(2, hbm=GB, memory_budget=400 * 10**6, reserve_bytes=0, constraints=pins)
    with pytest.raises(
        ValueError,
        match=r"pinned row_wise sharding of table 'a' on ranks \[0, 1\] makes "
        r"every device allocate 464.40 MB, over the budget of 400.00 MB by 64.40 MB",
    ):
        p.plan(tables, optimizer=ADAGRAD)


def test_refuses_a_table_that_fits_no_allowed_type():
    tables = [table("a", 1_000_000), table("b", 100)]
    only_tw = {"a": ParameterConstraints(sharding_types=(TW,))}
    p = planner(4, hbm=GB, memory_budget=400 * 10**6, reserve_bytes=0, constraints=only_tw)
    with pytest.raises(
        ValueError,
        match=r"table 'a' \(516.00 MB .*\) fits no allowed sharding type "
        r"\['table_wise'\].*table_wise over by 116.00 MB\); allow row_wise",
    ):
        p.plan(tables, optimizer=ADAGRAD)
    assert (
        kinds(
            planner(4, hbm=GB, memory_budget=400 * 10**6, reserve_bytes=0).plan(
                tables, optimizer=ADAGRAD
            )
        )["a"]
        is RW
    )


# Criteo 1TB cardinalities hold 177.6M rows: 91 GB at dim 128 in fp32, under one H200. Doubled
# (355M rows, 182 GB of fp32 weights, 183.6 GB with row-wise Adagrad state) they need two.
CRITEO_1TB = [
    45833188,
    36746,
    17245,
    7413,
    20243,
    3,
    7114,
    1441,
    62,
    29275261,
    1572176,
    345138,
    10,
    2209,
    11267,
    128,
    4,
    974,
    14,
    48937457,
    11316796,
    40094537,
    452104,
    12606,
    104,
    35,
]


def test_criteo_sized_model_refused_on_one_h200_and_placed_on_two():
    tables = [table(f"t{i}", 2 * rows) for i, rows in enumerate(CRITEO_1TB)]
    assert sum(t.num_embeddings * 128 * 4 for t in tables) > 150 * GB
    with pytest.raises(
        ValueError, match=r"the tables need 183.\d\d GB .* 1 device\(s\) hold 1 x 13\d.\d\d GB"
    ):
        planner(1).plan(tables, optimizer=ADAGRAD)
    p = planner(2)
    plan = p.plan(tables, optimizer=ADAGRAD)
    plan.validate(tables, 2)
    report = p.explain(tables, plan, optimizer=ADAGRAD)
    assert report.allocated.max() <= p.budget
    assert report.imbalance < 1.1


def test_report_prints_tables_devices_and_imbalance():
    tables = [table(f"t{i}", 10_000 * (i + 1)) for i in range(5)]
    p = planner(3)
    plan = p.plan(tables, optimizer=ADAGRAD)
    text = str(p.explain(tables, plan, optimizer=ADAGRAD))
    lines = text.splitlines()
    assert lines[0].startswith("Sharding plan: 3 devices, batch 16384 per device")
    for t in tables:
        assert any(line.split()[:2] == [t.name, plan[t.name].sharding_type.value] for line in lines)
    for d in range(3):
        assert any(line.split()[0] == str(d) and "GB" in line or "MB" in line for line in lines)
    assert lines[-1].startswith("imbalance (max/mean of estimated time): ")


def test_explain_marks_devices_over_budget():
    tables = [table("a", 1_000_000)]
    text = str(
        planner(2, hbm=GB, memory_budget=0.1, reserve_bytes=0).explain(
            tables, ShardingPlan({"a": table_wise(0)})
        )
    )
    assert text.count("OVER") == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch=0), "batch_size must be an int >= 1"),
        (dict(memory_budget=1.5), "memory_budget must be a fraction in"),
        (dict(memory_budget=0.5, reserve_bytes=H200_HBM_BYTES), "reserve_bytes must be an int in"),
        (
            dict(constraints={"zz": ParameterConstraints()}),
            r"constraints name unknown tables \['zz'\]",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        planner(2, **kwargs).plan([table("a", 10)])


def test_bad_constraints_raise():
    with pytest.raises(ValueError, match="name an unknown type"):
        ParameterConstraints(sharding_types=("sideways",))
    with pytest.raises(ValueError, match="pinned table_wise is not among the allowed"):
        ParameterConstraints(sharding_types=(RW,), pinned=table_wise(0))
    with pytest.raises(ValueError, match=r"2 pooling factors for its 1 features"):
        planner(2, constraints={"a": ParameterConstraints(pooling_factors=(1.0, 2.0))}).plan(
            [table("a", 10)]
        )


N, B = 8, 2


@pytest.mark.skipif(len(jax.devices()) < N, reason="needs 8 (forced host) devices")
def test_planned_plan_runs_through_the_sharded_lookup():
    tables = [
        table("big", 400, dim=8, features=2),
        table("m", 90, dim=4, pooling=PoolingType.MEAN),
        table("tiny", 5, dim=4),
    ] + [table(f"s{i}", 30 + i, dim=8) for i in range(2)]
    constraints = {
        "m": ParameterConstraints(sharding_types=(ShardingType.COLUMN_WISE,), min_partition=2),
        "tiny": ParameterConstraints(sharding_types=(DP,)),
    }
    p = planner(N, hbm=20_000, memory_budget=1.0, reserve_bytes=0, batch=B, constraints=constraints)
    plan = p.plan(tables, optimizer=None)
    assert kinds(plan)["big"] is RW  # 25.6 kB of a 20 kB budget
    assert kinds(plan)["m"] is ShardingType.COLUMN_WISE
    assert kinds(plan)["tiny"] is DP
    assert TW in kinds(plan).values()

    rng = np.random.default_rng(0)
    keys = [f for t in tables for f in t.feature_names]
    rows = {f: t.num_embeddings for t in tables for f in t.feature_names}
    lengths = rng.integers(0, 4, (N, len(keys), B)).astype(np.int32)
    values = [
        [rng.integers(0, rows[k], lengths[d, i].sum()) for i, k in enumerate(keys)]
        for d in range(N)
    ]
    capacity = int(lengths.sum(axis=(1, 2)).max())
    local = np.zeros((N, capacity), np.int32)
    for d in range(N):
        flat = np.concatenate(values[d])
        local[d, : flat.size] = flat
    whole = KeyedJaggedTensor(
        keys=keys,
        values=np.concatenate([values[d][i] for i in range(len(keys)) for d in range(N)]).astype(
            np.int32
        ),
        lengths=lengths.transpose(1, 0, 2).reshape(-1),
    )
    ebc = EmbeddingBagCollection(tables=tables, backend="xla")
    params = ebc.init(jax.random.key(0), whole)["params"]
    layout = ShardedLayout.create(tables, plan, N)
    spec = ShardedLookupSpec.create(layout, tuple(keys), batch_size=B, axis="x", backend="xla")

    def body(params, ids, lengths):
        offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(lengths)]).astype(jnp.int32)
        return sharded_lookup(spec, params, ids, offsets, None)[0]

    mesh = Mesh(np.array(jax.devices()[:N]), ("x",))
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(partition_specs(layout, "x"), P("x"), P("x")),
        out_specs=P("x"),
        check_vma=False,
    )
    got = jax.jit(run)(
        shard_params(layout, params["embedding_bags"]), local.reshape(-1), lengths.reshape(-1)
    )
    want = ebc.apply({"params": params}, whole).values()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
