"""Dense model builders; :func:`maestro_fl.convert.factorize` makes them LoD.

Every builder takes ``width``, the fraction of hidden channels/units it keeps
(HeteroFL and FjORD sub-models): a hidden layer of ``c`` channels gets
``⌈width·c⌉``; the input channels and the classes never change. A model at
width ``p`` therefore has exactly the shapes of the leading corners
``[:⌈p·c_out⌉, :⌈p·c_in⌉, ...]`` of the full model's tensors (flattening is
channel-major, so the first channels are the first features).

* ``mlp`` and ``cnn``: small models for the embedded 8×8 digits data.
* ``lenet5``: the Caffe LeNet-5 (conv 20, conv 50, fc 500) that DLRT's
  LeNet-5/MNIST table uses (430,500 weights without biases), for 28×28 input.
* ``resnet18`` and ``vgg19``: the CIFAR-style networks of Maestro, HeteroFL
  and FjORD, for 32×32 input, with BatchNorm or GroupNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """Shape of one input sample and the number of classes."""

    channels: int
    size: int
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


NORMS = ("bn", "sbn", "gn", "none")


def scaled(channels: int, width: float) -> int:
    """Hidden channels kept at ``width``: ``⌈width·channels⌉``, at least one."""
    return max(1, math.ceil(width * channels - 1e-9))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "sbn":  # HeteroFL's static BN: batch statistics always, no running averages to aggregate
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "gn":  # gcd: any width's channel count splits into equal groups
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {list(NORMS)}, got {kind!r}")


def mlp(spec: InputSpec, norm: str = "none", width: float = 1.0) -> nn.Module:
    d = spec.channels * spec.size * spec.size
    h1, h2 = scaled(256, width), scaled(128, width)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, spec.num_classes)
    )


def cnn(spec: InputSpec, norm: str = "none", width: float = 1.0) -> nn.Module:
    """Three 3×3 conv layers and two Linear layers; ~160k weights on 8×8 input."""
    c1, c2, c3, h = (scaled(c, width) for c in (32, 64, 128, 128))
    return nn.Sequential(
        nn.Conv2d(spec.channels, c1, 3, padding=1),
        _norm(norm, c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        _norm(norm, c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        _norm(norm, c3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * (spec.size // 4) ** 2, h),
        nn.ReLU(),
        nn.Linear(h, spec.num_classes),
    )


def lenet5(spec: InputSpec, norm: str = "none", width: float = 1.0) -> nn.Module:
    side = ((spec.size - 4) // 2 - 4) // 2
    c1, c2, h = (scaled(c, width) for c in (20, 50, 500))
    return nn.Sequential(
        nn.Conv2d(spec.channels, c1, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, h),
        nn.ReLU(),
        nn.Linear(h, spec.num_classes),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3×3 stem, no max-pool, stages of 64/128/256/512."""

    def __init__(self, spec: InputSpec, norm: str = "bn", width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(spec.channels, stem, 3, padding=1, bias=False)
        self.bn1 = _norm(norm, stem)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = stem
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            cout = scaled(cout, width)
            blocks += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(spec: InputSpec, norm: str = "bn", width: float = 1.0) -> nn.Module:
    return ResNet18(spec, norm, width)


_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19(spec: InputSpec, norm: str = "bn", width: float = 1.0) -> nn.Module:
    layers: list[nn.Module] = []
    cin = spec.channels
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            cout = scaled(int(v), width)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU()]
            cin = cout
    side = spec.size // 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, spec.num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "lenet5": lenet5,
    "resnet18": resnet18,
    "vgg19": vgg19,
}


def build_model(name: str, spec: InputSpec, norm: str | None = None, width: float = 1.0) -> nn.Module:
    """Dense model ``name`` for inputs of ``spec``; ``norm`` is one of :data:`NORMS` (``None``: the model's own)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    builder = MODELS[name]
    return builder(spec, width=width) if norm is None else builder(spec, norm=norm, width=width)
