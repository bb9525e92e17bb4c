"""The server's own per-round time as the federation grows: ``configure_train`` + ``aggregate_train`` only.

Clients answer instantly: a train message is answered with the arrays it
carried and the metrics a real client sends (registration runs the real
ClientApp), so what is timed is the ServerApp's strategy alone, on the real
sub-models of the task (MNIST-1D, the 1-D CNN, the default device population
and method). The same quantity is ``server_round_s`` in
``benchmarks/sim_throughput.py``, where real clients train.

    python benchmarks/server_round.py                          # the table in the README (MNIST-1D for
                                                               # 100,000 clients is generated once: ~10 min)
    python benchmarks/server_round.py --grid 100000:1000       # one pair
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from maestro_fl import message_keys as P  # noqa: E402
from strategies.runners.launch import load_ref, quiet_flower  # noqa: E402
from strategies.runners.local_grid import LocalGrid  # noqa: E402
from strategies.server_app import run_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_throughput import config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "server_round.json"


class EchoGrid(LocalGrid):
    """Registration through the real ClientApp; every train message answered at once with what it carried."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return super().send_and_receive(messages, timeout=timeout)
        replies = []
        for msg in messages:
            metrics = MetricRecord({P.NUM_EXAMPLES: 10, P.TRAIN_LOSS: 1.0, P.PARTITION_ID: msg.metadata.dst_node_id - 1,
                                    P.SAMPLE_PASSES: 30, P.WALL_SECONDS: 0.0})
            replies.append(Message(RecordDict({P.ARRAYS: msg.content[P.ARRAYS], P.METRICS: metrics}), reply_to=msg))
        return replies


def measure(clients: int, per_round: int, rounds: int, work: Path, task: str) -> dict[str, Any]:
    cfg = config(task, work, clients, per_round, rounds, f"{task}-n{clients}-k{per_round}", "local", 1.0)
    run_dir = work / cfg.run_name
    run_dir.mkdir()
    started = time.perf_counter()
    run_server(EchoGrid(load_ref(P.CLIENTAPP_REF), clients), cfg, run_dir)
    rounds_df = pd.read_csv(run_dir / "rounds.csv")
    steady = rounds_df[rounds_df["round"] > 1]
    return {"task": task, "clients": clients, "per_round": per_round, "rounds_measured": len(steady),
            "ok": int(steady["ok"].sum()),
            "server_round_s": float(steady["server_seconds"].mean()),
            "server_round_max_s": float(steady["server_seconds"].max()),
            "bytes_down_per_round": float(steady["bytes_down"].mean()),
            "whole_run_s": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist1d")
    ap.add_argument("--grid", default="1000:100,10000:100,10000:1000,100000:1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    quiet_flower()
    work = Path(tempfile.mkdtemp(prefix="maestro-server-bench-"))
    rows = []
    for item in args.grid.split(","):
        clients, per_round = (int(x) for x in item.split(":"))
        rows.append(measure(clients, per_round, args.rounds, work, args.task))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
            "clients": "echo replies (the arrays each client was sent), registration through the real ClientApp"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
