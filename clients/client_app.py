"""The maestro-fl ClientApp (Flower Message API): one simulated device.

* ``query``: registration. The client reports its device (from
  :mod:`clients.devices`) and how many training examples it holds.
* ``train``: the client receives only the sub-model of its budget and
  trains it: a factor prefix plus the dense parameters, with Maestro's
  ordered dropout within that budget (or with DLRT, its rank capped by the
  budget); or a width slice of the dense model (HeteroFL; FjORD's ordered
  dropout over width levels). It replies with the trained sub-model and what
  it cost: examples, loss, ranks, bytes both ways, MACs, and simulated
  compute and transfer seconds on its device.

The run's :class:`~maestro_fl.config.SimConfig` arrives with every message
(``run-config``), so the same ClientApp serves ``maestro-fl simulate`` and
``flwr run .``; each process parses and builds it once.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache, partial

import numpy as np
import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from maestro_fl import protocol as P
from maestro_fl.budget import BACKWARD_FACTOR, transfer_seconds
from maestro_fl.config import SimConfig, parse_faults, resolve
from maestro_fl.convert import lod_layers, truncate
from maestro_fl.data import Split
from maestro_fl.dlrt import KLSIntegrator, dlrt_to_lod, dlrt_train_epoch, lod_to_dlrt
from maestro_fl.federated import Federation, federation, model_at_width, ranks_from_list
from maestro_fl.footprint import footprint
from maestro_fl.training import make_sampler, train_epoch
from maestro_fl.width import OrderedDropout, ordered_dropout_epoch

from .devices import device_for


def training_device(cfg: SimConfig) -> torch.device:
    """CUDA when the run gives each client a GPU share (``num_gpus_per_client > 0``) and one is visible."""
    return torch.device("cuda" if cfg.num_gpus_per_client > 0 and torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _config(text: str) -> SimConfig:
    return resolve(SimConfig, overrides=json.loads(text))


def config_of(msg: Message) -> SimConfig:
    return _config(str(msg.content[P.CONFIG][P.RUN_CONFIG]))


def handle_query(msg: Message, context: Context) -> Message:
    cfg = config_of(msg)
    pid = int(context.node_config["partition-id"])
    fed = federation(cfg)
    device = device_for(pid, cfg)
    train, _ = fed.client_split(pid)
    metrics = MetricRecord(
        {
            P.PARTITION_ID: pid,
            P.NUM_EXAMPLES: len(train),
            P.DEVICE_TIER: device.tier,
            P.DEVICE_MACS_PER_S: device.macs_per_s,
            P.DEVICE_MEMORY: device.memory_bytes,
            P.DEVICE_UP_BPS: device.up_bps,
            P.DEVICE_DOWN_BPS: device.down_bps,
            P.DEVICE_AVAILABILITY: device.availability,
            P.DEVICE_RANK_FRACTION: device.rank_fraction,
        }
    )
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    cfg = config_of(msg)
    pid = int(context.node_config["partition-id"])
    fault = parse_faults(cfg.fault_injection).get(pid)
    if fault == "raise":
        raise RuntimeError(f"injected failure on partition {pid}")
    if fault == "timeout":
        time.sleep(cfg.round_timeout_s + 1.0)

    fed = federation(cfg)
    conf: ConfigRecord = msg.content[P.CONFIG]
    received: ArrayRecord = msg.content[P.ARRAYS]
    server_round = int(conf[P.SERVER_ROUND])
    width = float(conf[P.WIDTH]) if P.WIDTH in conf else None
    ranks = {} if width is not None else ranks_from_list(fed.layer_names, list(conf[P.RANKS]))
    model = truncate(fed.template, ranks) if width is None else model_at_width(cfg, fed.data.spec, width)
    model.load_state_dict(received.to_torch_state_dict())

    train, _ = fed.client_split(pid)
    # DLRT's integrator is not checked on a GPU here: DLRT clients stay on the CPU
    device = training_device(cfg) if cfg.trainer != "dlrt" else torch.device("cpu")
    model.to(device)
    # local randomness (data order, sampled ranks) is a function of (seed, round, client) alone
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, server_round, pid]).generate_state(1)[0]))
    epochs = int(conf[P.LOCAL_EPOCHS])
    if width is not None:
        losses = _train_width(model, fed, train, conf, cfg, gen, epochs, device)
    elif cfg.trainer == "dlrt":
        model, losses = _train_dlrt(model, train, conf, cfg, gen, fed.data.augment, epochs, device)
        for name, layer in lod_layers(model).items():
            layer.pad_(ranks[name])  # DLRT may have lowered the rank; the reply keeps the shape it was sent
    else:
        losses = _train_lod(model, train, conf, cfg, gen, fed.data.augment, epochs, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _inject_reply_fault(fault, state, fed.layer_names[0] if fed.layer_names else None)
    reply_arrays = ArrayRecord(state)

    # what this round cost on the simulated device: forward MACs of the trained (not deployed) factors
    fwd_macs = footprint(model, fed.data.spec.shape, as_deployed=False).macs
    # the full-pass distillation and DLRT's KLS step each run the model twice per batch
    passes = 2 if bool(conf[P.FULL_PASS]) or cfg.trainer == "dlrt" else 1
    macs = BACKWARD_FACTOR * fwd_macs * len(train) * epochs * passes
    bytes_in, bytes_out = received.count_bytes(), reply_arrays.count_bytes()
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(train),
            P.TRAIN_LOSS: float(np.mean(losses)) if losses else 0.0,
            P.PARTITION_ID: pid,
            P.RANKS: [int(r) for r in ranks.values()],
            **({P.WIDTH: width} if width is not None else {}),
            **({P.LABELS: [int(c) for c in train.y.unique()]} if bool(conf.get(P.LABEL_MASK, False)) else {}),
            P.BYTES_RECEIVED: bytes_in,
            P.BYTES_SENT: bytes_out,
            P.MACS: float(macs),
            P.COMPUTE_SECONDS: macs / float(conf[P.DEVICE_MACS_PER_S]),
            P.DOWNLOAD_SECONDS: transfer_seconds(bytes_in, float(conf[P.DEVICE_DOWN_BPS])),
            P.UPLOAD_SECONDS: transfer_seconds(bytes_out, float(conf[P.DEVICE_UP_BPS])),
            P.WALL_SECONDS: time.perf_counter() - started,
        }
    )
    return Message(RecordDict({P.ARRAYS: reply_arrays, P.METRICS: metrics}), reply_to=msg)


def _train_lod(
    model: nn.Module,
    train: Split,
    conf: ConfigRecord,
    cfg: SimConfig,
    gen: torch.Generator,
    augment: bool,
    epochs: int,
    device: torch.device,
) -> list[float]:
    """Maestro's ordered dropout within the client's budget."""
    opt = torch.optim.SGD(
        model.parameters(), lr=float(conf[P.LR]), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    losses = []
    for _ in range(epochs):
        stats = train_epoch(
            model,
            train,
            opt,
            make_sampler(str(conf[P.SAMPLER]), model, gen, levels=_rank_levels(conf, list(lod_layers(model)))),
            lambda_gl=float(conf[P.LAMBDA_GL]),
            full_pass=bool(conf[P.FULL_PASS]),
            batch_size=int(conf[P.BATCH_SIZE]),
            generator=gen,
            augment=augment,
            clip_grad_norm=cfg.clip_grad_norm,
            device=device,
        )
        losses.append(stats.loss)
    return losses


@lru_cache(maxsize=16)
def _architecture(cfg: SimConfig, spec: object, width: float) -> nn.Module:
    """The model at ``width``, for its structure only (ordered dropout runs it on sliced weights)."""
    return model_at_width(cfg, spec, width)


def _train_width(
    model: nn.Module,
    fed: Federation,
    train: Split,
    conf: ConfigRecord,
    cfg: SimConfig,
    gen: torch.Generator,
    epochs: int,
    device: torch.device,
) -> list[float]:
    """A width slice: plain SGD at its width (HeteroFL) or ordered dropout over width levels (FjORD)."""
    od = OrderedDropout(model, partial(_architecture, cfg, fed.data.spec), [float(w) for w in conf[P.WIDTHS]], gen)
    class_mask = None
    if bool(conf.get(P.LABEL_MASK, False)):  # HeteroFL: only the client's own classes have logits
        class_mask = torch.zeros(fed.data.spec.num_classes, dtype=torch.bool)
        class_mask[train.y.unique()] = True
    opt = torch.optim.SGD(
        model.parameters(), lr=float(conf[P.LR]), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return [
        ordered_dropout_epoch(
            od,
            train,
            opt,
            distill=bool(conf[P.FULL_PASS]),
            batch_size=int(conf[P.BATCH_SIZE]),
            generator=gen,
            augment=fed.data.augment,
            clip_grad_norm=cfg.clip_grad_norm,
            class_mask=class_mask,
            device=device,
        ).loss
        for _ in range(epochs)
    ]


def _rank_levels(conf: ConfigRecord, names: list[str]) -> list[dict[str, int]]:
    """Sampler ``tiers``: the flat ``rank-levels`` list back into one ranks dict per level."""
    flat = [int(r) for r in conf[P.RANK_LEVELS]] if P.RANK_LEVELS in conf else []
    if not names or len(flat) % len(names):
        return []
    return [dict(zip(names, flat[i : i + len(names)])) for i in range(0, len(flat), len(names))]


def _train_dlrt(
    model: nn.Module,
    train: Split,
    conf: ConfigRecord,
    cfg: SimConfig,
    gen: torch.Generator,
    augment: bool,
    epochs: int,
    device: torch.device,
) -> tuple[nn.Module, list[float]]:
    """DLRT's KLS integrator with every layer's rank capped at the client's budget."""
    dl = lod_to_dlrt(model)
    integrator = KLSIntegrator(dl, lr=float(conf[P.LR]), tau=cfg.dlrt_tau, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    losses = [
        dlrt_train_epoch(dl, integrator, train, batch_size=int(conf[P.BATCH_SIZE]), generator=gen,
                         augment=augment, device=device).loss
        for _ in range(epochs)
    ]
    return dlrt_to_lod(dl), losses


def _inject_reply_fault(fault: str | None, state: dict[str, torch.Tensor], first_layer: str | None) -> None:
    """Corrupt a reply on purpose (``fault_injection``), to test the server's checks.

    The first LoD layer's ``Vᵀ`` is corrupted, or, in a model without LoD
    layers (dense or width-sliced baselines), its first weight matrix.
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
