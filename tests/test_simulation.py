"""The federation end to end: Flower's simulation engine with Ray, the in-process grid, resume, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from maestro_fl import message_keys as P
from maestro_fl.callbacks import RoundCallback, RoundResult
from maestro_fl.config import ConfigError, SimConfig, resolve
from strategies.runners.launch import load_ref, quiet_flower, run_simulation
from strategies.runners.local_grid import LocalGrid
from strategies.server_app import run_server

SMALL = {
    "model": "mlp",
    "num_clients": 6,
    "clients_per_round": 6,
    "rounds": 2,
    "local_epochs": 1,
    "partition": "iid",
    "progress": False,
}


def always_online_population(path: Path, n: int = 6) -> Path:
    """A device trace: two tiers, every client online every round (so counts are exact)."""
    rows = ["client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability,rank_fraction"]
    rows += [f"{i},{i % 2},{5e6 * (1 + 9 * (i % 2))},1e8,1e5,1e6,1.0,{0.25 if i % 2 == 0 else 1.0}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def small(tmp_path: Path, **kw: object) -> SimConfig:
    trace = always_online_population(tmp_path / "population.csv")
    return resolve(SimConfig, overrides=SMALL | {"out_dir": str(tmp_path), "devices": str(trace)} | kw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ray", "flower"])
def test_ray_engine_smoke(tmp_path: Path, flwr_home: str, backend: str, request: pytest.FixtureRequest) -> None:
    """A real simulation on Ray, on our grid and on Flower's engine: 6 clients, 2 rounds, one raising, one NaN."""
    # Flower's engine starts (and shuts down) a Ray of its own; our grid uses the test run's
    request.getfixturevalue("own_ray" if backend == "flower" else "shared_ray")
    run = run_simulation(small(tmp_path, backend=backend, run_name=backend, fault_injection="1:raise,4:nan"))
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    assert (rounds["failed"] == 1).all() and (rounds["malformed"] == 1).all()
    tiers = pd.read_csv(run / "tiers.csv")
    assert sorted(tiers["tier"].unique()) == [0, 1] and len(tiers) == 4
    clients = pd.read_csv(run / "clients.csv")
    assert set(clients.loc[clients["partition_id"] == 1, "status"]) == {"failed"}
    assert set(clients.loc[clients["partition_id"] == 4, "status"]) == {"malformed"}
    ok = clients[clients["status"] == "ok"]
    assert len(ok) == 8 and (ok["bytes_up"] > 0).all() and (ok["compute_s"] > 0).all()
    # the low tier (rank fraction 0.25) moves fewer bytes than the full tier
    per_tier = ok.groupby("tier")["bytes_down"].mean()
    assert per_tier[0] < per_tier[1]
    assert (run / "checkpoint.pt").exists() and (run / "devices.csv").exists()


def local(cfg: SimConfig, run_dir: Path, **kw: object):  # type: ignore[no-untyped-def]
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet_flower()
    return run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run_dir, **kw)


class Interrupt(Exception):
    pass


class StopAfterTwo(RoundCallback):
    """Interrupts a run after its second round (after the round's tables and checkpoint)."""

    def after_round(self, result: RoundResult) -> bool:
        if result.round == 2:
            raise Interrupt
        return False


@pytest.mark.parametrize("strategy,extra", [("fedlod", {}), ("heterofl", {}), ("fjord", {}), ("fedhm", {}),
                                            ("fedlod", {"server_momentum": 0.7})])  # its velocity is in the checkpoint
def test_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path, strategy: str, extra: dict[str, object]) -> None:
    cfg = small(tmp_path, rounds=4, backend="local", strategy=strategy, **extra)
    full = tmp_path / "full"
    local(cfg, full)

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        local(cfg, cut, extra_callbacks=[StopAfterTwo()])
    assert pd.read_csv(cut / "rounds.csv")["round"].tolist() == [1, 2]  # finished rounds are kept
    local(cfg, cut)  # resumes after round 2
    a, b = pd.read_csv(full / "tiers.csv"), pd.read_csv(cut / "tiers.csv")
    assert b["round"].tolist() == a["round"].tolist()
    pd.testing.assert_series_equal(a["accuracy"], b["accuracy"])
    pd.testing.assert_series_equal(a["loss"], b["loss"], rtol=1e-6)


def test_same_seed_same_final_accuracy(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=3, backend="local", partition="dirichlet")
    a = local(cfg, tmp_path / "a")
    b = local(cfg, tmp_path / "b")
    local(small(tmp_path, rounds=3, backend="local", partition="dirichlet", seed=1), tmp_path / "c")
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    la, lc = (pd.read_csv(tmp_path / d / "tiers.csv")["loss"].tolist() for d in ("a", "c"))
    assert la != lc


@pytest.mark.parametrize("fault,status", [("raise", "failed"), ("shape", "malformed"), ("rank", "malformed"), ("nan", "malformed")])
def test_faulty_client_is_recorded_and_run_continues(tmp_path: Path, fault: str, status: str) -> None:
    cfg = small(tmp_path, backend="local", fault_injection=f"2:{fault}")
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert set(clients.loc[clients["partition_id"] == 2, "status"]) == {status}
    assert (clients.loc[clients["partition_id"] != 2, "status"] == "ok").all()
    assert pd.read_csv(tmp_path / "run" / "rounds.csv")["round"].tolist() == [1, 2]


def test_client_that_times_out_is_recorded(tmp_path: Path) -> None:
    cfg = small(tmp_path, backend="local", rounds=1, fault_injection="5:timeout", round_timeout_s=1.5)
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert clients.loc[clients["partition_id"] == 5, "status"].tolist() == ["timeout"]
    assert (clients.loc[clients["partition_id"] != 5, "status"] == "ok").all()


def test_bad_simulation_config_names_the_field(tmp_path: Path) -> None:
    from maestro_fl.config import ConfigError

    for overrides, field in [
        ({"tier_shares": (0.5, 0.5), "tier_fractions": (0.5,)}, "tier_fractions"),
        ({"clients_per_round": 100}, "clients_per_round"),
        ({"tier_mode": "sometimes"}, "tier_mode"),
        ({"fault_injection": "x:boom"}, "fault_injection"),
        ({"devices": "/nonexistent.csv"}, "devices"),
        ({"resume": str(tmp_path)}, "resume"),
    ]:
        with pytest.raises(ConfigError, match=field):
            resolve(SimConfig, overrides=SMALL | overrides)


def test_federation_on_a_torchvision_dataset(tmp_path: Path) -> None:
    """MNIST from a local root (a fixture in torchvision's raw format) through the same federation."""
    from tests.test_data_and_config import write_idx_mnist

    write_idx_mnist(tmp_path / "data", "MNIST", n_train=40, n_test=10)
    cfg = small(
        tmp_path, backend="local", rounds=1, dataset="mnist", data_root=str(tmp_path / "data"), model="lenet5"
    )
    rows = local(cfg, tmp_path / "run")
    assert sorted(r["tier"] for r in rows) == [0, 1]
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert (clients["status"] == "ok").all() and len(clients) == 6


@pytest.mark.slow
def test_flwr_run_works_and_leaves_nothing_running(tmp_path: Path) -> None:
    """`flwr run .` through our wrapper: a private Flower home and SuperLink, stopped afterwards."""
    import psutil

    from strategies.runners.flwr_run import flwr_run

    before = {p.pid for p in psutil.process_iter() if "superlink" in " ".join(_cmd(p))}
    trace = always_online_population(tmp_path / "population.csv", 4)
    code = flwr_run(
        [f"{k}={v}" for k, v in {
            "num-clients": 4, "clients-per-round": 2, "rounds": 1, "model": "mlp", "partition": "iid",
            "devices": str(trace), "out-dir": str(tmp_path / "runs"), "run-name": "flwr", "progress": "false",
        }.items()]
    )
    assert code == 0
    rounds = pd.read_csv(tmp_path / "runs" / "flwr" / "rounds.csv")
    assert rounds["round"].tolist() == [1] and rounds["ok"].iloc[0] == 2
    after = {p.pid for p in psutil.process_iter() if "superlink" in " ".join(_cmd(p))}
    assert after <= before, "the wrapper left a SuperLink running"


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # Flower's use of pathspec
def test_the_staged_app_is_the_fab_that_flwr_run_builds_from_the_project(tmp_path: Path) -> None:
    """`flwr run DIR` walks every file under DIR (a .venv too) before it filters: the wrapper stages the app."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from strategies.runners.flwr_run import PROJECT_ROOT, stage_app

    project = tmp_path / "project"
    files = {"pyproject.toml": (PROJECT_ROOT / "pyproject.toml").read_text(), ".gitignore": ".venv/\nruns/\n",
             "pkg/__init__.py": "", "pkg/core.py": "X = 1\n", "docs/notes.md": "# notes\n", "cfg/a.json": "{}",
             "weights.bin": "not shipped", ".venv/pyvenv.cfg": "home = /usr\n", ".venv/lib/site.py": "",
             "runs/r/config.json": "{}", "pkg/__pycache__/core.cpython-311.pyc": ""}
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)

    def contents(fab: bytes) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            return {n: z.read(n) for n in z.namelist() if not n.startswith(".info/")}  # .info: the build's own

    staged = stage_app(project, tmp_path / "staged")
    assert not (staged / ".venv").exists() and not (staged / "runs").exists() and not (staged / "weights.bin").exists()
    shipped = contents(build_fab_from_disk(staged))
    assert shipped == contents(build_fab_from_disk(project))
    assert {"pkg/core.py", "docs/notes.md", "cfg/a.json"} <= set(shipped)


def _cmd(p) -> list[str]:  # type: ignore[no-untyped-def]
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - processes come and go
        return []


def test_dlrt_clients_with_svd_aggregation(tmp_path: Path) -> None:
    """DLRT as the client trainer: ranks capped by the budget, replies padded back, SVD re-factoring."""
    cfg = small(tmp_path, backend="local", rounds=3, strategy="dlrt", local_epochs=2)
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert (clients["status"] == "ok").all()
    assert (clients["bytes_up"] == clients["bytes_down"]).all()
    tiers = pd.read_csv(tmp_path / "run" / "tiers.csv")
    full = tiers[tiers["tier"] == 1]
    assert full["loss"].iloc[-1] < full["loss"].iloc[0]
    with pytest.raises(Exception, match="apply to 'fedlod' only"):
        small(tmp_path, strategy="dlrt", aggregation="svd")


def test_clients_train_on_a_gpu_only_when_given_a_share_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from maestro_fl.federated import run_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_device(resolve(SimConfig, overrides={"num_gpus_per_client": 0.25})).type == "cuda"
    assert run_device(resolve(SimConfig)).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device(resolve(SimConfig, overrides={"num_gpus_per_client": 0.25})).type == "cpu"


def test_eval_every_changes_only_which_rounds_are_evaluated(tmp_path: Path) -> None:
    """Evaluation never feeds training: every round's clients, merge and checkpoint are the same to the bit."""
    import numpy as np

    from maestro_fl.results import CHECKPOINT_FILE, load_checkpoint

    runs = {every: run_simulation(small(tmp_path, backend="local", rounds=3, eval_every=every, run_name=f"e{every}"))
            for every in (1, 2)}
    tiers = {every: pd.read_csv(run / "tiers.csv") for every, run in runs.items()}
    assert sorted(tiers[1]["round"].unique()) == [1, 2, 3]
    assert sorted(tiers[2]["round"].unique()) == [2, 3]  # every 2nd round, and always the last
    kept = tiers[1][tiers[1]["round"].isin([2, 3])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, tiers[2])
    timing = ["wall_seconds", "server_seconds", "train_wall_seconds", "learning_check"]  # (the check reads evaluations)
    rounds = {e: pd.read_csv(run / "rounds.csv").drop(columns=timing, errors="ignore") for e, run in runs.items()}
    pd.testing.assert_frame_equal(rounds[1], rounds[2])
    clients = {e: pd.read_csv(run / "clients.csv").drop(columns=["wall_s"], errors="ignore") for e, run in runs.items()}
    pd.testing.assert_frame_equal(clients[1], clients[2])
    states = {e: load_checkpoint(run / CHECKPOINT_FILE) for e, run in runs.items()}
    assert states[1].round == states[2].round == 3 and states[1].arrays.keys() == states[2].arrays.keys()
    assert all(np.array_equal(states[1].arrays[k], states[2].arrays[k]) for k in states[1].arrays)


def test_the_learning_check_fires_once_on_a_diverging_lr_and_stays_silent_on_a_learning_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="maestro_fl"):
        diverging = run_simulation(small(tmp_path, backend="local", rounds=4, lr=50.0, run_name="diverging"))
    said = [r.getMessage() for r in caplog.records if "not learning" in r.getMessage()]
    assert len(said) == 1 and "lr=50" in said[0] and "at chance" in said[0]
    checks = pd.read_csv(diverging / "rounds.csv")["learning_check"].fillna("")
    assert (checks != "").sum() == 1 and "at chance" in checks[checks != ""].iloc[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maestro_fl"):
        learning = run_simulation(small(tmp_path, backend="local", rounds=4, lr=0.05, local_epochs=2,
                                        run_name="learning"))
    assert not [r for r in caplog.records if "not learning" in r.getMessage()]
    assert pd.read_csv(learning / "rounds.csv")["learning_check"].isna().all()
    assert pd.read_csv(learning / "tiers.csv")["accuracy"].max() > 0.5


def test_tensorboard_tracking_writes_every_rounds_tier_accuracies_as_the_tables_hold_them(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_simulation(small(tmp_path, backend="local", rounds=3, tracking="tensorboard", run_name="tracked"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tiers = pd.read_csv(run / "tiers.csv")
    for tier, rows in tiers.groupby("tier"):
        logged = events.Scalars(f"tier_{tier}/accuracy")
        assert [e.step for e in logged] == rows["round"].tolist()
        assert [e.value for e in logged] == pytest.approx(rows["accuracy"].tolist(), abs=1e-6)
    losses = events.Scalars("round/train_loss")
    assert [e.value for e in losses] == pytest.approx(pd.read_csv(run / "rounds.csv")["train_loss"].tolist(), rel=1e-5)  # the CSV keeps 6 digits


def test_mlflow_and_tensorboard_tracking_continue_a_resumed_run_without_a_duplicate_round(tmp_path: Path) -> None:
    """Both trackers at once, through an interrupt and a resume: every round is logged once, as the tables
    hold it; the MLflow run is the same one, with the config as its parameters."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maestro_fl.tracking import MLFLOW_RUN_FILE, MLflowTracking

    cfg = small(tmp_path, rounds=3, backend="local", tracking="tensorboard,mlflow")

    run = tmp_path / "tracked"
    with pytest.raises(Interrupt):
        local(cfg, run, extra_callbacks=[StopAfterTwo()])
    record = json.loads((run / MLFLOW_RUN_FILE).read_text())
    assert record["tracking_uri"].startswith("sqlite:///")  # beside the run directory, as no server is named
    # a tracker opened on the run again skips the rounds its MLflow run holds (an uncheckpointed round rerun)
    again = MLflowTracking(run, {})
    assert again.run_id == record["run_id"] and again.logged_up_to == 2
    local(cfg, run)  # resumes at round 3
    tiers = pd.read_csv(run / "tiers.csv")
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tier, rows in tiers.groupby("tier"):
        logged = sorted(client.get_metric_history(record["run_id"], f"tier_{tier}/accuracy"), key=lambda m: m.step)
        assert [m.step for m in logged] == rows["round"].tolist() == [1, 2, 3]
        assert [m.value for m in logged] == pytest.approx(rows["accuracy"].tolist(), abs=1e-6)
        assert [e.step for e in events.Scalars(f"tier_{tier}/accuracy")] == [1, 2, 3]
    mlflow_run = client.get_run(record["run_id"])
    assert mlflow_run.data.params["lr"] == str(cfg.lr) and mlflow_run.data.tags["strategy"] == cfg.strategy
    assert mlflow_run.info.status == "FINISHED"


@pytest.mark.parametrize("tracking,message", [("wandb", "tracking must be one of"),
                                              ("mlflow,mlflow", "names a tracker twice")])
def test_a_tracker_that_does_not_exist_or_is_named_twice_is_refused(tmp_path: Path, tracking: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small(tmp_path, tracking=tracking)
