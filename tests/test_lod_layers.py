"""LoD layers and conversion: every test runs over the table of tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maestro_fl.convert import (
    active_ranks,
    extract,
    factorize,
    lod_layers,
    model_ranks,
    ranks_at_fraction,
    to_dense,
)
from maestro_fl.layers import TRANSPOSED_SVD_FROM_ROWS, LoDConv2d, LoDLinear, dense_is_smaller, thin_svd


def random_ranks(model: nn.Module, seed: int = 1) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    # strictly below max_rank, so that every layer has a tail to check
    return {n: int(torch.randint(1, max(m.max_rank, 2), (1,), generator=g)) for n, m in lod_layers(model).items()}


def test_full_rank_linear_equals_dense_uv() -> None:
    torch.manual_seed(0)
    layer = LoDLinear(9, 7, max_rank=7)
    x = torch.randn(5, 9)
    u, vt = layer.out_network.weight, layer.in_network.weight
    expected = F.linear(x, u @ vt, layer.out_network.bias)
    torch.testing.assert_close(layer(x), expected)


def test_full_rank_conv_equals_dense_uv() -> None:
    torch.manual_seed(0)
    layer = LoDConv2d(3, 5, 3, max_rank=5, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7)
    u = layer.out_network.weight.reshape(5, 5)
    vt = layer.in_network.weight.reshape(5, 27)
    w = (u @ vt).reshape(5, 3, 3, 3)
    expected = F.conv2d(x, w, layer.out_network.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (TRANSPOSED_SVD_FROM_ROWS, TRANSPOSED_SVD_FROM_ROWS + 8)],
                         ids=["wide", "tall", "wide-transposed"])
def test_thin_svd_is_an_svd_on_either_side(shape: tuple[int, int]) -> None:
    """Orthonormal P and Q, non-increasing Σ, and P Σ Qᵀ = W, whichever side LAPACK ran on."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p, s, qt = thin_svd(w)
    k = min(shape)
    assert p.shape == (shape[0], k) and s.shape == (k,) and qt.shape == (k, shape[1])
    torch.testing.assert_close(p.T @ p, torch.eye(k, dtype=w.dtype))
    torch.testing.assert_close(qt @ qt.T, torch.eye(k, dtype=w.dtype))
    assert bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close((p * s) @ qt, w)


def test_svd_init_reproduces_dense_outputs(tiny) -> None:
    name, dense, x = tiny
    lod = factorize(copy.deepcopy(dense)).eval()
    assert lod_layers(lod), f"{name}: nothing was factorized"
    torch.testing.assert_close(lod(x), dense(x), atol=2e-5, rtol=1e-4)


def test_to_dense_inverts_factorize(tiny) -> None:
    _, dense, x = tiny
    back = to_dense(factorize(copy.deepcopy(dense))).eval()
    assert not lod_layers(back)
    torch.testing.assert_close(back(x), dense(x), atol=2e-5, rtol=1e-4)


def test_outputs_and_grads_ignore_components_beyond_rank(tiny) -> None:
    _, dense, x = tiny
    model = factorize(copy.deepcopy(dense)).eval()
    ranks = random_ranks(model)
    with active_ranks(model, ranks):
        before = model(x)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in lod_layers(perturbed).items():
            r = ranks[name]
            layer.in_network.weight[r:] += 10.0
            layer.out_network.weight[:, r:] -= 10.0
    with active_ranks(perturbed, ranks):
        after = perturbed(x)
    torch.testing.assert_close(after, before)

    with active_ranks(model, ranks):
        model(x).square().sum().backward()
    for name, layer in lod_layers(model).items():
        r = ranks[name]
        assert layer.in_network.weight.grad[r:].abs().sum() == 0
        assert layer.out_network.weight.grad[:, r:].abs().sum() == 0
        assert layer.in_network.weight.grad[:r].abs().max() > 0


def test_extract_matches_lod_model_and_really_shrinks(tiny) -> None:
    _, dense, x = tiny
    model = factorize(copy.deepcopy(dense)).eval()
    ranks = random_ranks(model, seed=3)
    with active_ranks(model, ranks):
        expected = model(x)
    small = extract(model, ranks).eval()
    torch.testing.assert_close(small(x), expected, atol=2e-5, rtol=1e-4)
    kept = lod_layers(small)
    for name, layer in lod_layers(model).items():
        r = ranks[name]
        if dense_is_smaller(layer.fan_out, layer.fan_in, r):
            assert name not in kept  # densified: the factors would be larger
            assert isinstance(small.get_submodule(name), (nn.Linear, nn.Conv2d))
        else:
            assert kept[name].max_rank == r
            assert kept[name].in_network.weight.shape[0] == r
            assert kept[name].out_network.weight.shape[1] == r


def test_global_fraction_and_explicit_ranks() -> None:
    model = factorize(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 8)), rank=0.5)
    assert model_ranks(model) == {"0": 5, "2": 4}
    model = factorize(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 8)), rank={"0": 3})
    assert model_ranks(model) == {"0": 3, "2": 8}
    assert ranks_at_fraction(model, 0.34) == {"0": 2, "2": 3}


def test_energy_threshold_picks_rank_from_spectrum() -> None:
    layer = nn.Linear(6, 6, bias=False)
    q1, _ = torch.linalg.qr(torch.randn(6, 6))
    q2, _ = torch.linalg.qr(torch.randn(6, 6))
    s = torch.tensor([3.0, 2.0, 1.0, 0.1, 0.01, 0.001])
    with torch.no_grad():
        layer.weight.copy_(q1 @ torch.diag(s) @ q2.T)
    # energy of the first two: (9 + 4) / 14.0101 = 0.928; the first three: 0.99928
    model = factorize(nn.Sequential(layer), energy=0.95)
    assert model_ranks(model) == {"0": 3}


def test_keep_first_and_classifier_stay_dense() -> None:
    model = factorize(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 4)),
        keep_first=1,
        keep_classifier=True,
    )
    assert sorted(lod_layers(model)) == ["1", "3"]


def test_grouped_and_vector_like_layers_stay_dense() -> None:
    model = factorize(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8, 1)))
    assert lod_layers(model) == {}


def test_rank_above_maximum_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"rank\['0'\] = 40.*\[1, 9\]"):
        factorize(nn.Sequential(nn.Conv2d(1, 32, 3)), rank={"0": 40})
    with pytest.raises(ValueError, match="unknown layers"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank={"nope": 1})
    with pytest.raises(ValueError, match=r"rank must be a fraction in \(0, 1\]"):
        factorize(nn.Sequential(nn.Linear(4, 4)), rank=1.5)


def test_random_init_has_dense_like_scale() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(256, 128)
    lod = factorize(nn.Sequential(copy.deepcopy(dense)), init="random")[0]
    ratio = lod.dense_weight().detach().std() / dense.weight.detach().std()
    assert 0.8 < float(ratio) < 1.25
