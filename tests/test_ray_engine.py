"""The Ray grid for real: exactly one reply per message, dead and hung clients, Ctrl-C and resume, determinism."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from maestro_fl.config import SimConfig, resolve
from strategies.runners.launch import run_simulation
from tests.test_simulation import always_online_population, local

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

#: columns that depend on wall-clock time, not on the computation
WALL = {"wall_seconds", "train_wall_seconds", "server_seconds", "wall_s"}

ECHO_APP = '''
import random, time
from flwr.app import Message, RecordDict, MetricRecord, Context
from flwr.clientapp import ClientApp
app = ClientApp()
@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(random.random() * 0.01)
    return Message(RecordDict({"metrics": MetricRecord({"pid": int(context.node_config["partition-id"])})}),
                   reply_to=msg)
'''


def test_every_message_gets_exactly_one_reply_while_idle_actors_steal_work(
    shared_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from strategies.runners.ray_grid import RayGrid

    (tmp_path / "echo_app.py").write_text(ECHO_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    grid = RayGrid("echo_app:app", 300, num_actors=2, actor_options={"num_cpus": 1})
    try:
        for _ in range(6):
            msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n,
                            message_type=MessageType.TRAIN) for n in range(1, 151)]
            got = [m.metadata.src_node_id for m in grid.send_and_receive(msgs, timeout=60)]
            assert sorted(got) == list(range(1, 151))
    finally:
        grid.shutdown()


SLEEP_APP = '''
import os, time
from flwr.app import Message, RecordDict, MetricRecord, Context
from flwr.clientapp import ClientApp
app = ClientApp()
@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["config"]["sleep"]))
    return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid()})}), reply_to=msg)
'''


def test_a_message_waiting_behind_others_is_not_timed_out_and_a_hang_replaces_only_its_actor(
    shared_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 16: on a loaded machine a reply crossed the round's 15 s wall clock and the tables changed; a
    timed-out round replaced every running actor, whose cold starts then timed out the next round too.

    Here one actor takes eight messages of 0.5 s one after another under a 2.5 s timeout: 4 s of work, every
    reply arrives, because each message's timeout starts when it starts. Then, with two actors, one client
    hangs: it alone gets no reply, and the other actor (same process) serves the next round.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from strategies.runners.ray_grid import RayGrid

    def messages(sleeps: dict[int, float]) -> list[Message]:
        return [Message(RecordDict({"config": ConfigRecord({"sleep": s})}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n, s in sleeps.items()]

    (tmp_path / "sleep_app.py").write_text(SLEEP_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    one = RayGrid("sleep_app:app", 8, num_actors=1, actor_options={"num_cpus": 1}, batch_size=8)
    try:
        got = one.send_and_receive(messages({n: 0.5 for n in range(1, 9)}), timeout=2.5)
        assert sorted(m.metadata.src_node_id for m in got) == list(range(1, 9))
        assert one.restarts == 0
    finally:
        one.shutdown()

    two = RayGrid("sleep_app:app", 4, num_actors=2, actor_options={"num_cpus": 1}, batch_size=1)
    try:
        got = two.send_and_receive(messages({1: 600.0, 2: 0.0, 3: 0.0, 4: 0.0}), timeout=2.5)
        assert sorted(m.metadata.src_node_id for m in got) == [2, 3, 4]  # the hung client: no reply
        assert two.restarts == 1
        healthy = {int(m.content["metrics"]["pid"]) for m in got}
        again = two.send_and_receive(messages({n: 0.0 for n in range(1, 5)}), timeout=60)
        assert sorted(m.metadata.src_node_id for m in again) == [1, 2, 3, 4]
        assert healthy & {int(m.content["metrics"]["pid"]) for m in again}, "the healthy actor was replaced too"
    finally:
        two.shutdown()


def config(tmp_path: Path, **kw: object) -> SimConfig:
    trace = always_online_population(tmp_path / "population.csv", int(kw.get("num_clients", 10)))  # type: ignore[call-overload]
    return resolve(SimConfig, overrides={"model": "mlp", "num_clients": 10, "clients_per_round": 10, "rounds": 3,
                                        "local_epochs": 1, "partition": "iid", "progress": False,
                                        "devices": str(trace), "out_dir": str(tmp_path)} | kw)


def test_dead_and_hung_clients_cost_one_client_round_each_on_ray(shared_ray: None, tmp_path: Path, flwr_home: str) -> None:
    """Process exits, a segfault and a hang are recorded; the run ends; later rounds are untouched."""
    faults = ("1:exit@1,2:segfault@2,3:hang@2,4:raise,5:huge,6:duplicate,7:exit@3,8:nan,9:shape,10:dtype,"
              "11:examples,12:rank")  # a straggler ('timeout') is a hang that ends: the local tests have it
    # a replaced actor's start-up is not part of any message's timeout, so 5 s only has to fit one client's
    # local epoch; the 'timeout' status below shows the hang was ended by it, not by the stall guard
    run = run_simulation(config(tmp_path, backend="ray", run_name="faults", fault_injection=faults, num_clients=15,
                                clients_per_round=15, round_timeout_s=5.0))
    clients = pd.read_csv(run / "clients.csv", keep_default_na=False)
    status = {(r.partition_id, r.round): (r.status, r.reason) for r in clients.itertuples()}
    assert status[(1, 1)][0] == "failed" and "process died" in status[(1, 1)][1]
    assert status[(2, 2)][0] == "failed" and "process died" in status[(2, 2)][1]
    assert status[(7, 3)][0] == "failed" and "process died" in status[(7, 3)][1]
    assert status[(3, 2)] == ("timeout", "no reply within round_timeout_s")
    assert all(status[(4, r)][0] == "failed" for r in (1, 2, 3))
    assert all(status[(5, r)][0] == "malformed" for r in (1, 2, 3))
    assert all(status[(6, r)] == ("ok", "a second reply was ignored") for r in (1, 2, 3))
    for pid, reason in ((8, "non-finite"), (9, "wrong shape"), (10, "wrong dtype"), (11, "registered"),
                        (12, "wrong rank")):
        assert all(status[(pid, r)][0] == "malformed" and reason in status[(pid, r)][1] for r in (1, 2, 3))
    for pid in (0, 13, 14):  # healthy every round, also after the deaths
        assert all(status[(pid, r)][0] == "ok" for r in (1, 2, 3)), status
    for pid in (1, 2, 3, 7):  # the faulty clients are healthy in the other rounds
        assert sum(status[(pid, r)][0] == "ok" for r in (1, 2, 3)) == 2
    assert pd.read_csv(run / "rounds.csv")["round"].tolist() == [1, 2, 3]


def deterministic(run: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for table in ("rounds.csv", "tiers.csv", "clients.csv"):
        df = pd.read_csv(run / table, keep_default_na=False)
        out[table] = df.drop(columns=[c for c in df.columns if c in WALL or c == "node_id"])
    return out


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = deterministic(a), deterministic(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)


def test_the_same_seed_gives_identical_tables_on_local_and_on_ray(shared_ray: None, tmp_path: Path, flwr_home: str) -> None:
    """Client training runs on one thread whatever the process has, so local (2 threads here) = Ray (1 per actor)."""
    cfg = config(tmp_path, partition="dirichlet", rounds=3)
    ray_run = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "backend": "ray", "run_name": "ray"}))
    local_run = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "backend": "local", "run_name": "local"}))
    assert_same_tables(ray_run, local_run)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from strategies.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def started_by(proc: subprocess.Popen, until: Callable[[], bool], deadline: float) -> dict[int, object]:  # type: ignore[type-arg]
    """Every descendant of ``proc`` seen while waiting for ``until()`` (psutil processes by PID)."""
    import psutil

    seen: dict[int, object] = {}
    me = psutil.Process(proc.pid)
    while not until():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
        try:
            seen.update({c.pid: c for c in me.children(recursive=True)})
        except psutil.Error:
            pass
        time.sleep(0.1)
    seen.update({c.pid: c for c in me.children(recursive=True)})
    return seen


def left_alive(processes: dict[int, object], within: float = 30.0) -> list[str]:
    """The processes still alive after ``within`` seconds (zombies count as gone)."""
    import psutil

    deadline = time.monotonic() + within
    while True:
        alive = []
        for p in processes.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # type: ignore[attr-defined]
                    alive.append(f"{p.pid} {p.name()}")  # type: ignore[attr-defined]
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def signal_args(trace: Path, out_dir: Path) -> list[str]:
    """The interrupted run's settings: round 2 waits on a hung client, so a signal finds it mid-round."""
    return ["model=mlp", "num_clients=10", "clients_per_round=10", "rounds=3", "local_epochs=1", "partition=iid",
            "progress=false", f"devices={trace}", f"out_dir={out_dir}", "fault_injection=3:hang@2",
            # the timeout starts when a message starts, so it only has to fit one client's local epoch (~0.05 s
            # idle, under 1 s beside two busy processes): a loaded machine cannot fire it
            "round_timeout_s=5", "backend=ray"]


def signal_config(trace: Path, out_dir: Path, run_name: str) -> SimConfig:
    """:func:`signal_args` as the config that the CLI builds from them."""
    given = dict(arg.split("=", 1) for arg in signal_args(trace, out_dir))
    return resolve(SimConfig, overrides={**given, "run_name": run_name})


@pytest.fixture(scope="module")
def uninterrupted(shared_ray: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the devices file, the run directory) of the signal tests' run, uninterrupted: run once for both signals.

    In this process, on the shared Ray: only the interrupted run has to be a process of its own (it gets the
    signal); the same seed gives the same tables wherever the driver runs.
    """
    root = tmp_path_factory.mktemp("uninterrupted")
    trace = always_online_population(root / "population.csv", 10)
    return trace, run_simulation(signal_config(trace, root, "full"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_signal_mid_round_leaves_no_process_and_resume_gives_the_uninterrupted_tables(
    tmp_path: Path, flwr_home: str, sig: signal.Signals, uninterrupted: tuple[Path, Path]
) -> None:
    """SIGTERM (as ``timeout``, SLURM and Kubernetes stop a job) or SIGKILL of the driver while round 2 waits.

    Defect 11. Before: under ``timeout 300 maestro-fl simulate`` Ray's handler aborted the driver (exit 134,
    no resume hint) and a ray::ClientWorker outlived it with parent PID 1; after SIGKILL, Ray's agents lived on.
    Now: SIGTERM exits 143 with the resume line, tables and checkpoint at round 1; no process the run started
    is alive 30 s later (after SIGKILL too); the resumed run's tables equal an uninterrupted run's.
    """
    trace, full = uninterrupted
    args = signal_args(trace, tmp_path)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cli("simulate", *args, "run_name=cut"), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rounds = tmp_path / "cut" / "rounds.csv"
    seen = started_by(proc, lambda: rounds.exists() and len(rounds.read_text().splitlines()) >= 2,
                      time.monotonic() + 600)  # round 1 is written; round 2 waits on the hung client
    assert seen, "the run started no process"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-2000:]
        assert "maestro-fl simulate resume=" in err and "SIGTERM received" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert left_alive(seen) == []
    assert pd.read_csv(rounds)["round"].tolist() == [1]

    # resumed as `maestro-fl simulate resume=DIR` resumes it, in this process on the shared Ray
    resumed = run_simulation(resolve(SimConfig, overrides={"resume": str(tmp_path / "cut")}))
    assert resumed == tmp_path / "cut"
    assert_same_tables(full, resumed)


def test_the_local_backend_matches_the_in_process_grid_of_the_tests(tmp_path: Path) -> None:
    """run_simulation(backend=local) and the tests' LocalGrid helper run the same server loop."""
    cfg = config(tmp_path, backend="local", rounds=2)
    a = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "run_name": "a"}))
    local(cfg, tmp_path / "b")
    assert_same_tables(a, tmp_path / "b")


def test_clients_slowed_in_real_time_leave_the_tables_of_the_unslowed_run_with_over_selection(
    shared_ray: None, tmp_path: Path, flwr_home: str
) -> None:
    """Over-selection keeps the first clients to finish on the simulated clock: half the clients made slow in
    real time (they reply last on Ray's two actors) change no table, although some of them are kept and some
    of the others are late."""
    cfg = config(tmp_path, backend="ray", rounds=2, clients_per_round=5, over_selection=1.0, partition="dirichlet")
    fast = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "run_name": "fast"}))
    slowed = ",".join(f"{p}:slow" for p in range(0, 10, 2))
    slow = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "run_name": "slow", "fault_injection": slowed}))
    assert_same_tables(fast, slow)
    clients = pd.read_csv(slow / "clients.csv")
    assert (clients["status"] == "late").sum() == 2 * 5 and (clients["status"] == "ok").sum() == 2 * 5
    kept_slowed = clients[(clients["status"] == "ok") & (clients["partition_id"] % 2 == 0)]
    assert len(kept_slowed) > 0, "no slowed client was kept: the test would not tell the clocks apart"


def test_clients_slowed_in_real_time_leave_the_fedbuff_tables_of_the_unslowed_run(
    shared_ray: None, tmp_path: Path, flwr_home: str
) -> None:
    """FedBuff on Ray: which updates merge, and with what staleness, is decided on the simulated clock, so
    clients made slow in real time (they reply last on Ray's two actors) change no table."""
    cfg = config(tmp_path, backend="ray", rounds=3, clients_per_round=6, round_mode="fedbuff", buffer_size=3)
    fast = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "run_name": "fast"}))
    slowed = ",".join(f"{p}:slow" for p in range(1, 10, 2))  # the fast tier's clients, slowed in real time
    slow = run_simulation(resolve(SimConfig, overrides={**vars(cfg), "run_name": "slow", "fault_injection": slowed}))
    assert_same_tables(fast, slow)
    clients = pd.read_csv(slow / "clients.csv")
    merged = clients[clients["status"] == "ok"]
    assert (merged["staleness"] > 0).any() and (merged["partition_id"] % 2 == 1).any()
