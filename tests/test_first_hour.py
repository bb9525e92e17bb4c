"""A researcher's first hour: help generated from the config, the budget planner, progress and quiet."""

from __future__ import annotations

import dataclasses
import io
import logging
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from maestro_fl.config import SimConfig, TrainConfig, field_docs, resolve
from strategies.cli import main
from strategies.cli.main import COMMANDS
from strategies.cli.plan import plan, plan_rows


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    logging.getLogger("maestro_fl").handlers.clear()
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_gives_the_commands_own_usage_and_every_key_with_its_default(command: str) -> None:
    code, text, _ = run_cli(command, "--help")
    assert code == 0
    assert text.startswith(f"usage: maestro-fl {command}")
    assert "examples:" in text
    keys = COMMANDS[command].keys
    if keys is None:
        return
    for f in dataclasses.fields(keys):
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        assert f"  {f.name} (" in text and f"default {default!r})" in text, f.name


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_help_lists_every_strategy_model_dataset_and_compare_method_with_a_line_each(command: str) -> None:
    from maestro_fl import catalog
    from maestro_fl.methods import METHODS
    from maestro_fl.models import MODELS
    from strategies.sweeps.compare import METHODS as COMPARED

    _, text, _ = run_cli(command, "--help")
    choices = text.split("\nchoices:\n", 1)[1].split("\n\nkeys (", 1)[0]
    lines = choices.splitlines()
    for name in (*METHODS, *MODELS):  # a name, then its one-line description
        line = next((ln for ln in lines if ln.split()[:1] == [name]), "")
        assert len(line.split(maxsplit=1)) == 2, f"{name!r} is not listed with a description"
    assert all(name in choices for name in catalog.DATASETS)
    listed = {ln.split()[0] for ln in lines if ln.startswith("  ")}
    assert (set(COMPARED) <= listed) == (command == "compare")


def test_every_key_has_a_reason_in_the_config_module() -> None:
    for cls in (SimConfig, TrainConfig):
        docs = field_docs(cls)
        assert [d.name for d in docs] == [f.name for f in dataclasses.fields(cls)]
        missing = [d.name for d in docs if len(d.reason) < 10]
        assert not missing, f"{cls.__name__} fields without a reason: {missing}"
        assert all(d.section for d in docs)


def test_the_overview_lists_every_command_and_bad_commands_fail() -> None:
    code, text, _ = run_cli("--help")
    assert code == 0 and all(f"  {name}" in text for name in COMMANDS)
    code, _, err = run_cli("simulat")
    assert code == 2 and "unknown command 'simulat'" in err


SMALL = {"num_clients": 10, "clients_per_round": 10, "rounds": 1, "local_epochs": 1, "partition": "iid",
         "backend": "local"}


def test_plan_gives_the_sub_models_the_simulation_then_assigns(tmp_path: Path) -> None:
    from strategies.api import simulate

    cfg = resolve(SimConfig, overrides=SMALL)
    rows = {r["tier"]: r for r in plan_rows(cfg)}
    assert all(r["binding"] in ("compute", "memory", "none", "memory+compute") for r in rows.values())
    run = simulate(**SMALL | {"rounds": 3}, progress=False, out_dir=str(tmp_path), run_name="r")
    tiers = run.tiers[run.tiers["round"] == 1].set_index("tier")
    ok = run.clients[(run.clients["status"] == "ok") & (run.clients["round"] == 1)]
    for tier, row in rows.items():
        assert row["params"] == tiers.loc[tier, "params"] and row["macs"] == tiers.loc[tier, "macs"]
        sent = ok[ok["tier"] == tier]  # clients of the tier sampled in round 1 (devices are online at random)
        assert (sent["fraction"] == row["fraction"]).all()
        assert ((sent["bytes_down"] + sent["bytes_up"]) == row["bytes_per_round"]).all()
    assert ok["tier"].nunique() >= 3


def test_plan_names_the_binding_constraint_and_what_would_serve_an_unaffordable_tier(tmp_path: Path) -> None:
    cfg = resolve(SimConfig, overrides=SMALL | {"compute_budget_s": 2.0, "keep_first": 0, "width_floor": False})
    rows = {r["tier"]: r for r in plan_rows(cfg)}
    starved = [r for r in rows.values() if r["unaffordable"]]
    assert starved and all(r["unaffordable"] == r["clients"] for r in starved)
    for r in starved:
        assert r["binding"] == "compute" and r["need_seconds"] > 2.0
        assert "compute_budget_s >=" in r["advice"]
    # the advice holds: with the budget it names, that tier affords a sub-model
    need = max(r["need_seconds"] for r in starved)
    fixed = resolve(SimConfig, overrides=SMALL | {"compute_budget_s": need + 0.01, "keep_first": 0,
                                                  "width_floor": False})
    assert not any(r["unaffordable"] for r in plan_rows(resolve(  # or: narrower sub-models below the rank floor
        SimConfig, overrides=SMALL | {"compute_budget_s": 2.0, "keep_first": 0})))
    assert not any(r["unaffordable"] for r in plan_rows(fixed))
    text = plan(cfg)
    assert "can afford no sub-model" in text and "refused by" in text
    assert all(line.split()[2] == "nothing" for line in text.splitlines()[4:]
               if line.split()[:1] in ([str(r["tier"])] for r in starved))


def test_plan_shows_each_tiers_own_need_within_its_budget_and_what_serves_it() -> None:
    """A served tier's own sub-model fits its device (the need never exceeds what it has); the next larger one
    is what the binding constraint refused; tiers below the rank floor say they are served by the width floor."""
    rows = plan_rows(resolve(SimConfig, overrides=SMALL | {"compute_budget_s": 2.0, "keep_first": 0}))
    served = [r for r in rows if not r["unaffordable"]]
    assert served
    for r in served:
        assert r["own_memory"] <= r["have_memory"] and r["own_seconds"] <= r["have_seconds"]
        assert r["binding"] == "none" or r["need_seconds"] > r["have_seconds"] or r["need_memory"] > r["have_memory"]
    floor = [r for r in served if r["served_by"] == "width floor"]
    assert floor and all(r["width"] < 1.0 for r in floor)
    assert {r["served_by"] for r in plan_rows(resolve(SimConfig, overrides=SMALL | {"strategy": "fjord"}))} \
        <= {"width", "full"}
    from strategies.api import plan as api_plan

    table = api_plan(**SMALL, compute_budget_s=2.0, keep_first=0)  # the Python API's plan: the same rows
    assert table["served_by"].tolist() == [r["served_by"] for r in rows]
    assert table["params"].tolist() == [r["params"] for r in rows]


def test_simulate_prints_the_plan_and_warns_about_unaffordable_tiers(tmp_path: Path) -> None:
    args = [f"{k}={v}" for k, v in SMALL.items()] + ["compute_budget_s=2", "keep_first=0", "width_floor=false",
                                                     f"out_dir={tmp_path}"]
    code, out, err = run_cli("simulate", *args)
    assert code == 0
    assert "registering 10 clients" in err and "what each tier can afford" in err
    assert "can afford no sub-model and will never train" in err
    assert "run directory:" in out and "tier" in out
    # quiet: warnings still, no phase lines and no bar
    code, out, err = run_cli("simulate", *args, "--quiet")
    assert code == 0 and "registering" not in err and "rounds:" not in err
    assert "will never train" in err


def test_a_progress_bar_with_tier_accuracy_or_a_line_per_round(tmp_path: Path) -> None:
    args = [f"{k}={v}" for k, v in SMALL.items()] + ["rounds=2", f"out_dir={tmp_path}"]
    code, _, err = run_cli("simulate", *args)
    assert code == 0 and "rounds: 100%" in err and "acc t0=" in err and "sim " in err
    code, out, err = run_cli("simulate", *args, "--verbose")
    assert code == 0 and "round   2/2" in out and "rounds: 100%" not in err


def test_the_report_usage_is_its_own() -> None:
    code, _, err = run_cli("report")
    assert code == 2 and "usage: maestro-fl report RUN_DIR|SWEEP_DIR" in err


def test_dense_fedavg_ignores_budgets_in_the_plan_too() -> None:
    """fedavg_dense trains the full model everywhere: the plan says so, with what each device would need."""
    rows = plan_rows(resolve(SimConfig, overrides=SMALL | {"strategy": "fedavg_dense"}))
    assert all(r["unaffordable"] == 0 and r["binding"] == "ignored" and r["params_ratio"] == 1.0 for r in rows)
    exclusive = plan_rows(resolve(SimConfig, overrides=SMALL | {"strategy": "fedavg_exclusive"}))
    assert any(r["unaffordable"] for r in exclusive)  # the same devices, budgets applied


def test_the_python_api_prints_its_phases_and_the_budget_table_unless_logging_is_set_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    small = SMALL | {"model": "mlp"}  # what is printed does not depend on the model: the cheapest one
    run = ("from strategies import api\n"
           f"api.simulate(out_dir={str(tmp_path)!r}, **{small!r})\n")
    said = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, check=True).stderr
    assert "registering 10 clients" in said and "what each tier can afford" in said
    own = "import logging; logging.basicConfig(level=logging.WARNING)\n" + run  # the caller's own logging wins
    said = subprocess.run([sys.executable, "-c", own], capture_output=True, text=True, check=True).stderr
    assert "registering" not in said
