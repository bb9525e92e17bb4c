"""Dense model builders; :func:`maestro_fl.convert.factorize` makes them LoD.

* ``mlp`` and ``cnn``: small models for the embedded 8×8 digits data.
* ``lenet5``: the Caffe LeNet-5 (conv 20, conv 50, fc 500) that DLRT's
  LeNet-5/MNIST table uses (430,500 weights without biases), for 28×28 input.
* ``resnet18`` and ``vgg19``: the CIFAR-style networks of Maestro, HeteroFL
  and FjORD, for 32×32 input, with BatchNorm or GroupNorm.
"""

from __future__ import annotations

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


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of ['bn', 'gn', 'none'], got {kind!r}")


def mlp(spec: InputSpec, norm: str = "none") -> nn.Module:
    d = spec.channels * spec.size * spec.size
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, spec.num_classes)
    )


def cnn(spec: InputSpec, norm: str = "none") -> nn.Module:
    """Three 3×3 conv layers and two Linear layers; ~160k weights on 8×8 input."""
    flat = 128 * (spec.size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(spec.channels, 32, 3, padding=1),
        _norm(norm, 32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        _norm(norm, 64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        _norm(norm, 128),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, spec.num_classes),
    )


def lenet5(spec: InputSpec, norm: str = "none") -> nn.Module:
    side = ((spec.size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(spec.channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side * side, 500),
        nn.ReLU(),
        nn.Linear(500, spec.num_classes),
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

    def __init__(self, spec: InputSpec, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, 64, 3, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, spec.num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(spec: InputSpec, norm: str = "bn") -> nn.Module:
    return ResNet18(spec, norm)


_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19(spec: InputSpec, norm: str = "bn") -> nn.Module:
    layers: list[nn.Module] = []
    cin = spec.channels
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=norm == "none"), _norm(norm, int(v)), nn.ReLU()]
            cin = int(v)
    side = spec.size // 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * side * side, spec.num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "lenet5": lenet5,
    "resnet18": resnet18,
    "vgg19": vgg19,
}


def build_model(name: str, spec: InputSpec, norm: str | None = None) -> nn.Module:
    """Dense model ``name`` for inputs of ``spec``; ``norm`` is 'bn', 'gn' or 'none'."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    builder = MODELS[name]
    return builder(spec) if norm is None else builder(spec, norm=norm)
