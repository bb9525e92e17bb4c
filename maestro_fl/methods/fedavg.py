"""FedAvg on the dense model: the reference methods every heterogeneous method is measured against.

* :class:`FedAvgDense`: every client trains the full dense model, budgets
  ignored: the upper bound that no real federation of these devices can run.
* :class:`FedAvgExclusive`: only the clients whose device affords the full
  model take part: the naive practice.

McMahan et al., AISTATS 2017 (arXiv 1602.05629).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..aggregation import aggregate_indexed
from ..budget import BudgetCheck, Cost, DeviceCapability
from ..data import Split
from ..submodels import Arrays, Dense, SubModelFamily
from ..training import WholeModel
from .base import LOD_ONLY_FIELDS, Assignment, FederatedMethod, LocalResult, LocalTraining, Update, examples_weighted


class FedAvgDense(FederatedMethod):
    """Every client trains the full dense model; example-weighted averaging."""

    name = "fedavg_dense"
    unread_fields = LOD_ONLY_FIELDS

    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        return Dense(self.build(1.0), self.inputs)

    def budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> Cost | None:
        return table[0]  # budgets ignored

    def explain_budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> BudgetCheck:
        """Every device trains the full model: what it would need against what it has, constraint ``ignored``."""
        check = super().explain_budget(table, device, samples)
        return dataclasses.replace(check, chosen=table[0], binding="ignored")

    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        stats = self.epochs(model, data, WholeModel(model), self.sgd(model, local.lr), local)
        return LocalResult(model, stats)

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_indexed(current, examples_weighted(updates))


class FedAvgExclusive(FedAvgDense):
    """FedAvg over the clients whose device affords the full dense model; the others sit out."""

    name = "fedavg_exclusive"

    def budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> Cost | None:
        return FederatedMethod.budget(self, table, device, samples)

    def explain_budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> BudgetCheck:
        return FederatedMethod.explain_budget(self, table, device, samples)
