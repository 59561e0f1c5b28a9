"""The cost model: wire bytes per phase of each sharding type, the measured default link
bandwidth, and per-phase full-duplex communication time."""

import numpy as np
import pytest

import jaxrec
from jaxrec import EmbeddingBagConfig
from jaxrec.parallel.cost_model import (
    PHASES,
    DeviceLoad,
    TableProfile,
    Topology,
    sharding_cost,
)
from jaxrec.parallel.types import row_wise, table_wise

ADAGRAD = jaxrec.optim.exact_rowwise_adagrad(learning_rate=0.01)
B, DIM = 16384, 128


def profile(pooling=20.0, rows=1_000_000):
    t = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=rows, feature_names=["f"])
    return TableProfile.create(t, pooling_factors=(pooling,), optimizer=ADAGRAD, tag=0)


def test_default_link_bandwidth_is_the_measured_210_gb_per_s():
    assert Topology(num_devices=2).link_bandwidth == 210e9


def test_table_wise_sends_outputs_from_the_owner_and_gradients_to_it():
    cost = sharding_cost(profile(), table_wise(1), num_devices=2, batch_size=B)
    out = B * DIM * 4
    output, gradient = PHASES.index("output"), PHASES.index("gradient")
    np.testing.assert_array_equal(cost.sent[output], [0, out])
    np.testing.assert_array_equal(cost.received[output], [out, 0])
    np.testing.assert_array_equal(cost.sent[gradient], [out, 0])
    np.testing.assert_array_equal(cost.received[gradient], [0, out])
    np.testing.assert_array_equal(cost.sent[PHASES.index("input")], [B * (20 * 4 + 4), 0])


@pytest.mark.parametrize("n", [2, 4, 8])
def test_row_wise_reduce_scatters_every_devices_partials_forward_and_back(n):
    cost = sharding_cost(profile(), row_wise(), num_devices=n, batch_size=B)
    wire = (n - 1) * B * DIM * 4  # (N - 1)/N of an [N, B, dim] float32 buffer
    for phase in ("output", "gradient"):
        np.testing.assert_array_equal(cost.sent[PHASES.index(phase)], [wire] * n)
        np.testing.assert_array_equal(cost.received[PHASES.index(phase)], [wire] * n)


def test_at_two_devices_row_wise_moves_twice_the_table_wise_output_bytes():
    def output_bytes(sharding):
        cost = sharding_cost(profile(), sharding, num_devices=2, batch_size=B)
        return cost.sent[1:].sum()  # output and gradient phases, all devices

    assert output_bytes(row_wise()) == 2 * output_bytes(table_wise(0))


def test_communication_time_is_per_phase_full_duplex():
    topo = Topology(num_devices=2, link_bandwidth=1e9)
    load = DeviceLoad(topo, B).add(sharding_cost(profile(), table_wise(0), 2, B))
    load = load.add(sharding_cost(profile(), table_wise(1), 2, B))
    # each device sends one table's outputs while it receives the other's: overlapped within
    # a phase; the forward outputs and the backward gradients do not overlap
    ids = B * (20 * 4 + 4)
    np.testing.assert_allclose(load.comm_seconds, [(ids + 2 * B * DIM * 4) / 1e9] * 2)
    assert load.work == pytest.approx(
        load.lookup.sum() / topo.lookup_bandwidth + 2 * (ids + 2 * B * DIM * 4) / 1e9
    )
