"""Simulation throughput against the limit: the Ray simulation, the in-process grid and a tight loop, side by side.

For every task and (clients N, sampled per round K) pair it runs, in this one
process run and on the same config and seed:

1. **the simulation** (``backend=ray``: the RayGrid, the ClientApp in Ray actors,
   the ServerApp's strategy), ``--rounds`` rounds;
2. **the in-process grid** (:class:`strategies.runners.local_grid.LocalGrid`: the
   same ServerApp and ClientApp called one message after another, no engine),
   which also records every train message it sends;
3. **the reference: a tight PyTorch loop** that does the same client work as
   those messages (same clients, sub-models, received weights, data, epochs,
   batch size, learning rate and seeds) back to back in this process: one model
   per sub-model shape built beforehand, no messages, no engine, no server.
   It runs with the client's torch threads (``client_threads``).

It reports, over the rounds after the first (which pays for actor start-up):

* ``updates_per_s`` of the simulation and ``reference_updates_per_s`` of the tight
  loop, and their ratio, the **efficiency**; the simulation runs ``actors`` client
  processes, the reference one, so an efficiency above 1 is possible;
* ``server_round_s``: the server's own seconds per round (``configure_train`` +
  ``aggregate_train``; no evaluation);
* ``inprocess_round_s``: the in-process grid's seconds per round;
* the peak memory of the simulation's whole process tree (Ray's raylet, GCS and
  workers included), as summed RSS and as summed PSS (shared pages split among
  the processes that map them: the tree's actual footprint).

Tasks: ``digits`` (the default CNN/digits federation, IID; digits has 1,437
training images, so N <= 1,000) and ``mnist1d`` (the 1-D CNN on MNIST-1D,
generated with 10 training examples per client, IID).

    python benchmarks/sim_throughput.py                                  # both tasks, the full grid
    python benchmarks/sim_throughput.py --tasks mnist1d --grid 100:100   # one pair
    python benchmarks/sim_throughput.py --plot-only                      # the figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from flwr.app import MessageType  # noqa: E402

from maestro_fl import message_keys as P  # noqa: E402
from maestro_fl import wire  # noqa: E402
from maestro_fl.config import SimConfig, resolve  # noqa: E402
from maestro_fl.federated import federation  # noqa: E402
from maestro_fl.methods import Assignment, LocalTraining  # noqa: E402
from maestro_fl.training import torch_threads  # noqa: E402
from strategies.runners.launch import load_ref, quiet_flower, run_simulation  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sim_throughput.json"
FIGURE = ROOT / "analysis" / "figures" / "sim_throughput.png"
#: the grid per task: digits cannot make more than ~1,400 clients
GRIDS = {"digits": "100:100,1000:100", "mnist1d": "100:100,1000:100,10000:100,10000:1000"}
EXAMPLES_PER_CLIENT = 10  # MNIST-1D: a cross-device client holds a handful of examples
MNIST1D_TRAIN_SHARE = 0.8  # the generator's train/test split


class PeakMemory:
    """Polls the memory of this process and all its descendants (summed RSS and summed PSS)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.peak_rss, self.peak_pss, self._stop = period, 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.period)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def task_overrides(task: str, clients: int) -> dict[str, Any]:
    if task == "digits":
        return {}
    if task == "mnist1d":
        samples = math.ceil(clients * EXAMPLES_PER_CLIENT / MNIST1D_TRAIN_SHARE)
        return {"dataset": "mnist1d", "model": "cnn1d", "dataset_samples": samples}
    raise SystemExit(f"--tasks: unknown task {task!r}; allowed: {sorted(GRIDS)}")


def config(task: str, out: Path, clients: int, per_round: int, rounds: int, name: str, backend: str,
           cpus: float) -> SimConfig:
    return resolve(SimConfig, overrides={
        "num_clients": clients, "clients_per_round": per_round, "rounds": rounds, "partition": "iid",
        "val_fraction": 0.0, "progress": False, "out_dir": str(out), "run_name": name, "backend": backend,
        "num_cpus_per_client": cpus, **task_overrides(task, clients)})


def steady(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "rounds.csv")
    return df[df["round"] > 1]  # the first round pays for actor start-up and data loading


class RecordingGrid(LocalGrid):
    """The in-process grid, keeping ``(partition id, config, arrays)`` of every train message from round 2 on."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sent: list[tuple[int, dict[str, Any], Any]] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN:
                conf = dict(msg.content[P.CONFIG])
                if int(conf[P.SERVER_ROUND]) > 1:
                    self.sent.append((msg.metadata.dst_node_id - 1, conf, msg.content[P.ARRAYS]))
        return super().send_and_receive(messages, timeout=timeout)


def tight_loop(cfg: SimConfig, sent: list[tuple[int, dict[str, Any], Any]]) -> float:
    """Seconds the client work of ``sent`` takes back to back: models, weights and data prepared beforehand."""
    fed = federation(cfg)
    method = fed.method
    models: dict[Any, torch.nn.Module] = {}
    decoded: dict[int, torch.Tensor] = {}  # one tensor per distinct Array (a tier's parts are shared)
    jobs = []
    for pid, conf, arrays in sent:
        a = Assignment.from_config(conf, fed.layer_names)
        key = (a.fraction, tuple(sorted(a.ranks.items())))
        if key not in models:
            models[key] = method.family.client_model(a.fraction, a.ranks)
        state = {}
        for name, arr in arrays.items():
            if id(arr) not in decoded:
                decoded[id(arr)] = torch.from_numpy(wire.decode(arr.stype, arr.data).copy())
            state[name] = decoded[id(arr)]
        seed = int(np.random.SeedSequence([cfg.seed, int(conf[P.SERVER_ROUND]), pid]).generate_state(1)[0])
        jobs.append((models[key], state, fed.client_split(pid)[0], a, cfg.local_epochs, cfg.lr, seed))
    with torch_threads(cfg.client_threads):
        started = time.perf_counter()
        for model, state, data, a, epochs, lr, seed in jobs:
            model.load_state_dict(state)
            method.train(model, data, a, LocalTraining(epochs, lr, torch.Generator().manual_seed(seed),
                                                       fed.data.augment))
        return time.perf_counter() - started


def measure(task: str, clients: int, per_round: int, rounds: int, cpus: float, work: Path) -> dict[str, Any]:
    name = f"{task}-n{clients}-k{per_round}"
    sim_cfg = config(task, work, clients, per_round, rounds, name + "-ray", "ray", cpus)
    started = time.perf_counter()
    with PeakMemory() as memory:
        sim_dir = run_simulation(sim_cfg)
    whole_run = time.perf_counter() - started
    local_cfg = config(task, work, clients, per_round, rounds, name + "-local", "local", cpus)
    local_dir = work / (name + "-local")
    local_dir.mkdir()
    grid = RecordingGrid(load_ref(P.CLIENTAPP_REF), clients)
    run_server(grid, local_cfg, local_dir)
    reference_s = tight_loop(local_cfg, grid.sent)
    sim, local = steady(sim_dir), steady(local_dir)
    updates = int(sim["ok"].sum())
    if updates != len(grid.sent):
        print(f"warning: {updates} simulated updates, {len(grid.sent)} in the reference", file=sys.stderr)
    ups = updates / float(sim["train_wall_seconds"].sum())
    ref_ups = len(grid.sent) / reference_s
    actors = max(1, min(int((os.cpu_count() or 1) // cpus), clients))
    return {
        "task": task, "clients": clients, "per_round": per_round, "cpus_per_client": cpus, "actors": actors,
        "rounds_measured": len(sim), "ok_updates": updates,
        "updates_per_s": ups,
        "reference_updates_per_s": ref_ups,
        "efficiency": ups / ref_ups,
        "sim_round_s": float(sim["train_wall_seconds"].mean()),
        "server_round_s": float(sim["server_seconds"].mean()),
        "server_round_max_s": float(sim["server_seconds"].max()),
        "sim_round_with_eval_s": float(sim["wall_seconds"].mean()),
        "inprocess_round_s": float(local["train_wall_seconds"].mean()),
        "reference_round_s": reference_s / len(sim),
        "whole_run_s": whole_run,
        "peak_rss_gb": memory.peak_rss / 1e9,
        "peak_pss_gb": memory.peak_pss / 1e9,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    order = [f"{n:,}:{k:,}" for n, k in sorted({(r["clients"], r["per_round"]) for r in rows})]
    axes[0].plot(order, [None] * len(order), alpha=0)  # fixes the order of the categories
    axes[1].plot(order, [None] * len(order), alpha=0)
    for (task, part), color in zip(df.groupby("task"), ("tab:blue", "tab:orange", "tab:green")):
        labels = [f"{n:,}:{k:,}" for n, k in zip(part["clients"], part["per_round"])]
        axes[0].plot(labels, part["updates_per_s"], "o-", color=color, label=f"{task}: simulation")
        axes[0].plot(labels, part["reference_updates_per_s"], "x--", color=color, label=f"{task}: tight loop (1 process)")
        axes[1].plot(labels, part["efficiency"], "o-", color=color, label=task)
    axes[0].set(xlabel="clients N : sampled per round K", ylabel="client updates / s", title="Throughput",
                ylim=(0, None))
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":", label="target 0.5")
    axes[1].set(xlabel="clients N : sampled per round K", ylabel="simulation / tight loop",
                title="Efficiency", ylim=(0, max(1.1, float(df["efficiency"].max()) * 1.1)))
    for ax in axes:
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits,mnist1d", help=f"comma-separated, of {sorted(GRIDS)}")
    ap.add_argument("--grid", default="", help="clients:per_round,... (default: each task's own grid)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cpus-per-client", type=float, default=SimConfig().num_cpus_per_client,
                    help="Ray CPUs per client actor")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--figure", default=str(FIGURE))
    ap.add_argument("--plot-only", action="store_true", help="only redraw the figure from --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.read_text())["rows"], Path(args.figure))
        return
    quiet_flower()
    work = Path(tempfile.mkdtemp(prefix="maestro-sim-bench-"))
    rows = []
    for task in args.tasks.split(","):
        for item in (args.grid or GRIDS[task]).split(","):
            clients, per_round = (int(x) for x in item.split(":"))
            row = measure(task, clients, per_round, args.rounds, args.cpus_per_client, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
            "torch": torch.__version__,
            "reference": "tight loop: the same client work back to back in one process (benchmarks/sim_throughput.py)",
            "workloads": {"digits": "cnn/digits, IID, default tiers",
                          "mnist1d": f"cnn1d/MNIST-1D, {EXAMPLES_PER_CLIENT} examples per client, IID, default tiers"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    plot(rows, Path(args.figure))


if __name__ == "__main__":
    main()
