"""FedHM (Yao et al., arXiv 2111.14655): truncated SVD of a dense server model, dense averaging.

The server's model is dense, held as its exact SVD factors (the template is
factorized with ``init='svd'``), so a client's factor prefix at rank ``r`` is
the truncated SVD. Clients train their factors at that fixed rank (no ordered
dropout); the server rebuilds every client's ``U Vᵀ``, averages with weight
``1/n`` and keeps the result as its exact SVD
(:func:`~maestro_fl.aggregation.aggregate_fedhm`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..aggregation import aggregate_fedhm
from ..config import SimConfig
from ..submodels import Arrays
from .base import Update, corners_weighted
from .fedlod import FedLoD


class FedHM(FedLoD):
    """Truncated-SVD sub-models trained at fixed rank; rebuilt, uniformly averaged, re-factored."""

    name = "fedhm"
    rank_allocation = "uniform"  # the paper's rule: one rank fraction for every layer (and the comparison's control)

    @property
    def init(self) -> str:
        return "svd"  # the server model's factors are the exact SVD of its dense weights

    @property
    def sampler(self) -> str:
        return "none"  # clients train their factors at their rank

    @property
    def passes(self) -> int:
        return 1

    @classmethod
    def elementwise_rule(cls, cfg: SimConfig) -> bool:
        return False  # products are averaged

    @classmethod
    def keeps_coordinates(cls, cfg: SimConfig) -> bool:
        return False  # re-factored by SVD every round: new bases each time

    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        return aggregate_fedhm(current, corners_weighted(updates))
