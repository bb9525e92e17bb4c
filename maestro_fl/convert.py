"""Turning any ``nn.Module`` into an LoD model and back.

``factorize`` replaces Linear/Conv2d layers by :class:`~maestro_fl.layers.LoDLayer`
(SVD or fresh initialization, ranks chosen explicitly, by a global fraction or
by an energy threshold). ``extract`` cuts a trained LoD model down to given
ranks and returns a standalone smaller model; ``to_dense`` goes back to plain
layers.

Ranks are passed around as ``{layer name: rank}`` dictionaries, the names
being the LoD layers' qualified names in the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .layers import Init, LoDLayer, ceil_rank, dense_is_smaller, lod_from_dense, singular_values

Ranks = dict[str, int]


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules in definition order, not descending into LoD layers."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, LoDLayer):
            yield from _walk(child, full)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lod_layers(model: nn.Module) -> dict[str, LoDLayer]:
    """The model's LoD layers by qualified name, in definition order."""
    return {n: m for n, m in _walk(model) if isinstance(m, LoDLayer)}


def model_ranks(model: nn.Module) -> Ranks:
    """Current ``max_rank`` of every LoD layer."""
    return {n: m.max_rank for n, m in lod_layers(model).items()}


def ranks_at_fraction(model: nn.Module, fraction: float) -> Ranks:
    """``⌈p·r_i⌉`` for every LoD layer: one global rank fraction."""
    check_fraction("fraction", fraction)
    return {n: ceil_rank(fraction, m.max_rank) for n, m in lod_layers(model).items()}


def check_fraction(field: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
        raise ValueError(f"{field} must be a fraction in (0, 1], got {value!r}")


def validate_ranks(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Raise ``ValueError`` naming the layer if a rank is unknown or out of range."""
    layers = lod_layers(model)
    for name, r in ranks.items():
        if name not in layers:
            raise ValueError(f"ranks: unknown LoD layer {name!r}; LoD layers are {sorted(layers)}")
        if not isinstance(r, int) or not 1 <= r <= layers[name].max_rank:
            raise ValueError(f"ranks[{name!r}] = {r!r}; allowed: an integer in [1, {layers[name].max_rank}]")


@contextmanager
def active_ranks(model: nn.Module, ranks: Mapping[str, int] | None) -> Iterator[nn.Module]:
    """Run the model with the given per-layer ranks; unnamed layers use their ``max_rank``."""
    layers = lod_layers(model)
    saved = {n: m.active_rank for n, m in layers.items()}
    try:
        for n, m in layers.items():
            m.active_rank = None if ranks is None else ranks.get(n)
        yield model
    finally:
        for n, m in layers.items():
            m.active_rank = saved[n]


def factorize(
    model: nn.Module,
    rank: float | Mapping[str, int] | None = None,
    *,
    energy: float | None = None,
    init: Init = "svd",
    keep_first: int = 0,
    keep_classifier: bool = False,
    skip_unprofitable: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace the model's Linear/Conv2d layers by LoD layers, in place.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model; it is modified and returned.
    rank : float or dict, optional
        ``None``: full rank ``min(m, n)`` per layer (Maestro's default, the
        ranks are then learned by group lasso and shrinking). A float ``p`` in
        (0, 1]: ``⌈p·min(m, n)⌉``. A dict: explicit ranks by layer name
        (layers it does not name get full rank).
    energy : float, optional
        Instead of ``rank``: the smallest rank whose singular values keep this
        fraction of the weight's squared Frobenius norm.
    init : {"svd", "random"}
        ``"svd"`` reproduces the model's outputs at full rank; ``"random"``
        draws fresh factors.
    keep_first : int
        Leave the first ``k`` factorizable layers dense (the authors' ImageNet
        runs keep the first 43).
    keep_classifier : bool
        Leave the last Linear layer dense.
    skip_unprofitable : bool
        Leave a layer dense when its chosen rank saves no parameters.

    Notes
    -----
    The rule for layers that stay dense: grouped or non-zero-padded
    convolutions (no unfolded-kernel factorization), vector-like layers whose
    rank-1 factors are already no smaller than the weight (``m + n ≥ m·n``),
    the layers excluded by ``keep_first``/``keep_classifier``, and, with
    ``skip_unprofitable``, layers whose rank gives ``r·(m + n) ≥ m·n``.
    """
    if rank is not None and energy is not None:
        raise ValueError("factorize: give either rank or energy, not both")
    if isinstance(rank, float | int) and not isinstance(rank, bool):
        check_fraction("rank", float(rank))
    if energy is not None:
        check_fraction("energy", energy)
    if keep_first < 0:
        raise ValueError(f"keep_first must be >= 0, got {keep_first}")
    candidates = [(n, m) for n, m in _walk(model) if type(m) in (nn.Linear, nn.Conv2d)]
    if isinstance(rank, Mapping):
        names = {n for n, _ in candidates}
        unknown = sorted(set(rank) - names)
        if unknown:
            raise ValueError(f"rank: unknown layers {unknown}; factorizable layers are {sorted(names)}")
    classifier = next((n for n, m in reversed(candidates) if isinstance(m, nn.Linear)), None)
    for i, (name, layer) in enumerate(candidates):
        if i < keep_first or (keep_classifier and name == classifier):
            continue
        w = layer.weight
        m, n = w.shape[0], w[0].numel()
        if m + n >= m * n:
            continue
        full = min(m, n)
        if rank is None and energy is None:
            r = full
        elif energy is not None:
            sq = singular_values(layer).double().pow(2)
            kept = sq.cumsum(0) / sq.sum()
            r = int((kept < energy - 1e-12).sum().item()) + 1
        elif isinstance(rank, Mapping):
            r = int(rank.get(name, full))
            if not 1 <= r <= full:
                raise ValueError(f"rank[{name!r}] = {r}; allowed: an integer in [1, {full}] (min(out, in·k·k))")
        else:
            r = ceil_rank(float(rank), full)
        r = min(r, full)
        if skip_unprofitable and r * (m + n) >= m * n:
            continue
        lod = lod_from_dense(layer, r, init=init, generator=generator)
        if lod is not None:
            _set_module(model, name, lod)
    return model


def truncate(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy whose LoD layers hold only their first ``ranks[name]`` components."""
    validate_ranks(model, ranks)
    out = copy.deepcopy(model)
    for name, layer in lod_layers(out).items():
        if name in ranks:
            layer.truncate_(ranks[name])
        layer.active_rank = None
    return out


def extract(model: nn.Module, ranks: Mapping[str, int] | float | None = None) -> nn.Module:
    """A standalone model at the given ranks, for deployment.

    Its tensors really have the chosen ranks and its outputs equal the LoD
    model's at those ranks. Layers whose dense form is smaller than their
    factors (``r·(m + n) > m·n``) become dense again.

    Parameters
    ----------
    ranks : dict, float or None
        Per-layer ranks, a global rank fraction, or ``None`` for the current
        ranks.
    """
    if isinstance(ranks, float | int) and not isinstance(ranks, bool):
        ranks = ranks_at_fraction(model, float(ranks))
    out = truncate(model, ranks or {})
    for name, layer in lod_layers(out).items():
        if dense_is_smaller(layer.fan_out, layer.fan_in, layer.max_rank):
            _set_module(out, name, layer.to_dense_module())
    return out


def to_dense(model: nn.Module, ranks: Mapping[str, int] | None = None) -> nn.Module:
    """A copy with every LoD layer replaced by the dense layer ``U_r Vᵀ_r``."""
    out = truncate(model, ranks or {})
    for name, layer in lod_layers(out).items():
        _set_module(out, name, layer.to_dense_module())
    return out
