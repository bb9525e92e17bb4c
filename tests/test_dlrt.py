"""DLRT: the KLS integrator's invariants, rank discovery, and the layers' maths."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maestro_fl.dlrt import (
    DLRTConv2d,
    DLRTLinear,
    KLSIntegrator,
    dlrt_factorize,
    dlrt_layers,
    dlrt_to_lod,
    truncation_rank,
)


def low_rank_problem(n: int = 32, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    w = u @ torch.diag(torch.arange(rank, 0, -1).float()) @ v.T
    x = torch.randn(512, n, generator=g)
    return x, x @ w.T


def fit(layer: DLRTLinear, x: torch.Tensor, y: torch.Tensor, steps: int, adaptive: bool = True,
        lr: float = 0.5, tau: float = 0.05) -> tuple[KLSIntegrator, list[float]]:
    model = nn.Sequential(layer)
    integ = KLSIntegrator(model, lr=lr, tau=tau, adaptive=adaptive)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        losses.append(integ.step(lambda: F.mse_loss(model(x[idx]), y[idx], reduction="sum") / 64))
    return integ, losses


def new_layer(rank: int, **kw: object) -> DLRTLinear:
    torch.manual_seed(2)
    layer = DLRTLinear(32, 32, rank, bias=False, max_rank=16, min_rank=1, **kw)
    layer.init_random()
    return layer


@pytest.mark.parametrize("adaptive", [True, False])
def test_bases_stay_orthonormal_and_loss_decreases(adaptive: bool) -> None:
    x, y = low_rank_problem()
    layer = new_layer(6)
    _, losses = fit(layer, x, y, steps=300, adaptive=adaptive)
    eye = torch.eye(layer.rank)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)
    assert sum(losses[-20:]) / 20 < 0.05 * sum(losses[:20]) / 20


def test_fixed_rank_variant_keeps_its_rank() -> None:
    x, y = low_rank_problem()
    layer = new_layer(6)
    fit(layer, x, y, steps=50, adaptive=False)
    assert layer.rank == 6 and layer.U.shape == (32, 6) and layer.S.shape == (6, 6)


@pytest.mark.parametrize("start", [12, 2])
def test_adaptive_rank_converges_to_the_true_rank(start: int) -> None:
    x, y = low_rank_problem(rank=4)
    layer = new_layer(start)
    integ, losses = fit(layer, x, y, steps=400)
    assert integ.ranks() == {"0": 4}
    assert losses[-1] < 1e-6


def test_truncation_keeps_exactly_the_values_above_tolerance() -> None:
    sigma = torch.tensor([5.0, 3.0, 1.0, 0.1, 0.01])
    norm = float(sigma.norm())
    # tail norms: from 3: 0.1005, from 2: 1.005; a tolerance between them keeps exactly 3
    assert truncation_rank(sigma, 0.05) == 3 and 0.1005 < 0.05 * norm < 1.005
    assert truncation_rank(sigma, 0.001) == 5  # nothing is below 0.0059 but the last value's 0.01
    assert truncation_rank(sigma, 0.9) == 1  # everything but the first
    assert truncation_rank(sigma, 0.9, min_rank=2) == 2
    assert truncation_rank(sigma, 0.001, max_rank=4) == 4


def test_truncation_inside_a_step_matches_the_svd_of_the_coefficients() -> None:
    """After a step the new S is diagonal and holds the kept singular values in order."""
    x, y = low_rank_problem()
    layer = new_layer(6)
    fit(layer, x, y, steps=5)
    s = layer.S
    torch.testing.assert_close(s, torch.diag(torch.diagonal(s)))
    assert torch.all(torch.diagonal(s)[:-1] >= torch.diagonal(s)[1:])


def test_conv_layer_is_the_unfolded_kernel_factorization() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = DLRTConv2d(conv, rank=4)
    layer.init_random()
    x = torch.randn(2, 3, 7, 7)
    w = (layer.U @ layer.S @ layer.V.T).reshape(8, 3, 3, 3)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.bias, stride=2, padding=1), atol=1e-5, rtol=1e-4)


def test_svd_init_and_lod_conversion_preserve_outputs() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    x = torch.randn(4, 2, 4, 4)
    full = dlrt_factorize(copy.deepcopy(dense), 1.0, init="svd", max_rank=16, keep_classifier=True)
    assert sorted(dlrt_layers(full)) == ["0", "3"]  # the classifier stays dense
    torch.testing.assert_close(full(x), dense(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dlrt_to_lod(full)(x), full(x), atol=1e-5, rtol=1e-4)


def test_train_method_dlrt_writes_the_same_tables(tmp_path: Path) -> None:
    from maestro_fl.centralized import load_model, run_train
    from maestro_fl.config import TrainConfig, resolve
    from maestro_fl.data import load_dataset
    from maestro_fl.training import evaluate

    cfg = resolve(TrainConfig, overrides={"method": "dlrt", "model": "mlp", "epochs": 3, "dlrt_lr": 0.2, "progress": False,
                                          "out_dir": str(tmp_path), "run_name": "d"})
    run = run_train(cfg)
    epochs = pd.read_csv(run / "epochs.csv")
    assert epochs["test_accuracy"].iloc[-1] > 0.8
    assert (epochs["compression"] > 0).all() and (epochs["params"] < epochs["dense_params"]).all()
    ladder = pd.read_csv(run / "ladder.csv")
    data = load_dataset("digits")
    assert evaluate(load_model(run / "model.pt", data.spec), data.test)[1] == pytest.approx(
        ladder["test_accuracy"].iloc[0]
    )
