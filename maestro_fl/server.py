"""The server's side of a federation, without Flower: population, budgets, sampling, reply checks, accounting.

As pfl-research's simulated backend keeps the algorithm apart from the transport,
:class:`FederationServer` holds everything the server decides and counts, on plain
Python and NumPy values; ``strategies.SubModelStrategy`` only turns its tasks into
Flower messages and the replies back into :class:`TrainReply` values. Per round:

1. :meth:`~FederationServer.sample` the online clients (seeded by round): by each device's
   probability of being online, or on the simulated clock when the run has an
   availability schedule (:mod:`maestro_fl.availability`);
2. :meth:`~FederationServer.configure`: give each the sub-model its device affords
   (the method's cost table and budget rule pick a :class:`~maestro_fl.budget.Cost`,
   the family cuts the arrays); what depends only on the budget is made once per
   budget and shared by its clients (:class:`BudgetPart`);
3. :meth:`~FederationServer.receive`: check every reply against what was sent
   (:func:`maestro_fl.replies.check_reply`), simulate its seconds
   (:func:`simulated_seconds`), record its fate (a row of clients.csv), and merge
   the good ones with the method's server rule; the round's simulated latency
   (:func:`round_latency`) moves the simulated clock (:attr:`FederationServer.clock_s`).

With ``round_mode='fedbuff'`` or ``'fedasync'`` a server step is not a round that
waits for its clients. ``clients_per_round`` clients are in flight at once; each
step sends the idle online ones the current model, holds every good update
(:class:`InFlight`) until its simulated finish, and merges the ``buffer_size``
earliest (FedBuff; one for FedAsync). A stale update merges through its own
index, rebased on the current model and discounted by its staleness
(:func:`rebased_update`, :func:`staleness_weight`); the updates in flight travel
with the checkpoint (:meth:`FederationServer.state`).

Simulated time is decided here alone, from the cost model, so the same seed
gives the same tables at any machine load: the real seconds a client took
(``wall_s``) are recorded and never decide who made a deadline, who was late,
or who went offline.

The device model lives in :mod:`maestro_fl.population`: the server budgets for a
client's device and simulates its seconds from the same profile, so no client
is told its device or runs a cost model. A budget is checked at the federation's
mean examples per client (:attr:`FederationServer.nominal_samples`), one budget
per device; the seconds a client is charged count its own examples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from . import message_keys as P
from .availability import OnlineSchedule, schedule_for
from .budget import BACKWARD_FACTOR, BudgetCheck, Cost, DeviceCapability, transfer_seconds
from .config import SimConfig
from .convert import lod_layers
from .footprint import footprint
from .methods import Assignment, ClientTask, FederatedMethod, Update
from .population import device_in_round, federation_devices
from .replies import ReplyFacts, check_reply, finite_number, read_metrics, squared_norm
from .results import ClientRound
from .submodels import Arrays, Index, index_shape, numpy_index, take
from .wire import message_bytes

LOG = logging.getLogger("maestro_fl")


@dataclass(frozen=True)
class Registration:
    """A node's answer to the registration query, as reported (checked by :meth:`FederationServer.register`)."""

    node: int
    partition: Any
    examples: Any
    error: str | None = None  # the query failed on the node


@dataclass(frozen=True)
class TrainReply:
    """One train reply as plain values: what the client sent, and how many bytes it was on the wire.

    ``problem``: why its content could not be read (then ``arrays`` may be empty).
    """

    node: int
    arrays: Mapping[str, Any]
    metrics: Mapping[str, Any]
    bytes_up: int = 0
    error: str | None = None  # the client failed (the message carries an error)
    problem: str | None = None


@dataclass(frozen=True)
class BudgetPart:
    """What every client at one budget gets in one round: one index, one sub-model, one assignment."""

    assignment: Assignment
    index: Index
    arrays: Mapping[str, np.ndarray]
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    bytes_down: int  # the sub-model's payload
    wire_bytes_down: int  # the same as a message carries it (.npy headers and names): what the download takes


@dataclass(frozen=True)
class SimulatedSeconds:
    """What a client's round cost on its device, by the cost model the server budgeted with."""

    macs: float
    compute_s: float
    download_s: float
    upload_s: float


def simulated_seconds(cost: Cost, device: DeviceCapability, sample_passes: int, wire_bytes_down: int,
                      wire_bytes_up: int) -> SimulatedSeconds:
    """``3 × forward MACs × (examples × passes)`` of what the client's loop ran, at the device's speed, and its
    transfers at the device's bandwidths (Maestro's and FjORD's simulated-time model)."""
    macs = BACKWARD_FACTOR * cost.macs * sample_passes
    return SimulatedSeconds(float(macs), macs / device.macs_per_s, transfer_seconds(wire_bytes_down, device.down_bps),
                            transfer_seconds(wire_bytes_up, device.up_bps))


def time_jitter(sigma: float, seed: int, server_round: int, partition: int) -> tuple[float, float]:
    """(compute, link) factors on a client's simulated seconds this round: lognormal with mean 1 and log-sd
    ``sigma``, seeded by (seed, round, partition) alone; (1, 1) when ``sigma`` is 0. A device's speed and link
    vary from round to round (other apps, heat, signal); the budget is still checked at the nominal cost."""
    if sigma <= 0:
        return 1.0, 1.0
    z = np.random.default_rng([seed, server_round, partition, 3]).standard_normal(2)
    compute, link = np.exp(sigma * z - sigma**2 / 2)
    return float(compute), float(link)


def over_selected(clients_per_round: int, over_selection: float) -> int:
    """How many clients a round selects: ``⌈(1 + o)·K⌉`` (Bonawitz et al., MLSys 2019), ``K`` when ``o = 0``."""
    return math.ceil(round((1.0 + over_selection) * clients_per_round, 9))  # 1.3 x 10 is 13.000000000000002


def round_latency(counted: Sequence[float], went_offline: Sequence[float], deadline: float,
                  closed_at_k: bool = False) -> float:
    """The round's simulated seconds: until its last counted reply, or its last client going offline.

    Parameters
    ----------
    counted : sequence of float
        The simulated seconds of the replies that count: ``ok``, and ``dropped`` (slower than the deadline).
    went_offline : sequence of float
        How far into the round each ``offline`` client went offline: the server waits for it until then.
    deadline : float
        ``round_deadline_s``: the round never lasts longer (0: no deadline).
    closed_at_k : bool
        Over-selection kept its ``K`` replies: the round closed at the ``K``-th, whatever went offline later.

    Clients ``late`` after the first ``K``, and faults (failed, malformed, timed out in real time), never hold the
    round up.
    """
    latency = max(counted if closed_at_k else [*counted, *went_offline], default=0.0)
    return min(latency, deadline) if deadline > 0 else latency


def first_to_finish(updates: Sequence[tuple[Update, float]], k: int) -> tuple[list[Update], list[Update]]:
    """(the first ``k`` updates to finish, the rest) by simulated seconds; ties go to the lower partition id.

    Over-selection's rule: the server closes the round when ``k`` updates have arrived, so which ones count is
    decided on the simulated clock alone, never by which real process answered first.
    """
    order = sorted(updates, key=lambda pair: (pair[1], pair[0].task.partition))
    return [u for u, _ in order[:k]], [u for u, _ in order[k:]]


#: server_state keys of the updates in flight (:meth:`FederationServer.state`); the rest is the server optimizer's
IN_FLIGHT = "in_flight/"


def staleness_weight(staleness: int, exponent: float) -> float:
    """``(1 + τ)^(-a)``: how much an update counts that was trained on the model of ``τ`` server steps ago
    (FedBuff, Nguyen et al., AISTATS 2022: ``a = 1/2``; FedAsync's polynomial staleness, Xie et al., 2019)."""
    return float((1.0 + max(staleness, 0)) ** -exponent)


def rebased_update(current: Mapping[str, np.ndarray], index: Index, delta: Mapping[str, np.ndarray],
                   weight: float) -> Arrays:
    """A stale client's update as a reply to the current model: ``current[index] + weight · (trained − sent)``.

    The client trained the sub-model ``index`` of an older global model; its change, not its arrays, is what it
    learned. Cut at the same index from the current model and moved by the discounted change, the update
    merges by the method's own rule (ordered factors, widths, rolling windows) like a fresh reply. Arrays keep
    the current model's dtypes.
    """
    out: Arrays = {}
    for name, idx in index.items():
        now = current[name][numpy_index(idx, current[name].shape)]
        out[name] = (now + weight * np.asarray(delta[name], dtype=np.float64)).astype(now.dtype)
    return out


def buffer_flush(in_flight: Sequence[InFlight], k: int) -> tuple[list[InFlight], list[InFlight]]:
    """(the ``k`` updates that finish first, those still in flight): FedBuff merges when ``k`` have arrived.

    Ordered by simulated finish, ties to the lower partition, so which updates merge is decided on the
    simulated clock alone.
    """
    order = sorted(in_flight, key=lambda j: (j.finish_s, j.task.partition))
    return order[:k], order[k:]


@dataclass(frozen=True)
class InFlight:
    """A good update the server holds until its simulated finish (``round_mode`` fedbuff or fedasync)."""

    task: ClientTask
    delta: Arrays  # trained − sent, on the task's index
    num_examples: int
    labels: tuple[int, ...]
    sent_round: int  # the server step whose model it trained
    finish_s: float  # simulated seconds since the run began when it finishes
    row: ClientRound  # its clients.csv row, written when it merges


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a finite whole number (never raises: Inf, NaN, text and bools are ``None``)."""
    x = finite_number(value)
    return int(x) if x is not None and x == int(x) else None


class FederationServer:
    """Population, budgets, sampling, reply checks and accounting of any :class:`FederatedMethod`.

    Parameters
    ----------
    method : FederatedMethod
        The method: sub-model family, client trainer, server rule, cost model.
    cfg : SimConfig
        The run's settings.
    partition_sizes : sequence of int, optional
        Each partition's training examples as the server partitioned the data; a registration must agree.
    population : sequence of DeviceCapability, optional
        Every client's device by partition id; default: the config's (:func:`~maestro_fl.population.federation_devices`).
    """

    def __init__(self, method: FederatedMethod, cfg: SimConfig, partition_sizes: Sequence[int] | None = None,
                 population: Sequence[DeviceCapability] | None = None) -> None:
        self.method = method
        self.cfg = cfg
        self.partition_sizes = None if partition_sizes is None else [int(n) for n in partition_sizes]
        self.population = tuple(population) if population is not None else federation_devices(
            cfg.devices, cfg.num_clients, tuple(cfg.tier_shares), tuple(cfg.tier_fractions), cfg.seed)
        self.layer_names = tuple(lod_layers(method.template))
        self.schedule: OnlineSchedule | None = None if not cfg.availability else schedule_for(
            cfg.availability, [d.tier for d in self.population], cfg.diurnal_day_s, tuple(cfg.diurnal_duty), cfg.seed)
        self.clock_s = 0.0  # simulated seconds since the run began: when the next round can start
        self.round_start_s = 0.0  # when this round started (later than clock_s when no client was online then)
        self.round_seconds = 0.0  # this round's simulated latency
        self.excluded: list[tuple[int, str]] = []  # (node, why its registration was refused)
        self.devices: dict[int, DeviceCapability] = {}  # registered node -> its device
        self.partition_of: dict[int, int] = {}
        self.examples_of: dict[int, int] = {}
        self.nodes: list[int] = []  # registered nodes, by partition id
        self.nominal_samples = 1
        self.current: dict[str, np.ndarray] = {}
        self.tasks: dict[int, ClientTask] = {}
        self.client_rounds: list[ClientRound] = []
        self.ignored: list[tuple[int, str]] = []  # replies of the last round that no client round owns
        self._budgets: dict[tuple[int, DeviceCapability], Cost | None] = {}
        self._tiers: dict[int, dict[int, Cost]] = {}
        self._wire_bytes: dict[int, int] = {}  # id(index) -> the download's bytes on the wire, this round
        self._sent: dict[int, tuple[dict[str, np.ndarray], float]] = {}  # a sub-model and ‖·‖²
        self.in_flight: list[InFlight] = []  # fedbuff, fedasync: good updates not merged yet
        self.asynchronous = cfg.round_mode != "sync"
        if self.asynchronous and not type(method).keeps_coordinates(cfg):
            from .config import ConfigError

            raise ConfigError(f"round_mode={cfg.round_mode!r} merges stale updates into the current model through "
                              f"their index; {method.name!r} with aggregation={cfg.aggregation!r} re-factors the "
                              "model every round, so an older model's factors do not line up: use round_mode='sync'")

    # -- registration -------------------------------------------------------------------------
    def register(self, registrations: Iterable[Registration]) -> None:
        """Take every registration that names a partition of the run once and its examples; exclude the others
        with a reason. Never raises on a registration: a bad one costs its client the run, not the federation."""
        claimed: dict[int, int] = {}  # partition -> node
        for reg in sorted(registrations, key=lambda r: r.node):
            reason, partition, examples = self._check_registration(reg, claimed)
            if reason is not None:
                self.excluded.append((reg.node, reason))
                LOG.warning("node %s is excluded from the run: %s", reg.node, reason)
                continue
            claimed[partition] = reg.node
            self.partition_of[reg.node], self.examples_of[reg.node] = partition, examples
            self.devices[reg.node] = self.population[partition]
        self.set_population()

    def _check_registration(self, reg: Registration, claimed: Mapping[int, int]) -> tuple[str | None, int, int]:
        if reg.error is not None:
            return f"registration failed: {reg.error[:200]}", -1, 0
        partition, examples = _whole_number(reg.partition), _whole_number(reg.examples)
        if partition is None or not 0 <= partition < len(self.population):
            return (f"registration: {P.PARTITION_ID} must be an integer in [0, {len(self.population)}), got "
                    f"{str(reg.partition)[:40]!r}"), -1, 0
        if partition in claimed:
            return f"registration: partition {partition} is already registered by node {claimed[partition]}", -1, 0
        known = self.partition_sizes[partition] if self.partition_sizes is not None else None
        if examples is None or examples <= 0:
            return f"registration: {P.NUM_EXAMPLES} must be an integer > 0, got {str(reg.examples)[:40]!r}", -1, 0
        if known is not None and examples != known:
            return (f"registration: {P.NUM_EXAMPLES} = {examples}, but partition {partition} holds {known} training "
                    "examples"), -1, 0
        return None, partition, examples

    def set_population(self) -> None:
        """Derive what every round needs from the registered clients (once, not per round)."""
        self.nodes = sorted(self.devices, key=lambda n: self.partition_of[n])
        # a tier's budget is set by its device for the federation's typical client (tests/test_server_core.py)
        self.nominal_samples = int(round(np.mean(list(self.examples_of.values())))) if self.examples_of else 1
        self._budgets.clear()
        self._tiers.clear()

    # -- budgets ------------------------------------------------------------------------------
    def cost_table(self) -> list[Cost]:
        """The method's costs of the sub-models of the current global model."""
        return self.method.cost_table(self.current or None)

    def budget(self, device: DeviceCapability) -> Cost | None:
        """The sub-model the device trains this round, or ``None`` (cached per global model and device)."""
        table = self.cost_table()
        key = (id(table), device)
        if key not in self._budgets:
            self._budgets[key] = self.method.budget(table, device, self.nominal_samples)
        return self._budgets[key]

    def tier_costs(self) -> dict[int, Cost]:
        """Per tier, the budget every member can afford (its weakest member's); cached per global model."""
        table = self.cost_table()
        if id(table) not in self._tiers:
            out: dict[int, Cost] = {}
            for device in set(self.devices.values()):
                cost = self.budget(device)
                if cost is not None and (device.tier not in out or cost.fraction < out[device.tier].fraction):
                    out[device.tier] = cost
            self._tiers[id(table)] = dict(sorted(out.items()))
        return self._tiers[id(table)]

    def plan(self) -> list[dict[str, Any]]:
        """Per tier, what :func:`tier_plan` says of the registered clients (``maestro-fl plan``; no round runs)."""
        return tier_plan(self.method, self.cfg, [self.devices[n] for n in self.nodes], self.nominal_samples)

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, server_round: int) -> list[int]:
        """Online clients this round, then a uniform sample of them (``clients_per_round``, over-selected by
        ``over_selection``); seeded by round. Online: by the schedule at :attr:`round_start_s` when the run has
        one, else each with its device's ``availability`` probability."""
        rng = np.random.default_rng([self.cfg.seed, server_round, 1])
        if self.schedule is not None:
            schedule, t = self.schedule, self.round_start_s
            online = [n for n in self.nodes if schedule.online(self.partition_of[n], t)]
        else:
            availability = np.fromiter((self.devices[n].availability for n in self.nodes), float, len(self.nodes))
            online = [n for n, up in zip(self.nodes, rng.random(len(self.nodes)) < availability) if up]
        if self.asynchronous:  # fill the clients in flight up to clients_per_round, from the idle ones
            busy = {j.task.node for j in self.in_flight}
            online = [n for n in online if n not in busy]
            wanted = self.cfg.clients_per_round - len(busy)
        else:
            wanted = over_selected(self.cfg.clients_per_round, self.cfg.over_selection)
        k = min(max(wanted, 0), len(online))
        picked: list[int] = rng.choice(len(online), size=k, replace=False).tolist() if k else []
        return [online[i] for i in sorted(picked)]

    def device_this_round(self, node: int, server_round: int) -> DeviceCapability:
        """Fixed mode: the client's own device. Dynamic mode: redrawn from the population (HeteroFL)."""
        if self.cfg.tier_mode == "fixed":
            return self.devices[node]
        return device_in_round(self.population, self.partition_of[node], server_round, True, self.cfg.seed)

    # -- a round ------------------------------------------------------------------------------
    def configure(self, server_round: int, current: Mapping[str, np.ndarray]) -> dict[int, BudgetPart]:
        """The round's tasks (:attr:`tasks`, by node) and, per sampled client, the part of its budget it is sent.

        Clients that afford nothing get a clients.csv row (``unaffordable``) and no part.
        The parts of one budget are one object: a transport encodes each once.
        """
        self.current = dict(current)
        self.tasks, self.client_rounds, self._sent, self._wire_bytes = {}, [], {}, {}
        # a round starts when the last one ended, or, on a schedule, when a client is next online
        self.round_start_s = self.clock_s if self.schedule is None or self.in_flight else \
            self.schedule.next_online(self.clock_s)
        tiers = list(self.tier_costs().values())
        parts: dict[tuple[Any, ...], BudgetPart] = {}
        out: dict[int, BudgetPart] = {}
        for node in self.sample(server_round):
            device = self.device_this_round(node, server_round)
            cost = self.budget(device)
            if cost is None:
                self.client_rounds.append(self._row(server_round, node, device, None, "unaffordable",
                                                    "no sub-model fits its memory and compute budget"))
                continue
            key = (cost.fraction, tuple(sorted(cost.ranks.items())))
            if key not in parts:
                parts[key] = self._budget_part(cost, tiers, server_round)
            part = out[node] = parts[key]
            self._wire_bytes[id(part.index)] = part.wire_bytes_down
            self.tasks[node] = ClientTask(node=node, partition=self.partition_of[node], device=device, cost=cost,
                                          assignment=part.assignment, index=part.index, shapes=part.shapes,
                                          dtypes=part.dtypes, bytes_down=part.bytes_down)
        return out

    def _budget_part(self, cost: Cost, tiers: list[Cost], server_round: int) -> BudgetPart:
        assignment = self.method.assign(cost, tiers)
        index = self.method.index(cost, server_round, self.current)
        sub = take(self.current, index)
        return BudgetPart(
            assignment=assignment,
            index=index,
            arrays=sub,
            shapes={k: index_shape(index[k], self.current[k].shape) for k in index},
            dtypes={k: v.dtype.name for k, v in sub.items()},
            bytes_down=sum(v.nbytes for v in sub.values()),
            wire_bytes_down=message_bytes(sub),
        )

    def receive(self, server_round: int, replies: Iterable[TrainReply]) -> dict[str, np.ndarray] | None:
        """Check every reply against what was sent, simulate its seconds, then merge the good ones by the
        method's rule. ``None``: no good reply, or the server rule failed (the round's rows say which)."""
        updates: list[Update] = []
        answered: dict[int, ClientRound] = {}
        went_offline: list[float] = []  # seconds into the round
        self.ignored = []
        for reply in replies:
            node = reply.node
            task = self.tasks.get(node)
            if task is None:  # a reply to nothing this round asked for: never counted
                self.ignored.append((node, "reply from a node that was not asked this round"))
                continue
            if node in answered:  # a duplicate or replay: only the first reply counts
                answered[node].reason = (answered[node].reason + "; " if answered[node].reason else "") + \
                    "a second reply was ignored"
                self.ignored.append((node, "duplicate reply"))
                continue
            row = self._row(server_round, node, task.device, task.cost, "ok")
            answered[node] = row
            row.bytes_down = task.bytes_down
            if reply.error is not None:
                row.status, row.reason = "failed", reply.error[-300:]
                self.client_rounds.append(row)
                continue
            facts = read_metrics(reply.metrics)
            self._account(row, task, facts, reply, server_round)
            reason = reply.problem
            if reason is None:
                sent, sent_norm = self.sent(task)
                reason = check_reply(reply.arrays, facts, task, self.examples_of.get(node), sent,
                                     self.cfg.max_update_norm, sent_norm,
                                     num_classes=getattr(self.method.inputs, "num_classes", None))
            until = self._online_until(task)
            if reason is not None:
                row.status, row.reason = "malformed", reason
            elif self.round_start_s + row.round_seconds > until:
                went_offline.append(until - self.round_start_s)
                row.status = "offline"
                row.reason = (f"went offline {until - self.round_start_s:.1f}s into a {row.round_seconds:.1f}s round; "
                              "its work is lost")
            elif self.cfg.round_deadline_s > 0 and row.round_seconds > self.cfg.round_deadline_s:
                row.status = "dropped"
                row.reason = f"{row.round_seconds:.1f}s > deadline {self.cfg.round_deadline_s:.1f}s"
            else:
                updates.append(Update(task, dict(reply.arrays), facts.num_examples, facts.labels))
            self.client_rounds.append(row)
        for node, task in self.tasks.items():
            if node not in answered:
                row = self._row(server_round, node, task.device, task.cost, "timeout", "no reply within round_timeout_s")
                row.bytes_down = task.bytes_down
                self.client_rounds.append(row)
        if self.asynchronous:
            return self._merge_in_flight(server_round, updates, answered, went_offline)
        closed_at_k = False
        if self.cfg.over_selection > 0:
            kept, late = first_to_finish([(u, answered[u.task.node].round_seconds) for u in updates],
                                         self.cfg.clients_per_round)
            for update in late:
                row = answered[update.task.node]
                row.status = "late"
                row.reason = f"finished at {row.round_seconds:.1f}s, after the first {self.cfg.clients_per_round}"
            updates, closed_at_k = kept, len(kept) == self.cfg.clients_per_round
        self.client_rounds.sort(key=lambda r: r.partition_id)
        counted = [r.round_seconds for r in self.client_rounds if r.status in ("ok", "dropped")]
        self.round_seconds = round_latency(counted, went_offline, self.cfg.round_deadline_s, closed_at_k)
        self.clock_s = self.round_start_s + self.round_seconds
        if not updates:
            return None
        return self._merge(updates, server_round)

    def _merge(self, updates: Sequence[Update], server_round: int) -> dict[str, np.ndarray] | None:
        """The method's server rule on the updates; ``None`` (their rows ``failed``) when the rule raises."""
        try:
            return self.method.merge_updates(self.current, updates, server_round)
        except Exception as err:  # noqa: BLE001 - a server rule that fails costs this round, never the run
            reason = f"the server rule failed on this round's replies: {type(err).__name__}: {str(err)[:200]}"
            LOG.error("round %s: %s; the global model is unchanged", server_round, reason)
            for row in self.client_rounds:
                if row.status == "ok":
                    row.status, row.reason = "failed", reason
            return None

    # -- semi-asynchronous rounds -------------------------------------------------------------
    def _merge_in_flight(self, server_round: int, fresh: Sequence[Update], answered: Mapping[int, ClientRound],
                         went_offline: Sequence[float]) -> dict[str, np.ndarray] | None:
        """FedBuff's (or FedAsync's) server step: hold this step's good updates, merge the ``buffer_size`` (one)
        that finish first on the simulated clock, each rebased on the current model and discounted by staleness.

        Their rows are written now, in this step; the others stay in flight. At the run's last step, those still
        in flight are recorded ``late``.
        """
        held = {id(answered[u.task.node]) for u in fresh}
        self.client_rounds = [r for r in self.client_rounds if id(r) not in held]  # written when they merge
        for update in fresh:
            sent, _ = self.sent(update.task)
            row = answered[update.task.node]
            self.in_flight.append(InFlight(
                update.task, {k: np.asarray(update.arrays[k], np.float64) - sent[k] for k in update.task.index},
                update.num_examples, tuple(update.labels), server_round, self.round_start_s + row.round_seconds, row))
        k = 1 if self.cfg.round_mode == "fedasync" else (self.cfg.buffer_size or -(-self.cfg.clients_per_round // 2))
        merging, self.in_flight = buffer_flush(self.in_flight, k)
        mixing = self.cfg.async_mixing if self.cfg.round_mode == "fedasync" else 1.0
        updates = []
        for job in merging:
            row = job.row
            row.round, row.staleness = server_round, server_round - job.sent_round
            self.client_rounds.append(row)
            weight = mixing * staleness_weight(row.staleness, self.cfg.staleness_exponent)
            try:
                arrays = rebased_update(self.current, job.task.index, job.delta, weight)
            except (KeyError, ValueError, IndexError) as err:  # the global model no longer holds its index
                row.status, row.reason = "failed", f"its update no longer fits the global model: {err}"[:300]
                continue
            updates.append(Update(job.task, arrays, job.num_examples, job.labels))
        if server_round >= self.cfg.rounds:  # the run ends: what is still training never merges
            for job in self.in_flight:
                job.row.round, job.row.status = server_round, "late"
                job.row.reason = f"still training when the run ended (sent in round {job.sent_round})"
                self.client_rounds.append(job.row)
            self.in_flight = []
        self.client_rounds.sort(key=lambda r: r.partition_id)
        finished = [j.finish_s - self.round_start_s for j in merging]
        self.round_seconds = max(finished) if finished else max(went_offline, default=0.0)
        self.clock_s = self.round_start_s + self.round_seconds
        if not updates:
            return None
        return self._merge(updates, server_round)

    def state(self) -> dict[str, np.ndarray]:
        """The updates in flight as checkpoint arrays (keys under :data:`IN_FLIGHT`), so that a resumed run
        merges them as an uninterrupted one would. Empty in sync rounds."""
        out: dict[str, np.ndarray] = {}
        for i, job in enumerate(self.in_flight):
            key, task = f"{IN_FLIGHT}{i}/", job.task
            meta = {"partition": task.partition, "device": asdict(task.device), "cost": asdict(task.cost),
                    "assignment": asdict(task.assignment), "shapes": task.shapes, "dtypes": task.dtypes,
                    "bytes_down": task.bytes_down, "num_examples": job.num_examples, "labels": job.labels,
                    "sent_round": job.sent_round, "finish_s": job.finish_s, "row": asdict(job.row)}
            out[key + "meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
            for name, idx in task.index.items():
                for d, i_d in enumerate(idx):
                    if isinstance(i_d, slice):
                        size = self.current[name].shape[d]  # the global dimension the slice cuts
                        out[f"{key}slice/{d}/{name}"] = np.array(i_d.indices(size), dtype=np.int64)
                    else:
                        out[f"{key}positions/{d}/{name}"] = np.asarray(i_d, dtype=np.int64)
                out[f"{key}delta/{name}"] = job.delta[name]
        return out

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back the updates in flight of :meth:`state`, after registration (a resumed run's nodes may have
        new ids: an update follows its partition). An update whose partition did not register is dropped."""
        node_of = {p: n for n, p in self.partition_of.items()}
        jobs = sorted({k[len(IN_FLIGHT):].split("/", 1)[0] for k in state if k.startswith(IN_FLIGHT)}, key=int)
        self.in_flight = []
        for i in jobs:
            key = f"{IN_FLIGHT}{i}/"
            meta = json.loads(bytes(np.asarray(state[key + "meta"], dtype=np.uint8)).decode())
            partition = int(meta["partition"])
            if partition not in node_of:
                LOG.warning("an update in flight from partition %s is dropped: the partition did not register",
                            partition)
                continue
            shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
            index: Index = {}
            for name, shape in shapes.items():
                dims: list[Any] = []
                for d in range(len(shape)):
                    if f"{key}slice/{d}/{name}" in state:
                        start, stop, step = (int(x) for x in state[f"{key}slice/{d}/{name}"])
                        dims.append(slice(start, stop, step))
                    else:
                        dims.append(np.asarray(state[f"{key}positions/{d}/{name}"], dtype=np.int64))
                index[name] = tuple(dims)
            a = meta["assignment"]
            assignment = Assignment(a["fraction"], dict(a["ranks"]), tuple(a["levels"]),
                                    tuple(dict(r) for r in a["level_ranks"]), bool(a["label_mask"]))
            task = ClientTask(node=node_of[partition], partition=partition, device=DeviceCapability(**meta["device"]),
                              cost=Cost(**meta["cost"]), assignment=assignment, index=index, shapes=shapes,
                              dtypes=dict(meta["dtypes"]), bytes_down=int(meta["bytes_down"]))
            row = ClientRound(**meta["row"])
            row = replace(row, node_id=task.node)
            self.in_flight.append(InFlight(task, {n: np.asarray(state[f"{key}delta/{n}"]) for n in shapes},
                                           int(meta["num_examples"]), tuple(meta["labels"]), int(meta["sent_round"]),
                                           float(meta["finish_s"]), row))

    def _online_until(self, task: ClientTask) -> float:
        """When the client's online interval at the round's start ends (``inf`` without a schedule)."""
        if self.schedule is None:
            return math.inf
        until = self.schedule.online_until(task.partition, self.round_start_s)
        return math.inf if until is None else until  # selected, so online at the start

    def _account(self, row: ClientRound, task: ClientTask, facts: ReplyFacts, reply: TrainReply,
                 server_round: int) -> None:
        """What the reply says it did, and what that cost on the client's device by the server's cost model
        (varied by ``time_jitter`` when set)."""
        row.num_examples, row.train_loss, row.wall_s = facts.num_examples, facts.train_loss, facts.wall_s
        row.bytes_up = int(sum(getattr(v, "nbytes", 0) for v in reply.arrays.values()))
        seconds = simulated_seconds(task.cost, task.device, facts.sample_passes, self._wire_bytes[id(task.index)],
                                    reply.bytes_up)
        compute, link = time_jitter(self.cfg.time_jitter, self.cfg.seed, server_round, task.partition)
        row.macs, row.compute_s, row.download_s, row.upload_s = (
            seconds.macs, seconds.compute_s * compute, seconds.download_s * link, seconds.upload_s * link)

    def sent(self, task: ClientTask) -> tuple[dict[str, np.ndarray], float]:
        """What the client was sent and its squared norm (once per distinct sub-model in a round)."""
        key = id(task.index)  # the clients of one budget share one index object this round (configure)
        if key not in self._sent:
            sub = take(self.current, task.index)
            self._sent[key] = sub, sum(squared_norm(v) for v in sub.values())
        return self._sent[key]

    def _row(self, server_round: int, node: int, device: DeviceCapability, cost: Cost | None, status: str,
             reason: str = "") -> ClientRound:
        return ClientRound(
            server_round,
            node,
            self.partition_of.get(node, -1),
            device.tier,
            [int(cost.ranks[n]) for n in self.layer_names] if cost is not None and cost.ranks else [],
            status,
            cost.fraction if cost is not None else float("nan"),
            reason,
            width=self.method.family.served_by(cost)[1] if cost is not None else float("nan"),
        )


def tier_plan(method: FederatedMethod, cfg: SimConfig, devices: Sequence[DeviceCapability],
              samples: int) -> list[dict[str, Any]]:
    """Per tier: its clients, the sub-model it deploys (its weakest member's budget), what binds it, and, for
    clients that afford nothing, what would change that. A pure function of the method, the config, the
    clients' devices and the examples a budget is checked at; ``maestro-fl plan`` prints it."""
    table = method.cost_table(None)
    full = method.family.reference
    initial = {k: v.detach().numpy() for k, v in method.template.state_dict().items()}
    global_model = method.family.global_model(initial)
    rows = []
    for tier in sorted({d.tier for d in devices}):
        members = [d for d in devices if d.tier == tier]
        checks = {d: method.explain_budget(table, d, samples) for d in set(members)}
        unaffordable = [d for d in members if checks[d].chosen is None]
        affording = [c for c in checks.values() if c.chosen is not None]
        weakest = min(affording, key=lambda c: c.chosen.fraction if c.chosen else 0.0) if affording else \
            min(checks.values(), key=lambda c: c.need_seconds)  # the nearest to affording something
        row: dict[str, Any] = {
            "tier": tier, "clients": len(members), "unaffordable": len(unaffordable),
            "binding": weakest.binding, "need_memory": weakest.need_memory, "have_memory": weakest.have_memory,
            "need_seconds": weakest.need_seconds, "have_seconds": weakest.have_seconds,
            "own_memory": weakest.own_memory, "own_seconds": weakest.own_seconds,
            "served_by": "nothing", "width": float("nan"),
            "fraction": float("nan"), "params": 0, "params_ratio": 0.0, "macs": 0, "bytes_per_round": 0,
            "advice": "",
        }
        if weakest.chosen is not None:  # the footprint of what the tier deploys, as tiers.csv gives it
            cost = weakest.chosen
            sent = sum(v.nbytes for v in take(initial, method.index(cost, 1, initial)).values())
            model, ranks = method.deploy(global_model, cost)
            fp = footprint(model, method.inputs, ranks)
            served_by, width = method.family.served_by(cost)
            row.update(fraction=cost.fraction, params=fp.params, params_ratio=fp.params / full.params,
                       macs=fp.macs, bytes_per_round=2 * sent, served_by=served_by, width=width)
        if unaffordable:
            row["advice"] = _advice(cfg, weakest, min(table, key=lambda c: c.fraction))
        rows.append(row)
    return rows


def _advice(cfg: SimConfig, check: BudgetCheck, smallest: Cost) -> str:
    """What would let a tier's clients afford their smallest sub-model."""
    advice = []
    if "memory" in check.binding:
        advice.append(f"its smallest sub-model ({smallest.params:,} parameters) needs "
                      f"{check.need_memory / 1e6:.2f} MB to train at batch_size={cfg.batch_size}, "
                      f"the device has {check.have_memory / 1e6:.2f} MB: a smaller batch_size or model")
    if "compute" in check.binding:
        advice.append(f"it needs {check.need_seconds:.1f} s of compute per round, the budget is "
                      f"compute_budget_s={cfg.compute_budget_s:g}: compute_budget_s >= "
                      f"{check.need_seconds:.1f}, or fewer local_epochs")
    return "; ".join(advice)
