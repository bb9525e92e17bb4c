"""The federated methods, each one unit (sub-model family, client trainer, server rule, cost model).

Adding a method: write its class (subclass :class:`FederatedMethod` or a
sibling) in a module of this package and add it to :data:`METHODS`.
"""

from __future__ import annotations

from .base import Assignment, ClientTask, FederatedMethod, LocalResult, Update
from .dlrt_clients import DLRTClients
from .fedavg import FedAvgDense, FedAvgExclusive
from .fedhm import FedHM
from .fedlod import FedLoD
from .fedrolex import FedRolex, FedRolexRank
from .fiarse import FIARSE, FIARSERank
from .flanc import FLANC
from .heterofl_fjord import FjORD, HeteroFL

#: every method by its ``strategy`` name, in the order `maestro-fl compare` lists them
METHODS: dict[str, type[FederatedMethod]] = {
    cls.name: cls
    for cls in (
        FedLoD,
        DLRTClients,
        FedAvgDense,
        FedAvgExclusive,
        HeteroFL,
        FjORD,
        FedHM,
        FedRolex,
        FedRolexRank,
        FIARSE,
        FIARSERank,
        FLANC,
    )
}

__all__ = ["METHODS", "Assignment", "ClientTask", "FederatedMethod", "LocalResult", "Update"]
