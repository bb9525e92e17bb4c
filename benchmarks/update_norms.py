"""How far honest clients move their sub-model: the evidence behind ``max_update_norm``.

The server refuses a reply whose update ``‖reply − sent‖`` exceeds
``max_update_norm · ‖sent‖`` (:func:`maestro_fl.replies.check_reply`). The bound
must sit well above what honest local training ever does, on every method and
task. This runs each method in process on each task with the largest local step
of the protocol's grid (lr 0.3, 3 local epochs: ``benchmarks/sweeps/protocol_*.toml``),
records the ratio :func:`~maestro_fl.replies.update_ratio` of every reply the
server checks, and writes the median, 99th percentile and maximum per method and
task (JSON).

    python benchmarks/update_norms.py                        # every method, digits and MNIST-1D, 10 rounds
    python benchmarks/update_norms.py --methods fedlod,dlrt --rounds 3
    python benchmarks/update_norms.py --shape few --lr 0.05    # 10 clients of ~130 examples: 4x the local steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import maestro_fl.replies as replies  # noqa: E402
from maestro_fl import message_keys as P  # noqa: E402
from maestro_fl.config import SimConfig, resolve  # noqa: E402
from maestro_fl.methods import METHODS  # noqa: E402
from strategies.runners.launch import load_ref, quiet_flower  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "update_norms.json"
TASKS = {"digits": {}, "mnist1d": {"dataset": "mnist1d", "model": "cnn1d"}}
LARGEST_STEP = {"lr": 0.3, "local_epochs": 3, "momentum": 0.9}  # the protocol grid's corner: the most a tuned client moves
#: federation shapes: the default 50 clients of ~29 examples, and few clients with many examples each
SHAPES = {"default": {}, "few": {"num_clients": 10, "clients_per_round": 10, "partition": "iid"}}


def measure(task: str, method: str, rounds: int, work: Path, setting: dict[str, Any]) -> dict[str, Any]:
    cfg = resolve(SimConfig, overrides={**TASKS[task], **setting, "strategy": method, "rounds": rounds,
                                        "backend": "local", "progress": False, "out_dir": str(work),
                                        "run_name": f"{task}-{method}"})
    ratios: list[float] = []
    measured = replies.update_ratio

    def recording_ratio(*args: Any, **kwargs: Any) -> float:
        ratios.append(measured(*args, **kwargs))
        return ratios[-1]

    replies.update_ratio = recording_ratio  # check_reply looks it up in its module at every call
    try:
        run_dir = work / cfg.run_name
        run_dir.mkdir(parents=True)
        run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run_dir)
    finally:
        replies.update_ratio = measured
    values = np.asarray(ratios)
    return {"task": task, "method": method, "rounds": rounds, "replies": len(values), **setting,
            "median": float(np.median(values)), "p99": float(np.quantile(values, 0.99)),
            "max": float(values.max()), "bound": cfg.max_update_norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--lr", type=float, default=LARGEST_STEP["lr"])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    setting = {**LARGEST_STEP, "lr": args.lr, **SHAPES[args.shape]}
    quiet_flower()
    work = Path(tempfile.mkdtemp(prefix="maestro-update-norms-"))
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            rows.append(measure(task, method, args.rounds, work, setting))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": setting, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
