"""``maestro-fl simulate``: the federation on Flower's simulation engine with the Ray backend.

The ServerApp runs in this process; the ClientApp, loaded by its Flower
reference (:data:`maestro_fl.protocol.CLIENTAPP_REF`), runs in Ray actors with
``num_cpus_per_client``/``num_gpus_per_client`` each. Ray is started here (or
attached to ``ray_address``) and always shut down at the end; Flower's home,
telemetry and update checks are pointed away from the user's machine and the
network.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

from maestro_fl import protocol as P
from maestro_fl.config import SimConfig, resolve, to_dict
from maestro_fl.results import RunDir, new_run_dir, timestamp

from ..server_app import print_final, run_server

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower() -> None:
    """No telemetry, no update check, and a Flower home of our own (unless the user set one)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(tempfile.gettempdir()) / f"maestro-fl-flwr-{os.getuid()}"))


def load_ref(ref: str):  # type: ignore[no-untyped-def]
    """``'package.module:attr'`` → the object, as Flower resolves app components."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def prepare_run_dir(cfg: SimConfig) -> tuple[SimConfig, Path]:
    """A new run directory, or the one to resume with its saved config."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = RunDir(run_dir).config()
        saved.update(resume=str(run_dir))
        return resolve(SimConfig, overrides=saved), run_dir
    name = cfg.run_name or f"sim-{cfg.dataset}-{cfg.model}-s{cfg.seed}-{timestamp()}"
    run_dir = new_run_dir(cfg.out_dir, name)
    RunDir(run_dir).save_config(to_dict(cfg))
    return cfg, run_dir


def run_simulation(cfg: SimConfig) -> Path:
    """Run (or resume) a federation; returns its run directory."""
    cfg.validate()
    cfg, run_dir = prepare_run_dir(cfg)
    quiet_flower()
    if cfg.backend == "local":
        from .local_grid import LocalGrid

        rows = run_server(LocalGrid(load_ref(P.CLIENTAPP_REF), cfg.num_clients), cfg, run_dir)
    else:
        rows = _run_on_ray(cfg, run_dir)
    print(f"\nrun directory: {run_dir}")
    print_final(rows)
    return run_dir


def _run_on_ray(cfg: SimConfig, run_dir: Path) -> list[dict[str, object]]:
    import ray
    from flwr.serverapp import Grid, ServerApp
    from flwr.app import Context
    from flwr.simulation import run_simulation as flower_run_simulation

    result: dict[str, list[dict[str, object]]] = {}
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            result["rows"] = run_server(grid, cfg, run_dir)
        except BaseException as err:  # surfaced below: Flower only logs a ServerApp's exception
            failure.append(err)
            raise

    init_args: dict[str, object] = {"include_dashboard": False, "logging_level": "error", "log_to_driver": False}
    if cfg.ray_address:
        init_args["address"] = cfg.ray_address
    else:
        # 'local' starts our own Ray even where another cluster's address file lingers in /tmp/ray
        # (ray.init() would otherwise try to join it, and hang if it is gone)
        init_args.update(address="local", num_cpus=os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": cfg.num_cpus_per_client, "num_gpus": cfg.num_gpus_per_client},
        "init_args": init_args,
    }
    try:
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

