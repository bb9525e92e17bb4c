"""Maestro training: samplers, group lasso, shrinking, and the linear-case theorem."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from maestro_fl.convert import factorize, lod_layers, model_ranks
from maestro_fl.layers import LoDLinear
from maestro_fl.training import (
    AcrossLayersSampler,
    FixedFractionSampler,
    PerLayerSampler,
    group_lasso,
    shrink,
    shrink_ranks,
)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def test_per_layer_sampler_cycles_through_every_layer_rank_pair_once() -> None:
    max_ranks = {"a": 3, "b": 5}
    sampler = PerLayerSampler(max_ranks, torch.Generator().manual_seed(0))
    draws = [sampler() for _ in range(8)]
    assert all(len(d) == 1 for d in draws)  # exactly one layer truncated per step
    pairs = Counter(next(iter(d.items())) for d in draws)
    assert pairs == Counter([("a", j) for j in range(1, 4)] + [("b", j) for j in range(1, 6)])
    # the next cycle again covers every pair
    assert Counter(next(iter(sampler().items())) for _ in range(8)) == pairs


def test_across_layers_and_fixed_samplers_stay_in_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    across = AcrossLayersSampler({"a": 3, "b": 5}, g)
    seen = {"a": set(), "b": set()}
    for _ in range(200):
        for k, v in across().items():
            seen[k].add(v)
    assert seen == {"a": {1, 2, 3}, "b": {1, 2, 3, 4, 5}}
    assert FixedFractionSampler({"a": 3, "b": 8}, g, 0.25)() == {"a": 1, "b": 2}


def test_tier_level_sampler_draws_exactly_the_given_levels() -> None:
    from maestro_fl.training import TierLevelSampler

    levels = [{"a": 1, "b": 2}, {"a": 2, "b": 4}, {"a": 3, "b": 8}]
    sampler = TierLevelSampler({"a": 3, "b": 8}, torch.Generator().manual_seed(0), levels)
    draws = Counter(tuple(sampler().items()) for _ in range(300))
    assert set(draws) == {tuple(level.items()) for level in levels}
    assert min(draws.values()) > 60  # uniform: ~100 each
    with pytest.raises(ValueError, match="exceeds the model's ranks"):
        TierLevelSampler({"a": 3, "b": 8}, torch.Generator(), [{"a": 4, "b": 1}])
    assert TierLevelSampler({"a": 3}, torch.Generator(), [])() == {"a": 3}  # no levels: its own ranks


def test_group_lasso_matches_hand_computation() -> None:
    layer = LoDLinear(2, 2, max_rank=2, bias=False)
    with torch.no_grad():
        layer.in_network.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))  # rows of Vᵀ: norms 5, 1
        layer.out_network.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # cols of U: norms 1, 2
    # b=1: ‖Vᵀ_{1:}‖ = sqrt(26), ‖U_{:,1:}‖ = sqrt(5); b=2: 1 and 2
    expected = 26**0.5 + 5**0.5 + 1 + 2
    assert float(group_lasso(nn.Sequential(layer)).detach()) == pytest.approx(expected, rel=1e-6)
    assert layer.importance().tolist() == pytest.approx([26**0.5 * 5**0.5, 2.0], rel=1e-6)


def _layer_with_component_scales(scales: list[float]) -> tuple[nn.Sequential, torch.Tensor]:
    n = len(scales)
    u, v = _orthogonal(n, 1), _orthogonal(n, 2)
    layer = LoDLinear(n, n, max_rank=n)
    with torch.no_grad():
        layer.out_network.weight.copy_(u * torch.tensor(scales).sqrt())
        layer.in_network.weight.copy_((v * torch.tensor(scales).sqrt()).T)
        layer.out_network.bias.zero_()
    return nn.Sequential(layer), torch.randn(16, n)


def test_shrink_removes_exactly_the_components_below_eps() -> None:
    # orthonormal factors: imp_b = sqrt(Σ_{i≥b} s_i²) exactly
    scales = [3.0, 2.0, 1.0, 1e-3, 1e-4, 1e-5]
    model, x = _layer_with_component_scales(scales)
    tails = [sum(s**2 for s in scales[b:]) ** 0.5 for b in range(len(scales))]
    eps = 2e-3  # between tails[3] = 1.005e-3 and tails[2] = 1.0000005
    assert tails[3] < eps < tails[2]
    before = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().mean().backward()
    opt.step()  # creates momentum buffers of the full size
    layer = model[0]
    old_buf = opt.state[layer.in_network.weight]["momentum_buffer"].clone()
    with torch.no_grad():  # undo the step so the outputs compare to `before`
        model.load_state_dict(_layer_with_component_scales(scales)[0].state_dict())
    assert shrink_ranks(model, eps) == {"0": 3}
    assert shrink(model, eps, opt) == {"0": 3}
    assert layer.max_rank == 3 and layer.in_network.weight.shape == (3, 6)
    assert layer.out_network.weight.shape == (6, 3)
    torch.testing.assert_close(model(x), before, atol=5e-3, rtol=0)
    # the optimizer follows the shrunken tensors
    params = opt.param_groups[0]["params"]
    assert any(p is layer.in_network.weight for p in params)
    torch.testing.assert_close(opt.state[layer.in_network.weight]["momentum_buffer"], old_buf[:3])
    opt.step()  # and keeps working


def test_shrink_keeps_at_least_one_component() -> None:
    model, _ = _layer_with_component_scales([1e-6, 1e-7])
    assert shrink(model, 1.0) == {"0": 1}


def test_linear_theorem_recovers_truncated_svd_for_every_rank() -> None:
    """Maestro Thm. 4.1: with isotropic inputs LoD gives the rank-k truncated SVD for every k."""
    torch.manual_seed(0)
    n, r = 8, 5
    p, q = _orthogonal(n, 3), _orthogonal(n, 4)
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3, 0.1])
    target = p @ torch.diag(sigma) @ q.T
    layer = LoDLinear(n, n, max_rank=r, bias=False)  # PyTorch's random init, not SVD
    sampler = PerLayerSampler({"l": r}, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    x = torch.eye(n)  # isotropic: the exact expectation over x
    for _ in range(3000):
        loss = (layer(x, rank=sampler()["l"]) - x @ target.T).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for k in range(1, r + 1):
            a_k = p[:, :k] @ torch.diag(sigma[:k]) @ q[:, :k].T
            err = (layer.dense_weight(k) - a_k).norm() / a_k.norm()
            assert err < 1e-3, f"rank {k}: relative error {err:.2e}"
        norms = layer.component_norms()
        torch.testing.assert_close(norms, sigma[:r], atol=1e-3, rtol=1e-3)
        assert torch.all(norms[:-1] > norms[1:])


def test_linear_autoencoder_recovers_principal_subspaces() -> None:
    """For the identity map, the first k components span the top-k principal subspace."""
    torch.manual_seed(0)
    n, r = 8, 4
    q = _orthogonal(n, 5)
    var = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3, 0.1])
    x = q @ torch.diag(var.sqrt()) @ q.T  # rows have covariance q diag(var) qᵀ
    layer = LoDLinear(n, n, max_rank=r, bias=False)
    sampler = PerLayerSampler({"l": r}, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3000):
        loss = (layer(x, rank=sampler()["l"]) - x).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for k in range(1, r + 1):
            basis, _ = torch.linalg.qr(layer.u_matrix(k))
            cosines = torch.linalg.svdvals(basis.T @ q[:, :k])  # cosines of the principal angles
            assert cosines.min() > 0.999, f"rank {k}: largest principal angle cos={cosines.min():.4f}"


def test_group_lasso_training_orders_and_shrinks_a_real_model() -> None:
    """HGL + shrinking on digits removes components while the full model still learns."""
    from maestro_fl.data import load_dataset
    from maestro_fl.models import build_model
    from maestro_fl.training import evaluate, make_sampler, seed_everything, train_epoch

    gen = seed_everything(0)
    data = load_dataset("digits")
    model = factorize(build_model("mlp", data.spec))
    start = sum(model_ranks(model).values())
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(8):
        train_epoch(model, data.train, opt, make_sampler("per_layer", model, gen), lambda_gl=1e-3, generator=gen)
        shrink(model, 3e-3, opt)
    _, acc = evaluate(model, data.test)
    assert sum(model_ranks(model).values()) < start
    assert acc > 0.85


def test_shrink_on_unchanged_model_is_a_no_op() -> None:
    model = factorize(nn.Sequential(nn.Linear(6, 6)))
    snapshot = copy.deepcopy(model.state_dict())
    assert shrink(model, 0.0) == {"0": 6}
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k])
    assert len(lod_layers(model)) == 1


def test_full_pass_self_distillation_runs_two_passes_and_learns() -> None:
    from maestro_fl.data import load_dataset
    from maestro_fl.models import build_model
    from maestro_fl.training import evaluate, make_sampler, seed_everything, train_epoch

    gen = seed_everything(0)
    data = load_dataset("digits")
    model = factorize(build_model("mlp", data.spec))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(3):
        stats = train_epoch(model, data.train, opt, make_sampler("per_layer", model, gen), full_pass=True, generator=gen)
    assert stats.forward_passes == 2 * stats.steps
    assert evaluate(model, data.test)[1] > 0.8
