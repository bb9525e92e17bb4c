"""``maestro-fl plan``: what every device tier can afford, before anything runs.

It builds the run's data, model and method, registers every client through
the ClientApp called in this process (the same ``query`` a simulation sends,
so the devices are exactly those of the run), and asks the strategy for its
plan (:meth:`strategies.submodel_strategy.SubModelStrategy.plan`): the same budget
code then assigns the sub-models in round 1. No engine, no Ray.
"""

from __future__ import annotations

from maestro_fl import message_keys as P
from maestro_fl.config import SimConfig
from maestro_fl.federated import check_task

from ..runners.launch import load_ref, quiet_flower
from ..runners.local_grid import LocalGrid
from ..server_app import format_plan
from ..submodel_strategy import SubModelStrategy


def plan_rows(cfg: SimConfig) -> list[dict[str, object]]:
    """Per tier: clients, the sub-model it deploys, its footprint, what binds it, and advice when unaffordable."""
    quiet_flower()
    fed = check_task(cfg)
    strategy = SubModelStrategy(fed.method, cfg)
    grid = LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients)
    strategy.register(grid.send_and_receive(strategy.registration_messages(grid)))
    return strategy.plan()


def plan(cfg: SimConfig) -> str:
    """The planner's table as text (``maestro-fl plan``)."""
    head = (f"{cfg.strategy} on {cfg.dataset} with {cfg.model}: {cfg.num_clients} clients, batch_size "
            f"{cfg.batch_size}, {cfg.local_epochs} local epochs, compute_budget_s {cfg.compute_budget_s:g}")
    return f"{head}\n\n{format_plan(plan_rows(cfg))}"
