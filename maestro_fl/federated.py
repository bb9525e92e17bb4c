"""What the server and every client build identically from a :class:`SimConfig`.

Both sides derive the same data partitions and the same LoD model template
from the config and its seed, so only weights travel on the wire. The result
is cached per process: a Ray actor builds it once and reuses it for every
client it runs.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .config import DENSE_STRATEGIES, WIDTH_STRATEGIES, SimConfig, to_dict
from .convert import factorize, lod_layers
from .data import ImageData, Split, load_dataset
from .models import MODELS, build_model
from .partition import partition_indices, train_val_split


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
