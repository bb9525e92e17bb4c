"""``devices=measured``: the ncnn ranking's phones and boards as a population, its tiers and its draw."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.measured_devices import (
    LINK_BY_KIND,
    MEASURED_DEVICES,
    MEMORY_BY_TIER,
    NUM_TIERS,
    REFERENCE_INFERENCE_MACS_PER_S,
    TRAINING_EFFICIENCY,
    tiers_of_table,
)
from maestro_fl.population import federation_devices, measured_assignment, measured_population


def test_the_table_is_the_rankings_phones_and_boards_with_the_reference_at_ratio_one() -> None:
    assert len(MEASURED_DEVICES) == 48
    assert len({d.name for d in MEASURED_DEVICES}) == 48
    assert all(d.ratio > 0 and d.kind in LINK_BY_KIND for d in MEASURED_DEVICES)
    ratios = [d.ratio for d in MEASURED_DEVICES]
    assert ratios == sorted(ratios)  # as ranked: fastest first
    pi5 = next(d for d in MEASURED_DEVICES if d.name.startswith("Raspberry Pi 5"))
    assert pi5.ratio == 1.0
    assert pi5.macs_per_s == pytest.approx(REFERENCE_INFERENCE_MACS_PER_S * TRAINING_EFFICIENCY)
    slowest, fastest = MEASURED_DEVICES[-1], MEASURED_DEVICES[0]
    assert fastest.macs_per_s / slowest.macs_per_s == pytest.approx(165.0 / 0.309)


def test_tiers_are_speed_quintiles_slowest_first() -> None:
    tiers = tiers_of_table()
    assert len(tiers) == NUM_TIERS == len(MEMORY_BY_TIER)
    sizes = [len(t) for t in tiers]
    assert sum(sizes) == 48 and max(sizes) - min(sizes) <= 1
    for slower, faster in zip(tiers, tiers[1:]):
        assert min(d.ratio for d in slower) >= max(d.ratio for d in faster)


@pytest.mark.parametrize("num_clients,shares", [(10, (0.2,) * 5), (200, (0.2,) * 5), (30, (0.5, 0.3, 0.2))])
def test_a_federation_takes_its_tiers_in_tier_shares_and_each_client_a_device_of_its_tier(
    num_clients: int, shares: tuple[float, ...]
) -> None:
    drawn = measured_assignment(num_clients, shares, seed=3)
    assert len(drawn) == num_clients
    counts = Counter(tier for tier, _, _ in drawn)
    for tier, share in enumerate(shares):
        assert abs(counts[tier] - share * num_clients) < 1
    table = tiers_of_table()
    picks = {tier: table_tier for tier, table_tier, _ in drawn}
    assert picks[0] == 0 and picks[len(shares) - 1] == NUM_TIERS - 1  # the slowest and the fastest are kept
    assert all(device in table[table_tier] for _, table_tier, device in drawn)
    devices = measured_population(num_clients, shares, seed=3)
    for (tier, table_tier, device), cap in zip(drawn, devices):
        assert cap.tier == tier and cap.macs_per_s == device.macs_per_s
        assert cap.memory_bytes == MEMORY_BY_TIER[table_tier]
        assert (cap.up_bps, cap.down_bps, cap.availability) == LINK_BY_KIND[device.kind]
    assert measured_population(num_clients, shares, seed=3) == devices  # seeded
    assert measured_population(num_clients, shares, seed=4) != devices


def test_the_config_takes_devices_measured_and_refuses_more_tiers_than_the_table_has(tmp_path: Path) -> None:
    cfg = resolve(SimConfig, overrides={"devices": "measured", "num_clients": 12, "clients_per_round": 5, "tier_fractions": "0.1,0.2,0.3,0.5,1"})
    devices = federation_devices(cfg.devices, cfg.num_clients, cfg.tier_shares, cfg.tier_fractions, cfg.seed)
    assert [d.rank_fraction for d in devices] == [cfg.tier_fractions[d.tier] for d in devices]
    with pytest.raises(ConfigError, match="tier_shares has 6 entries; devices=measured has 5 speed tiers"):
        resolve(SimConfig, overrides={"devices": "measured", "tier_shares": "0.1,0.1,0.2,0.2,0.2,0.2"})


def test_plan_shows_each_tiers_devices_and_the_source() -> None:
    from strategies.cli.plan import plan

    cfg = resolve(SimConfig, overrides={"devices": "measured", "num_clients": 10, "clients_per_round": 5, "model": "mlp",
                                        "partition": "iid"})
    text = plan(cfg)
    assert "Tencent ncnn benchmark" in text and "BSD-3-Clause" in text
    for tier, _, device in measured_assignment(10, cfg.tier_shares, cfg.seed):
        assert f"tier {tier}: " in text and device.name in text


def test_a_federation_on_measured_devices_runs_and_its_clients_simulate_their_devices_seconds(tmp_path: Path) -> None:
    import pandas as pd

    from strategies.api import simulate

    run = simulate(devices="measured", num_clients=10, clients_per_round=10, rounds=1, local_epochs=1, model="mlp",
                   partition="iid", backend="local", progress=False, out_dir=str(tmp_path), run_name="measured")
    clients = pd.read_csv(run.run_dir / "clients.csv")
    drawn = measured_assignment(10, (0.2,) * 5, seed=0)
    online = clients[clients["status"] == "ok"]
    assert len(online) > 0 and set(clients["tier"]) <= set(range(5))
    for row in online.itertuples():
        tier, _, device = drawn[row.partition_id]
        assert row.tier == tier
        assert row.compute_s == pytest.approx(row.macs / device.macs_per_s, rel=1e-5)  # clients.csv rounds
