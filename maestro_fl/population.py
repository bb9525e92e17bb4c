"""Device populations from a CSV trace: read and checked completely before anything starts.

A trace has one row per client (FedScale's device traces, Lai et al., ICML
2022), with the columns :data:`TRACE_COLUMNS` and optionally ``rank_fraction``.
Every problem is a :class:`~maestro_fl.config.ConfigError` naming the file,
the line and the column, and saying what is allowed.
"""

from __future__ import annotations

import csv
import math
from functools import lru_cache
from pathlib import Path

from .budget import DeviceCapability

TRACE_COLUMNS = ("client_id", "tier", "macs_per_s", "memory_bytes", "up_bps", "down_bps", "availability")
OPTIONAL_COLUMNS = ("rank_fraction",)


class PopulationError(ValueError):
    """A population trace is malformed (a :class:`~maestro_fl.config.ConfigError` is raised for it)."""


def _number(path: str, line: int, column: str, raw: str | None) -> float:
    try:
        value = float(raw) if raw is not None and raw.strip() != "" else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PopulationError(f"population_csv {path!r} line {line}: {column} must be a finite number, got {raw!r}")
    return value


@lru_cache(maxsize=8)
def load_population(path: str, num_clients: int | None = None) -> tuple[DeviceCapability, ...]:
    """The devices of a trace, ordered by ``client_id``.

    Checked: the required columns; numbers that parse and are finite;
    ``macs_per_s``, ``memory_bytes``, ``up_bps``, ``down_bps`` > 0;
    ``availability`` in (0, 1]; ``rank_fraction`` in [0, 1] (0 = derive);
    ``tier`` an integer ≥ 0, the tiers numbered 0..T-1 without gaps;
    ``client_id`` exactly 0..n-1; and, given ``num_clients``, one row per client.
    """
    file = Path(path)
    if not file.is_file():
        raise PopulationError(f"population_csv: file {path!r} does not exist")
    try:
        with open(file, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise PopulationError(f"population_csv {path!r}: not a readable CSV ({err})") from None
    missing = [c for c in TRACE_COLUMNS if c not in fields]
    if missing:
        raise PopulationError(f"population_csv {path!r} lacks columns {missing}; required: {list(TRACE_COLUMNS)}, "
                              f"optional: {list(OPTIONAL_COLUMNS)}")
    out: list[tuple[int, DeviceCapability]] = []
    for line, row in enumerate(rows, start=2):
        values = {c: _number(path, line, c, row.get(c)) for c in TRACE_COLUMNS}
        fraction = _number(path, line, "rank_fraction", row.get("rank_fraction")) if row.get("rank_fraction") else 0.0
        for c in ("client_id", "tier"):
            if values[c] < 0 or values[c] != int(values[c]):
                raise PopulationError(f"population_csv {path!r} line {line}: {c} must be an integer >= 0, "
                                      f"got {row[c]!r}")
        for c in ("macs_per_s", "memory_bytes", "up_bps", "down_bps"):
            if values[c] <= 0:
                raise PopulationError(f"population_csv {path!r} line {line}: {c} must be > 0, got {row[c]!r}")
        if not 0 < values["availability"] <= 1:
            raise PopulationError(f"population_csv {path!r} line {line}: availability must be in (0, 1], "
                                  f"got {row['availability']!r}")
        if not 0 <= fraction <= 1:
            raise PopulationError(f"population_csv {path!r} line {line}: rank_fraction must be in [0, 1] "
                                  f"(0 = derive from the device), got {row.get('rank_fraction')!r}")
        cap = DeviceCapability(int(values["tier"]), values["macs_per_s"], values["memory_bytes"], values["up_bps"],
                               values["down_bps"], values["availability"], fraction)
        out.append((int(values["client_id"]), cap))
    ids = sorted(i for i, _ in out)
    if ids != list(range(len(out))):
        raise PopulationError(f"population_csv {path!r}: client_id must run 0..{len(out) - 1} once each")
    tiers = sorted({cap.tier for _, cap in out})
    if tiers != list(range(len(tiers))):
        raise PopulationError(f"population_csv {path!r}: tiers must be numbered 0..T-1 without gaps, got {tiers}")
    if num_clients is not None and len(out) != num_clients:
        raise PopulationError(f"population_csv {path!r} has {len(out)} clients but num_clients is {num_clients}; "
                              "the trace needs one row per client")
    return tuple(cap for _, cap in sorted(out, key=lambda t: t[0]))
