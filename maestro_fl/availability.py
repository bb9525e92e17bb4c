"""When each client is online, on the simulated clock: a trace file, or a diurnal generator.

A device in a real federation is online in windows (charging, on Wi-Fi, idle),
and those windows differ between devices and over the day. FedScale (Lai et
al., ICML 2022) replays such traces on a virtual clock; so does this module.
A schedule is, per client, a set of disjoint online intervals ``[start, end)``
in simulated seconds that repeats every ``period_s``:

- **a trace** (``availability=PATH.csv``): one row per online interval,
  ``client,start_s,end_s``; it repeats after its largest ``end_s``;
- **diurnal** (``availability=diurnal``): client ``k`` is online for
  ``duty`` of every simulated day, from a phase drawn uniformly in the day
  (seeded); ``diurnal_duty`` may differ by tier (weak devices online less).

The server (:class:`maestro_fl.server.FederationServer`) selects only clients
online when a round starts, and a client whose simulated round outlasts its
online interval drops out (``offline`` in clients.csv).
"""

from __future__ import annotations

import csv
import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the columns of a trace file
TRACE_FILE_COLUMNS = ("client", "start_s", "end_s")
#: ``availability=diurnal``: the generator instead of a file
DIURNAL = "diurnal"


class AvailabilityError(ValueError):
    """A trace file or a generator setting that cannot be used (one line naming the field)."""


@dataclass(frozen=True)
class OnlineSchedule:
    """Per client, sorted disjoint online intervals within one period, repeated every ``period_s``.

    Parameters
    ----------
    starts, ends : sequence of tuple of float
        ``starts[k][i] < ends[k][i] <= starts[k][i + 1]``, all in ``[0, period_s]``.
    period_s : float
        The schedule repeats after this many simulated seconds.
    """

    starts: tuple[tuple[float, ...], ...]
    ends: tuple[tuple[float, ...], ...]
    period_s: float

    @property
    def num_clients(self) -> int:
        return len(self.starts)

    def online_until(self, client: int, t: float) -> float | None:
        """When the online interval holding simulated time ``t`` ends (``inf``: never), or ``None``: offline at ``t``."""
        starts, ends, period = self.starts[client], self.ends[client], self.period_s
        cycle = math.floor(t / period)
        tau = t - cycle * period
        i = bisect_right(starts, tau) - 1
        if i < 0 or tau >= ends[i]:
            return None
        if ends[i] < period or starts[0] > 0.0:
            return cycle * period + ends[i]
        # online up to the period's end and from 0 again: the interval goes on into the next period
        if ends[0] >= period:
            return math.inf
        return (cycle + 1) * period + ends[0]

    def online(self, client: int, t: float) -> bool:
        return self.online_until(client, t) is not None

    def next_online(self, t: float) -> float:
        """The first simulated time at or after ``t`` when some client is online (``t`` when one is already)."""
        period = self.period_s
        cycle = math.floor(t / period)
        tau = t - cycle * period
        best = math.inf
        for k in range(self.num_clients):
            if self.online_until(k, t) is not None:
                return t
            i = bisect_right(self.starts[k], tau)  # the first interval that starts after tau, in this period or the next
            best = min(best, cycle * period + self.starts[k][i] if i < len(self.starts[k])
                       else (cycle + 1) * period + self.starts[k][0])
        return best

    def online_share(self, client: int) -> float:
        """The share of the period that ``client`` is online."""
        return sum(e - s for s, e in zip(self.starts[client], self.ends[client])) / self.period_s


def load_trace(path: str | Path, num_clients: int) -> OnlineSchedule:
    """The schedule of a trace file (``client,start_s,end_s``, one row per online interval), checked.

    Raises
    ------
    AvailabilityError
        With the file, the line and the field: a missing column, a value that is not a number, a negative time,
        an interval that ends before it starts, an unknown client, overlapping intervals, or a client that is
        never online.
    """
    where = f"availability {str(path)!r}"
    file = Path(path)
    if not file.is_file():
        raise AvailabilityError(f"{where}: no such file (a CSV of client,start_s,end_s, or '{DIURNAL}')")
    try:
        with open(file, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a byte-order mark
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise AvailabilityError(f"{where}: not a readable CSV ({err})") from None
    missing = [c for c in TRACE_FILE_COLUMNS if c not in fields]
    if missing:
        raise AvailabilityError(f"{where}: missing column(s) {missing}; a trace has the columns "
                                f"{','.join(TRACE_FILE_COLUMNS)} (one row per online interval)")
    intervals: list[list[tuple[float, float, int]]] = [[] for _ in range(num_clients)]
    for line, raw in enumerate(rows, start=2):
        row = {str(k).strip(): v for k, v in raw.items() if k is not None}
        client = _number(where, line, "client", row.get("client"))
        if client != int(client) or not 0 <= client < num_clients:
            raise AvailabilityError(f"{where} line {line}: client {row.get('client')!r} is not a client of the run "
                                    f"(an integer in [0, {num_clients}))")
        start, end = _number(where, line, "start_s", row.get("start_s")), _number(where, line, "end_s", row.get("end_s"))
        if start < 0 or end < 0:
            raise AvailabilityError(f"{where} line {line}: start_s and end_s must be >= 0 simulated seconds, got "
                                    f"{start:g} and {end:g}")
        if end <= start:
            raise AvailabilityError(f"{where} line {line}: end_s ({end:g}) must be after start_s ({start:g})")
        intervals[int(client)].append((start, end, line))
    never = [k for k, spans in enumerate(intervals) if not spans]
    if never:
        raise AvailabilityError(f"{where}: never online (no row): client(s) {_listed(never)}; every client of the "
                                "run needs an interval (or the run has fewer clients: num_clients)")
    period = max(end for spans in intervals for _, end, _ in spans)
    starts, ends = [], []
    for k, spans in enumerate(intervals):
        spans.sort()
        for (s0, e0, l0), (s1, _, l1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise AvailabilityError(f"{where} lines {l0} and {l1}: client {k}'s intervals overlap "
                                        f"([{s0:g}, {e0:g}) and one from {s1:g})")
        starts.append(tuple(s for s, _, _ in spans))
        ends.append(tuple(e for _, e, _ in spans))
    return OnlineSchedule(tuple(starts), tuple(ends), period)


def diurnal_schedule(tiers: Sequence[int], day_s: float, duty: Sequence[float], seed: int) -> OnlineSchedule:
    """Every client online for its tier's share ``duty`` of each simulated day, from a seeded uniform phase.

    Parameters
    ----------
    tiers : sequence of int
        Each client's tier, by partition id.
    day_s : float
        A simulated day (the schedule's period).
    duty : sequence of float
        The share of the day a client is online: one value for every tier, or one per tier (tier 0 first).
    seed : int
        The run's seed (the phases depend on nothing else).
    """
    if not day_s > 0 or not math.isfinite(day_s):
        raise AvailabilityError(f"diurnal_day_s must be a positive number of simulated seconds, got {day_s!r}")
    if not duty or any(not 0.0 < d <= 1.0 for d in duty):
        raise AvailabilityError(f"diurnal_duty must be shares of the day in (0, 1], got {tuple(duty)!r}")
    top = max(tiers, default=0)
    if len(duty) != 1 and len(duty) <= top:
        raise AvailabilityError(f"diurnal_duty has {len(duty)} entries, the population has tiers 0-{top}: give "
                                "one share for every tier, or one per tier")
    phases = np.random.default_rng([seed, 25]).uniform(0.0, day_s, len(tiers))
    starts: list[tuple[float, ...]] = []
    ends: list[tuple[float, ...]] = []
    for phase, tier in zip(phases.tolist(), tiers):
        length = (duty[0] if len(duty) == 1 else duty[tier]) * day_s
        if length >= day_s:
            starts.append((0.0,))
            ends.append((day_s,))
        elif phase + length <= day_s:
            starts.append((phase,))
            ends.append((phase + length,))
        else:  # the window wraps past midnight: the end of the day and its start
            starts.append((0.0, phase))
            ends.append((phase + length - day_s, day_s))
    return OnlineSchedule(tuple(starts), tuple(ends), day_s)


def schedule_for(source: str, tiers: Sequence[int], day_s: float, duty: Sequence[float], seed: int) -> OnlineSchedule:
    """The schedule ``availability=source`` names: :data:`DIURNAL` or a trace file, for clients of ``tiers``."""
    if source == DIURNAL:
        return diurnal_schedule(tiers, day_s, duty, seed)
    return load_trace(source, len(tiers))


def _number(where: str, line: int, column: str, raw: object) -> float:
    try:
        value = float(str(raw).strip()) if raw is not None and str(raw).strip() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AvailabilityError(f"{where} line {line}: {column} must be a finite number, got {raw!r}")
    return value


def _listed(items: list[int], most: int = 8) -> str:
    return ", ".join(map(str, items[:most])) + (f" and {len(items) - most} more" if len(items) > most else "")
