"""analysis/time_to_accuracy.py on hand-made run directories: times, horizons and participation by hand."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

from analysis import time_to_accuracy as tta

matplotlib.use("Agg")


def write_run(path: Path, mode: str, seconds: list[float], top: list[float], clients: list[tuple[int, int, str]],
              seed: int = 0) -> Path:
    """A run with tiers 0 and 1 (tier 0 at 0.1 below tier 1), partitions 0 (tier 0), 1 and 2 (tier 1)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"strategy": "fedlod", "round_mode": mode, "seed": seed}))
    rounds = range(1, len(seconds) + 1)
    (path / "rounds.csv").write_text("round,sim_seconds_total\n" + "".join(f"{r},{t}\n" for r, t in zip(rounds, seconds)))
    (path / "tiers.csv").write_text("round,tier,accuracy\n" + "".join(
        f"{r},0,{a - 0.1}\n{r},1,{a}\n" for r, a in zip(rounds, top)))
    (path / "clients.csv").write_text("round,partition_id,tier,status\n" + "".join(
        f"1,{p},{t},{s}\n" for p, t, s in clients))
    (path / "devices.csv").write_text("partition_id,tier\n0,0\n1,1\n2,1\n")
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    sync = write_run(tmp_path / "sync", "sync", [100, 200, 300], [0.5, 0.8, 0.9],
                     [(0, 0, "ok"), (0, 0, "ok"), (1, 1, "ok"), (1, 1, "ok"), (1, 1, "ok"), (2, 1, "offline")])
    buffered = write_run(tmp_path / "fedbuff", "fedbuff", [50, 100, 150, 200, 250, 320],
                         [0.5, 0.7, 0.85, 0.9, 0.92, 0.95], [(1, 1, "ok"), (2, 1, "ok"), (0, 0, "late")])
    return [sync, buffered]


def test_time_to_accuracy_and_the_common_horizon_by_hand(two_runs: list[Path]) -> None:
    table = tta.time_to_accuracy(tta.accuracy_over_time(two_runs), 0.85).set_index("round_mode")
    assert table.loc["sync", "seconds_to_target"] == 300 and table.loc["fedbuff", "seconds_to_target"] == 150
    assert (table["horizon_s"] == 300).all()  # the earlier run end
    assert table.loc["sync", "top_tier_at_horizon"] == pytest.approx(0.9)
    assert table.loc["fedbuff", "top_tier_at_horizon"] == pytest.approx(0.92 + (0.95 - 0.92) * 50 / 70)


def test_participation_counts_merged_updates_per_simulated_hour_and_clients_reached(two_runs: list[Path]) -> None:
    share = tta.participation(two_runs).set_index(["round_mode", "tier"])
    assert share.loc[("sync", 0), "merged_per_hour"] == pytest.approx(2 / (300 / 3600))
    assert share.loc[("sync", 1), "merged_per_hour"] == pytest.approx(3 / (300 / 3600))
    assert share.loc[("sync", 1), "clients_reached"] == 0.5  # partition 2 went offline: its data never reached
    assert share.loc[("fedbuff", 0), "merged_per_hour"] == 0 and share.loc[("fedbuff", 1), "clients_reached"] == 1


def test_the_figure_draws_each_group_on_the_common_grid(two_runs: list[Path], tmp_path: Path) -> None:
    fig = tta.sync_vs_buffered(two_runs, tmp_path / "fig")
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.svg").exists()
    top, bottom, bars = fig.axes
    assert [line.get_label() for line in top.get_lines()] == ["fedlod, sync", "fedlod, fedbuff"]
    for line in top.get_lines():
        assert max(line.get_xdata()) == pytest.approx(300 / 60)  # minutes, up to the horizon
    assert top.get_ylim() == (0, 100)
    assert len(bars.patches) == 4  # two groups x two tiers
    sync_bars = [p.get_height() for p in bars.patches[:2]]  # sync: 2 of tier 0's, 3 of tier 1's 5 updates
    assert sync_bars == pytest.approx([40.0, 60.0])


def test_the_devices_over_time_notebook_executes(two_runs: list[Path]) -> None:
    import nbformat

    from tests.notebook_runner import run_in_process

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "analysis" / "notebooks" / "devices_over_time.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    for run in two_runs:  # the notebook reads staleness, which hand-made runs lack
        clients = run / "clients.csv"
        lines = clients.read_text().splitlines()
        clients.write_text("\n".join([lines[0] + ",staleness", *(line + ",0" for line in lines[1:])]) + "\n")
    nb.cells[0].source = f"RUN_DIRS = {[str(r) for r in two_runs]!r}"
    assert run_in_process(nb, root) > 0, "the notebook drew no figure"
