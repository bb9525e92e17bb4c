"""FIARSE (Wu et al., NeurIPS 2024, arXiv 2407.19389): sub-models chosen by parameter importance.

FIARSE gives each client the parameters of largest magnitude that its budget
affords, re-chosen from the current global model every round, and the server
moves every element by the mean update of the clients that changed it
(:func:`~maestro_fl.aggregation.aggregate_fiarse`). Here the choice is
structured, so that a sub-model's parameters, MACs and bytes are real on any
device, on two axes:

* :class:`FIARSE` (``strategy=fiarse``), on widths: every hidden layer keeps
  the ``⌈p·c⌉`` channels of largest importance ``‖w_in,j‖·‖w_out,j‖`` (the
  norms of what flows into channel ``j`` and out of it), where HeteroFL keeps
  the first ``⌈p·c⌉`` and FedRolex a rolling window;
* :class:`FIARSERank` (``strategy=fiarse_rank``), on ranks: every LoD layer
  keeps the ``r`` components of largest ``‖u_i‖·‖v_i‖``, where FedLoD keeps the
  first ``r``. Against FedLoD this is the "importance vs order" ablation.

A tier deploys the same choice from the final global model.

Deviations from the official code (``fiarse/model/model_utils.py``,
``fiarse/server.py``): it masks single elements by a global top-k of ``|θ|``
(a mask no dense kernel skips), and trains through the threshold with a
surrogate gradient ``2τ/(|θ|+τ)²``; here whole channels or rank components are
kept, fixed for the round, and trained by plain SGD (as HeteroFL's and
FedRolex's clients), so only the choice of what a client holds differs
between these baselines. Channels are grouped into hidden layers from the
state dict's order (a layer's weight, then its bias and norm), which holds
for feed-forward models (``mlp``, ``cnn``, ``cnn1d``, ``lenet5``, ``vgg19``);
a model with skip connections (``resnet18``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from ..aggregation import aggregate_fiarse
from ..budget import Cost
from ..convert import Ranks, truncate
from ..submodels import (
    Arrays,
    DimIndex,
    Index,
    RankPrefix,
    SubModelFamily,
    WidthCorner,
    component_importance,
    layer_of,
    load_arrays,
    state_shapes,
    take,
)
from .base import Assignment, Update
from .fedlod import FedLoD
from .fedrolex import UNIT_WIDTH
from .heterofl_fjord import WidthMethod


def top_components(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the ``keep`` largest scores, in increasing order (ties to the earlier position)."""
    order = np.argsort(-scores, kind="stable")[:keep]
    return np.sort(order)


class RankImportance(RankPrefix):
    """Per LoD layer, the ``r`` rank components of largest ``‖u_i‖·‖v_i‖`` in the current global model."""

    def importance_index(self, cost: Cost, arrays: Mapping[str, np.ndarray]) -> Index:
        out: Index = {}
        for name, shape in self._shapes.items():
            idx: list[DimIndex] = [slice(None)] * len(shape)
            axis, layer = self._axes.get(name), layer_of(name)
            if axis is not None and layer in cost.ranks:
                scores = component_importance(arrays[f"{layer}.out_network.weight"],
                                              arrays[f"{layer}.in_network.weight"])
                idx[axis] = top_components(scores, cost.ranks[layer])
            out[name] = tuple(idx)
        return out

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        arrays = {k: v.detach().cpu().numpy() for k, v in global_model.state_dict().items()}
        ranks = dict(cost.ranks)
        return load_arrays(truncate(self.template, ranks), take(arrays, self.importance_index(cost, arrays))), ranks


@dataclass(frozen=True)
class ChannelAxis:
    """One sliced dimension of one array: which hidden layer's channels it runs over, and features per channel."""

    axis: int
    layer: int
    unit: int


class WidthImportance(WidthCorner):
    """Per hidden layer, the ``⌈p·c⌉`` channels of largest ``‖w_in,j‖·‖w_out,j‖`` in the current global model."""

    @cached_property
    def channel_axes(self) -> dict[str, list[ChannelAxis]]:
        """The sliced dimensions of every array, grouped into hidden layers by the state dict's order."""
        full, half, unit = self.shapes(1.0), self.shapes(0.5), state_shapes(self.build(UNIT_WIDTH))
        axes: dict[str, list[ChannelAxis]] = {}
        current, layers = -1, 0
        channels: dict[int, int] = {}  # hidden layer -> its channel count
        for name, shape in full.items():
            sliced = [a for a, (d, f) in enumerate(zip(half[name], shape)) if d != f]
            found: list[ChannelAxis] = []
            for a in sorted(sliced, reverse=True):  # the input axis (1) belongs to the layer before this one
                if a == 0 and len(shape) >= 2:
                    current, layers = layers, layers + 1
                if current < 0 or a > 1:
                    raise ValueError(f"strategy 'fiarse' needs a feed-forward model: {name} dimension {a} is "
                                     "sliced with no hidden layer before it")
                found.append(ChannelAxis(a, current, unit[name][a]))
                count = shape[a] // unit[name][a]
                if channels.setdefault(current, count) != count or shape[a] % unit[name][a]:
                    raise ValueError(f"strategy 'fiarse' needs a feed-forward model (layers in data-flow order): "
                                     f"{name} dimension {a} has {shape[a]} features, not whole channels of hidden "
                                     f"layer {current} ({channels[current]} channels)")
            if found:
                axes[name] = found
        return axes

    def importance_index(self, cost: Cost, arrays: Mapping[str, np.ndarray]) -> Index:
        into: dict[int, np.ndarray] = {}
        out_of: dict[int, np.ndarray] = {}
        for name, found in self.channel_axes.items():
            value = np.asarray(arrays[name], dtype=np.float64)
            for ax in found:
                squares = np.moveaxis(value, ax.axis, 0).reshape(value.shape[ax.axis] // ax.unit, -1) ** 2
                target = into if ax.axis == 0 else out_of
                target[ax.layer] = target.get(ax.layer, 0.0) + squares.sum(1)
        kept: dict[int, np.ndarray] = {}
        small = self.shapes(cost.fraction)
        out: Index = {name: tuple(slice(None) for _ in shape) for name, shape in small.items()}
        for name, found in self.channel_axes.items():
            idx = list(out[name])
            for ax in found:
                if ax.layer not in kept:
                    scores = np.sqrt(into[ax.layer]) * np.sqrt(out_of.get(ax.layer, 1.0))  # no outgoing: inflow only
                    kept[ax.layer] = top_components(scores, small[name][ax.axis] // ax.unit)
                chans = kept[ax.layer]
                idx[ax.axis] = (chans[:, None] * ax.unit + np.arange(ax.unit)).ravel()
            out[name] = tuple(idx)
        return out

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        arrays = {k: v.detach().cpu().numpy() for k, v in global_model.state_dict().items()}
        return load_arrays(self.build(cost.fraction), take(arrays, self.importance_index(cost, arrays))), None


class ImportanceChoice:
    """FIARSE's two halves on any family with ``importance_index``: the choice from the round's global model,
    and the server rule (mixed into a method)."""

    family: SubModelFamily
    template: nn.Module

    def index(self, cost: Cost, server_round: int, current: Mapping[str, np.ndarray] | None = None) -> Index:
        return self.family.importance_index(cost, current if current else self._initial)  # type: ignore[attr-defined]  # family is an importance family

    @cached_property
    def _initial(self) -> Arrays:
        """The initial global model's arrays: what the first round chooses from."""
        return {k: v.detach().numpy() for k, v in self.template.state_dict().items()}

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_fiarse(current, [(u.arrays, u.task.index) for u in updates])


class FIARSE(ImportanceChoice, WidthMethod):
    """Importance-chosen channels per hidden layer, plain SGD, each element moved by its changers' mean update."""

    name = "fiarse"

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        family = WidthImportance(self.build(1.0), self.inputs, self.build)
        family.channel_axes  # noqa: B018 - refuse a model with skip connections before anything runs
        return family

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        return Assignment(cost.fraction)


class FIARSERank(ImportanceChoice, FedLoD):
    """FIARSE's choice on the ranks of an LoD model: the most important components, not the first ones."""

    name = "fiarse_rank"
    rank_allocation = "uniform"  # the paper's rule: one rank fraction for every layer (and the comparison's control)

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        prefix = super().make_family(generator)
        return RankImportance(prefix.template, self.inputs)

    @property
    def sampler(self) -> str:
        return "none"  # a client trains every component it holds, as FIARSE's clients train their sub-model

    @property
    def passes(self) -> int:
        return 1
