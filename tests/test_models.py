"""The model zoo: shapes, the reference LeNet-5 size, and LoD conversion of the big CIFAR nets."""

from __future__ import annotations

import copy

import pytest
import torch

from maestro_fl.convert import factorize, lod_layers
from maestro_fl.models import InputSpec, build_model

CASES = [
    ("mlp", InputSpec.image(1, 8, 10), None),
    ("cnn", InputSpec.image(1, 8, 10), "gn"),
    ("lenet5", InputSpec.image(1, 28, 10), None),
    ("resnet18", InputSpec.image(3, 32, 10), "bn"),
    ("vgg19", InputSpec.image(3, 32, 10), "bn"),
]  # (their GroupNorm builds are in tests/test_bring_your_own.py's table, checked in train and eval mode)


@pytest.mark.parametrize("name,spec,norm", CASES)
def test_models_build_and_convert(name: str, spec: InputSpec, norm: str | None) -> None:
    torch.manual_seed(0)
    dense = build_model(name, spec, norm).eval()
    x = torch.randn(2, *spec.shape)
    out = dense(x)
    assert out.shape == (2, spec.num_classes)
    lod = factorize(copy.deepcopy(dense)).eval()
    assert len(lod_layers(lod)) >= 3
    torch.testing.assert_close(lod(x), out, atol=1e-4, rtol=1e-3)


def test_lenet5_is_dlrts_reference_size() -> None:
    """DLRT's LeNet-5/MNIST table counts 430,500 weights (biases excluded)."""
    model = build_model("lenet5", InputSpec.image(1, 28, 10))
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert weights == 430_500


def test_unknown_model_or_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("gpt", InputSpec.image(1, 8, 10))
    with pytest.raises(ValueError, match="norm must be one of"):
        build_model("cnn", InputSpec.image(1, 8, 10), "layer")
