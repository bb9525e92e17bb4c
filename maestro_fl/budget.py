"""What a device can afford: training memory, per-round compute, transfer time.

A device is described by :class:`DeviceCapability`; its rank budget is the
largest rank fraction ``p`` (all LoD layers at ``⌈p·r_i⌉``) whose

* training memory (weights, gradients and momentum in fp32, plus the
  activations kept for backward at the local batch size) fits its memory, and
* per-round training compute (3 × forward MACs × passes per step × samples ×
  epochs: the backward pass costs about twice the forward) finishes within
  the round deadline at its speed.

The time model follows FedScale (Lai et al., ICML 2022): completion time =
compute time + download + upload over the device's bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .convert import Ranks, _walk
from .footprint import Inputs, measured, probe_forward
from .layers import LoDLayer, LoDMultiheadAttention
from .population import DeviceCapability  # the device a budget is checked for (its home is the population)

#: rank fractions a budget can take, from full rank down (fine enough to matter, small enough to tabulate)
FRACTION_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(20))
FP32 = 4
BACKWARD_FACTOR = 3  # forward + backward ≈ 3 × forward MACs


@dataclass(frozen=True)
class Cost:
    """What training one sub-model costs, per sample or per model: the one compute model.

    The server checks budgets against it (:meth:`train_macs`) and charges by
    it what a client's loop ran (:func:`maestro_fl.server.simulated_seconds`),
    so "same budget" means the same compute for every method, whatever its
    local training does per step.
    """

    fraction: float
    ranks: Ranks
    params: int  # trained parameters (factors as they are, not as deployed)
    macs: int  # forward MACs per sample
    activations: int  # activation values kept for backward, per sample
    passes: int = 1  # forward/backward passes per step: 2 with self-distillation or DLRT's KLS step
    live_graphs: int = 1  # autograd graphs alive at once: 2 when a teacher pass and a student pass share a backward

    def train_memory(self, batch_size: int, optimizer_slots: int = 1) -> int:
        """Bytes: weights + gradients + optimizer state + activations of one batch."""
        return FP32 * ((2 + optimizer_slots) * self.params + self.live_graphs * batch_size * self.activations)

    def train_macs(self, samples: int, epochs: int) -> int:
        """MACs of ``epochs`` passes over ``samples`` examples: forward + backward (3×), per pass."""
        return BACKWARD_FACTOR * self.macs * self.passes * samples * epochs


def activation_count(model: nn.Module, inputs: Inputs, ranks: Mapping[str, int] | None = None) -> int:
    """Values per sample that training keeps for backward: every leaf output, plus each LoD layer's inner rank-r map.

    Counted once per structure, input and ranks in a process (:func:`maestro_fl.footprint.measured`).
    """
    value = measured("activations", model, inputs, ranks, lambda: _count_activations(model, inputs, ranks))
    assert isinstance(value, int)
    return value


@torch.no_grad()
def _count_activations(model: nn.Module, inputs: Inputs, ranks: Mapping[str, int] | None) -> int:
    counts: list[int] = []

    def lod_hook(mod: LoDLayer, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        positions = out[0].numel() // mod.fan_out
        counts.append(out[0].numel() + positions * mod.resolve_rank(None))

    def leaf_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        counts.append(out[0].numel())

    def attention_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]) -> None:
        query = args[0] if args else out[0]  # (called with keywords only: its output has the query's shape)
        counts.append(attention_activations(mod, query, args[1] if len(args) > 1 else query))

    hooks: list[tuple[nn.Module, Callable[..., None]]] = []
    for _, module in _walk(model):
        if isinstance(module, nn.MultiheadAttention | LoDMultiheadAttention):
            hooks.append((module, attention_hook))
        if isinstance(module, LoDLayer):
            hooks.append((module, lod_hook))
        elif not any(True for _ in module.children()) and not isinstance(module, nn.Flatten):
            hooks.append((module, leaf_hook))
    probe_forward(model, inputs, ranks, hooks)
    return sum(counts)


def attention_activations(attention: nn.Module, query: torch.Tensor, key: torch.Tensor) -> int:
    """Values per sample an attention keeps for backward beyond what its projection modules' hooks count.

    The fused kernel training runs keeps its output (the input of the output
    projection, ``L·E``) and one log-sum-exp per head and query (``H·L``), not
    the ``H·L·S`` weights. PyTorch's own ``nn.MultiheadAttention`` calls no
    projection module (it reads their weights), so its Q, K, V (``L·E`` and
    twice ``S·E``) and its output (``L·E``) count here too.
    """
    assert isinstance(attention, nn.MultiheadAttention | LoDMultiheadAttention)
    e, h = attention.embed_dim, attention.num_heads
    if query.dim() == 2:
        tgt, src = query.shape[0], key.shape[0]
    else:
        seq = 1 if attention.batch_first else 0
        tgt, src = query.shape[seq], key.shape[seq]
    kept = tgt * e + h * tgt
    if isinstance(attention, nn.MultiheadAttention):
        kept += tgt * e + 2 * src * e + tgt * e
    return kept


def affordable(
    table: Sequence[Cost],
    device: DeviceCapability,
    *,
    batch_size: int,
    samples: int,
    epochs: int,
    deadline_s: float,
) -> Cost | None:
    """The largest-fraction entry of ``table`` the device can train within its memory and deadline.

    ``None`` when not even the smallest fits: such a device cannot take part.
    An explicit ``device.rank_fraction`` replaces the derivation: the largest
    entry at or below it.
    """
    if device.rank_fraction > 0:
        below = [c for c in table if c.fraction <= device.rank_fraction + 1e-9]
        return max(below, key=lambda c: c.fraction) if below else None
    for cost in sorted(table, key=lambda c: -c.fraction):
        fits_memory = cost.train_memory(batch_size) <= device.memory_bytes
        fits_time = deadline_s <= 0 or cost.train_macs(samples, epochs) / device.macs_per_s <= deadline_s
        if fits_memory and fits_time:
            return cost
    return None


@dataclass(frozen=True)
class BudgetCheck:
    """Why a device gets the sub-model it gets: what each constraint allows and what binds.

    ``binding`` is ``"memory"`` or ``"compute"`` when the next larger sub-model
    breaks that constraint, ``"none"`` when the largest fits, ``"rank_fraction"``
    when the device's budget is given explicitly, and ``"memory"``/``"compute"``
    (both when both) for a device that affords nothing: then ``need_*`` are the
    smallest sub-model's.
    """

    chosen: Cost | None
    binding: str
    need_memory: int  # bytes the next larger (or, when nothing fits, the smallest) sub-model needs
    have_memory: float
    need_seconds: float  # its compute seconds per round
    have_seconds: float  # the per-round compute budget (0 = none)
    own_memory: int = 0  # bytes the chosen sub-model needs to train (0 when nothing fits)
    own_seconds: float = 0.0  # its compute seconds per round


def explain_budget(
    table: Sequence[Cost],
    device: DeviceCapability,
    *,
    batch_size: int,
    samples: int,
    epochs: int,
    deadline_s: float,
) -> BudgetCheck:
    """:func:`affordable`'s choice for ``device`` and the constraint that sets it (for ``maestro-fl plan``)."""
    chosen = affordable(table, device, batch_size=batch_size, samples=samples, epochs=epochs, deadline_s=deadline_s)
    ordered = sorted(table, key=lambda c: -c.fraction)
    if device.rank_fraction > 0:
        probe, binding = chosen or ordered[-1], "rank_fraction"
    elif chosen is None:
        probe = ordered[-1]
        binding = ""
    else:
        larger = [c for c in ordered if c.fraction > chosen.fraction]
        probe, binding = (larger[-1], "") if larger else (chosen, "none")
    memory = probe.train_memory(batch_size)
    seconds = probe.train_macs(samples, epochs) / device.macs_per_s
    if not binding:
        over = [name for name, bad in (("memory", memory > device.memory_bytes),
                                       ("compute", deadline_s > 0 and seconds > deadline_s)) if bad]
        binding = "+".join(over) or "none"
    own_memory = chosen.train_memory(batch_size) if chosen is not None else 0
    own_seconds = chosen.train_macs(samples, epochs) / device.macs_per_s if chosen is not None else 0.0
    return BudgetCheck(chosen, binding, memory, device.memory_bytes, seconds, deadline_s, own_memory, own_seconds)


def transfer_seconds(num_bytes: float, bits_per_second: float) -> float:
    return 8.0 * num_bytes / bits_per_second
