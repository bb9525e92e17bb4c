"""Baselines on the same engine, devices, partitions and accounting as FedLoD.

Every baseline is a :class:`~strategies.fedlod.FedLoD` that overrides what
differs, and nothing else; the maths live in :mod:`maestro_fl.aggregation`.

* :class:`FedAvgDense` and :class:`FedAvgExclusive` override :meth:`budget`
  (what a device trains). Both train the dense model
  (:mod:`maestro_fl.federated` builds it unfactorized for them), so the
  ordered-factor rule reduces to FedAvg: no parameter has a rank axis.
* :class:`HeteroFL` and :class:`FjORD` train width slices of the dense model
  (:class:`WidthSliced` swaps the sub-model family); they differ in the server
  rule (count-average vs example-weighted) and in FjORD's ordered dropout.
* :class:`FedHM` keeps the dense model as its exact SVD factors, sends each
  client the truncated SVD at its rank and averages the rebuilt dense updates.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from torch import nn

from maestro_fl import protocol as P
from maestro_fl.aggregation import Arrays, aggregate_fedhm, aggregate_fjord, aggregate_heterofl
from maestro_fl.budget import Cost, DeviceCapability, width_cost_table
from maestro_fl.config import SimConfig
from maestro_fl.convert import Ranks
from maestro_fl.federated import Federation, model_at_width
from maestro_fl.width import corner, slice_corners, state_shapes

from .fedlod import FedLoD, Updates


class FedAvgDense(FedLoD):
    """FedAvg with every client on the full dense model, budgets ignored: the upper bound."""

    def budget(self, device: DeviceCapability) -> Cost | None:
        return max(self.cost_table(), key=lambda c: c.fraction)


class FedAvgExclusive(FedLoD):
    """FedAvg over the clients whose device affords the full dense model; the others sit out."""

    def budget(self, device: DeviceCapability) -> Cost | None:
        cost = super().budget(device)
        return cost if cost is not None and cost.fraction == 1.0 else None


class WidthSliced(FedLoD):
    """Clients hold the first ``⌈p·c⌉`` channels of every hidden layer, ``p`` their width budget.

    Parameters
    ----------
    build : callable
        ``build(p)``: the dense model at width ``p`` (``build(1.0)`` has the
        template's shapes). Budgets come from the same device model as
        FedLoD's, measured on these models (:func:`~maestro_fl.budget.width_cost_table`).
    """

    def __init__(
        self, template: nn.Module, input_shape: tuple[int, ...], cfg: SimConfig, *, build: Callable[[float], nn.Module]
    ) -> None:
        super().__init__(template, input_shape, cfg)
        self.build = build
        self._width_costs: list[Cost] | None = None
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}

    def cost_table(self) -> list[Cost]:
        if self._width_costs is None:
            self._width_costs = width_cost_table(self.build, self.input_shape)
        return self._width_costs

    def shapes(self, width: float) -> dict[str, tuple[int, ...]]:
        if width not in self._shapes:
            self._shapes[width] = state_shapes(self.build(width))
        return self._shapes[width]

    def width_levels(self, p_max: float) -> list[float]:
        """The widths a client at ``p_max`` trains: only its own (HeteroFL)."""
        return [p_max]

    def sub_model(self, cost: Cost) -> dict[str, np.ndarray]:
        return slice_corners(self.current, self.shapes(cost.fraction))

    def train_settings(self, cost: Cost) -> dict[str, Any]:
        return {P.WIDTH: cost.fraction, P.WIDTHS: self.width_levels(cost.fraction)}

    def merge(self, updates: Updates) -> Arrays:
        return aggregate_heterofl(self.current, updates)

    def deployed(self, model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        sub = self.build(cost.fraction)
        full = model.state_dict()
        sub.load_state_dict({k: full[k][corner(shape)] for k, shape in self.shapes(cost.fraction).items()})
        return sub, None


class HeteroFL(WidthSliced):
    """HeteroFL (Diao et al., ICLR 2021): width slices, unweighted count-averaging, static BN.

    With ``heterofl_label_mask`` (the reference code's default), each client
    trains only the logits of its own classes and the server averages each
    output row over the clients that hold that class (the masked classifier).
    """

    def train_settings(self, cost: Cost) -> dict[str, Any]:
        return super().train_settings(cost) | {P.LABEL_MASK: self.cfg.heterofl_label_mask}

    def merge(self, updates: Updates) -> Arrays:
        return aggregate_heterofl(self.current, updates, self.update_labels, self.classifier)

    @property
    def classifier(self) -> tuple[str, ...]:
        """The output layer's parameters: the last Linear layer's weight and bias."""
        linears = [(n, m) for n, m in self.template.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            return ()
        name, layer = linears[-1]
        return tuple(f"{name}.{p}" for p, _ in layer.named_parameters())


class FjORD(WidthSliced):
    """FjORD (Horváth et al., NeurIPS 2021): ordered dropout over the federation's width levels.

    Each client samples, per batch, a width from the tiers' widths up to its
    own ``p_max`` (``full_pass=true`` adds FjORD's self-distillation); the
    server averages nested slices weighted by examples.
    """

    def width_levels(self, p_max: float) -> list[float]:
        levels = {c.fraction for c in self.tier_costs().values() if c.fraction <= p_max}
        return sorted(levels | {p_max})

    def merge(self, updates: Updates) -> Arrays:
        return aggregate_fjord(self.current, updates)


class FedHM(FedLoD):
    """FedHM (Yao et al., arXiv 2111.14655): truncated SVD of a dense server model, dense averaging.

    The template is the exact SVD of the dense initial model (``init='svd'``),
    and :func:`~maestro_fl.aggregation.aggregate_fedhm` keeps it so: a client's
    factor prefix is the truncated SVD at its rank. Clients train their
    factors at that fixed rank (no ordered dropout).
    """

    def train_settings(self, cost: Cost) -> dict[str, Any]:
        return super().train_settings(cost) | {P.SAMPLER: "none"}

    def merge(self, updates: Updates) -> Arrays:
        return aggregate_fedhm(self.current, updates)


STRATEGY_CLASSES: dict[str, type[FedLoD]] = {
    "fedlod": FedLoD,
    "fedavg_dense": FedAvgDense,
    "fedavg_exclusive": FedAvgExclusive,
    "heterofl": HeteroFL,
    "fjord": FjORD,
    "fedhm": FedHM,
}


def make_strategy(cfg: SimConfig, fed: Federation) -> FedLoD:
    """The strategy ``cfg.strategy`` for the federation ``fed``."""
    cls = STRATEGY_CLASSES[cfg.strategy]
    if issubclass(cls, WidthSliced):
        return cls(fed.template, fed.data.spec.shape, cfg, build=partial(model_at_width, cfg, fed.data.spec))
    return cls(fed.template, fed.data.spec.shape, cfg)
