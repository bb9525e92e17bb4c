"""FedRolex (Alam et al., NeurIPS 2022, arXiv 2212.01548): rolling sub-model extraction, on widths and on ranks.

Each round, a client at width fraction ``β`` trains a contiguous window of
``⌈β·c⌉`` channels of every hidden layer of ``c`` channels, starting at
channel ``(t - 1) mod c`` in round ``t`` and wrapping around, so over ``c``
rounds every channel is trained equally often, where HeteroFL's fixed corner
trains the first channels most. Each element is averaged over the clients
whose window covered it, uncovered elements keep their value
(:func:`~maestro_fl.aggregation.aggregate_fedrolex`). Clients train their
window with plain SGD; tiers deploy the leading corner, as HeteroFL's.

Deviations from the official code (``resnet_server.py::split_model``): it
rolls the window the other way (``torch.roll`` by ``+round``, so the window
starts at ``-round mod c``); the direction does not change the rule. A
dimension that flattens ``c`` channels of ``s`` features each (a conv
feeding a Linear, which the official ResNet does not have) moves by whole
channels.

:class:`FedRolexRank` applies the same rule to the rank components of an
LoD model: a window of ``r`` of a layer's ``R`` components rolls instead of
FedLoD's prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch

from ..aggregation import aggregate_fedrolex
from ..budget import Cost
from ..submodels import Arrays, DimIndex, Index, RankPrefix, SubModelFamily, WidthCorner, rolling, state_shapes
from .base import Assignment, Update
from .fedlod import FedLoD
from .heterofl_fjord import WidthMethod

#: width fraction at which every hidden layer keeps exactly one channel (``scaled`` gives max(1, ⌈p·c⌉))
UNIT_WIDTH = 1e-9


class WidthWindow(WidthCorner):
    """``⌈p·c⌉`` consecutive channels of every hidden layer from a rolling start, wrapping around.

    The same window serves a layer's outputs and the next layer's inputs (both
    have ``c`` channels), so the sub-network stays connected. A dimension of
    ``c`` channels of ``s`` features each moves by whole channels; ``s`` is
    read from the model at :data:`UNIT_WIDTH`, where every hidden layer keeps one channel.
    """

    @cached_property
    def _units(self) -> dict[str, tuple[int, ...]]:
        return state_shapes(self.build(UNIT_WIDTH))

    def index(self, cost: Cost, server_round: int) -> Index:
        full = self.shapes(1.0)
        out: Index = {}
        for name, shape in self.shapes(cost.fraction).items():
            idx: list[DimIndex] = []
            for axis, (d, size) in enumerate(zip(shape, full[name])):
                if d == size:
                    idx.append(slice(None))
                    continue
                unit = self._units[name][axis]
                if size % unit or d % unit:
                    raise ValueError(f"{name}: dimension {axis} of {size} is not whole channels of {unit} features")
                channels = size // unit
                idx.append(rolling(((server_round - 1) % channels) * unit, d, size))
            out[name] = tuple(idx)
        return out


class FedRolex(WidthMethod):
    """Rolling width windows, plain SGD on each, count-averaging over the windows that covered an element."""

    name = "fedrolex"

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        return WidthWindow(self.build(1.0), self.inputs, self.build)

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        return Assignment(cost.fraction)

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_fedrolex(current, [(u.arrays, u.task.index) for u in updates])


class RankWindow(RankPrefix):
    """``r`` consecutive rank components from a rolling start, wrapping around (FedRolex on ranks).

    In round ``t`` a client of rank ``r`` holds components ``(t - 1 + j) mod R``,
    ``j = 0..r-1``, of a layer with ``R`` components: over ``R`` rounds every
    component is trained equally often, where a prefix trains the first ones
    most. The client's module is the plain rank-``r`` LoD layer; tiers deploy the prefix.
    """

    def components(self, rank: int, max_rank: int, server_round: int) -> DimIndex:
        return rolling(server_round - 1, rank, max_rank)


class FedRolexRank(FedLoD):
    """FedRolex's rule on the ranks of an LoD model: an evenly covered window against FedLoD's ordered prefix.

    Clients train every component of their window (no ordered dropout); the
    server count-averages each component over the windows that covered it.
    It tests FedLoD's premise: whether ordering (prefixes trained most) beats
    even coverage when tiers deploy prefixes.
    """

    name = "fedrolex_rank"
    rank_allocation = "uniform"  # the paper's rule: one rank fraction for every layer (and the comparison's control)

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        prefix = super().make_family(generator)
        return RankWindow(prefix.template, self.inputs)

    @property
    def sampler(self) -> str:
        return "none"

    @property
    def passes(self) -> int:
        return 1

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_fedrolex(current, [(u.arrays, u.task.index) for u in updates])
