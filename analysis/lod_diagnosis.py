"""Figures of where a FedLoD run's accuracy goes, from a run made with ``diagnostics_every > 0``.

    maestro-fl simulate diagnostics_every=10 run_name=diagnosed
    python -m analysis.lod_diagnosis runs/diagnosed --out docs/figures/diagnosis

Three figures (:mod:`maestro_fl.diagnostics` measures, this draws):

* ``*_coverage``: per LoD layer and rank component, the clients that held it
  per round and its share of the server's update (mean over rounds);
* ``*_ladder``: the global model's test accuracy along the whole rank ladder
  at the diagnosed rounds, the tiers' fractions marked;
* ``*_truncation``: per tier and layer, the accuracy lost when only that layer
  is cut to the tier's rank (the last diagnosed round).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import _save, read_table


def coverage(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Holders per round and update share per rank component, one panel per LoD layer."""
    table = read_table(run_dir, "components.csv", ("round", "layer", "component", "holders", "update_share"))
    mean = table.groupby(["layer", "component"], sort=False).agg(
        holders=("holders", "mean"), share=("update_share", "mean")).reset_index()
    layers = list(dict.fromkeys(mean["layer"].astype(str)))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rows = mean[mean["layer"].astype(str) == layer]
        ax.plot(rows["component"], rows["holders"], color="tab:blue", label="clients holding it (per round)")
        ax.set_ylim(0, max(1.0, float(mean["holders"].max())) * 1.05)
        ax.set_xlabel("rank component")
        ax.set_title(f"layer {layer}", fontsize=9)
        twin = ax.twinx()
        twin.plot(rows["component"], 100 * rows["share"], color="tab:orange", label="share of the update (%)")
        twin.set_ylim(0, 100 * float(mean["share"].max()) * 1.1 or 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clients holding it, per round", color="tab:blue")
    twin.set_ylabel("share of the round's update (%)", color="tab:orange")
    rounds = table["round"].nunique()
    fig.suptitle(f"Who trains each rank component ({Path(run_dir).name}, mean over {rounds} rounds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def ladder(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Test accuracy of the global model at every rank fraction, one curve per diagnosed round."""
    table = read_table(run_dir, "ladder_rounds.csv", ("round", "fraction", "accuracy"))
    tiers = read_table(run_dir, "tiers.csv", ("round", "tier", "fraction", "accuracy"))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rounds = sorted(table["round"].unique())
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rounds):
        rows = table[table["round"] == r]
        ax.plot(rows["fraction"], 100 * rows["accuracy"], marker=".", color=cmap(i / max(1, len(rounds) - 1)),
                label=f"round {r}")
    last = tiers[tiers["round"] == tiers["round"].max()]
    ax.set_ylim(0, 100)  # the whole scale: the ladder's shape, not a zoomed slope
    for fraction, group in last.groupby("fraction"):  # tiers sharing a fraction share one label
        ax.axvline(fraction, color="0.6", linestyle=":", linewidth=1)
        ax.annotate(",".join(f"t{int(t)}" for t in group["tier"]), (fraction, 0), textcoords="offset points",
                    xytext=(2, 4), fontsize=7, color="0.4")
    ax.set_xlabel("rank fraction every LoD layer is cut to")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"The global model along the rank ladder ({Path(run_dir).name}); dotted: the tiers' fractions",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def truncation(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Per tier and LoD layer: accuracy lost (pp) when only that layer is cut to the tier's rank (last diagnosed round)."""
    table = read_table(run_dir, "truncation.csv", ("round", "tier", "layer", "rank", "drop"))
    last = table[table["round"] == table["round"].max()]
    grid = last.pivot_table(index="tier", columns="layer", values="drop", sort=False) * 100
    ranks = last.pivot_table(index="tier", columns="layer", values="rank", sort=False)
    fig, ax = plt.subplots(figsize=(1.4 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 1.8))
    bound = max(1.0, float(np.nanmax(np.abs(grid.to_numpy()))))
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:+.1f}\nr={int(ranks.to_numpy()[i, j])}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"tier {t}" for t in grid.index])
    ax.set_xlabel("LoD layer cut alone to the tier's rank")
    fig.colorbar(image, ax=ax, label="accuracy lost (pp)")
    ax.set_title(f"Where a tier's accuracy goes ({Path(run_dir).name}, round {int(last['round'].max())})",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def summary(run_dir: str | Path) -> pd.DataFrame:
    """Per LoD layer: components, mean holders of the first and last component, the last component's update share."""
    table = read_table(run_dir, "components.csv", ("round", "layer", "component", "holders", "update_share"))
    rows = []
    for layer, group in table.groupby("layer", sort=False):
        top = group["component"].max()
        rows.append({"layer": layer, "components": int(top),
                     "holders_first": group[group["component"] == 1]["holders"].mean(),
                     "holders_last": group[group["component"] == top]["holders"].mean(),
                     "share_first_quarter": group[group["component"] <= max(1, top // 4)].groupby("round")[
                         "update_share"].sum().mean()})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.lod_diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory made with diagnostics_every > 0")
    parser.add_argument("--out", default=None, help="figure path prefix (default: RUN_DIR/diagnosis)")
    args = parser.parse_args(argv)
    prefix = Path(args.out) if args.out else Path(args.run_dir) / "diagnosis"
    coverage(args.run_dir, f"{prefix}_coverage")
    ladder(args.run_dir, f"{prefix}_ladder")
    truncation(args.run_dir, f"{prefix}_truncation")
    print(summary(args.run_dir).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"figures: {prefix}_coverage.png, {prefix}_ladder.png, {prefix}_truncation.png")


if __name__ == "__main__":
    main()
