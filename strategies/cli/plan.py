"""``maestro-fl plan``: what every device tier can afford, before anything runs.

It builds the run's data, model and method, registers every partition with the
server core as a simulation's clients register (the devices are the run's
population), and asks it for its plan (:func:`maestro_fl.server.tier_plan`): the
same budget code then assigns the sub-models in round 1. No engine, no Ray, no ClientApp.
"""

from __future__ import annotations

from collections import Counter

from maestro_fl.config import SimConfig
from maestro_fl.federated import check_task
from maestro_fl.measured_devices import SOURCE, TRAINING_EFFICIENCY
from maestro_fl.population import MEASURED, measured_assignment
from maestro_fl.server import FederationServer, Registration

from ..server_app import format_plan


def planned_core(cfg: SimConfig) -> FederationServer:
    """The server core of the run, with every partition registered as a simulation's clients register."""
    fed = check_task(cfg)
    core = FederationServer(fed.method, cfg)
    core.register(Registration(pid, pid, len(train)) for pid, (train, _) in enumerate(fed.partitions))
    return core


def plan_rows(cfg: SimConfig) -> list[dict[str, object]]:
    """Per tier: clients, the sub-model it deploys, its footprint, what binds it, and advice when unaffordable."""
    return planned_core(cfg).plan()


def plan(cfg: SimConfig) -> str:
    """The planner's table as text (``maestro-fl plan``)."""
    head = (f"{cfg.strategy} on {cfg.dataset} with {cfg.model}: {cfg.num_clients} clients, batch_size "
            f"{cfg.batch_size}, {cfg.local_epochs} local epochs, compute_budget_s {cfg.compute_budget_s:g}")
    core = planned_core(cfg)
    text = f"{head}\n\n{format_plan(core.plan())}"
    if cfg.devices == MEASURED:
        text += f"\n\n{measured_devices_text(cfg)}"
    return f"{text}\n\n{availability_text(cfg, core)}" if core.schedule is not None else text


def availability_text(cfg: SimConfig, core: FederationServer) -> str:
    """Per tier, the share of the time its clients are online under ``availability`` (the core's schedule)."""
    schedule = core.schedule
    assert schedule is not None, "availability_text needs a run with availability set"
    shares: dict[int, list[float]] = {}
    for k, device in enumerate(core.population):
        shares.setdefault(device.tier, []).append(schedule.online_share(k))
    lines = [f"availability={cfg.availability}: the share of the time each tier's clients are online "
             f"(mean over its clients; the schedule repeats every {schedule.period_s:g} simulated s)"]
    lines += [f"tier {tier}: {sum(v) / len(v):.2f}" for tier, v in sorted(shares.items())]
    return "\n".join(lines)


def measured_devices_text(cfg: SimConfig) -> str:
    """Which real devices ``devices=measured`` gave each tier, and where their speeds come from."""
    by_tier: dict[int, Counter[str]] = {}
    for tier, _, device in measured_assignment(cfg.num_clients, cfg.tier_shares, cfg.seed):
        by_tier.setdefault(tier, Counter())[f"{device.name} ({device.macs_per_s / 1e9:.2g} GMAC/s)"] += 1
    lines = [f"devices=measured: speeds from the {SOURCE}, x{TRAINING_EFFICIENCY:g} for training (assumed); "
             "memory and links assumed by tier and kind (maestro_fl/measured_devices.py)"]
    for tier in sorted(by_tier):
        shown = ", ".join(f"{name} x{n}" for name, n in by_tier[tier].most_common())
        lines.append(f"tier {tier}: {shown}")
    return "\n".join(lines)
