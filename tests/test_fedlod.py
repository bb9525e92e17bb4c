"""FedLoD on the generic strategy, fed with fake replies (Flower's fedavgm_test.py style): no engine involved."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from maestro_fl import message_keys as P
from maestro_fl.budget import DeviceCapability
from strategies.submodel_strategy import to_numpy
from tests.fakes import ALL_LOD, fake_strategy, messages, moved, reply, rows_by_partition, sent


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def fedlod(fractions: list[float], examples: list[int] | None = None, **cfg: object):  # type: ignore[no-untyped-def]
    return fake_strategy("fedlod", fractions, examples, **(ALL_LOD | cfg))


def test_all_full_rank_is_identical_to_flowers_fedavg() -> None:
    strategy, arrays = fedlod([1.0, 1.0, 1.0], [10, 30, 5])
    msgs = messages(strategy, arrays)
    replies = [reply(m, moved(m, i), n) for i, (m, n) in enumerate(zip(msgs, [10, 30, 5]))]
    ours, metrics = strategy.aggregate_train(1, replies)
    flower = aggregate_arrayrecords([r.content for r in replies], P.NUM_EXAMPLES)
    for k, v in to_numpy(flower).items():
        np.testing.assert_allclose(to_numpy(ours)[k], v, rtol=1e-6, atol=1e-6)
    assert metrics["clients-ok"] == 3


def test_untrained_components_keep_their_values_and_prefixes_average() -> None:
    strategy, arrays = fedlod([0.2, 0.4], [1, 3])  # ranks: layer 0 of 5 -> 1 and 2; layer 2 of 4 -> 1 and 2
    before = to_numpy(arrays)
    msgs = messages(strategy, arrays)
    assert [sent(m)["0.in_network.weight"].shape[0] for m in msgs] == [1, 2]
    ups = [moved(m, i) for i, m in enumerate(msgs)]
    out, _ = strategy.aggregate_train(1, [reply(m, u, n) for m, u, n in zip(msgs, ups, [1, 3])])
    after = to_numpy(out)
    key = "0.in_network.weight"
    np.testing.assert_allclose(after[key][0], (1 * ups[0][key][0] + 3 * ups[1][key][0]) / 4, rtol=1e-6)
    np.testing.assert_allclose(after[key][1], ups[1][key][1], rtol=1e-6)
    np.testing.assert_array_equal(after[key][2:], before[key][2:])
    np.testing.assert_array_equal(after["0.out_network.weight"][:, 2:], before["0.out_network.weight"][:, 2:])


def test_bytes_to_and_from_each_client_scale_with_its_ranks() -> None:
    fractions = [0.2, 0.4, 0.6, 0.8, 1.0]
    strategy, arrays = fedlod(fractions)
    msgs = messages(strategy, arrays)
    out, _ = strategy.aggregate_train(1, [reply(m, moved(m, i), 10) for i, m in enumerate(msgs)])
    assert out is not None
    dense_bytes = 4 * (5 + 4)  # the biases travel whole
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    for row in rows:
        r0, r2 = row.ranks
        factor_bytes = 4 * (r0 * (6 + 5) + r2 * (5 + 4))  # r·(in + out) floats per layer
        assert row.bytes_down == dense_bytes + factor_bytes
        assert row.bytes_up == row.bytes_down
    assert [r.ranks for r in rows] == [[1, 1], [2, 2], [3, 3], [4, 4], [5, 4]]


@pytest.mark.parametrize(
    "fault,status,reason",
    [
        ("error", "failed", "boom"),
        ("nan", "malformed", "non-finite"),
        ("shape", "malformed", "wrong shape"),
        ("rank", "malformed", "wrong rank"),
        ("missing-metric", "malformed", "metrics incomplete"),
        ("silent", "timeout", "no reply"),
    ],
)
def test_faulty_reply_is_excluded_and_recorded(fault: str, status: str, reason: str) -> None:
    strategy, arrays = fedlod([1.0, 1.0, 1.0])
    msgs = messages(strategy, arrays)
    good = [reply(m, moved(m, i), 10) for i, m in enumerate(msgs[:2])]
    bad_msg = msgs[2]
    bad_arrays = moved(bad_msg, 9)
    key = "0.in_network.weight"
    if fault == "error":
        replies = good + [Message(Error(code=1, reason="boom"), reply_to=bad_msg)]
    elif fault == "silent":
        replies = good
    else:
        if fault == "nan":
            bad_arrays[key][0, 0] = np.nan
        elif fault == "shape":
            bad_arrays[key] = np.zeros((5, 7), dtype=np.float32)
        elif fault == "rank":
            bad_arrays[key] = np.zeros((6, 6), dtype=np.float32)
        bad = reply(bad_msg, bad_arrays, 10)
        if fault == "missing-metric":
            del bad.content[P.METRICS][P.SAMPLE_PASSES]
        replies = good + [bad]
    out, metrics = strategy.aggregate_train(1, replies)
    rows = rows_by_partition(strategy)
    assert rows[2].status == status and reason in rows[2].reason
    assert [rows[i].status for i in (0, 1)] == ["ok", "ok"]
    expected = aggregate_arrayrecords([r.content for r in good], P.NUM_EXAMPLES)
    for k, v in to_numpy(expected).items():
        np.testing.assert_allclose(to_numpy(out)[k], v, rtol=1e-6, atol=1e-6)
    assert metrics["clients-ok"] == 2


def test_deadline_drops_stragglers() -> None:
    strategy, arrays = fedlod([1.0, 1.0], round_deadline_s=2.5)
    msgs = messages(strategy, arrays)
    replies = [reply(m, moved(m, i), 10) for i, m in enumerate(msgs)]
    # the server charges 3 x the budgeted MACs per sample pass at the device's 1e9 MAC/s: 5 s of compute
    task = strategy.tasks[msgs[1].metadata.dst_node_id]
    replies[1].content[P.METRICS][P.SAMPLE_PASSES] = int(5.0 * task.device.macs_per_s / (3 * task.cost.macs))
    strategy.aggregate_train(1, replies)
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    assert [r.status for r in rows] == ["ok", "dropped"]
    assert 5.0 - 1e-6 <= rows[1].compute_s <= 5.0 and rows[0].round_seconds < 2.5


def test_sampling_respects_availability_and_seed() -> None:
    strategy, _ = fedlod([1.0] * 6, clients_per_round=3)
    assert strategy.sample(1) == strategy.sample(1)
    assert len(strategy.sample(1)) == 3
    for node in strategy.devices:
        strategy.devices[node] = DeviceCapability(0, 1e9, 1e9, 1e6, 1e6, availability=1e-9)
    strategy.set_population()
    assert strategy.sample(2) == []


def test_baseline_budgets() -> None:
    """FedAvg-dense ignores budgets; FedAvg-exclusive admits only devices that afford the full model."""
    weak = DeviceCapability(0, macs_per_s=1.0, memory_bytes=1.0, up_bps=1, down_bps=1, availability=1)
    strong = DeviceCapability(1, macs_per_s=1e12, memory_bytes=1e12, up_bps=1, down_bps=1, availability=1)
    for name in ("fedavg_dense", "fedavg_exclusive"):
        s, _ = fake_strategy(name, [0.0, 0.0], compute_budget_s=1.0)
        assert s.core.budget(strong).fraction == 1.0
        assert (s.core.budget(weak) is None) == (name == "fedavg_exclusive")
    dense, _ = fake_strategy("fedavg_dense", [0.0], compute_budget_s=1.0)
    assert dense.core.budget(weak).fraction == 1.0


def test_tiers_sampler_sends_the_tier_ranks_up_to_the_clients_own() -> None:
    strategy, arrays = fedlod([0.2, 0.4, 1.0], sampler="tiers")
    msgs = messages(strategy, arrays)
    # two LoD layers: ranks at 0.2 are (1, 1), at 0.4 (2, 2), at 1.0 (5, 4)
    assert [list(m.content[P.CONFIG][P.LEVEL_RANKS]) for m in msgs] == [[1, 1], [1, 1, 2, 2], [1, 1, 2, 2, 5, 4]]


def test_server_work_per_round_does_not_grow_with_the_population_squared() -> None:
    """Budgets are computed once per distinct device: 1000 clients of 5 kinds cost 5 budget evaluations."""
    strategy, arrays = fedlod([0.2, 0.4, 0.6, 0.8, 1.0] * 200, tiers=[0, 1, 2, 3, 4] * 200, clients_per_round=100)
    calls = []
    original = strategy.method.budget
    strategy.method.budget = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    for server_round in (1, 2, 3):
        msgs = messages(strategy, arrays, server_round)
        assert len(msgs) == 100
    assert len(calls) == 5
