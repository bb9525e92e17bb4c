"""Run directories and tidy CSV tables written row by row as a run goes.

Each row is flushed when written, so an interrupted run loses nothing that
finished; a resumed run appends to the same files.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class CsvLog:
    """Append-only CSV with a fixed header (taken from the first row or the existing file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as fh:
                self.columns = next(csv.reader(fh))

    def append(self, row: Mapping[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        new_file = self.columns is None
        if self.columns is None:
            self.columns = list(rows[0])
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="raise")
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
            fh.flush()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return value


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name``, created; a name already taken gets a numeric suffix."""
    base = Path(out_dir) / name
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    path.mkdir(parents=True)
    return path


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def format_table(rows: list[Mapping[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` holds (key, header, format spec)."""
    head = [h for _, h, _ in columns]
    body = [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])
