"""FLANC (Mei et al., NeurIPS 2022, "Resource-adaptive federated learning with all-in-one neural composition").

Every composed layer's weight at width ``p`` is a product: its width's
**coefficients** ``C_p`` (``⌈p·c_out⌉ × m``, a 1×1 convolution or a Linear)
applied after a **basis** of ``m`` filters ``B`` shared by every width. One
global basis per layer is trained by every client; every width keeps its own
coefficients, dense first layer, norms and classifier (its "anchor").

* **Sub-model family** (:class:`ComposedWidths`): the global model holds the
  bases and one anchor per width of the budget grid; a client at width ``p``
  holds the bases' slices over its input channels and width ``p``'s anchor.
* **Client trainer**: SGD on that model, plus FLANC's orthogonality penalty
  ``λ·mean((B Bᵀ - I)²)`` on each basis slice it holds (``method.orthogonality``).
* **Server rule** (:func:`~maestro_fl.aggregation.aggregate_flanc`): each basis
  element is averaged over every client that holds it, every anchor over the
  clients of its width, unweighted, as the official ``sync``; an anchor no
  client trained this round keeps its value.
* **Cost model**: the client's composed model at ``p``, measured by the one
  footprint (basis slice + anchor), so bytes are what the client holds.

Deviations from the official code (``src/model/cnn_flanc.py``,
``src/trainer_FL.py``): there, a basis spans a fixed group of ``basis_size``
input channels and is applied to every group of a layer's input (a grouped
convolution), so it has the same shape at every width. Here a basis spans
the layer's input channels, and a narrower client holds it over its first
``⌈p·c_in⌉`` channels (HeteroFL's corner on the basis's input axis); that
works for any convolution or Linear without a grouping that divides every
width. The official code keeps one model per width in a short list (widths
0.25, 0.5, 0.75, 1); here the widths are the budget grid's
(:data:`~maestro_fl.budget.FRACTION_GRID`), so FLANC's tiers get the same
choice of sizes as every other method's. ``m`` is ``method.basis`` of the
full layer's output channels (the official ``n_basis``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..aggregation import aggregate_flanc
from ..budget import FRACTION_GRID, Cost
from ..config import check_fraction, check_non_negative
from ..convert import Ranks
from ..data import Split
from ..footprint import Footprint, Inputs, footprint
from ..submodels import (
    Arrays,
    Index,
    ModelAtWidth,
    SubModelFamily,
    corner_index,
    load_arrays,
    state_shapes,
    take,
    width_cost_table,
)
from ..training import WholeModel
from .base import LOD_ONLY_FIELDS, Assignment, FederatedMethod, LocalResult, LocalTraining, Update

COMPOSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Composition(nn.Module):
    """A Linear or convolution computed as its coefficients after a basis of ``rank`` filters held by the owner.

    The basis is not this module's parameter: :class:`ComposedWidths` owns one
    per layer, shared by every width, and hands it over before each forward.
    """

    def __init__(self, layer: nn.Module, key: str, rank: int) -> None:
        super().__init__()
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups != 1:
            raise ValueError(f"strategy 'flanc' composes ungrouped layers only; {key} has groups={layer.groups}")
        self.key, self.rank = key, rank
        self.kind = type(layer)
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            self.coefficients: nn.Module = nn.Linear(rank, layer.out_features, bias=bias)
            self.options: dict[str, Any] = {}  # the convolution's stride, padding and dilation
        else:
            self.coefficients = type(layer)(rank, layer.out_channels, 1, bias=bias)
            self.options = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
        self.inner = nn.Identity()  # the rank-m map: a leaf, so activation counts see it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = self.__dict__["basis"]
        if self.kind is nn.Linear:
            h = F.linear(x, basis)
        elif self.kind is nn.Conv1d:
            h = F.conv1d(x, basis, None, **self.options)
        else:
            h = F.conv2d(x, basis, None, **self.options)
        return self.coefficients(self.inner(h))


def width_key(p: float) -> str:
    return f"w{round(p * 100):03d}"


def composable_layers(model: nn.Module, keep_first: int, keep_classifier: bool) -> list[str]:
    """The Linear and convolution layers FLANC composes: all but the first ``keep_first`` and, if kept, the last Linear."""
    names = [n for n, m in model.named_modules() if isinstance(m, COMPOSABLE)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = set(names[:keep_first]) | ({linears[-1]} if keep_classifier and linears else set())
    return [n for n in names if n not in kept]


class ComposedWidths(nn.Module):
    """Shared bases and one anchor model per width; runs its widest anchor (a client's model holds one).

    Parameters
    ----------
    build : callable
        ``build(p)``: the dense model at width ``p``.
    widths : sequence of float
        The widths whose anchors this module holds.
    layers : sequence of str
        The composed layers (names in ``build(p)``).
    ranks : mapping
        Basis size ``m`` per composed layer.
    basis_width : float
        The width whose input channels the bases span (1.0 for the server's model).
    """

    def __init__(self, build: ModelAtWidth, widths: Sequence[float], layers: Sequence[str],
                 ranks: Mapping[str, int], basis_width: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.basis = nn.ParameterDict()
        self.widths = nn.ModuleDict()
        reference = build(basis_width)
        modules = dict(reference.named_modules())
        for name in layers:
            layer = modules[name]
            fan_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            shape = (ranks[name], fan_in, *getattr(layer, "kernel_size", ()))
            weight = torch.empty(shape)
            nn.init.orthogonal_(weight.view(shape[0], -1), generator=generator)  # FLANC's orthogonal bases
            self.basis[name.replace(".", "_")] = nn.Parameter(weight)
        for p in sorted(widths, reverse=True):
            model = build(p)
            for name in layers:
                parent, _, attr = name.rpartition(".")
                holder = model.get_submodule(parent) if parent else model
                setattr(holder, attr, Composition(getattr(holder, attr), name.replace(".", "_"), ranks[name]))
            self.widths[width_key(p)] = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = next(iter(self.widths.values()))  # the widest
        for module in model.modules():
            if isinstance(module, Composition):
                module.__dict__["basis"] = self.basis[module.key]  # not registered: the owner holds it
        return model(x)


class ComposedFamily(SubModelFamily):
    """FLANC's sub-models: the bases over a client's input channels plus its width's anchor."""

    def __init__(self, build: ModelAtWidth, inputs: Inputs, layers: Sequence[str], ranks: Mapping[str, int],
                 generator: torch.Generator) -> None:
        self.build, self.layers, self.ranks = build, tuple(layers), dict(ranks)
        template = ComposedWidths(build, FRACTION_GRID, layers, ranks, 1.0, generator)
        super().__init__(template, inputs)

    @cached_property
    def reference(self) -> Footprint:
        """The full dense model's footprint (the template holds every width's anchor)."""
        return footprint(self.build(1.0), self.inputs)

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        if "_table" not in self.__dict__:
            self.__dict__["_table"] = width_cost_table(lambda p: self.client_model(p, {}), self.inputs)
        return self.__dict__["_table"]

    def served_by(self, cost: Cost) -> tuple[str, float]:
        return "width", cost.fraction  # every width composes from the shared bases, the full one included

    def client_model(self, fraction: float, ranks: Mapping[str, int]) -> nn.Module:
        return ComposedWidths(self.build, (fraction,), self.layers, self.ranks, fraction)

    def index(self, cost: Cost, server_round: int) -> Index:
        return corner_index(self._shapes(cost.fraction))

    def _shapes(self, p: float) -> dict[str, tuple[int, ...]]:
        cache = self.__dict__.setdefault("_shape_cache", {})
        if p not in cache:
            cache[p] = state_shapes(self.client_model(p, {}))
        return cache[p]

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        arrays = {k: v.detach().cpu().numpy() for k, v in global_model.state_dict().items()}
        return load_arrays(self.client_model(cost.fraction, {}), take(arrays, self.index(cost, 0))), None

    def global_model(self, arrays: Mapping[str, np.ndarray]) -> nn.Module:
        return load_arrays(copy.deepcopy(self.template), arrays)


def orthogonality(model: nn.Module) -> torch.Tensor:
    """FLANC's basis penalty: ``mean((B Bᵀ - I)²)`` summed over the bases (rows: flattened filters)."""
    total = torch.zeros(())
    bases = model.basis
    assert isinstance(bases, nn.ParameterDict), "orthogonality takes a ComposedWidths model"
    for basis in bases.values():
        flat = basis.reshape(basis.shape[0], -1)
        gram = flat @ flat.T
        total = total + F.mse_loss(gram, torch.eye(len(gram), device=gram.device))
    return total


@dataclass(frozen=True)
class FLANCParams:
    """FLANC's options (``method.basis=0.5``)."""

    basis: float = 0.25  # basis filters per composed layer, as a share of its output channels (the official
    # n_basis for its CNN and ResNet-18 runs)
    orthogonality: float = 10.0  # the orthogonality penalty on the bases (the official lambdaR)

    def validate(self) -> None:
        check_fraction("method.basis", self.basis)
        check_non_negative("method.orthogonality", self.orthogonality)


class FLANC(FederatedMethod):
    """Shared bases averaged over all clients, per-width coefficients averaged within each width."""

    name = "flanc"
    Params = FLANCParams
    unread_fields = LOD_ONLY_FIELDS

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        full = self.build(1.0)
        layers = composable_layers(full, self.cfg.keep_first, self.cfg.keep_classifier)
        if not layers:
            raise ValueError("strategy 'flanc' found no Linear or convolution to compose "
                             "(lower keep_first or set keep_classifier=false)")
        modules = dict(full.named_modules())
        ranks = {}
        for name in layers:
            layer = modules[name]
            out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            ranks[name] = max(1, math.ceil(self.params.basis * out))
        return ComposedFamily(self.build, self.inputs, layers, ranks, generator)

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        return Assignment(cost.fraction)

    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        lam = self.params.orthogonality
        stats = self.epochs(model, data, WholeModel(model), self.sgd(model, local.lr), local,
                            regularizer=(lambda: lam * orthogonality(model)) if lam > 0 else None)
        return LocalResult(model, stats)

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_flanc(current, [u.arrays for u in updates])
