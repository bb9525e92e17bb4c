"""``SubModelStrategy``: any heterogeneous sub-model method on Flower's Message API.

The strategy only orchestrates; the method (:mod:`maestro_fl.methods`) decides.
Per round it

1. samples the online clients (seeded by round);
2. gives each the sub-model its device affords: the method's cost table and
   budget rule pick a :class:`~maestro_fl.budget.Cost`, the method's family
   cuts the arrays (:func:`~maestro_fl.submodels.take`), and the assignment
   travels in the message's ``config`` record, the device in its ``device`` record;
3. checks every reply against what it sent (:func:`maestro_fl.replies.check_reply`)
   and records each client's fate (a row of clients.csv);
4. merges the good replies with the method's server rule.

Budgets are computed once per distinct device and global model, the
tiers' budgets once per global model, and what a budget's clients are sent
(index, encoded arrays, config record) once per budget and round, so a round
costs O(K + N) for K sampled of N registered clients, with a small constant
per sampled client (``benchmarks/server_round.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import DEBUG, ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from maestro_fl import message_keys as P
from maestro_fl import wire
from maestro_fl.aggregation import part_key
from maestro_fl.budget import Cost, DeviceCapability
from maestro_fl.config import SimConfig, to_dict
from maestro_fl.convert import lod_layers
from maestro_fl.footprint import footprint
from maestro_fl.methods import Assignment, ClientTask, FederatedMethod, Update
from maestro_fl.population import PopulationError, check_device, load_population
from maestro_fl.replies import check_reply, finite_number, read_metrics, squared_norm
from maestro_fl.results import ClientRound
from maestro_fl.submodels import Index, index_shape, take


@dataclass(frozen=True)
class _BudgetParts:
    """What :meth:`SubModelStrategy.configure_train` makes once per distinct budget in a round."""

    assignment: Assignment
    index: Index
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    bytes_down: int
    arrays: ArrayRecord
    config: ConfigRecord


def named_part(name: str, index: tuple[object, ...]) -> tuple[str, tuple[object, ...]]:
    """A hashable name for the part ``index`` of array ``name``: equal parts, equal keys."""
    return name, part_key(index)  # type: ignore[arg-type]  # index: slices and index arrays


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a finite whole number (never raises: Inf, NaN, text and bools are ``None``)."""
    x = finite_number(value)
    return int(x) if x is not None and x == int(x) else None


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays (read-only views of its bytes; :mod:`maestro_fl.wire`)."""
    return {k: wire.decode(v.stype, v.data) for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = Array(*wire.encode(v))
    return record


class SubModelStrategy(Strategy):
    """Sampling, per-client sub-models, reply checks and accounting for any :class:`FederatedMethod`.

    Parameters
    ----------
    method : FederatedMethod
        The method: sub-model family, client trainer, server rule, cost model.
    cfg : SimConfig
        The run's settings; sent to the clients with every message.
    """

    def __init__(self, method: FederatedMethod, cfg: SimConfig, partition_sizes: Sequence[int] | None = None) -> None:
        self.method = method
        self.cfg = cfg
        #: each partition's training examples, as the server partitioned the data (a registration must agree)
        self.partition_sizes = None if partition_sizes is None else [int(n) for n in partition_sizes]
        self.excluded: list[tuple[int, str]] = []  # (node, why its registration was refused)
        self.layer_names = tuple(lod_layers(method.template))
        self.devices: dict[int, DeviceCapability] = {}
        self.partition_of: dict[int, int] = {}
        self.examples_of: dict[int, int] = {}
        self.nodes: list[int] = []  # registered nodes, by partition id
        self.nominal_samples = 1
        self.current: dict[str, np.ndarray] = {}
        self.tasks: dict[int, ClientTask] = {}
        self.client_rounds: list[ClientRound] = []
        self._config_json = json.dumps(to_dict(cfg))
        self._budgets: dict[tuple[int, DeviceCapability], Cost | None] = {}
        self._tiers: dict[int, dict[int, Cost]] = {}
        self._encoded: dict[tuple[str, tuple[object, ...]], Array] = {}  # this round's arrays, as sent
        self._sent: dict[int, tuple[dict[str, np.ndarray], float]] = {}  # a sub-model and ‖·‖²
        self.ignored: list[tuple[int, str]] = []  # replies of the last round that no client round owns

    # -- registration -------------------------------------------------------------------------
    def registration_messages(self, grid: Grid) -> list[Message]:
        """Ask every node which device it runs on (a ``query`` message)."""
        conf = ConfigRecord({P.RUN_CONFIG: self._config_json})
        return [
            Message(RecordDict({P.CONFIG: conf}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in grid.get_node_ids()
        ]

    def register(self, replies: Iterable[Message]) -> None:
        """Take every registration that passes the checks a devices file gets; exclude the others with a reason.

        Never raises on a reply: a bad one costs its client the run, not the federation.
        """
        claimed: dict[int, int] = {}  # partition -> node
        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            reason, partition, examples, device = self._check_registration(msg, claimed)
            if reason is not None:
                self.excluded.append((node, reason))
                log(WARNING, "node %s is excluded from the run: %s", node, reason)
                continue
            claimed[partition] = node
            self.partition_of[node], self.examples_of[node], self.devices[node] = partition, examples, device
        self.set_population()

    def _check_registration(self, msg: Message, claimed: Mapping[int, int]) -> tuple[str | None, int, int, Any]:
        """``(why not, partition, examples, device)`` of one registration reply; never raises."""
        if msg.has_error():
            return f"registration failed: {str(msg.error.reason)[:200]}", -1, 0, None
        try:
            m = dict(msg.content[P.METRICS])
            row = {"client_id": m[P.PARTITION_ID], "tier": m[P.DEVICE_TIER], "macs_per_s": m[P.DEVICE_MACS_PER_S],
                   "memory_bytes": m[P.DEVICE_MEMORY], "up_bps": m[P.DEVICE_UP_BPS], "down_bps": m[P.DEVICE_DOWN_BPS],
                   "availability": m[P.DEVICE_AVAILABILITY], "rank_fraction": m[P.DEVICE_RANK_FRACTION]}
            raw_examples = m[P.NUM_EXAMPLES]
        except Exception as err:  # noqa: BLE001 - any unreadable reply is a refused registration
            return f"registration unreadable ({type(err).__name__}: {str(err)[:100]})", -1, 0, None
        try:
            partition, device = check_device(row, "registration")
        except PopulationError as err:
            return str(err), -1, 0, None
        if partition >= self.cfg.num_clients:
            return f"registration: partition id {partition} is not in [0, {self.cfg.num_clients})", -1, 0, None
        if partition in claimed:
            return f"registration: partition {partition} is already registered by node {claimed[partition]}", -1, 0, None
        tiers = self.tiers_allowed()
        if tiers is not None and device.tier not in tiers:
            return f"registration: tier {device.tier} is not one of the population's tiers {sorted(tiers)}", -1, 0, None
        examples = _whole_number(raw_examples)
        known = self.partition_sizes[partition] if self.partition_sizes is not None else None
        if examples is None or examples <= 0:
            return f"registration: {P.NUM_EXAMPLES} must be an integer > 0, got {str(raw_examples)[:40]!r}", -1, 0, None
        if known is not None and examples != known:
            return (f"registration: {P.NUM_EXAMPLES} = {examples}, but partition {partition} holds {known} training "
                    "examples"), -1, 0, None
        return None, partition, examples, device

    def tiers_allowed(self) -> set[int] | None:
        """The tiers the run's population has (``None``: not known to the server)."""
        if self.cfg.devices:
            try:
                return {d.tier for d in load_population(self.cfg.devices, self.cfg.num_clients)}
            except Exception:  # noqa: BLE001 - checked before the run; a population only the clients can load
                return None
        return set(range(len(self.cfg.tier_shares)))

    def set_population(self) -> None:
        """Derive what every round needs from the registered devices (once, not per round)."""
        self.nodes = sorted(self.devices, key=lambda n: self.partition_of[n])
        # a tier's budget is set by its device for the federation's typical client
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
        """Per tier: its clients, the sub-model it deploys (its weakest member's budget), what binds it, and,
        for clients that afford nothing, what would change that. No round runs; ``maestro-fl plan``."""
        table = self.cost_table()
        full = self.method.family.reference
        initial = {k: v.detach().numpy() for k, v in self.method.template.state_dict().items()}
        global_model = self.method.family.global_model(initial)
        rows = []
        for tier in sorted({d.tier for d in self.devices.values()}):
            members = [n for n in self.nodes if self.devices[n].tier == tier]
            checks = {d: self.method.explain_budget(table, d, self.nominal_samples)
                      for d in {self.devices[n] for n in members}}
            unaffordable = [n for n in members if checks[self.devices[n]].chosen is None]
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
                sent = sum(v.nbytes for v in take(initial, self.method.index(cost, 1, initial)).values())
                model, ranks = self.method.deploy(global_model, cost)
                fp = footprint(model, self.method.inputs, ranks)
                served_by, width = self.method.family.served_by(cost)
                row.update(fraction=cost.fraction, params=fp.params, params_ratio=fp.params / full.params,
                           macs=fp.macs, bytes_per_round=2 * sent, served_by=served_by, width=width)
            if unaffordable:
                smallest = min(table, key=lambda c: c.fraction)
                advice = []
                if "memory" in weakest.binding:
                    advice.append(f"its smallest sub-model ({smallest.params:,} parameters) needs "
                                  f"{weakest.need_memory / 1e6:.2f} MB to train at batch_size={self.cfg.batch_size}, "
                                  f"the device has {weakest.have_memory / 1e6:.2f} MB: a smaller batch_size or model")
                if "compute" in weakest.binding:
                    advice.append(f"it needs {weakest.need_seconds:.1f} s of compute per round, the budget is "
                                  f"compute_budget_s={self.cfg.compute_budget_s:g}: compute_budget_s >= "
                                  f"{weakest.need_seconds:.1f}, or fewer local_epochs")
                row["advice"] = "; ".join(advice)
            rows.append(row)
        return rows

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, server_round: int) -> list[int]:
        """Online clients this round (by availability), then a uniform sample of them; seeded by round."""
        rng = np.random.default_rng([self.cfg.seed, server_round, 1])
        availability = np.fromiter((self.devices[n].availability for n in self.nodes), float, len(self.nodes))
        online = [n for n, up in zip(self.nodes, rng.random(len(self.nodes)) < availability) if up]
        k = min(self.cfg.clients_per_round, len(online))
        picked: list[int] = rng.choice(len(online), size=k, replace=False).tolist() if k else []
        return [online[i] for i in sorted(picked)]

    def device_this_round(self, node: int, server_round: int) -> DeviceCapability:
        """Fixed mode: the registered device. Dynamic mode: redrawn from the population (HeteroFL)."""
        if self.cfg.tier_mode == "fixed":
            return self.devices[node]
        rng = np.random.default_rng([self.cfg.seed, server_round, self.partition_of[node], 2])
        return self.devices[self.nodes[int(rng.integers(len(self.nodes)))]]

    # -- Strategy API -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client, carrying only its sub-model and its assignment.

        What depends only on the budget (the index, the encoded arrays, the
        assignment's ConfigRecord) is made once per distinct budget in a round
        and shared by its clients' messages; each message adds its device.
        """
        self.current = to_numpy(arrays)
        self.tasks, self.client_rounds, self._encoded, self._sent = {}, [], {}, {}
        tiers = list(self.tier_costs().values())
        parts: dict[tuple[Any, ...], _BudgetParts] = {}
        messages = []
        for node in self.sample(server_round):
            device = self.device_this_round(node, server_round)
            cost = self.budget(device)
            if cost is None:
                self.client_rounds.append(self._row(server_round, node, device, None, "unaffordable",
                                                    "no sub-model fits its memory and compute budget"))
                continue
            key = (cost.fraction, tuple(sorted(cost.ranks.items())))
            if key not in parts:
                parts[key] = self._budget_parts(cost, tiers, server_round)
            part = parts[key]
            self.tasks[node] = ClientTask(node=node, partition=self.partition_of[node], device=device, cost=cost,
                                          assignment=part.assignment, index=part.index, shapes=part.shapes,
                                          dtypes=part.dtypes, bytes_down=part.bytes_down)
            device_record = ConfigRecord({P.DEVICE_MACS_PER_S: device.macs_per_s, P.DEVICE_UP_BPS: device.up_bps,
                                          P.DEVICE_DOWN_BPS: device.down_bps})
            content = RecordDict({P.ARRAYS: part.arrays, P.CONFIG: part.config, P.DEVICE: device_record})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        log(DEBUG, "configure_train: round %s, %s clients", server_round, len(messages))
        return messages

    def _budget_parts(self, cost: Cost, tiers: list[Cost], server_round: int) -> _BudgetParts:
        """What every client at ``cost`` gets this round: one index, one encoded sub-model, one ConfigRecord."""
        assignment = self.method.assign(cost, tiers)
        index = self.method.index(cost, server_round, self.current)
        sub = take(self.current, index)
        entries: dict[str, Any] = {
            P.RUN_CONFIG: self._config_json,
            P.SERVER_ROUND: server_round,
            P.LOCAL_EPOCHS: self.cfg.local_epochs,
            P.LR: self.cfg.lr,
        }
        config = ConfigRecord(entries | assignment.to_config(self.layer_names))
        return _BudgetParts(
            assignment=assignment,
            index=index,
            shapes={k: index_shape(index[k], self.current[k].shape) for k in index},
            dtypes={k: v.dtype.name for k, v in sub.items()},
            bytes_down=sum(v.nbytes for v in sub.values()),
            arrays=self._record(sub, index),
            config=config,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply against what was sent, then merge the good ones by the method's rule."""
        updates: list[Update] = []
        answered: dict[int, ClientRound] = {}
        self.ignored = []
        for msg in replies:
            node = msg.metadata.src_node_id
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
            if msg.has_error():
                row.status, row.reason = "failed", str(msg.error.reason)[-300:]
                self.client_rounds.append(row)
                continue
            arrays, metrics, reason = self._decode(msg)
            facts = read_metrics(metrics)
            row.num_examples, row.train_loss, row.macs = facts.num_examples, facts.train_loss, facts.macs
            row.compute_s, row.download_s, row.upload_s, row.wall_s = (
                facts.compute_s, facts.download_s, facts.upload_s, facts.wall_s)
            row.bytes_up = int(sum(getattr(v, "nbytes", 0) for v in arrays.values()))
            if reason is None:
                sent, sent_norm = self.sent(task)
                reason = check_reply(arrays, facts, task, self.examples_of.get(node), sent, self.cfg.max_update_norm,
                                     sent_norm, num_classes=getattr(self.method.inputs, "num_classes", None))
            if reason is not None:
                row.status, row.reason = "malformed", reason
            elif self.cfg.round_deadline_s > 0 and row.round_seconds > self.cfg.round_deadline_s:
                row.status = "dropped"
                row.reason = f"{row.round_seconds:.1f}s > deadline {self.cfg.round_deadline_s:.1f}s"
            else:
                updates.append(Update(task, arrays, facts.num_examples, facts.labels))
            self.client_rounds.append(row)
        for node, task in self.tasks.items():
            if node not in answered:
                row = self._row(server_round, node, task.device, task.cost, "timeout",
                                "no reply within round_timeout_s")
                row.bytes_down = task.bytes_down
                self.client_rounds.append(row)
        self.client_rounds.sort(key=lambda r: r.partition_id)
        if not updates:
            return None, None
        try:
            merged = self.method.merge_updates(self.current, updates, server_round)
        except Exception as err:  # noqa: BLE001 - a server rule that fails costs this round, never the run
            reason = f"the server rule failed on this round's replies: {type(err).__name__}: {str(err)[:200]}"
            log(ERROR, "round %s: %s; the global model is unchanged", server_round, reason)
            for row in self.client_rounds:
                if row.status == "ok":
                    row.status, row.reason = "failed", reason
            return None, None
        ok = [r for r in self.client_rounds if r.status == "ok"]
        total = sum(r.num_examples for r in ok)
        round_metrics = MetricRecord(
            {"train-loss": sum(r.train_loss * r.num_examples for r in ok) / total, "clients-ok": len(ok)}
        )
        return to_record(merged), round_metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model at every tier's budget."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %s clients per round, tier mode %s", self.method.name, self.cfg.clients_per_round,
            self.cfg.tier_mode)
        log(INFO, "\t└──> LoD layers: %s", list(self.layer_names))

    # -- helpers ------------------------------------------------------------------------------
    def sent(self, task: ClientTask) -> tuple[dict[str, np.ndarray], float]:
        """What the client was sent and its squared norm (once per distinct sub-model in a round)."""
        key = id(task.index)  # the clients of one budget share one index object this round (configure_train)
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

    def _record(self, sub: Mapping[str, np.ndarray], index: Mapping[str, tuple[object, ...]]) -> ArrayRecord:
        """The sub-model as an ArrayRecord; a part many clients hold this round (the dense parameters,
        the factors of one tier) is encoded once and the same bytes are sent to each."""
        record = ArrayRecord()  # filled item by item: ArrayRecord(dict) would copy every Array
        for name, value in sub.items():
            key = named_part(name, index[name])
            if key not in self._encoded:
                self._encoded[key] = Array(*wire.encode(value))
            record[name] = self._encoded[key]
        return record

    @staticmethod
    def _decode(msg: Message) -> tuple[dict[str, Any], dict[str, Any], str | None]:
        """The reply's arrays and metrics as plain Python, or why they cannot be read (never raises)."""
        try:
            content = msg.content
            if P.ARRAYS not in content.array_records or P.METRICS not in content.metric_records:
                return {}, {}, f"reply lacks '{P.ARRAYS}' or '{P.METRICS}'"
            metrics = dict(content[P.METRICS])
        except Exception as err:  # noqa: BLE001 - any unreadable reply is a malformed reply
            return {}, {}, f"reply unreadable: {type(err).__name__}: {err}"[:300]
        try:
            arrays = to_numpy(content.array_records[P.ARRAYS])
        except Exception as err:  # noqa: BLE001
            return {}, metrics, f"arrays undecodable: {type(err).__name__}: {err}"[:300]
        return arrays, metrics, None
