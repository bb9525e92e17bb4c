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


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    file = args[0] if args and "=" not in args[0] else None
    return file, args[1:] if file else args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maestro-fl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("train", "centralized LoD training, evaluated at a ladder of ranks"),
        ("simulate", "heterogeneous federated LoD training (Flower + Ray)"),
        ("flwr-run", "the same app through `flwr run .` on a local SuperLink, stopped afterwards"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("args", nargs="*", metavar="[CONFIG.toml] key=value", help="config file and overrides")
    ns = parser.parse_args(argv)
    file, overrides = _split(ns.args)
    try:
        if ns.command == "train":
            from maestro_fl.centralized import run_train
            from maestro_fl.config import TrainConfig

            run_train(resolve(TrainConfig, file, overrides))
        elif ns.command == "simulate":
            from maestro_fl.config import SimConfig

            from .simulation import run_simulation

            run_simulation(resolve(SimConfig, file, overrides))
        elif ns.command == "flwr-run":
            from .flwr_local import flwr_run

            if file is not None:
                raise ConfigError("flwr-run takes key=value overrides only (the app config is in pyproject.toml)")
            return flwr_run(overrides)
    except ConfigError as err:
        print(f"maestro-fl {ns.command}: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"maestro-fl {ns.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
