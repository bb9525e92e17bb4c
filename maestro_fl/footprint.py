"""Parameters, MACs and bytes of a model at a rank assignment.

MACs count the multiply-accumulates of Linear, Conv2d and LoD layers for one
sample (norm layers, activations and pooling are not counted; they are a few
percent at most for the models here). Parameters count every parameter of
the model. By default a layer is counted as :func:`maestro_fl.convert.extract`
would deploy it: an LoD layer at rank ``r`` costs ``r·(m + n)`` weights,
unless its dense form ``m·n`` is smaller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .convert import _walk, active_ranks
from .layers import LoDLayer, dense_is_smaller


@dataclass(frozen=True)
class LayerFootprint:
    name: str
    kind: str  # "lod", "linear", "conv2d" or "other" (all remaining parameters)
    rank: int | None
    params: int
    macs: int
    dense_params: int
    dense_macs: int


@dataclass(frozen=True)
class Footprint:
    """Per-layer rows and totals; ``dense_*`` are the dense model's numbers."""

    layers: tuple[LayerFootprint, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def dense_macs(self) -> int:
        return sum(layer.dense_macs for layer in self.layers)

    def bytes(self, precision: str = "fp32") -> int:
        """Size of the weights at ``precision`` ('fp32' or 'fp16')."""
        width = {"fp32": 4, "fp16": 2}
        if precision not in width:
            raise ValueError(f"precision must be one of {sorted(width)}, got {precision!r}")
        return self.params * width[precision]

    def summary(self) -> dict[str, float]:
        return {
            "params": self.params,
            "macs": self.macs,
            "bytes_fp32": self.bytes("fp32"),
            "bytes_fp16": self.bytes("fp16"),
            "dense_params": self.dense_params,
            "dense_macs": self.dense_macs,
            "params_ratio": self.params / self.dense_params,
            "macs_ratio": self.macs / self.dense_macs if self.dense_macs else 1.0,
        }

    def rows(self) -> list[dict[str, object]]:
        return [asdict(layer) for layer in self.layers]


def _out_positions(out: torch.Tensor, features: int) -> int:
    """Output positions per sample: pixels for a conv, leading dims for a Linear."""
    return out[0].numel() // features


@torch.no_grad()
def probe_forward(
    model: nn.Module,
    input_shape: tuple[int, ...],
    ranks: Mapping[str, int] | None,
    hooks: list[tuple[nn.Module, Callable[..., None]]],
) -> None:
    """Run one all-zero sample through the model at ``ranks`` with temporary forward hooks (eval mode)."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
        with active_ranks(model, ranks):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def footprint(
    model: nn.Module,
    input_shape: tuple[int, ...],
    ranks: Mapping[str, int] | None = None,
    *,
    as_deployed: bool = True,
) -> Footprint:
    """Footprint of ``model`` at ``ranks`` for one input of ``input_shape`` (C, H, W).

    Parameters
    ----------
    ranks : dict, optional
        Per-LoD-layer ranks; layers not named count at their ``max_rank``.
    as_deployed : bool
        Count an LoD layer whose dense form is smaller as dense (the extraction
        rule). ``False`` counts the factors as they are trained.
    """
    ranks = dict(ranks or {})
    modules = [(n, m) for n, m in _walk(model) if isinstance(m, (LoDLayer, nn.Linear, nn.Conv2d))]
    positions: dict[str, int] = {}

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: object, out: torch.Tensor) -> None:
            feats = mod.fan_out if isinstance(mod, LoDLayer) else out.shape[1]
            positions[name] = _out_positions(out, feats)

        return hook

    probe_forward(model, input_shape, ranks, [(module, hook_for(name)) for name, module in modules])

    rows: list[LayerFootprint] = []
    counted: set[int] = set()
    for name, module in modules:
        if name not in positions:  # defined but never called in forward
            continue
        pos = positions[name]
        for p in module.parameters():
            counted.add(id(p))
        if isinstance(module, LoDLayer):
            m, n = module.fan_out, module.fan_in
            r = ranks.get(name, module.max_rank)
            bias = 0 if module.bias is None else module.bias.numel()
            dense_w = m * n
            if as_deployed and dense_is_smaller(m, n, r):
                weights = dense_w
            else:
                weights = r * (m + n)
            rows.append(LayerFootprint(name, "lod", r, weights + bias, pos * weights, dense_w + bias, pos * dense_w))
        else:
            weights = module.weight.numel()
            n_params = sum(p.numel() for p in module.parameters(recurse=False))
            kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
            rows.append(LayerFootprint(name, kind, None, n_params, pos * weights, n_params, pos * weights))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    if other:
        rows.append(LayerFootprint("(other)", "other", None, other, 0, other, 0))
    return Footprint(tuple(rows))
