"""What the server and every client build identically from a :class:`SimConfig`.

Both sides derive the same data partitions, the same method and the same
initial model from the config and its seed, so only weights travel on the
wire. The result is cached per process: a Ray actor builds it once and
reuses it for every client it runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RESUMABLE, ConfigError, SimConfig, resolve, to_dict
from .convert import lod_layers, ranks_at
from .data import DataError, DatasetNotFoundError, Split, TaskData, load_dataset, load_shared, save_shared
from .footprint import footprint
from .methods import METHODS, FederatedMethod
from .models import MODELS, InputSpec, build_model
from .partition import PartitionError, partition_indices, train_val_split
from .references import UnresolvedReference
from .results import CHECKPOINT_FILE, DEVICES, ROUNDS, Checkpoint, CheckpointError, RunDir, complete_lines
from .training import evaluate

LOG = logging.getLogger("maestro_fl")


@dataclass(frozen=True, eq=False)
class Federation:
    data: TaskData
    partitions: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train, validation) indices per client
    method: FederatedMethod

    @property
    def template(self) -> nn.Module:
        """The server's initial model at full size (from the seed)."""
        return self.method.template

    @cached_property
    def layer_names(self) -> tuple[str, ...]:
        """LoD layers, in the order ranks travel on the wire."""
        return tuple(lod_layers(self.template))

    @cached_property
    def validation(self) -> Split:
        """Every client's validation examples together: what tuning scores (never the test set)."""
        held = [val for _, val in self.partitions]
        return self.data.train.subset(np.concatenate(held) if held else np.zeros(0, dtype=np.int64))

    def client_split(self, partition_id: int) -> tuple[Split, Split]:
        train_idx, val_idx = self.partitions[partition_id]
        return self.data.train.subset(train_idx), self.data.train.subset(val_idx)


def run_device(cfg: SimConfig) -> torch.device:
    """Where a run's clients train and its server evaluates: CUDA when the run gives each client a GPU share
    (``num_gpus_per_client > 0``) and one is visible, else the CPU."""
    return torch.device("cuda" if cfg.num_gpus_per_client > 0 and torch.cuda.is_available() else "cpu")


def model_builder(cfg: SimConfig, spec: InputSpec, static_batchnorm: bool = False) -> Callable[..., nn.Module]:
    """``build(p)``: the run's dense model at hidden-width fraction ``p`` (1.0 = full).

    Width-sliced methods replace BatchNorm by HeteroFL's static BN (``'sbn'``):
    running statistics of different widths cannot be averaged. A model given
    by reference gets ``norm`` only when the config sets one.
    """
    if cfg.model in MODELS:
        norm = inspect.signature(MODELS[cfg.model]).parameters["norm"].default if cfg.norm == "default" else cfg.norm
        if static_batchnorm and norm == "bn":
            norm = "sbn"
    else:
        norm = None if cfg.norm == "default" else cfg.norm
    return partial(_build, cfg.model, spec, norm)


def _build(name: str, spec: InputSpec, norm: str | None, width: float = 1.0) -> nn.Module:
    return build_model(name, spec, norm, width=width)


def make_method(cfg: SimConfig, spec: InputSpec) -> FederatedMethod:
    """The method ``cfg.strategy``, holding the run's initial model (seeded)."""
    cls = METHODS[cfg.strategy]
    cls.check_config(cfg)
    return cls(cfg, spec, model_builder(cfg, spec, cls.static_batchnorm))


#: environment variable naming the folder where a run's driver shared its dataset (:func:`share_task`)
SHARED_DATA_ENV = "MAESTRO_FL_SHARED_DATA"
#: the config fields that decide what the dataset is
DATA_FIELDS = ("dataset", "data_root", "download", "dataset_samples", "label_column", "input_column", "partition_by")


def data_key(cfg: SimConfig) -> str:
    return json.dumps({k: getattr(cfg, k) for k in DATA_FIELDS}, sort_keys=True)


def load_task(cfg: SimConfig) -> TaskData:
    """The run's dataset, as the config names it: memory-mapped from the driver's copy when one is shared."""
    folder = os.environ.get(SHARED_DATA_ENV)
    if folder and (shared := load_shared(folder, data_key(cfg))) is not None:
        return shared
    return load_dataset(cfg.dataset, cfg.data_root, cfg.download, samples=cfg.dataset_samples,
                        label_column=cfg.label_column, input_column=cfg.input_column, partition_by=cfg.partition_by)


def share_task(cfg: SimConfig, folder: str | Path) -> dict[str, str]:
    """Write the run's dataset (as this process loaded it) to ``folder``; the environment that makes
    the processes of this machine map it rather than load their own copy."""
    save_shared(federation(cfg).data, folder, data_key(cfg))
    return {SHARED_DATA_ENV: str(folder)}


def federation(cfg: SimConfig) -> Federation:
    """The run's data, partitions and method, built once per process (looked up for every message)."""
    try:
        hash(cfg)
    except TypeError:  # a config built by hand with list values: by its JSON (0.5 ms more)
        return _federation(json.dumps(to_dict(cfg), sort_keys=True))
    return _federation_of(cfg)


@lru_cache(maxsize=2)  # as _federation's: never more federations alive than it keeps
def _federation_of(cfg: SimConfig) -> Federation:
    return _federation(json.dumps(to_dict(cfg), sort_keys=True))


@lru_cache(maxsize=2)
def _federation(key: str) -> Federation:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(key).items()}
    cfg = SimConfig(**fields)
    data = with_sample(load_task(cfg))
    parts = partition_indices(
        data.train.y.numpy(),
        cfg.num_clients,
        cfg.partition,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        min_partition_size=cfg.min_partition_size,
        groups=data.groups,
        seed=cfg.seed,
    )
    splits = tuple(train_val_split(p, cfg.val_fraction, cfg.seed + i) for i, p in enumerate(parts))
    return Federation(data, splits, make_method(cfg, data.spec))


PROBE_SAMPLES = 2  # real inputs the footprints are probed with (two: batch norm in eval mode needs two)


def with_sample(data: TaskData) -> TaskData:
    """The task with its first training inputs in its spec, so that footprints are probed with real data."""
    if data.spec.sample is not None or not len(data.train):
        return data
    return replace(data, spec=replace(data.spec, sample=data.train.x[:PROBE_SAMPLES].clone()))


def probe_disagreement(model: nn.Module, data: TaskData, tolerance: float = 0.01) -> str | None:
    """Whether the model's counted MACs depend on its input: a warning when two batches of real data
    (or real data and zeros) give counts more than ``tolerance`` apart, else ``None``."""
    from .footprint import count_flops

    n = PROBE_SAMPLES
    probes = {"the first training inputs": data.train.x[:n], "zeros": torch.zeros_like(data.train.x[:n])}
    if len(data.train) >= 2 * n:
        probes["the next ones"] = data.train.x[n:2 * n]
    counts = {name: count_flops(model, x)[""] for name, x in probes.items()}
    low, high = min(counts.values()), max(counts.values())
    if high and (high - low) / high > tolerance:
        shown = ", ".join(f"{c // 2:,} with {name}" for name, c in counts.items())
        return (f"footprint: the model's MACs per sample depend on its input ({shown}); the tables count them on "
                f"the first training inputs of {data.name!r}")
    return None


def check_task(cfg: SimConfig) -> Federation:
    """Build the run's federation in this process, or raise one :class:`ConfigError` line saying what is wrong.

    It loads the data, makes the partition, builds the method's model and runs
    one batch of the data through it, so that a dataset that cannot be read, a
    column that is missing, a partition that cannot be made and an input shape
    the model rejects all fail before a run directory or an engine exists.
    The federation is cached: the server's later call reuses it.
    """
    try:
        fed = federation(cfg)
    except ConfigError:  # the method refused an option (FederatedMethod.check_config): its own line
        raise
    except (DataError, DatasetNotFoundError, PartitionError, UnresolvedReference) as err:
        raise ConfigError(str(err)) from None
    except (ValueError, TypeError, RuntimeError) as err:  # a model that cannot be built or factorized
        raise ConfigError(f"model {cfg.model!r}: cannot be built for inputs of shape {fed_shape(cfg)} "
                          f"({type(err).__name__}: {first_line(err)})") from None
    model = fed.template
    x = fed.data.train.x[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 - whatever the model raises, the user's fix is the same
        raise ConfigError(f"model {cfg.model!r} rejects the inputs of dataset {cfg.dataset!r} (a batch of shape "
                          f"{tuple(x.shape)}, {x.dtype}): {type(err).__name__}: {first_line(err)}") from None
    finally:
        model.train(was_training)
    classes = fed.data.spec.num_classes
    if not isinstance(out, torch.Tensor) or out.shape != (len(x), classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {cfg.model!r} must map a batch of {len(x)} inputs to ({len(x)}, {classes}) logits "
                          f"({classes} classes in dataset {cfg.dataset!r}); it returned {got}")
    if (warning := probe_disagreement(model, fed.data)) is not None:
        LOG.warning("%s", warning)
    try:
        fed.method.cost_table()  # every sub-model a budget can pick: a width method builds the model at each width
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"model {cfg.model!r} for strategy {cfg.strategy!r}: {first_line(err)}") from None
    return fed


def fed_shape(cfg: SimConfig) -> tuple[int, ...] | str:
    try:
        return load_task(cfg).spec.shape
    except Exception:  # noqa: BLE001 - only for the message
        return "(unknown)"


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


# -- what defines a run, so that resume continues the same one -----------------------------------
def run_fingerprint(cfg: SimConfig, fed: Federation) -> dict[str, Any]:
    """Every field that defines the run, the model's array shapes and the data's identity.

    Stored in every checkpoint; :func:`check_resume` compares it with the run
    directory's ``config.json`` and the federation that config builds.
    """
    labels = np.ascontiguousarray(fed.data.train.y.numpy())
    data = hashlib.sha256(labels.tobytes() + repr((len(fed.data.train), len(fed.data.test),
                                                   tuple(fed.data.spec.shape))).encode()).hexdigest()
    parts = hashlib.sha256(b"".join(np.ascontiguousarray(t, dtype=np.int64).tobytes() + b"|"
                                    for pair in fed.partitions for t in pair)).hexdigest()
    return {
        "config": {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in RESUMABLE},
        "model": {k: list(v.shape) for k, v in fed.template.state_dict().items()},
        "data": data,
        "partitions": parts,
    }


def check_resume(run: RunDir, cfg: SimConfig, fed: Federation, fingerprint: dict[str, Any]) -> Checkpoint | None:
    """Verify a run directory before anything of it is changed; returns its checkpoint (``None``: none yet).

    ``fingerprint`` is :func:`run_fingerprint` of ``cfg`` and ``fed``.

    The checkpoint must be this run's (its fingerprint equals the one the
    config builds: no field of ``config.json`` edited, the same model shapes,
    data and partitions), its arrays must fit the model, and the tables must
    be trimmable. Anything else is one :class:`CheckpointError` line naming
    what differs, and nothing has been trimmed.
    """
    checkpoint = run.checkpoint()
    if checkpoint is not None:
        want, got = fingerprint, checkpoint.fingerprint
        ckpt = run / CHECKPOINT_FILE
        changed = sorted(k for k in set(want["config"]) | set(got.get("config", {}))
                         if want["config"].get(k) != got.get("config", {}).get(k))
        if changed:
            shown = ", ".join(f"{k} = {want['config'].get(k)!r} in config.json, {got.get('config', {}).get(k)!r} "
                              "in the checkpoint" for k in changed[:4])
            raise CheckpointError(f"{ckpt}: written by a run with other settings ({shown}); config.json was edited, "
                                  "or the checkpoint is another run's. Restore the run's config.json, or start a new run")
        for what in ("model", "data", "partitions"):
            if want[what] != got.get(what):
                raise CheckpointError(f"{ckpt}: written for other {what} than config.json builds now "
                                      f"(strategy {cfg.strategy!r}, model {cfg.model!r}, dataset {cfg.dataset!r}); "
                                      "it cannot be resumed here")
        problem = arrays_problem(checkpoint.arrays, fed)
        if problem:
            raise CheckpointError(f"{ckpt}: {problem}; it cannot be resumed")
    problems = run.round_table_problems()
    done = checkpoint.round if checkpoint is not None else 0
    if not problems and done and run.has(ROUNDS):
        rows = complete_lines(run / ROUNDS.file)[1:]
        last = max((int(r.split(",", 1)[0]) for r in rows if r.split(",", 1)[0].isdigit()), default=0)
        if last < done:
            problems.append(f"{run / ROUNDS.file}: holds rounds up to {last}, the checkpoint is at round {done}")
    if not problems and run.has(DEVICES):
        rows = complete_lines(run / DEVICES.file)[1:]
        if len(rows) != len(fed.partitions):
            problems.append(f"{run / DEVICES.file}: {len(rows)} clients registered, the run has "
                            f"num_clients = {len(fed.partitions)}")
    if problems:
        raise CheckpointError(f"{problems[0]}; the run directory cannot be resumed as it is (nothing was changed)")
    return checkpoint


def arrays_problem(arrays: Mapping[str, np.ndarray], fed: Federation) -> str | None:
    """Why ``arrays`` cannot be the federation's global model, or ``None``."""
    template = fed.template.state_dict()
    missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
    if missing or extra:
        return f"its arrays differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in template.items():
        got = arrays[name]
        if got.ndim != ref.dim() or any(g > r for g, r in zip(got.shape, ref.shape)):
            return f"{name} has shape {tuple(got.shape)}, the model's is {tuple(ref.shape)}"
        if got.dtype != ref.detach().numpy().dtype:
            return f"{name} is {got.dtype}, the model's is {ref.dtype}"
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            return f"{name} holds NaN or Inf"
    try:
        fed.method.family.global_model(dict(arrays))
    except Exception as err:  # noqa: BLE001 - whatever the family raises, the checkpoint does not fit
        return f"its arrays do not build the model ({type(err).__name__}: {first_line(err)})"
    return None


# -- a finished run's global model, deployed after the fact ------------------------------------
def load_global_model(run_dir: str | Path) -> tuple[SimConfig, Federation, nn.Module]:
    """The config, federation and global model of a run directory (its last checkpoint).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` lacks ``config.json`` or ``checkpoint.pt``.
    """
    run = RunDir(run_dir)
    checkpoint = run.checkpoint(required=True)
    assert checkpoint is not None  # required=True raises instead
    cfg = resolve(SimConfig, overrides=run.config() | {"resume": ""})
    fed = federation(cfg)
    return cfg, fed, fed.method.family.global_model(checkpoint.arrays)


def deploy_ladder(run_dir: str | Path, fractions: Sequence[float]) -> list[dict[str, float]]:
    """Test accuracy and deployed footprint of a LoD run's global model at each rank fraction.

    Train once, deploy at any budget: the global model of a FedLoD run can be
    cut at any rank prefix, not only at the tiers' ranks. Ratios are of the
    full dense model.
    """
    cfg, fed, model = load_global_model(run_dir)
    if not fed.layer_names:
        raise ValueError(f"{run_dir}: strategy {cfg.strategy!r} trained no LoD model; it has no rank ladder")
    shape = fed.data.spec.shape
    dense = footprint(model, shape).dense_params
    rows = []
    for p in sorted(set(fractions)):
        ranks = ranks_at(model, p, fed.method.rank_allocation)
        loss, acc = evaluate(model, fed.data.test, ranks)
        fp = footprint(model, shape, ranks)
        rows.append({"fraction": p, "accuracy": acc, "loss": loss, "params": fp.params, "macs": fp.macs,
                     "params_ratio": fp.params / dense})
    return rows
