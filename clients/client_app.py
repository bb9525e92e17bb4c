"""The maestro-fl ClientApp (Flower Message API): one simulated device, for any method.

* ``query``: registration. The client reports its partition and how many
  training examples it holds (the server knows its device from the run's population).
* ``train``: decode the request, train, reply. The client decodes its assignment,
  takes the module of the sub-model's shape (the method's family; built once per
  process and reused, as the data and partitions are), loads the arrays it
  received, trains them with the method's trainer, and replies with the trained
  sub-model and what its loop did: examples, loss, and examples × passes. The
  server turns those into MACs and simulated seconds with the cost model it
  budgeted with (:mod:`maestro_fl.server`): no client runs a cost model.

Nothing here depends on the method: :mod:`maestro_fl.methods` decides.
The run's :class:`~maestro_fl.config.SimConfig` arrives with every message
(``run-config``), so the same ClientApp serves ``maestro-fl simulate`` and
``flwr run .``; each process parses and builds it once.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from maestro_fl import message_keys as P
from maestro_fl import wire
from maestro_fl.config import SimConfig, parse_faults, resolve
from maestro_fl.federated import federation, run_device
from maestro_fl.methods import Assignment, LocalTraining
from maestro_fl.training import torch_threads


@lru_cache(maxsize=4)
def _config(text: str) -> SimConfig:
    return resolve(SimConfig, overrides=json.loads(text))


def config_of(msg: Message) -> SimConfig:
    return _config(str(msg.content[P.CONFIG][P.RUN_CONFIG]))


def warm(run_config: str) -> None:
    """Build the run's federation in this process (``protocol.CLIENT_WARMUP_REF``): an actor does it when it
    starts, so that no message's timeout pays for loading the data, building the model, or measuring the
    sub-model ladder (its cost table: 1.6 s for the MLP on an idle machine, 3-5 s beside two busy processes,
    which a first message on a fresh actor paid before)."""
    federation(_config(run_config)).method.cost_table(None)


def handle_query(msg: Message, context: Context) -> Message:
    cfg = config_of(msg)
    pid = int(context.node_config["partition-id"])
    train, _ = federation(cfg).client_split(pid)
    metrics = MetricRecord({P.PARTITION_ID: pid, P.NUM_EXAMPLES: len(train)})
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    cfg = config_of(msg)
    with torch_threads(cfg.client_threads):
        return _train(msg, context, cfg)


def _number(record: ConfigRecord, key: str) -> float:
    """A numeric entry of a request's record; anything else is a malformed request, named."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"request entry {key!r} must be a number, got {str(value)[:40]!r}")
    return float(value)


def _train(msg: Message, context: Context, cfg: SimConfig) -> Message:
    started = time.perf_counter()
    pid = int(context.node_config["partition-id"])
    conf = msg.content.config_records[P.CONFIG]
    server_round = int(_number(conf, P.SERVER_ROUND))
    injected = parse_faults(cfg.fault_injection).get(pid)
    fault = injected.kind if injected is not None and injected.applies(server_round) else None
    _inject_process_fault(fault, pid, cfg.round_timeout_s)

    fed = federation(cfg)
    method = fed.method
    received = msg.content.array_records[P.ARRAYS]
    assignment = Assignment.from_config(conf, fed.layer_names)
    model = method.client_model(assignment)
    model.load_state_dict({k: torch.from_numpy(wire.decode(v.stype, v.data).copy()) for k, v in received.items()})

    train, _ = fed.client_split(pid)
    device = run_device(cfg) if method.runs_on_gpu else torch.device("cpu")
    model.to(device)
    # local randomness (data order, sampled sub-models) is a function of (seed, round, client) alone
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, server_round, pid]).generate_state(1)[0]))
    result = method.train(model, train, assignment, LocalTraining(cfg.local_epochs, cfg.lr, gen, fed.data.augment, device))
    state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    _inject_reply_fault(fault, state, fed.layer_names[0] if fed.layer_names else None)
    reply_arrays = ArrayRecord()
    for k, v in state.items():
        reply_arrays[k] = Array(*wire.encode(v.numpy()))

    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(train) * (10**6 if fault == "examples" else 1),
            P.TRAIN_LOSS: result.loss,
            P.PARTITION_ID: pid,
            **({P.LABELS: list(result.labels)} if result.labels else {}),
            P.SAMPLE_PASSES: result.sample_passes,
            P.WALL_SECONDS: time.perf_counter() - started,
        }
    )
    return Message(RecordDict({P.ARRAYS: reply_arrays, P.METRICS: metrics}), reply_to=msg)


SLOW_FAULT_S = 0.5  # 'slow': later than its peers in real time, well inside any round_timeout_s


def _inject_process_fault(fault: str | None, pid: int, round_timeout_s: float) -> None:
    """Fail, stall or kill this client on purpose (``fault_injection``), to test the engine."""
    if fault == "raise":
        raise RuntimeError(f"injected failure on partition {pid}")
    if fault == "timeout":
        time.sleep(round_timeout_s + 1.0)
    if fault == "slow":
        time.sleep(min(SLOW_FAULT_S, round_timeout_s / 4))
    if fault == "hang":
        threading.Event().wait()
    if fault == "exit":
        os._exit(3)
    if fault == "segfault":
        ctypes.string_at(0)


def _inject_reply_fault(fault: str | None, state: dict[str, torch.Tensor], first_layer: str | None) -> None:
    """Corrupt a reply on purpose (``fault_injection``), to test the server's checks.

    The first LoD layer's ``Vᵀ`` is corrupted, or, in a model without LoD
    layers (dense or width-sliced methods), its first weight matrix.
    """
    if fault is None:
        return
    if first_layer is not None:
        name = f"{first_layer}.in_network.weight"
    else:
        name = next((k for k, v in state.items() if v.ndim >= 2), "")
        if not name:
            return
    if fault == "nan":
        state[name] = state[name].clone().fill_(float("nan"))
    elif fault == "huge":
        state[name] = state[name].clone().fill_(1e30)
    elif fault == "dtype":
        state[name] = state[name].double()
    elif fault == "shape":  # a wrong non-rank dimension
        state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1, *state[name].shape[2:])
    elif fault == "rank":  # more components than the client was given
        state[name] = torch.cat([state[name], state[name][:1]], dim=0)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
