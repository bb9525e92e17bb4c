"""Device populations: the defaults' tiers, a CSV trace, or the user's own; checked before anything starts.

The device model has this one home: :func:`federation_devices` gives every
client's device (the server budgets for it and simulates its seconds), and
:func:`device_in_round` the one it runs on in a round, a pure function of the
population, the partition, the round and the seed.

The built-in federation mixes five tiers in equal shares, as FjORD and
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

``devices`` in a config is ``""`` (those built-in tiers, in ``tier_shares``),
``"measured"`` (real phones and boards by their measured speed, in ``tier_shares``:
:mod:`maestro_fl.measured_devices`), the path of a CSV trace with one row per client (FedScale's device traces,
Lai et al., ICML 2022), or a reference ``package.module:attr`` / an object of
the Python API: a list of :class:`~maestro_fl.budget.DeviceCapability` or of
dicts, a pandas DataFrame, or a function of ``num_clients`` returning one.
Every source has the columns :data:`TRACE_COLUMNS` (a list of profiles is
numbered by position) and optionally ``rank_fraction``. Every problem is a
:class:`PopulationError` naming the source, the row and the column, and
saying what is allowed.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .measured_devices import LINK_BY_KIND, MEMORY_BY_TIER, NUM_TIERS, MeasuredDevice, tiers_of_table
from .references import is_reference, resolve

LOG = logging.getLogger("maestro_fl")

TRACE_COLUMNS = ("client_id", "tier", "macs_per_s", "memory_bytes", "up_bps", "down_bps", "availability")
OPTIONAL_COLUMNS = ("rank_fraction",)


@dataclass(frozen=True)
class DeviceCapability:
    """A simulated device: what it computes, stores, sends, and how often it is online."""

    tier: int
    macs_per_s: float
    memory_bytes: float
    up_bps: float  # bits per second
    down_bps: float
    availability: float  # probability of being online in a round
    rank_fraction: float = 0.0  # explicit budget; 0 = derive from the capability


class PopulationError(ValueError):
    """A device population is malformed (the config raises it as a ConfigError)."""


DEFAULT_TIERS: tuple[DeviceCapability, ...] = (
    DeviceCapability(0, macs_per_s=8e6, memory_bytes=2.3e6, up_bps=5e4, down_bps=1e5, availability=0.6),
    DeviceCapability(1, macs_per_s=12e6, memory_bytes=2.8e6, up_bps=1e5, down_bps=2.5e5, availability=0.7),
    DeviceCapability(2, macs_per_s=20e6, memory_bytes=3.3e6, up_bps=2.5e5, down_bps=1e6, availability=0.8),
    DeviceCapability(3, macs_per_s=35e6, memory_bytes=4.0e6, up_bps=1e6, down_bps=5e6, availability=0.9),
    DeviceCapability(4, macs_per_s=200e6, memory_bytes=64e6, up_bps=5e6, down_bps=2e7, availability=0.95),
)


def builtin_tiers(shares: Sequence[float], fractions: Sequence[float] = ()) -> tuple[DeviceCapability, ...]:
    """One built-in tier per share; with fewer shares than tiers, the weakest and the strongest evenly spread.

    ``fractions``: an explicit rank fraction per tier (``tier_fractions``); empty = derive from each device.
    """
    n = len(shares)
    if not 0 < n <= len(DEFAULT_TIERS):
        raise PopulationError(f"tier_shares has {n} entries; the built-in table has 1 to {len(DEFAULT_TIERS)} tiers")
    return tuple(dataclasses.replace(DEFAULT_TIERS[k], tier=i, rank_fraction=fractions[i] if fractions else 0.0)
                 for i, k in enumerate(spread(n, len(DEFAULT_TIERS))))


def spread(n: int, available: int) -> list[int]:
    """``n`` of ``available`` tiers: the weakest and the strongest, the others evenly between (1: the strongest)."""
    return [int(k) for k in np.linspace(0, available - 1, n).round()] if n > 1 else [available - 1]


def tier_assignment(num_clients: int, shares: Sequence[float], seed: int) -> np.ndarray:
    """Tier of every client: exact shares (largest remainders), shuffled by the seed."""
    w = np.asarray(shares, dtype=float) / sum(shares)
    counts = np.floor(w * num_clients).astype(int)
    remainder = num_clients - counts.sum()
    counts[np.argsort(-(w * num_clients - counts), kind="stable")[:remainder]] += 1
    tiers = np.repeat(np.arange(len(shares)), counts)
    return np.random.default_rng([seed, 7]).permutation(tiers)


MEASURED = "measured"  # devices=measured: real phones and boards (maestro_fl/measured_devices.py)


@lru_cache(maxsize=8)
def federation_devices(devices: str, num_clients: int, shares: tuple[float, ...], fractions: tuple[float, ...],
                       seed: int) -> tuple[DeviceCapability, ...]:
    """Every client's device, by partition id: the ``devices`` population, or the built-in tiers in ``shares``
    (a config's ``devices``, ``num_clients``, ``tier_shares``, ``tier_fractions`` and ``seed``)."""
    if devices == MEASURED:
        return measured_population(num_clients, shares, seed, fractions)
    if devices:
        return load_population(devices, num_clients)
    tiers = builtin_tiers(shares, fractions)
    return tuple(tiers[int(t)] for t in tier_assignment(num_clients, shares, seed))


def measured_capability(device: MeasuredDevice, table_tier: int, tier: int, rank_fraction: float = 0.0
                        ) -> DeviceCapability:
    """The cost model's view of a ranked device of speed tier ``table_tier`` (speed measured; memory and links
    assumed: :mod:`maestro_fl.measured_devices`), numbered ``tier`` in its federation."""
    up, down, availability = LINK_BY_KIND[device.kind]
    return DeviceCapability(tier, macs_per_s=device.macs_per_s, memory_bytes=MEMORY_BY_TIER[table_tier], up_bps=up,
                            down_bps=down, availability=availability, rank_fraction=rank_fraction)


def measured_assignment(num_clients: int, shares: Sequence[float], seed: int) -> list[tuple[int, int, MeasuredDevice]]:
    """Every client's (tier, speed tier of the table, device) for ``devices=measured``, by partition id.

    Tiers in ``shares`` (exact, shuffled by the seed, as for the built-in population), then a device drawn
    uniformly from its tier's, seeded. ``shares`` has one entry per speed tier, or fewer: then the slowest and
    the fastest, evenly spread, as :func:`spread` picks them.
    """
    n = len(shares)
    if not 0 < n <= NUM_TIERS:
        raise PopulationError(f"tier_shares has {n} entries; devices='measured' has 1 to {NUM_TIERS} tiers")
    table = tiers_of_table()
    picks = spread(n, NUM_TIERS)
    rng = np.random.default_rng([seed, 11])
    out = []
    for t in tier_assignment(num_clients, shares, seed):
        members = table[picks[int(t)]]
        out.append((int(t), picks[int(t)], members[int(rng.integers(len(members)))]))
    return out


def measured_population(num_clients: int, shares: Sequence[float], seed: int,
                        fractions: Sequence[float] = ()) -> tuple[DeviceCapability, ...]:
    """Every client's device, by partition id (``devices=measured``; tiers numbered 0..len(shares)-1).

    ``fractions``: an explicit rank fraction per tier (``tier_fractions``); empty = derive from each device.
    """
    return tuple(measured_capability(device, table_tier, tier, fractions[tier] if fractions else 0.0)
                 for tier, table_tier, device in measured_assignment(num_clients, shares, seed))


def device_in_round(population: Sequence[DeviceCapability], partition: int, server_round: int, dynamic: bool,
                    seed: int) -> DeviceCapability:
    """The device client ``partition`` runs on in ``server_round``: its own (``tier_mode='fixed'``), or, with
    ``dynamic``, one redrawn from the population every round (HeteroFL's dynamic tiers), seeded by round."""
    if not dynamic:
        return population[partition]
    rng = np.random.default_rng([seed, server_round, partition, 2])
    return population[int(rng.integers(len(population)))]


def load_population(source: str, num_clients: int | None = None) -> tuple[DeviceCapability, ...]:
    """The devices of ``source`` (a CSV path or a reference), ordered by ``client_id``, checked."""
    if is_reference(source):
        return _cached_reference(source, num_clients)
    return _cached_csv(source, num_clients)


@lru_cache(maxsize=8)
def _cached_csv(path: str, num_clients: int | None) -> tuple[DeviceCapability, ...]:
    file = Path(path)
    if not file.exists():
        raise PopulationError(f"devices: {path!r} not found (a CSV file, or a reference 'package.module:attr')")
    if not file.is_file():
        raise PopulationError(f"devices: {path!r} is not a file (a CSV file, or a reference 'package.module:attr')")
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a byte-order mark
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise PopulationError(f"devices {path!r}: not a readable CSV ({err})") from None
    for n, row in enumerate(rows, start=2):
        if None in row:  # DictReader keeps a row's fields beyond the header under None
            raise PopulationError(f"devices {path!r} line {n}: {len(fields) + len(row[None])} fields, the header has "
                                  f"{len(fields)} ({', '.join(fields)})")
    return check_rows(rows, fields, f"devices {path!r}", num_clients, first_line=2)


@lru_cache(maxsize=8)
def _cached_reference(reference: str, num_clients: int | None) -> tuple[DeviceCapability, ...]:
    obj = resolve(reference, "devices")
    if callable(obj) and not hasattr(obj, "columns"):
        takes_n = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in inspect.signature(obj).parameters.values())
        obj = obj(num_clients) if takes_n else obj()
    return population_from(obj, num_clients, f"devices {reference!r}")


def population_from(obj: Any, num_clients: int | None, source: str = "devices") -> tuple[DeviceCapability, ...]:
    """The devices of a DataFrame, a list of profiles or a list of dicts, checked like a CSV trace."""
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # a pandas DataFrame
        rows = obj.to_dict("records")
        fields = [str(c) for c in obj.columns]
    elif isinstance(obj, (list, tuple)) and all(isinstance(d, DeviceCapability) for d in obj):
        rows = [{"client_id": i, **dataclasses.asdict(d)} for i, d in enumerate(obj)]
        fields = list(rows[0]) if rows else list(TRACE_COLUMNS)
    elif isinstance(obj, (list, tuple)) and all(isinstance(d, Mapping) for d in obj):
        rows = [dict(d) for d in obj]
        fields = sorted({k for d in rows for k in d})
        for i, row in enumerate(rows):
            row.setdefault("client_id", i)
        fields = sorted(set(fields) | {"client_id"})
    else:
        raise PopulationError(f"{source}: got a {type(obj).__name__}; give a list of DeviceCapability or of dicts, "
                              "a pandas DataFrame, or a function returning one")
    return check_rows(rows, fields, source, num_clients, first_line=0)


def _number(source: str, where: str, column: str, raw: Any) -> float:
    try:
        value = float(raw) if raw is not None and str(raw).strip() != "" else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise PopulationError(f"{source}{' ' + where if where else ''}: {column} must be a finite number, got {raw!r}")
    return value


def check_device(row: Mapping[str, Any], where: str) -> tuple[int, DeviceCapability]:
    """One device's ``(client_id, DeviceCapability)``, checked; a :class:`PopulationError` names ``where`` and the field.

    The one check of a device, whether it comes from a trace or from a client's registration:
    ``client_id`` and ``tier`` integers >= 0; ``macs_per_s``, ``memory_bytes``, ``up_bps``,
    ``down_bps`` finite and > 0; ``availability`` in (0, 1]; ``rank_fraction`` in [0, 1] (0 = derive).
    """
    values = {c: _number(where, "", c, row.get(c)) for c in TRACE_COLUMNS}
    raw_fraction = row.get("rank_fraction")
    fraction = _number(where, "", "rank_fraction", raw_fraction) if raw_fraction not in (None, "") else 0.0
    for c in ("client_id", "tier"):
        if values[c] < 0 or values[c] != int(values[c]):
            raise PopulationError(f"{where}: {c} must be an integer >= 0, got {row[c]!r}")
    for c in ("macs_per_s", "memory_bytes", "up_bps", "down_bps"):
        if values[c] <= 0:
            raise PopulationError(f"{where}: {c} must be > 0, got {row[c]!r}")
    if not 0 < values["availability"] <= 1:
        raise PopulationError(f"{where}: availability must be in (0, 1], got {row['availability']!r}")
    if not 0 <= fraction <= 1:
        raise PopulationError(f"{where}: rank_fraction must be in [0, 1] (0 = derive from the device), "
                              f"got {raw_fraction!r}")
    cap = DeviceCapability(int(values["tier"]), values["macs_per_s"], values["memory_bytes"], values["up_bps"],
                           values["down_bps"], values["availability"], fraction)
    return int(values["client_id"]), cap


def _is_number(raw: Any) -> bool:
    try:
        float(raw)
    except (TypeError, ValueError):
        return False
    return True


def number_tier_labels(rows: Sequence[Mapping[str, Any]], source: str) -> list[Mapping[str, Any]]:
    """Rows whose ``tier`` is a text label (``phone``, ``laptop``) get tier numbers 0..T-1 from the slowest
    label to the fastest (by the median ``macs_per_s`` of its devices), as the built-in tiers are numbered.
    Numeric tiers pass unchanged; a mix of both is refused."""
    labels = [str(r.get("tier", "")).strip() for r in rows]
    text = {label for label in labels if label and not _is_number(label)}
    if not text:
        return list(rows)
    if len(text) != len({label for label in labels if label}):
        raise PopulationError(f"{source}: tier holds both numbers and text labels; use one or the other")
    speeds: dict[str, list[float]] = {}
    for row, label in zip(rows, labels):
        speed = row.get("macs_per_s")
        speeds.setdefault(label, []).append(float(speed) if speed is not None and _is_number(speed) else math.inf)
    order = sorted(text, key=lambda label: (float(np.median(speeds[label])), label))
    number = {label: i for i, label in enumerate(order)}
    LOG.info("%s: tier labels numbered from the slowest: %s", source,
             ", ".join(f"{label}={i}" for label, i in number.items()))
    return [dict(row) | {"tier": number[label]} for row, label in zip(rows, labels)]


def check_rows(
    rows: Sequence[Mapping[str, Any]], fields: list[str], source: str, num_clients: int | None, first_line: int
) -> tuple[DeviceCapability, ...]:
    """Check every row and return the devices ordered by ``client_id``.

    Checked: the required columns; numbers that parse and are finite;
    ``macs_per_s``, ``memory_bytes``, ``up_bps``, ``down_bps`` > 0;
    ``availability`` in (0, 1]; ``rank_fraction`` in [0, 1] (0 = derive);
    ``tier`` an integer ≥ 0, the tiers numbered 0..T-1 without gaps;
    ``client_id`` exactly 0..n-1; and, given ``num_clients``, one row per client.
    """
    missing = [c for c in TRACE_COLUMNS if c not in fields]
    if missing:
        raise PopulationError(f"{source} lacks columns {missing}; required: {list(TRACE_COLUMNS)}, "
                              f"optional: {list(OPTIONAL_COLUMNS)}")
    unknown = [c for c in fields if c not in TRACE_COLUMNS and c not in OPTIONAL_COLUMNS]
    if unknown:
        raise PopulationError(f"{source} has unknown columns {unknown}; allowed: {list(TRACE_COLUMNS)}, "
                              f"and optionally {list(OPTIONAL_COLUMNS)}")
    rows = number_tier_labels(rows, source)
    out: list[tuple[int, DeviceCapability]] = []
    for n, row in enumerate(rows, start=first_line):
        where = f"line {n}" if first_line else f"row {n}"
        out.append(check_device(row, f"{source} {where}"))
    ids = sorted(i for i, _ in out)
    if ids != list(range(len(out))):
        raise PopulationError(f"{source}: client_id must run 0..{len(out) - 1} once each")
    tiers = sorted({cap.tier for _, cap in out})
    if tiers != list(range(len(tiers))):
        raise PopulationError(f"{source}: tiers must be numbered 0..T-1 without gaps, got {tiers}")
    if num_clients is not None and len(out) != num_clients:
        raise PopulationError(f"{source} has {len(out)} clients but num_clients is {num_clients}; "
                              "it needs one row per client")
    return tuple(cap for _, cap in sorted(out, key=lambda t: t[0]))
