"""Training as Maestro trains: ordered-dropout rank sampling, hierarchical group
lasso and progressive shrinking (Horváth et al., ICML 2024, arXiv 2308.14929).

:func:`run_epoch` is the only training loop: the centralized job, every
federated method's client trainer and DLRT run through it; what differs (the
sub-model each batch trains, the optimizer step) is a hook.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .catalog import SAMPLERS
from .convert import Ranks, active_ranks, lod_layers, model_ranks
from .data import Split, batches
from .layers import ceil_rank


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore: results then do not depend on the process's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -- ordered-dropout rank samplers --------------------------------------------
class RankSampler(ABC):
    """Draws the per-layer ranks of one training step; ``None`` means full rank."""

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator) -> None:
        self.max_ranks = dict(max_ranks)
        self.generator = generator

    @abstractmethod
    def __call__(self) -> Ranks | None:
        """The ranks of the next step."""


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

    def __init__(self, max_ranks: Mapping[str, int], generator: torch.Generator, levels: Sequence[Mapping[str, int]],
                 top_share: float = 0.0) -> None:
        super().__init__(max_ranks, generator)
        for level in levels:
            over = {n: r for n, r in level.items() if r > max_ranks.get(n, 0)}
            if over:
                raise ValueError(f"rank level {dict(level)} exceeds the model's ranks at {over}")
        self.levels = list(levels) or [dict(max_ranks)]
        self.top_share = top_share  # P(the last level, the client's own); 0 = uniform over the levels (FjORD)

    def __call__(self) -> Ranks | None:
        n = len(self.levels)
        if self.top_share > 0 and n > 1:
            # own level with probability top_share, else one of the lower levels uniformly
            u = float(torch.rand((), generator=self.generator))
            pick = n - 1 if u < self.top_share else int(torch.randint(n - 1, (1,), generator=self.generator))
            return dict(self.levels[pick])
        return dict(self.levels[int(torch.randint(n, (1,), generator=self.generator))])


class FullRankSampler(RankSampler):
    """``none``: no ordered dropout, always full rank (plain low-rank training)."""

    def __call__(self) -> Ranks | None:
        return None


def make_sampler(
    name: str,
    model: nn.Module,
    generator: torch.Generator,
    fraction: float = 0.25,
    levels: Sequence[Mapping[str, int]] = (),
    top_share: float = 0.0,
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
        return TierLevelSampler(ranks, generator, levels, top_share)
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
    forward_passes: int  # forward/backward passes over a batch: 2 per step with distillation or DLRT, else 1
    sample_passes: int = 0  # examples × passes: what the cost model charges (3 × forward MACs each)


# -- the one epoch loop: hooks for the sub-model of each batch and for the optimizer step -------
class SubModelDraw(ABC):
    """Hook 1 of :func:`run_epoch`: which sub-model each batch trains, and how to run it."""

    @abstractmethod
    def draw(self) -> object:
        """The sub-model of the next batch (ranks, a width, or ``None`` for the whole model)."""

    @abstractmethod
    def run(self, x: torch.Tensor, drawn: object) -> torch.Tensor:
        """The output of the drawn sub-model on ``x``."""


class WholeModel(SubModelDraw):
    """Every batch trains the whole model (FedAvg, DLRT)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def draw(self) -> object:
        return None

    def run(self, x: torch.Tensor, drawn: object) -> torch.Tensor:
        return self.model(x)


class RankDraw(SubModelDraw):
    """Ordered dropout on ranks: each batch runs the LoD model at the ranks a :class:`RankSampler` draws."""

    def __init__(self, model: nn.Module, sampler: RankSampler) -> None:
        self.model, self.sampler = model, sampler

    def draw(self) -> object:
        return self.sampler()

    def run(self, x: torch.Tensor, drawn: object) -> torch.Tensor:
        with active_ranks(self.model, drawn):  # type: ignore[arg-type]  # drawn is what draw() returned: ranks
            return self.model(x)


class Step(ABC):
    """Hook 2 of :func:`run_epoch`: how the weights move given a closure that computes the batch loss."""

    @abstractmethod
    def __call__(self, closure: Callable[[], torch.Tensor]) -> None:
        """Evaluate ``closure`` (once or more: every call is one forward/backward pass) and update the weights."""


class SGDStep(Step):
    """``zero_grad``, one pass, optional gradient-norm clipping, ``optimizer.step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float = 0.0) -> None:
        self.optimizer, self.clip_grad_norm = optimizer, clip_grad_norm

    def __call__(self, closure: Callable[[], torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        closure().backward()
        if self.clip_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.optimizer.step()


def run_epoch(
    data: Split | Iterable[tuple[torch.Tensor, torch.Tensor]],
    draw: SubModelDraw,
    step: Step,
    *,
    distill: bool = False,
    regularizer: Callable[[], torch.Tensor] | None = None,
    class_mask: torch.Tensor | None = None,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str = "cpu",
) -> EpochStats:
    """One epoch of local training: ranks (Maestro), widths (FjORD, HeteroFL) and DLRT all run here.

    Each batch trains the sub-model ``draw.draw()`` picks and minimises
    ``CE(f_b(x), y)``; with ``distill`` (Maestro's full pass, FjORD's
    self-distillation) a batch whose sub-model is not the whole one minimises
    ``CE(f_full(x), y) + CE(f_b(x), softmax(f_full(x)).detach())``; every
    batch then runs both passes, also when it draws the whole model (the
    second term's gradient is then zero), so a step always costs what the
    cost model charges.
    ``regularizer`` adds a penalty (Maestro's group lasso); ``class_mask``
    zeroes the logits of classes the client lacks (HeteroFL's masked
    classifier). ``step`` decides how many passes a batch takes and how the
    weights move (SGD, or DLRT's KLS integrator).
    """
    it = batches(data, batch_size, generator=generator, augment=augment) if isinstance(data, Split) else data
    mask = None if class_mask is None else class_mask.to(device)
    total_loss, correct, seen, steps, passes, sample_passes = 0.0, 0, 0, 0, 0, 0

    def logits(x: torch.Tensor, drawn: object) -> torch.Tensor:
        out = draw.run(x, drawn)
        return out if mask is None else out.masked_fill(~mask, 0.0)

    for x, y in it:
        x, y = x.to(device), y.to(device)
        drawn = draw.draw()
        first: list[tuple[torch.Tensor, torch.Tensor]] = []

        def closure() -> torch.Tensor:
            nonlocal passes
            if distill:
                teacher = logits(x, None)
                out = logits(x, drawn)
                loss = F.cross_entropy(teacher, y) + F.cross_entropy(out, teacher.detach().softmax(-1))
                passes += 2
            else:
                out = logits(x, drawn)
                loss = F.cross_entropy(out, y)
                passes += 1
            if not first:
                first.append((loss.detach(), out.detach()))
            return loss + regularizer() if regularizer is not None else loss

        before = passes
        step(closure)
        sample_passes += (passes - before) * len(y)
        loss, out = first[0]
        total_loss += float(loss) * len(y)
        correct += int((out.argmax(-1) == y).sum())
        seen += len(y)
        steps += 1
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), steps, seen, passes, sample_passes)


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
    """One epoch of LoD training (:func:`run_epoch` with rank draws and SGD).

    Each step draws ranks from ``sampler`` and minimises ``CE(f_b(x), y) + λ·HGL``;
    with ``full_pass``, self-distillation from the full model (the paper's
    ablation). ``clip_grad_norm > 0`` clips the gradient norm: products of
    factors make the loss surface steeper than the dense one.
    """
    model.train()
    return run_epoch(
        data,
        RankDraw(model, sampler),
        SGDStep(optimizer, clip_grad_norm),
        distill=full_pass,
        regularizer=(lambda: lambda_gl * group_lasso(model)) if lambda_gl > 0 else None,
        batch_size=batch_size,
        generator=generator,
        augment=augment,
        device=device,
    )


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


def _follow(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: torch.Tensor, index: tuple[slice, ...]) -> None:
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            k: v[index].clone() if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()
        }
