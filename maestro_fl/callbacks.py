"""Side concerns of the round loop as callbacks: central evaluation, the tables, the checkpoint, progress.

The server's loop (``strategies.server_app.run_server``) does the federated
round and hands a :class:`RoundResult` to every callback in order
(pfl-research's ``TrainingProcessCallback``). A callback that returns
``True`` from :meth:`RoundCallback.after_round` stops the run after that round.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .budget import Cost
from .convert import lod_layers
from .data import Split
from .footprint import Inputs, footprint
from .methods import FederatedMethod
from .results import (
    CLIENTS,
    ROUNDS,
    STATUSES,
    TIERS,
    Checkpoint,
    ClientRound,
    RunDir,
)
from .training import evaluate

LOG = logging.getLogger("maestro_fl")


@dataclass
class RoundResult:
    """What one round produced; callbacks read it and may add to it (``tiers``, ``row``)."""

    round: int
    arrays: dict[str, np.ndarray]  # the global model after the round
    clients: list[ClientRound]
    tier_costs: Mapping[int, Cost]
    train_wall_seconds: float  # configure + clients + aggregate
    server_seconds: float  # configure_train + aggregate_train only
    started: float  # perf_counter at the round's start
    before: dict[str, np.ndarray] | None = None  # the global model the round started from (None: unknown)
    sim_start_s: float = 0.0  # the simulated time the round started (the server core's clock)
    sim_seconds: float = 0.0  # the round's simulated latency (maestro_fl.server.round_latency)
    server_state: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's, for the checkpoint
    tiers: list[dict[str, Any]] = field(default_factory=list)  # filled by CentralEvaluation
    learning: str = ""  # filled by LearningCheck in the round it finds the run not learning
    row: dict[str, Any] = field(default_factory=dict)  # the rounds.csv row, filled by RoundTables


class RoundCallback:
    """Hooks of the round loop; the defaults do nothing."""

    def on_run_start(self, first_round: int, last_round: int) -> None:
        """Before the first round this process runs (``first_round`` > 1 when resuming)."""

    def after_round(self, result: RoundResult) -> bool:
        """After every round; return ``True`` to stop the run."""
        return False

    def on_run_end(self) -> None:
        """After the last round, or when the loop stops early."""


class CentralEvaluation(RoundCallback):
    """Test accuracy and deployed footprint of the global model at every tier's budget.

    The model a tier runs comes from the method (rank prefix, width slice or
    the dense model); its footprint is measured by the one
    :func:`~maestro_fl.footprint.footprint` and divided by the full dense
    model's, so ratios compare across methods.
    """

    def __init__(self, method: FederatedMethod, test: Split, inputs: Inputs, validation: Split | None = None,
                 every: int = 1, device: torch.device | str = "cpu") -> None:
        self.method, self.test, self.inputs, self.every = method, test, inputs, every
        self.device = torch.device(device)
        self.last_round = 0
        self.validation = validation if validation is not None and len(validation) else None
        self.layer_names = tuple(lod_layers(method.template))
        self._footprints: dict[tuple[Any, ...], Any] = {}

    def footprint(self, model: Any, ranks: Mapping[str, int] | None) -> Any:
        """The deployed footprint; it depends on the shapes and ranks only, so it is measured once per tier."""
        key = (tuple(sorted((ranks or {}).items())), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
        if key not in self._footprints:
            self._footprints[key] = footprint(model, self.inputs, ranks)
        return self._footprints[key]

    def on_run_start(self, first_round: int, last_round: int) -> None:
        self.last_round = last_round

    def after_round(self, result: RoundResult) -> bool:
        result.tiers = []
        if result.round % self.every and result.round != self.last_round:  # eval_every: not this round
            return False
        reference = self.method.family.reference
        global_model = self.method.family.global_model(result.arrays)
        scores: dict[tuple[Any, ...], tuple[float, float, float]] = {}
        for tier, cost in result.tier_costs.items():
            model, ranks = self.method.deploy(global_model, cost)
            fp = self.footprint(model, ranks)
            # tiers with one budget deploy one sub-model (tiers 3 and 4 at full rank): it is evaluated once
            key = (cost.fraction, tuple(sorted(cost.ranks.items())), cost.params, cost.macs)
            if key not in scores:
                model.to(self.device)  # the clients' device where they have one (a GPU), else the CPU
                loss, acc = evaluate(model, self.test, ranks, device=self.device)
                # the clients' held-out examples: what a tuning protocol scores, so it never sees the test set
                val_acc = (evaluate(model, self.validation, ranks, device=self.device)[1]
                           if self.validation is not None else float("nan"))
                scores[key] = (loss, acc, val_acc)
            loss, acc, val_acc = scores[key]
            result.tiers.append(
                {
                    "round": result.round,
                    "tier": tier,
                    "accuracy": acc,
                    "loss": loss,
                    "val_accuracy": val_acc,
                    "fraction": cost.fraction,
                    "width": self.method.family.served_by(cost)[1],
                    "ranks": [ranks[n] for n in self.layer_names] if ranks else [],
                    "params": fp.params,
                    "macs": fp.macs,
                    "bytes_fp32": fp.bytes("fp32"),
                    "params_ratio": fp.params / reference.dense_params,
                    "macs_ratio": fp.macs / reference.dense_macs,
                }
            )
        return False


#: the share of the rounds after which a run still at chance, or whose training loss has not fallen, is said
#: to be not learning: late enough that every task here is well above chance by then (digits and MNIST-1D
#: pass 60% within the first 10% of rounds at the defaults), early enough to stop and fix the lr
LEARNING_CHECK_SHARE = 0.25
#: "at chance": within this many points of the commonest class's share of the test set
CHANCE_MARGIN = 0.02


def chance_rate(test: Split) -> float:
    """The accuracy of always answering the test set's commonest class."""
    counts = np.bincount(test.y.numpy()) if len(test) else np.zeros(1)
    return float(counts.max() / max(1, counts.sum()))


class LearningCheck(RoundCallback):
    """Says, once, in one line, when a run is not learning, and records it in ``rounds.csv``.

    From the first evaluated round at or after :data:`LEARNING_CHECK_SHARE` of the rounds: the run is not
    learning when every tier's test accuracy is within :data:`CHANCE_MARGIN` of chance (the commonest
    class's share of the test set), or when the mean training loss is not below the first round's (or is
    not finite). A model that stays at chance is the usual sign of a step size that diverges or stalls.

    ``compare_loss=False`` (semi-asynchronous rounds) keeps the accuracy test only: which clients merge in a
    step depends on who finished first, so the fast devices of step 1 and the slow ones of a later step have
    losses that do not compare.
    """

    def __init__(self, run: RunDir, chance: float, rounds: int, lr: float, momentum: float,
                 compare_loss: bool = True) -> None:
        self.run, self.chance, self.lr, self.momentum = run, chance, lr, momentum
        self.compare_loss = compare_loss
        self.from_round = max(2, math.ceil(LEARNING_CHECK_SHARE * rounds))  # from round 2: a loss to compare
        self.first_loss = float("nan")
        self.done = False

    def on_run_start(self, first_round: int, last_round: int) -> None:
        if first_round > 1 and self.run.has(ROUNDS):  # resumed: the first round's loss, and whether it fired
            rounds = self.run.table(ROUNDS, required=["round", "train_loss"])
            self.first_loss = float(rounds["train_loss"].iloc[0]) if len(rounds) else float("nan")
            self.done = "learning_check" in rounds and bool(rounds["learning_check"].dropna().astype(str).ne("").any())

    def after_round(self, result: RoundResult) -> bool:
        ok = [c for c in result.clients if c.status == "ok"]
        loss = float(np.average([c.train_loss for c in ok], weights=[c.num_examples for c in ok])) if ok \
            else float("nan")
        if result.round == 1:
            self.first_loss = loss
        if self.done or result.round < self.from_round or not result.tiers:
            return False
        best = max(t["accuracy"] for t in result.tiers)
        reasons = []
        if best < self.chance + CHANCE_MARGIN:
            reasons.append(f"every tier's test accuracy is at chance ({100 * best:.1f}%, the commonest class is "
                           f"{100 * self.chance:.1f}%)")
        if self.compare_loss and (not math.isfinite(loss) or (math.isfinite(self.first_loss)
                                                              and loss >= self.first_loss)):
            reasons.append(f"the training loss has not fallen ({self.first_loss:.3g} in round 1, {loss:.3g} now)")
        if reasons:
            self.done = True
            result.learning = " and ".join(r.split(" (")[0] for r in reasons)
            LOG.warning("round %d: the run is not learning: %s. lr=%g with momentum %g may be too large for this "
                        "model (try lr=%.2g or %.2g) or too small (lr=%.2g)", result.round, "; ".join(reasons),
                        self.lr, self.momentum, self.lr / 10, self.lr / 100, self.lr * 10)
        return False


class RoundTables(RoundCallback):
    """Appends the round's rows to rounds.csv, tiers.csv and clients.csv (flushed as they are written)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.writers = {t.file: run.writer(t) for t in (ROUNDS, TIERS, CLIENTS)}

    def after_round(self, result: RoundResult) -> bool:
        clients = result.clients
        ok = [c for c in clients if c.status == "ok"]
        result.row = {
            "round": result.round,
            "sim_start_s": result.sim_start_s,
            "sim_seconds": result.sim_seconds,
            "sim_seconds_total": result.sim_start_s + result.sim_seconds,
            "wall_seconds": _now() - result.started,
            "train_wall_seconds": result.train_wall_seconds,
            "server_seconds": result.server_seconds,
            "bytes_down": sum(c.bytes_down for c in clients),
            "bytes_up": sum(c.bytes_up for c in clients),
            "selected": len(clients),
            **{s: sum(c.status == s for c in clients) for s in STATUSES},
            "train_loss": float(np.average([c.train_loss for c in ok], weights=[c.num_examples for c in ok]))
            if ok else float("nan"),
            "global_rank": int(sum(int(v.shape[0]) for k, v in result.arrays.items()
                                   if k.endswith("in_network.weight"))),
            "learning_check": result.learning,
        }
        self.writers[CLIENTS.file].extend(c.row() for c in clients)
        self.writers[TIERS.file].extend(result.tiers)
        self.writers[ROUNDS.file].append(result.row)
        return False


class Checkpointing(RoundCallback):
    """Writes the global model after every round (atomically), after the tables: they never run behind it."""

    def __init__(self, run: RunDir, fingerprint: dict[str, Any] | None = None) -> None:
        self.run = run
        self.fingerprint = dict(fingerprint or {})  # what resume checks (maestro_fl.federated.run_fingerprint)

    def after_round(self, result: RoundResult) -> bool:
        self.run.save_checkpoint(Checkpoint(result.round, result.arrays, self.fingerprint, result.server_state))
        return False


class Progress(RoundCallback):
    """A progress bar over rounds (per-tier accuracy, simulated time, ETA), or one line per round.

    The bar goes to standard error (tqdm), so the tables printed at the end
    stay clean on standard output; ``lines=True`` (``--verbose``) prints a
    line per round instead, which reads better in a log file.
    """

    def __init__(self, rounds: int, lines: bool = False) -> None:
        self.rounds, self.lines, self.bar = rounds, lines, None
        self.accuracies = "-"  # the last evaluated round's, shown until the next evaluation

    def on_run_start(self, first_round: int, last_round: int) -> None:
        if not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=last_round, initial=first_round - 1, desc="rounds", unit="round",
                            dynamic_ncols=True, file=sys.stderr)

    def after_round(self, result: RoundResult) -> bool:
        if result.tiers:
            self.accuracies = " ".join(f"t{t['tier']}={t['accuracy']:.3f}" for t in result.tiers)
        accs = self.accuracies
        row = result.row
        sim = f"sim {row.get('sim_seconds_total', 0.0) / 60:.1f} min"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{sim}  acc {accs}", refresh=False)
            self.bar.update(1)
        else:
            print(f"round {result.round:3d}/{self.rounds}  ok {row.get('ok', 0)}/{len(result.clients)}  {sim}  "
                  f"wall {row.get('wall_seconds', 0.0):5.2f}s  acc {accs}", flush=True)
        return False

    def on_run_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _now() -> float:
    import time

    return time.perf_counter()


