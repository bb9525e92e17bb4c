"""Fake federations for strategy tests: a SubModelStrategy with registered devices, and fake replies.

In the style of Flower's ``fedavgm_test.py``: ``aggregate_train`` is fed
hand-made reply messages, no engine involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from maestro_fl import message_keys as P
from maestro_fl.budget import DeviceCapability
from maestro_fl.config import SimConfig, resolve
from maestro_fl.methods import METHODS
from maestro_fl.models import scaled
from maestro_fl.server import FederationServer, Registration
from strategies.submodel_strategy import SubModelStrategy, to_numpy

#: the LoD settings that factorize both layers of the tiny MLPs below (SVD: exact at full rank)
ALL_LOD = {"keep_first": 0, "keep_classifier": False, "init": "svd"}


def tiny_mlp(p: float = 1.0) -> nn.Module:
    """6 inputs → ⌈5p⌉ hidden → 4 classes."""
    h = scaled(5, p)
    return nn.Sequential(nn.Linear(6, h), nn.ReLU(), nn.Linear(h, 4))


def tiny_wide(p: float = 1.0) -> nn.Module:
    """6 inputs → ⌈8p⌉ hidden → 4 classes."""
    h = scaled(8, p)
    return nn.Sequential(nn.Linear(6, h), nn.ReLU(), nn.Linear(h, 4))


def config(n: int, **kw: object) -> SimConfig:
    """Hand-made replies (1s, 3s) move a model far beyond the update-norm bound: it is off unless a test sets it.
    Ranks are uniform (every layer at the budget's fraction), so a test can write the ranks it expects; the
    importance allocation has its own tests (tests/test_lod_diagnosis.py)."""
    return resolve(SimConfig, overrides={"clients_per_round": n, "num_clients": n, "max_update_norm": 0.0,
                                         "rank_allocation": "uniform"} | kw)


def fake_strategy(
    strategy: str,
    fractions: Sequence[float],
    examples: Sequence[int] | None = None,
    build: Callable[[float], nn.Module] = tiny_mlp,
    tiers: Sequence[int] | None = None,
    **cfg: object,
) -> tuple[SubModelStrategy, ArrayRecord]:
    """A strategy whose clients ``i`` (node ``100 + i``) hold ``examples[i]`` examples and budget ``fractions[i]``.

    Client ``i`` is of tier ``tiers[i]`` (default: ``i``).
    """
    torch.manual_seed(0)
    config_ = config(len(fractions), strategy=strategy, **cfg)
    method = METHODS[strategy](config_, (6,), build)
    population = [DeviceCapability(tiers[i] if tiers is not None else i, 1e9, 1e9, 1e6, 1e6, availability=1.0,
                                   rank_fraction=p) for i, p in enumerate(fractions)]
    s = SubModelStrategy(method, config_, core=FederationServer(method, config_, population=population))
    s.core.register(Registration(100 + i, i, n) for i, n in enumerate(examples or [10] * len(fractions)))
    arrays = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in method.template.state_dict().items()})
    return s, arrays


def messages(strategy: SubModelStrategy, arrays: ArrayRecord, server_round: int = 1) -> list[Message]:
    """The round's train messages, ordered by partition."""
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid=None))
    return sorted(msgs, key=lambda m: strategy.partition_of[m.metadata.dst_node_id])


def reply(msg: Message, arrays: dict[str, np.ndarray], n: int, **metrics: object) -> Message:
    values = {
        P.NUM_EXAMPLES: n,
        P.TRAIN_LOSS: 0.5,
        P.SAMPLE_PASSES: 3 * n,  # three local epochs of n examples
    } | metrics
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({P.ARRAYS: record, P.METRICS: MetricRecord(values)}), reply_to=msg)


def sent(msg: Message) -> dict[str, np.ndarray]:
    return to_numpy(msg.content[P.ARRAYS])


def moved(msg: Message, seed: int) -> dict[str, np.ndarray]:
    """What a client sends back: its received arrays, moved at random."""
    r = np.random.default_rng(seed)
    return {k: (v + r.normal(size=v.shape)).astype(np.float32) for k, v in sent(msg).items()}


def filled(msg: Message, value: float) -> dict[str, np.ndarray]:
    """A client's reply: every entry of what it was sent, set to ``value``."""
    return {k: np.full_like(v, value) for k, v in sent(msg).items()}


def rows_by_partition(strategy: SubModelStrategy) -> dict[int, object]:
    return {r.partition_id: r for r in strategy.client_rounds}
