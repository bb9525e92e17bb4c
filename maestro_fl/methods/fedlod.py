"""FedLoD: federated training of a low-rank ordered decomposition at every device's rank budget.

Every client trains the LoD model (Maestro, Horváth et al., ICML 2024,
arXiv 2308.14929) at the rank budget its device affords and receives only
that prefix of the ordered factors, trained with ordered dropout inside it.
The server rule is ``cfg.aggregation``:

* ``ordered``: each rank component averaged over the clients that trained it
  (:func:`~maestro_fl.aggregation.aggregate_ordered_factors`; FjORD's nested
  rule on ranks, as RBLA, arXiv 2408.08699);
* ``ordered_products``: per nested rank level, the mean of the holders' block
  products ``U Vᵀ`` re-factored (no cross-term between clients' factors);
* ``svd``: every client's ``U Vᵀ`` averaged, then re-factored (FlexLoRA, FedHM);
* ``zero_pad``: factors zero-padded to the global rank and averaged (HetLoRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..aggregation import (
    aggregate_ordered_factors,
    aggregate_ordered_products,
    aggregate_svd,
    aggregate_zero_padded,
    shrink_factors,
)
from ..budget import Cost
from ..config import SimConfig
from ..convert import factorize
from ..data import Split
from ..submodels import Arrays, RankPrefix, RankWidthPrefix, SubModelFamily
from ..training import RankDraw, group_lasso, make_sampler
from .base import Assignment, FederatedMethod, LocalResult, LocalTraining, Update, corners_weighted

RULES = {"ordered": aggregate_ordered_factors, "ordered_products": aggregate_ordered_products, "svd": aggregate_svd,
         "zero_pad": aggregate_zero_padded}


class FedLoD(FederatedMethod):
    """Ordered-factor prefixes per client, ordered dropout within them, per-component averaging."""

    name = "fedlod"
    variants = {
        "fedlod_nested_sampler": {"sampler": "nested"},
        "fedlod_svd_aggregation": {"aggregation": "svd"},
        "fedlod_zero_pad_aggregation": {"aggregation": "zero_pad"},
        "fedlod_importance_ranks": {"rank_allocation": "importance"},
        "fedlod_dense_share_ranks": {"rank_allocation": "dense_share"},  # every layer at the budget's share of weights
        "fedlod_homogeneous": {"ignore_budgets": True},  # a reference row: every device at full rank
    }

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        model = self.factorized(1.0, generator)
        allocation = self.rank_allocation
        if self.cfg.width_floor and self.cfg.aggregation == "ordered" and self.cfg.server_shrink_eps == 0:
            return RankWidthPrefix(model, self.inputs, self.narrow_shapes, self.cfg.width_floor_rank, allocation)
        return RankPrefix(model, self.inputs, allocation)

    def factorized(self, width: float, generator: torch.Generator | None = None, init: str | None = None) -> nn.Module:
        """The LoD model at hidden width ``width`` (the run's ``keep_first``/``keep_classifier``)."""
        return factorize(
            self.build(width),
            init=init or self.init,  # type: ignore[arg-type]  # a str checked against Init's values by the config
            keep_first=self.cfg.keep_first,
            keep_classifier=self.cfg.keep_classifier,
            generator=generator,
        )

    def narrow_shapes(self, width: float) -> nn.Module:
        """The LoD model at ``width`` for the width floor's shapes and costs: its values are never used (clients
        get corners of the global factors), so fresh factors from a private generator stand in for the SVD,
        which takes seconds per width on a VGG-sized model."""
        return self.factorized(width, torch.Generator().manual_seed(0), init="random")

    def width_of(self, cost: Cost) -> float:
        """The hidden width of a budget's sub-model (below the smallest rank prefix it narrows too)."""
        family = self.family
        return family.width_of(cost.fraction) if isinstance(family, RankWidthPrefix) else 1.0

    @property
    def rank_allocation(self) -> str:
        """How a budget's ranks are spread over the layers (``cfg.rank_allocation``; baselines keep their papers')."""
        return self.cfg.rank_allocation

    @property
    def init(self) -> str:
        return self.cfg.init

    @property
    def passes(self) -> int:
        return 2 if self.cfg.full_pass else 1  # the full pass runs the teacher and the student

    @property
    def live_graphs(self) -> int:
        return self.passes

    @property
    def sampler(self) -> str:
        """The ordered-dropout sampler of local training."""
        return self.cfg.sampler

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        if self.sampler != "tiers":
            return Assignment(cost.fraction, dict(cost.ranks))
        # FjORD's p ~ U{p_s <= p_max} on ranks: the tiers' sub-models up to the client's own
        # (a narrowed sub-model's levels are its own only: ranks of another width are not its prefixes)
        width = self.width_of(cost)
        levels = {c.fraction: c.ranks for c in tier_costs
                  if c.fraction <= cost.fraction and self.width_of(c) == width} | {cost.fraction: cost.ranks}
        order = sorted(levels)
        return Assignment(cost.fraction, dict(cost.ranks), tuple(order), tuple(dict(levels[p]) for p in order))

    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        sampler = make_sampler(self.sampler, model, local.generator, levels=assignment.level_ranks,
                               top_share=self.cfg.level_top_share)
        lam = self.cfg.lambda_gl
        stats = self.epochs(
            model, data, RankDraw(model, sampler), self.sgd(model, local.lr), local, distill=self.cfg.full_pass,
            regularizer=(lambda: lam * group_lasso(model)) if lam > 0 else None,
        )
        return LocalResult(model, stats)

    @classmethod
    def elementwise_rule(cls, cfg: SimConfig) -> bool:
        return cfg.aggregation == "ordered" and cfg.server_shrink_eps == 0

    @classmethod
    def keeps_coordinates(cls, cfg: SimConfig) -> bool:
        return cfg.aggregation in ("ordered", "zero_pad")  # 'svd' and 'ordered_products' re-factor by SVD

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        if isinstance(self.family, RankWidthPrefix):  # the ordered rule, clients below the rank floor narrowed
            merged = aggregate_ordered_factors(current, corners_weighted(updates), narrowed=True)
        else:
            merged = RULES[self.cfg.aggregation](current, corners_weighted(updates))
        if self.cfg.server_shrink_eps > 0:  # Maestro's progressive shrinking, on the server's aggregate
            merged, _ = shrink_factors(merged, self.cfg.server_shrink_eps)
        return merged
