"""FedLoD: federated training of a low-rank ordered decomposition on heterogeneous devices.

Every client trains the LoD model (Maestro, arXiv 2308.14929) at the rank
budget its device affords and receives only that prefix of the ordered
factors; the server averages each rank component over the clients that
trained it (:func:`maestro_fl.aggregation.aggregate_ordered_factors`,
FjORD's nested rule on the rank dimension).

The class only orchestrates: sampling, per-client sub-models, reply checks.
The maths live in :mod:`maestro_fl.aggregation` and :mod:`maestro_fl.budget`.
Other sub-model families (width slices, a dense server model) subclass it and
override the hooks :meth:`FedLoD.sub_model`, :meth:`FedLoD.train_settings`,
:meth:`FedLoD.merge` and :meth:`FedLoD.deployed` (see ``strategies/baselines.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from logging import DEBUG, INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
import torch
from torch import nn

from maestro_fl import protocol as P
from maestro_fl.aggregation import (
    Arrays,
    aggregate_ordered_factors,
    aggregate_svd,
    aggregate_zero_padded,
    shrink_factors,
    slice_prefix,
    validate_update,
)
from maestro_fl.budget import Cost, DeviceCapability, affordable, cost_table
from maestro_fl.config import SimConfig, to_dict
from maestro_fl.convert import Ranks, lod_layers, model_ranks, truncate
from maestro_fl.footprint import Footprint, footprint

Updates = list[tuple[dict[str, np.ndarray], float]]


@dataclass
class ClientRound:
    """One client in one round: what it was given and what became of it (a row of clients.csv)."""

    round: int
    node_id: int
    partition_id: int
    tier: int
    ranks: list[int]
    status: str  # ok | failed | timeout | malformed | dropped | unaffordable
    fraction: float = float("nan")  # the budget's rank (or width) fraction; NaN when unaffordable
    reason: str = ""
    num_examples: int = 0
    train_loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    macs: float = 0.0
    compute_s: float = 0.0
    download_s: float = 0.0
    upload_s: float = 0.0
    wall_s: float = 0.0  # real seconds the client spent (not simulated)

    @property
    def round_seconds(self) -> float:
        return self.compute_s + self.download_s + self.upload_s


@dataclass
class _Assignment:
    device: DeviceCapability
    cost: Cost
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bytes_down: int = 0


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class FedLoD(FedAvg):
    """FedAvg over ordered-factor prefixes, one sub-model per client.

    Parameters
    ----------
    template : nn.Module
        The LoD model at full rank; fixes layer order and shapes.
    input_shape : tuple
        One input sample's shape, for the budget's memory and MAC model.
    cfg : SimConfig
        The run's settings (sampling, local training, budgets); sent to the
        clients with every message.
    """

    def __init__(self, template: nn.Module, input_shape: tuple[int, ...], cfg: SimConfig) -> None:
        super().__init__(min_train_nodes=1, min_available_nodes=1)
        self.template = template
        self.input_shape = input_shape
        self.cfg = cfg
        self.layer_names = tuple(lod_layers(template))
        self.global_ranks: Ranks = model_ranks(template)
        self.devices: dict[int, DeviceCapability] = {}
        self.partition_of: dict[int, int] = {}
        self.examples_of: dict[int, int] = {}
        self.current: dict[str, np.ndarray] = {}
        self.assignments: dict[int, _Assignment] = {}
        self.client_rounds: list[ClientRound] = []
        self.update_labels: list[list[int]] = []  # per accepted update, the classes it reported (if asked)
        self._costs: tuple[tuple[int, ...], list[Cost]] | None = None
        self._config_json = json.dumps(to_dict(cfg))

    # -- registration -----------------------------------------------------------
    def registration_messages(self, grid: Grid) -> list[Message]:
        """Ask every node which device it runs on (a ``query`` message)."""
        conf = ConfigRecord({P.RUN_CONFIG: self._config_json})
        return [
            Message(RecordDict({P.CONFIG: conf}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in grid.get_node_ids()
        ]

    def register(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            if msg.has_error():
                log(INFO, "registration failed on node %s: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            m = msg.content[P.METRICS]
            node = msg.metadata.src_node_id
            self.partition_of[node] = int(m[P.PARTITION_ID])
            self.examples_of[node] = int(m[P.NUM_EXAMPLES])
            self.devices[node] = DeviceCapability(
                tier=int(m[P.DEVICE_TIER]),
                macs_per_s=float(m[P.DEVICE_MACS_PER_S]),
                memory_bytes=float(m[P.DEVICE_MEMORY]),
                up_bps=float(m[P.DEVICE_UP_BPS]),
                down_bps=float(m[P.DEVICE_DOWN_BPS]),
                availability=float(m[P.DEVICE_AVAILABILITY]),
                rank_fraction=float(m[P.DEVICE_RANK_FRACTION]),
            )

    # -- budgets -------------------------------------------------------------------
    def cost_table(self) -> list[Cost]:
        """Training cost per rank fraction of the current global model (cached per global ranks)."""
        key = tuple(self.global_ranks[n] for n in self.layer_names)
        if self._costs is None or self._costs[0] != key:
            model = truncate(self.template, self.global_ranks)
            self._costs = (key, cost_table(model, self.input_shape))
        return self._costs[1]

    def budget(self, device: DeviceCapability) -> Cost | None:
        """The largest ranks the device can train this round, or ``None``."""
        nominal = int(round(np.mean(list(self.examples_of.values())))) if self.examples_of else 1
        return affordable(
            self.cost_table(),
            device,
            batch_size=self.cfg.batch_size,
            samples=nominal,  # a tier's budget is set by its device, for the federation's typical client
            epochs=self.cfg.local_epochs,
            deadline_s=self.cfg.compute_budget_s,
        )

    def tier_costs(self) -> dict[int, Cost]:
        """Per tier, the budget every member can afford (the tier's weakest member's)."""
        out: dict[int, Cost] = {}
        for device in self.devices.values():
            cost = self.budget(device)
            if cost is not None and (device.tier not in out or cost.fraction < out[device.tier].fraction):
                out[device.tier] = cost
        return dict(sorted(out.items()))

    # -- the sub-model family (override these to train other sub-models) --------
    def sub_model(self, cost: Cost) -> dict[str, np.ndarray]:
        """The arrays a client at ``cost`` receives: its factor prefixes and every dense parameter."""
        return slice_prefix(self.current, cost.ranks)

    def train_settings(self, cost: Cost) -> dict[str, Any]:
        """The config entries that tell a client at ``cost`` which sub-model it holds and how to train it."""
        settings: dict[str, Any] = {
            P.RANKS: [int(cost.ranks[n]) for n in self.layer_names],
            P.SAMPLER: self.cfg.sampler,
        }
        if self.cfg.sampler == "tiers":  # the tiers' ranks up to this client's own, flattened level by level
            levels = {c.fraction: c.ranks for c in self.tier_costs().values() if c.fraction <= cost.fraction}
            levels[cost.fraction] = cost.ranks
            settings[P.RANK_LEVELS] = [int(levels[f][n]) for f in sorted(levels) for n in self.layer_names]
        return settings

    def merge(self, updates: Updates) -> Arrays:
        """The new global arrays from the good replies (``cfg.aggregation``'s rule)."""
        rules = {"ordered": aggregate_ordered_factors, "svd": aggregate_svd, "zero_pad": aggregate_zero_padded}
        return rules[self.cfg.aggregation](self.current, updates)

    def global_model(self, arrays: dict[str, np.ndarray]) -> nn.Module:
        """The global model holding ``arrays`` (built once per evaluation, shared by every tier)."""
        model = truncate(self.template, self.global_ranks)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return model

    def deployed(self, model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        """What a tier at ``cost`` runs of the global ``model``, and the ranks to run it at."""
        return model, cost.ranks

    @cached_property
    def reference(self) -> Footprint:
        """The full dense model's footprint: the denominator of every method's ratios."""
        return footprint(self.template, self.input_shape)

    # -- sampling ----------------------------------------------------------------
    def nodes_by_partition(self) -> list[int]:
        return sorted(self.devices, key=lambda n: self.partition_of[n])

    def sample(self, server_round: int) -> list[int]:
        """Online clients this round (by availability), then a uniform sample of them; seeded by round."""
        rng = np.random.default_rng([self.cfg.seed, server_round, 1])
        nodes = self.nodes_by_partition()
        online = [n for n, u in zip(nodes, rng.random(len(nodes))) if u < self.devices[n].availability]
        k = min(self.cfg.clients_per_round, len(online))
        picked = rng.choice(len(online), size=k, replace=False) if k else []
        return [online[i] for i in sorted(picked)]

    def device_this_round(self, node: int, server_round: int) -> DeviceCapability:
        """Fixed mode: the registered device. Dynamic mode: redrawn from the population (HeteroFL)."""
        if self.cfg.tier_mode == "fixed":
            return self.devices[node]
        rng = np.random.default_rng([self.cfg.seed, server_round, self.partition_of[node], 2])
        population = self.nodes_by_partition()
        return self.devices[population[int(rng.integers(len(population)))]]

    # -- Strategy API ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client, carrying only its factor prefix."""
        self.current = to_numpy(arrays)
        self.assignments, self.client_rounds = {}, []
        messages = []
        for node in self.sample(server_round):
            device = self.device_this_round(node, server_round)
            cost = self.budget(device)
            if cost is None:
                self.client_rounds.append(self._row(server_round, node, device, None, "unaffordable"))
                continue
            sub = self.sub_model(cost)
            assignment = _Assignment(
                device, cost, {k: v.shape for k, v in sub.items()}, sum(v.nbytes for v in sub.values())
            )
            self.assignments[node] = assignment
            conf = ConfigRecord(
                {
                    P.RUN_CONFIG: self._config_json,
                    P.SERVER_ROUND: server_round,
                    P.LOCAL_EPOCHS: self.cfg.local_epochs,
                    P.LR: self.cfg.dlrt_lr if self.cfg.trainer == "dlrt" else self.cfg.lr,
                    P.BATCH_SIZE: self.cfg.batch_size,
                    P.LAMBDA_GL: self.cfg.lambda_gl,
                    P.FULL_PASS: self.cfg.full_pass,
                    P.DEVICE_MACS_PER_S: device.macs_per_s,
                    P.DEVICE_UP_BPS: device.up_bps,
                    P.DEVICE_DOWN_BPS: device.down_bps,
                }
                | self.train_settings(cost)
            )
            content = RecordDict({P.ARRAYS: to_record(sub), P.CONFIG: conf})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        log(DEBUG, "configure_train: round %s, %s clients", server_round, len(messages))
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model at every tier's ranks."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, then merge the good ones (:meth:`merge`)."""
        updates: Updates = []
        self.update_labels = []
        answered = set()
        for msg in sorted(replies, key=lambda m: self.partition_of.get(m.metadata.src_node_id, -1)):
            node = msg.metadata.src_node_id
            answered.add(node)
            assignment = self.assignments.get(node)
            if assignment is None:
                continue  # a reply to nothing this round asked for
            row = self._row(server_round, node, assignment.device, assignment.cost, "ok")
            row.bytes_down = assignment.bytes_down
            if msg.has_error():
                row.status, row.reason = "failed", msg.error.reason[-300:]
            else:
                arrays, reason = self._read_reply(msg, assignment, row)
                if reason is not None:
                    row.status, row.reason = "malformed", reason
                elif self.cfg.round_deadline_s > 0 and row.round_seconds > self.cfg.round_deadline_s:
                    row.status = "dropped"
                    row.reason = f"{row.round_seconds:.1f}s > deadline {self.cfg.round_deadline_s:.1f}s"
                else:
                    updates.append((arrays, float(row.num_examples)))
                    labels = msg.content[P.METRICS].get(P.LABELS, [])
                    self.update_labels.append([int(c) for c in labels])
            self.client_rounds.append(row)
        for node, assignment in self.assignments.items():
            if node not in answered:
                row = self._row(server_round, node, assignment.device, assignment.cost, "timeout")
                row.bytes_down, row.reason = assignment.bytes_down, "no reply within round_timeout_s"
                self.client_rounds.append(row)
        if not updates:
            return None, None
        merged = self.merge(updates)
        if self.cfg.server_shrink_eps > 0:
            merged, self.global_ranks = shrink_factors(merged, self.cfg.server_shrink_eps)
        ok = [r for r in self.client_rounds if r.status == "ok"]
        total = sum(r.num_examples for r in ok)
        metrics = MetricRecord(
            {"train-loss": sum(r.train_loss * r.num_examples for r in ok) / total, "clients-ok": len(ok)}
        )
        return to_record(merged), metrics

    # -- helpers -----------------------------------------------------------------
    def _row(
        self, server_round: int, node: int, device: DeviceCapability, cost: Cost | None, status: str
    ) -> ClientRound:
        return ClientRound(
            server_round,
            node,
            self.partition_of.get(node, -1),
            device.tier,
            [int(cost.ranks[n]) for n in self.layer_names] if cost is not None and cost.ranks else [],
            status,
            cost.fraction if cost is not None else float("nan"),
        )

    def _read_reply(
        self, msg: Message, assignment: _Assignment, row: ClientRound
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """Fill ``row`` from a reply's metrics; return its arrays and why they are unusable, if they are."""
        content = msg.content
        if P.ARRAYS not in content.array_records or P.METRICS not in content.metric_records:
            return {}, f"reply lacks '{P.ARRAYS}' or '{P.METRICS}'"
        m = content[P.METRICS]
        try:
            row.num_examples = int(m[P.NUM_EXAMPLES])
            row.train_loss = float(m[P.TRAIN_LOSS])
            row.macs = float(m[P.MACS])
            row.compute_s = float(m[P.COMPUTE_SECONDS])
            row.download_s = float(m[P.DOWNLOAD_SECONDS])
            row.upload_s = float(m[P.UPLOAD_SECONDS])
            row.wall_s = float(m.get(P.WALL_SECONDS, 0.0))
        except (KeyError, TypeError, ValueError) as err:
            return {}, f"metrics incomplete: {err}"
        if row.num_examples <= 0:
            return {}, f"{P.NUM_EXAMPLES} must be > 0, got {row.num_examples}"
        try:
            arrays = to_numpy(content[P.ARRAYS])
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a malformed reply
            return {}, f"arrays undecodable: {err}"
        row.bytes_up = sum(v.nbytes for v in arrays.values())
        return arrays, validate_update(arrays, assignment.shapes)

    def summary(self) -> None:
        log(INFO, "\t├──> FedLoD: %s clients per round, tier mode %s", self.cfg.clients_per_round, self.cfg.tier_mode)
        log(INFO, "\t└──> LoD layers: %s", dict(self.global_ranks))


def client_round_dicts(rows: list[ClientRound]) -> list[dict[str, object]]:
    return [asdict(r) | {"round_seconds": r.round_seconds} for r in rows]
