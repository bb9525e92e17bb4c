"""The factor-averaging cross-term, and what re-factoring the mean products per rank level does about it.

FedLoD's ``ordered`` rule averages ``U`` and ``Vᵀ`` separately, so the merged
product ``mean(U) mean(V)ᵀ`` differs from the clients' mean product by their
cross-terms; ``ordered_products`` re-factors the mean product of each nested
rank level instead (:func:`maestro_fl.aggregation.aggregate_ordered_products`).
For each task and rule this runs the federation in process (same seed) and,
every round, on the very updates the server merges, measures
:func:`~maestro_fl.aggregation.cross_term_share` of *both* rules (per LoD layer:
``‖W_rule − W_mean‖ / ‖W_mean − W_global‖``), then reports the shares and the
final accuracy per tier.

    python benchmarks/cross_term.py                       # the main job and MNIST-1D, both rules
    python benchmarks/cross_term.py --tasks main --rounds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maestro_fl import message_keys as P  # noqa: E402
from maestro_fl.aggregation import aggregate_ordered_factors, aggregate_ordered_products, cross_term_share  # noqa: E402
from maestro_fl.config import SimConfig, resolve  # noqa: E402
from maestro_fl.federated import federation  # noqa: E402
from maestro_fl.methods.base import corners_weighted  # noqa: E402
from strategies.runners.launch import load_ref, quiet_flower  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cross_term.json"
TASKS = {"main": {}, "mnist1d": {"dataset": "mnist1d", "model": "cnn1d"}}
RULES = {"ordered": aggregate_ordered_factors, "ordered_products": aggregate_ordered_products}


def measure(task: str, rule: str, rounds: int, work: Path) -> dict[str, Any]:
    cfg = resolve(SimConfig, overrides={**TASKS[task], "aggregation": rule, "backend": "local", "progress": False,
                                        "out_dir": str(work), "run_name": f"{task}-{rule}",
                                        **({"rounds": rounds} if rounds else {})})
    method = federation(cfg).method
    merge, shares = method.merge, []

    def measured_merge(current, updates, server_round):  # type: ignore[no-untyped-def]
        pairs = corners_weighted(updates)
        for name, fn in RULES.items():
            per_layer = cross_term_share(current, fn(current, pairs), pairs)
            shares.append({"round": server_round, "rule": name, **per_layer})
        return merge(current, updates, server_round)

    method.merge = measured_merge  # type: ignore[method-assign]
    run_dir = work / cfg.run_name
    run_dir.mkdir(parents=True)
    run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run_dir)
    tiers = pd.read_csv(run_dir / "tiers.csv")
    final = tiers[tiers["round"] == tiers["round"].max()].sort_values("tier")
    df = pd.DataFrame(shares)
    layers = [c for c in df.columns if c not in ("round", "rule")]
    summary = {}
    for name, part in df.groupby("rule"):
        values = part[layers].to_numpy(dtype=float)
        summary[name] = {"median": float(np.nanmedian(values)), "max": float(np.nanmax(values)),
                         "per_layer_median": {k: float(part[k].median()) for k in layers}}
    return {"task": task, "rule_run": rule, "rounds": int(tiers["round"].max()),
            "accuracy": [float(a) for a in final["accuracy"]], "cross_term_share": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="main,mnist1d")
    ap.add_argument("--rules", default="ordered,ordered_products")
    ap.add_argument("--rounds", type=int, default=0, help="0: the config's")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    quiet_flower()
    work = Path(tempfile.mkdtemp(prefix="maestro-cross-term-"))
    rows = []
    for task in args.tasks.split(","):
        for rule in args.rules.split(","):
            rows.append(measure(task, rule, args.rounds, work))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
