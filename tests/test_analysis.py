"""Figures from a small real run: files written, axes and series read back from the figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.plots import RunDirError, accuracy_vs_compression, rank_over_epochs
from maestro_fl.centralized import run_train
from maestro_fl.config import TrainConfig, resolve


@pytest.fixture(scope="module")
def dlrt_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("runs")
    return [
        run_train(resolve(TrainConfig, overrides={"method": "dlrt", "model": "mlp", "epochs": 2, "dlrt_lr": 0.2,
                                                  "dlrt_tau": tau, "progress": False, "out_dir": str(out),
                                                  "run_name": f"tau{tau}"}))
        for tau in (0.05, 0.3)
    ]


def test_rank_over_epochs(dlrt_runs: list[Path], tmp_path: Path) -> None:
    fig = rank_over_epochs(dlrt_runs[0], tmp_path / "ranks")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and "rank" in ax.get_ylabel()
    assert len(ax.get_lines()) == 2  # the MLP's two DLRT layers (the classifier stays dense)
    assert all(list(line.get_xdata()) == [1, 2] for line in ax.get_lines())
    for ext in (".png", ".svg"):
        assert (tmp_path / f"ranks{ext}").stat().st_size > 1000


def test_accuracy_vs_compression(dlrt_runs: list[Path], tmp_path: Path) -> None:
    fig = accuracy_vs_compression(dlrt_runs, labels=["τ=0.05", "τ=0.3"], out=tmp_path / "acc")
    (line,) = fig.axes[0].get_lines()
    xs = list(line.get_xdata())
    assert len(xs) == 2 and xs == sorted(xs) and 0 < xs[0] < 100
    assert "compression" in fig.axes[0].get_xlabel() and "accuracy" in fig.axes[0].get_ylabel()
    assert (tmp_path / "acc.png").exists()


def test_missing_or_corrupt_table_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="ranks.csv: missing"):
        rank_over_epochs(tmp_path)
    (tmp_path / "ranks.csv").write_text("epoch,layer\n1,a\n")
    with pytest.raises(RunDirError, match=r"ranks.csv: missing columns \['rank'\]"):
        rank_over_epochs(tmp_path)
