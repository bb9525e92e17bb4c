"""``SubModelStrategy``: any heterogeneous sub-model method on Flower's Message API.

The server's decisions and accounts are :class:`maestro_fl.server.FederationServer`'s,
which knows nothing of Flower; this class adapts them to Flower's records. Per round it

1. asks the core for the round's tasks (sampled clients, each with the sub-model
   its device affords);
2. encodes each budget's sub-model and assignment once, and sends every client a
   message that carries only those two (the run config, and so its device and
   local training settings, it already has);
3. hands the replies back to the core as plain values (:class:`~maestro_fl.server.TrainReply`),
   which checks them, simulates their seconds and merges the good ones.

Budgets are computed once per distinct device and global model, the
tiers' budgets once per global model, and what a budget's clients are sent
(index, encoded arrays, config record) once per budget and round, so a round
costs O(K + N) for K sampled of N registered clients, with a small constant
per sampled client (``benchmarks/server_round.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from logging import DEBUG, INFO
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
from maestro_fl.methods import ClientTask, FederatedMethod
from maestro_fl.results import ClientRound
from maestro_fl.server import BudgetPart, FederationServer, Registration, TrainReply


def named_part(name: str, index: tuple[object, ...]) -> tuple[str, tuple[object, ...]]:
    """A hashable name for the part ``index`` of array ``name``: equal parts, equal keys."""
    return name, part_key(index)  # type: ignore[arg-type]  # index: slices and index arrays


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays (read-only views of its bytes; :mod:`maestro_fl.wire`)."""
    return {k: wire.decode(v.stype, v.data) for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = Array(*wire.encode(v))
    return record


class SubModelStrategy(Strategy):
    """Flower's records for a :class:`~maestro_fl.server.FederationServer` of any :class:`FederatedMethod`.

    Parameters
    ----------
    method : FederatedMethod
        The method: sub-model family, client trainer, server rule, cost model.
    cfg : SimConfig
        The run's settings; sent to the clients as the run config.
    partition_sizes : sequence of int, optional
        Each partition's training examples as the server partitioned the data (a registration must agree).
    core : FederationServer, optional
        The core to adapt (tests give one with a population of their own); default: one for ``method`` and ``cfg``.
    """

    def __init__(self, method: FederatedMethod, cfg: SimConfig, partition_sizes: Iterable[int] | None = None,
                 core: FederationServer | None = None) -> None:
        self.core = core if core is not None else FederationServer(
            method, cfg, None if partition_sizes is None else list(partition_sizes))
        self.method, self.cfg = self.core.method, self.core.cfg
        self._config_json = json.dumps(to_dict(cfg))
        self._encoded: dict[tuple[str, tuple[object, ...]], Array] = {}  # this round's arrays, as sent

    # what the core knows, as the ServerApp and the tests read it
    @property
    def devices(self) -> dict[int, DeviceCapability]:
        return self.core.devices

    @property
    def partition_of(self) -> dict[int, int]:
        return self.core.partition_of

    @property
    def examples_of(self) -> dict[int, int]:
        return self.core.examples_of

    @property
    def nodes(self) -> list[int]:
        return self.core.nodes

    @property
    def excluded(self) -> list[tuple[int, str]]:
        return self.core.excluded

    @property
    def tasks(self) -> dict[int, ClientTask]:
        return self.core.tasks

    @property
    def client_rounds(self) -> list[ClientRound]:
        return self.core.client_rounds

    @property
    def ignored(self) -> list[tuple[int, str]]:
        return self.core.ignored

    def set_population(self) -> None:
        self.core.set_population()

    def sample(self, server_round: int) -> list[int]:
        return self.core.sample(server_round)

    def tier_costs(self) -> dict[int, Cost]:
        return self.core.tier_costs()

    def plan(self) -> list[dict[str, Any]]:
        return self.core.plan()

    # -- registration -------------------------------------------------------------------------
    def registration_messages(self, grid: Grid) -> list[Message]:
        """Ask every node which partition it holds and how many training examples (a ``query`` message)."""
        conf = ConfigRecord({P.RUN_CONFIG: self._config_json})
        return [
            Message(RecordDict({P.CONFIG: conf}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in grid.get_node_ids()
        ]

    def register(self, replies: Iterable[Message]) -> None:
        """Hand every registration reply to the core, which takes the good ones; never raises on a reply."""
        self.core.register(self._registration(msg) for msg in replies)

    @staticmethod
    def _registration(msg: Message) -> Registration:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return Registration(node, None, None, error=str(msg.error.reason))
        try:
            metrics = dict(msg.content[P.METRICS])
            return Registration(node, metrics.get(P.PARTITION_ID), metrics.get(P.NUM_EXAMPLES))
        except Exception as err:  # noqa: BLE001 - any unreadable reply is a refused registration
            return Registration(node, None, None, error=f"unreadable ({type(err).__name__}: {str(err)[:100]})")

    # -- Strategy API -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's Strategy API: :meth:`train_messages` for the global model in ``arrays``."""
        return self.train_messages(server_round, to_numpy(arrays))

    def train_messages(self, server_round: int, current: Mapping[str, np.ndarray]) -> list[Message]:
        """One message per sampled client, carrying only its sub-model and its assignment.

        The encoded arrays and the ConfigRecord of a budget are made once a round and shared by its clients.
        The round loop calls this with the global model as NumPy arrays: it is never encoded whole.
        """
        parts = self.core.configure(server_round, current)
        self._encoded = {}
        records: dict[int, RecordDict] = {}
        messages = []
        for node, part in parts.items():
            if id(part) not in records:
                entries: dict[str, Any] = {P.RUN_CONFIG: self._config_json, P.SERVER_ROUND: server_round}
                config_record = ConfigRecord(entries | part.assignment.to_config(self.core.layer_names))
                records[id(part)] = RecordDict({P.ARRAYS: self._record(part), P.CONFIG: config_record})
            messages.append(Message(records[id(part)], dst_node_id=node, message_type=MessageType.TRAIN))
        log(DEBUG, "configure_train: round %s, %s clients", server_round, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Strategy API: :meth:`merge_replies`, as records."""
        merged = self.merge_replies(server_round, replies)
        if merged is None:
            return None, None
        ok = [r for r in self.core.client_rounds if r.status == "ok"]
        total = sum(r.num_examples for r in ok)
        round_metrics = MetricRecord(
            {"train-loss": sum(r.train_loss * r.num_examples for r in ok) / total, "clients-ok": len(ok)}
        )
        return to_record(merged), round_metrics

    def merge_replies(self, server_round: int, replies: Iterable[Message]) -> dict[str, np.ndarray] | None:
        """The core checks every reply against what was sent, then merges the good ones by the method's rule."""
        return self.core.receive(server_round, (self._reply(msg) for msg in replies))

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
        log(INFO, "\t└──> LoD layers: %s", list(self.core.layer_names))

    # -- records ------------------------------------------------------------------------------
    def _record(self, part: BudgetPart) -> ArrayRecord:
        """The sub-model as an ArrayRecord; a part many clients hold this round (the dense parameters,
        the factors of one tier) is encoded once and the same bytes are sent to each."""
        record = ArrayRecord()  # filled item by item: ArrayRecord(dict) would copy every Array
        for name, value in part.arrays.items():
            key = named_part(name, part.index[name])
            if key not in self._encoded:
                self._encoded[key] = Array(*wire.encode(value))
            record[name] = self._encoded[key]
        return record

    @staticmethod
    def _reply(msg: Message) -> TrainReply:
        """The reply as plain Python, or why it cannot be read (never raises)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            return TrainReply(node, {}, {}, error=str(msg.error.reason))
        try:
            content = msg.content
            if P.ARRAYS not in content.array_records or P.METRICS not in content.metric_records:
                return TrainReply(node, {}, {}, problem=f"reply lacks '{P.ARRAYS}' or '{P.METRICS}'")
            metrics = dict(content[P.METRICS])
            record = content.array_records[P.ARRAYS]
        except Exception as err:  # noqa: BLE001 - any unreadable reply is a malformed reply
            return TrainReply(node, {}, {}, problem=f"reply unreadable: {type(err).__name__}: {err}"[:300])
        try:
            arrays = to_numpy(record)
        except Exception as err:  # noqa: BLE001
            return TrainReply(node, {}, metrics, problem=f"arrays undecodable: {type(err).__name__}: {err}"[:300])
        return TrainReply(node, arrays, metrics, bytes_up=record.count_bytes())
