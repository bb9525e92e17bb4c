"""Simulated device profiles: the tiers of a heterogeneous federation.

The default federation mixes five tiers in equal shares, as FjORD and
HeteroFL do. Their capabilities span microcontroller-class boards to a small
single-board computer, the range over which the default digits CNN (160k
weights, 2.4 MMAC per sample) goes from unaffordable at full rank to cheap:

========  =========  ========  =========  ==========  ============
tier      MMAC/s     memory    uplink     downlink    availability
========  =========  ========  =========  ==========  ============
0 (xs)    8          2.3 MB    50 kb/s    100 kb/s    0.6
1 (s)     12         2.8 MB    100 kb/s   250 kb/s    0.7
2 (m)     20         3.3 MB    250 kb/s   1 Mb/s      0.8
3 (l)     35         4.0 MB    1 Mb/s     5 Mb/s      0.9
4 (xl)    200        64 MB     5 Mb/s     20 Mb/s     0.95
========  =========  ========  =========  ==========  ============

A population can instead come from a CSV trace of per-client capabilities
(FedScale's device traces, Lai et al. 2022), with the columns
``client_id, tier, macs_per_s, memory_bytes, up_bps, down_bps, availability``
and optionally ``rank_fraction``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from maestro_fl.budget import DeviceCapability
from maestro_fl.config import ConfigError, SimConfig
from maestro_fl.population import PopulationError, load_population

DEFAULT_TIERS: tuple[DeviceCapability, ...] = (
    DeviceCapability(0, macs_per_s=8e6, memory_bytes=2.3e6, up_bps=5e4, down_bps=1e5, availability=0.6),
    DeviceCapability(1, macs_per_s=12e6, memory_bytes=2.8e6, up_bps=1e5, down_bps=2.5e5, availability=0.7),
    DeviceCapability(2, macs_per_s=20e6, memory_bytes=3.3e6, up_bps=2.5e5, down_bps=1e6, availability=0.8),
    DeviceCapability(3, macs_per_s=35e6, memory_bytes=4.0e6, up_bps=1e6, down_bps=5e6, availability=0.9),
    DeviceCapability(4, macs_per_s=200e6, memory_bytes=64e6, up_bps=5e6, down_bps=2e7, availability=0.95),
)


def tier_table(cfg: SimConfig) -> tuple[DeviceCapability, ...]:
    """The tiers in use: the defaults, one per share, with explicit fractions if configured."""
    n = len(cfg.tier_shares)
    if n > len(DEFAULT_TIERS):
        raise ConfigError(f"tier_shares has {n} entries; the built-in table has {len(DEFAULT_TIERS)} tiers")
    # with fewer shares than tiers, take the weakest and the strongest tiers evenly spread
    picks = np.linspace(0, len(DEFAULT_TIERS) - 1, n).round().astype(int) if n > 1 else [len(DEFAULT_TIERS) - 1]
    tiers = []
    for i, k in enumerate(picks):
        t = DEFAULT_TIERS[k]
        fraction = cfg.tier_fractions[i] if cfg.tier_fractions else 0.0
        tiers.append(DeviceCapability(i, t.macs_per_s, t.memory_bytes, t.up_bps, t.down_bps, t.availability, fraction))
    return tuple(tiers)


def tier_assignment(num_clients: int, shares: tuple[float, ...], seed: int) -> np.ndarray:
    """Tier of every client: exact shares (largest remainders), shuffled by the seed."""
    w = np.asarray(shares, dtype=float) / sum(shares)
    counts = np.floor(w * num_clients).astype(int)
    remainder = num_clients - counts.sum()
    counts[np.argsort(-(w * num_clients - counts), kind="stable")[:remainder]] += 1
    tiers = np.repeat(np.arange(len(shares)), counts)
    return np.random.default_rng([seed, 7]).permutation(tiers)


def device_for(partition_id: int, cfg: SimConfig) -> DeviceCapability:
    """The device client ``partition_id`` runs on (deterministic in seed and partition id)."""
    if cfg.devices:
        return load_trace(cfg.devices, cfg.num_clients)[partition_id]
    tiers = tier_table(cfg)
    return tiers[int(_assignment(cfg.num_clients, cfg.tier_shares, cfg.seed)[partition_id])]


@lru_cache(maxsize=4)
def _assignment(num_clients: int, shares: tuple[float, ...], seed: int) -> np.ndarray:
    return tier_assignment(num_clients, shares, seed)


def load_trace(path: str, num_clients: int | None = None) -> tuple[DeviceCapability, ...]:
    """Per-client capabilities from a CSV trace (:func:`maestro_fl.population.load_population`), checked."""
    try:
        return load_population(path, num_clients)
    except PopulationError as err:
        raise ConfigError(str(err)) from None
