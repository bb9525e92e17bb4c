"""The ``maestro-fl`` command.

It lives in ``strategies`` because ``simulate`` starts Flower, which the core
package ``maestro_fl`` never imports; ``train`` only needs the core.

``maestro-fl train [CONFIG.toml] [key=value ...]``: centralized LoD training.
``maestro-fl simulate [CONFIG.toml] [key=value ...]``: the federated simulation.
``maestro-fl flwr-run [key=value ...]``: the same app through ``flwr run .``.
"""

from __future__ import annotations

import argparse
import sys

from maestro_fl.config import ConfigError, resolve

from ..server_app import RunInterrupted


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.toml] key=value ...``; ``--key value`` and ``--key=value`` are accepted too."""
    overrides: list[str] = []
    file = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                if i + 1 >= len(args):
                    raise ConfigError(f"option {arg} needs a value")
                value, i = args[i + 1], i + 1
            overrides.append(f"{key}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif file is None and not overrides:
            file = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}; use key=value")
        i += 1
    return file, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maestro-fl",
        description="Federated and on-device learning with low-rank ordered decompositions (Maestro) and DLRT.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("train", "centralized LoD training, evaluated at a ladder of ranks"),
        ("simulate", "heterogeneous federated LoD training (Flower + Ray)"),
        ("flwr-run", "the same app through `flwr run .` on a local SuperLink, stopped afterwards"),
        ("report", "figures and a markdown summary for run directories: report RUN_DIR... --out DIR"),
        ("sweep", "a grid of federated runs as Ray tasks: sweep SWEEP.toml"),
        ("compare", "every method on the embedded default, 3 seeds, per-tier accuracy/footprint table"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("args", nargs="*", metavar="[CONFIG.toml] key=value", help="config file and overrides")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in sub.choices or any(a in ("-h", "--help") for a in argv[1:]):
        parser.parse_args(argv)  # prints usage or help (and exits)
    command, rest = argv[0], argv[1:]  # the rest is ours: argparse would mistake `--key value` for options
    ns = argparse.Namespace(command=command)
    if command == "report":
        return _report(rest)
    try:
        file, overrides = _split(rest)
        if ns.command == "train":
            from maestro_fl.centralized import run_train
            from maestro_fl.config import TrainConfig

            run_train(resolve(TrainConfig, file, overrides))
        elif ns.command == "simulate":
            from maestro_fl.config import SimConfig

            from ..runners.ray_engine import run_simulation

            run_simulation(resolve(SimConfig, file, overrides))
        elif ns.command == "sweep":
            from ..sweeps.sweep import run_sweep

            if file is None or overrides:
                raise ConfigError("sweep takes one argument, the sweep file (SWEEP.toml)")
            print(f"results: {run_sweep(file) / 'results.csv'}")
        elif ns.command == "compare":
            from ..sweeps.compare import run_compare

            if file is not None:
                raise ConfigError("compare takes key=value overrides only")
            run_compare(overrides)
        elif ns.command == "flwr-run":
            from ..runners.flwr_run import flwr_run

            if file is not None:
                raise ConfigError("flwr-run takes key=value overrides only (the app config is in pyproject.toml)")
            return flwr_run(overrides)
    except ConfigError as err:
        print(f"maestro-fl {ns.command}: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # includes a run directory's missing or damaged files
        print(f"maestro-fl {ns.command}: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"maestro-fl {ns.command}: {err}", file=sys.stderr)
        return 130
    return 0


def _report(args: list[str]) -> int:
    from analysis.plots import RunDirError
    from analysis.report import write_report

    out, runs, i = "report", [], 0
    while i < len(args):
        if args[i] == "--out" and i + 1 < len(args):
            out, i = args[i + 1], i + 2
        elif args[i].startswith("--out="):
            out, i = args[i].split("=", 1)[1], i + 1
        else:
            runs.append(args[i])
            i += 1
    try:
        print(f"wrote {write_report(runs, out)}")
    except (RunDirError, ValueError) as err:
        print(f"maestro-fl report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
