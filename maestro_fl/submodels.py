"""Sub-model families: what a client at a budget holds of the global model, and what a tier deploys.

A federated method's clients hold *parts* of the server's model. Every part
is described the same way, by an :data:`Index`: for each array of the global
state dict, one index per dimension (a ``slice`` or an integer array), so
the client's array is ``global[index]``. The server cuts sub-models out with
:func:`take` and merges them back with
:func:`maestro_fl.aggregation.aggregate_indexed`, whatever the family:

* :class:`RankPrefix`: the first ``r`` rank components of every LoD layer
  (FedLoD, FedHM, DLRT clients; Maestro, arXiv 2308.14929);
* :class:`WidthCorner`: the first ``⌈p·c⌉`` channels of every hidden layer
  (HeteroFL, FjORD);
* :class:`Dense`: the whole model (FedAvg).

Each family also measures what its sub-models cost (:meth:`SubModelFamily.cost_table`),
builds the module a client trains (:meth:`SubModelFamily.client_model`) and the
one a tier deploys (:meth:`SubModelFamily.deploy`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from .budget import FRACTION_GRID, Cost, activation_count
from .convert import Ranks, model_ranks, ranks_at, truncate
from .footprint import Footprint, Inputs, footprint
from .layers import ceil_rank

Arrays = dict[str, np.ndarray]
DimIndex = slice | np.ndarray
#: per array name, one index per dimension: the client's array is ``global[index]``
Index = dict[str, tuple[DimIndex, ...]]
ModelAtWidth = Callable[[float], nn.Module]

# -- indices -----------------------------------------------------------------------------------
def numpy_index(index: Sequence[DimIndex], shape: Sequence[int]) -> tuple[Any, ...]:
    """A NumPy index for ``index`` into an array of ``shape``: basic slicing when every dimension is a slice, else ``np.ix_``."""
    if all(isinstance(i, slice) for i in index):
        return tuple(index)
    return np.ix_(*[np.arange(*i.indices(n)) if isinstance(i, slice) else i for i, n in zip(index, shape)])


def index_shape(index: Sequence[DimIndex], full: Sequence[int]) -> tuple[int, ...]:
    """The shape of ``global[index]`` for a global array of shape ``full``."""
    return tuple(len(range(*i.indices(f))) if isinstance(i, slice) else len(i) for i, f in zip(index, full))


def take(arrays: Mapping[str, np.ndarray], index: Index) -> Arrays:
    """The sub-model ``index`` cut out of the global ``arrays`` (copies only where indices are not slices)."""
    return {name: arrays[name][numpy_index(idx, arrays[name].shape)] for name, idx in index.items()}


def corner_index(shapes: Mapping[str, Sequence[int]]) -> Index:
    """Leading corners ``[:d0, :d1, ...]`` of the given shapes."""
    return {name: tuple(slice(0, int(d)) for d in shape) for name, shape in shapes.items()}


def rolling(start: int, length: int, size: int) -> DimIndex:
    """``length`` consecutive positions of ``size`` from ``start``, wrapping around (a slice when it does not wrap)."""
    start %= size
    if start + length <= size:
        return slice(start, start + length)
    return (start + np.arange(length)) % size


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape of every entry of the model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def rank_axes(names: Sequence[str]) -> dict[str, int]:
    """The rank axis of every LoD factor (``in_network.weight``: 0, ``out_network.weight``: 1)."""
    axes = {}
    for name in names:
        if name.endswith("in_network.weight"):
            axes[name] = 0
        elif name.endswith("out_network.weight"):
            axes[name] = 1
    return axes


def layer_of(param_name: str) -> str:
    """``'features.3.in_network.weight'`` → ``'features.3'``."""
    return param_name.rsplit(".", 2)[0]


def ranks_of(arrays: Mapping[str, np.ndarray]) -> Ranks:
    """Per LoD layer, the rank its factors hold (the length of the rank axis)."""
    return {layer_of(n): int(arrays[n].shape[0]) for n in arrays if n.endswith("in_network.weight")}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load NumPy arrays into ``model`` (strict: every entry of its state dict)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()})
    return model


# -- cost tables -------------------------------------------------------------------------------
def rank_cost_table(
    model: nn.Module, inputs: Inputs, fractions: Sequence[float] = FRACTION_GRID, allocation: str = "uniform"
) -> list[Cost]:
    """Training cost of the LoD model at each rank fraction (largest first): factors as trained."""
    table = []
    for p in sorted(set(fractions), reverse=True):
        ranks = ranks_at(model, p, allocation)
        fp = footprint(model, inputs, ranks, as_deployed=False)
        table.append(Cost(p, ranks, fp.params, fp.macs, activation_count(model, inputs, ranks)))
    return table


def component_importance(u: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``‖u_i‖·‖v_i‖`` of every rank component (``u``: ``out_network.weight``, rank on axis 1; ``vt``: rank on axis 0)."""
    v = np.sqrt((vt.reshape(vt.shape[0], -1).astype(np.float64) ** 2).sum(1))
    uu = np.sqrt((np.moveaxis(u, 1, 0).reshape(u.shape[1], -1).astype(np.float64) ** 2).sum(1))
    return uu * v


def importance_ranks(arrays: Mapping[str, np.ndarray], unit_cost: Mapping[str, float],
                     fractions: Sequence[float] = FRACTION_GRID) -> dict[float, Ranks]:
    """Per-layer ranks for each budget, chosen by importance per unit of cost (Maestro's layer granularity).

    Maestro (Horváth et al., ICML 2024, arXiv 2308.14929) selects ranks layer by
    layer; a uniform fraction ``p`` gives every layer ``⌈p·r_i⌉``. Here the
    budget of fraction ``p`` is what that uniform choice costs (``unit_cost``
    per component of each layer: its share of the model's parameters plus its
    share of the MACs, so neither memory nor compute is overspent), spent
    instead on the components of highest importance ``‖U[:, j]‖·‖V[j]‖`` (of the
    current global factors) per unit of cost. No layer goes below half its
    uniform rank: a near-empty layer cuts the whole network's signal, which a
    component's own importance cannot see. Components are added in one greedy
    order, each layer's in rank order (the ordered factors' prefixes), so a
    larger budget's ranks contain every smaller one's: the ordered rule and the
    tiers sampler need no change.
    """
    import heapq

    layers = sorted(unit_cost)  # a layer registered under two names (tied weights) is costed under its first
    value = {n: component_importance(arrays[f"{n}.out_network.weight"], arrays[f"{n}.in_network.weight"])
             / unit_cost[n] for n in layers}
    out: dict[float, Ranks] = {}
    for p in sorted(fractions):
        uniform = {n: ceil_rank(p, len(value[n])) for n in layers}
        chosen = {n: max(1, ceil_rank(p / 2, len(value[n]))) for n in layers}
        if out:  # nested: never below a smaller budget's ranks
            smaller = out[max(out)]
            chosen = {n: max(chosen[n], smaller[n]) for n in layers}
        budget = sum(uniform[n] * unit_cost[n] for n in layers)
        spent = sum(chosen[n] * unit_cost[n] for n in layers)
        heap = [(-float(value[n][chosen[n]]), n) for n in layers if chosen[n] < len(value[n])]
        heapq.heapify(heap)
        while heap:
            _, n = heapq.heappop(heap)
            if spent + unit_cost[n] > budget + 1e-12:
                continue  # this layer's next component does not fit; a cheaper layer's may
            chosen[n] += 1
            spent += unit_cost[n]
            if chosen[n] < len(value[n]):
                heapq.heappush(heap, (-float(value[n][chosen[n]]), n))
        out[p] = chosen
    return out


def component_unit_costs(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """Per LoD layer, one rank component's share of the full model's factor parameters plus its share of the MACs."""
    full_ranks = model_ranks(model)
    full = footprint(model, inputs, full_ranks, as_deployed=False)
    out = {}
    for name, r in full_ranks.items():
        if r < 2:
            out[name] = float("inf")
            continue
        fewer = footprint(model, inputs, {**full_ranks, name: r - 1}, as_deployed=False)
        out[name] = (full.params - fewer.params) / full.params + (full.macs - fewer.macs) / full.macs
    return out


def width_cost_table(
    build: ModelAtWidth, inputs: Inputs, fractions: Sequence[float] = FRACTION_GRID
) -> list[Cost]:
    """Training cost of the width-sliced model at each width fraction (largest first).

    ``build(p)`` is measured by the same :func:`~maestro_fl.footprint.footprint`
    and :func:`~maestro_fl.budget.activation_count` as the LoD model, so a
    tier's costs compare across methods. ``ranks`` is empty.
    """
    table = []
    for p in sorted(set(fractions), reverse=True):
        model = build(p)
        fp = footprint(model, inputs)
        table.append(Cost(p, {}, fp.params, fp.macs, activation_count(model, inputs)))
    return table


# -- families ----------------------------------------------------------------------------------
class SubModelFamily(ABC):
    """What a client at a budget holds of the global model.

    Parameters
    ----------
    template : nn.Module
        The server's model at full size (full rank or full width); fixes names and shapes.
    inputs : InputSpec or tuple
        One input sample's spec or shape (for footprints and the activation count of the budget).
    """

    def __init__(self, template: nn.Module, inputs: Inputs) -> None:
        self.template = template
        self.inputs = inputs

    @abstractmethod
    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        """Training cost of the sub-model at every fraction a budget can pick (largest first)."""

    @abstractmethod
    def index(self, cost: Cost, server_round: int) -> Index:
        """Which part of every global array a client at ``cost`` holds in ``server_round``."""

    @abstractmethod
    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        """A module with the sub-model's shapes (weights to be loaded), built on the client."""

    @abstractmethod
    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        """What a tier at ``cost`` runs of the global model, and the ranks to run it at."""

    def served_by(self, cost: Cost) -> tuple[str, float]:
        """How the sub-model at ``cost`` is cut from the global model, and its hidden width:
        ``"rank"`` (a rank prefix, full width), ``"width"`` (hidden channels), ``"width floor"`` (a rank
        prefix of a narrower model) or ``"full"`` (the whole model)."""
        return "full", 1.0

    def global_model(self, arrays: Mapping[str, np.ndarray]) -> nn.Module:
        """The server's model holding ``arrays`` (its LoD layers at the ranks the arrays hold)."""
        ranks = ranks_of(arrays)
        model = truncate(self.template, ranks) if ranks else copy.deepcopy(self.template)
        return load_arrays(model, arrays)

    @cached_property
    def reference(self) -> Footprint:
        """The full dense model's footprint: the denominator of every method's ratios."""
        return footprint(self.template, self.inputs)


class RankPrefix(SubModelFamily):
    """The first ``⌈p·r_i⌉`` rank components of every LoD layer, plus every dense parameter.

    With ``allocation="importance"`` a budget's ranks are chosen per layer from the current global
    factors instead (:func:`importance_ranks`), re-chosen whenever the server asks with new arrays.
    """

    def __init__(self, template: nn.Module, inputs: Inputs, allocation: str = "uniform") -> None:
        super().__init__(template, inputs)
        self.allocation = allocation

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        ranks = ranks_of(global_arrays) if global_arrays is not None else model_ranks(self.template)
        cache = self.__dict__.setdefault("_tables", {})
        if self.allocation == "importance":
            if global_arrays is None:  # before the first round (maestro-fl plan, a client): the initial model's
                global_arrays = {k: v.detach().cpu().numpy() for k, v in self.template.state_dict().items()}
            if "_unit_costs" not in self.__dict__:
                self.__dict__["_unit_costs"] = component_unit_costs(truncate(self.template, ranks), self.inputs)
            chosen = importance_ranks(global_arrays, self.__dict__["_unit_costs"])
            key = tuple(tuple(sorted(r.items())) for r in chosen.values())
            if key not in cache:
                model = truncate(self.template, ranks)
                cache[key] = [self._cost(model, p, chosen[p]) for p in sorted(chosen, reverse=True)]
            return cache[key]
        key = (tuple(sorted(ranks.items())),)
        if key not in cache:
            cache[key] = rank_cost_table(truncate(self.template, ranks), self.inputs, allocation=self.allocation)
        return cache[key]

    def cost_of(self, fraction: float, ranks: Ranks) -> Cost:
        """The training cost of the rank prefix ``ranks`` (any per-layer ranks of the full-rank template)."""
        return self._cost(self.template, fraction, ranks)

    def _cost(self, model: nn.Module, fraction: float, ranks: Ranks) -> Cost:
        """One sub-model's training cost, measured once per distinct ranks."""
        costs = self.__dict__.setdefault("_costs", {})
        key = tuple(sorted(ranks.items()))
        if key not in costs:
            fp = footprint(model, self.inputs, ranks, as_deployed=False)
            costs[key] = (fp.params, fp.macs, activation_count(model, self.inputs, ranks))
        params, macs, activations = costs[key]
        return Cost(fraction, dict(ranks), params, macs, activations)

    def index(self, cost: Cost, server_round: int) -> Index:
        out: Index = {}
        for name, shape in self._shapes.items():
            idx: list[DimIndex] = [slice(None)] * len(shape)
            axis, layer = self._axes.get(name), layer_of(name)
            if axis is not None and layer in cost.ranks:
                idx[axis] = self.components(cost.ranks[layer], shape[axis], server_round)
            out[name] = tuple(idx)
        return out

    def components(self, rank: int, max_rank: int, server_round: int) -> DimIndex:
        """The components a client of rank ``rank`` holds of a layer with ``max_rank``: the prefix."""
        return slice(0, rank)

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return state_shapes(self.template)

    @cached_property
    def _axes(self) -> dict[str, int]:
        return rank_axes(list(self._shapes))

    def served_by(self, cost: Cost) -> tuple[str, float]:
        return "rank", 1.0

    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        return truncate(self.template, ranks)

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        return global_model, dict(cost.ranks)


class RankWidthPrefix(RankPrefix):
    """Rank prefixes, and below the smallest one, rank prefixes of a narrower model: corners of the ordered factors.

    A rank prefix cuts parameters and MACs but not the feature maps: every
    layer still outputs all its channels, and a dense first layer keeps its
    full cost. A device that cannot train even the smallest prefix (the
    activation memory of full-width maps, or a dense input layer's MACs) gets
    the smallest rank fraction ``f_min`` of the LoD model at a hidden width
    ``w < 1``: the first ``⌈w·c⌉`` channels of every hidden layer, so its
    factors are leading corners of the global ones (``U[:⌈w·m⌉, :r]``,
    ``Vᵀ[:r, :⌈w·n⌉]``) and merge back by the same per-element averaging.
    Such an entry's ``fraction`` is ``f_min·w`` (below every rank-only entry).
    Its ranks are ``rank_fraction`` of the narrower layers' (a narrow model at
    the floor's rank fraction keeps only a few components per layer); only
    entries cheaper than the smallest rank prefix in parameters, MACs and
    activations are kept, so the ladder stays ordered by cost.

    Parameters
    ----------
    rank_fraction : float
        The rank fraction of the narrower sub-models (``width_floor_rank``).
    at_width : callable
        ``at_width(w)``: the LoD model at hidden width ``w`` (shapes only; it
        must factorize the same layers as the template, or the ladder stops
        at the width where it does not; a model that cannot be built
        narrower, such as a user's without a ``width`` argument, keeps rank
        prefixes only).
    """

    def __init__(self, template: nn.Module, inputs: Inputs, at_width: Callable[[float], nn.Module],
                 rank_fraction: float = 0.25, allocation: str = "uniform") -> None:
        super().__init__(template, inputs, allocation)
        self.at_width, self.rank_fraction = at_width, rank_fraction
        self._narrow: dict[float, tuple[float, nn.Module]] = {}  # fraction -> (width, LoD model at that width)

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        table = super().cost_table(global_arrays)
        cache = self.__dict__.setdefault("_full_tables", {})
        if id(table) not in cache:
            # the narrow entries follow the smallest prefix of a ladder a client rebuilds without the global
            # arrays (importance ranks need them; the other rules do not): server and client then agree on
            # every narrow sub-model
            rebuilt = RankPrefix.cost_table(self, None) if self.allocation == "importance" else table
            narrow = self._narrow_costs(min(rebuilt, key=lambda c: c.fraction))
            smallest = min(table, key=lambda c: c.fraction)
            cache[id(table)] = table + [c for c in narrow if c.params < smallest.params and c.macs < smallest.macs]
        return cache[id(table)]

    def _narrow_costs(self, smallest: Cost) -> list[Cost]:
        floor = smallest.fraction
        names = set(self._shapes)
        costs = []
        for w in sorted(FRACTION_GRID, reverse=True):
            if w >= 1.0:
                continue
            try:
                model = self.at_width(w)
            except (ValueError, TypeError):  # a model that takes no width (a user's): rank prefixes only
                break
            shapes = state_shapes(model)
            if set(shapes) != names:  # a layer too narrow to factorize: the ladder ends here
                break
            if shapes == self._shapes:  # no narrower than the full model at this width (or it ignores width)
                continue
            ranks = ranks_at(model, self.rank_fraction, self.allocation)
            fp = footprint(model, self.inputs, ranks, as_deployed=False)
            cost = Cost(round(floor * w, 6), ranks, fp.params, fp.macs, activation_count(model, self.inputs, ranks))
            if cost.params >= smallest.params or cost.macs >= smallest.macs or cost.activations > smallest.activations:
                continue  # not cheaper than the smallest rank prefix: whoever affords this affords that
            self._narrow[cost.fraction] = (w, model)
            costs.append(cost)
        return costs

    def served_by(self, cost: Cost) -> tuple[str, float]:
        width = self.width_of(cost.fraction)
        return ("width floor", width) if width < 1.0 else ("rank", 1.0)

    def width_of(self, fraction: float) -> float:
        """The hidden width of the sub-model at ``fraction`` (1.0 for a rank-only entry)."""
        if fraction not in self._narrow and fraction < min(FRACTION_GRID):
            self.cost_table()  # a client process builds the ladder on first use
        return self._narrow[fraction][0] if fraction in self._narrow else 1.0

    def index(self, cost: Cost, server_round: int) -> Index:
        if self.width_of(cost.fraction) == 1.0:
            return super().index(cost, server_round)
        return corner_index(state_shapes(self.client_model(cost.fraction, cost.ranks)))

    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        if self.width_of(fraction) == 1.0:
            return super().client_model(fraction, ranks)
        return truncate(self._narrow[fraction][1], ranks)

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        if self.width_of(cost.fraction) == 1.0:
            return super().deploy(global_model, cost)
        model = self.client_model(cost.fraction, cost.ranks)
        full = {k: v.detach().cpu().numpy() for k, v in global_model.state_dict().items()}
        return load_arrays(model, take(full, corner_index(state_shapes(model)))), dict(cost.ranks)


class WidthCorner(SubModelFamily):
    """The first ``⌈p·c⌉`` channels (units) of every hidden layer: HeteroFL's and FjORD's sub-models.

    Parameters
    ----------
    build : callable
        ``build(p)``: the dense model at width ``p``, whose every tensor has the
        shape of a leading corner of the full model's (``build(1.0)`` has the
        template's shapes; see :mod:`maestro_fl.models`).
    """

    def __init__(self, template: nn.Module, inputs: Inputs, build: ModelAtWidth) -> None:
        super().__init__(template, inputs)
        self.build = build
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}
        self._table: list[Cost] | None = None

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        if self._table is None:
            self._table = width_cost_table(self.build, self.inputs)
        return self._table

    def shapes(self, width: float) -> dict[str, tuple[int, ...]]:
        if width not in self._shapes:
            self._shapes[width] = state_shapes(self.build(width))
        return self._shapes[width]

    def index(self, cost: Cost, server_round: int) -> Index:
        return corner_index(self.shapes(cost.fraction))

    def served_by(self, cost: Cost) -> tuple[str, float]:
        return ("width", cost.fraction) if cost.fraction < 1.0 else ("full", 1.0)

    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        return self.build(fraction)

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        sub = self.build(cost.fraction)
        full = {k: v.detach().numpy() for k, v in global_model.state_dict().items()}
        return load_arrays(sub, take(full, corner_index(self.shapes(cost.fraction)))), None

    def global_model(self, arrays: Mapping[str, np.ndarray]) -> nn.Module:
        return load_arrays(copy.deepcopy(self.template), arrays)


class Dense(SubModelFamily):
    """The whole dense model, for every client (FedAvg)."""

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        if "_table" not in self.__dict__:
            fp = footprint(self.template, self.inputs)
            self.__dict__["_table"] = [Cost(1.0, {}, fp.params, fp.macs, activation_count(self.template, self.inputs))]
        return self.__dict__["_table"]

    def index(self, cost: Cost, server_round: int) -> Index:
        return {name: tuple(slice(None) for _ in shape) for name, shape in state_shapes(self.template).items()}

    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        return copy.deepcopy(self.template)

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        return global_model, None
