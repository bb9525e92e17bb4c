"""The maestro-fl ServerApp: registration, then the round loop in numbered steps with callbacks.

Each round:

1. configure: the strategy samples clients and cuts each its sub-model;
2. send the messages and wait for the replies (``round_timeout_s``);
3. aggregate: check every reply, merge the good ones by the method's rule;
4. callbacks, in order: central evaluation at every tier's budget, the
   tables (rows flushed as written), the checkpoint, progress.

A run resumes from its last checkpoint; its tables are first trimmed to it.
The run directory's layout is :mod:`maestro_fl.results`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from maestro_fl.callbacks import (
    CentralEvaluation,
    Checkpointing,
    LearningCheck,
    Progress,
    RoundCallback,
    RoundResult,
    RoundTables,
    chance_rate,
)
from maestro_fl.config import SimConfig, parse_faults, resolve, to_dict
from maestro_fl.data import Split
from maestro_fl.diagnostics import LoDDiagnostics
from maestro_fl.federated import check_resume, federation, run_device, run_fingerprint
from maestro_fl.footprint import Inputs
from maestro_fl.results import (
    DEVICES,
    ROUNDS,
    TIERS,
    RunDir,
    final_columns,
    format_table,
    new_run_dir,
    timestamp,
)
from maestro_fl.server import IN_FLIGHT
from maestro_fl.server_optimizer import ServerMomentum
from maestro_fl.training import torch_threads

from .runners.ray_grid import RoundInterrupted
from .submodel_strategy import SubModelStrategy


class RunInterrupted(RuntimeError):
    """The run stopped at a user's request; its run directory holds every round before the stop.

    ``exit_code`` is the shell's convention, 128 + the signal: 130 after SIGINT (Ctrl-C), 143 after SIGTERM.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = 128 + (signum or signal.SIGINT)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM, the graceful way: the first asks the run to stop, a second aborts at once.

    Used as a context manager around a run (handlers are installed only in the
    main thread); :meth:`requested` is polled by the round loop and the grids.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None  # the signal that asked to stop

    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum: int, frame: object) -> None:
        if self._event.is_set():  # the second signal: abort now
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        self._event.set()
        print(f"\n{signal.Signals(signum).name}: stopping after abandoning the round under way "
              "(again to abort at once)", flush=True)

    def install(self) -> None:
        """(Re)take SIGINT and SIGTERM. ``ray.init`` installs a SIGTERM handler of its own that exits at once,
        so the Ray backend calls this again after starting Ray."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def __enter__(self) -> StopRequest:
        self.install()
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()


def default_callbacks(cfg: SimConfig, run: RunDir, strategy: SubModelStrategy, test: Split, inputs: Inputs,
                      validation: Split | None = None, fingerprint: dict[str, Any] | None = None) -> list[RoundCallback]:
    """Evaluation, then the tables, then the checkpoint (never ahead of the tables), then progress."""
    callbacks: list[RoundCallback] = [
        CentralEvaluation(strategy.method, test, inputs, validation, cfg.eval_every, run_device(cfg)),
        LearningCheck(run, chance_rate(test), cfg.rounds, cfg.lr, cfg.momentum, compare_loss=cfg.round_mode == "sync"),
        RoundTables(run),
        Checkpointing(run, fingerprint),
    ]
    if cfg.tracking:  # after the tables: a tracker mirrors their row
        from maestro_fl.tracking import make_trackers

        callbacks[3:3] = make_trackers(cfg.tracking, run.path, to_dict(cfg))
    if cfg.diagnostics_every > 0:  # before the checkpoint: its rows are then never behind it
        callbacks.insert(len(callbacks) - 1, LoDDiagnostics(strategy.method, run, test, validation, inputs, cfg.diagnostics_every,
                                           cfg.rounds))
    if cfg.progress:
        callbacks.append(Progress(cfg.rounds, lines=LOG.isEnabledFor(logging.DEBUG)))
    return callbacks


#: phase lines and warnings of a run (``maestro-fl --quiet``/``--verbose`` set its level)
LOG = logging.getLogger("maestro_fl")

PLAN_COLUMNS = [
    ("tier", "tier", ""),
    ("clients", "clients", "d"),
    ("served", "served by", ""),
    ("fraction", "fraction", ".3f"),
    ("params", "params", ",d"),
    ("params_ratio", "params/full", ".3f"),
    ("macs", "MACs", ",d"),
    ("bytes_per_round", "bytes/round", ",d"),
    ("memory", "memory MB own/has", ""),
    ("compute", "compute s own/budget", ""),
    ("next", "next larger refused by", ""),
    ("unaffordable", "unaffordable", "d"),
]


def format_plan(rows: Sequence[dict[str, Any]], notes: bool = True) -> str:
    """The per-tier budget table of :meth:`SubModelStrategy.plan`, with what would serve unaffordable clients.

    Memory and compute show what the tier's own sub-model needs against what its weakest device has;
    "next larger refused by" names the constraint the next larger sub-model breaks and what it would
    need. For a tier that affords nothing, its smallest sub-model's needs.
    """
    def next_refused(r: dict[str, Any]) -> str:
        if r["binding"] in ("none", "rank_fraction"):
            return "-" if r["binding"] == "none" else "explicit rank_fraction"
        needs = {"memory": f"{r['need_memory'] / 1e6:.2f} MB", "compute": f"{r['need_seconds']:.1f} s"}
        return ", ".join(f"{b} ({needs[b]})" for b in r["binding"].split("+") if b in needs) or r["binding"]

    def served(r: dict[str, Any]) -> str:
        if r["served_by"] in ("width", "width floor"):
            return f"{r['served_by']} {r['width']:.2f}"
        return str(r["served_by"])

    shown = []
    for r in rows:
        own_memory, own_seconds = (r["own_memory"], r["own_seconds"]) if r["unaffordable"] < r["clients"] else \
            (r["need_memory"], r["need_seconds"])
        shown.append(r | {
            "served": served(r),
            "memory": f"{own_memory / 1e6:.2f}/{r['have_memory'] / 1e6:.2f}",
            "compute": f"{own_seconds:.1f}/{r['have_seconds']:g}" if r["have_seconds"] > 0 else f"{own_seconds:.1f}/-",
            "next": next_refused(r),
        })
    text = format_table(shown, PLAN_COLUMNS).replace(" nan ", "   - ")
    advice = [f"tier {r['tier']}: {r['unaffordable']} of {r['clients']} clients can afford no sub-model: {r['advice']}"
             for r in rows if r["unaffordable"] and notes]
    return "\n".join([text, *advice])


def run_server(
    grid: Grid,
    cfg: SimConfig,
    run_dir: Path,
    extra_callbacks: Sequence[RoundCallback] = (),
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the federation in ``run_dir``; returns the final per-tier rows.

    Raises
    ------
    RunInterrupted
        ``stop`` was requested: the round under way is abandoned (nothing of it
        is written), so the tables and the checkpoint end at the same round.
    """
    with torch_threads(cfg.server_threads):  # evaluation and footprints: see SimConfig.server_threads
        return _run_server(grid, cfg, run_dir, extra_callbacks, stop)


def _run_server(
    grid: Grid, cfg: SimConfig, run_dir: Path, extra_callbacks: Sequence[RoundCallback], stop: StopRequest | None
) -> list[dict[str, Any]]:
    run = RunDir(run_dir)
    LOG.info("building the data and the model: %s, %s, %s clients (%s partition)", cfg.dataset, cfg.model,
             cfg.num_clients, cfg.partition)
    fed = federation(cfg)
    fingerprint = run_fingerprint(cfg, fed)
    # before anything in the run directory changes: refuse, naming what differs
    checkpoint = check_resume(run, cfg, fed, fingerprint)
    strategy = SubModelStrategy(fed.method, cfg, partition_sizes=[len(train) for train, _ in fed.partitions])

    # registration: every node names its partition and examples; its device is the population's (the core's)
    LOG.info("registering %s clients", cfg.num_clients)
    strategy.register(grid.send_and_receive(strategy.registration_messages(grid), timeout=cfg.round_timeout_s))
    if not strategy.devices:
        raise RuntimeError("no client registered; every node failed the registration query")
    plan = strategy.plan()
    LOG.info("what each tier can afford (maestro-fl plan):\n%s", format_plan(plan, notes=False))
    for row in plan:
        if row["unaffordable"]:
            LOG.warning("tier %s: %s of %s clients can afford no sub-model and will never train: %s",
                        row["tier"], row["unaffordable"], row["clients"], row["advice"])
    if not run.has(DEVICES):  # a resumed run registered the same devices already
        run.writer(DEVICES).extend(
            {"partition_id": strategy.partition_of[n], "node_id": n, "num_examples": strategy.examples_of[n]}
            | {k: getattr(strategy.devices[n], k) for k in DEVICES.names[3:]}
            for n in strategy.nodes
        )

    arrays = {k: v.detach().numpy().copy() for k, v in fed.template.state_dict().items()}
    start, server_state = 1, {}
    if checkpoint is not None:
        start, arrays, server_state = checkpoint.round + 1, checkpoint.arrays, checkpoint.server_state
        LOG.info("resuming %s after round %s", run_dir, checkpoint.round)
    run.trim(start - 1)  # rows written after the checkpoint (or before any) are redone, never duplicated
    if start > 1 and run.has(ROUNDS):  # the simulated clock goes on from the checkpoint round's end
        rounds = run.table(ROUNDS, required=["sim_seconds_total"])
        strategy.core.clock_s = float(rounds["sim_seconds_total"].iloc[-1])
    callbacks = [*default_callbacks(cfg, run, strategy, fed.data.test, fed.data.spec, fed.validation,
                                    fingerprint=fingerprint), *extra_callbacks]
    for cb in callbacks:
        cb.on_run_start(start, cfg.rounds)
    momentum = cfg.server_momentum
    if momentum > 0 and not type(fed.method).keeps_coordinates(cfg):
        rule = cfg.strategy + (f" with aggregation={cfg.aggregation}" if cfg.aggregation != "ordered" else "")
        LOG.info("server momentum is off for %s: its server rule re-factors the model every round, so a "
                 "velocity of its factors has no meaning", rule)
        momentum = 0.0
    velocity = {k: v for k, v in server_state.items() if not k.startswith(IN_FLIGHT)}
    strategy.core.restore(server_state)  # fedbuff, fedasync: the updates in flight at the checkpoint
    optimizer = ServerMomentum(momentum, velocity)
    done_round = start - 1
    try:
        for server_round in range(start, cfg.rounds + 1):
            if stop is not None and stop.requested():
                raise RoundInterrupted("stop requested")
            started = time.perf_counter()
            # 1. configure: sample clients, cut their sub-models
            messages = strategy.train_messages(server_round, arrays)
            configured = time.perf_counter()
            # 2. send and receive
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout_s)) if messages else []
            replies += injected_duplicates(replies, cfg, strategy.partition_of, server_round)
            received = time.perf_counter()
            # 3. aggregate the good replies
            merged = strategy.merge_replies(server_round, replies)
            before = arrays
            if merged is not None:  # a round with no good reply leaves the model and the velocity as they were
                arrays = optimizer.step(before, merged)
            done = time.perf_counter()
            # 4. callbacks: evaluation, tables, checkpoint, progress
            result = RoundResult(
                round=server_round,
                arrays=arrays,
                before=before,
                server_state=optimizer.state() | strategy.core.state(),
                clients=strategy.client_rounds,
                tier_costs=strategy.tier_costs(),
                train_wall_seconds=done - started,
                server_seconds=(configured - started) + (done - received),
                started=started,
                sim_start_s=strategy.core.round_start_s,
                sim_seconds=strategy.core.round_seconds,
            )
            done_round = server_round
            if any([cb.after_round(result) for cb in callbacks]):
                break
    except RoundInterrupted:
        raise RunInterrupted(
            f"interrupted: rounds 1-{done_round} of {cfg.rounds} are in {run_dir} (tables and checkpoint); "
            f"continue with: maestro-fl simulate resume={run_dir}", stop.signum if stop is not None else None
        ) from None
    finally:
        for cb in callbacks:
            cb.on_run_end()
    return run.final_table() if run.has(TIERS) else []


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> None:
    """Flower's engine registers its SuperNodes while the ServerApp starts: wait until all are there,
    or the registration query would reach only those that happened to be ready."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.05)


def injected_duplicates(replies: list[Any], cfg: SimConfig, partition_of: dict[int, int], server_round: int) -> list[Any]:
    """The ``duplicate`` fault: replies of the named partitions delivered a second time (as a network would)."""
    faults = parse_faults(cfg.fault_injection)
    return [r for r in replies if (f := faults.get(partition_of.get(r.metadata.src_node_id, -1))) is not None
            and f.kind == "duplicate" and f.applies(server_round)]


def print_final(rows: list[dict[str, Any]], dataset: str = "") -> None:
    print(format_table(rows, final_columns(dataset)))


# -- Flower entry point (`flwr run .`) ------------------------------------------
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the SimConfig from the run config (hyphens or underscores), run, print the table."""
    cfg = resolve(SimConfig, overrides={k.replace("-", "_"): v for k, v in context.run_config.items()})
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg.out_dir, cfg.run_name or f"sim-{timestamp()}")
    with RunDir(run_dir).lock():
        if not cfg.resume:
            RunDir(run_dir).save_config(to_dict(cfg))
        wait_for_nodes(grid, cfg.num_clients, cfg.round_timeout_s)
        print_final(run_server(grid, cfg, run_dir), cfg.dataset)
