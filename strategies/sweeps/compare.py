"""``maestro-fl compare [key=value ...]``: every method on the same data, seeds and devices.

The common case of a sweep: the methods below, crossed with three seeds, on
the embedded default (or whatever the overrides say), with identical
partitions and device populations (both follow the seed). Prints, per method
and tier, the accuracy (mean ± standard deviation over seeds) and footprint,
and writes ``compare.csv`` beside the sweep's ``results.csv``.

It then answers the question a width baseline raises: at each HeteroFL/FjORD
tier's footprint, what does FedLoD's global model give? FedLoD's model can be
cut at any rank prefix (:func:`maestro_fl.federated.deploy_ladder`), so for
every such tier and seed it is deployed at the largest rank fraction whose
parameters *and* MACs are both at most that tier's; ``matched.csv``.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from maestro_fl.config import ConfigError, SimConfig
from maestro_fl.federated import deploy_ladder
from maestro_fl.methods import METHODS as REGISTERED
from maestro_fl.results import format_table

from .sweep import build_sweep, format_duration, run_sweep


def compared_methods() -> dict[str, dict[str, Any]]:
    """Every registered method, then the variants it declares (``FederatedMethod.variants``), as ``maestro-fl
    compare`` lists them: name -> SimConfig values. Every method sees the same data, partitions, devices and
    budgets; a method added to the registry is compared (and tested) with no other change."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in REGISTERED.items():
        out[name] = {} if name == SimConfig.strategy else {"strategy": name}
        for variant, values in vars(cls).get("variants", {}).items():  # its own, not a parent's
            out[variant] = out[name] | dict(values)
    return out


#: method name -> SimConfig values (:func:`compared_methods`)
METHODS: dict[str, dict[str, Any]] = compared_methods()

#: the reference rows: what no heterogeneous method is, but each is judged against. Dense FedAvg (budgets
#: ignored), FedAvg over the devices that afford the full model ("is including the weak devices worth it at
#: all?"), and the homogeneous bound (the same federation with every device at FedLoD's full rank)
REFERENCES = ("fedavg_dense", "fedavg_exclusive", "fedlod_homogeneous")


def is_reference_method(values: dict[str, Any]) -> bool:
    """Whether a method's SimConfig values make it a reference row (one model at every tier), not a method."""
    ignored = str(values.get("ignore_budgets", False)).lower() in ("true", "1", "yes")
    return values.get("strategy") in ("fedavg_dense", "fedavg_exclusive") or ignored

COLUMNS = [
    ("method", "method", ""),
    ("tier", "tier", ""),
    ("accuracy", "accuracy", ""),
    ("params", "params", ",.0f"),
    ("macs", "MACs", ",.0f"),
    ("bytes_per_round", "bytes/round", ",.0f"),
    ("seeds", "seeds", "d"),
]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    ok = results[results["status"] == "ok"]
    grouped = ok.groupby(["method", "tier"], sort=False)
    table = grouped.agg(
        acc_mean=("accuracy", "mean"),
        acc_std=("accuracy", "std"),
        params=("params", "mean"),
        macs=("macs", "mean"),
        bytes_per_round=("bytes_per_round", "mean"),
        **({"unaffordable": ("unaffordable", "sum")} if "unaffordable" in ok else {}),  # older results lack it
        seeds=("seed", "nunique"),
    ).reset_index()
    table["accuracy"] = [mean_std_text(m, s) for m, s in zip(table["acc_mean"], table["acc_std"])]
    return table


#: methods whose tiers FedLoD is matched against at equal or smaller footprint
MATCHED = ("heterofl", "heterofl_masked", "fjord", "fjord_kd")
LADDER = tuple(i / 100 for i in range(1, 101))  # rank fractions FedLoD may be deployed at

MATCHED_COLUMNS = [
    ("method", "method", ""),
    ("tier", "tier", ""),
    ("params", "params", ",.0f"),
    ("macs", "MACs", ",.0f"),
    ("their_accuracy", "their accuracy", ""),
    ("fedlod_params", "FedLoD params", ",.0f"),
    ("fedlod_macs", "FedLoD MACs", ",.0f"),
    ("fedlod_accuracy", "FedLoD accuracy", ""),
    ("difference", "FedLoD - theirs", "+.4f"),
    ("seeds", "seeds", "d"),
]


def mean_std_text(mean: float, std: float) -> str:
    """``0.9777 ± 0.0043``; one run has no spread, and says so rather than printing ``± 0.0000``."""
    return f"{mean:.4f} (one run)" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _mean_std(values: pd.Series) -> str:
    return mean_std_text(values.mean(), values.std())


def matched_footprint(root: Path, results: pd.DataFrame, reference: str = "fedlod",
                      against: Sequence[str] = MATCHED) -> pd.DataFrame:
    """FedLoD (method ``reference``) deployed at each tier's footprint of the methods ``against``, seed by seed."""
    ok = results[results["status"] == "ok"]
    rows = []
    seeds = ok[ok["method"] == reference].groupby("seed")
    began = time.monotonic()  # for the ETA on screen only
    for k, (seed, ref_runs) in enumerate(seeds):
        print(f"matched footprints: {reference}'s rank ladder of seed {seed} ({k + 1}/{seeds.ngroups}"
              + (f", ETA {format_duration((time.monotonic() - began) / k * (seeds.ngroups - k))})" if k else ")"),
              flush=True)
        ladder = pd.DataFrame(deploy_ladder(root / ref_runs["run"].iloc[0], LADDER))
        for _, t in ok[(ok["seed"] == seed) & ok["method"].isin(against)].iterrows():
            fits = ladder[(ladder["params"] <= t["params"]) & (ladder["macs"] <= t["macs"])]
            if fits.empty:
                continue
            best = fits.iloc[-1]  # the largest fraction within the footprint
            rows.append({"method": t["method"], "tier": t["tier"], "seed": seed, "params": t["params"],
                         "macs": t["macs"], "accuracy": t["accuracy"], "fedlod_fraction": best["fraction"],
                         "fedlod_params": best["params"], "fedlod_macs": best["macs"],
                         "fedlod_accuracy": best["accuracy"]})
    if not rows:
        return pd.DataFrame(columns=[c for c, _, _ in MATCHED_COLUMNS])
    per_seed = pd.DataFrame(rows)
    grouped = per_seed.groupby(["method", "tier"], sort=False)
    table = grouped.agg(params=("params", "mean"), macs=("macs", "mean"), fedlod_params=("fedlod_params", "mean"),
                        fedlod_macs=("fedlod_macs", "mean"), seeds=("seed", "nunique")).reset_index()
    table["their_accuracy"] = list(grouped["accuracy"].apply(_mean_std))
    table["fedlod_accuracy"] = list(grouped["fedlod_accuracy"].apply(_mean_std))
    table["difference"] = list(grouped.apply(lambda g: (g["fedlod_accuracy"] - g["accuracy"]).mean()))
    return table


def run_compare(
    overrides: list[str],
    seeds: tuple[int, ...] = (0, 1, 2),
    out_dir: str = "runs",
    methods: tuple[str, ...] | None = None,
) -> Path:
    """Run ``methods`` (default: all of :data:`METHODS`) × ``seeds`` with the SimConfig ``overrides``.

    Two overrides are the comparison's own: ``methods=fedlod,fjord`` and ``seeds=0,1``.
    """
    base: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key == "methods":
            methods = tuple(m.strip() for m in value.split(",") if m.strip())
        elif key == "out_dir":  # where the comparison's sweep directory goes
            out_dir = value
        elif key == "seeds":
            try:
                seeds = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError as err:
                raise ConfigError(f"seeds must be comma-separated integers, got {value!r}") from err
        else:
            base[key] = value
    chosen = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen or not seeds:
        guesses = {m: difflib.get_close_matches(m, list(METHODS), n=1) for m in unknown}
        hint = "".join(f"; {m!r}: did you mean {g[0]!r}?" for m, g in guesses.items() if g)
        raise ConfigError(f"methods must be a non-empty subset of {list(METHODS)} and seeds non-empty; "
                          f"got methods={chosen}, seeds={list(seeds)}{hint}")
    if methods is None:  # the whole table: say what that means before it starts
        rounds = base.get("rounds", SimConfig.rounds)
        print(f"compare: no methods= given, so every method runs: {len(chosen)} methods x {len(seeds)} seeds = "
              f"{len(chosen) * len(seeds)} runs of {rounds} rounds (the main job takes about a minute a run on "
              "2 cores); methods=a,b picks some (maestro-fl compare --help lists them)", flush=True)
    head = {"name": "compare", "out_dir": out_dir}
    sweep = build_sweep(head, base, {"seed": list(seeds)}, {m: METHODS[m] for m in chosen})
    root = run_sweep(sweep)
    results = pd.read_csv(root / "results.csv")
    table = summarize(results)
    table.to_csv(root / "compare.csv", index=False)
    print(format_table(table.to_dict("records"), COLUMNS))
    if "fedlod" in chosen and any(m in chosen for m in MATCHED):
        matched = matched_footprint(root, results)
        matched.to_csv(root / "matched.csv", index=False)
        print("\nFedLoD's global model deployed at each width tier's footprint (params and MACs both <=):")
        print(format_table(matched.to_dict("records"), MATCHED_COLUMNS))
    return root
