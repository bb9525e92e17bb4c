"""Simulation throughput: Flower + Ray against the same client updates back-to-back in one process.

For every (clients, sampled per round) pair it runs the default CNN/digits
federation (IID partition: 1000 clients leave ~1 example each) for
``--rounds`` rounds on Flower's simulation engine with Ray, and the same
rounds through :class:`strategies.local_grid.LocalGrid` (the ClientApp called
in-process, no engine). Both runs do identical work: same clients, ranks,
data and aggregation. It reports

* wall seconds per round and client updates per second (rounds after the first);
* the server's own seconds per round (``configure_train`` + ``aggregate_train``, no evaluation);
* the overhead ratio = simulation round time / in-process round time (both
  without the central evaluation, which is identical);
* the peak memory of the whole process tree (Ray's raylet, GCS and workers included), as summed
  RSS and as summed PSS (shared pages split among the processes that map them).

    python benchmarks/sim_throughput.py                 # the full grid (~5 min here)
    python benchmarks/sim_throughput.py --grid 10:10    # one pair
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maestro_fl import protocol as P  # noqa: E402
from maestro_fl.config import SimConfig, resolve  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402
from strategies.runners.ray_engine import load_ref, quiet_flower, run_simulation  # noqa: E402


class PeakRss:
    """Polls the memory of this process and all its descendants.

    ``peak`` sums RSS, which counts shared pages (torch's libraries, Ray's object store) once per
    process that maps them; ``peak_pss`` sums PSS, which splits each shared page among its users:
    the tree's actual footprint.
    """

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.peak, self.peak_pss, self._stop = period, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    total += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            time.sleep(self.period)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def config(out: Path, clients: int, per_round: int, rounds: int, name: str, backend: str, cpus: float) -> SimConfig:
    return resolve(
        SimConfig,
        overrides={
            "num_clients": clients,
            "clients_per_round": per_round,
            "rounds": rounds,
            "partition": "iid",
            "val_fraction": 0.0,
            "progress": False,
            "out_dir": str(out),
            "run_name": name,
            "backend": backend,
            "num_cpus_per_client": cpus,
        },
    )


def steady(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "rounds.csv")
    return df[df["round"] > 1]  # the first round pays for actor start-up and data loading


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="10:10,100:10,100:100,1000:10,1000:100", help="clients:per_round,...")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--cpus-per-client", type=float, default=SimConfig().num_cpus_per_client, help="Ray CPUs per ClientApp"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sim_throughput.json"))
    args = ap.parse_args()
    quiet_flower()
    work = Path(tempfile.mkdtemp(prefix="maestro-sim-bench-"))
    rows = []
    for item in args.grid.split(","):
        clients, per_round = (int(x) for x in item.split(":"))
        name = f"n{clients}-k{per_round}"
        t0 = time.perf_counter()
        with PeakRss() as rss:
            sim_dir = run_simulation(config(work, clients, per_round, args.rounds, name + "-ray", "ray", args.cpus_per_client))
        sim_total = time.perf_counter() - t0
        local_cfg = config(work, clients, per_round, args.rounds, name + "-local", "local", args.cpus_per_client)
        local_dir = work / (name + "-local")
        local_dir.mkdir()
        run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), clients), local_cfg, local_dir)
        sim, base = steady(sim_dir), steady(local_dir)
        row = {
            "clients": clients,
            "per_round": per_round,
            "cpus_per_client": args.cpus_per_client,
            "rounds_measured": len(sim),
            "sim_round_s": float(sim["train_wall_seconds"].mean()),
            "server_round_s": float(sim["server_seconds"].mean()),  # configure_train + aggregate_train only
            "sim_round_with_eval_s": float(sim["wall_seconds"].mean()),
            "inprocess_round_s": float(base["train_wall_seconds"].mean()),
            "updates_per_s": float(sim["ok"].sum() / sim["train_wall_seconds"].sum()),
            "overhead_ratio": float(sim["train_wall_seconds"].mean() / base["train_wall_seconds"].mean()),
            "whole_run_s": sim_total,
            "peak_rss_gb": rss.peak / 1e9,
            "peak_pss_gb": rss.peak_pss / 1e9,
            "ok_updates": int(sim["ok"].sum()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "rounds": args.rounds, "workload": "cnn/digits, IID, default tiers"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
