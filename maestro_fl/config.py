"""Every default of maestro-fl in one place, each with a one-line reason.

Configs are frozen dataclasses. A run resolves them from the defaults, then
an optional TOML file, then ``key=value`` overrides; unknown keys and values
of the wrong type or range fail before anything runs, naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# leaf modules only (each imports nothing of maestro_fl): the config sits below everything it configures
from .availability import AvailabilityError, schedule_for
from .catalog import (
    DATASETS,
    METHOD_CLASSES,
    MODELS,
    NATURAL_GROUPS,
    NORMS,
    ROUND_MODES,
    SAMPLERS,
    TRACKERS,
    tracker_names,
)
from .measured_devices import NUM_TIERS as MEASURED_TIERS
from .population import DEFAULT_TIERS, MEASURED, PopulationError, federation_devices, load_population
from .references import UnresolvedReference, is_reference
from .references import resolve as resolve_reference
from .results import check_name
from .shakespeare import ShakespeareFileError, load_shakespeare


def strategies() -> tuple[str, ...]:
    """The methods a simulation can run (the registry :data:`maestro_fl.catalog.METHOD_CLASSES`, by name)."""
    return tuple(METHOD_CLASSES)


class ConfigError(ValueError):
    """A config field has a value outside what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    """Centralized low-rank training (``maestro-fl train``): train once, deploy at many ranks."""

    # -- method --
    method: str = "lod"  # 'lod' (Maestro) or 'dlrt' (rank-adaptive KLS integrator, Schotthöfer et al.)
    dataset: str = "digits"  # embedded in scikit-learn: works offline, trains in seconds (see maestro_fl/data.py)
    data_root: str = "data"  # where torchvision datasets are read from (or downloaded to)
    dataset_samples: int = 0  # generated datasets (mnist1d): how many; 0 = the generator's own 5,000
    label_column: str = "label"  # tabular sources (Hugging Face, parquet, saved): the label column
    input_column: str = ""  # the input column; '' = every other column
    download: bool = False  # never touch the network unless asked
    model: str = "cnn"  # ~160k weights; fits digits in about a minute on 2 cores
    norm: str = "default"  # 'default' = the model's own ('bn' for ResNet/VGG, none for small nets)
    init: str = "svd"  # SVD of the initial weights, as the authors' CIFAR/MNIST runs
    rank_fraction: float = 1.0  # initial max rank per layer: Maestro starts at full rank
    keep_first: int = 0  # layers left dense at the input (the authors keep 43 on ImageNet)
    keep_classifier: bool = False  # the authors' ImageNet runs keep it dense; small nets need not
    epochs: int = 100  # ~0.3 s each on digits; shrinking needs many epochs to settle (~30 s in all)
    batch_size: int = 32  # 45 steps per epoch on digits' 1437 training images
    lr: float = 0.02  # SGD; 0.05 and up diverge on the norm-free small CNN (the authors use 0.1 with BN)
    momentum: float = 0.9  # the authors' SGD
    weight_decay: float = 1e-4  # the authors' value
    lr_schedule: str = "step"  # x0.1 at 50% and 75% of the epochs, as the authors' CIFAR runs (DLRT too)
    sampler: str = "per_layer"  # Maestro's default ordered-dropout sampler
    sampler_fraction: float = 0.25  # the rank fraction of the 'fixed' sampler (Pufferfish's p)
    full_pass: bool = False  # self-distillation costs ~2x compute for no gain in the paper's ablation
    lambda_gl: float = 3e-4  # HGL strength: halves the CNN's parameters in 100 epochs at -0.5 pp
    shrink_eps: float = 2e-3  # importance threshold of progressive shrinking (after every epoch)
    dlrt_tau: float = 0.1  # DLRT's relative truncation tolerance (the authors' CIFAR value)
    dlrt_lr: float = 0.1  # plain SGD on K, L, S (no momentum); 0.2 stalls at tau >= 0.2 on the small CNN
    dlrt_rank_fraction: float = 0.5  # DLRT's starting rank, as a fraction of its bound min(m, n)/2
    dlrt_adaptive: bool = True  # False: DLRT's fixed-rank integrator
    eval_fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.1)  # the deploy-at-many-ranks ladder
    seed: int = 0  # same seed, same weights
    out_dir: str = "runs"  # run directories go under here
    run_name: str = ""  # '' = method-dataset-model-seed-timestamp
    device: str = "cpu"  # 'cpu', 'cuda' or 'auto'
    progress: bool = True  # a tqdm bar per epoch

    def validate(self) -> TrainConfig:
        check_one_of("method", self.method, ("lod", "dlrt"))
        check_dataset(self)
        check_model(self.model)
        check_one_of("norm", self.norm, ("default", *NORMS))
        check_one_of("init", self.init, ("svd", "random"))
        check_one_of("sampler", self.sampler, SAMPLERS)
        if self.sampler == "tiers":
            raise ConfigError("sampler 'tiers' samples a federation's tier ranks; use it with 'simulate', not 'train'")
        check_fraction("dlrt_tau", self.dlrt_tau)
        check_fraction("dlrt_rank_fraction", self.dlrt_rank_fraction)
        check_positive("dlrt_lr", self.dlrt_lr)
        check_one_of("lr_schedule", self.lr_schedule, ("step", "cosine", "none"))
        check_one_of("device", self.device, ("cpu", "cuda", "auto"))
        check_fraction("rank_fraction", self.rank_fraction)
        check_fraction("sampler_fraction", self.sampler_fraction)
        for i, p in enumerate(self.eval_fractions):
            check_fraction(f"eval_fractions[{i}]", p)
        if not self.eval_fractions:
            raise ConfigError("eval_fractions must hold at least one fraction in (0, 1]")
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_non_negative("lambda_gl", self.lambda_gl)
        check_non_negative("shrink_eps", self.shrink_eps)
        check_non_negative("keep_first", self.keep_first)
        check_run_name(self.run_name)
        return self


# -- field checks -----------------------------------------------------------
def check_dataset(cfg: TrainConfig | SimConfig) -> None:
    """A built-in name, ``hf:NAME``, an existing path, or a reference that imports; a torchvision root that exists."""
    name = cfg.dataset
    if name in DATASETS or name.startswith("hf:"):
        pass
    elif is_reference(name):
        check_reference("dataset", name)
    elif not Path(name).exists():
        raise ConfigError(f"dataset must be one of {list(DATASETS)}, 'hf:NAME', an existing path (a saved dataset, "
                          f"a .parquet file, an image folder) or a reference 'package.module:attr'; got {name!r}"
                          + did_you_mean(name, DATASETS))
    if name in ("mnist", "fashion_mnist", "cifar10") and not cfg.download and not Path(cfg.data_root).exists():
        raise ConfigError(
            f"data_root: {cfg.data_root!r} does not exist; dataset {name!r} is read from there "
            "(set data_root to the folder that holds it, or download=true to fetch it)"
        )
    if name == "shakespeare":  # read now (70 ms for the whole play text): a bad file is refused before anything starts
        try:
            load_shakespeare(cfg.data_root)
        except ShakespeareFileError as err:
            raise ConfigError(str(err)) from None
    check_non_negative("dataset_samples", cfg.dataset_samples)


def check_model(name: str) -> None:
    """A built-in model or a reference to an ``nn.Module`` or a function building one."""
    if name in MODELS:
        return
    if not is_reference(name):
        raise ConfigError(f"model must be one of {sorted(MODELS)} or a reference 'package.module:attr' "
                          f"(an nn.Module, or a function building one), got {name!r}{did_you_mean(name, MODELS)}")
    obj = check_reference("model", name)
    if not callable(obj):
        raise ConfigError(f"model: {name!r} is a {type(obj).__name__}, not an nn.Module or a function building one")


def check_reference(field: str, reference: str) -> object:
    try:
        return resolve_reference(reference, field)
    except UnresolvedReference as err:
        raise ConfigError(str(err)) from None


def check_run_name(name: str) -> None:
    """``run_name`` names one folder inside ``out_dir`` (never a path that escapes it)."""
    if name:
        try:
            check_name("run_name", name)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for a misspelled name close to an allowed one, else an empty string."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def check_one_of(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}")


def check_tracking(tracking: str) -> None:
    """``tracking``: '' or trackers of :data:`~maestro_fl.catalog.TRACKERS`, comma-separated, each installed."""
    names = tracker_names(tracking)
    for name in names:
        check_one_of("tracking", name, list(TRACKERS))
    if len(set(names)) < len(names):
        raise ConfigError(f"tracking names a tracker twice: {tracking!r}")
    for name in names:
        packages = TRACKERS[name]
        if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
            packages = packages[:1]  # a tracking server: the local SQLite store's packages are not needed
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(f"tracking={name!r} needs {', '.join(missing)}: pip install 'maestro-fl[tracking]'")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")


# -- documentation, from the source of truth ---------------------------------
@dataclass(frozen=True)
class FieldDoc:
    """One config key as ``--help`` shows it."""

    name: str
    type: str
    default: Any
    reason: str
    section: str


def field_docs(cls: type) -> list[FieldDoc]:
    """Every field of a config dataclass with its type, default and the one-line reason of its comment.

    The reasons are the ``# ...`` comments after each default in this module
    (continued on the next comment lines), and the sections its ``# -- name --``
    lines: ``--help`` is generated from them, so it cannot drift from the code.
    """
    import inspect
    import io
    import tokenize

    comments: dict[int, str] = {}
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    hints = typing.get_type_hints(cls)
    by_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and name in hints and name not in by_line:
            by_line[name] = number
    docs, section = [], ""
    sections = {n: c.strip("- ").strip() for n, c in comments.items()
                if c.startswith("--") and c.endswith("--")}
    for f in dataclasses.fields(cls):
        number = by_line[f.name]
        section = next((sections[n] for n in sorted(sections, reverse=True) if n < number), section)
        reason = comments.get(number, "")
        follow = number + 1
        while follow in comments and follow not in sections and lines[follow - 1].strip().startswith("#"):
            reason += " " + comments[follow]
            follow += 1
        hint = hints[f.name]
        kind = getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is not tuple else \
            f"list of {typing.get_args(hint)[0].__name__}"
        docs.append(FieldDoc(f.name, kind, f.default, reason, section))
    return docs


def describe(cls: type, width: int = 100) -> str:
    """The keys of ``cls`` for ``--help``: grouped by section, each with type, default and reason."""
    import textwrap

    out: list[str] = []
    section = None
    for doc in field_docs(cls):
        if doc.section != section:
            section = doc.section
            out.append(f"\n{section or 'settings'}:")
        default = ",".join(map(str, doc.default)) if isinstance(doc.default, tuple) else doc.default
        head = f"  {doc.name} ({doc.type}, default {default!r})"
        out.append(head)
        out.extend(textwrap.wrap(doc.reason, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out).lstrip("\n")


# -- resolving --------------------------------------------------------------
C = TypeVar("C")
P_ = TypeVar("P_")


_KIND = {int: "an integer", float: "a number"}


def _coerce(name: str, raw: Any, hint: Any, typed: bool = False) -> Any:
    """Convert a TOML value or a ``key=value`` string to the field's type.

    ``typed``: the value comes from a TOML file, where numbers and booleans have their own syntax, so a
    quoted one (``rounds = "5"``) is a mistake to name rather than a string to parse.
    """
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(raw, str):
            raw = [] if raw.strip() in ("", "[]", "()") else raw.strip("[]() ").split(",")
            typed = False  # the items of "a,b,c" are strings to parse
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"{name} must be a list of {item.__name__}, got {raw!r}")
        return tuple(_coerce(f"{name}[{i}]", v, item, typed) for i, v in enumerate(raw))
    if typed and hint in (int, float, bool) and isinstance(raw, str):
        kind = "true or false" if hint is bool else _KIND[hint]
        raise ConfigError(f"{name} must be {kind}, got the string {raw!r} (TOML writes numbers and booleans "
                          "unquoted)")
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{name} must be {_KIND[hint]}, got {raw!r}")
        try:
            value = hint(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {_KIND[hint]}, got {raw!r}") from None
        if hint is int and isinstance(raw, float) and raw != value:
            raise ConfigError(f"{name} must be an integer, got {raw!r}")
        return value
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{name} must be a string, got {raw!r}")
        return raw.strip()
    raise ConfigError(f"{name}: unsupported field type {hint!r}")


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's tables, or a ConfigError saying which file is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {err}") from err


def resolve(cls: type[C], file: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> C:
    """Defaults ← TOML ``file`` ← ``overrides`` (``key=value`` strings or a mapping), validated."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]  # C is any config dataclass: a TypeVar cannot be bound to "a dataclass"
    values: dict[str, Any] = {}
    from_file: set[str] = set()
    if file is not None:
        values.update(read_toml(file, "config file"))
        from_file = set(values)
    if isinstance(overrides, Mapping):
        values.update(overrides)
        from_file -= set(overrides)
    else:
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like key=value")
            values[key.strip().replace("-", "_")] = raw
            from_file.discard(key.strip().replace("-", "_"))
    if "method" in names and hints["method"] == tuple[str, ...]:
        values = fold_method_options(values)
    unknown = sorted(set(values) - set(names))
    if unknown:
        guesses = {k: difflib.get_close_matches(k, names, n=3, cutoff=0.6) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {' or '.join(map(repr, g))}?" for k, g in guesses.items() if g)
        raise ConfigError(f"unknown config key(s) {unknown}" + (f" ({hint})" if hint else "")
                          + f"; `maestro-fl COMMAND --help` lists the {len(names)} keys")
    typed = {k: _coerce(k, v, hints[k], typed=k in from_file) for k, v in values.items()}
    cfg = cls(**typed)
    validate = getattr(cfg, "validate", None)
    return validate() if validate is not None else cfg


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_option_text, value))
    return str(value).strip()


def fold_method_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``method.NAME=VALUE`` keys, a ``[method]`` table and ``method = ["NAME=VALUE", ...]`` as one sorted
    ``method`` tuple of ``NAME=VALUE`` items (later ones win), the form :class:`SimConfig` keeps."""
    out: dict[str, Any] = {}
    options: dict[str, str] = {}
    for key, value in values.items():
        if key == "method":
            items = value.items() if isinstance(value, Mapping) else (
                str(item).partition("=")[::2] for item in (
                    [i for i in value.split(",") if i.strip()] if isinstance(value, str) else value))
            for name, item in items:
                options[str(name).strip()] = _option_text(item)
        elif key.startswith("method."):
            options[key[len("method."):].strip()] = _option_text(value)
        else:
            out[key] = value
    if options:
        out["method"] = tuple(f"{k}={v}" for k, v in sorted(options.items()))
    elif "method" in values:
        out["method"] = ()
    return out


def parse_options(params: type[P_], items: Sequence[str], owner: str) -> P_:
    """A method's ``Params`` from a config's ``method`` items (``NAME=VALUE``), each coerced to its field's type.

    Raises a :class:`ConfigError` naming ``method.NAME`` for an unknown option (with the method's options and a
    guess) or a value of the wrong type; ``params.validate()``, when it exists, checks ranges the same way.
    """
    hints = typing.get_type_hints(params)
    allowed = [f.name for f in dataclasses.fields(params)]  # type: ignore[arg-type]  # params: a dataclass type
    typed: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"method option {item!r} must look like NAME=VALUE (method.NAME=VALUE on the command line)")
        if name not in allowed:
            guess = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
            raise ConfigError(f"method.{name}: {owner} has no option {name!r}"
                              + (f" (did you mean method.{guess[0]}?)" if guess else "")
                              + (f"; its options: {', '.join(f'method.{a}' for a in allowed)}" if allowed
                                 else "; it has no options of its own"))
        typed[name] = _coerce(f"method.{name}", raw, hints[name])
    out = params(**typed)
    validate = getattr(out, "validate", None)
    if validate is not None:
        validate()
    return out


def to_dict(cfg: object) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)  # type: ignore[call-overload]  # every caller passes a config dataclass
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class SimConfig:
    """Heterogeneous federated LoD training (``maestro-fl simulate``): the main job."""

    # -- method --
    strategy: str = "fedlod"  # the method: a name in maestro_fl.methods.METHODS (each module there says what it is)
    method: tuple[str, ...] = ()  # the method's own options (its Params; `maestro-fl simulate --help` lists each
    # method's), as method.NAME=VALUE on the command line or a [method] table in TOML; () = the method's defaults
    # -- data and model --
    dataset: str = "digits"  # embedded: the main job runs offline (what else it may be: maestro_fl/data.py)
    data_root: str = "data"  # where torchvision datasets are read from (or downloaded to)
    dataset_samples: int = 0  # generated datasets (mnist1d): how many; 0 = the generator's own 5,000
    label_column: str = "label"  # tabular sources (Hugging Face, parquet, saved): the label column
    input_column: str = ""  # the input column; '' = every other column
    partition_by: str = ""  # partition='natural': the column whose values are the clients (a writer id)
    download: bool = False  # never touch the network unless asked
    model: str = "cnn"  # ~160k weights: 50 clients x 30 rounds fit in a few minutes on 2 cores
    norm: str = "gn"  # GroupNorm: batch-independent, so safe under non-IID data; with it lr 0.1 is stable
    init: str = "svd"  # SVD of a dense initialization: validation +3.0 pp on MNIST-1D, -0.4 on digits over 'random'
    # (balanced fresh factors) at the protocol's point, 3 seeds (the defaults check: benchmarks/sweeps/defaults_*.toml)
    keep_first: int = 1  # the first conv stays dense: 320 weights, and rank 2 of 9 would starve every tier
    keep_classifier: bool = True  # 1.3k weights; a rank-2 classifier caps the weakest tier's accuracy
    width_floor: bool = True  # FedLoD: a device too small for the smallest rank prefix trains that prefix of a
    # narrower model (corners of the ordered factors), as width methods serve it; nothing changes above that floor
    width_floor_rank: float = 0.25  # the rank fraction of those narrower sub-models: the best validation over
    # 0.05/0.25/0.5/1 on starved digits and MNIST-1D alike (+2.6 and +1.0 pp over 0.05; width_floor_*.toml, 3 seeds)
    # -- federation --
    num_clients: int = 50  # the smallest federation the main job must show; FjORD/HeteroFL use 100
    clients_per_round: int = 20  # 40% participation: 10 loses 9.3 pp of validation on MNIST-1D (+0.7 on digits,
    # test -1.6) in the defaults check; more costs round time in proportion
    rounds: int = 60  # over the protocol's 40: validation +6.0 pp on MNIST-1D (still learning), +0.0 on digits (test
    # +0.4), defaults check; the main job's 60 rounds take ~70 s on 2 cores
    partition: str = "dirichlet"  # label-skewed non-IID, the common FL benchmark setting; or iid, pathological,
    # natural (one client per value of partition_by, as FEMNIST is split by writer)
    min_partition_size: int = 10  # Dirichlet redraws until every client holds this many (flwr-datasets' default)
    alpha: float = 0.5  # Dirichlet concentration: clearly non-IID, every client keeps several classes
    classes_per_client: int = 2  # for partition='pathological' (McMahan et al.)
    val_fraction: float = 0.1  # each client's held-out validation share
    # -- local training --
    local_epochs: int = 3  # FedLoD's choice on digits and MNIST-1D alike, by validation, over 1 and 3
    # (benchmarks/sweeps/protocol_*.toml, 40 rounds, init svd, 2026-12-01)
    batch_size: int = 16  # 32 loses 14.3 pp of validation on digits and 4.2 on MNIST-1D (defaults check): clients
    # hold ~26 and ~72 training examples, so fewer steps, and larger activations push tiers to smaller sub-models
    lr: float = 0.1  # with momentum 0.8, learns at both shapes of both tasks: 50 clients of ~29 (digits) / ~72
    # (MNIST-1D) examples and 10 of ~130 / ~360 (4x the local steps), FedLoD and dense FedAvg (benchmarks/
    # default_shapes.py). The protocol's lr 0.15 with momentum 0.9 sat at chance (0.10) at 10 clients on both tasks
    # (a step tuned to 6 local steps a round diverges over 24); at 50 it led FedLoD's validation by 1.0 pp on
    # MNIST-1D and trailed by 0.8 on digits (40 rounds, seed 0)
    momentum: float = 0.8  # local momentum (reset every round): 0.9 diverges at 10 clients (above); plain SGD (lr
    # 0.15) loses 3.9 pp (FedLoD, digits) and 17 pp (dense, MNIST-1D) at 50 clients: a 6-step round is too short
    weight_decay: float = 1e-4  # the authors' value
    sampler: str = "tiers"  # FjORD's rule on ranks (a tier's ranks per step): 'nested' loses 0.6 pp of validation on
    # digits and 1.8 on MNIST-1D (defaults check)
    rank_allocation: str = "uniform"  # FedLoD: every layer at the budget's fraction of its rank; 'importance' =
    # per-layer ranks spending the budget's parameters and MACs on the components of highest |u_j|·|v_j| per unit
    # of cost in the current global model (Maestro's layer granularity), re-chosen every round. Importance gains
    # 3.4 pp of validation on MNIST-1D (protocol point, 3 seeds) but loses 0.6 on digits, and 5.2 on digits at 10
    # clients (benchmarks/results/default_shapes*.json): it does not help on both tasks. 'dense_share' = every layer
    # keeps the budget's share of its dense weights (a square attention projection at rank fraction p keeps 2p of
    # them, a 1:2 FFN layer 1.5p), the rule for models whose layers differ in shape, such as transformers
    level_top_share: float = 0.0  # sampler 'tiers': the share of steps at the client's own level, the rest
    # uniform over the lower levels; 0 = uniform over all its levels (FjORD's rule)
    clip_grad_norm: float = 2.0  # products of factors spike the gradient: unclipped, FedLoD diverges at the protocol's
    # lr (validation 11% on digits, 20% on MNIST-1D in the defaults check); clipping at 0.5 instead also learns at
    # 10 clients but costs 12 pp (FedLoD) and 11 pp (dense) on MNIST-1D at 50 (benchmarks/default_shapes.py)
    lambda_gl: float = 0.0  # group lasso off: budgets, not learned ranks, set the federated footprint
    full_pass: bool = False  # self-distillation (FedLoD, FjORD's KD): 2x client compute, no gain in Maestro's ablation
    # -- devices --
    tier_shares: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)  # five tiers in equal shares (FjORD, HeteroFL)
    devices: str = ""  # '' = the built-in tiers in tier_shares; 'measured' = 48 real phones and boards by ncnn's
    # measured inference speed, in tier_shares (maestro_fl/measured_devices.py); a CSV trace of per-client
    # capabilities (FedScale-like), or a reference 'package.module:attr' to a population (maestro_fl/population.py)
    tier_mode: str = "fixed"  # 'fixed': a client keeps its tier; 'dynamic': redrawn every round (HeteroFL)
    tier_fractions: tuple[float, ...] = ()  # explicit rank fraction per tier; () = derive from each device
    compute_budget_s: float = 15.0  # per-round compute a device may spend: tiers land at rank 0.15/0.25/0.4/0.7/1 on
    # digits and 0.25/0.4/0.7/1/1 on MNIST-1D (the protocol's runs): five and four distinct sub-models
    time_jitter: float = 0.0  # log-sd of a per-round lognormal factor (mean 1) on each client's simulated compute
    # and on its transfers, seeded by round and client; 0 = every round costs a device what the cost model says
    round_deadline_s: float = 0.0  # drop clients whose simulated round time exceeds this; 0 = no deadline
    over_selection: float = 0.0  # select ceil((1 + o) x clients_per_round) online clients and keep the first
    # clients_per_round to finish on the simulated clock, the rest 'late' (Bonawitz et al., MLSys 2019, select 130%);
    # it costs the extra clients' training and shortens rounds; 0 = off (every selected client counts)
    round_mode: str = "sync"  # 'sync': a round waits for its clients; 'fedbuff': clients_per_round train at once and
    # the server merges as soon as buffer_size have finished on the simulated clock, each update discounted by its
    # staleness (Nguyen et al., AISTATS 2022); 'fedasync': the same, merging every update as it finishes, mixed in
    # by async_mixing (Xie et al., 2019). A stale update merges through its own sub-model's index (maestro_fl.server)
    buffer_size: int = 0  # FedBuff's K; 0 = half the clients in flight, ceil(clients_per_round / 2): fast devices
    # then merge about twice per sync round's time without one merge waiting for the slowest clients
    staleness_exponent: float = 0.5  # an update merged tau server steps after it was sent counts (1 + tau)^-a:
    # FedBuff's 1/sqrt(1 + tau), FedAsync's polynomial staleness with a = 0.5
    async_mixing: float = 0.6  # FedAsync's alpha: x <- x + alpha (1 + tau)^-a (trained - sent); in the range
    # 0.4-0.9 its paper explores, assumed, not tuned here
    availability: str = ""  # '' = each round, a client is online with its device's `availability` probability;
    # 'diurnal' = online diurnal_duty of every simulated day, from a seeded phase; PATH.csv = a trace of online
    # intervals (client,start_s,end_s) that repeats after its last end_s. With either, rounds run on the simulated
    # clock: only clients online at a round's start are selected, and one going offline mid-round drops out
    diurnal_day_s: float = 86400.0  # a simulated day is 24 h; shorten it to see a day's cycle in a short run
    diurnal_duty: tuple[float, ...] = (0.5,)  # the share of the day a client is online, for every tier or one per
    # tier from tier 0: an assumed round number (give per-tier shares, weak devices online less, or a trace)
    ignore_budgets: bool = False  # a reference run: every device trains the largest sub-model, as if all afforded it
    # (the homogeneous bound: what the method's model reaches when no device is weak); tiers keep their labels
    # -- server --
    aggregation: str = "ordered"  # FedLoD's rule. 'ordered': per-component prefix averaging; 'ordered_products':
    # per nested rank level, the holders' mean U Vᵀ re-factored (no cross-term); 'svd': average U Vᵀ and re-factor;
    # 'zero_pad': pad factors with zeros to the global rank, average over all clients
    server_shrink_eps: float = 0.0  # server-side progressive shrinking of the aggregate; 0 = off
    server_momentum: float = 0.7  # FedAvgM on every method's merge (maestro_fl/server_optimizer.py): validation, mean
    # over tiers, FedLoD / dense: 50 clients +9.2 / +5.8 pp on MNIST-1D, -0.8 / 0.0 on digits; 10 clients +6.9 / +2.0
    # on MNIST-1D, +0.9 / 0.0 on digits; 0.5 is lower for FedLoD at 3 of those 4; 0.9 loses 5 pp on MNIST-1D at the
    # protocol's point (benchmarks/results/default_shapes.json against default_shapes_no_server_momentum.json); 0 = FedAvg
    max_update_norm: float = 3.0  # reject a reply that moved its sub-model by > this x its norm: 2.6x the most an
    # honest client moved, 1.17x (every method, digits and MNIST-1D, first 3 rounds, at the protocol's largest step lr 0.3
    # x 3 epochs with 50 clients, and at 10 clients of ~130 examples with lr 0.05 and 0.15: benchmarks/update_norms.py,
    # results/update_norms*.json); a client sending 9x its model (update 8x) is refused; 0 = off
    robust_merge: str = "none"  # 'median' or 'trimmed_mean' per element over holders (Flower's FedMedian/FedTrimmedAvg)
    trim_fraction: float = 0.2  # trimmed mean: the share cut at each end (Flower's FedTrimmedAvg default beta)
    # -- engine --
    backend: str = "ray"  # 'ray': ClientApps in Ray actors that are replaced when they die or hang;
    # 'flower': Flower's own simulation engine (Ray); 'local': in this process, one client after another
    num_cpus_per_client: float = 1.0  # 2 actors on 2 cores (one per core): the main job takes 54 s on an idle
    # 2-core machine (measured 2026-12-03); one 2-CPU actor took 91 s against 55 s (2026-11, Flower's engine)
    num_gpus_per_client: float = 0.0  # fractional GPUs per ClientApp when Ray sees GPUs
    client_threads: int = 1  # torch threads of a client's local training: 1 gives the same tables on every
    # backend and machine (matmul results depend on the thread count); more only helps large models
    server_threads: int = 1  # torch threads of the server's evaluation and footprints: 1 gives the same tables
    # on every machine, and more spin-wait against the clients' actors and a notebook's kernel (the
    # bring-your-own notebook: 23 s at 2 threads, 6.8 s at 1, on an idle 2-core machine, 2026-12-02)
    ray_address: str = ""  # attach to an existing Ray cluster ('auto' or host:port); '' = start a local one
    round_timeout_s: float = 300.0  # wall seconds the server waits for replies; later ones count as timeouts
    # -- run --
    seed: int = 0  # partitions, tiers, sampling and local training all follow it
    out_dir: str = "runs"  # run directories go under here
    run_name: str = ""  # '' = sim-dataset-model-seed-timestamp
    resume: str = ""  # a run directory to continue from its last checkpoint
    progress: bool = True  # one line per round
    tracking: str = ""  # '' = the tables only; 'tensorboard' and/or 'mlflow' (comma-separated) mirror them (extra [tracking])
    eval_every: int = 1  # central test (and validation) evaluation of every tier every N rounds and at the last;
    # it never changes training: 1 keeps every round's curve, and each evaluation costs ~tiers x test-set passes
    diagnostics_every: int = 0  # LoD runs: components.csv every round, the whole rank ladder and per-layer cuts
    # (ladder_rounds.csv, truncation.csv) every N rounds and at the last; 0 = off: ~13 + tiers x layers evaluations
    fault_injection: str = ""  # robustness testing: 'partition:kind[@round],...' (kinds: config.FAULT_KINDS)

    def validate(self) -> SimConfig:
        check_one_of("strategy", self.strategy, strategies())
        check_dataset(self)
        check_model(self.model)
        check_one_of("norm", self.norm, ("default", *NORMS))
        check_one_of("init", self.init, ("svd", "random"))
        check_one_of("partition", self.partition, ("iid", "dirichlet", "pathological", "natural"))
        if self.dataset in NATURAL_GROUPS and self.partition_by:
            raise ConfigError(f"partition_by: dataset {self.dataset!r} has its own natural groups "
                              f"({NATURAL_GROUPS[self.dataset]}); leave partition_by empty")
        if self.partition_by and self.partition != "natural":
            raise ConfigError("partition_by=COLUMN goes with partition='natural' (one client per value of the column)")
        if self.partition == "natural" and not self.partition_by and self.dataset not in NATURAL_GROUPS:
            raise ConfigError("partition='natural' needs partition_by=COLUMN (one client per value of the column); "
                              f"datasets with their own groups: {dict(NATURAL_GROUPS)}")
        check_positive("min_partition_size", self.min_partition_size)
        check_one_of("sampler", self.sampler, SAMPLERS)
        check_one_of("rank_allocation", self.rank_allocation, ("uniform", "dense_share", "importance"))
        check_one_of("tier_mode", self.tier_mode, ("fixed", "dynamic"))
        check_non_negative("keep_first", self.keep_first)
        check_one_of("backend", self.backend, ("ray", "flower", "local"))
        check_one_of("aggregation", self.aggregation, ("ordered", "ordered_products", "svd", "zero_pad"))
        if self.strategy != "fedlod" and (self.aggregation != "ordered" or self.server_shrink_eps > 0):
            raise ConfigError(
                f"strategy {self.strategy!r} has its own server rule: aggregation and server_shrink_eps "
                "apply to 'fedlod' only (leave them at 'ordered' and 0)"
            )
        if self.full_pass and self.strategy not in ("fedlod", "fjord"):
            raise ConfigError(f"full_pass (self-distillation) applies to 'fedlod' and 'fjord', not {self.strategy!r}")
        check_fraction("width_floor_rank", self.width_floor_rank)
        if not 0.0 <= self.level_top_share <= 1.0:
            raise ConfigError(f"level_top_share must be in [0, 1], got {self.level_top_share!r}")
        for name in ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "classes_per_client",
                     "client_threads", "server_threads", "eval_every"):
            check_positive(name, getattr(self, name))
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) must be <= num_clients ({self.num_clients})"
            )
        for name in ("alpha", "lr", "num_cpus_per_client", "round_timeout_s"):
            check_positive(name, getattr(self, name))
        for name in ("momentum", "weight_decay", "lambda_gl", "compute_budget_s", "round_deadline_s"):
            check_non_negative(name, getattr(self, name))
        for name in ("server_shrink_eps", "num_gpus_per_client", "max_update_norm", "diagnostics_every",
                     "over_selection"):
            check_non_negative(name, getattr(self, name))
        check_one_of("robust_merge", self.robust_merge, ("none", "median", "trimmed_mean"))
        check_tracking(self.tracking)
        if not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        builtin = not self.devices or self.devices == MEASURED  # populations drawn in tier_shares
        if builtin:
            if not self.tier_shares or any(s < 0 for s in self.tier_shares) or abs(sum(self.tier_shares) - 1) > 1e-6:
                raise ConfigError(f"tier_shares must be non-negative shares of the clients that sum to 1 (one per "
                                  f"tier), got {self.tier_shares!r} (sum {sum(self.tier_shares):g})")
            if self.devices == MEASURED and len(self.tier_shares) > MEASURED_TIERS:
                raise ConfigError(f"tier_shares has {len(self.tier_shares)} entries; devices=measured has "
                                  f"{MEASURED_TIERS} speed tiers")
            if len(self.tier_shares) > len(DEFAULT_TIERS):
                raise ConfigError(f"tier_shares has {len(self.tier_shares)} entries; the built-in tiers are "
                                  f"{len(DEFAULT_TIERS)} (a population of your own: devices=PATH.csv)")
        else:
            try:
                load_population(self.devices, self.num_clients)
            except (PopulationError, UnresolvedReference) as err:
                raise ConfigError(str(err)) from None
        for i, p in enumerate(self.tier_fractions):
            check_fraction(f"tier_fractions[{i}]", p)
        if self.tier_fractions and builtin and len(self.tier_fractions) != len(self.tier_shares):
            raise ConfigError(
                f"tier_fractions has {len(self.tier_fractions)} entries but there are {len(self.tier_shares)} tiers"
            )
        check_non_negative("time_jitter", self.time_jitter)
        check_one_of("round_mode", self.round_mode, ROUND_MODES)
        check_non_negative("buffer_size", self.buffer_size)
        check_non_negative("staleness_exponent", self.staleness_exponent)
        if not 0.0 < self.async_mixing <= 1.0:
            raise ConfigError(f"async_mixing must be in (0, 1], got {self.async_mixing!r}")
        if self.round_mode != "sync":
            if self.buffer_size > self.clients_per_round:
                raise ConfigError(f"buffer_size ({self.buffer_size}) must be <= clients_per_round "
                                  f"({self.clients_per_round}), the clients in flight")
            if self.over_selection > 0:
                raise ConfigError(f"over_selection applies to round_mode='sync' (it closes a round at its K-th "
                                  f"reply), not {self.round_mode!r}, which merges as updates arrive")
            if self.server_shrink_eps > 0:
                raise ConfigError(f"server_shrink_eps changes the global model's shape, so a stale update of "
                                  f"round_mode={self.round_mode!r} would not fit it: use round_mode='sync'")
        if self.availability:
            try:  # the trace's checks need the client count, the diurnal duties the tiers
                tiers = [0] * self.num_clients if self.availability != "diurnal" or len(self.diurnal_duty) == 1 else [
                    d.tier for d in federation_devices(self.devices, self.num_clients, tuple(self.tier_shares),
                                                       tuple(self.tier_fractions), self.seed)]
                schedule_for(self.availability, tiers, self.diurnal_day_s, self.diurnal_duty, self.seed)
            except AvailabilityError as err:
                raise ConfigError(str(err)) from None
        if self.resume and not (Path(self.resume) / "config.json").is_file():
            raise ConfigError(f"resume: {self.resume!r} is not a run directory (no config.json)")
        check_run_name(self.run_name)
        parse_faults(self.fault_injection)
        return self


#: what a resumed run may change: how and where it executes, and how long it goes on. Every other field
#: defines the run: it is in the checkpoint's fingerprint, and resume refuses to change it.
RESUMABLE = ("rounds", "progress", "eval_every", "tracking", "backend", "num_cpus_per_client", "num_gpus_per_client", "ray_address",
             "round_timeout_s", "resume", "out_dir", "run_name")


#: the project's own fault injection (``fault_injection = "partition:kind[@round],..."``), what each does
FAULT_KINDS = {
    "raise": "the ClientApp raises an exception",
    "timeout": "the client replies after round_timeout_s (a straggler)",
    "slow": "the client sleeps 0.5 s of real time first (slow in real time only: the tables must not change)",
    "hang": "the client never replies",
    "exit": "the client's process exits",
    "segfault": "the client's process dies of a segmentation fault",
    "nan": "a reply array is NaN",
    "huge": "a reply array is 1e30 (finite)",
    "shape": "a reply array has a wrong non-rank dimension",
    "rank": "a reply factor holds more components than were sent",
    "dtype": "a reply array comes back as float64",
    "examples": "the reply claims a million times its examples",
    "duplicate": "the reply is delivered twice",
}


@dataclass(frozen=True)
class Fault:
    kind: str
    round: int | None = None  # None: every round

    def applies(self, server_round: int) -> bool:
        return self.round is None or self.round == server_round


def parse_faults(spec: str) -> dict[int, Fault]:
    """``'3:raise,7:exit@2'`` → ``{3: Fault('raise'), 7: Fault('exit', 2)}`` (partition id → fault)."""
    out: dict[int, Fault] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        pid, sep, rest = item.partition(":")
        kind, at, when = rest.strip().partition("@")
        if not sep or not pid.strip().isdigit() or kind not in FAULT_KINDS or (at and not when.strip().isdigit()):
            raise ConfigError(f"fault_injection item {item!r} must be 'partition:kind' or 'partition:kind@round' "
                              f"with kind in {list(FAULT_KINDS)}")
        out[int(pid)] = Fault(kind, int(when) if at else None)
    return out
