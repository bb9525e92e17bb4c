"""DLRT clients: each client trains its rank prefix with DLRT's KLS integrator, the server re-factors.

DLRT (Schotthöfer et al., NeurIPS 2022, arXiv 2205.13571) as the local
trainer of a heterogeneous federation. A client receives its budget's factor
prefix, turns it into ``U S Vᵀ`` of the same product (QR, no SVD of the
weight), trains with the rank-adaptive KLS integrator capped at that rank,
and sends back factors ordered by singular value, padded to the shape it was
sent. DLRT clients rotate their bases every step, so only products are
comparable: the server averages ``U Vᵀ`` and re-factors by truncated SVD
(:func:`~maestro_fl.aggregation.aggregate_svd`). FeDLRT's shared basis is not
used: it gives every client the same basis and rank, which a heterogeneous
federation does not have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..aggregation import aggregate_svd
from ..config import SimConfig, check_fraction, check_positive
from ..convert import lod_layers
from ..data import Split
from ..dlrt import KLSIntegrator, dlrt_to_lod, lod_to_dlrt
from ..submodels import Arrays
from ..training import WholeModel
from .base import Assignment, LocalResult, LocalTraining, Update, corners_weighted
from .fedlod import FedLoD


@dataclass(frozen=True)
class DLRTParams:
    """DLRT clients' options (``method.tau=0.2``)."""

    tau: float = 0.1  # relative truncation tolerance of the rank-adaptive step (the authors' CIFAR value)
    lr: float = 0.1  # the K/L/S step size (plain SGD), the centralized default's

    def validate(self) -> None:
        check_fraction("method.tau", self.tau)
        check_positive("method.lr", self.lr)


class DLRTClients(FedLoD):
    """Rank prefixes trained by the KLS integrator (two passes per step), SVD re-factoring on the server."""

    name = "dlrt"
    Params = DLRTParams
    rank_allocation = "uniform"  # the paper's rule: one rank fraction for every layer (and the comparison's control)
    runs_on_gpu = False  # the KLS integrator's QR/SVD steps are not checked on a GPU here

    @property
    def passes(self) -> int:
        return 2  # the K/L pass and the S pass

    @property
    def live_graphs(self) -> int:
        return 1  # the two passes run one after the other

    @property
    def sampler(self) -> str:
        return "none"  # no ordered dropout: DLRT trains the whole prefix

    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        dl = lod_to_dlrt(model)
        integrator = KLSIntegrator(dl, lr=self.params.lr, tau=self.params.tau, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
        stats = self.epochs(dl, data, WholeModel(dl), integrator, local)
        trained = dlrt_to_lod(dl)
        for name, layer in lod_layers(trained).items():
            layer.pad_(assignment.ranks[name])  # DLRT may have lowered the rank; the reply keeps the shape it was sent
        return LocalResult(trained, stats)

    @classmethod
    def elementwise_rule(cls, cfg: SimConfig) -> bool:
        return False  # products are averaged

    @classmethod
    def keeps_coordinates(cls, cfg: SimConfig) -> bool:
        return False  # the SVD of the averaged products gives new bases every round

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_svd(current, corners_weighted(updates))
