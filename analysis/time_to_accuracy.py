"""Accuracy against simulated time, synchronous rounds against FedBuff, and each tier's participation.

A round of a synchronous federation lasts until its slowest counted client;
a FedBuff step (``round_mode=fedbuff``) lasts until the ``buffer_size``-th
update of those in flight finishes. Rounds and steps therefore do not
compare; simulated seconds do (``rounds.csv``'s ``sim_seconds_total``). This
module reads run directories, groups them by (method, round mode), puts every
seed on one time grid, and draws

* the top and the bottom tier's test accuracy against simulated time, mean
  ± one standard deviation over seeds;
* per tier, its share of the updates that merged (the table also gives the
  updates merged per simulated hour, and the share of the tier's clients
  whose data reached the model at least once).

``python -m analysis.time_to_accuracy RUN_DIR ... --out PATH`` writes the
figure and prints the table (markdown).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from maestro_fl.catalog import ROUND_MODES

from .plots import _save, markdown_table, read_table

#: points of the common time grid a group's seeds are interpolated onto
GRID_POINTS = 200


def mode_order(mode: str) -> int:
    """Sync first, then the semi-asynchronous modes, in the catalog's order."""
    return ROUND_MODES.index(mode) if mode in ROUND_MODES else len(ROUND_MODES)


def run_setup(run_dir: str | Path) -> tuple[str, str, int]:
    """(strategy, round_mode, seed) from the run's ``config.json`` (a run before round modes is ``sync``)."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return str(config["strategy"]), str(config.get("round_mode", "sync")), int(config.get("seed", 0))


def accuracy_over_time(runs: Sequence[str | Path]) -> pd.DataFrame:
    """Per run, tier and evaluated round: the simulated seconds at the round's end and the test accuracy."""
    frames = []
    for run in runs:
        strategy, mode, seed = run_setup(run)
        tiers = read_table(run, "tiers.csv", ("round", "tier", "accuracy"))
        rounds = read_table(run, "rounds.csv", ("round", "sim_seconds_total"))
        frames.append(tiers.merge(rounds[["round", "sim_seconds_total"]], on="round")
                      .assign(run=str(run), strategy=strategy, round_mode=mode, seed=seed))
    return pd.concat(frames, ignore_index=True)


def on_grid(curves: pd.DataFrame, grid: np.ndarray) -> pd.DataFrame:
    """Every run's accuracy at the grid's times (linear between evaluations; NaN after a run's last one)."""
    rows = []
    for (run, tier), c in curves.groupby(["run", "tier"]):
        c = c.sort_values("sim_seconds_total")
        t, acc = c["sim_seconds_total"].to_numpy(), c["accuracy"].to_numpy()
        values = np.interp(grid, t, acc, left=np.nan, right=np.nan)
        rows.append(pd.DataFrame({"run": run, "tier": tier, "t": grid, "accuracy": values,
                                  "strategy": c["strategy"].iloc[0], "round_mode": c["round_mode"].iloc[0]}))
    return pd.concat(rows, ignore_index=True)


def participation(runs: Sequence[str | Path]) -> pd.DataFrame:
    """Per (method, round mode, tier), over seeds: merged updates per simulated hour (mean), and the share of the
    tier's clients with at least one merged update (mean)."""
    rows = []
    for run in runs:
        strategy, mode, seed = run_setup(run)
        clients = read_table(run, "clients.csv", ("tier", "status", "partition_id"))
        devices = read_table(run, "devices.csv", ("partition_id", "tier"))
        hours = float(read_table(run, "rounds.csv", ("sim_seconds_total",))["sim_seconds_total"].iloc[-1]) / 3600
        merged = clients[clients["status"] == "ok"]
        for tier, members in devices.groupby("tier"):
            mine = merged[merged["tier"] == tier]
            rows.append({"strategy": strategy, "round_mode": mode, "seed": seed, "tier": int(tier),
                         "merged_per_hour": len(mine) / hours if hours > 0 else float("nan"),
                         "clients_reached": mine["partition_id"].nunique() / len(members)})
    table = pd.DataFrame(rows)
    return table.groupby(["strategy", "round_mode", "tier"], as_index=False)[
        ["merged_per_hour", "clients_reached"]].mean()


def time_to_accuracy(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per (method, round mode): the simulated seconds until the top tier first reaches ``target`` (mean over
    the seeds that reach it, and how many of them did), and the top tier's accuracy at the groups' common
    horizon (the earliest run end)."""
    horizon = curves.groupby("run")["sim_seconds_total"].max().min()
    rows = []
    for (strategy, mode), group in curves.groupby(["strategy", "round_mode"]):
        top = group[group["tier"] == group["tier"].max()]
        reached, at_horizon = [], []
        for _, c in top.groupby("run"):
            c = c.sort_values("sim_seconds_total")
            hit = c[c["accuracy"] >= target]
            if len(hit):
                reached.append(float(hit["sim_seconds_total"].iloc[0]))
            at_horizon.append(float(np.interp(horizon, c["sim_seconds_total"], c["accuracy"])))
        rows.append({"strategy": strategy, "round_mode": mode, "runs": top["run"].nunique(),
                     "seconds_to_target": np.mean(reached) if reached else float("nan"),
                     "runs_reaching": len(reached), "horizon_s": horizon,
                     "top_tier_at_horizon": np.mean(at_horizon), "std_at_horizon": np.std(at_horizon, ddof=1)
                     if len(at_horizon) > 1 else float("nan")})
    return pd.DataFrame(rows)


def sync_vs_buffered(runs: Sequence[str | Path], out: str | Path | None = None) -> Figure:
    """Top and bottom tier's test accuracy against simulated time per (method, round mode), mean ± one standard
    deviation over seeds, and each tier's share of the merged updates (from :func:`participation`)."""
    curves = accuracy_over_time(runs)
    horizon = curves.groupby("run")["sim_seconds_total"].max().min()  # every run covers the grid
    grid = np.linspace(0.0, horizon, GRID_POINTS)
    gridded = on_grid(curves, grid)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    colors = plt.get_cmap("tab10")
    methods = list(dict.fromkeys(curves["strategy"]))
    styles = {"sync": "-", "fedbuff": "--", "fedasync": ":"}
    for ax, pick, which in zip(axes[:2], (max, min), ("top", "bottom")):
        for (strategy, mode), group in sorted(gridded.groupby(["strategy", "round_mode"]),
                                              key=lambda g: (methods.index(g[0][0]), mode_order(g[0][1]))):
            at = group[group["tier"] == pick(group["tier"].unique())]
            stats = at.groupby("t")["accuracy"].agg(["mean", "std", "size"])
            n = int(stats["size"].min())
            color = colors(methods.index(strategy) % 10)
            ax.plot(stats.index / 60, 100 * stats["mean"], styles.get(mode, "-"), color=color,
                    label=f"{strategy}, {mode}")
            if n > 1:
                ax.fill_between(stats.index / 60, 100 * (stats["mean"] - stats["std"]),
                                100 * (stats["mean"] + stats["std"]), color=color, alpha=0.12, linewidth=0)
        seeds = curves.groupby(["strategy", "round_mode"])["run"].nunique().min()
        ax.set_title(f"each method's {which} tier (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})",
                     fontsize=10)
        ax.set_xlabel("simulated time (minutes)")
        ax.set_ylim(0, 100)  # the whole range: the rise over time is the point
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    share = participation(runs)
    tiers = sorted(share["tier"].unique())
    groups = sorted(dict.fromkeys(zip(share["strategy"], share["round_mode"])),
                    key=lambda g: (methods.index(g[0]), mode_order(g[1])))
    width = 0.8 / len(groups)
    for g, (strategy, mode) in enumerate(groups):
        these = share[(share["strategy"] == strategy) & (share["round_mode"] == mode)].set_index("tier")
        xs = np.arange(len(tiers)) + (g - (len(groups) - 1) / 2) * width
        rates = these.reindex(tiers)["merged_per_hour"].fillna(0.0)
        axes[2].bar(xs, 100 * rates / rates.sum() if rates.sum() > 0 else rates, width,
                    color=colors(methods.index(strategy) % 10), hatch="//" if mode != "sync" else None,
                    edgecolor="white", label=f"{strategy}, {mode}")
    axes[2].set_xticks(range(len(tiers)), [f"tier {t}" for t in tiers])
    axes[2].set_ylabel("share of the merged updates (%)")
    axes[2].set_ylim(0, 100)
    axes[2].set_title("which tiers' updates reached the model (hatched: semi-async)", fontsize=10)
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (any methods, round modes and seeds)")
    parser.add_argument("--out", help="figure path without extension (PNG and SVG)")
    parser.add_argument("--target", type=float, default=0.9, help="top-tier accuracy for time-to-accuracy")
    args = parser.parse_args(argv)
    curves = accuracy_over_time(args.runs)
    print(markdown_table(time_to_accuracy(curves, args.target)))
    print()
    print(markdown_table(participation(args.runs)))
    if args.out:
        sync_vs_buffered(args.runs, args.out)


if __name__ == "__main__":
    main()
