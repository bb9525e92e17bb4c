"""The ``maestro-fl`` command: a thin layer over :mod:`strategies.api` and the runners.

It lives in ``strategies`` because ``simulate`` starts Flower, which the core
package ``maestro_fl`` never imports; ``train`` only needs the core. Every
command's ``--help`` lists its keys with type, default and reason, generated
from the config dataclasses (:func:`maestro_fl.config.describe`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from maestro_fl.config import ConfigError, SimConfig, TrainConfig, describe, resolve

from ..server_app import RunInterrupted


@dataclass(frozen=True)
class Command:
    usage: str
    summary: str
    examples: tuple[str, ...]
    keys: type | None = None  # the config dataclass whose keys it takes
    notes: str = ""


COMMANDS: dict[str, Command] = {
    "simulate": Command(
        "maestro-fl simulate [CONFIG.toml] [key=value ...] [--quiet | --verbose]",
        "Heterogeneous federated training: every client trains the sub-model its device affords "
        "(Flower's Message API, Ray actors by default). Writes a run directory as it goes and prints "
        "the per-tier table at the end.",
        ("maestro-fl simulate", "maestro-fl simulate dataset=mnist1d model=cnn1d rounds=40",
         "maestro-fl simulate strategy=fjord seed=1 --rounds 30",
         "maestro-fl simulate resume=runs/sim-digits-cnn-s0-20261201-120000 rounds=80"),
        SimConfig,
    ),
    "plan": Command(
        "maestro-fl plan [CONFIG.toml] [key=value ...]",
        "The budget planner: per device tier, the sub-model it can afford (fraction, params, MACs, bytes), "
        "which constraint binds it (memory or compute, with the numbers), and what would serve a tier that "
        "affords nothing. Runs in seconds; starts no engine. Takes the keys of simulate.",
        ("maestro-fl plan", "maestro-fl plan dataset=mnist1d model=cnn1d",
         "maestro-fl plan model=lenet5 keep_first=0 compute_budget_s=30"),
        SimConfig,
    ),
    "train": Command(
        "maestro-fl train [CONFIG.toml] [key=value ...] [--quiet]",
        "Centralized LoD (Maestro) or DLRT training of one model, then its evaluation at a ladder of ranks: "
        "train once, deploy at many budgets.",
        ("maestro-fl train", "maestro-fl train method=dlrt dlrt_tau=0.2", "maestro-fl train epochs=20 model=mlp"),
        TrainConfig,
    ),
    "sweep": Command(
        "maestro-fl sweep SWEEP.toml",
        "A grid of federated runs as Ray tasks (a local Ray, or a cluster with [sweep] ray_address). Finished "
        "runs are skipped when it runs again, interrupted ones resume, failed ones are recorded.",
        ("maestro-fl sweep benchmarks/sweeps/protocol_digits.toml",
         "maestro-fl sweep benchmarks/sweeps/fjord_protocol_cifar10.toml"),
        notes="The file's tables: [sweep] name, out_dir, ray_address, cpus_per_run, gpus_per_run; [base] "
              "simulate keys shared by every run; [grid] simulate keys, each a list of values (the runs are "
              "their product); optional [methods.NAME] tables of simulate keys, crossed with the grid. "
              "With a [protocol] table (tune_seed, seeds) the grid is a tuning grid: every method runs it at "
              "tune_seed, the point of best validation accuracy is selected per method and run on every seed "
              "(selected.csv, comparison.csv). See strategies/sweeps/sweep.py and protocol.py.",
    ),
    "compare": Command(
        "maestro-fl compare [key=value ...]",
        "Every method on the same data, partitions, devices and seeds (0, 1, 2): per method and tier, accuracy "
        "(mean ± std over seeds), params, MACs and bytes, and FedLoD at each width tier's footprint.",
        ("maestro-fl compare", "maestro-fl compare methods=fedlod,fjord seeds=0,1 rounds=30",
         "maestro-fl compare dataset=mnist1d model=cnn1d out_dir=runs/mnist1d"),
        SimConfig,
        notes="Its own keys: methods=a,b (the names under choices below), seeds=0,1,2, "
              "out_dir=DIR (the sweep goes to DIR/compare). Every other key is a simulate key applied to all.",
    ),
    "report": Command(
        "maestro-fl report RUN_DIR|SWEEP_DIR ... [--out DIR]",
        "Every figure that applies to the given run or sweep directories (PNG and SVG) and summary.md "
        "with the per-tier tables; a directory it cannot read is named with the reason.",
        ("maestro-fl report runs/main --out report", "maestro-fl report runs/compare/compare --out report"),
    ),
    "export": Command(
        "maestro-fl export RUN_DIR (--tier T | --fraction P) [--out DIR]",
        "A tier's deployable model, standalone: the global model deployed at tier T's budget (or the largest "
        "sub-model a fraction P buys), with its real smaller tensors, saved by torch.export (model.pt2, loads "
        "with PyTorch alone) beside model.json (ranks, params, MACs, bytes, test accuracy).",
        ("maestro-fl export runs/main --tier 0", "maestro-fl export runs/main --fraction 0.5 --out deploy/half"),
        notes="Load it with: torch.export.load('model.pt2').module()(x). Every method's tiers export, "
              "width-floor tiers and width methods included; the default folder is RUN_DIR/export/tier-T.",
    ),
    "flwr-run": Command(
        "maestro-fl flwr-run [key=value ...]",
        "The same ServerApp and ClientApp through `flwr run .` on a private local SuperLink, which is "
        "stopped afterwards. Takes the keys of simulate (hyphens or underscores).",
        ("maestro-fl flwr-run rounds=10 clients_per_round=10",),
        SimConfig,
    ),
}


def choices_text(compare_methods: bool = False) -> str:
    """The names the keys ``strategy``, ``model`` and ``dataset`` (and ``compare``'s ``methods``) take, one line each."""
    import dataclasses
    import inspect
    import textwrap

    from maestro_fl import catalog
    from maestro_fl.config import field_docs
    from maestro_fl.methods import METHODS
    from maestro_fl.models import MODELS

    def first_line(obj: object) -> str:
        return (inspect.getdoc(obj) or "").split("\n")[0].replace("``", "")

    width = max(map(len, (*METHODS, *MODELS, *catalog.DATASETS)))
    lines = ["strategy (the method):"]
    lines += [f"  {n:<{width}}  {first_line(cls)}" for n, cls in METHODS.items()]
    with_options = {n: cls for n, cls in METHODS.items() if dataclasses.fields(cls.Params)}
    if with_options:
        lines += ["method.NAME=VALUE (a method's own options, its Params; or a [method] table in a config file):"]
        for n, cls in with_options.items():
            for doc in field_docs(cls.Params):
                lines += [f"  {n}: method.{doc.name} ({doc.type}, default {doc.default!r})"]
                lines += textwrap.wrap(doc.reason, 100, initial_indent="      ", subsequent_indent="      ")
    lines += ["model (or a reference 'package.module:attr' to an nn.Module or a builder of one):"]
    lines += [f"  {n:<{width}}  {first_line(fn)}".rstrip() for n, fn in MODELS.items()]
    lines += ["dataset (or 'hf:NAME', a saved dataset's path, or a reference to a builder):",
              "  " + ", ".join(catalog.DATASETS) + "   (digits: embedded; mnist1d: generated offline; "
              "the others load from data_root)"]
    if compare_methods:
        from ..sweeps.compare import METHODS as COMPARED

        cwidth = max(map(len, COMPARED))
        lines += ["methods (compare's names: a strategy with the keys it sets):"]
        lines += [f"  {n:<{cwidth}}  " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
                  for n, values in COMPARED.items()]
    return "\n".join(lines)


def help_text(name: str) -> str:
    cmd = COMMANDS[name]
    parts = [f"usage: {cmd.usage}", "", cmd.summary]
    if cmd.notes:
        parts += ["", cmd.notes]
    parts += ["", "examples:", *(f"  {e}" for e in cmd.examples)]
    if name in ("simulate", "train"):
        parts += ["", "options:", "  --quiet    no progress and no phase lines (warnings and errors only)"]
        if name == "simulate":
            parts += ["  --verbose  a line per round instead of the progress bar, and Flower's own log"]
    if cmd.keys is SimConfig:
        parts += ["", "choices:", choices_text(compare_methods=name == "compare")]
    if cmd.keys is not None:
        parts += ["", f"keys (key=value or --key value; every default with its reason, from {cmd.keys.__name__}):",
                  describe(cmd.keys)]
    return "\n".join(parts)


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: maestro-fl COMMAND [...]   (maestro-fl COMMAND --help for its keys)", "",
             "Federated and on-device learning with low-rank ordered decompositions (Maestro) and DLRT.", "",
             "commands:"]
    lines += [f"  {n:<{width}}  {c.summary.split('. ')[0].split(': ')[0]}" for n, c in COMMANDS.items()]
    return "\n".join(lines)


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


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """A handler that writes to whatever ``sys.stderr`` is when it emits (not the one it was made with, which a
    caller such as a notebook or a test may have replaced and closed since)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # StreamHandler's attribute, read at every emit, becomes a property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_output(level: int) -> None:
    """Phase lines and warnings of ``maestro_fl`` to standard error, plain, at ``level``."""
    logger = logging.getLogger("maestro_fl")
    logger.handlers.clear()
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    if level > logging.DEBUG:  # Flower logs every message it handles at INFO; only --verbose wants that
        logging.getLogger("flwr").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"maestro-fl: unknown command {command!r}\n\n{overview()}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(help_text(command))
        return 0
    quiet, verbose = "--quiet" in rest, "--verbose" in rest
    rest = [a for a in rest if a not in ("--quiet", "--verbose")]
    configure_output(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if command == "report":
        return _report(rest)
    if command == "export":
        return _export(rest)
    try:
        file, overrides = _split(rest)
        if quiet and command in ("simulate", "train"):
            overrides.append("progress=false")
        return RUNNERS[command](file, overrides)
    except ConfigError as err:
        print(f"maestro-fl {command}: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # includes a run directory's missing or damaged files
        print(f"maestro-fl {command}: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"maestro-fl {command}: {err}", file=sys.stderr)
        return err.exit_code


def _train(file: str | None, overrides: list[str]) -> int:
    from maestro_fl.centralized import run_train

    run_train(resolve(TrainConfig, file, overrides))
    return 0


def _simulate(file: str | None, overrides: list[str]) -> int:
    from ..runners.launch import run_simulation

    run_simulation(resolve(SimConfig, file, overrides))
    return 0


def _plan(file: str | None, overrides: list[str]) -> int:
    from .plan import plan

    print(plan(resolve(SimConfig, file, overrides)))
    return 0


def _sweep(file: str | None, overrides: list[str]) -> int:
    from ..sweeps.sweep import run_sweep

    if file is None or overrides:
        raise ConfigError("sweep takes one argument, the sweep file (SWEEP.toml)")
    from ..sweeps.tuning_protocol import is_protocol, run_protocol

    if is_protocol(file):
        print(f"comparison: {run_protocol(file) / 'comparison.csv'}")
        return 0
    root = run_sweep(file)
    print(f"results: {root / 'results.csv'}")
    return _report_failures("sweep", root)


def _report_failures(command: str, root: Path) -> int:
    """Exit 1, naming them, when any run of a sweep or comparison failed (its table holds the others)."""
    from ..sweeps.sweep import failed_runs

    failed = failed_runs(root)
    if failed:
        print(f"maestro-fl {command}: {len(failed)} run(s) failed: {', '.join(failed[:10])}"
              f"{' ...' if len(failed) > 10 else ''}; each has an error.txt in {root}", file=sys.stderr)
        return 1
    return 0


def _compare(file: str | None, overrides: list[str]) -> int:
    from ..sweeps.compare import run_compare

    if file is not None:
        raise ConfigError("compare takes key=value overrides only")
    root = run_compare(overrides)
    return _report_failures("compare", root)


def _flwr_run(file: str | None, overrides: list[str]) -> int:
    from ..runners.flwr_run import flwr_run

    if file is not None:
        raise ConfigError("flwr-run takes key=value overrides only (the app config is in pyproject.toml)")
    return flwr_run(overrides)


RUNNERS: dict[str, Callable[[str | None, list[str]], int]] = {
    "train": _train, "simulate": _simulate, "plan": _plan, "sweep": _sweep, "compare": _compare,
    "flwr-run": _flwr_run,
}


def _export(args: list[str]) -> int:
    from maestro_fl.export import export_tier

    options: dict[str, str] = {}
    runs: list[str] = []
    i = 0
    while i < len(args):
        key, sep, value = args[i].partition("=")
        if key in ("--tier", "--fraction", "--out"):
            if not sep:
                if i + 1 >= len(args):
                    print(f"maestro-fl export: {key} needs a value", file=sys.stderr)
                    return 2
                value, i = args[i + 1], i + 1
            options[key[2:]] = value
        else:
            runs.append(args[i])
        i += 1
    if len(runs) != 1 or ("tier" in options) == ("fraction" in options):
        print(f"maestro-fl export: give one run directory and one of --tier or --fraction\n\n"
              f"usage: {COMMANDS['export'].usage}", file=sys.stderr)
        return 2
    try:
        tier = int(options["tier"]) if "tier" in options else None
        fraction = float(options["fraction"]) if "fraction" in options else None
    except ValueError:
        print("maestro-fl export: --tier takes an integer, --fraction a number in (0, 1]", file=sys.stderr)
        return 2
    try:
        result = export_tier(runs[0], tier=tier, fraction=fraction, out=options.get("out"))
    except (FileNotFoundError, ValueError) as err:  # a missing or unfinished run, a tier it lacks
        print(f"maestro-fl export: {err}", file=sys.stderr)
        return 2
    print(f"{result.path}: {result.strategy} at fraction {result.fraction:.4g}, {result.params:,} parameters, "
          f"{result.macs:,} MACs, {result.bytes_fp32:,} bytes (fp32), test accuracy {result.test_accuracy:.4f}")
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
    if not runs:
        print(f"maestro-fl report: give at least one run or sweep directory\n\nusage: {COMMANDS['report'].usage}",
              file=sys.stderr)
        return 2
    try:
        print(f"wrote {write_report(runs, out)}")
    except (RunDirError, ValueError) as err:
        print(f"maestro-fl report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
