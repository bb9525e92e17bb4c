"""A tier's deployable model: exported, then loaded in a fresh Python process that cannot import maestro-fl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from maestro_fl.federated import load_global_model
from strategies import api
from strategies.cli import main

#: 10 clients of digits (~130 examples each) at the default 3 local epochs: the weakest tiers' compute budgets
#: bind below the smallest rank prefix, so FedLoD serves tiers 0-1 from the width floor (narrower LoD models)
#: and tiers 2-4 by rank alone
SMALL = {"rounds": 1, "num_clients": 10, "clients_per_round": 10, "backend": "local", "progress": False}

LOAD_WITHOUT_MAESTRO_FL = """
import json, sys
sys.modules["maestro_fl"] = None  # any import of maestro_fl raises from here on
import torch
net = torch.export.load(sys.argv[1]).module()
data = torch.load(sys.argv[2])
with torch.no_grad():
    correct = int((net(data["x"]).argmax(1) == data["y"]).sum())
print(json.dumps({"params": sum(p.numel() for p in net.parameters()), "correct": correct}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export-runs")
    return {s: api.simulate(strategy=s, out_dir=str(out), run_name=s, **SMALL).run_dir for s in ("fedlod", "fjord")}


def load_elsewhere(model_file: str, run_dir: Path, tmp_path: Path) -> dict[str, int]:
    _, fed, _ = load_global_model(run_dir)
    data = tmp_path / "test.pt"
    torch.save({"x": fed.data.test.x, "y": fed.data.test.y}, data)
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MAESTRO_FL, model_file, str(data)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout) | {"examples": len(fed.data.test.y)}


@pytest.mark.parametrize(("strategy", "tier", "kind"), [
    ("fedlod", 4, "rank"),
    ("fedlod", 0, "width floor"),
    ("fjord", 0, "width"),
])
def test_an_exported_tier_loads_without_maestro_fl_with_the_tiers_accuracy_and_size(
    runs: dict[str, Path], strategy: str, tier: int, kind: str, tmp_path: Path
) -> None:
    run_dir = runs[strategy]
    last = pd.read_csv(run_dir / "tiers.csv").query("round == round.max()").set_index("tier").loc[tier]
    full = pd.read_csv(run_dir / "tiers.csv")["params"].max()
    result = api.export(run_dir, tier=tier, out=tmp_path / "out")
    if kind == "width floor":
        assert result.fraction < 0.25 and last["ranks"], "tier 0 of this federation is a narrower LoD model"
    # tiers.csv says how the tier is served: its hidden width (1 for a rank prefix), as clients.csv does
    assert (last["width"] < 1.0) == (kind != "rank")
    if kind == "width":
        assert last["width"] == last["fraction"]
    clients = pd.read_csv(run_dir / "clients.csv").query("status == 'ok' and tier == @tier")
    assert (clients["width"] == last["width"]).all()
    loaded = load_elsewhere(result.path, run_dir, tmp_path)
    assert loaded["params"] == result.params == last["params"]
    assert loaded["params"] < full or tier == 4
    assert loaded["correct"] == round(last["accuracy"] * loaded["examples"])
    info = json.loads((tmp_path / "out" / "model.json").read_text())
    assert info["tier"] == tier and info["params"] == last["params"] and info["fraction"] == last["fraction"]


def test_export_by_fraction_takes_the_largest_sub_model_it_buys_and_the_cli_says_what_it_wrote(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", str(runs["fedlod"]), "--fraction", "0.5", "--out", str(tmp_path / "half")])
    assert code == 0
    info = json.loads((tmp_path / "half" / "model.json").read_text())
    assert info["fraction"] <= 0.5 and info["tier"] is None
    assert f"{info['params']:,} parameters" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "half" / "model.pt2"))
    assert isinstance(program.module(), nn.Module)
    assert main(["export", str(runs["fedlod"]), "--tier", "9"]) == 2
    assert "tier 9: not in" in capsys.readouterr().err
    assert main(["export", str(runs["fedlod"])]) == 2


def test_a_run_built_from_objects_says_how_to_export_it_in_another_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"model": "object:model:Net-7", "dataset": "digits"}))
    with pytest.raises(ValueError, match=r"pass the same objects again: strategies\.api\.export\(.*model=\.\.\."):
        api.export(run_dir, tier=0)
