"""What the server and every client build identically from a :class:`SimConfig`.

Both sides derive the same data partitions and the same LoD model template
from the config and its seed, so only weights travel on the wire. The result
is cached per process: a Ray actor builds it once and reuses it for every
client it runs.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DENSE_STRATEGIES, WIDTH_STRATEGIES, SimConfig, resolve, to_dict
from .convert import factorize, lod_layers, ranks_at_fraction, truncate
from .footprint import footprint
from .data import ImageData, Split, load_dataset
from .models import MODELS, build_model
from .partition import partition_indices, train_val_split
from .training import evaluate


@dataclass(frozen=True)
class Federation:
    data: ImageData
    partitions: tuple[tuple[np.ndarray, np.ndarray], ...]  # (train, validation) indices per client
    template: nn.Module  # the LoD model at full rank, initialized from the seed
    layer_names: tuple[str, ...]  # LoD layers, in the order ranks travel on the wire

    def client_split(self, partition_id: int) -> tuple[Split, Split]:
        train_idx, val_idx = self.partitions[partition_id]
        return self.data.train.subset(train_idx), self.data.train.subset(val_idx)

    @property
    def mean_train_size(self) -> int:
        return int(round(np.mean([len(t) for t, _ in self.partitions])))


def model_at_width(cfg: SimConfig, spec, width: float) -> nn.Module:  # type: ignore[no-untyped-def]
    """The dense model at hidden-width fraction ``width`` (HeteroFL/FjORD sub-models; 1.0 = full).

    Width-sliced strategies replace BatchNorm by HeteroFL's static BN
    (``'sbn'``): running statistics of different widths cannot be averaged.
    """
    norm = inspect.signature(MODELS[cfg.model]).parameters["norm"].default if cfg.norm == "default" else cfg.norm
    if cfg.strategy in WIDTH_STRATEGIES and norm == "bn":
        norm = "sbn"
    return build_model(cfg.model, spec, norm, width=width)


def build_template(cfg: SimConfig, spec) -> nn.Module:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = model_at_width(cfg, spec, 1.0)
    if cfg.strategy in DENSE_STRATEGIES:
        return model
    return factorize(
        model,
        # FedHM's server model is dense: its factors are the exact SVD of the initial weights
        init="svd" if cfg.strategy == "fedhm" else cfg.init,  # type: ignore[arg-type]
        keep_first=cfg.keep_first,
        keep_classifier=cfg.keep_classifier,
        generator=gen,
    )


def federation(cfg: SimConfig) -> Federation:
    return _federation(json.dumps(to_dict(cfg), sort_keys=True))


@lru_cache(maxsize=2)
def _federation(key: str) -> Federation:
    cfg = SimConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(key).items()})
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download)
    parts = partition_indices(
        data.train.y.numpy(),
        cfg.num_clients,
        cfg.partition,
        alpha=cfg.alpha,
        classes_per_client=cfg.classes_per_client,
        seed=cfg.seed,
    )
    splits = tuple(train_val_split(p, cfg.val_fraction, cfg.seed + i) for i, p in enumerate(parts))
    template = build_template(cfg, data.spec)
    return Federation(data, splits, template, tuple(lod_layers(template)))


def ranks_to_list(names: tuple[str, ...], ranks: dict[str, int]) -> list[int]:
    return [int(ranks[n]) for n in names]


def ranks_from_list(names: tuple[str, ...], values: list[int]) -> dict[str, int]:
    if len(values) != len(names):
        raise ValueError(f"ranks: expected {len(names)} values (one per LoD layer), got {len(values)}")
    return dict(zip(names, (int(v) for v in values)))


# -- a finished run's global model, deployed after the fact ------------------------------------
def load_global_model(run_dir: str | Path) -> tuple[SimConfig, Federation, nn.Module]:
    """The config, federation and global model of a run directory (its last checkpoint).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` lacks ``config.json`` or ``checkpoint.pt``.
    """
    run_dir = Path(run_dir)
    for name in ("config.json", "checkpoint.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run directory: no {name}")
    cfg = resolve(SimConfig, overrides=json.loads((run_dir / "config.json").read_text()) | {"resume": ""})
    fed = federation(cfg)
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = truncate(fed.template, dict(ckpt["global_ranks"])) if fed.layer_names else copy.deepcopy(fed.template)
    model.load_state_dict(ckpt["arrays"])
    return cfg, fed, model


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
        ranks = ranks_at_fraction(model, p)
        loss, acc = evaluate(model, fed.data.test, ranks)
        fp = footprint(model, shape, ranks)
        rows.append({"fraction": p, "accuracy": acc, "loss": loss, "params": fp.params, "macs": fp.macs,
                     "params_ratio": fp.params / dense})
    return rows
