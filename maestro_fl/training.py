"""Training as Maestro trains: ordered-dropout rank sampling, hierarchical group
lasso and progressive shrinking (Horváth et al., ICML 2024, arXiv 2308.14929).

This is the only training loop; the centralized job and the federated client
both call :func:`train_epoch`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .convert import Ranks, active_ranks, lod_layers, model_ranks
from .data import Split, batches
from .layers import ceil_rank

SAMPLERS = ("per_layer", "across_layers", "nested", "tiers", "fixed", "none")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -- ordered-dropout rank samplers --------------------------------------------
class RankSampler:
    """Draws the per-layer ranks of one training step; ``None`` means full rank."""

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator) -> None:
        self.max_ranks = dict(max_ranks)
        self.generator = generator

    def __call__(self) -> Ranks | None:
        raise NotImplementedError


class PerLayerSampler(RankSampler):
    """Maestro's default (``per_layer``): each step truncates exactly one layer.

    All (layer i, rank j) pairs, j = 1..r_i, are shuffled and cycled through
    without replacement, so layer i is picked with probability ∝ r_i and its
    rank uniformly; the other layers stay at full rank.
    """

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator) -> None:
        super().__init__(max_ranks, generator)
        self._pairs = [(n, j) for n, r in self.max_ranks.items() for j in range(1, r + 1)]
        self._order: list[int] = []

    def __call__(self) -> Ranks | None:
        if not self._pairs:
            return None
        if not self._order:
            self._order = torch.randperm(len(self._pairs), generator=self.generator).tolist()
        name, rank = self._pairs[self._order.pop()]
        return {name: rank}


class AcrossLayersSampler(RankSampler):
    """``across_layers``: an independent ``b_i ~ U{1..r_i}`` for every layer."""

    def __call__(self) -> Ranks | None:
        return {n: int(torch.randint(1, r + 1, (1,), generator=self.generator)) for n, r in self.max_ranks.items()}


class FixedFractionSampler(RankSampler):
    """``fixed``: every layer at ``⌈p·r_i⌉`` (Pufferfish-style, p = 0.25 in the reference)."""

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator, fraction: float) -> None:
        super().__init__(max_ranks, generator)
        self.fraction = fraction

    def __call__(self) -> Ranks | None:
        return {n: ceil_rank(self.fraction, r) for n, r in self.max_ranks.items()}


class NestedFractionSampler(RankSampler):
    """``nested``: FjORD's ordered dropout on ranks; one ``p ~ U{1/K, 2/K, ..., 1}`` for every layer.

    Every step trains the whole model at one of ``K`` nested sizes, so each
    smaller sub-model is trained on every step that trains a larger one. This
    suits federations whose tiers deploy all layers at a common fraction
    (FjORD uses K = 5).
    """

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator, levels: int = 5) -> None:
        super().__init__(max_ranks, generator)
        self.levels = levels

    def __call__(self) -> Ranks | None:
        p = int(torch.randint(1, self.levels + 1, (1,), generator=self.generator)) / self.levels
        return {n: ceil_rank(p, r) for n, r in self.max_ranks.items()}


class TierLevelSampler(RankSampler):
    """``tiers``: FjORD's own rule, ``p ~ U{p_s : p ≤ p_max}``, on the federation's tier ranks.

    Each step trains one of the given rank levels (the ranks the tiers at or
    below this client deploy), so every tier's exact sub-model is trained by
    every client that holds it. :class:`NestedFractionSampler` instead draws
    fractions of the client's *own* ranks, which no weaker tier deploys.
    """

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator, levels: Sequence[Ranks]) -> None:
        super().__init__(max_ranks, generator)
        for level in levels:
            over = {n: r for n, r in level.items() if r > max_ranks.get(n, 0)}
            if over:
                raise ValueError(f"rank level {dict(level)} exceeds the model's ranks at {over}")
        self.levels = list(levels) or [dict(max_ranks)]

    def __call__(self) -> Ranks | None:
        return dict(self.levels[int(torch.randint(len(self.levels), (1,), generator=self.generator))])


class FullRankSampler(RankSampler):
    """``none``: no ordered dropout, always full rank (plain low-rank training)."""

    def __call__(self) -> Ranks | None:
        return None


def make_sampler(
    name: str,
    model: nn.Module,
    generator: torch.Generator,
    fraction: float = 0.25,
    levels: Sequence[Ranks] = (),
) -> RankSampler:
    """The sampler ``name`` over ``model``'s ranks; ``levels`` are the rank levels of ``tiers``."""
    ranks = model_ranks(model)
    if name == "per_layer":
        return PerLayerSampler(ranks, generator)
    if name == "across_layers":
        return AcrossLayersSampler(ranks, generator)
    if name == "nested":
        return NestedFractionSampler(ranks, generator)
    if name == "fixed":
        return FixedFractionSampler(ranks, generator, fraction)
    if name == "none":
        return FullRankSampler(ranks, generator)
    if name == "tiers":
        return TierLevelSampler(ranks, generator, levels)
    raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}")


# -- losses -------------------------------------------------------------------
def group_lasso(model: nn.Module) -> torch.Tensor:
    """``Σ_layers HGL(U, V)``, Maestro's hierarchical group lasso on factor tails."""
    terms = [layer.group_lasso() for layer in lod_layers(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    steps: int
    samples: int
    forward_passes: int  # 2 per step with the full-pass distillation, else 1


def train_epoch(
    model: nn.Module,
    data: Split | Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    sampler: RankSampler,
    *,
    lambda_gl: float = 0.0,
    full_pass: bool = False,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    augment: bool = False,
    clip_grad_norm: float = 0.0,
    device: torch.device | str = "cpu",
) -> EpochStats:
    """One epoch of LoD training.

    Each step draws ranks from ``sampler`` and minimises
    ``CE(f_b(x), y) + λ·HGL``; with ``full_pass`` it minimises
    ``CE(f_full(x), y) + CE(f_b(x), softmax(f_full(x)).detach()) + λ·HGL``
    (self-distillation from the full model, the paper's ablation).
    ``clip_grad_norm > 0`` clips the gradient norm: products of factors
    make the loss surface steeper than the dense one.
    """
    model.train()
    it = batches(data, batch_size, generator=generator, augment=augment) if isinstance(data, Split) else data
    total_loss, correct, seen, steps, passes = 0.0, 0, 0, 0, 0
    for x, y in it:
        x, y = x.to(device), y.to(device)
        ranks = sampler()
        optimizer.zero_grad(set_to_none=True)
        if full_pass:
            full_out = model(x)
            with active_ranks(model, ranks):
                out = model(x)
            loss = F.cross_entropy(full_out, y) + F.cross_entropy(out, full_out.detach().softmax(-1))
            passes += 2
        else:
            with active_ranks(model, ranks):
                out = model(x)
            loss = F.cross_entropy(out, y)
            passes += 1
        task_loss = loss.detach()
        if lambda_gl > 0:
            loss = loss + lambda_gl * group_lasso(model)
        loss.backward()
        if clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        n = len(y)
        total_loss += float(task_loss) * n
        correct += int((out.argmax(-1) == y).sum())
        seen += n
        steps += 1
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), steps, seen, passes)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Split,
    ranks: Mapping[str, int] | None = None,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the model at ``ranks``."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    with active_ranks(model, ranks):
        for x, y in batches(data, batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
    model.train(was_training)
    n = max(len(data), 1)
    return loss / n, correct / n


# -- progressive shrinking ----------------------------------------------------
def shrink_ranks(model: nn.Module, eps: float) -> Ranks:
    """Ranks after dropping trailing components whose importance is below ``eps``.

    ``imp_b = ‖Vᵀ_{b:}‖_F·‖U_{:, b:}‖_F`` is non-increasing in ``b``, so the
    kept components always form a prefix; at least one is kept.
    """
    out: Ranks = {}
    for name, layer in lod_layers(model).items():
        keep = int((layer.importance() >= eps).sum())
        out[name] = max(1, keep)
    return out


@torch.no_grad()
def shrink(model: nn.Module, eps: float, optimizer: torch.optim.Optimizer | None = None) -> Ranks:
    """Progressive shrinking (Maestro §3): physically remove low-importance tails.

    Parameters whose tensors shrink are replaced; the optimizer's param groups
    and per-parameter state (momentum buffers, Adam moments) are sliced to
    follow them, so training continues exactly as if the removed components
    had never existed.
    """
    new_ranks = shrink_ranks(model, eps)
    for name, layer in lod_layers(model).items():
        r = new_ranks[name]
        if r >= layer.max_rank:
            continue
        old_in, old_out = layer.in_network.weight, layer.out_network.weight
        layer.truncate_(r)
        if optimizer is not None:
            _follow(optimizer, old_in, layer.in_network.weight, (slice(0, r),))
            _follow(optimizer, old_out, layer.out_network.weight, (slice(None), slice(0, r)))
    return new_ranks


def _follow(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, index: tuple[slice, ...]) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            k: v[index].clone() if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()
        }
