"""Figures from run directories (matplotlib over the tidy CSV tables).

Each function reads the tables it needs, draws one figure, saves it as PNG
and SVG when ``out`` is given, and returns the figure so that callers (and
tests) can inspect its axes and series. A missing or unreadable table raises
:class:`RunDirError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


class RunDirError(FileNotFoundError):
    """A run directory lacks a table, or the table cannot be read."""


def read_table(run_dir: str | Path, name: str, required: Sequence[str] = ()) -> pd.DataFrame:
    """``run_dir/name`` as a DataFrame, with a clear error when it is missing, empty or malformed."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunDirError(f"{path}: missing (is {Path(run_dir)} a maestro-fl run directory?)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: unreadable table ({err})") from None
    missing = [c for c in required if c not in df.columns]
    if missing or df.empty:
        raise RunDirError(f"{path}: {'no rows' if df.empty else f'missing columns {missing}'}")
    return df


def _save(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        out = Path(out)
        if out.suffix in (".png", ".svg"):
            out = out.with_suffix("")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out.with_name(out.name + ".png"), dpi=150, bbox_inches="tight")  # not with_suffix: 'tau0.2'
        fig.savefig(out.with_name(out.name + ".svg"), bbox_inches="tight")
    return fig


def rank_over_epochs(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Each layer's rank after every epoch (LoD's shrinking or DLRT's truncation)."""
    ranks = read_table(run_dir, "ranks.csv", ("epoch", "layer", "rank"))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for layer, group in ranks.groupby("layer", sort=False):
        ax.plot(group["epoch"], group["rank"], marker=".", label=f"layer {layer}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("rank (components)")
    ax.set_title("Learned rank per layer")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def accuracy_vs_compression(
    run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None, out: str | Path | None = None
) -> Figure:
    """Final test accuracy against compression rate (1 − params/dense), one point per run (e.g. per τ)."""
    rows = []
    for i, run in enumerate(run_dirs):
        last = read_table(run, "epochs.csv", ("test_accuracy", "params", "dense_params")).iloc[-1]
        label = labels[i] if labels is not None else Path(run).name
        rows.append((1.0 - last["params"] / last["dense_params"], last["test_accuracy"], label))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs, ys, names = zip(*sorted(rows))
    ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o", label="final model")
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (100 * x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("compression rate (% of dense parameters removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs compression")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)
