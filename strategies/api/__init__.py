"""The Python API: ``train``, ``simulate``, ``sweep`` and ``compare`` for notebooks and scripts.

Each takes the same settings as the command line (``key=value`` there,
keyword arguments here) and, besides names, objects:

* ``model``: an ``nn.Module`` (copied for every client; width-sliced methods
  need a builder instead), or a function building one, called with whichever
  of ``spec`` (:class:`~maestro_fl.models.InputSpec`), ``width`` and ``norm``
  it accepts;
* ``dataset``: a ``datasets.Dataset``/``DatasetDict``, ``(x, y)`` arrays or
  tensors, ``{"train": (x, y), "test": (x, y)}``, a
  :class:`~maestro_fl.data.TaskData`, or a function returning one of these;
* ``devices``: a pandas DataFrame or a list of device profiles
  (:class:`~maestro_fl.budget.DeviceCapability` or dicts with the columns of
  :data:`maestro_fl.population.TRACE_COLUMNS`), or a function of the number of clients.

An object is registered in this process (:mod:`maestro_fl.references`) and
shipped to the Ray actors and sweep tasks of the run, so it need not be
importable there. Its run directory's ``config.json`` names it
``object:KIND:NAME-N``: such a run is rebuilt (resumed, deployed) by passing
the same object again. A ``"package.module:attr"`` string works everywhere,
also across processes and on a cluster, as long as the module imports there.

Every function checks its settings before anything starts, raising
:class:`~maestro_fl.config.ConfigError` with one line naming the field, and
returns the run (or sweep) directory with its tables as pandas DataFrames.

Examples
--------
>>> from strategies.api import simulate
>>> run = simulate(model=my_builder, dataset=(x, y), rounds=20, num_clients=30)
>>> run.tiers.tail()
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from maestro_fl.config import ConfigError, SimConfig, TrainConfig, resolve
from maestro_fl.references import OBJECT_PREFIX, install, register
from maestro_fl.results import TABLES, RunDir

if TYPE_CHECKING:  # the export module imports torch: only when exporting
    from maestro_fl.export import ExportedModel

__all__ = ["RunResult", "SweepResult", "compare", "export", "plan", "simulate", "sweep", "train"]


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and its tables (``rounds``, ``tiers``, ``clients``... by name)."""

    run_dir: Path
    tables: dict[str, pd.DataFrame] = field(repr=False)

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"{name!r}: this run has the tables {sorted(tables)}")

    @classmethod
    def read(cls, run_dir: str | Path) -> RunResult:
        """Every table of the schema (:mod:`maestro_fl.results`) that the run directory holds."""
        run = RunDir(run_dir)
        tables = {t.file.removesuffix(".csv"): run.table(t) for t in TABLES.values() if run.has(t)}
        return cls(Path(run_dir), tables)


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep or comparison: its directory, ``results`` (one row per run and tier) and, for a
    comparison, ``summary`` (per method and tier, mean ± std over seeds) and ``matched`` (FedLoD at the
    width tiers' footprints)."""

    root: Path
    results: pd.DataFrame
    summary: pd.DataFrame | None = None
    matched: pd.DataFrame | None = None


def _object_settings(model: Any, dataset: Any, devices: Any) -> dict[str, str]:
    """Config values naming the given objects (strings pass through as names or references)."""
    out: dict[str, str] = {}
    for key, value in (("model", model), ("dataset", dataset), ("devices", devices)):
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else register(value, key)
    return out


def _speak() -> None:
    """Phase lines, the budget table and warnings to standard error, as the command prints them, unless the
    caller has set up logging (a handler on ``maestro_fl`` or on the root logger, as ``basicConfig`` adds)."""
    if not logging.getLogger("maestro_fl").handlers and not logging.getLogger().handlers:
        from ..cli.main import configure_output

        configure_output(logging.INFO)


def _config(cls: type, config: str | Path | None, overrides: dict[str, Any]) -> Any:
    """``cls`` resolved from an optional TOML file and keyword overrides (lists for tuple fields)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return resolve(cls, config, values)


def simulate(
    model: Any = None,
    dataset: Any = None,
    devices: Any = None,
    *,
    config: str | Path | None = None,
    **overrides: Any,
) -> RunResult:
    """Run a heterogeneous federation (``maestro-fl simulate``) and return its tables.

    Parameters
    ----------
    model, dataset, devices
        Names, references or objects (see the module docstring); ``None`` keeps the config's.
    config : path, optional
        A TOML file of :class:`~maestro_fl.config.SimConfig` values, applied before ``overrides``.
    **overrides
        Any SimConfig field, e.g. ``rounds=30, backend="local"`` (``strategy`` picks the method).
    """
    _speak()
    from ..runners.launch import run_simulation

    cfg = _config(SimConfig, config, overrides | _object_settings(model, dataset, devices))
    return RunResult.read(run_simulation(cfg))


def plan(
    model: Any = None,
    dataset: Any = None,
    devices: Any = None,
    *,
    config: str | Path | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """What every device tier can afford (``maestro-fl plan``), one row per tier; nothing runs.

    The same keys as :func:`simulate`. Columns: ``served_by`` (``rank``, ``width``, ``width floor``,
    ``full`` or ``nothing``), ``width``, ``fraction``, the footprint (``params``, ``macs``,
    ``bytes_per_round``), the tier's own needs against its weakest device (``own_memory`` /
    ``have_memory`` bytes, ``own_seconds`` / ``have_seconds``), what the next larger sub-model breaks
    (``binding``, ``need_memory``, ``need_seconds``), ``unaffordable`` clients and ``advice``. The table is
    also logged, as the command prints it.
    """
    _speak()
    from ..cli.plan import plan_rows
    from ..server_app import format_plan

    rows = plan_rows(_config(SimConfig, config, overrides | _object_settings(model, dataset, devices)))
    logging.getLogger("maestro_fl").info("what each tier can afford:\n%s", format_plan(rows))
    return pd.DataFrame(rows)


def export(
    run: RunResult | str | Path,
    tier: int | None = None,
    fraction: float | None = None,
    *,
    out: str | Path | None = None,
    model: Any = None,
    dataset: Any = None,
    devices: Any = None,
) -> ExportedModel:
    """A tier's deployable model (``maestro-fl export``): ``model.pt2``, loadable with ``torch.export.load``.

    Parameters
    ----------
    run
        A finished run (what :func:`simulate` returned) or its directory.
    tier, fraction
        One of them: the device tier, or the largest sub-model a budget of that fraction buys.
    out
        The folder to write to (default ``RUN_DIR/export/tier-T``).
    model, dataset, devices
        For a run built from Python objects in another process: the same objects again.
    """
    from maestro_fl.export import export_tier

    run_dir = run.run_dir if isinstance(run, RunResult) else Path(run)
    saved = RunDir(run_dir).config()
    given = {"model": model, "dataset": dataset, "devices": devices}
    install({saved[key]: obj for key, obj in given.items()
             if obj is not None and isinstance(saved.get(key), str) and saved[key].startswith(OBJECT_PREFIX)})
    return export_tier(run_dir, tier=tier, fraction=fraction, out=out)


def train(
    model: Any = None,
    dataset: Any = None,
    *,
    config: str | Path | None = None,
    **overrides: Any,
) -> RunResult:
    """Centralized LoD (or DLRT) training, evaluated at a ladder of ranks (``maestro-fl train``).

    The tables are ``epochs``, ``ranks`` and ``ladder``; ``model.pt`` holds the trained model.
    """
    _speak()
    from maestro_fl.centralized import run_train

    cfg = _config(TrainConfig, config, overrides | _object_settings(model, dataset, None))
    return RunResult.read(run_train(cfg))


def sweep(
    spec: str | Path | dict[str, Any],
    *,
    model: Any = None,
    dataset: Any = None,
    devices: Any = None,
) -> SweepResult:
    """Run a sweep (``maestro-fl sweep``): a TOML file, or the same tables as a dict.

    ``spec`` as a dict has the file's tables: ``{"sweep": {...}, "base": {...},
    "grid": {...}, "methods": {...}}``. Objects given here apply to every run.
    """
    _speak()
    from ..sweeps.sweep import build_sweep, load_sweep, run_sweep

    objects = _object_settings(model, dataset, devices)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"sweep", "base", "grid", "methods"})
        if unknown:
            raise ConfigError(f"sweep: unknown table(s) {unknown}; allowed: ['sweep', 'base', 'grid', 'methods']")
        built = build_sweep(dict(spec.get("sweep", {})), dict(spec.get("base", {})) | objects,
                            dict(spec.get("grid", {})), dict(spec.get("methods", {"": {}})))
    else:
        built = load_sweep(spec, objects)
    root = run_sweep(built)
    return SweepResult(root, RunDir(root).table("results.csv"))


def compare(
    model: Any = None,
    dataset: Any = None,
    devices: Any = None,
    *,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str = "runs",
    **overrides: Any,
) -> SweepResult:
    """Every method (or ``methods``) × ``seeds`` on the same data and devices (``maestro-fl compare``).

    ``methods`` are names of :data:`strategies.sweeps.compare.METHODS`.
    """
    _speak()
    from ..sweeps.compare import run_compare

    settings = overrides | _object_settings(model, dataset, devices)
    items = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in settings.items()]
    root = run_compare(items, seeds=tuple(seeds), out_dir=out_dir, methods=tuple(methods) if methods else None)
    run = RunDir(root)
    matched = run.table("matched.csv") if (root / "matched.csv").is_file() and \
        (root / "matched.csv").stat().st_size > 1 else None
    return SweepResult(root, run.table("results.csv"), run.table("compare.csv"), matched)
