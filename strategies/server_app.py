"""The maestro-fl ServerApp: registration, the round loop, evaluation, results.

Each round: sample online clients, send each its factor prefix
(:class:`~strategies.fedlod.FedLoD`), aggregate the good replies, evaluate
the global model centrally at every tier's ranks, then append to the run's
tables and checkpoint. A run resumes from its last checkpoint.

Tables of a run directory (every row is written when its round ends):

* ``rounds.csv``: one row per round (simulated and wall seconds, bytes, client counts);
* ``tiers.csv``: one row per round and tier (accuracy, loss, ranks, footprint);
* ``clients.csv``: one row per sampled client per round (tier, ranks, status, costs);
* ``devices.csv``: the registered device of every client.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from maestro_fl.config import SimConfig, resolve, save
from maestro_fl.federated import Federation, federation
from maestro_fl.footprint import footprint
from maestro_fl.results import CsvLog, format_table
from maestro_fl.training import evaluate

from .baselines import make_strategy
from .fedlod import FedLoD, client_round_dicts, to_numpy, to_record

CHECKPOINT = "checkpoint.pt"
TABLES = ("rounds.csv", "tiers.csv", "clients.csv")
STATUSES = ("ok", "failed", "timeout", "malformed", "dropped", "unaffordable")  # of a client in a round

RoundCallback = Callable[[int, dict[str, Any]], None]


def evaluate_tiers(fed: Federation, strategy: FedLoD, arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Test accuracy and deployed footprint of the global model at every tier's budget.

    The model a tier runs comes from the strategy (rank prefixes, width slices
    or the dense model); its footprint is measured by the one
    :func:`~maestro_fl.footprint.footprint` and divided by the full dense
    model's, so ratios compare across methods.
    """
    rows = []
    reference = strategy.reference
    global_model = strategy.global_model(arrays)
    for tier, cost in strategy.tier_costs().items():
        model, ranks = strategy.deployed(global_model, cost)
        loss, acc = evaluate(model, fed.data.test, ranks)
        fp = footprint(model, fed.data.spec.shape, ranks)
        rows.append(
            {
                "tier": tier,
                "accuracy": acc,
                "loss": loss,
                "fraction": cost.fraction,
                "ranks": [ranks[n] for n in strategy.layer_names] if ranks else [],
                "params": fp.params,
                "macs": fp.macs,
                "bytes_fp32": fp.bytes("fp32"),
                "params_ratio": fp.params / reference.dense_params,
                "macs_ratio": fp.macs / reference.dense_macs,
            }
        )
    return rows


def save_checkpoint(run_dir: Path, server_round: int, strategy: FedLoD, arrays: dict[str, np.ndarray]) -> None:
    """Atomically write the global model (factors and dense parameters) after ``server_round``."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(
        {
            "round": server_round,
            "global_ranks": dict(strategy.global_ranks),
            "arrays": {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()},
        },
        tmp,
    )
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def trim_tables(run_dir: Path, last_round: int) -> None:
    """Drop rows of rounds after the checkpoint (written, then interrupted before it)."""
    for name in TABLES:
        path = run_dir / name
        if path.exists() and path.stat().st_size > 0:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
            df[df["round"].astype(int) <= last_round].to_csv(path, index=False)


def run_server(
    grid: Grid, cfg: SimConfig, run_dir: Path, on_round_end: RoundCallback | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the federation in ``run_dir``; returns the final per-tier rows."""
    fed = federation(cfg)
    strategy = make_strategy(cfg, fed)

    # registration: every node reports its device
    strategy.register(grid.send_and_receive(strategy.registration_messages(grid), timeout=cfg.round_timeout_s))
    if not strategy.devices:
        raise RuntimeError("no client registered; every node failed the registration query")
    if not (run_dir / "devices.csv").exists():  # a resumed run registered the same devices already
        CsvLog(run_dir / "devices.csv").extend(
            {"partition_id": strategy.partition_of[n], "node_id": n, "num_examples": strategy.examples_of[n]}
            | asdict(strategy.devices[n])
            for n in strategy.nodes_by_partition()
        )

    arrays = {k: v.detach().numpy().copy() for k, v in fed.template.state_dict().items()}
    start = 1
    if (ckpt := load_checkpoint(run_dir)) is not None:
        start = int(ckpt["round"]) + 1
        strategy.global_ranks = dict(ckpt["global_ranks"])
        arrays = {k: v.numpy() for k, v in ckpt["arrays"].items()}
        trim_tables(run_dir, start - 1)
        print(f"resuming {run_dir} after round {start - 1}")
    logs = {name: CsvLog(run_dir / name) for name in TABLES}
    sim_total = _previous_sim_seconds(run_dir)
    tiers: list[dict[str, Any]] = []
    for server_round in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        messages = strategy.configure_train(server_round, to_record(arrays), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout_s) if messages else []
        merged, _ = strategy.aggregate_train(server_round, replies)
        if merged is not None:
            arrays = to_numpy(merged)
        t_train = time.perf_counter() - t0
        tiers = evaluate_tiers(fed, strategy, arrays)
        clients = client_round_dicts(strategy.client_rounds)
        latency = _round_latency(clients, cfg.round_deadline_s)
        sim_total += latency
        counts = {s: sum(c["status"] == s for c in clients) for s in STATUSES}
        ok = [c for c in clients if c["status"] == "ok"]
        round_row = {
            "round": server_round,
            "sim_seconds": latency,
            "sim_seconds_total": sim_total,
            "wall_seconds": time.perf_counter() - t0,
            "train_wall_seconds": t_train,  # configure + clients + aggregate, without central evaluation
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "selected": len(clients),
            **counts,
            "train_loss": float(np.average([c["train_loss"] for c in ok], weights=[c["num_examples"] for c in ok]))
            if ok
            else float("nan"),
            "global_rank": sum(strategy.global_ranks.values()),
        }
        logs["clients.csv"].extend(clients)
        logs["tiers.csv"].extend({"round": server_round} | t for t in tiers)
        logs["rounds.csv"].append(round_row)
        save_checkpoint(run_dir, server_round, strategy, arrays)
        if cfg.progress:
            accs = " ".join(f"t{t['tier']}={t['accuracy']:.3f}" for t in tiers)
            print(
                f"round {server_round:3d}/{cfg.rounds}  ok {counts['ok']}/{len(clients)}  "
                f"sim {latency:6.1f}s  wall {round_row['wall_seconds']:5.2f}s  acc {accs}",
                flush=True,
            )
        if on_round_end is not None:
            on_round_end(server_round, round_row)
    return final_table(run_dir) if (run_dir / "tiers.csv").exists() else tiers


def _round_latency(clients: list[dict[str, Any]], deadline: float) -> float:
    """The slowest participant's compute + download + upload, capped by the deadline when one is set."""
    times = [c["round_seconds"] for c in clients if c["status"] in ("ok", "dropped")]
    latency = max(times, default=0.0)
    return min(latency, deadline) if deadline > 0 else latency


def _previous_sim_seconds(run_dir: Path) -> float:
    path = run_dir / "rounds.csv"
    if not path.exists() or path.stat().st_size == 0:
        return 0.0
    df = pd.read_csv(path)
    return float(df["sim_seconds_total"].iloc[-1]) if len(df) else 0.0


def final_table(run_dir: Path) -> list[dict[str, Any]]:
    """Per tier: final accuracy, footprint, and mean bytes per participating client per round."""
    tiers = pd.read_csv(run_dir / "tiers.csv")
    clients = pd.read_csv(run_dir / "clients.csv")
    last = tiers[tiers["round"] == tiers["round"].max()]
    sent = clients[clients["status"] == "ok"].groupby("tier")
    rows = []
    for _, t in last.iterrows():
        tier = int(t["tier"])
        traffic = sent.get_group(tier) if tier in sent.groups else None
        rows.append(
            {
                "tier": tier,
                "clients": int((clients.drop_duplicates("partition_id")["tier"] == tier).sum()),
                "accuracy": float(t["accuracy"]),
                "params": int(t["params"]),
                "params_ratio": float(t["params_ratio"]),
                "macs": int(t["macs"]),
                "bytes_per_round": float((traffic["bytes_down"] + traffic["bytes_up"]).mean()) if traffic is not None else 0.0,
                "updates": len(traffic) if traffic is not None else 0,
            }
        )
    return rows


FINAL_COLUMNS = [
    ("tier", "tier", ""),
    ("accuracy", "accuracy", ".4f"),
    ("params", "params", ",d"),
    ("params_ratio", "params/full", ".3f"),
    ("macs", "MACs", ",d"),
    ("bytes_per_round", "bytes/round", ",.0f"),
    ("updates", "updates", "d"),
]


def print_final(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows, FINAL_COLUMNS))


# -- Flower entry point (`flwr run .`) ------------------------------------------
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the SimConfig from the run config (hyphens or underscores), run, print the table."""
    from maestro_fl.results import new_run_dir, timestamp

    cfg = resolve(SimConfig, overrides={k.replace("-", "_"): v for k, v in context.run_config.items()})
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg.out_dir, cfg.run_name or f"sim-{timestamp()}")
    save(cfg, run_dir / "config.json")
    print_final(run_server(grid, cfg, run_dir))
