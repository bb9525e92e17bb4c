"""The footprint against numbers computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from maestro_fl.convert import extract, factorize, lod_layers
from maestro_fl.footprint import footprint


def known_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def test_dense_footprint_by_hand() -> None:
    fp = footprint(known_model(), (1, 5, 5))
    # conv: 4·1·3·3 = 36 weights + 4 biases, 25 output pixels · 36 MACs; linear: 300 + 3, 300 MACs
    assert fp.params == 36 + 4 + 300 + 3
    assert fp.macs == 25 * 36 + 300
    assert fp.bytes("fp32") == 4 * 343 and fp.bytes("fp16") == 2 * 343
    assert (fp.dense_params, fp.dense_macs) == (343, 1200)


def test_lod_footprint_by_hand() -> None:
    model = factorize(known_model())
    ranks = {"0": 2, "3": 2}
    fp = footprint(model, (1, 5, 5), ranks)
    # conv at rank 2: 2·(9 + 4) = 26 weights (< 36) + 4 biases, 25 pixels · 26 MACs
    # linear at rank 2: 2·(100 + 3) = 206 weights (< 300) + 3 biases, 206 MACs
    rows = {r.name: r for r in fp.layers}
    assert (rows["0"].params, rows["0"].macs, rows["0"].rank) == (30, 650, 2)
    assert (rows["3"].params, rows["3"].macs) == (209, 206)
    assert fp.params == 239 and fp.macs == 856
    assert (fp.dense_params, fp.dense_macs) == (343, 1200)
    assert fp.summary()["params_ratio"] == pytest.approx(239 / 343)


def test_layer_whose_factors_are_larger_counts_as_dense_when_deployed() -> None:
    model = factorize(known_model())
    # conv at full rank 4: 4·13 = 52 > 36 weights, so it deploys dense
    fp = footprint(model, (1, 5, 5), {"0": 4})
    assert {r.name: r.params for r in fp.layers}["0"] == 40
    trained = footprint(model, (1, 5, 5), {"0": 4}, as_deployed=False)
    assert {r.name: r.params for r in trained.layers}["0"] == 56


def test_other_parameters_are_counted_in_rows_of_their_own() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    fp = footprint(model, (2, 3, 3))
    assert fp.params == sum(p.numel() for p in model.parameters())
    rows = {r.name: r for r in fp.layers}
    assert (rows["1"].kind, rows["1"].params) == ("batchnorm2d", 8)


def test_footprint_of_extracted_model_equals_footprint_at_ranks(tiny) -> None:
    _, dense, x = tiny
    model = factorize(copy.deepcopy(dense))
    ranks = {n: max(1, m.max_rank // 3) for n, m in lod_layers(model).items()}
    shape = tuple(x.shape[1:])
    at_ranks = footprint(model, shape, ranks)
    deployed = footprint(extract(model, ranks), shape)
    assert (deployed.params, deployed.macs) == (at_ranks.params, at_ranks.macs)
    assert deployed.params == sum(p.numel() for p in extract(model, ranks).parameters())


def test_bad_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        footprint(known_model(), (1, 5, 5)).bytes("int3")


def test_batch_statistics_norm_after_a_global_pool_is_counted_per_sample() -> None:
    """Static BN (batch statistics in eval mode, as width methods use) after a pool to 1×1 refuses a batch of one
    sample; the probe feeds two and the counts stay per sample."""
    from maestro_fl.budget import activation_count

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4, 3))
    fp = footprint(model, (1, 8, 8))
    assert fp.macs == 4 * 9 * 64 + 12  # the conv at 64 positions and the classifier, one sample
    assert activation_count(model, (1, 8, 8)) == 4 * 64 + 4 + 4 + 3  # conv, pool, norm and classifier outputs


def test_counts_are_measured_once_per_structure_and_input_and_never_shared_across_structures() -> None:
    """The process-wide cache: a second count of the same structure is a hit; anything a count depends on is a miss."""
    from maestro_fl.budget import activation_count
    from maestro_fl.footprint import MEASURED

    def net(stride: int = 1) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=stride), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 8))

    MEASURED.clear()
    a = footprint(net(), (1, 6, 6))
    misses = MEASURED.misses
    b = footprint(net(), (1, 6, 6))  # a fresh model of the same structure: other weights, the same counts
    assert b == a and MEASURED.misses == misses and MEASURED.hits == 1
    strided = footprint(net(stride=2), (1, 6, 6))
    assert strided.macs < a.macs  # a stride is in the key: not the unstrided count
    assert footprint(net(), (1, 8, 8)).macs > a.macs  # so is the input
    x = torch.randn(1, 1, 6, 6)
    assert activation_count(net(), x) == activation_count(net(), x.clone()) and MEASURED.hits >= 2
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    untied = footprint(model, (8,)).params
    model[1].weight = model[0].weight  # the same shapes, one tensor: counted once
    assert footprint(model, (8,)).params == untied // 2

    class Doubling(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.linear = inner, nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.inner(x))

    once = footprint(Wrapped(Doubling()), (8,)).macs

    class Doubling(nn.Module):  # type: ignore[no-redef]  # redefined as in a notebook: same name, another forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ torch.eye(8)

    assert footprint(Wrapped(Doubling()), (8,)).macs == once + 64  # the new class is a new key

    class Flagged(nn.Module):  # a forward that branches on a flag its repr does not show
        def __init__(self, twice: bool) -> None:
            super().__init__()
            self.linear, self.twice = nn.Linear(8, 8), twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.linear(x)) if self.twice else self.linear(x)

    assert footprint(Flagged(True), (8,)).macs == 2 * footprint(Flagged(False), (8,)).macs
