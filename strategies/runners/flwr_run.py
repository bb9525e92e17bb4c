"""``maestro-fl flwr-run``: ``flwr run .`` on a local SuperLink that is cleaned up afterwards.

``flwr run`` starts a detached local SuperLink that outlives the run and
keeps its state under ``FLWR_HOME``. This wrapper gives it a Flower home and
ports of its own (so it never talks to another SuperLink on the machine),
writes the federation options (one SuperNode per client, the per-client
resources) on the command line, streams the run, and then stops
the SuperLink it started, by PID, with everything it spawned (found by the
private ``FLWR_HOME`` in their environment, so orphans are found too).

``flwr run DIR`` walks every file under ``DIR`` before it filters them,
virtual environments included: with the README's ``.venv`` in the project
that is ~64k files and ~4 s per run. So the app is first staged (the files
Flower would ship, from a walk that never enters a virtual environment or a
git-ignored folder) and ``flwr run`` is pointed at the copy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from maestro_fl.config import SimConfig, resolve

from .launch import FLOWER_ENV, RAY_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_config() -> str:
    """The Flower config: one in-memory local SuperLink connection, nothing remote."""
    return '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n'


# the suffixes Flower ships in a FAB (flwr.cli.build's include patterns, and its LICENSE and .gitignore)
SHIPPED_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
SHIPPED_NAMES = ("LICENSE", ".gitignore")


def ignored_folders(root: Path) -> set[str]:
    """The plain folder names that ``root/.gitignore`` ignores (``runs/``, ``/build/``): no walk enters them."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    return {line.strip().strip("/") for line in lines
            if line.strip().endswith("/") and not any(c in line for c in "*?[!#")}


def stage_app(root: Path, into: Path) -> Path:
    """Copy the files of the app at ``root`` that a FAB would hold into ``into``, and return ``into``.

    Skipped: virtual environments (a ``pyvenv.cfg`` in the folder), ``.git``, ``__pycache__`` and the folders
    ``.gitignore`` names. Flower then applies its own filters to the copy, so the FAB is the one that
    ``flwr run root`` builds, less what it would have dropped anyway.
    """
    skip = ignored_folders(root) | {".git", "__pycache__"}
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = [d for d in subfolders if d not in skip and not (here / d / "pyvenv.cfg").exists()]
        for name in files:
            if name.endswith(SHIPPED_SUFFIXES) or name in SHIPPED_NAMES:
                target = into / (here / name).relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(here / name, target)
    return into


def federation_config_arg(cfg: SimConfig) -> str:
    """One SuperNode per client, and the per-client resources, in ``--federation-config`` syntax."""
    cpus = cfg.num_cpus_per_client
    return (
        f"num-supernodes={cfg.num_clients} "
        f"client-resources-num-cpus={int(cpus) if float(cpus).is_integer() else cpus} "
        f"client-resources-num-gpus={float(cfg.num_gpus_per_client)}"
    )


def run_config_arg(overrides: list[str]) -> str:
    """``key=value`` overrides in Flower's ``--run-config`` syntax (strings quoted)."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip().replace("_", "-")
        try:
            float(value)
            is_number = True
        except ValueError:
            is_number = value.lower() in ("true", "false")
        parts.append(f"{key}={value.lower() if value.lower() in ('true', 'false') else value}" if is_number else f'{key}="{value}"')
    return " ".join(parts)


def started_under(home: Path) -> list[psutil.Process]:
    """Every process running with ``FLWR_HOME=home``: the SuperLink, the simulation it spawned
    (which outlives its launcher), and that simulation's Ray processes. Ours, and only ours."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_tree(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    everything = []
    for p in procs:
        try:
            everything += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in everything:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(everything, timeout=timeout)
    for p in alive:
        p.kill()


def flwr_run(overrides: list[str]) -> int:
    """Run the app with ``flwr run . --stream``; returns flwr's exit code."""
    cfg = resolve(SimConfig, overrides=[o for o in overrides])  # fail on a bad key before starting anything
    home = Path(tempfile.mkdtemp(prefix="maestro-fl-flwr-home-"))
    (home / "config.toml").write_text(flower_config())
    env = RAY_ENV | os.environ | FLOWER_ENV | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # Flower's simulation calls ray.init() without an address: make it start its own Ray rather
        # than join (or hang on) whatever cluster /tmp/ray/ray_current_cluster names
        "RAY_ADDRESS": cfg.ray_address or "local",
        # flwr starts `flower-superlink` by name: find it beside this interpreter even in an unactivated venv
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }
    flwr = shutil.which("flwr", path=os.path.dirname(sys.executable)) or "flwr"
    app = stage_app(PROJECT_ROOT, home / "app")
    cmd = [flwr, "run", str(app), "--stream", "--federation-config", federation_config_arg(cfg)]
    if overrides:
        cmd += ["--run-config", run_config_arg(overrides)]
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    finally:
        stop_tree(started_under(home))
        shutil.rmtree(home, ignore_errors=True)
