"""``maestro-fl sweep SWEEP.toml``: a grid of federated runs as Ray tasks.

The file has three tables::

    [sweep]                 # where and how
    name = "compare"
    out_dir = "runs/sweeps"
    ray_address = ""        # '' = a local Ray; 'auto' or host:port = an existing cluster
    cpus_per_run = 1
    gpus_per_run = 0        # a GPU share per run; its clients train on it when num_gpus_per_client > 0

    [base]                  # SimConfig values shared by every run
    rounds = 20

    [grid]                  # SimConfig fields, each with a list of values: the runs are their product
    seed = [0, 1, 2]

    [methods.fedlod_svd]    # optional: named methods, each a table of SimConfig values, crossed with the grid
    aggregation = "svd"

Every run gets its own run directory under ``out_dir/name`` and runs in-process
(``backend=local``) inside its Ray task, so a sweep spreads over a machine's
cores or a cluster's nodes. A run that finished (``result.json``) is skipped
when the sweep runs again; one that was interrupted resumes from its
checkpoint; one that fails is recorded with its error and the others go on.
``results.csv`` holds one row per run and tier, rewritten as runs finish.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from maestro_fl.config import ConfigError, SimConfig, read_toml, resolve, to_dict
from maestro_fl.methods import METHODS
from maestro_fl.results import CHECKPOINT_FILE, CONFIG_FILE, RunDir, RunDirError, check_name

from ..runners.launch import object_fields, quiet_flower
from ..runners.ray_grid import export_objects

#: written in a run's directory when the run finished: a later sweep skips it
RESULT_FILE = "result.json"
SWEEP_KEYS = {"name": str, "out_dir": str, "ray_address": str, "cpus_per_run": (int, float), "gpus_per_run": (int, float)}


@dataclass(frozen=True)
class Sweep:
    name: str
    out_dir: Path
    ray_address: str
    cpus_per_run: float
    gpus_per_run: float
    runs: tuple[tuple[str, dict[str, Any], SimConfig], ...]  # (run name, grid values, config)

    @property
    def root(self) -> Path:
        return self.out_dir / self.name


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``1.5 h``: an estimate's precision."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _run_name(values: dict[str, Any]) -> str:
    text = ",".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9=,._-]", "_", text)
    if len(name) > 100:  # a file name has 255 bytes: a long grid point keeps its start and a digest of the rest
        import hashlib

        name = f"{name[:90]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def failed_runs(root: str | Path) -> list[str]:
    """The runs of a sweep directory's ``results.csv`` that failed (each has an ``error.txt``)."""
    path = Path(root) / "results.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path, keep_default_na=False)
    if "status" not in table or "run" not in table:
        return []
    return sorted(set(table.loc[table["status"] != "ok", "run"].astype(str)))


def load_sweep(path: str | Path, base: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file; every run's config is validated before anything runs.

    ``base``: values added to the file's ``[base]`` (the Python API's objects).
    """
    path = Path(path)
    data = read_toml(path, "sweep file")
    unknown = sorted(set(data) - {"sweep", "base", "grid", "methods"})
    if unknown:
        raise ConfigError(f"sweep file: unknown table(s) {unknown}; allowed: ['sweep', 'base', 'grid', 'methods']")
    head = data.get("sweep", {})
    return build_sweep(head, data.get("base", {}) | (base or {}), data.get("grid", {}), data.get("methods", {"": {}}),
                       default_name=path.stem)


def flat_options(values: dict[str, Any]) -> dict[str, Any]:
    """A table's ``method`` sub-table (TOML reads ``method.mu = 1`` so) as ``method.NAME`` keys, so that the
    options of ``[base]``, a method's table and ``[grid]`` add up rather than replace one another."""
    nested = values.get("method")
    if not isinstance(nested, dict):
        return values
    return {k: v for k, v in values.items() if k != "method"} | {f"method.{k}": v for k, v in nested.items()}


def build_sweep(
    head: dict[str, Any],
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    methods: dict[str, dict[str, Any]],
    default_name: str = "sweep",
) -> Sweep:
    """A checked sweep: every run's SimConfig is resolved (and so validated) here."""
    if not isinstance(methods, dict) or not methods or not all(isinstance(m, dict) for m in methods.values()):
        raise ConfigError("[methods] must hold at least one table of config values, e.g. [methods.fedlod]")
    for method, method_values in methods.items():
        nested = [k for k, v in method_values.items() if isinstance(v, dict) and k != "method"]  # method.NAME: options
        if nested:  # TOML reads [methods.a.b] as table b inside table a
            raise ConfigError(f"[methods.{method}.{nested[0]}]: a method's name cannot contain a dot; "
                              f"write [methods.{method}_{nested[0]}]")
    bad = sorted(set(head) - set(SWEEP_KEYS))
    if bad:
        raise ConfigError(f"[sweep]: unknown key(s) {bad}; allowed: {sorted(SWEEP_KEYS)}")
    if not grid:
        raise ConfigError("[grid] is empty: give at least one SimConfig field with a list of values")
    names = {f.name for f in fields(SimConfig)}
    for key, grid_values in grid.items():
        if key not in names and not key.startswith("method."):  # "method.NAME": the method's own option
            raise ConfigError(f"[grid]: unknown config key {key!r}; allowed keys: {sorted(names)} and a method's "
                              "options as \"method.NAME\"")
        if not isinstance(grid_values, list) or not grid_values:
            raise ConfigError(f"[grid].{key} must be a non-empty list of values, got {grid_values!r}")
    for where, table in (("[base]", base), ("[grid]", grid), *((f"[methods.{m}]", v) for m, v in methods.items())):
        placed = sorted(set(table) & {"resume", "run_name"})
        if placed:
            raise ConfigError(f"{where}: {placed[0]} cannot be set in a sweep: every run gets its own run directory "
                              "(out_dir/name/RUN), and running the sweep again resumes its unfinished runs")
    try:
        check_name("[sweep].name", str(head.get("name", default_name)))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    runs = []
    for method, combo in itertools.product(methods, itertools.product(*grid.values())):
        values = ({"method": method} if method else {}) | dict(zip(grid, combo))
        name = _run_name(values)
        try:
            overrides = flat_options(base) | flat_options(methods[method]) | dict(zip(grid, combo))
            cfg = resolve(SimConfig, overrides=overrides | {"backend": "local", "progress": False})
            METHODS[cfg.strategy].check_config(cfg)  # the method's own options, before any run starts
        except ConfigError as err:
            raise ConfigError(f"run {name}: {err}") from None
        runs.append((name, values, cfg))
    return Sweep(
        name=str(head.get("name", default_name)),
        out_dir=Path(head.get("out_dir", "runs/sweeps")),
        ray_address=str(head.get("ray_address", "")),
        cpus_per_run=float(head.get("cpus_per_run", 1)),
        gpus_per_run=float(head.get("gpus_per_run", 0)),
        runs=tuple(runs),
    )


def _ray_node() -> str:
    """The Ray node this process runs on ('' outside Ray): where a sweep's run executed."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def run_one(cfg: SimConfig, run_dir: Path, sys_path: list[str] | None = None, objects: bytes = b"") -> dict[str, Any]:
    """Run (or resume) one grid point in ``run_dir``; writes :data:`RESULT_FILE` when it finished
    (with the host and Ray node it ran on).

    In a Ray task, ``sys_path`` and ``objects`` bring the driver's import path
    and the Python API's objects the run refers to.
    """
    from ..runners.launch import run_simulation
    from ..runners.ray_grid import install_objects, use_driver_path

    use_driver_path(sys_path or [])
    install_objects(objects)

    if run_dir.exists() and not (run_dir / CHECKPOINT_FILE).exists():
        shutil.rmtree(run_dir)  # died before its first round: nothing to resume
    if run_dir.exists():
        cfg = replace(cfg, resume=str(run_dir))
    else:
        cfg = replace(cfg, out_dir=str(run_dir.parent), run_name=run_dir.name)
    started = time.time()
    run_simulation(cfg)
    result = {"seconds": time.time() - started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "host": socket.gethostname(), "ray_node": _ray_node()}
    (run_dir / RESULT_FILE).write_text(json.dumps(result))
    return result


def _rows(sweep: Sweep, name: str, values: dict[str, Any], status: str, error: str = "") -> list[dict[str, Any]]:
    run_dir = sweep.root / name
    base = {"run": name, **{k: v if not isinstance(v, list) else " ".join(map(str, v)) for k, v in values.items()},
            "status": status, "error": error}
    if status != "ok":
        return [base]
    return [base | row for row in RunDir(run_dir).final_table()]


#: SimConfig fields that say where and how a run executes, not what it computes
RUN_LOCATION_FIELDS = ("out_dir", "run_name", "resume", "progress", "backend")


def differing_fields(stored: dict[str, Any], cfg: SimConfig) -> list[str]:
    """The fields in which a stored run's config differs from ``cfg`` (where and how it ran aside).

    A field added after that run was made counts as its default: new fields
    default to the old behaviour. Fields the method never reads
    (``FederatedMethod.unread_fields``: a width method ignores how LoD factors
    start) cannot make two of its runs differ.
    """
    wanted = json.loads(json.dumps(to_dict(cfg)))
    defaults = json.loads(json.dumps(to_dict(SimConfig())))
    method = METHODS.get(cfg.strategy)
    unread = method.unread_fields if method is not None and stored.get("strategy") == cfg.strategy else frozenset()
    return sorted(k for k in wanted if k not in RUN_LOCATION_FIELDS and k not in unread
                  and stored.get(k, defaults.get(k)) != wanted[k])


def _check_existing_runs(sweep: Sweep) -> None:
    """A run directory left by an earlier sweep must hold the same experiment, or nothing runs.

    Otherwise changing ``[base]`` and running the sweep again would silently
    reuse (skip or resume) runs made with the old settings.
    """
    for name, _, cfg in sweep.runs:
        stored_path = sweep.root / name / CONFIG_FILE
        if not stored_path.is_file():
            continue
        try:
            stored = RunDir(stored_path.parent).config()
        except RunDirError as err:
            raise ConfigError(f"run {name}: {err}") from None
        differ = differing_fields(stored, cfg)
        if differ:
            wanted = to_dict(cfg)
            shown = ", ".join(f"{k}: {stored.get(k)!r} there, {wanted[k]!r} now" for k in differ[:3])
            raise ConfigError(
                f"run {name}: {stored_path.parent} holds a run with other settings ({shown}); "
                "give the sweep another name or out_dir, or delete that run directory"
            )


def run_sweep(path_or_sweep: str | Path | Sweep) -> Path:
    """Run every grid point not finished yet; returns the sweep directory (with results.csv)."""
    import ray

    sweep = path_or_sweep if isinstance(path_or_sweep, Sweep) else load_sweep(path_or_sweep)
    sweep.root.mkdir(parents=True, exist_ok=True)
    (sweep.root / "sweep.json").write_text(
        json.dumps({"runs": [{"run": n, "values": v, "config": to_dict(c)} for n, v, c in sweep.runs]}, indent=1)
    )
    _check_existing_runs(sweep)
    rows: dict[str, list[dict[str, Any]]] = {}
    todo = []
    for name, values, cfg in sweep.runs:
        if (sweep.root / name / RESULT_FILE).exists():
            rows[name] = _rows(sweep, name, values, "ok")
        else:
            todo.append((name, values, cfg))
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} finished already", flush=True)
    if todo:
        quiet_flower()  # Flower's and Ray's environment settings, before Ray starts
        # a Ray this process already runs (a notebook's, a test session's) is used as it is and left running;
        # a sweep that names a cluster gets that cluster
        started_here = bool(sweep.ray_address) or not ray.is_initialized()
        if started_here:
            if ray.is_initialized():
                raise ConfigError(f"sweep {sweep.name}: ray_address = {sweep.ray_address!r}, but this process is "
                                  "already connected to a Ray; call ray.shutdown() first, or drop ray_address")
            # a cluster brings its own CPUs; a local Ray gets this machine's
            num_cpus = None if sweep.ray_address else os.cpu_count() or 1
            ray.init(address=sweep.ray_address or "local", include_dashboard=False, logging_level=logging.ERROR,
                     num_cpus=num_cpus)
        try:
            task = ray.remote(num_cpus=sweep.cpus_per_run, num_gpus=sweep.gpus_per_run)(run_one)
            sys_path = [os.path.abspath(p or os.getcwd()) for p in sys.path]
            objects = export_objects(*{v for _, _, c in todo for v in object_fields(c)})
            pending = {task.remote(cfg, (sweep.root / name).resolve(), sys_path, objects): (name, values)
                       for name, values, cfg in todo}
            done = failed = 0
            began = time.monotonic()  # for the ETA on screen only; nothing recorded depends on it
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                name, values = pending.pop(ready[0])
                done += 1
                try:
                    ray.get(ready[0])
                    rows[name] = _rows(sweep, name, values, "ok")
                    status = "finished"
                except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
                    message = "".join(traceback.format_exception_only(type(err), err)).strip()
                    (sweep.root / name).mkdir(parents=True, exist_ok=True)
                    (sweep.root / name / "error.txt").write_text(message + "\n")
                    rows[name] = _rows(sweep, name, values, "failed", message.splitlines()[-1][:300])
                    status, failed = "FAILED", failed + 1
                running = min(len(pending), max(1, int(ray.cluster_resources().get("CPU", 1) // sweep.cpus_per_run)))
                left = (time.monotonic() - began) / done * (len(todo) - done)
                eta = f", ETA {format_duration(left)}" if pending else ""
                print(f"[{done}/{len(todo)} done, {running} running, {failed} failed{eta}] {name}: {status}",
                      flush=True)
                _write_results(sweep, rows)
        finally:
            if started_here:
                ray.shutdown()
    _write_results(sweep, rows)
    return sweep.root


def _write_results(sweep: Sweep, rows: dict[str, list[dict[str, Any]]]) -> None:
    order = [name for name, _, _ in sweep.runs if name in rows]
    table = pd.DataFrame([r for name in order for r in rows[name]])
    tmp = sweep.root / "results.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, sweep.root / "results.csv")
