"""FedRolex: rolling windows, hand-computed on fake replies (Flower's fedavgm_test.py style)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from maestro_fl.aggregation import aggregate_fedrolex
from maestro_fl.footprint import footprint
from maestro_fl.models import scaled
from strategies.submodel_strategy import to_numpy
from tests.fakes import fake_strategy, filled, messages, reply, sent, tiny_wide


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_the_rule_averages_each_element_over_the_windows_that_covered_it() -> None:
    """Rows 0-3 of w; A's window wraps (rows 3, 0) with 1s, B holds rows 1, 2 with 3s, C rows 0, 1 with 5s."""
    g = {"w": np.full((4, 2), 9.0, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    a = ({"w": np.ones((2, 2)), "b": np.ones(2)}, {"w": (np.array([3, 0]), slice(None)), "b": (slice(None),)})
    b = ({"w": np.full((2, 2), 3.0), "b": np.full(2, 3.0)}, {"w": (slice(1, 3), slice(None)), "b": (slice(None),)})
    c = ({"w": np.full((2, 2), 5.0)}, {"w": (slice(0, 2), slice(None))})
    out = aggregate_fedrolex(g, [a, b, c])
    np.testing.assert_allclose(out["w"], [[3, 3], [4, 4], [3, 3], [1, 1]])  # unweighted: (1+5)/2, (3+5)/2, 3, 1
    np.testing.assert_allclose(out["b"], [2.0, 2.0])
    np.testing.assert_allclose(aggregate_fedrolex(g, [b])["w"][[0, 3]], 9.0)  # uncovered rows keep their value


def test_windows_roll_with_the_round_and_wrap_around() -> None:
    """8 hidden units, a half-width client: round t holds units (t-1 .. t+2) mod 8 of both layers."""
    strategy, arrays = fake_strategy("fedrolex", [0.5, 1.0], build=tiny_wide)
    full = to_numpy(arrays)
    for server_round, units in [(1, [0, 1, 2, 3]), (2, [1, 2, 3, 4]), (7, [6, 7, 0, 1])]:
        half, whole = messages(strategy, arrays, server_round)
        got = sent(half)
        np.testing.assert_array_equal(got["0.weight"], full["0.weight"][units])  # outputs of layer 0
        np.testing.assert_array_equal(got["0.bias"], full["0.bias"][units])
        np.testing.assert_array_equal(got["2.weight"], full["2.weight"][:, units])  # inputs of layer 2: same window
        np.testing.assert_array_equal(got["2.bias"], full["2.bias"])  # classes are never sliced
        assert sent(whole)["0.weight"].shape == (8, 6)


def test_a_wrapped_window_merges_back_where_it_came_from() -> None:
    """Round 7: A (half width, 10 examples) holds units 6, 7, 0, 1 and sends 1s; B (full, 30) sends 3s."""
    strategy, arrays = fake_strategy("fedrolex", [0.5, 1.0], [10, 30], build=tiny_wide)
    a, b = messages(strategy, arrays, 7)
    g = to_numpy(strategy.aggregate_train(7, [reply(a, filled(a, 1.0), 10), reply(b, filled(b, 3.0), 30)])[0])
    covered, only_b = [6, 7, 0, 1], [2, 3, 4, 5]
    np.testing.assert_allclose(g["0.weight"][covered], 2.0)  # count-averaged, not weighted 1:3
    np.testing.assert_allclose(g["0.weight"][only_b], 3.0)
    np.testing.assert_allclose(g["2.weight"][:, covered], 2.0)
    np.testing.assert_allclose(g["2.bias"], 2.0)


def test_bytes_per_client_are_the_windows_size() -> None:
    fractions = [0.25, 0.5, 0.75, 1.0]
    strategy, arrays = fake_strategy("fedrolex", fractions, build=tiny_wide)
    msgs = messages(strategy, arrays, 5)
    strategy.aggregate_train(5, [reply(m, filled(m, 0.0), 10) for m in msgs])
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    for row, p in zip(rows, fractions):
        h = scaled(8, p)
        assert row.status == "ok" and row.bytes_down == row.bytes_up == 4 * (6 * h + h + 4 * h + 4)
        assert row.bytes_down == footprint(tiny_wide(p), (6,)).bytes("fp32")


def test_a_flattened_conv_moves_by_whole_channels() -> None:
    """The digits CNN's first Linear reads 128 channels × 4 positions: its window is whole channels' features."""
    from maestro_fl.config import SimConfig, resolve
    from maestro_fl.federated import make_method
    from maestro_fl.models import InputSpec

    cfg = resolve(SimConfig, overrides={"strategy": "fedrolex", "model": "cnn"})
    method = make_method(cfg, InputSpec.image(1, 8, 10))
    cost = next(c for c in method.cost_table() if c.fraction == 0.5)
    index = method.index(cost, server_round=3)  # channels start at 2
    conv3, fc1 = index["7.weight"], index["12.weight"]
    assert conv3[0] == slice(2, 66)  # 64 of 128 output channels
    assert fc1[1] == slice(8, 264)  # the same 64 channels × 4 positions of the flattened input
    assert fc1[0] == slice(2, 66)  # 64 of its 128 units


# -- on ranks ----------------------------------------------------------------------------------
def test_rank_windows_roll_over_the_components_and_wrap_around() -> None:
    """Layer 0 has R = 5 components; a rank-2 client holds components (t-1, t) mod 5 of U and Vᵀ."""
    strategy, arrays = fake_strategy("fedrolex_rank", [0.4, 1.0], keep_first=0, keep_classifier=False)
    full = to_numpy(arrays)
    for server_round, comps in [(1, [0, 1]), (3, [2, 3]), (5, [4, 0])]:
        low, high = messages(strategy, arrays, server_round)
        got = sent(low)
        np.testing.assert_array_equal(got["0.in_network.weight"], full["0.in_network.weight"][comps])
        np.testing.assert_array_equal(got["0.out_network.weight"], full["0.out_network.weight"][:, comps])
        np.testing.assert_array_equal(got["0.out_network.bias"], full["0.out_network.bias"])
        assert sent(high)["0.in_network.weight"].shape == (5, 6)
        assert list(low.content["config"]["level-ranks"]) == []  # no ordered dropout: the whole window trains


def test_rank_windows_merge_back_count_averaged() -> None:
    """Round 5: A (rank 2 of 5, 10 examples) holds components 4, 0 and sends 1s; B (full, 30) sends 3s."""
    strategy, arrays = fake_strategy("fedrolex_rank", [0.4, 1.0], [10, 30], keep_first=0, keep_classifier=False)
    a, b = messages(strategy, arrays, 5)
    g = to_numpy(strategy.aggregate_train(5, [reply(a, filled(a, 1.0), 10), reply(b, filled(b, 3.0), 30)])[0])
    np.testing.assert_allclose(g["0.in_network.weight"][[4, 0]], 2.0)
    np.testing.assert_allclose(g["0.in_network.weight"][[1, 2, 3]], 3.0)
    np.testing.assert_allclose(g["0.out_network.weight"][:, [4, 0]], 2.0)
    row = {r.partition_id: r for r in strategy.client_rounds}[0]
    assert row.bytes_down == row.bytes_up == 4 * (2 * (6 + 5) + 5 + 2 * (5 + 4) + 4)  # its window and the biases
