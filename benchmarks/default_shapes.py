"""Do the defaults learn at every federation shape? The evidence behind ``lr``, ``momentum`` and ``clip_grad_norm``.

Each task runs at two shapes with the defaults of :class:`maestro_fl.config.SimConfig` (nothing tuned here):

* ``default``: 50 clients of ~29 (digits) or ~72 (MNIST-1D) training examples, Dirichlet(0.5), 20 per round;
* ``few``: 10 clients of ~130 (digits) or ~360 (MNIST-1D) examples, IID, all 10 every round: four times the
  local steps per round, where a step size tuned at the default shape can diverge.

It writes, per task, shape and method, the test and validation accuracy of every tier after the last round (JSON).

    python benchmarks/default_shapes.py                              # fedlod and fedavg_dense, both tasks and shapes
    python benchmarks/default_shapes.py --shapes few --rounds 8      # the issue's check: 8 rounds at 10 clients
    python benchmarks/default_shapes.py --set lr=0.15 --set momentum=0.9 --out old_defaults.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maestro_fl import message_keys as P  # noqa: E402
from maestro_fl.config import SimConfig, resolve  # noqa: E402
from strategies.runners.launch import load_ref, quiet_flower  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "default_shapes.json"
TASKS = {"digits": {}, "mnist1d": {"dataset": "mnist1d", "model": "cnn1d"}}
SHAPES = {"default": {}, "few": {"num_clients": 10, "clients_per_round": 10, "partition": "iid"}}


def measure(task: str, shape: str, method: str, rounds: int, extra: dict[str, str], work: Path) -> dict[str, Any]:
    cfg = resolve(SimConfig, overrides={**TASKS[task], **SHAPES[shape], **extra, "strategy": method,
                                        "rounds": rounds, "backend": "local", "progress": False,
                                        "out_dir": str(work), "run_name": f"{task}-{shape}-{method}"})
    run_dir = work / cfg.run_name
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run_dir)
    tiers = pd.read_csv(run_dir / "tiers.csv")
    last = tiers[tiers["round"] == tiers["round"].max()].sort_values("tier")
    return {"task": task, "shape": shape, "method": method, "rounds": rounds,
            "lr": cfg.lr, "momentum": cfg.momentum, "clip_grad_norm": cfg.clip_grad_norm,
            "num_clients": cfg.num_clients, "fractions": last["fraction"].round(3).tolist(),
            "test_accuracy": last["accuracy"].round(4).tolist(), "val_accuracy": last["val_accuracy"].round(4).tolist(),
            "top_tier_test": round(float(last["accuracy"].iloc[-1]), 4), "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--shapes", default="default,few")
    parser.add_argument("--methods", default="fedlod,fedavg_dense")
    parser.add_argument("--rounds", type=int, default=0, help="0: 40 at the default shape (the protocol's), 8 at few")
    parser.add_argument("--set", action="append", default=[], help="a SimConfig override, key=value (repeatable)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.set)
    quiet_flower()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            for shape in args.shapes.split(","):
                rounds = args.rounds or (40 if shape == "default" else 8)
                for method in args.methods.split(","):
                    rows.append(measure(task, shape, method, rounds, extra, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"overrides": extra, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
