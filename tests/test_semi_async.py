"""Semi-asynchronous rounds (``round_mode`` fedbuff and fedasync): hand-computed schedules and merges.

First the maths (staleness weights, rebasing a stale update, which updates a
buffer flushes), then the server core on hand-made replies whose simulated
seconds are set by the passes they report (who is in flight, who merges when,
with what staleness and weight), then whole runs: the same tables with clients
slowed in real time, and a resumed run with updates in flight at its checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maestro_fl import message_keys as P
from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.results import load_checkpoint
from maestro_fl.server import IN_FLIGHT, FederationServer, Registration, buffer_flush, rebased_update, staleness_weight
from maestro_fl.submodels import take
from strategies.submodel_strategy import SubModelStrategy
from tests.fakes import fake_strategy, filled, messages, reply, rows_by_partition, sent
from tests.test_simulation import Interrupt, StopAfterTwo, local

#: a pass's compute is tiny on the fake devices (1e9 MACs/s): a unit of this many passes is ~1e-1 s, far above
#: the transfers (~1e-4 s), so the finishing order is the order of the units each reply reports
UNIT = 10**6

SMALL = {"model": "mlp", "num_clients": 6, "clients_per_round": 4, "rounds": 4, "local_epochs": 1,
         "partition": "iid", "progress": False, "backend": "local", "round_mode": "fedbuff", "buffer_size": 2,
         "tier_shares": "0.5,0,0,0,0.5"}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_staleness_discounts_polynomially() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)  # FedBuff's 1/sqrt(1 + 3)
    assert staleness_weight(3, 0.0) == 1.0  # a = 0: no discount
    assert staleness_weight(1, 1.0) == pytest.approx(0.5)


def test_a_stale_update_moves_the_current_model_at_its_own_index() -> None:
    current = {"w": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)}
    index = {"w": (slice(0, 2), np.array([0, 2]))}  # both rows, columns 0 and 2
    delta = {"w": np.array([[1.0, -2.0], [0.0, 4.0]])}
    out = rebased_update(current, index, delta, 0.5)
    np.testing.assert_array_equal(out["w"], [[1.5, 2.0], [4.0, 8.0]])
    assert out["w"].dtype == np.float32


def test_a_buffer_flushes_its_earliest_finishes_ties_to_the_lower_partition() -> None:
    class Job:
        def __init__(self, partition: int, finish: float) -> None:
            self.finish_s, self.task = finish, type("T", (), {"partition": partition})()

    jobs = [Job(3, 5.0), Job(1, 9.0), Job(0, 5.0), Job(2, 1.0)]
    merged, waiting = buffer_flush(jobs, 2)  # type: ignore[arg-type]
    assert [j.task.partition for j in merged] == [2, 0] and [j.task.partition for j in waiting] == [3, 1]


def units(n: float) -> dict[str, int]:
    return {P.SAMPLE_PASSES: int(n * UNIT)}


def by_partition(strategy: SubModelStrategy, msgs: list) -> dict[int, object]:  # type: ignore[type-arg]
    return {strategy.partition_of[m.metadata.dst_node_id]: m for m in msgs}


def test_fedbuff_merges_the_first_k_to_finish_and_discounts_the_stale_ones() -> None:
    """Four clients in flight, K = 2; the replies' passes set who finishes when (in units):

    step 1: all four sent the model M0; they finish at 40, 10, 30, 20: 1 and 3 merge (staleness 0);
    step 2: 1 and 3 (idle again) are sent M1 and finish at 20 + 15 and 20 + 25: 2 (30, sent in step 1) and
            1 (35) merge; 2 with staleness 1; 0 and 3 are still in flight when the run (2 steps) ends: late.
    """
    strategy, arrays = fake_strategy("fedlod", [1.0] * 4, round_mode="fedbuff", buffer_size=2, rounds=2)
    msgs = by_partition(strategy, messages(strategy, arrays, 1))
    assert sorted(msgs) == [0, 1, 2, 3]
    m0 = sent(msgs[0])
    values = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    finish = {0: 40, 1: 10, 2: 30, 3: 20}
    record, _ = strategy.aggregate_train(1, [reply(m, filled(m, values[p]), 10, **units(finish[p]))
                                             for p, m in msgs.items()])
    assert record is not None
    rows = rows_by_partition(strategy)
    assert sorted(rows) == [1, 3] and all(r.status == "ok" and r.staleness == 0 for r in rows.values())
    m1 = {k: np.asarray(v.numpy()) for k, v in record.items()}
    for k in m1:  # fresh updates: the plain mean of what 1 and 3 sent (equal examples)
        np.testing.assert_allclose(m1[k], 3.0, rtol=1e-6)
    assert strategy.core.clock_s == pytest.approx(rows[3].round_seconds)
    assert sorted(j.task.partition for j in strategy.core.in_flight) == [0, 2]

    msgs2 = by_partition(strategy, list(strategy.configure_train(2, record, None, grid=None)))  # type: ignore[arg-type]
    assert sorted(msgs2) == [1, 3]  # only the idle clients are sent the new model
    record2, _ = strategy.aggregate_train(2, [reply(m, filled(m, 10.0 * (p + 1)), 10, **units({1: 15, 3: 25}[p]))
                                              for p, m in msgs2.items()])
    assert record2 is not None
    rows2 = rows_by_partition(strategy)
    assert {p: (r.status, r.staleness, r.round) for p, r in rows2.items()} == {
        0: ("late", 0, 2), 1: ("ok", 0, 2), 2: ("ok", 1, 2), 3: ("late", 0, 2)}
    assert "still training when the run ended (sent in round 1)" in rows2[0].reason
    w = staleness_weight(1, 0.5)
    for k, v in record2.items():  # M2 = M1 + (w (3 − M0) + (20 − M1)) / 2, by hand
        expected = m1[k] + (w * (3.0 - m0[k]) + (20.0 - m1[k])) / 2
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5)
    assert strategy.core.clock_s == pytest.approx(rows[3].round_seconds + rows2[1].round_seconds)
    assert strategy.core.in_flight == []


def test_fedasync_merges_each_update_mixed_in_by_alpha() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0] * 2, round_mode="fedasync", async_mixing=0.5, rounds=5)
    msgs = by_partition(strategy, messages(strategy, arrays, 1))
    m0 = sent(msgs[0])
    record, _ = strategy.aggregate_train(1, [reply(m, filled(m, 7.0), 10, **units(p + 1)) for p, m in msgs.items()])
    assert [r.partition_id for r in strategy.client_rounds] == [0]  # the first to finish, alone
    assert record is not None
    for k, v in record.items():  # x + α (trained − sent), staleness 0
        np.testing.assert_allclose(v.numpy(), m0[k] + 0.5 * (7.0 - m0[k]), rtol=1e-6)


def test_a_resumed_core_merges_what_was_in_flight_as_the_uninterrupted_one() -> None:
    """The updates in flight go through :meth:`state` (the checkpoint's server_state) to a new core whose nodes
    have other ids; the next step merges the same arrays with the same rows."""
    def step_one() -> tuple[SubModelStrategy, object]:
        strategy, arrays = fake_strategy("fedrolex", [0.5, 1.0, 0.5], round_mode="fedbuff", buffer_size=1, rounds=3)
        msgs = by_partition(strategy, messages(strategy, arrays, 1))
        record, _ = strategy.aggregate_train(1, [reply(m, filled(m, p + 1.0), 10, **units(p + 1))
                                                 for p, m in msgs.items()])
        return strategy, record

    going, record = step_one()
    state = going.core.state()
    assert any(k.startswith(IN_FLIGHT) for k in state) and len(going.core.in_flight) == 2

    resumed, _ = step_one()
    fresh = FederationServer(resumed.method, resumed.cfg, population=resumed.core.population)
    fresh.register(Registration(200 + i, i, 10) for i in range(3))  # new node ids
    fresh.restore(state)
    assert [(j.task.partition, j.task.node - 100, j.sent_round) for j in going.core.in_flight] == \
        [(j.task.partition, j.task.node - 200, j.sent_round) for j in fresh.in_flight]
    assert sorted(j.task.partition for j in fresh.in_flight) == [1, 2]
    current = {k: np.asarray(v.numpy()) for k, v in record.items()}  # type: ignore[attr-defined]
    for a, b in zip(going.core.in_flight, fresh.in_flight):  # the same parts of the model, the same changes
        assert a.finish_s == b.finish_s and a.row == replace(b.row, node_id=a.row.node_id)
        cut_a, cut_b = take(current, a.task.index), take(current, b.task.index)
        assert cut_a.keys() == cut_b.keys() and all(np.array_equal(cut_a[k], cut_b[k]) for k in cut_a)
        assert all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta)
    fresh.clock_s = going.core.clock_s
    outputs = []
    for core in (going.core, fresh):
        core.configure(2, current)
        outputs.append((core.receive(2, []), [(r.partition_id, r.status, r.staleness) for r in core.client_rounds]))
    (a_merged, a_rows), (b_merged, b_rows) = outputs
    assert a_rows == b_rows and ("ok" in {s for _, s, _ in a_rows})
    assert a_merged is not None and b_merged is not None
    for k in a_merged:
        np.testing.assert_array_equal(a_merged[k], b_merged[k])


@pytest.mark.parametrize("overrides,message", [
    ({"round_mode": "fedbuff", "buffer_size": 9}, r"buffer_size \(9\) must be <= clients_per_round \(4\)"),
    ({"round_mode": "fedbuff", "over_selection": 0.3}, r"over_selection applies to round_mode='sync'"),
    ({"round_mode": "fedbuff", "server_shrink_eps": 0.1}, r"server_shrink_eps changes the global model's shape"),
    ({"round_mode": "fedasync", "async_mixing": 0.0}, r"async_mixing must be in \(0, 1\]"),
    ({"round_mode": "buffered"}, r"round_mode"),
], ids=["buffer", "over-selection", "shrink", "mixing", "unknown"])
def test_a_bad_semi_async_setting_is_one_line(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        resolve(SimConfig, overrides={"num_clients": 8, "clients_per_round": 4} | overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", ["fedhm", "dlrt"])
def test_a_rule_that_refactors_the_model_refuses_stale_updates(strategy: str) -> None:
    with pytest.raises(ConfigError, match="re-factors the model every round"):
        fake_strategy(strategy, [1.0, 1.0], round_mode="fedbuff")


def test_a_fedbuff_run_resumes_with_its_updates_in_flight_and_the_uninterrupted_tables(tmp_path: Path) -> None:
    """Two tiers of very different speed: the fast devices merge several times while a slow one trains, so
    updates are in flight at the checkpoint after round 2."""
    cfg = resolve(SimConfig, overrides=SMALL | {"out_dir": str(tmp_path)})
    local(cfg, tmp_path / "full")
    with pytest.raises(Interrupt):
        local(cfg, tmp_path / "cut", extra_callbacks=[StopAfterTwo()])
    held = load_checkpoint(tmp_path / "cut" / "checkpoint.pt").server_state
    assert any(k.startswith(IN_FLIGHT) for k in held), "nothing in flight at the checkpoint: nothing to test"
    local(cfg, tmp_path / "cut")
    for table in ("rounds.csv", "clients.csv", "tiers.csv"):
        a, b = pd.read_csv(tmp_path / "full" / table), pd.read_csv(tmp_path / "cut" / table)
        timing = [c for c in a.columns if "wall" in c or c == "server_seconds"]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing), obj=table)
    clients = pd.read_csv(tmp_path / "full" / "clients.csv")
    assert (clients["staleness"] > 0).any(), "no stale update merged: the run would not test the buffer"
    assert (clients.groupby("round").apply(lambda r: (r["status"] == "ok").sum()) <= 2).all()  # K = 2 per step


def test_clients_slowed_in_real_time_leave_the_fedbuff_tables_unchanged(tmp_path: Path) -> None:
    cfg = resolve(SimConfig, overrides=SMALL | {"out_dir": str(tmp_path), "rounds": 3})
    local(cfg, tmp_path / "fast")
    slowed = resolve(SimConfig, overrides=SMALL | {"out_dir": str(tmp_path), "rounds": 3,
                                                   "fault_injection": "0:slow,3:slow"})
    local(slowed, tmp_path / "slow")
    for table in ("rounds.csv", "clients.csv", "tiers.csv"):
        a, b = pd.read_csv(tmp_path / "fast" / table), pd.read_csv(tmp_path / "slow" / table)
        timing = [c for c in a.columns if "wall" in c or c == "server_seconds"]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing), obj=table)
