"""``maestro-fl plan``: what every device tier can afford, before anything runs.

It builds the run's data, model and method, registers every partition with the
server core as a simulation's clients register (the devices are the run's
population), and asks it for its plan (:func:`maestro_fl.server.tier_plan`): the
same budget code then assigns the sub-models in round 1. No engine, no Ray, no ClientApp.
"""

from __future__ import annotations

from maestro_fl.config import SimConfig
from maestro_fl.federated import check_task
from maestro_fl.server import FederationServer, Registration

from ..server_app import format_plan


def plan_rows(cfg: SimConfig) -> list[dict[str, object]]:
    """Per tier: clients, the sub-model it deploys, its footprint, what binds it, and advice when unaffordable."""
    fed = check_task(cfg)
    core = FederationServer(fed.method, cfg)
    core.register(Registration(pid, pid, len(train)) for pid, (train, _) in enumerate(fed.partitions))
    return core.plan()


def plan(cfg: SimConfig) -> str:
    """The planner's table as text (``maestro-fl plan``)."""
    head = (f"{cfg.strategy} on {cfg.dataset} with {cfg.model}: {cfg.num_clients} clients, batch_size "
            f"{cfg.batch_size}, {cfg.local_epochs} local epochs, compute_budget_s {cfg.compute_budget_s:g}")
    return f"{head}\n\n{format_plan(plan_rows(cfg))}"
