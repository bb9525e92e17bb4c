"""``maestro-fl report RUN_DIR... --out DIR``: every figure that applies, plus a markdown summary.

A sweep directory (with ``results.csv``) stands for its finished runs, labelled by method, so the
accuracy-vs-footprint figures get one curve per method with the spread over seeds.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from maestro_fl.results import RunDir, perplexity

from . import plots, time_to_accuracy
from .plots import markdown_table


def _final_table(run_dir: Path) -> pd.DataFrame:
    if plots.run_kind(run_dir) == "federated":
        tiers = plots.read_table(run_dir, "tiers.csv", ("round", "tier", "accuracy", "params", "macs"))
        last = tiers[tiers["round"] == tiers["round"].max()]
        cols = ["tier", "accuracy", "loss", "params", "params_ratio", "macs", "ranks"]
        table = last[[c for c in cols if c in last.columns]]
        if "loss" in table.columns:  # per token, for a language task
            table = table.assign(perplexity=[perplexity(v) for v in table["loss"]])
        return table
    ladder = plots.read_table(run_dir, "ladder.csv", ("rank_fraction", "test_accuracy", "params", "macs"))
    cols = ["rank_fraction", "test_accuracy", "params", "params_ratio", "macs", "bytes_fp32"]
    return ladder[[c for c in cols if c in ladder.columns]]


def safe_name(name: str) -> str:
    """A file name safe in shells and LaTeX: ``method=fedlod,seed=0`` becomes ``method-fedlod_seed-0``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("=", "-").replace(",", "_"))


def comparison_table(runs: Sequence[Path], labels: Sequence[str]) -> pd.DataFrame:
    """Per method (label) and tier: the last round's test accuracy, mean ± std over the method's runs, n runs,
    and the deployed footprint."""
    rows = []
    for run, label in zip(runs, labels):
        if plots.run_kind(run) != "federated":
            continue
        last = _final_table(run)
        rows += [{"method": label, "tier": int(t["tier"]), "accuracy": float(t["accuracy"]),
                  "params": int(t["params"]), "macs": int(t["macs"])} for _, t in last.iterrows()]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).groupby(["method", "tier"], sort=False).agg(
        mean=("accuracy", "mean"), std=("accuracy", "std"), n=("accuracy", "size"), params=("params", "mean"),
        macs=("macs", "mean")).reset_index()
    accuracy = [f"{100 * m:.1f} ± {100 * s:.1f}" if n > 1 else f"{100 * m:.1f} (one run)"
                for m, s, n in zip(table["mean"], table["std"], table["n"])]
    return pd.DataFrame({"method": table["method"], "tier": table["tier"], "test accuracy (%)": accuracy,
                         "n": table["n"], "params": table["params"].round().astype(int),
                         "MACs": table["macs"].round().astype(int)})


def mixed_setups(runs: Sequence[Path]) -> list[str]:
    """What differs between runs drawn together that should not: dataset, model, rounds."""
    seen: dict[str, set[str]] = {}
    for run in runs:
        config = RunDir(run).config() if (run / "config.json").is_file() else {}
        for key in ("dataset", "model", "rounds"):
            seen.setdefault(key, set()).add(str(config.get(key, "?")))
    return [f"{key}: {', '.join(sorted(values))}" for key, values in seen.items() if len(values) > 1]


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
    federated = [(r, label) for r, label, k in zip(runs, labels, kinds) if k == "federated"]
    compared = len({label for _, label in federated}) > 1
    if compared:  # a comparison: every method's convergence, top and bottom tier, in one figure
        fed_runs, fed_labels = [r for r, _ in federated], [label for _, label in federated]
        keep("methods_vs_round", "Every method's test accuracy per round (top and bottom tier)",
             plots.methods_vs_round(fed_runs, fed_labels, out / "methods_vs_round"))
        keep("methods_vs_time", "Every method's test accuracy vs simulated time (top and bottom tier)",
             plots.methods_vs_round(fed_runs, fed_labels, out / "methods_vs_time", time_axis=True))
    modes = {time_to_accuracy.run_setup(r)[1] for r, _ in federated}
    if federated and modes != {"sync"}:  # semi-asynchronous runs: rounds do not compare, simulated time does
        keep("sync_vs_buffered", "Accuracy vs simulated time per method and round mode, and each tier's "
             "participation", time_to_accuracy.sync_vs_buffered([r for r, _ in federated], out / "sync_vs_buffered"))
    per_run: list[tuple[str, str]] = []  # each run's own figures, in a subfolder (after the comparison)

    def keep_run(name: str, title: str, fig: plt.Figure) -> None:
        plt.close(fig)
        per_run.append((f"runs/{name}", title))

    for run, kind in zip(runs, kinds):
        tag, where = run.name, out / "runs" / safe_name(run.name)
        if kind == "federated":
            keep_run(f"{where.name}_accuracy_vs_round", f"{tag}: accuracy per round",
                     plots.accuracy_vs_round(run, f"{where}_accuracy_vs_round"))
            keep_run(f"{where.name}_accuracy_vs_time", f"{tag}: accuracy vs simulated time",
                     plots.accuracy_vs_round(run, f"{where}_accuracy_vs_time", time_axis=True))
            keep_run(f"{where.name}_communication", f"{tag}: communication",
                     plots.communication(run, f"{where}_communication"))
            keep_run(f"{where.name}_participation", f"{tag}: participation",
                     plots.participation(run, f"{where}_participation"))
        else:
            keep_run(f"{where.name}_rank_over_epochs", f"{tag}: rank per epoch",
                     plots.rank_over_epochs(run, f"{where}_rank_over_epochs"))
        if plots.has_ranks(run):  # dense baselines have no LoD layers
            keep_run(f"{where.name}_ranks", f"{tag}: ranks per layer", plots.ranks_heatmap(run, f"{where}_ranks"))

    lines = ["# maestro-fl report", ""]
    mixed = mixed_setups(runs)
    if mixed:
        warning = "these runs differ in " + "; ".join(mixed) + ": their figures overlay unlike setups"
        print(f"report: warning: {warning}", file=sys.stderr)
        lines += [f"**Warning**: {warning}.", ""]
    if skipped:
        lines += ["Could not read:", "", *(f"* `{run}`: {reason}" for run, reason in skipped), ""]
    if compared:
        lines += ["## The comparison", "",
                  "Test accuracy after the last round, per method and tier: mean ± standard deviation over the "
                  "method's runs (n; the seeds), and the deployed footprint.", "",
                  markdown_table(comparison_table([r for r, _ in federated], [label for _, label in federated])), ""]
        matched = dict.fromkeys(d for sweep in map(Path, run_dirs) for d in (sweep, sweep.parent)  # a protocol's
                                if (d / "matched.csv").is_file())                                # is beside final/
        for sweep in matched:
            if (sweep / "matched.csv").is_file():
                lines += [f"### At matched footprint (`{sweep / 'matched.csv'}`)", "",
                          "FedLoD's one global model deployed at each other method's tier footprint (or smaller).",
                          "", markdown_table(pd.read_csv(sweep / "matched.csv")), ""]
        lines += ["### Comparison figures", ""]
        lines += [f"![{title}]({name}.png)\n" for name, title in figures]
        lines += ["## Each run", ""]
    for run in runs:
        lines += [f"## {run.name}", "", f"`{run}`", "", markdown_table(_final_table(run)), ""]
    if not compared:
        lines += ["## Figures", ""]
        lines += [f"### {title}\n\n![{title}]({name}.png)\n" for name, title in figures]
    lines += ["## Each run's figures", ""]
    lines += [f"### {title}\n\n![{title}]({name}.png)\n" for name, title in per_run]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
