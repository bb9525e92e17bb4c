"""``maestro-fl simulate``: run a federation on a backend.

The ServerApp's loop runs in this process; the ClientApp, loaded by its
Flower reference (:data:`maestro_fl.message_keys.CLIENTAPP_REF`), runs

* ``backend=ray`` (default): in a pool of Ray actors of ``num_cpus_per_client``/
  ``num_gpus_per_client`` each (:class:`~strategies.runners.ray_grid.RayGrid`);
* ``backend=flower``: in Flower's own simulation engine (``run_simulation``,
  its Ray backend; see :mod:`strategies.runners.ray_grid` for why it is not the default);
* ``backend=local``: in this process, one message after another.

Ray is started here (or attached to ``ray_address``) and always shut down at
the end; Flower's home, telemetry and update checks are pointed away from the
user's machine and the network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from maestro_fl import message_keys as P
from maestro_fl.config import RESUMABLE, ConfigError, SimConfig, resolve, to_dict
from maestro_fl.federated import check_task, share_task
from maestro_fl.references import OBJECT_PREFIX
from maestro_fl.results import RunDir, new_run_dir, safe_name, timestamp
from maestro_fl.training import torch_threads

from ..server_app import StopRequest, print_final, run_server, wait_for_nodes
from .process_reaper import reaped
from .ray_grid import load_ref

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
#: Ray's coming default (it will stop hiding GPUs from actors given num_gpus=0), taken now: Ray warns
#: otherwise at every start, and clients choose their device by num_gpus_per_client, not by what they see
RAY_ENV = {
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray starts its workers at nice 15 so that its own daemons stay responsive; beside any other busy
    # process (a build, a second sweep, a browser) a nice-15 worker then gets ~3% of a core. Measured on a
    # 2-core machine with two CPU-bound processes beside it: 200 actor calls took 3.5-4.1 s at nice 15 and
    # 0.1-0.3 s at nice 0 (0.2 s idle). Simulated clients are the job, not background work.
    "RAY_worker_niceness": "0",
}
LOG = logging.getLogger("maestro_fl")


def quiet_flower() -> None:
    """No telemetry, no update check, and a Flower home of our own (unless the user set one)."""
    for key, value in (FLOWER_ENV | RAY_ENV).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(tempfile.gettempdir()) / f"maestro-fl-flwr-{os.getuid()}"))




def prepare_run_dir(cfg: SimConfig) -> tuple[SimConfig, Path]:
    """A new run directory, or the one to resume with its saved config.

    On resume, the saved config is the run's; only the fields of
    :data:`RESUMABLE` may be changed (e.g. more ``rounds``). Any other field
    set to a value other than the saved one is refused, naming it.
    """
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = RunDir(run_dir).config()
        RunDir(run_dir).checkpoint()  # a damaged checkpoint is one line now, not after the engine started
        defaults, given = to_dict(SimConfig()), to_dict(cfg)
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != defaults.get(k)
                         and v != saved.get(k))
        if changed:
            shown = ", ".join(f"{k}={given[k]!r} (the run has {saved.get(k)!r})" for k in changed)
            raise ConfigError(f"resume: a resumed run keeps its settings; cannot change {shown}. "
                              f"Allowed with resume: {', '.join(RESUMABLE[:-3])}")
        saved.update({k: given[k] for k in RESUMABLE if given[k] != defaults[k]} | {"resume": str(run_dir)})
        return resolve(SimConfig, overrides=saved), run_dir
    name = cfg.run_name or safe_name(f"sim-{cfg.dataset}-{cfg.model}-s{cfg.seed}-{timestamp()}")
    run_dir = new_run_dir(cfg.out_dir, name)
    RunDir(run_dir).save_config(to_dict(cfg))
    return cfg, run_dir


def object_fields(cfg: SimConfig) -> tuple[str, ...]:
    """The config's components given as objects of the Python API (``object:...``)."""
    return tuple(v for v in (cfg.model, cfg.dataset, cfg.devices) if v.startswith(OBJECT_PREFIX))


def run_simulation(cfg: SimConfig) -> Path:
    """Run (or resume) a federation; returns its run directory.

    Raises
    ------
    RunInterrupted
        After a first Ctrl-C (SIGINT or SIGTERM): the round under way was
        abandoned, the tables and checkpoint hold every round before it.
    """
    cfg.validate()
    if cfg.backend == "flower" and object_fields(cfg):
        raise ConfigError("backend='flower' cannot ship the Python API's objects to its workers; use backend='ray' "
                          "or 'local', or name them by a 'package.module:attr' reference")
    if not cfg.resume:
        with torch_threads(cfg.server_threads):
            check_task(cfg)  # data, partition and model, before a run directory exists
    cfg, run_dir = prepare_run_dir(cfg)
    quiet_flower()
    with RunDir(run_dir).lock(), StopRequest() as stop:
        if cfg.backend == "local":
            from .local_grid import LocalGrid

            grid = LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients, should_stop=stop.requested)
            rows = run_server(grid, cfg, run_dir, stop=stop)
        elif cfg.backend == "ray":
            rows = _run_on_ray_grid(cfg, run_dir, stop)
        else:
            rows = _run_on_flower_engine(cfg, run_dir)
    if cfg.progress:
        print(f"\nrun directory: {run_dir}")
        print_final(rows, cfg.dataset)
    else:
        LOG.info("run directory: %s", run_dir)
    return run_dir


def ray_init_args(cfg_address: str) -> dict[str, Any]:
    """``ray.init`` arguments: attach to ``ray_address``, or start a Ray of our own (never a stale one)."""
    args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if cfg_address:
        args["address"] = cfg_address
    else:
        # 'local' starts our own Ray even where another cluster's address file lingers in /tmp/ray
        # (ray.init() would otherwise try to join it, and hang if it is gone)
        args.update(address="local", num_cpus=os.cpu_count() or 1)
    return args


def _run_on_ray_grid(cfg: SimConfig, run_dir: Path, stop: StopRequest) -> list[dict[str, object]]:
    import ray

    if ray.is_initialized() or cfg.ray_address:  # a Ray someone else started: its processes are not ours to end
        return _run_on_ray(cfg, run_dir, stop)
    with reaped():  # every process of the Ray started here ends with the run, SIGKILL of this one included
        return _run_on_ray(cfg, run_dir, stop)


def _run_on_ray(cfg: SimConfig, run_dir: Path, stop: StopRequest) -> list[dict[str, object]]:
    import ray

    from .ray_grid import RayGrid, export_objects

    started_here = not ray.is_initialized()
    if started_here:
        LOG.info("starting Ray (%s)", f"attaching to {cfg.ray_address}" if cfg.ray_address else
                 f"a local instance, {os.cpu_count()} CPUs")
        ray.init(**ray_init_args(cfg.ray_address))
    stop.install()  # ray.init replaced the SIGTERM handler with one that exits at once
    grid = None
    shared = Path(tempfile.mkdtemp(prefix="maestro-fl-data-"))
    try:
        resources = ray.cluster_resources()
        per_cpu = int(resources.get("CPU", 1) // cfg.num_cpus_per_client)
        per_gpu = int(resources.get("GPU", 0) // cfg.num_gpus_per_client) if cfg.num_gpus_per_client > 0 else per_cpu
        actors = max(1, min(per_cpu, per_gpu, cfg.num_clients))
        env = {k: os.environ[k] for k in (*FLOWER_ENV, *RAY_ENV, "FLWR_HOME") if k in os.environ}
        env |= share_task(cfg, shared)  # the actors of this machine map the driver's copy of the data
        LOG.info("starting %s client actor(s) of %g CPU(s) each", actors, cfg.num_cpus_per_client)
        grid = RayGrid(P.CLIENTAPP_REF, cfg.num_clients, num_actors=actors,
                       actor_options={"num_cpus": cfg.num_cpus_per_client, "num_gpus": cfg.num_gpus_per_client},
                       env=env, should_stop=stop.requested, objects=export_objects(*object_fields(cfg)),
                       warmup=(P.CLIENT_WARMUP_REF, json.dumps(to_dict(cfg))))
        placed = grid.placement(cfg.round_timeout_s)
        LOG.info("%s client actor(s) started on %s Ray node(s)%s", sum(placed.values()), len(placed),
                 "" if sum(placed.values()) == actors else f"; {actors - sum(placed.values())} not (yet)")
        return run_server(grid, cfg, run_dir, stop=stop)
    finally:
        if grid is not None:
            grid.shutdown()
        if started_here and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(shared, ignore_errors=True)


def _run_on_flower_engine(cfg: SimConfig, run_dir: Path) -> list[dict[str, object]]:
    """Flower's own simulation engine (``backend=flower``): no replacement of dead actors, no Ctrl-C."""
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flower_run_simulation

    result: dict[str, list[dict[str, object]]] = {}
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            wait_for_nodes(grid, cfg.num_clients, cfg.round_timeout_s)
            result["rows"] = run_server(grid, cfg, run_dir)
        except BaseException as err:  # surfaced below: Flower only logs a ServerApp's exception
            failure.append(err)
            raise

    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": cfg.num_gpus_per_client},
        "init_args": ray_init_args(cfg.ray_address),
    }
    try:
        with reaped():
            flower_run_simulation(
                server_app=server_app,
                client_app=load_ref(P.CLIENTAPP_REF),
                num_supernodes=cfg.num_clients,
                backend_name="ray",
                backend_config=backend_config,
            )
    finally:
        if ray.is_initialized():  # Flower shuts Ray down on success; make sure of it on failure too
            ray.shutdown()
    if failure:
        raise failure[0]
    if "rows" not in result:
        raise RuntimeError(f"the simulation ended without finishing; see the log above (run directory {run_dir})")
    return result["rows"]
