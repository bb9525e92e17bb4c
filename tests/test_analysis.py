"""Figures from a small real run: files written, axes and series read back from the figure."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
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


@pytest.fixture(scope="module")
def fl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real federated run (in-process grid): 6 clients, 2 tiers, 3 rounds."""
    from maestro_fl import message_keys as P
    from maestro_fl.config import SimConfig
    from strategies.runners.launch import load_ref
    from strategies.runners.local_grid import LocalGrid
    from strategies.server_app import run_server
    from tests.test_simulation import SMALL, always_online_population

    out = tmp_path_factory.mktemp("fl")
    trace = always_online_population(out / "population.csv")
    cfg = resolve(SimConfig, overrides=SMALL | {"rounds": 3, "devices": str(trace), "backend": "local",
                                                "fault_injection": "3:raise"})
    run = out / "fl-run"
    run.mkdir()
    from maestro_fl.config import to_dict
    from maestro_fl.results import RunDir

    RunDir(run).save_config(to_dict(cfg))
    run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run)
    return run


def test_federated_figures_have_their_axes_and_series(fl_run: Path, tmp_path: Path) -> None:
    from analysis import plots

    fig = plots.accuracy_vs_footprint([fl_run], ["FedLoD"], x="params", out=tmp_path / "pareto")
    (series,) = fig.axes[0].containers  # one series per method
    assert len(series.lines[0].get_xdata()) == 2 and fig.axes[0].get_xscale() == "log"
    assert series.lines[0].get_linestyle() == "None"  # tiers are points: no line between them
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["FedLoD (one run)"]
    markers = [c.get_paths()[0].vertices.shape for c in fig.axes[0].collections]  # a marker shape per tier
    assert len(markers) == 2 and markers[0] != markers[1]
    assert (tmp_path / "pareto.png").is_file()
    low, high = fig.axes[0].get_ylim()
    assert high - low >= plots.MIN_ACCURACY_SPAN  # noise is not magnified
    assert not series.has_yerr  # one run: markers only, no spread that is not over seeds
    twin = tmp_path / "seed1"
    shutil.copytree(fl_run, twin)
    fig = plots.accuracy_vs_footprint([fl_run, twin], ["A", "A"], x="bytes")  # two seeds: one series
    (series,) = fig.axes[0].containers
    assert series.has_yerr and "± std over 2 seeds" in fig.axes[0].get_legend().get_texts()[0].get_text()
    # two methods at the same sizes: drawn apart, and the figure says so
    fig = plots.accuracy_vs_footprint([fl_run, fl_run], ["A", "B"], x="params")
    a, b = (c.lines[0].get_xdata() for c in fig.axes[0].containers)
    assert all(xa < xb for xa, xb in zip(a, b)) and "apart" in fig.axes[0].get_xlabel()
    fig = plots.accuracy_vs_round(fl_run)
    assert len(fig.axes[0].get_lines()) == 2 and list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2, 3]
    fig = plots.accuracy_vs_round(fl_run, time_axis=True)
    assert "simulated" in fig.axes[0].get_xlabel()
    fig = plots.communication(fl_run)  # a failing client downloads but sends nothing: two lines, both visible
    down, up = fig.axes[0].get_lines()
    assert len(fig.axes) == 2 and down.get_linestyle() != up.get_linestyle() and up.get_marker() != "None"
    rounds = pd.read_csv(fl_run / "rounds.csv")
    rounds.to_csv(tmp_path / "rounds.csv", index=False)
    (tmp_path / "tiers.csv").write_text((fl_run / "tiers.csv").read_text())
    rounds.assign(bytes_up=rounds["bytes_down"]).to_csv(tmp_path / "rounds.csv", index=False)
    (line,) = plots.communication(tmp_path).axes[0].get_lines()  # equal both ways: one line, said so
    assert "each way" in line.get_label()
    fig = plots.participation(fl_run)
    statuses = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert statuses == {"ok", "failed"}
    fig = plots.ranks_heatmap(fl_run)
    assert fig.axes[0].get_xlabel() == "tier"
    layers = [t.get_text() for t in fig.axes[0].get_yticklabels()]  # the model's layer names, not row numbers
    assert layers == plots.lod_layer_names(fl_run) and layers
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "pareto.svg").exists()


@pytest.mark.slow
def test_ladder_vs_tiers_draws_the_rank_curve_and_each_methods_tiers(fl_run: Path, small_sweep: Path) -> None:
    from analysis import plots

    runs, labels = plots.sweep_runs(small_sweep)
    dense = [r for r, m in zip(runs, labels) if m == "dense"]
    fig = plots.ladder_vs_tiers([fl_run], dense, ["dense"] * len(dense), fractions=(0.1, 0.5, 1.0))
    ax = fig.axes[0]
    (curve,) = [line for line in ax.get_lines() if line.get_label() == "FedLoD, cut at any rank (one run)"]
    xs = list(curve.get_xdata())
    assert len(xs) == 3 and xs == sorted(xs)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["FedLoD, cut at any rank (one run)",
                                                                    "dense tiers (± std over 2 seeds)"]
    assert len(ax.containers) == 1 and ax.get_xscale() == "log"


def test_report_writes_every_figure_and_a_summary(fl_run: Path, dlrt_runs: list[Path], tmp_path: Path) -> None:
    from strategies.cli import main

    assert main(["report", str(fl_run), str(dlrt_runs[0]), "--out", str(tmp_path / "rep")]) == 0
    summary = (tmp_path / "rep" / "summary.md").read_text()
    pngs = sorted(str(p.relative_to(tmp_path / "rep")) for p in (tmp_path / "rep").rglob("*.png"))
    assert "accuracy_vs_params.png" in pngs and "runs/fl-run_participation.png" in pngs  # each run's in runs/
    assert "runs/tau0.05_rank_over_epochs.png" in pngs
    assert all(re.fullmatch(r"[A-Za-z0-9_./-]+", name) for name in pngs)  # safe in shells and LaTeX
    assert all(f"({name})" in summary for name in pngs)
    assert "| tier | accuracy |" in summary and "| rank_fraction |" in summary
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a run directory
    titles = re.findall(r"^### (.+)$", summary, flags=re.M)
    assert len(titles) == len(set(titles)) == len(pngs)
    assert len({t.split(":")[-1] for t in titles}) > 5
    # one unreadable directory among good ones: reported, named with the reason
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tiers.csv").write_text("")
    assert main(["report", str(fl_run), str(broken), "--out", str(tmp_path / "y")]) == 0
    text = (tmp_path / "y" / "summary.md").read_text()
    assert "Could not read:" in text and str(broken) in text


@pytest.fixture(scope="module")
def small_sweep(shared_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two methods x two seeds on a local Ray (the sweep machinery itself is tested in test_sweep.py)."""
    from strategies.sweeps.sweep import build_sweep, run_sweep
    from tests.test_simulation import SMALL

    out = tmp_path_factory.mktemp("sweep")
    base = {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()} | {"rounds": 2}
    base |= {"tier_shares": [0.5, 0.5], "tier_fractions": [0.25, 1.0]}
    sweep = build_sweep({"name": "s", "out_dir": str(out)}, base, {"seed": [0, 1]},
                        {"fedlod": {}, "dense": {"strategy": "fedavg_dense"}})
    return run_sweep(sweep)


@pytest.mark.slow
def test_sweep_figures_average_seeds_per_method(small_sweep: Path, tmp_path: Path) -> None:
    from analysis import plots
    from analysis.report import write_report

    runs, labels = plots.sweep_runs(small_sweep)
    assert sorted(labels) == ["dense", "dense", "fedlod", "fedlod"]
    fig = plots.accuracy_vs_footprint(runs, labels, x="params")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["dense: dense, every device (reference)", "fedlod (± std over 2 seeds)"]
    assert len(fig.axes[0].containers) == 1  # one error-bar series for fedlod, seeds averaged
    (reference,) = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(set(reference.get_ydata())) == 1  # dense FedAvg: a horizontal reference line
    summary = write_report([small_sweep], tmp_path / "rep")
    text = summary.read_text()
    assert "accuracy_vs_bytes.png" in text
    assert sum(line.startswith("## method=") for line in text.splitlines()) == 4  # one table per run
    # a comparison reports itself first: per method and tier, mean ± std over the seeds, with n
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## The comparison"
    rows = [line for line in text.splitlines() if line.startswith(("| fedlod |", "| dense |"))]
    assert len(rows) == 4 and all(" ± " in row and "| 2 |" in row for row in rows)
    assert (tmp_path / "rep" / "methods_vs_round.png").is_file() and "(methods_vs_round.png)" in text
    assert (tmp_path / "rep" / "methods_vs_time.png").is_file()
    # the methods' legend sits below the panels: the saved image must hold it, not cut it off
    from PIL import Image

    fig = plots.methods_vs_round(runs, labels, out=tmp_path / "mvr")
    (legend,) = fig.legends
    holds_all = fig.get_tightbbox()  # matplotlib's own tight box: every artist, this legend included
    assert legend.get_window_extent().y0 / fig.dpi == pytest.approx(holds_all.y0)  # (the legend is lowest)
    saved_height_in = Image.open(tmp_path / "mvr.png").size[1] / 150  # (_save writes png at 150 dpi)
    assert saved_height_in == pytest.approx(holds_all.height + 2 * 0.1, abs=0.05)  # (+ tight's padding)


@pytest.mark.slow
@pytest.mark.parametrize(
    "notebook,run",
    [("single_run.ipynb", "fl"), ("train_once_deploy_many.ipynb", "dlrt"), ("compare_methods.ipynb", "sweep")],
)
def test_notebooks_execute_against_a_real_run(
    notebook: str, run: str, fl_run: Path, dlrt_runs: list[Path], small_sweep: Path
) -> None:
    import nbformat

    from tests.notebook_runner import run_in_process

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "analysis" / "notebooks" / notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    target = {"fl": fl_run, "dlrt": dlrt_runs[0], "sweep": small_sweep}[run]
    nb.cells[0].source = f"{'SWEEP_DIR' if run == 'sweep' else 'RUN_DIR'} = {str(target)!r}"
    assert run_in_process(nb, root) > 0, "the notebook drew no figure"


def test_protocol_tables_render_the_comparison_selection_and_standing(tmp_path: Path) -> None:
    import pandas as pd

    from analysis.protocol_tables import comparison_markdown, matched_markdown, selected_markdown

    pd.DataFrame([
        {"method": "fedlod", "tier": 0, "acc_mean": 0.9512, "acc_std": 0.0081, "params": 32778, "macs": 483072,
         "bytes_per_round": 262224, "unaffordable": 0},
        {"method": "fedlod", "tier": 1, "acc_mean": 0.97, "acc_std": float("nan"), "params": 51018, "macs": 2.4e6,
         "bytes_per_round": 1.5e6, "unaffordable": 3},
    ]).to_csv(tmp_path / "comparison.csv", index=False)
    pd.DataFrame([{"method": "fedlod", "run": "r", "val_score": 0.9731, "lr": 0.15, "local_epochs": 3}]).to_csv(
        tmp_path / "selected.csv", index=False)
    table = comparison_markdown(tmp_path)
    assert "| `fedlod` | **95.1 ± 0.8**<br>32.8k p, 483.1k MACs, 262.2kB |" in table
    assert "**97.0 ± 0.0** (3 unaffordable)<br>51.0k p, 2.40M MACs, 1.50MB" in table
    assert "| `fedlod` | 0.15 | 3 | 97.3 |" in selected_markdown(tmp_path)
    assert "no matched.csv" in matched_markdown(tmp_path)
    pd.DataFrame([{"method": "fjord", "tier": 2, "difference": -0.0123}]).to_csv(tmp_path / "matched.csv", index=False)
    assert "| `fjord` | t2 -1.2 |" in matched_markdown(tmp_path)


def test_defaults_table_gives_each_one_change_variant_its_difference_to_the_default(tmp_path: Path) -> None:
    import pandas as pd

    from analysis.defaults_table import defaults_frame, defaults_markdown, reference_of

    assert reference_of("fedlod_momentum_05", ["fedlod", "fedlod_momentum_05", "heterofl"]) == "fedlod"
    assert reference_of("heterofl_label_mask", ["heterofl", "heterofl_label", "fedlod"]) == "heterofl_label"
    assert reference_of("fedlod", ["fedlod", "fedlod_x"]) is None
    rows = []
    for method, base in [("fedlod", 0.90), ("fedlod_momentum_05", 0.80)]:
        for seed in (0, 1):
            for tier in (0, 1):
                rows.append({"method": method, "seed": seed, "tier": tier, "status": "ok",
                             "accuracy": base + 0.02 * tier + 0.01 * seed, "val_accuracy": base + 0.05})
    rows.append({"method": "fedlod_momentum_05", "seed": 2, "tier": 0, "status": "failed",
                 "accuracy": float("nan"), "val_accuracy": float("nan")})
    frame = defaults_frame(pd.DataFrame(rows))
    assert frame.at["fedlod", "test"] == pytest.approx(0.915)
    assert frame.at["fedlod_momentum_05", "seeds"] == 2  # the failed run is not a seed
    assert frame.at["fedlod_momentum_05", "d_val"] == pytest.approx(-0.10)
    assert frame.at["fedlod_momentum_05", "d_tier_1"] == pytest.approx(-0.10)
    assert pd.isna(frame.at["fedlod", "d_test"])
    rows.append({"method": "fedlod_rank_only", "seed": 0, "tier": 1, "status": "ok", "accuracy": 0.9,
                 "val_accuracy": 0.9})  # serves tier 1 only
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    table = defaults_markdown(tmp_path)
    assert "| `fedlod_momentum_05` | 2 | 85.0 (-10.0) | 81.5 (-10.0) | -10.0 / -10.0 |" in table
    assert "| `fedlod_rank_only` | 1 | 90.0 (-5.0) | 90.0 (-1.5) | – / -2.5 |" in table


def test_runs_of_different_setups_drawn_together_are_named(tmp_path: Path) -> None:
    from analysis.report import mixed_setups

    runs = []
    for name, dataset, rounds in (("a", "digits", 40), ("b", "mnist1d", 40), ("c", "digits", 40)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"dataset": dataset, "model": "cnn", "rounds": rounds}))
        runs.append(tmp_path / name)
    assert mixed_setups(runs) == ["dataset: digits, mnist1d"]
    assert mixed_setups([runs[0], runs[2]]) == []
