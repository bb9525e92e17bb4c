"""Width-sliced methods: HeteroFL (Diao et al., ICLR 2021) and FjORD (Horváth et al., NeurIPS 2021).

A client at width ``p`` holds the first ``⌈p·c⌉`` channels of every hidden
layer of the dense model (:class:`~maestro_fl.submodels.WidthCorner`).

* HeteroFL trains its slice with plain SGD and the server count-averages
  every element over the clients holding it; with ``method.label_mask``
  (the reference code's default) a client trains only its own classes'
  logits and the server averages each output row over the clients holding
  that class.
* FjORD trains with ordered dropout: each batch draws a width from the
  tiers' widths up to its own (``full_pass=true`` adds its self-distillation);
  the server averages nested slices weighted by examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..aggregation import aggregate_fjord, aggregate_heterofl
from ..budget import Cost
from ..config import SimConfig
from ..data import Split
from ..submodels import Arrays, SubModelFamily, WidthCorner
from ..width import OrderedDropout
from .base import LOD_ONLY_FIELDS, Assignment, FederatedMethod, LocalResult, LocalTraining, Update, corners_weighted


class WidthMethod(FederatedMethod):
    """Clients hold width slices of the dense model; trained by (ordered-dropout) SGD."""

    static_batchnorm = True
    unread_fields = LOD_ONLY_FIELDS

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        return WidthCorner(self.build(1.0), self.inputs, self.build)

    @property
    def distill(self) -> bool:
        return False

    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        od = OrderedDropout(model, self.architecture, assignment.levels or (assignment.fraction,), local.generator)
        labels = tuple(int(c) for c in data.y.unique()) if assignment.label_mask else ()
        mask = None
        if labels:  # HeteroFL's masked classifier: only the client's own classes have logits
            mask = torch.zeros(self.template.state_dict()[self.classifier[-1]].shape[0], dtype=torch.bool)
            mask[list(labels)] = True
        stats = self.epochs(model, data, od, self.sgd(model, local.lr), local, distill=self.distill, class_mask=mask)
        return LocalResult(model, stats, labels)

    def architecture(self, width: float) -> nn.Module:
        """The model at ``width``, for its structure only (ordered dropout runs it on sliced weights); cached."""
        cache = self.__dict__.setdefault("_architectures", {})
        if width not in cache:
            cache[width] = self.build(width)
        return cache[width]

    @property
    def classifier(self) -> tuple[str, ...]:
        """The output layer's parameters: the last Linear layer's weight and bias."""
        linears = [(n, m) for n, m in self.template.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            return ()
        name, layer = linears[-1]
        return tuple(f"{name}.{p}" for p, _ in layer.named_parameters())


@dataclass(frozen=True)
class HeteroFLParams:
    """HeteroFL's options (``method.label_mask=true``)."""

    label_mask: bool = False  # the masked classifier (its paper's choice) loses 1.1 pp of validation on digits and
    # 4.1 on MNIST-1D at HeteroFL's protocol point (benchmarks/sweeps/defaults_*.toml)


class HeteroFL(WidthMethod):
    """Width slices, plain SGD on each, unweighted count-averaging, static BN."""

    name = "heterofl"
    Params = HeteroFLParams
    variants = {"heterofl_masked": {"method.label_mask": True}}

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        return Assignment(cost.fraction, label_mask=self.params.label_mask)

    @classmethod
    def elementwise_rule(cls, cfg: SimConfig) -> bool:
        return not cls.parse_params(cfg).label_mask  # the masked classifier averages rows over class holders

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        indexed = [(u.arrays, u.task.index, 1.0) for u in updates]
        if not self.params.label_mask:
            return aggregate_heterofl(current, indexed)
        return aggregate_heterofl(current, indexed, [u.labels for u in updates], self.classifier)


class FjORD(WidthMethod):
    """Ordered dropout over the federation's width levels; nested, example-weighted averaging."""

    name = "fjord"
    variants = {"fjord_kd": {"full_pass": True}}

    @property
    def distill(self) -> bool:
        return self.cfg.full_pass

    @property
    def passes(self) -> int:
        return 2 if self.cfg.full_pass else 1  # charged as two: a step below p_max runs teacher and student

    @property
    def live_graphs(self) -> int:
        return self.passes

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        levels = {c.fraction for c in tier_costs if c.fraction <= cost.fraction} | {cost.fraction}
        return Assignment(cost.fraction, levels=tuple(sorted(levels)))

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_fjord(current, corners_weighted(updates))
