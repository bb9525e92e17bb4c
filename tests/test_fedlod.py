"""FedLoD's aggregate_train fed with fake replies (Flower's fedavgm_test.py style): no engine involved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from maestro_fl import protocol as P
from maestro_fl.budget import DeviceCapability
from maestro_fl.config import SimConfig, resolve
from maestro_fl.convert import factorize
from strategies.fedlod import FedLoD, to_numpy


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def make_strategy(fractions: list[float], **cfg: object) -> tuple[FedLoD, ArrayRecord]:
    torch.manual_seed(0)
    template = factorize(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    config = resolve(SimConfig, overrides={"clients_per_round": len(fractions), "num_clients": len(fractions)} | cfg)
    strategy = FedLoD(template, (6,), config)
    for i, p in enumerate(fractions):
        node = 100 + i
        strategy.partition_of[node] = i
        strategy.examples_of[node] = 10
        strategy.devices[node] = DeviceCapability(i, 1e9, 1e9, 1e6, 1e6, availability=1.0, rank_fraction=p)
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in template.state_dict().items()})
    return strategy, arrays


def reply_to(msg: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: n,
            P.TRAIN_LOSS: 0.5,
            P.MACS: 1.0,
            P.COMPUTE_SECONDS: 1.0,
            P.DOWNLOAD_SECONDS: 0.5,
            P.UPLOAD_SECONDS: 0.5,
        }
    )
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({P.ARRAYS: record, P.METRICS: metrics}), reply_to=msg)


def trained(msg: Message, seed: int) -> dict[str, np.ndarray]:
    """What a client sends back: its received prefix, moved."""
    r = np.random.default_rng(seed)
    return {k: (v + r.normal(size=v.shape)).astype(np.float32) for k, v in to_numpy(msg.content[P.ARRAYS]).items()}


def test_all_full_rank_is_identical_to_flowers_fedavg() -> None:
    strategy, arrays = make_strategy([1.0, 1.0, 1.0])
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))
    replies = [reply_to(m, trained(m, i), n) for i, (m, n) in enumerate(zip(msgs, [10, 30, 5]))]
    ours, metrics = strategy.aggregate_train(1, replies)
    flower = aggregate_arrayrecords([r.content for r in replies], P.NUM_EXAMPLES)
    for k, v in to_numpy(flower).items():
        np.testing.assert_allclose(to_numpy(ours)[k], v, rtol=1e-6, atol=1e-6)
    assert metrics["clients-ok"] == 3


def test_untrained_components_keep_their_values_and_prefixes_average() -> None:
    strategy, arrays = make_strategy([0.2, 0.4])  # ranks: layer 0 of 5 -> 1 and 2; layer 2 of 4 -> 1 and 2
    before = to_numpy(arrays)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))
    sent = [to_numpy(m.content[P.ARRAYS]) for m in msgs]
    assert [v["0.in_network.weight"].shape[0] for v in sent] == [1, 2]
    ups = [trained(m, i) for i, m in enumerate(msgs)]
    out, _ = strategy.aggregate_train(1, [reply_to(m, u, n) for m, u, n in zip(msgs, ups, [1, 3])])
    after = to_numpy(out)
    key = "0.in_network.weight"
    np.testing.assert_allclose(after[key][0], (1 * ups[0][key][0] + 3 * ups[1][key][0]) / 4, rtol=1e-6)
    np.testing.assert_allclose(after[key][1], ups[1][key][1], rtol=1e-6)
    np.testing.assert_array_equal(after[key][2:], before[key][2:])
    np.testing.assert_array_equal(after["0.out_network.weight"][:, 2:], before["0.out_network.weight"][:, 2:])


def test_bytes_to_and_from_each_client_scale_with_its_ranks() -> None:
    fractions = [0.2, 0.4, 0.6, 0.8, 1.0]
    strategy, arrays = make_strategy(fractions)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))
    out, _ = strategy.aggregate_train(1, [reply_to(m, trained(m, i), 10) for i, m in enumerate(msgs)])
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
    strategy, arrays = make_strategy([1.0, 1.0, 1.0])
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))
    good = [reply_to(m, trained(m, i), 10) for i, m in enumerate(msgs[:2])]
    bad_msg = msgs[2]
    bad_arrays = trained(bad_msg, 9)
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
        bad = reply_to(bad_msg, bad_arrays, 10)
        if fault == "missing-metric":
            del bad.content[P.METRICS][P.COMPUTE_SECONDS]
        replies = good + [bad]
    out, metrics = strategy.aggregate_train(1, replies)
    rows = {r.partition_id: r for r in strategy.client_rounds}
    assert rows[2].status == status and reason in rows[2].reason
    assert [rows[i].status for i in (0, 1)] == ["ok", "ok"]
    expected = aggregate_arrayrecords([r.content for r in good], P.NUM_EXAMPLES)
    for k, v in to_numpy(expected).items():
        np.testing.assert_allclose(to_numpy(out)[k], v, rtol=1e-6, atol=1e-6)
    assert metrics["clients-ok"] == 2


def test_deadline_drops_stragglers() -> None:
    strategy, arrays = make_strategy([1.0, 1.0], round_deadline_s=2.5)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid=None))
    replies = [reply_to(m, trained(m, i), 10) for i, m in enumerate(msgs)]
    replies[1].content[P.METRICS][P.COMPUTE_SECONDS] = 5.0  # 5 + 0.5 + 0.5 s > 2.5 s (the other takes 2 s)
    strategy.aggregate_train(1, replies)
    assert [r.status for r in sorted(strategy.client_rounds, key=lambda r: r.partition_id)] == ["ok", "dropped"]


def test_sampling_respects_availability_and_seed() -> None:
    strategy, _ = make_strategy([1.0] * 6, clients_per_round=3)
    assert strategy.sample(1) == strategy.sample(1)
    assert len(strategy.sample(1)) == 3
    for node in strategy.devices:
        strategy.devices[node] = DeviceCapability(0, 1e9, 1e9, 1e6, 1e6, availability=1e-9)
    assert strategy.sample(2) == []


def test_baseline_budgets() -> None:
    """FedAvg-dense ignores budgets; FedAvg-exclusive admits only devices that afford the full model."""
    from strategies.baselines import FedAvgDense, FedAvgExclusive

    torch.manual_seed(0)
    dense_model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))  # not factorized
    cfg = resolve(SimConfig, overrides={"clients_per_round": 2, "num_clients": 2, "compute_budget_s": 1.0})
    weak = DeviceCapability(0, macs_per_s=1.0, memory_bytes=1.0, up_bps=1, down_bps=1, availability=1)
    strong = DeviceCapability(1, macs_per_s=1e12, memory_bytes=1e12, up_bps=1, down_bps=1, availability=1)
    for cls in (FedAvgDense, FedAvgExclusive):
        s = cls(dense_model, (6,), cfg)
        s.examples_of = {1: 10, 2: 10}
        assert s.budget(strong).fraction == 1.0
    assert FedAvgDense(dense_model, (6,), cfg).budget(weak).fraction == 1.0
    assert FedAvgExclusive(dense_model, (6,), cfg).budget(weak) is None


def test_tiers_sampler_sends_the_tier_ranks_up_to_the_clients_own() -> None:
    strategy, arrays = make_strategy([0.2, 0.4, 1.0], sampler="tiers")
    msgs = sorted(strategy.configure_train(1, arrays, ConfigRecord(), grid=None),
                  key=lambda m: strategy.partition_of[m.metadata.dst_node_id])
    # two LoD layers: ranks at 0.2 are (1, 1), at 0.4 (2, 2), at 1.0 (5, 4)
    assert [list(m.content[P.CONFIG][P.RANK_LEVELS]) for m in msgs] == [[1, 1], [1, 1, 2, 2], [1, 1, 2, 2, 5, 4]]
