"""Width-sliced sub-models: HeteroFL (Diao et al., ICLR 2021) and FjORD (Horváth et al., NeurIPS 2021).

A client at width ``p`` holds the first ``⌈p·c⌉`` channels (units) of every
hidden layer of the full model; the model builders of :mod:`maestro_fl.models`
build that network directly (``width=p``). Every tensor of it is the leading
corner ``[:d0, :d1, ...]`` of the full model's tensor of the same name, so
a sub-model is cut out as those corners (:func:`corner`) and put back by the nested
averaging of :mod:`maestro_fl.aggregation`.

FjORD's ordered dropout trains, at each step, the sub-model of one width
``p ≤ p_max`` drawn uniformly from the federation's width levels, as a
corner of the client's own ``p_max`` parameters (:class:`OrderedDropout`);
its optional self-distillation uses the ``p_max`` output as the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .submodels import ModelAtWidth, state_shapes
from .training import SubModelDraw

Arrays = dict[str, np.ndarray]


def corner(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of the leading block of ``shape``: ``[:d0, :d1, ...]``."""
    return tuple(slice(0, int(d)) for d in shape)


class OrderedDropout(SubModelDraw):
    """FjORD's ordered dropout for a client whose largest sub-model is ``model`` (width ``widths[-1]``).

    Parameters
    ----------
    model : nn.Module
        The client's model at its maximum width ``p_max``.
    build : callable
        ``build(p)`` returns the architecture at width ``p`` of the full model
        (weights unused: they are taken from ``model``'s leading corners).
    widths : sequence of float
        The width levels the client samples from, all ``≤ p_max``; FjORD's
        ``p_s`` restricted to the client's budget.
    generator : torch.Generator
        Drives the per-step width draws (determinism).
    """

    def __init__(self, model: nn.Module, build: ModelAtWidth, widths: Sequence[float], generator: torch.Generator):
        if not widths:
            raise ValueError("widths must name at least one width level")
        self.model = model
        self.widths = tuple(sorted(widths))
        self.generator = generator
        self._shapes = state_shapes(model)
        self._arch: dict[float, nn.Module] = {}
        for p in self.widths[:-1]:
            arch = build(p)
            for name, shape in state_shapes(arch).items():
                if name not in self._shapes or any(s > f for s, f in zip(shape, self._shapes[name])):
                    raise ValueError(f"width {p}: {name} {shape} is not a corner of the client's model")
            self._arch[p] = arch

    def sample(self) -> float:
        """A width level drawn uniformly from ``widths`` (FjORD's per-batch p)."""
        return self.widths[int(torch.randint(len(self.widths), (1,), generator=self.generator))]

    def draw(self) -> object:
        return self.sample() if len(self.widths) > 1 else self.widths[0]

    def run(self, x: torch.Tensor, drawn: object) -> torch.Tensor:
        return self.forward(x, self.widths[-1] if drawn is None else float(drawn))  # type: ignore[arg-type]  # drawn: a width from draw()

    def forward(self, x: torch.Tensor, width: float) -> torch.Tensor:
        """The output of the width-``width`` sub-model; gradients reach the corners of ``model``'s tensors."""
        if width == self.widths[-1]:
            return self.model(x)
        arch = self._arch[width]
        arch.train(self.model.training)
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        sliced = {name: own[name][corner(t.shape)] for name, t in arch.state_dict().items()}
        return functional_call(arch, sliced, (x,))
