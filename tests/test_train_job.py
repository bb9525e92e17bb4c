"""``maestro-fl train`` end to end: outputs, determinism, reloading."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from maestro_fl.centralized import load_model, run_train
from maestro_fl.config import TrainConfig, resolve
from maestro_fl.data import load_dataset
from maestro_fl.training import evaluate
from strategies.cli import main


def small(tmp_path: Path, **kw: object) -> TrainConfig:
    base = {"epochs": 3, "out_dir": str(tmp_path), "progress": False, "model": "mlp"}
    return resolve(TrainConfig, overrides=base | kw)


def test_train_writes_every_table(tmp_path: Path) -> None:
    run = run_train(small(tmp_path, run_name="r", eval_fractions=(1.0, 0.5, 0.25)))
    assert {p.name for p in run.iterdir()} >= {"config.json", "epochs.csv", "ranks.csv", "ladder.csv", "model.pt"}
    epochs = pd.read_csv(run / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2, 3]
    assert epochs["test_accuracy"].iloc[-1] > 0.8
    ladder = pd.read_csv(run / "ladder.csv")
    assert ladder["rank_fraction"].tolist() == [1.0, 0.5, 0.25]
    assert ladder["params"].is_monotonic_decreasing and ladder["macs"].is_monotonic_decreasing
    assert (ladder["bytes_fp32"] == 4 * ladder["params"]).all()
    ranks = pd.read_csv(run / "ranks.csv", dtype={"layer": str})
    assert set(ranks["layer"]) == {"1", "3", "5"} and len(ranks) == 9

    data = load_dataset("digits")
    model = load_model(run / "model.pt", data.spec)
    _, acc = evaluate(model, data.test)
    assert acc == pytest.approx(ladder["test_accuracy"].iloc[0])


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    a = run_train(small(tmp_path, run_name="a", model="cnn", epochs=2))
    b = run_train(small(tmp_path, run_name="b", model="cnn", epochs=2))
    c = run_train(small(tmp_path, run_name="c", model="cnn", epochs=2, seed=1))
    sa, sb, sc = (torch.load(r / "model.pt", weights_only=True)["state_dict"] for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_cli_train_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "epochs=1", "model=mlp", "progress=false", f"out_dir={tmp_path}", "run_name=cli"]) == 0
    assert "rank frac" in capsys.readouterr().out
    assert (tmp_path / "cli" / "ladder.csv").exists()
    assert main(["train", "model=nope"]) == 2
    assert "model must be one of" in capsys.readouterr().err


def test_cli_accepts_double_dash_options(tmp_path: Path) -> None:
    assert main(["train", "--method", "dlrt", "--epochs=1", "--model", "mlp", "progress=false",
                 f"out_dir={tmp_path}", "run_name=dd"]) == 0
    assert pd.read_csv(tmp_path / "dd" / "epochs.csv")["compression"].iloc[0] > 0
    assert main(["train", "--epochs"]) == 2
