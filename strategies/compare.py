"""``maestro-fl compare [key=value ...]``: every method on the same data, seeds and devices.

The common case of a sweep: the methods below, crossed with three seeds, on
the embedded default (or whatever the overrides say), with identical
partitions and device populations (both follow the seed). Prints, per method
and tier, the accuracy (mean ± standard deviation over seeds) and footprint,
and writes ``compare.csv`` beside the sweep's ``results.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from maestro_fl.results import format_table

from .sweep import build_sweep, run_sweep

#: method name -> SimConfig values. HeteroFL, FjORD and FedHM are not implemented yet.
METHODS: dict[str, dict[str, Any]] = {
    "fedlod": {},
    "fedlod_svd_aggregation": {"aggregation": "svd"},
    "dlrt_clients": {"trainer": "dlrt", "aggregation": "svd"},
    "fedavg_dense": {"strategy": "fedavg_dense"},
    "fedavg_exclusive": {"strategy": "fedavg_exclusive"},
}

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
        seeds=("seed", "nunique"),
    ).reset_index()
    table["accuracy"] = [f"{m:.4f} ± {0.0 if pd.isna(s) else s:.4f}" for m, s in zip(table["acc_mean"], table["acc_std"])]
    return table


def run_compare(overrides: list[str], seeds: tuple[int, ...] = (0, 1, 2), out_dir: str = "runs") -> Path:
    base: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        base[key.strip().replace("-", "_")] = value
    head = {"name": "compare", "out_dir": out_dir}
    sweep = build_sweep(head, base, {"seed": list(seeds)}, METHODS)
    root = run_sweep(sweep)
    table = summarize(pd.read_csv(root / "results.csv"))
    table.to_csv(root / "compare.csv", index=False)
    print(format_table(table.to_dict("records"), COLUMNS))
    return root
