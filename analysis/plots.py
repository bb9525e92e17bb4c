"""Figures from run directories (matplotlib over the tidy CSV tables).

Each function reads the tables it needs, draws one figure, saves it as PNG
and SVG when ``out`` is given, and returns the figure so that callers (and
tests) can inspect its axes and series. A missing or unreadable table raises
:class:`RunDirError` naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt  # headless, matplotlib picks Agg itself; in a notebook, inline
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from maestro_fl.results import RunDir, RunDirError

__all__ = ["RunDirError", "read_table"]  # and the figure functions below


def read_table(run_dir: str | Path, name: str, required: Sequence[str] = ()) -> pd.DataFrame:
    """``run_dir/name`` as a DataFrame (:meth:`maestro_fl.results.RunDir.table`): a missing, empty or
    malformed table is a :class:`RunDirError` naming it."""
    return RunDir(run_dir).table(name, required)


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a Markdown table (floats to 4 significant digits): what the reports print."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    rows += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(rows)


def _save(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        out = Path(out)
        if out.suffix in (".png", ".svg"):
            out = out.with_suffix("")
        out.parent.mkdir(parents=True, exist_ok=True)
        # every legend inside the saved area: one placed beside the axes with add_artist (a tier legend) and a
        # figure legend below the panels are both outside what bbox_inches="tight" measures by default
        extra = list(fig.legends) + [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Legend)]
        fig.savefig(out.with_name(out.name + ".png"), dpi=150, bbox_inches="tight",  # not with_suffix: 'tau0.2'
                    bbox_extra_artists=extra)
        fig.savefig(out.with_name(out.name + ".svg"), bbox_inches="tight", bbox_extra_artists=extra)
    return fig


def rank_over_epochs(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Each layer's rank after every epoch (LoD's shrinking or DLRT's truncation)."""
    ranks = read_table(run_dir, "ranks.csv", ("epoch", "layer", "rank"))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for layer, group in ranks.groupby("layer", sort=False):
        ax.plot(group["epoch"], group["rank"], marker=".", label=str(layer))
    ax.set_xlabel("epoch")
    ax.set_ylabel("rank (components)")
    ax.set_title(f"{Path(run_dir).name}: learned rank per layer")
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
    ax.set_title("Final test accuracy vs compression, one point per run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


# -- federated runs --------------------------------------------------------------
TIER_COLORS = plt.get_cmap("viridis")


def tier_color(tier: int, tiers: int = 5) -> tuple[float, float, float, float]:
    """The same colour for a tier in every figure (dark = weak device, light = strong)."""
    return TIER_COLORS(0.1 + 0.8 * tier / max(tiers - 1, 1))


def run_kind(run_dir: str | Path) -> str:
    """'federated' (tiers.csv), 'centralized' (ladder.csv) or an error naming what is missing."""
    run = Path(run_dir)
    if (run / "tiers.csv").is_file():
        return "federated"
    if (run / "ladder.csv").is_file():
        return "centralized"
    raise RunDirError(f"{run}: neither tiers.csv (a federated run) nor ladder.csv (a centralized run) is there")


def sweep_runs(sweep_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The finished runs of a sweep and their labels (the method, or the grid values without the seed)."""
    root = Path(sweep_dir)
    results = read_table(root, "results.csv", ("run", "status"))
    finished = results[results["status"] == "ok"].drop_duplicates("run")
    if finished.empty:
        raise RunDirError(f"{root / 'results.csv'}: no finished run")
    if "method" in finished.columns:
        labels = finished["method"].astype(str).tolist()
    else:
        keys = [c for c in finished.columns if c not in ("run", "status", "error", "seed", "tier")]
        keys = [c for c in keys if c in str(finished["run"].iloc[0])]
        labels = [",".join(f"{k}={row[k]}" for k in keys) or "run" for _, row in finished.iterrows()]
    return [root / r for r in finished["run"]], labels


#: accuracy axes span at least this many percentage points, so that a difference of a few test examples does not
#: fill the figure (one digits test image is 0.28 pp; the tiers of a run often differ by 1-2 pp)
MIN_ACCURACY_SPAN = 10.0


def footprint_points(run_dir: str | Path, x: str = "params") -> pd.DataFrame:
    """One row per tier (federated: final round) or rank fraction (centralized): x, accuracy, point label."""
    if x not in ("params", "macs", "bytes"):
        raise ValueError(f"x must be one of ['params', 'macs', 'bytes'], got {x!r}")
    if run_kind(run_dir) == "federated":
        tiers = read_table(run_dir, "tiers.csv", ("round", "tier", "accuracy", "params", "macs"))
        last = tiers[tiers["round"] == tiers["round"].max()].copy()
        if x == "bytes":
            clients = read_table(run_dir, "clients.csv", ("tier", "status", "bytes_down", "bytes_up"))
            ok = clients[clients["status"] == "ok"]
            per_tier = (ok["bytes_down"] + ok["bytes_up"]).groupby(ok["tier"]).mean()
            last["bytes"] = last["tier"].map(per_tier)
        last["label"] = "t" + last["tier"].astype(str)
        return last[[x, "accuracy", "label", "tier"]].rename(columns={x: "x"})
    ladder = read_table(run_dir, "ladder.csv", ("rank_fraction", "test_accuracy", "params", "macs"))
    col = "bytes_fp32" if x == "bytes" else x
    out = pd.DataFrame({"x": ladder[col], "accuracy": ladder["test_accuracy"],
                        "label": "p=" + ladder["rank_fraction"].astype(str)})
    out["tier"] = range(len(out))
    return out


#: how each kind of reference run is drawn: one model for every tier, so a horizontal line, not a curve
REFERENCE_LINES = {
    "dense": ("dense, every device (reference)", "--", "0.45"),
    "exclusive": ("dense, only the devices that afford it (reference)", "-.", "0.6"),
    "homogeneous": ("every device at full size: the homogeneous bound (reference)", ":", "0.15"),
}


def reference_kind(run_dir: str | Path) -> str:
    """Which reference a run is (a key of :data:`REFERENCE_LINES`), or ``''`` for a method's own run.

    Dense FedAvg ignores budgets, ``fedavg_exclusive`` trains only where the full
    model fits, and ``ignore_budgets`` gives any method its homogeneous bound:
    each deploys one model at every tier.
    """
    try:
        config = RunDir(run_dir).config()
    except RunDirError:
        return ""
    if config.get("strategy") == "fedavg_dense":
        return "dense"
    if config.get("strategy") == "fedavg_exclusive":
        return "exclusive"
    return "homogeneous" if config.get("ignore_budgets") else ""


def keep_accuracy_span(ax: plt.Axes, span: float = MIN_ACCURACY_SPAN) -> None:
    """Widen the accuracy axis to at least ``span`` percentage points (within 0-100)."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = max(0.0, mid - span / 2), min(100.0, mid + span / 2)
        ax.set_ylim(lo, max(hi, lo + span) if hi < 100.0 else hi)


X_LABELS = {
    "params": "parameters of the deployed model",
    "macs": "MACs per sample",
    "bytes": "bytes per round (one client, down + up)",
}
LADDER_FRACTIONS = tuple(p / 100 for p in range(5, 101))  # the rank ladder: every 5 % ... 100 %, one per integer percent

X_TITLES = {"params": "deployed parameters", "macs": "MACs per sample", "bytes": "bytes sent per round"}


def _leading(value: float) -> int:
    """The leading digit of a positive number (3 for 3e4)."""
    return int(f"{value:e}"[0]) if value > 0 else 0


def _short_number(value: float, _: object) -> str:
    """``30k``, ``1.5M``: a tick label that stays short on a log axis."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


#: how far apart (log-x, natural units) the points of methods that deploy one size are drawn, so that none hides
#: another: 3 % per method, small beside the factor of ~1.5 between tiers
DODGE = 0.03


#: one marker per tier (or ladder point), the same in every figure
TIER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def tier_marker(label: str) -> str:
    """The marker of a point labelled ``t3`` (or ``t3,t4``: the smallest tier's); other labels cycle by hash."""
    first = label.split(",")[0]
    index = int(first[1:]) if first.startswith("t") and first[1:].isdigit() else sum(map(ord, first))
    return TIER_MARKERS[index % len(TIER_MARKERS)]


def dodged(points: pd.DataFrame) -> pd.Series:
    """The x at which to draw each point: methods whose points share one size are spread sideways around it,
    in their order, by :data:`DODGE` on the log axis; a size only one method deploys stays where it is."""
    out = points["x"].astype(float).copy()
    for _, same in points.groupby(points["x"].round(6), sort=False):
        methods = list(dict.fromkeys(same["method"]))
        if len(methods) > 1:
            for j, method in enumerate(methods):
                rows = same.index[same["method"] == method]
                out[rows] = same.loc[rows, "x"] * math.exp(DODGE * (j - (len(methods) - 1) / 2))
    return out


def accuracy_vs_footprint(
    run_dirs: Sequence[str | Path],
    labels: Sequence[str] | None = None,
    x: str = "params",
    out: str | Path | None = None,
) -> Figure:
    """The Pareto view: accuracy against a footprint, one marker per method (label) and tier or rank fraction.

    Runs sharing a label (seeds) are averaged, with their standard deviation as error bars; a label with
    one run is drawn as markers only and said to be one run. Tiers are points, not a curve: sizes that a
    method does not deploy are not interpolated. Methods whose points share one size are spread sideways
    (:func:`dodged`) and the figure says so. A reference run (:func:`reference_kind`: dense FedAvg, FedAvg
    over the devices that afford the full model, a homogeneous bound) is a line with its spread as a band.
    """
    labels = list(labels) if labels is not None else [Path(r).name for r in run_dirs]
    frames = [footprint_points(r, x).assign(method=m, run=str(r), reference=reference_kind(r))
              for r, m in zip(run_dirs, labels)]
    data = pd.concat(frames)
    methods = list(dict.fromkeys(data["method"]))
    many = len(methods) > 5  # a legend below the axes in columns, and 20 distinct colours past the default 10
    fig, ax = plt.subplots(figsize=(9, 4.8) if many else (6.5, 4))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    grays = {7} if cmap.N == 10 else {14, 15}  # grays are the reference lines'
    palette = [cmap(k) for k in range(cmap.N) if k not in grays]
    points = []
    for i, (method, group) in enumerate(data.groupby("method", sort=False)):
        seeds = group["run"].nunique()
        kind = group["reference"].iloc[0]
        if kind:  # a reference: one model for every tier, a line with its spread as a band
            finals = group.groupby("run")["accuracy"].mean()
            mean = 100 * finals.mean()
            what, style, shade = REFERENCE_LINES[kind]
            ax.axhline(mean, color=shade, linestyle=style, linewidth=1.2,
                       label=f"{method}: {what}" + ("" if seeds > 1 else ", one run"))
            if seeds > 1:
                sd = 100 * finals.std()
                ax.axhspan(mean - sd, mean + sd, color=shade, alpha=0.10, linewidth=0)
            continue
        stats = group.groupby("tier").agg(x=("x", "mean"), acc=("accuracy", "mean"), sd=("accuracy", "std"),
                                          label=("label", "first"))
        # tiers that deploy one sub-model are one point with one label ("t3,t4")
        merged = stats.groupby(["x", "acc"], sort=False).agg(sd=("sd", "first"), label=("label", ",".join))
        points.append(merged.reset_index().assign(method=method, seeds=seeds, color=[palette[i % len(palette)]] * len(merged)))
    dodge = False
    method_handles: list[Patch] = []
    if points:
        drawn = pd.concat(points, ignore_index=True)
        drawn["at"] = dodged(drawn)
        dodge = bool((drawn["at"] != drawn["x"]).any())
        for method, group in drawn.groupby("method", sort=False):
            seeds = int(group["seeds"].iloc[0])
            how = f"± std over {seeds} seeds" if seeds > 1 else "one run"
            err = 100 * group["sd"].fillna(0.0) if seeds > 1 else None
            color = group["color"].iloc[0]
            ax.errorbar(group["at"], 100 * group["acc"], yerr=err, marker="none", linestyle="none", capsize=3,
                        color=color)
            method_handles.append(Patch(color=color, label=f"{method} ({how})"))  # the method's legend entry: its colour
            # the tier is the marker's shape (text labels of nearby points collide); tiers deploying one model
            # share a point, drawn with the smallest such tier's marker and listed in the tier legend
            for at, acc, label in zip(group["at"], group["acc"], group["label"]):
                ax.scatter([at], [100 * acc], marker=tier_marker(label), color=color, s=36, zorder=3)
    ax.set_xscale("log")
    # plain numbers at the ticks (30k, 100k, 1M): log-scale minor labels like 3×10⁴ collide
    ax.xaxis.set_major_formatter(FuncFormatter(_short_number))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _short_number(v, None) if _leading(v) in (2, 3, 5) else ""))
    xlabel = X_LABELS[x] + " (log scale)"
    if dodge:
        xlabel += f"\nmethods at one size are drawn {100 * DODGE:g} % apart so that none hides another"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy vs {X_TITLES[x]}, per tier")
    keep_accuracy_span(ax)
    if points:  # which marker is which tier, in a legend of its own
        labels_drawn = list(pd.concat(points)["label"])
        shapes = list(dict.fromkeys(one for lab in labels_drawn for one in lab.split(",")))
        shared = any("," in lab for lab in labels_drawn)
        tier_handles = [plt.Line2D([], [], marker=tier_marker(lab), color="0.3", linestyle="none", label=lab)
                        for lab in shapes]
        ax.add_artist(ax.legend(handles=tier_handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                                title_fontsize=7,
                                title="tier" + ("\n(tiers of one model:\nthe smallest's)" if shared else ""),
                                ncol=1 if len(tier_handles) <= 6 else 2))
    handles: list[Artist] = [*ax.get_legend_handles_labels()[0], *method_handles]  # the reference lines, then the methods
    if many:
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if dodge else -0.16), ncol=2)
    elif (data["reference"] != "").any():  # reference lines cross the whole axes: the legend goes below them
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if dodge else -0.16))
    else:
        ax.legend(handles=handles, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out)


def ladder_vs_tiers(
    ladder_runs: Sequence[str | Path],
    tier_runs: Sequence[str | Path],
    tier_labels: Sequence[str],
    fractions: Sequence[float] = LADDER_FRACTIONS,
    x: str = "params",
    out: str | Path | None = None,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """FedLoD's global model cut at every rank fraction (a curve) against other methods' tier points.

    The curve is what one FedLoD training deploys at any budget
    (:func:`maestro_fl.federated.deploy_ladder`, mean over ``ladder_runs`` with
    the spread shaded); each label of ``tier_runs`` is a method whose tiers
    are the only sizes it deploys (mean ± spread over its runs).
    """
    from maestro_fl.federated import deploy_ladder  # evaluates models: only this figure needs torch

    if x not in ("params", "macs"):
        raise ValueError(f"x must be one of ['params', 'macs'], got {x!r}")
    ladder = pd.concat([pd.DataFrame(deploy_ladder(r, fractions)) for r in ladder_runs])
    curve = ladder.groupby("fraction").agg(x=(x, "mean"), acc=("accuracy", "mean"), sd=("accuracy", "std"))
    seeds = len(set(map(str, ladder_runs)))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    # the ladder is one model cut at every rank: a curve; its band is over seeds, and there is none for one run
    ax.plot(curve["x"], 100 * curve["acc"], color="black",
            label="FedLoD, cut at any rank" + (f" (band: ± std over {seeds} seeds)" if seeds > 1 else " (one run)"))
    if seeds > 1:
        ax.fill_between(curve["x"], 100 * (curve["acc"] - curve["sd"]), 100 * (curve["acc"] + curve["sd"]),
                        color="black", alpha=0.15, linewidth=0)
    frames = [footprint_points(r, x).assign(method=m, run=str(r)) for r, m in zip(tier_runs, tier_labels)]
    if frames:
        for method, group in pd.concat(frames).groupby("method", sort=False):
            n = group["run"].nunique()
            stats = group.groupby("tier").agg(x=("x", "mean"), acc=("accuracy", "mean"), sd=("accuracy", "std"))
            ax.errorbar(stats["x"], 100 * stats["acc"], yerr=100 * stats["sd"] if n > 1 else None, marker="o",
                        linestyle="none", capsize=3,
                        label=f"{method} tiers" + (f" (± std over {n} seeds)" if n > 1 else " (one run)"))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_short_number))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _short_number(v, None) if _leading(v) in (2, 3, 5) else ""))
    ax.set_xlabel(X_LABELS[x] + " (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("One FedLoD model at every budget vs per-tier sub-models")
    if ylim is not None:  # zoom on the tiers; what lies outside is clipped, not dropped
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out)


def accuracy_vs_round(run_dir: str | Path, out: str | Path | None = None, time_axis: bool = False) -> Figure:
    """Test accuracy of the global model at each tier's ranks, per round (or per simulated second)."""
    tiers = read_table(run_dir, "tiers.csv", ("round", "tier", "accuracy"))
    if time_axis:
        rounds = read_table(run_dir, "rounds.csv", ("round", "sim_seconds_total"))
        tiers = tiers.merge(rounds[["round", "sim_seconds_total"]], on="round")
    n = tiers["tier"].nunique()
    fig, ax = plt.subplots(figsize=(6, 4))
    for tier, group in tiers.groupby("tier"):
        xs = group["sim_seconds_total"] / 60 if time_axis else group["round"]
        ax.plot(xs, 100 * group["accuracy"], color=tier_color(int(tier), n), label=f"tier {tier}")
    ax.set_xlabel("simulated wall-clock (minutes)" if time_axis else "round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{Path(run_dir).name}: test accuracy per tier vs " + ("simulated time" if time_axis else "round"))
    keep_accuracy_span(ax)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def communication(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Bytes moved per round (down and up) and their cumulative total.

    When every client sends back exactly what it received (the sub-model
    methods here), the two directions are one line, labelled so, instead of
    one line hiding the other.
    """
    rounds = read_table(run_dir, "rounds.csv", ("round", "bytes_down", "bytes_up"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    down, up = rounds["bytes_down"] / 1e6, rounds["bytes_up"] / 1e6
    if (rounds["bytes_down"] == rounds["bytes_up"]).all():
        ax1.plot(rounds["round"], down, label="each way (server → clients = clients → server)")
    else:
        ax1.plot(rounds["round"], down, label="server → clients")
        ax1.plot(rounds["round"], up, linestyle="--", marker=".", label="clients → server")
    ax1.set_xlabel("round")
    ax1.set_ylabel("MB per round")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.plot(rounds["round"], (rounds["bytes_down"] + rounds["bytes_up"]).cumsum() / 1e6, label="down + up")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative MB")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).name}: communication per round and in total")
    fig.tight_layout()
    return _save(fig, out)


def participation(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Per tier, how often sampled clients finished, failed, timed out, were dropped or malformed."""
    clients = read_table(run_dir, "clients.csv", ("tier", "status"))
    counts = clients.groupby(["tier", "status"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = None
    for status in counts.columns:
        ax.bar(counts.index.astype(str), counts[status], bottom=bottom, label=status)
        bottom = counts[status] if bottom is None else bottom + counts[status]
    ax.set_xlabel("tier")
    ax.set_ylabel("client rounds")
    ax.set_title(f"{Path(run_dir).name}: what happened to sampled clients, per tier")
    ax.legend(fontsize=8)
    return _save(fig, out)


def has_ranks(run_dir: str | Path) -> bool:
    """Whether the run's model has LoD layers (dense baselines have none)."""
    if run_kind(run_dir) == "federated":
        ranks = read_table(run_dir, "tiers.csv", ("ranks",))["ranks"]
        return bool(ranks.notna().any())
    return True


def lod_layer_names(run_dir: str | Path) -> list[str] | None:
    """The LoD layers of a federated run, in the order ``tiers.csv`` lists ranks, with their kind and
    channels, e.g. ``features.3 (conv3×3 32→64)`` (from its checkpoint)."""
    try:
        checkpoint = RunDir(run_dir).checkpoint()
    except RunDirError:
        return None
    if checkpoint is None:
        return None
    names = []
    for name, vt in checkpoint.arrays.items():
        if name.endswith("in_network.weight"):
            layer = name.rsplit(".", 2)[0]
            fan_out = checkpoint.arrays[f"{layer}.out_network.weight"].shape[0]
            kind = "linear" if vt.ndim == 2 else f"conv{'×'.join(map(str, vt.shape[2:]))}"
            names.append(f"{layer} ({kind} {vt.shape[1]}→{fan_out})")
    return names


def ranks_heatmap(run_dir: str | Path, out: str | Path | None = None) -> Figure:
    """Ranks per named layer: layer × tier (federated, last round) or layer × epoch (centralized)."""
    if run_kind(run_dir) == "federated":
        tiers = read_table(run_dir, "tiers.csv", ("round", "tier", "ranks"))
        last = tiers[tiers["round"] == tiers["round"].max()]
        matrix = pd.DataFrame([[int(v) for v in str(r).split()] for r in last["ranks"]], index=last["tier"]).T
        names = lod_layer_names(run_dir)
        if names is not None and len(names) == matrix.shape[0]:
            matrix.index = names
        xlabel, what = "tier", "last round"
    else:
        ranks = read_table(run_dir, "ranks.csv", ("epoch", "layer", "rank"))
        matrix = ranks.pivot(index="layer", columns="epoch", values="rank")
        matrix = matrix.loc[list(dict.fromkeys(ranks["layer"]))]  # the model's order, not alphabetical
        xlabel, what = "epoch", "per epoch"
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.32 * max(matrix.shape[0], 6)))
    image = ax.imshow(matrix.values, aspect="auto", cmap="magma")
    if matrix.size <= 200:  # small enough to read the ranks themselves
        top = float(matrix.values.max())
        for (i, j), value in pd.DataFrame(matrix.values).stack().items():
            ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 * top else "white")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("LoD layer")
    ax.set_title(f"{Path(run_dir).name}: rank per layer ({what})")
    fig.colorbar(image, ax=ax, label="rank (components)")
    fig.tight_layout()
    return _save(fig, out)


def methods_vs_round(runs: Sequence[str | Path], labels: Sequence[str], out: str | Path | None = None,
                     time_axis: bool = False) -> Figure:
    """Every method's test accuracy per round (or simulated minute), at its top tier and at its bottom tier:
    the mean over the method's runs (seeds), with a band of ± one standard deviation where there are two
    or more; one run is drawn as a line alone and its legend says so."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = list(dict.fromkeys(labels))
    colors = plt.get_cmap("tab10")
    for m, method in enumerate(methods):
        members = [Path(r) for r, label in zip(runs, labels) if label == method]
        frames = []
        for run in members:
            tiers = read_table(run, "tiers.csv", ("round", "tier", "accuracy"))
            if time_axis:
                rounds = read_table(run, "rounds.csv", ("round", "sim_seconds_total"))
                tiers = tiers.merge(rounds[["round", "sim_seconds_total"]], on="round")
            frames.append(tiers.assign(run=str(run)))
        table = pd.concat(frames)
        for ax, pick in zip(axes, (max, min)):
            tier = pick(table["tier"].unique())
            at = table[table["tier"] == tier]
            x = "sim_seconds_total" if time_axis else "round"
            stats = at.groupby("round").agg(x=(x, "mean"), mean=("accuracy", "mean"), std=("accuracy", "std"),
                                            n=("accuracy", "size"))
            xs = stats["x"] / 60 if time_axis else stats.index
            n = int(stats["n"].min())
            ax.plot(xs, 100 * stats["mean"], color=colors(m % 10),
                    label=f"{method} (" + (f"mean ± std over {n} seeds)" if n > 1 else "one run)"))
            if n > 1:
                ax.fill_between(xs, 100 * (stats["mean"] - stats["std"]), 100 * (stats["mean"] + stats["std"]),
                                color=colors(m % 10), alpha=0.15, linewidth=0)
    for ax, which in zip(axes, ("each method's top tier", "each method's bottom tier")):
        ax.set_title(f"{which}: test accuracy vs " + ("simulated time" if time_axis else "round"), fontsize=10)
        ax.set_xlabel("simulated wall-clock (minutes)" if time_axis else "round")
        if not time_axis:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole: no tick at round 2.5
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.045 *
                                                                                        math.ceil(len(names) / 3)))
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_ylim(0, 100)  # the full range: the curves' rise is the point, not the last point's decimals
    return _save(fig, out)
