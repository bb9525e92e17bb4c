"""Dense model builders; :func:`maestro_fl.convert.factorize` makes them LoD.

Every builder takes ``width``, the fraction of hidden channels/units it keeps
(HeteroFL and FjORD sub-models): a hidden layer of ``c`` channels gets
``⌈width·c⌉``; the input channels and the classes never change. A model at
width ``p`` therefore has exactly the shapes of the leading corners
``[:⌈p·c_out⌉, :⌈p·c_in⌉, ...]`` of the full model's tensors (flattening is
channel-major, so the first channels are the first features).

* ``mlp``: two hidden layers over the flattened input (any shape); ``cnn``: a
  small CNN for the embedded 8×8 digits data.
* ``cnn1d``: a 1-D CNN for signals (MNIST-1D).
* ``lenet5``: the Caffe LeNet-5 (conv 20, conv 50, fc 500) that DLRT's
  LeNet-5/MNIST table uses (430,500 weights without biases), for 28×28 input.
* ``resnet18`` and ``vgg19``: the CIFAR-style networks of Maestro, HeteroFL
  and FjORD, for 32×32 input, with BatchNorm or GroupNorm.
* ``char_transformer``: a small pre-norm transformer for next-character
  prediction (Shakespeare), whose width keeps the first heads and FFN units.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .catalog import NORMS
from .references import is_reference, resolve


@dataclass(frozen=True)
class InputSpec:
    """What one input sample is: its shape (images ``(C, H, W)``, signals ``(C, L)``, tokens ``(L,)``,
    features ``(D,)``), its dtype, and the number of classes.

    Attributes
    ----------
    shape : tuple of int
        One sample's shape, without the batch dimension.
    num_classes : int
        Output classes.
    dtype : str
        ``"float32"``, or ``"int64"`` for token ids.
    vocab_size : int
        For token ids: they lie in ``[0, vocab_size)``; 0 otherwise.
    """

    shape: tuple[int, ...]
    num_classes: int
    dtype: str = "float32"
    vocab_size: int = 0
    #: a few real inputs of the task: footprints are probed with them, not with zeros (a model whose
    #: control flow depends on its input counted 2.4-3.9x low on zeros). Not part of the spec's identity.
    sample: torch.Tensor | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def image(cls, channels: int, size: int, num_classes: int) -> InputSpec:
        """A square image of ``channels × size × size``."""
        return cls((channels, size, size), num_classes)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        """The spatial side (images, signals)."""
        return self.shape[-1]

    def example(self, batch: int = 1) -> torch.Tensor:
        """A batch of inputs of this spec (probes, checks): the task's real :attr:`sample` where there is one
        (repeated to ``batch``), otherwise zeros."""
        if self.sample is not None and len(self.sample):
            reps = -(-batch // len(self.sample))
            return self.sample.repeat(reps, *([1] * (self.sample.dim() - 1)))[:batch].clone()
        return torch.zeros(batch, *self.shape, dtype=getattr(torch, self.dtype))




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
    """Two hidden layers (256, 128) over the flattened input, any shape."""
    d = math.prod(spec.shape)
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
    """LeNet (Caffe's variant): two 5×5 conv layers (20, 50) with pooling, a 500-unit Linear layer, the classifier."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(spec: InputSpec, norm: str = "bn", width: float = 1.0) -> nn.Module:
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool); ~11M weights at full width."""
    return ResNet18(spec, norm, width)


_VGG19: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def cnn1d(spec: InputSpec, norm: str = "gn", width: float = 1.0) -> nn.Module:
    """Three 1-D convolutions and two Linear layers, for signals such as MNIST-1D (``(1, 40)``: ~116k weights).

    The MNIST-1D authors' CNN (Greydanus & Kobak, ICML 2024) is three stride-2
    1-D convolutions of 25 channels; this one is wider, keeps the first
    convolution at stride 1, and has a norm after every convolution (its
    default GroupNorm is batch-independent, as the federated defaults want).
    """
    c1, c2, c3, h = (scaled(c, width) for c in (32, 64, 64, 128))
    length = spec.shape[-1]
    after = ((length - 1) // 2) // 2 + 1  # two stride-2 convolutions with padding 2, kernel 5
    return nn.Sequential(
        nn.Conv1d(spec.shape[0], c1, 5, padding=2),
        _norm1d(norm, c1),
        nn.ReLU(),
        nn.Conv1d(c1, c2, 5, stride=2, padding=2),
        _norm1d(norm, c2),
        nn.ReLU(),
        nn.Conv1d(c2, c3, 5, stride=2, padding=2),
        _norm1d(norm, c3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * after, h),
        nn.ReLU(),
        nn.Linear(h, spec.num_classes),
    )


def _norm1d(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(channels)
    if kind == "sbn":
        return nn.BatchNorm1d(channels, track_running_stats=False)
    return _norm(kind, channels)  # GroupNorm and Identity do not care about the dimension


def vgg19(spec: InputSpec, norm: str = "bn", width: float = 1.0) -> nn.Module:
    """VGG-19 with normalization after every conv layer and one Linear classifier, for 32×32 images."""
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


class CharSelfAttention(nn.Module):
    """Multi-head self-attention with separate Q, K, V and output Linear layers of inner width ``heads·head_dim``.

    Not ``nn.MultiheadAttention``: width methods keep the first ``⌈p·heads⌉``
    heads, so the inner width must differ from the model's (which
    ``nn.MultiheadAttention`` forbids), and every weight must be a leading
    corner of the full model's (its stacked ``in_proj_weight`` is not).
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, -1, self.head_dim).transpose(1, 2)  # (-1: a LoD model's heads are all here)

        out = nn.functional.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                                         heads(self.v_proj(x)), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


class CharBlock(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + FFN(norm(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CharSelfAttention(dim, heads, head_dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class CharTransformer(nn.Module):
    """Next-character prediction: embedding + learned positions, pre-norm blocks, an untied head on the last
    position.

    Sized for two cores (the defaults of :func:`char_transformer`). The
    attention is causal, so the last position reads the whole window and
    every other position only what precedes it, as in a language model.
    """

    def __init__(self, vocab: int, length: int, num_classes: int, dim: int, heads: int, head_dim: int, ffn: int,
                 layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)  # (GPT-2's 0.02: small next to the tokens')
        self.blocks = nn.Sequential(*(CharBlock(dim, heads, head_dim, ffn) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x) + self.position[: x.shape[1]])
        return self.head(self.norm(h[:, -1]))


def char_transformer(spec: InputSpec, norm: str = "none", width: float = 1.0) -> nn.Module:
    """A small character transformer for token inputs ``(L,)`` (Shakespeare's 80 characters): ~24k weights.

    Width 32, 4 heads of 8, FFN 64, 2 blocks: one training sample of 80
    characters costs ~2.1M forward MACs, a third of them attention's
    ``L²`` term, so a client of a few hundred windows trains an epoch in about
    a second on one core. ``width`` keeps the first ``⌈p·4⌉`` heads and
    ``⌈p·64⌉`` FFN units; the residual width (32), the embedding and the
    head stay whole, as a CNN's input and classes do. ``norm`` is unused: the
    blocks' LayerNorms are per sample and per position.
    """
    if spec.dtype != "int64" or len(spec.shape) != 1 or spec.vocab_size < 1:
        raise ValueError(f"char_transformer: inputs must be token ids of shape (L,) with a vocabulary, got {spec}")
    dim, heads, head_dim, ffn, layers = 32, 4, 8, 64, 2
    return CharTransformer(spec.vocab_size, spec.shape[0], spec.num_classes, dim, scaled(heads, width), head_dim,
                           scaled(ffn, width), layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "lenet5": lenet5,
    "resnet18": resnet18,
    "vgg19": vgg19,
    "char_transformer": char_transformer,
}


def build_model(name: str, spec: InputSpec, norm: str | None = None, width: float = 1.0) -> nn.Module:
    """Dense model ``name`` for inputs of ``spec``; ``norm`` is one of :data:`NORMS` (``None``: the model's own).

    ``name`` may also be a reference ``package.module:attr`` (or an object of the
    Python API, :mod:`maestro_fl.references`) to an ``nn.Module``, copied, or to a
    function building one, called with the arguments it takes of ``spec``,
    ``width`` and ``norm``. Width-sliced methods need ``width``: an ``nn.Module``
    object has one width only.
    """
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    if is_reference(name):
        return _user_model(name, spec, norm, width)
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} or a reference 'package.module:attr', got {name!r}")
    builder = MODELS[name]
    return builder(spec, width=width) if norm is None else builder(spec, norm=norm, width=width)


def _user_model(name: str, spec: InputSpec, norm: str | None, width: float) -> nn.Module:
    obj = resolve(name, "model")
    if isinstance(obj, nn.Module):
        if width != 1.0:
            raise ValueError(f"model: {name!r} is an nn.Module of one width; width-sliced methods need a function "
                             "that builds the model at width=p")
        return copy.deepcopy(obj)
    params = inspect.signature(obj).parameters
    kwargs: dict[str, object] = {}
    if "spec" in params:
        kwargs["spec"] = spec
    if "width" in params:
        kwargs["width"] = width
    elif width != 1.0:
        raise ValueError(f"model: {name!r} takes no width argument; width-sliced methods build the model at "
                         "width=p (keeping the first ⌈p·c⌉ channels of every hidden layer)")
    if "norm" in params and norm is not None:
        kwargs["norm"] = norm
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
