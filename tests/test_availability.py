"""Devices that come and go: online schedules on the simulated clock (maestro_fl/availability.py, the server core).

Hand-computed schedules first (who is online when, when an interval ends, when
someone is next online), then the server's use of them (who is selected, who
drops out, how the clock moves), bad trace files, and whole runs from a trace
and from the diurnal generator, checked against the trace itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maestro_fl import message_keys as P
from maestro_fl.availability import OnlineSchedule, diurnal_schedule, load_trace
from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.server import round_latency, time_jitter
from tests.fakes import fake_strategy, messages, moved, reply, rows_by_partition
from tests.test_simulation import Interrupt, StopAfterTwo, always_online_population, local

SMALL = {"model": "mlp", "num_clients": 6, "clients_per_round": 6, "rounds": 4, "local_epochs": 1,
         "partition": "iid", "progress": False, "backend": "local"}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def write_trace(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    path.write_text("client,start_s,end_s\n" + "".join(f"{c},{s},{e}\n" for c, s, e in rows))
    return path


def test_a_trace_says_who_is_online_until_when_and_repeats_after_its_last_end(tmp_path: Path) -> None:
    schedule = load_trace(write_trace(tmp_path / "t.csv", [(0, 0, 10), (0, 20, 40), (1, 5, 15), (2, 30, 40),
                                                           (2, 0, 5), (3, 0, 40)]), 4)
    assert schedule.period_s == 40
    assert schedule.online_until(0, 0.0) == 10 and schedule.online_until(0, 9.99) == 10
    assert schedule.online_until(0, 10.0) is None
    assert schedule.online_until(0, 25.0) == 50  # [20, 40) runs on into the next period's [0, 10)
    assert schedule.online_until(1, 4.0) is None and schedule.online_until(1, 5.0) == 15
    # client 2 is online from 30 to the period's end and from 0 again: one interval, [30, 45)
    assert schedule.online_until(2, 35.0) == 45 and schedule.online_until(2, 2.0) == 5
    assert schedule.online_until(3, 12.0) == math.inf  # online all the time
    assert schedule.online_until(0, 41.0) == 50 and schedule.online_until(1, 50.0) == 55  # the next period
    assert [schedule.online(k, 17.0) for k in range(4)] == [False, False, False, True]
    assert schedule.online_share(0) == 0.75 and schedule.online_share(1) == 0.25


def test_next_online_is_the_first_start_when_nobody_is_online() -> None:
    schedule = OnlineSchedule(starts=((10.0,), (15.0, 50.0)), ends=((20.0,), (30.0, 60.0)), period_s=60.0)
    assert schedule.next_online(0.0) == 10.0
    assert schedule.next_online(12.0) == 12.0  # client 0 is online: no wait
    assert schedule.next_online(31.0) == 50.0
    assert schedule.next_online(61.0) == 70.0  # the next period's first start


def test_the_diurnal_generator_gives_each_tier_its_duty_from_a_seeded_phase() -> None:
    tiers = [0, 1, 2] * 20
    schedule = diurnal_schedule(tiers, 100.0, (0.2, 0.5, 1.0), seed=3)
    shares = [schedule.online_share(k) for k in range(len(tiers))]
    assert shares == pytest.approx([(0.2, 0.5, 1.0)[t] for t in tiers])
    assert all(schedule.online_until(k, 7.0) == math.inf for k in range(2, 60, 3))  # duty 1: always online
    # sampled on a fine grid, a client is online its duty's share of the day, wherever its phase wraps
    grid = np.arange(0.0, 100.0, 0.01)
    for k in range(6):
        assert np.mean([schedule.online(k, t) for t in grid]) == pytest.approx(shares[k], abs=2e-3)
    assert diurnal_schedule(tiers, 100.0, (0.2, 0.5, 1.0), seed=3) == schedule
    assert diurnal_schedule(tiers, 100.0, (0.2, 0.5, 1.0), seed=4) != schedule
    with pytest.raises(ValueError, match="diurnal_duty has 2 entries, the population has tiers 0-2"):
        diurnal_schedule(tiers, 100.0, (0.2, 0.5), seed=3)


def test_the_server_selects_who_is_online_drops_who_goes_offline_and_moves_its_clock(tmp_path: Path) -> None:
    """Four clients, all selected when online. The round's simulated seconds come from the server's cost model
    (a reference round without a schedule gives them); the trace is written around them:
    client 0 online throughout, 1 offline at the start, 2 online for half its round, 3 online throughout."""
    reference, arrays = fake_strategy("fedlod", [1.0] * 4)
    ref_msgs = messages(reference, arrays)
    reference.aggregate_train(1, [reply(m, moved(m, i), 10) for i, m in enumerate(ref_msgs)])
    seconds = [rows_by_partition(reference)[i].round_seconds for i in range(4)]
    assert min(seconds) > 0

    trace = write_trace(tmp_path / "t.csv", [(0, 0, 1e6), (1, 1e5, 1e6), (2, 0, seconds[2] / 2), (3, 0, 1e6)])
    strategy, arrays = fake_strategy("fedlod", [1.0] * 4, availability=str(trace))
    msgs = messages(strategy, arrays)
    assert sorted(strategy.partition_of[m.metadata.dst_node_id] for m in msgs) == [0, 2, 3]
    assert strategy.core.round_start_s == 0.0
    strategy.aggregate_train(1, [reply(m, moved(m, i), 10) for i, m in enumerate(msgs)])
    rows = rows_by_partition(strategy)
    assert [rows[i].status for i in (0, 2, 3)] == ["ok", "offline", "ok"]
    assert f"went offline {seconds[2] / 2:.1f}s into a {seconds[2]:.1f}s round" in rows[2].reason
    # the round lasts as long as its slowest counted client; the one that went offline holds nothing up
    assert strategy.core.round_seconds == max(seconds[0], seconds[3])
    assert strategy.core.clock_s == strategy.core.round_seconds

    # round 2 starts at the clock: client 2 is offline now, client 1 not yet online
    msgs = messages(strategy, arrays, server_round=2)
    assert strategy.core.round_start_s == strategy.core.clock_s
    assert sorted(strategy.partition_of[m.metadata.dst_node_id] for m in msgs) == [0, 3]


def test_a_round_when_nobody_is_online_starts_when_the_first_client_is(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", [(0, 100, 1e6), (1, 250, 1e6)])
    strategy, arrays = fake_strategy("fedlod", [1.0, 1.0], availability=str(trace))
    msgs = messages(strategy, arrays)
    assert strategy.core.round_start_s == 100.0
    assert [strategy.partition_of[m.metadata.dst_node_id] for m in msgs] == [0]
    strategy.aggregate_train(1, [reply(msgs[0], moved(msgs[0], 0), 10, **{P.SAMPLE_PASSES: 30})])
    assert strategy.core.clock_s == 100.0 + rows_by_partition(strategy)[0].round_seconds


def test_a_round_lasts_until_its_last_counted_reply_or_its_last_dropout() -> None:
    assert round_latency([3.0, 5.0], [7.0], 0.0) == 7.0  # the server waited for the client until it went offline
    assert round_latency([3.0, 5.0], [7.0], 0.0, closed_at_k=True) == 5.0  # over-selection closed at the K-th
    assert round_latency([3.0, 5.0], [7.0], 6.0) == 6.0  # never past the deadline
    assert round_latency([], [4.0], 0.0) == 4.0 and round_latency([], [], 0.0) == 0.0


@pytest.mark.parametrize("rows,message", [
    ("client,start_s,end_s\n0,0,10\n0,5,20\n1,0,5\n", r"lines 2 and 3: client 0's intervals overlap"),
    ("client,start_s,end_s\n0,-5,10\n1,0,5\n", r"line 2: start_s and end_s must be >= 0"),
    ("client,start_s,end_s\n0,0,10\n7,0,5\n", r"line 3: client '7' is not a client of the run \(an integer in \[0, 2\)\)"),
    ("client,start_s,end_s\n0,0,10\n", r"never online \(no row\): client\(s\) 1;"),
    ("client,start_s,end_s\n0,10,10\n1,0,5\n", r"line 2: end_s \(10\) must be after start_s \(10\)"),
    ("client,start,end_s\n0,0,10\n1,0,5\n", r"missing column\(s\) \['start_s'\]"),
    ("client,start_s,end_s\n0,zero,10\n1,0,5\n", r"line 2: start_s must be a finite number, got 'zero'"),
], ids=["overlap", "negative", "unknown-client", "never-online", "empty-interval", "missing-column", "not-a-number"])
def test_a_bad_trace_file_gets_one_line_naming_it_before_anything_starts(tmp_path: Path, rows: str, message: str) -> None:
    (tmp_path / "t.csv").write_text(rows)
    with pytest.raises(ConfigError, match=message) as err:
        resolve(SimConfig, overrides={"num_clients": 2, "clients_per_round": 2, "availability": str(tmp_path / "t.csv")})
    assert "\n" not in str(err.value) and "t.csv" in str(err.value)


def test_bad_diurnal_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"diurnal_duty must be shares of the day in \(0, 1\]"):
        resolve(SimConfig, overrides={"availability": "diurnal", "diurnal_duty": "0.5,1.5"})
    with pytest.raises(ConfigError, match="diurnal_duty has 2 entries, the population has tiers 0-4"):
        resolve(SimConfig, overrides={"availability": "diurnal", "diurnal_duty": "0.2,0.5"})
    with pytest.raises(ConfigError, match="diurnal_day_s must be a positive number"):
        resolve(SimConfig, overrides={"availability": "diurnal", "diurnal_day_s": 0})
    with pytest.raises(ConfigError, match="availability 'nowhere.csv': no such file"):
        resolve(SimConfig, overrides={"availability": "nowhere.csv"})


def online_in_trace(trace: pd.DataFrame, client: int, t: float) -> float | None:
    """The end of the trace interval holding ``t`` for ``client`` (the test's own reading of the file)."""
    period = trace["end_s"].max()
    tau = t % period
    rows = trace[(trace["client"] == client) & (trace["start_s"] <= tau) & (tau < trace["end_s"])]
    return None if rows.empty else float(t - tau + rows["end_s"].iloc[0])


def test_a_run_from_a_trace_selects_and_drops_exactly_as_the_trace_says(tmp_path: Path) -> None:
    """Every round: the selected clients are those the file has online at the round's start, a client drops
    out where its interval ends before its simulated round does, and the clock goes on from the last round."""
    population = always_online_population(tmp_path / "population.csv", 6)
    first = local(resolve(SimConfig, overrides=SMALL | {"devices": str(population), "out_dir": str(tmp_path),
                                                        "rounds": 1}), tmp_path / "probe")
    assert first
    seconds = pd.read_csv(tmp_path / "probe" / "clients.csv")["round_seconds"]
    unit = float(seconds.median())  # a typical client's simulated round
    rows = [(k, (k % 3) * unit, (k % 3) * unit + (0.5 + k) * unit) for k in range(6)] + [(k, 9 * unit, 12 * unit)
                                                                                           for k in range(6)]
    trace_file = write_trace(tmp_path / "trace.csv", rows)
    cfg = resolve(SimConfig, overrides=SMALL | {"devices": str(population), "out_dir": str(tmp_path),
                                                "availability": str(trace_file), "rounds": 6})
    local(cfg, tmp_path / "run")
    trace = pd.read_csv(trace_file)
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert clients["status"].isin(["ok", "offline"]).all() and (clients["status"] == "offline").any()
    previous_end = 0.0
    for _, r in rounds.iterrows():
        start = r["sim_start_s"]
        assert start >= previous_end * (1 - 1e-5) - 2e-4
        online = {k for k in range(6) if online_in_trace(trace, k, start) is not None}
        assert online, f"round {r['round']} started when nobody was online"
        these = clients[clients["round"] == r["round"]]
        assert set(these["partition_id"]) == online
        for _, c in these.iterrows():
            until = online_in_trace(trace, int(c["partition_id"]), start)
            assert until is not None
            assert (c["status"] == "offline") == (start + c["round_seconds"] > until), (r["round"], c.to_dict())
        # the round lasts until its last reply that counts, or its last client going offline (6 significant digits kept)
        ends = [c["round_seconds"] if c["status"] == "ok" else online_in_trace(trace, int(c["partition_id"]), start)
                - start for _, c in these.iterrows()]
        assert r["sim_seconds"] == pytest.approx(max(ends), rel=1e-5, abs=2e-4)
        assert r["sim_seconds_total"] == pytest.approx(start + r["sim_seconds"], rel=1e-5, abs=2e-4)
        previous_end = r["sim_seconds_total"]


def test_a_diurnal_run_resumes_on_its_clock_with_the_uninterrupted_tables(tmp_path: Path) -> None:
    """Weak devices online less (duty by tier); a short day so the online set changes between rounds."""
    population = always_online_population(tmp_path / "population.csv", 6)
    cfg = resolve(SimConfig, overrides=SMALL | {"devices": str(population), "out_dir": str(tmp_path),
                                                "availability": "diurnal", "diurnal_day_s": 200.0,
                                                "diurnal_duty": "0.4,0.9"})
    local(cfg, tmp_path / "full")
    with pytest.raises(Interrupt):
        local(cfg, tmp_path / "cut", extra_callbacks=[StopAfterTwo()])
    local(cfg, tmp_path / "cut")
    for table in ("rounds.csv", "clients.csv", "tiers.csv"):
        a, b = pd.read_csv(tmp_path / "full" / table), pd.read_csv(tmp_path / "cut" / table)
        timing = [c for c in a.columns if "wall" in c or c == "server_seconds"]
        pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing), obj=table)
    clients = pd.read_csv(tmp_path / "full" / "clients.csv")
    per_tier = clients.groupby("tier").size()
    assert per_tier[0] < per_tier[1]  # tier 0 is online 40% of the day, tier 1 90%


def test_time_jitter_varies_each_clients_seconds_by_a_seeded_factor_of_mean_one() -> None:
    assert time_jitter(0.0, 0, 1, 2) == (1.0, 1.0)
    assert time_jitter(0.3, 0, 1, 2) == time_jitter(0.3, 0, 1, 2) != time_jitter(0.3, 0, 2, 2)
    factors = np.array([time_jitter(0.3, 0, r, k) for r in range(1, 201) for k in range(20)])
    assert factors.mean(axis=0) == pytest.approx([1.0, 1.0], abs=0.03)
    assert np.log(factors).std(axis=0) == pytest.approx([0.3, 0.3], abs=0.02)

    plain, arrays = fake_strategy("fedlod", [1.0] * 3)
    msgs = messages(plain, arrays)
    plain.aggregate_train(1, [reply(m, moved(m, i), 10) for i, m in enumerate(msgs)])
    jittered, arrays = fake_strategy("fedlod", [1.0] * 3, time_jitter=0.3)
    msgs = messages(jittered, arrays)
    jittered.aggregate_train(1, [reply(m, moved(m, i), 10) for i, m in enumerate(msgs)])
    for k in range(3):
        a, b = rows_by_partition(plain)[k], rows_by_partition(jittered)[k]
        compute, link = time_jitter(0.3, 0, 1, k)
        assert b.compute_s == pytest.approx(a.compute_s * compute) and b.upload_s == pytest.approx(a.upload_s * link)
        assert b.macs == a.macs  # the work is the same; the device was slower or faster this round


def test_plan_shows_the_share_of_time_each_tier_is_online() -> None:
    from strategies.cli.plan import plan

    cfg = resolve(SimConfig, overrides={"model": "mlp", "num_clients": 10, "clients_per_round": 5,
                                        "availability": "diurnal", "diurnal_duty": "0.1,0.3,0.5,0.7,0.9"})
    text = plan(cfg)
    assert "availability=diurnal" in text and "repeats every 86400 simulated s" in text
    for tier, duty in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        assert f"tier {tier}: {duty:.2f}" in text
