"""``maestro-fl train``: train one LoD model, then deploy it at a ladder of ranks.

The on-device story of Maestro: the same trained model is evaluated at every
rank fraction of ``eval_fractions`` without retraining. The run directory
gets, as the run goes:

* ``config.json``: the resolved config;
* ``epochs.csv``: per-epoch loss, accuracy, footprint and total rank;
* ``ranks.csv``: the learned rank of every layer after every epoch;
* ``ladder.csv``: accuracy, params, MACs and bytes per rank fraction;
* ``model.pt``: the trained LoD model (see :func:`load_model`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as cfgmod
from .config import TrainConfig
from .convert import _set_module, extract, factorize, model_ranks, ranks_at_fraction, truncate
from .data import Split, batches, load_dataset
from .dlrt import KLSIntegrator, dlrt_factorize, dlrt_layers, dlrt_to_lod, dlrt_train_epoch
from .footprint import footprint
from .models import InputSpec, build_model
from .results import EPOCHS, LADDER, RANKS, RunDir, format_table, new_run_dir, safe_name, timestamp
from .training import evaluate, make_sampler, seed_everything, shrink, train_epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("device: 'cuda' requested but torch sees no GPU; use device=cpu or auto")
    return torch.device(name)


def build_lod_model(cfg: TrainConfig, spec: InputSpec, generator: torch.Generator | None = None) -> nn.Module:
    """The dense model of ``cfg``, factorized as ``cfg`` says."""
    model = build_model(cfg.model, spec, None if cfg.norm == "default" else cfg.norm)
    return factorize(
        model,
        rank=None if cfg.rank_fraction >= 1.0 else cfg.rank_fraction,
        init=cfg.init,  # type: ignore[arg-type]  # a str checked against Init's values by the config
        keep_first=cfg.keep_first,
        keep_classifier=cfg.keep_classifier,
        generator=generator,
    )


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch`` under ``cfg.lr_schedule``."""
    base = cfg.dlrt_lr if cfg.method == "dlrt" else cfg.lr
    if cfg.lr_schedule == "step":
        return base * (0.1 ** sum(epoch >= m for m in (cfg.epochs // 2, (3 * cfg.epochs) // 4)))
    if cfg.lr_schedule == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return base


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Split, num_batches: int = 20, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm statistics at the model's current ranks (the authors do this before eval)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    for i, (x, _) in enumerate(batches(data, batch_size, generator=gen)):
        if i >= num_batches:
            break
        model(x.to(device))
    model.train(was_training)


def run_train(cfg: TrainConfig) -> Path:
    """Run centralized LoD training as configured; returns the run directory."""
    cfg.validate()
    device = resolve_device(cfg.device)
    gen = seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, samples=cfg.dataset_samples,
                        label_column=cfg.label_column, input_column=cfg.input_column)
    name = cfg.run_name or safe_name(f"train-{cfg.dataset}-{cfg.model}-s{cfg.seed}-{timestamp()}")
    run_dir = new_run_dir(cfg.out_dir, name)
    RunDir(run_dir).save_config(cfgmod.to_dict(cfg))

    if cfg.method == "dlrt":
        dense = build_model(cfg.model, data.spec, None if cfg.norm == "default" else cfg.norm)
        model = dlrt_factorize(dense, cfg.dlrt_rank_fraction, init=cfg.init, keep_first=cfg.keep_first,
                               generator=gen).to(device)
        integrator = KLSIntegrator(model, lr=cfg.dlrt_lr, tau=cfg.dlrt_tau, adaptive=cfg.dlrt_adaptive,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        current_ranks = integrator.ranks
    else:
        model = build_lod_model(cfg, data.spec, gen).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        current_ranks = lambda: model_ranks(model)  # noqa: E731
    run = RunDir(run_dir)
    epochs_log, ranks_log = run.writer(EPOCHS), run.writer(RANKS)
    full_ranks = current_ranks()
    bar = _progress(cfg)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        lr = lr_at(cfg, epoch)
        if cfg.method == "dlrt":
            integrator.lr = lr
            for group in integrator.dense_opt.param_groups if integrator.dense_opt else []:
                group["lr"] = lr
            stats = dlrt_train_epoch(model, integrator, data.train, batch_size=cfg.batch_size, generator=gen,
                                     augment=data.augment, device=device)
            ranks = integrator.ranks()
            deployable = dlrt_to_lod(model)
        else:
            for group in opt.param_groups:
                group["lr"] = lr
            sampler = make_sampler(cfg.sampler, model, gen, cfg.sampler_fraction)  # rebuilt: ranks may have shrunk
            stats = train_epoch(
                model,
                data.train,
                opt,
                sampler,
                lambda_gl=cfg.lambda_gl,
                full_pass=cfg.full_pass,
                batch_size=cfg.batch_size,
                generator=gen,
                augment=data.augment,
                device=device,
            )
            ranks = shrink(model, cfg.shrink_eps, opt) if cfg.shrink_eps > 0 else model_ranks(model)
            deployable = model
        recalibrate_batchnorm(model, data.train)
        test_loss, test_acc = evaluate(model, data.test, device=device)
        fp = footprint(deployable, data.spec.shape)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "total_rank": sum(ranks.values()),
            "params": fp.params,
            "macs": fp.macs,
            "dense_params": fp.dense_params,
            "compression": 1.0 - fp.params / fp.dense_params,
            "seconds": time.perf_counter() - t0,
        }
        epochs_log.append(row)
        ranks_log.extend(
            {"epoch": epoch + 1, "layer": n, "rank": r, "initial_rank": full_ranks[n]} for n, r in ranks.items()
        )
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{test_acc:.3f}", rank=row["total_rank"])
    bar.close()

    final = dlrt_to_lod(model) if cfg.method == "dlrt" else model  # DLRT: factors ordered by singular value
    ladder = evaluate_ladder(final, data.train, data.test, data.spec, cfg.eval_fractions, device)
    run.writer(LADDER).extend(ladder)
    torch.save(
        {"config": cfgmod.to_dict(cfg), "ranks": model_ranks(final), "state_dict": final.state_dict()},
        run_dir / "model.pt",
    )
    print(f"\nrun directory: {run_dir}")
    print(format_table(ladder, LADDER_COLUMNS))
    return run_dir


LADDER_COLUMNS = [
    ("rank_fraction", "rank frac", ".2f"),
    ("test_accuracy", "accuracy", ".4f"),
    ("params", "params", ",d"),
    ("params_ratio", "params/dense", ".3f"),
    ("macs", "MACs", ",d"),
    ("macs_ratio", "MACs/dense", ".3f"),
    ("bytes_fp32", "bytes fp32", ",d"),
]


def evaluate_ladder(
    model: nn.Module,
    train: Split,
    test: Split,
    spec: InputSpec,
    fractions: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Accuracy and footprint of the extracted model at each rank fraction."""
    rows = []
    for p in fractions:
        ranks = ranks_at_fraction(model, p)
        deployed = extract(model, ranks)
        recalibrate_batchnorm(deployed, train)
        loss, acc = evaluate(deployed, test, device=device)
        fp = footprint(deployed, spec.shape)
        rows.append(
            {"rank_fraction": p, "test_loss": loss, "test_accuracy": acc, "total_rank": sum(ranks.values())}
            | fp.summary()
        )
    return rows


def load_model(path: str | Path, spec: InputSpec) -> nn.Module:
    """Rebuild a trained LoD model from ``model.pt`` (architecture, learned ranks, weights)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = cfgmod.resolve(TrainConfig, overrides={k: v for k, v in ckpt["config"].items()})
    if cfg.method == "dlrt":  # saved as LoD factors: the DLRT layers' shapes at their final ranks
        model = dlrt_factorize(build_model(cfg.model, spec, None if cfg.norm == "default" else cfg.norm),
                               cfg.dlrt_rank_fraction, keep_first=cfg.keep_first)
        for name, layer in dlrt_layers(model).items():
            _set_module(model, name, layer.empty_lod(ckpt["ranks"][name]))
    else:
        model = truncate(build_lod_model(cfg, spec), ckpt["ranks"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def _progress(cfg: TrainConfig) -> Any:  # a tqdm bar (tqdm ships no types)
    from tqdm.auto import tqdm

    return tqdm(total=cfg.epochs, desc="epochs", unit="ep", disable=not cfg.progress)
