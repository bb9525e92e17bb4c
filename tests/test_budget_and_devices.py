"""Device-derived budgets and the simulated device population."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from maestro_fl.budget import FP32, DeviceCapability, activation_count, affordable
from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.convert import factorize
from maestro_fl.population import (
    DEFAULT_TIERS,
    PopulationError,
    builtin_tiers,
    federation_devices,
    load_population,
    tier_assignment,
)
from maestro_fl.submodels import rank_cost_table as cost_table


def devices_of(cfg: SimConfig) -> tuple[DeviceCapability, ...]:
    return federation_devices(cfg.devices, cfg.num_clients, cfg.tier_shares, cfg.tier_fractions, cfg.seed)


def tiny() -> nn.Module:
    return factorize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)))


def test_cost_table_by_hand() -> None:
    table = {c.fraction: c for c in cost_table(tiny(), (8,), fractions=(1.0, 0.5))}
    full, half = table[1.0], table[0.5]
    # full rank: 6·(8+6) + 6 + 4·(6+4) + 4 = 134 weights; MACs 84 + 40
    assert (full.params, full.macs) == (134, 124)
    # activations per sample: LoD 0 out 6 + inner 6, ReLU 6, LoD 2 out 4 + inner 4
    assert full.activations == 26 == activation_count(tiny(), (8,))
    assert half.ranks == {"0": 3, "2": 2} and half.params == 3 * 14 + 6 + 2 * 10 + 4
    assert full.train_memory(batch_size=10) == FP32 * (3 * 134 + 10 * 26)
    assert full.train_macs(samples=5, epochs=2) == 3 * 124 * 5 * 2


def test_affordable_takes_the_largest_fraction_that_fits() -> None:
    table = cost_table(tiny(), (8,), fractions=(1.0, 0.5, 0.25))
    by = {c.fraction: c for c in table}
    rich = DeviceCapability(0, 1e12, 1e12, 1, 1, 1.0)
    assert affordable(table, rich, batch_size=4, samples=10, epochs=1, deadline_s=1).fraction == 1.0
    # memory between the half and full model's needs
    mem = (by[0.5].train_memory(4) + by[1.0].train_memory(4)) / 2
    assert affordable(table, DeviceCapability(0, 1e12, mem, 1, 1, 1.0), batch_size=4, samples=10, epochs=1,
                      deadline_s=1).fraction == 0.5
    # compute: exactly the quarter model's MACs in one second
    slow = DeviceCapability(0, by[0.25].train_macs(10, 1), 1e12, 1, 1, 1.0)
    assert affordable(table, slow, batch_size=4, samples=10, epochs=1, deadline_s=1.0).fraction == 0.25
    broke = DeviceCapability(0, 1.0, 1.0, 1, 1, 1.0)
    assert affordable(table, broke, batch_size=4, samples=10, epochs=1, deadline_s=1.0) is None
    fixed = DeviceCapability(0, 1.0, 1.0, 1, 1, 1.0, rank_fraction=0.5)
    assert affordable(table, fixed, batch_size=4, samples=10, epochs=1, deadline_s=1.0).fraction == 0.5


def test_tier_assignment_has_exact_shares_and_follows_the_seed() -> None:
    a = tier_assignment(50, (0.2,) * 5, seed=0)
    assert np.bincount(a).tolist() == [10] * 5
    assert np.bincount(tier_assignment(7, (0.5, 0.3, 0.2), seed=0)).tolist() == [4, 2, 1]
    assert np.array_equal(a, tier_assignment(50, (0.2,) * 5, seed=0))
    assert not np.array_equal(a, tier_assignment(50, (0.2,) * 5, seed=1))


def test_default_budgets_span_the_tiers() -> None:
    """The default tiers land on distinct budgets for the default workload, the weakest ≤ 25% of the weights."""
    from maestro_fl.federated import federation
    from maestro_fl.footprint import footprint
    from strategies.submodel_strategy import SubModelStrategy

    cfg = SimConfig()
    fed = federation(cfg)
    # the server's own path: every client registered with its device and example count
    strategy = SubModelStrategy(fed.method, cfg)
    devices = devices_of(cfg)
    for pid in range(cfg.num_clients):
        strategy.partition_of[pid + 1] = pid
        strategy.examples_of[pid + 1] = len(fed.partitions[pid][0])
        strategy.devices[pid + 1] = devices[pid]
    strategy.set_population()
    tiers = strategy.tier_costs()
    fractions = [tiers[t].fraction for t in sorted(tiers)]
    assert fractions == sorted(fractions) and len(set(fractions)) == 5 and fractions[-1] == 1.0
    weakest = tiers[0]
    fp = footprint(fed.template, fed.data.spec.shape, weakest.ranks)
    assert fp.params / fp.dense_params <= 0.25


def test_federation_devices_and_trace(tmp_path: Path) -> None:
    cfg = resolve(SimConfig, overrides={"num_clients": 10, "clients_per_round": 5, "tier_shares": (0.5, 0.5), "tier_fractions": (0.25, 1.0)})
    devices = devices_of(cfg)
    assert sorted(d.tier for d in devices) == [0] * 5 + [1] * 5
    assert {d.rank_fraction for d in devices} == {0.25, 1.0}
    assert devices == devices_of(cfg)
    assert builtin_tiers(cfg.tier_shares)[1].macs_per_s == DEFAULT_TIERS[-1].macs_per_s
    with pytest.raises(ConfigError, match="tier_shares has 6 entries"):
        resolve(SimConfig, overrides={"tier_shares": (1 / 6,) * 6})

    good = tmp_path / "trace.csv"
    good.write_text("client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability\n1,0,1e6,1e6,1e4,1e4,0.5\n0,1,2e6,2e6,2e4,2e4,1\n")
    trace = load_population(str(good))
    assert [t.tier for t in trace] == [1, 0]
    # text tier labels are numbered from the slowest devices' label up, as the built-in tiers are
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability\n"
                        "0,laptop,9e8,1e9,1e6,1e6,1\n1,phone,1e7,1e8,1e5,1e5,0.5\n2,tablet,5e7,4e8,1e6,1e6,0.8\n"
                        "3,phone,2e7,1e8,1e5,1e5,0.5\n")
    assert [t.tier for t in load_population(str(labelled))] == [2, 0, 1, 0]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability\n"
                     "0,phone,1e7,1e8,1e5,1e5,1\n1,1,5e7,4e8,1e6,1e6,1\n")
    with pytest.raises(PopulationError, match="both numbers and text labels"):
        load_population(str(mixed))
    bad = tmp_path / "bad.csv"
    bad.write_text("client_id,tier,macs_per_s\n0,0,1\n")
    with pytest.raises(PopulationError, match="lacks columns"):
        load_population(str(bad))
    neg = tmp_path / "neg.csv"
    neg.write_text("client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability\n0,0,-1,1,1,1,1\n")
    with pytest.raises(PopulationError, match="line 2"):
        load_population(str(neg))
