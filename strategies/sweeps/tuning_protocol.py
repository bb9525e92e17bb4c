"""A fair comparison protocol in one sweep file: tune every method alike, then run the chosen values on seeds.

A sweep file with a ``[protocol]`` table runs in two stages (``maestro-fl sweep FILE``)::

    [protocol]
    tune_seed = 0          # the seed every tuning run uses
    seeds = [0, 1, 2]      # the seeds the selected values run on

    [grid]                 # the tuning grid, the same for every method
    lr = [0.05, 0.15]
    local_epochs = [1, 3]

1. **Tune**: every method × every grid point at ``tune_seed`` and the file's
   fixed round count (``[base] rounds``), under ``out_dir/name/tune``.
2. **Select**: per method, the grid point of best validation accuracy
   (``val_accuracy`` of the final round, every client's held-out split
   together, averaged over tiers): the test set is never looked at.
   ``selected.csv`` lists the values and scores.
3. **Final**: per method, the selected values on every seed of ``seeds``,
   under ``out_dir/name/final``; the run at ``tune_seed`` is the tuning run
   itself (copied, not rerun). ``comparison.csv``: per method and tier,
   test accuracy mean ± std over seeds, footprint, bytes per round, the
   clients that could afford nothing and the selected values. ``matched.csv``:
   FedLoD's global model of each seed cut at the largest rank prefix whose
   parameters and MACs are both at most each other method's tier's, against
   that tier's accuracy (FedLoD's standing at equal or smaller footprint).

Both stages are ordinary sweeps: finished runs are skipped, so adding a
method or a grid value to the file and running it again runs only the new
points; a final run made for a selection that changed is moved to
``final/superseded`` and made again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from maestro_fl.config import ConfigError, read_toml
from maestro_fl.results import CONFIG_FILE, RunDir, format_table

from .compare import MATCHED_COLUMNS, is_reference_method, matched_footprint, summarize
from .sweep import RESULT_FILE, Sweep, build_sweep, differing_fields, run_sweep

PROTOCOL_KEYS = {"tune_seed", "seeds"}

COLUMNS = [
    ("method", "method", ""),
    ("tier", "tier", ""),
    ("accuracy", "test accuracy", ""),
    ("params", "params", ",.0f"),
    ("macs", "MACs", ",.0f"),
    ("bytes_per_round", "bytes/round", ",.0f"),
    ("unaffordable", "unaffordable", ",.0f"),
    ("seeds", "seeds", "d"),
]


def is_protocol(path: str | Path) -> bool:
    """Whether a sweep file holds a ``[protocol]`` table."""
    return "protocol" in read_toml(path, "sweep file")


def load_protocol(path: str | Path) -> tuple[Sweep, dict[str, Any]]:
    """The tuning sweep of a protocol file (validated, every run's config included) and its ``[protocol]`` table."""
    data = read_toml(path, "sweep file")
    unknown = sorted(set(data) - {"sweep", "base", "grid", "methods", "protocol"})
    if unknown:
        raise ConfigError(f"sweep file: unknown table(s) {unknown}; allowed: ['sweep', 'base', 'grid', 'methods', "
                          "'protocol']")
    protocol = data["protocol"]
    bad = sorted(set(protocol) - PROTOCOL_KEYS)
    if bad:
        raise ConfigError(f"[protocol]: unknown key(s) {bad}; allowed: {sorted(PROTOCOL_KEYS)}")
    seeds = protocol.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in seeds):
        raise ConfigError(f"[protocol] seeds must be a non-empty list of integers, got {seeds!r}")
    tune_seed = protocol.get("tune_seed", seeds[0])
    if not isinstance(tune_seed, int) or isinstance(tune_seed, bool):
        raise ConfigError(f"[protocol] tune_seed must be an integer, got {tune_seed!r}")
    grid = data.get("grid", {})
    if "seed" in grid or "seed" in data.get("base", {}):
        raise ConfigError("a protocol file sets seeds in [protocol] (tune_seed, seeds), not in [grid] or [base]")
    head = data.get("sweep", {})
    name = str(head.get("name", Path(path).stem))
    tune = build_sweep(head | {"name": f"{name}/tune"}, data.get("base", {}) | {"seed": tune_seed}, grid,
                       data.get("methods", {"": {}}))
    return tune, {"name": name, "head": head, "base": data.get("base", {}), "grid": grid,
                  "methods": data.get("methods", {"": {}}), "seeds": seeds, "tune_seed": tune_seed}


def select(tune_results: pd.DataFrame, tuned: list[str]) -> pd.DataFrame:
    """Per method, the tuning run of best mean validation accuracy over tiers (the first such run on ties)."""
    ok = tune_results[tune_results["status"] == "ok"]
    if ok.empty:
        raise RuntimeError("no tuning run finished; nothing to select")
    scores = ok.groupby(["method", "run"], sort=False).agg(
        val_score=("val_accuracy", "mean"), **{k: (k, "first") for k in tuned}).reset_index()
    best = scores.loc[scores.groupby("method", sort=False)["val_score"].idxmax()]
    return best.reset_index(drop=True)


def run_protocol(path: str | Path) -> Path:
    """Tune, select and run the final seeds of a protocol file; returns its directory (``comparison.csv``)."""
    tune, spec = load_protocol(path)
    tuned = list(spec["grid"])
    tune_root = run_sweep(tune)
    selected = select(pd.read_csv(tune_root / "results.csv"), tuned)
    root = tune_root.parent
    selected.to_csv(root / "selected.csv", index=False)
    print("\nselected by validation accuracy (tuning seed "
          f"{spec['tune_seed']}):\n" + selected.to_string(index=False), flush=True)
    chosen = {row["method"]: {k: _plain(row[k]) for k in tuned} for _, row in selected.iterrows()}
    methods = {m: values | chosen[m] for m, values in spec["methods"].items() if m in chosen}
    final = build_sweep(spec["head"] | {"name": f"{spec['name']}/final"}, spec["base"], {"seed": spec["seeds"]},
                        methods)
    for name, values, cfg in final.runs:
        source = tune.root / selected.set_index("method").loc[values["method"], "run"]
        target = final.root / name
        if (target / CONFIG_FILE).is_file() and differing_fields(RunDir(target).config(), cfg):
            # made for an earlier selection (the grid or the methods changed since): kept aside, not reused
            (final.root / "superseded").mkdir(parents=True, exist_ok=True)
            shutil.move(str(target), str(final.root / "superseded" / f"{name},{time.strftime('%Y%m%d-%H%M%S')}"))
        # the tuning run at the tuning seed is this run: reuse it
        if values["seed"] == spec["tune_seed"] and (source / RESULT_FILE).exists() and not target.exists():
            shutil.copytree(source, target)
    final_root = run_sweep(final)
    results = pd.read_csv(final_root / "results.csv")
    table = summarize(results)
    for key in tuned:  # the values each method ran with, beside its numbers
        table[key] = [chosen[m][key] for m in table["method"]]
    table.to_csv(root / "comparison.csv", index=False)
    print("\n" + format_table(table.to_dict("records"), COLUMNS), flush=True)
    others = [m for m in methods if m != "fedlod" and not is_reference_method(methods[m])]
    if "fedlod" in methods and others:  # FedLoD's one model cut at each other method's tier footprint
        matched = matched_footprint(final_root, results, against=others)
        matched.to_csv(root / "matched.csv", index=False)
        print("\nFedLoD's global model deployed at each tier's footprint (params and MACs both <=):\n"
              + format_table(matched.to_dict("records"), MATCHED_COLUMNS), flush=True)
    return root


def _plain(value: Any) -> Any:
    """A pandas scalar as the plain Python value a config takes."""
    return value.item() if hasattr(value, "item") else value
