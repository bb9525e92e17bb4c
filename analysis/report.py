"""``maestro-fl report RUN_DIR... --out DIR``: every figure that applies, plus a markdown summary.

A sweep directory (with ``results.csv``) stands for its finished runs, labelled by method, so the
accuracy-vs-footprint figures get one curve per method with the spread over seeds.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import plots


def _final_table(run_dir: Path) -> pd.DataFrame:
    if plots.run_kind(run_dir) == "federated":
        tiers = plots.read_table(run_dir, "tiers.csv", ("round", "tier", "accuracy", "params", "macs"))
        last = tiers[tiers["round"] == tiers["round"].max()]
        cols = ["tier", "accuracy", "params", "params_ratio", "macs", "ranks"]
        return last[[c for c in cols if c in last.columns]]
    ladder = plots.read_table(run_dir, "ladder.csv", ("rank_fraction", "test_accuracy", "params", "macs"))
    cols = ["rank_fraction", "test_accuracy", "params", "params_ratio", "macs", "bytes_fp32"]
    return ladder[[c for c in cols if c in ladder.columns]]


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(rows)


def collect_runs(run_dirs: Sequence[str | Path]) -> tuple[list[Path], list[str], list[tuple[Path, str]]]:
    """The readable runs (a sweep stands for its finished runs, labelled by method), their labels, and
    every directory that could not be read with the reason."""
    runs: list[Path] = []
    labels: list[str] = []
    skipped: list[tuple[Path, str]] = []
    for r in map(Path, run_dirs):
        try:
            if (r / "results.csv").is_file():  # a sweep: its finished runs, labelled by method
                found = list(zip(*plots.sweep_runs(r)))
            else:
                found = [(r, r.name)]
        except plots.RunDirError as err:
            skipped.append((r, str(err)))
            continue
        for run, label in found:
            try:
                kind = plots.run_kind(run)
                plots.read_table(run, "tiers.csv" if kind == "federated" else "ladder.csv")
            except plots.RunDirError as err:
                skipped.append((run, str(err)))
                continue
            runs.append(run)
            labels.append(label)
    return runs, labels, skipped


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Render the figures for ``run_dirs`` into ``out_dir`` and write ``summary.md``; returns its path.

    Directories that cannot be read are listed in ``summary.md`` (and on
    standard error) with the reason; the others are reported.
    """
    runs, found_labels, skipped = collect_runs(run_dirs)
    for run, reason in skipped:
        print(f"report: skipped {run}: {reason}", file=sys.stderr)
    labels = list(labels) if labels is not None else found_labels
    if not runs:
        raise plots.RunDirError("report: no readable run directory" + "".join(f"; {r}: {why}" for r, why in skipped))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [plots.run_kind(r) for r in runs]
    figures: list[tuple[str, str]] = []

    def keep(name: str, title: str, fig: plt.Figure) -> None:
        plt.close(fig)
        figures.append((name, title))

    axes = ("params", "macs", "bytes") if all(k == "federated" for k in kinds) else ("params", "macs")
    for x in axes:
        name = f"accuracy_vs_{x}"
        keep(name, f"Test accuracy vs {plots.X_TITLES[x]}, per tier", plots.accuracy_vs_footprint(runs, labels, x, out / name))
    for run, kind in zip(runs, kinds):
        tag = run.name
        if kind == "federated":
            keep(f"{tag}_accuracy_vs_round", f"{tag}: accuracy per round", plots.accuracy_vs_round(run, out / f"{tag}_accuracy_vs_round"))
            keep(f"{tag}_accuracy_vs_time", f"{tag}: accuracy vs simulated time",
                 plots.accuracy_vs_round(run, out / f"{tag}_accuracy_vs_time", time_axis=True))
            keep(f"{tag}_communication", f"{tag}: communication", plots.communication(run, out / f"{tag}_communication"))
            keep(f"{tag}_participation", f"{tag}: participation", plots.participation(run, out / f"{tag}_participation"))
        else:
            keep(f"{tag}_rank_over_epochs", f"{tag}: rank per epoch", plots.rank_over_epochs(run, out / f"{tag}_rank_over_epochs"))
        if plots.has_ranks(run):  # dense baselines have no LoD layers
            keep(f"{tag}_ranks", f"{tag}: ranks per layer", plots.ranks_heatmap(run, out / f"{tag}_ranks"))

    lines = ["# maestro-fl report", ""]
    if skipped:
        lines += ["Could not read:", "", *(f"* `{run}`: {reason}" for run, reason in skipped), ""]
    for run in runs:
        lines += [f"## {run.name}", "", f"`{run}`", "", _markdown(_final_table(run)), ""]
    lines += ["## Figures", ""]
    lines += [f"### {title}\n\n![{title}]({name}.png)\n" for name, title in figures]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
