"""Turning any ``nn.Module`` into an LoD model and back.

``factorize`` replaces Linear/Conv1d/Conv2d layers by :class:`~maestro_fl.layers.LoDLayer`
(SVD or fresh initialization, ranks chosen explicitly, by a global fraction or
by an energy threshold). ``extract`` cuts a trained LoD model down to given
ranks and returns a standalone smaller model; ``to_dense`` goes back to plain
layers.

Ranks are passed around as ``{layer name: rank}`` dictionaries, the names
being the LoD layers' qualified names in the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from math import ceil

import torch
from torch import nn

from .layers import (
    Init,
    LoDLayer,
    LoDMultiheadAttention,
    attention_projections,
    attention_refusal,
    ceil_rank,
    dense_is_smaller,
    lod_from_dense,
)

Ranks = dict[str, int]


def _walk(module: nn.Module, prefix: str = "", every_name: bool = False,
          _seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Named modules in definition order, not descending into LoD layers.

    A module registered under several names comes once, under its first name;
    with ``every_name``, under each of them (its children under the first only).
    """
    seen = set() if _seen is None else _seen
    for name, child in module._modules.items():
        if child is None:
            continue
        full = f"{prefix}.{name}" if prefix else name
        if id(child) in seen:
            if every_name:
                yield full, child
            continue
        seen.add(id(child))
        yield full, child
        if not isinstance(child, LoDLayer):
            yield from _walk(child, full, every_name, seen)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lod_layers(model: nn.Module, every_name: bool = False) -> dict[str, LoDLayer]:
    """The model's LoD layers by qualified name, in definition order.

    A layer registered under several names comes under its first one; with
    ``every_name`` under each (as the model's ``state_dict`` lists it).
    """
    return {n: m for n, m in _walk(model, every_name=every_name) if isinstance(m, LoDLayer)}


def model_ranks(model: nn.Module) -> Ranks:
    """Current ``max_rank`` of every LoD layer."""
    return {n: m.max_rank for n, m in lod_layers(model).items()}


def ranks_at_fraction(model: nn.Module, fraction: float) -> Ranks:
    """``⌈p·r_i⌉`` for every LoD layer: one global rank fraction."""
    check_fraction("fraction", fraction)
    return {n: ceil_rank(fraction, m.max_rank) for n, m in lod_layers(model).items()}


def ranks_at_dense_share(model: nn.Module, fraction: float) -> Ranks:
    """Every LoD layer keeps the share ``p`` of its dense weights: ``⌈p·mn/(m+n)⌉``, and full rank at ``p = 1``.

    A rank component of an ``m×n`` layer costs ``m+n`` weights, so one rank
    fraction (:func:`ranks_at_fraction`) keeps ``p·min(m,n)·(m+n)/(mn)`` of the
    dense weights: ``2p`` for a square attention projection but ``1.5p`` for a
    1:2 FFN layer and about ``p`` for a tall one. Here every layer keeps the
    same share of what it holds dense, as a width fraction does for every
    layer, so a budget reaches attention as far as it reaches the FFN.
    ``⌈p·mn/(m+n)⌉ ≤ min(m,n)`` for ``p ≤ 1``, and the rank grows with ``p``:
    the ladder stays nested, and its top is the full-rank model as under the
    uniform rule (above the break-even rank ``mn/(m+n)``, where the factors
    hold as many weights as the dense layer). A layer truncated below its
    full rank (a server that shrinks the global model) scales by
    ``max_rank / full_rank``, as the uniform rule does.
    """
    check_fraction("fraction", fraction)
    if fraction >= 1.0:
        return model_ranks(model)
    out = {}
    for name, layer in lod_layers(model).items():
        m, n = layer.fan_out, layer.fan_in
        # relative to the layer's own rank, as the uniform rule is: a layer the server truncated keeps its share
        break_even = m * n / (m + n) * layer.max_rank / layer.full_rank
        out[name] = max(1, min(layer.max_rank, ceil(fraction * break_even - 1e-9)))
    return out


#: how a budget's fraction becomes per-layer ranks, for the rules that need only the model (``importance`` also
#: needs the global factors: :func:`maestro_fl.submodels.importance_ranks`)
RANK_RULES: dict[str, Callable[[nn.Module, float], Ranks]] = {
    "uniform": ranks_at_fraction,
    "dense_share": ranks_at_dense_share,
}


def ranks_at(model: nn.Module, fraction: float, allocation: str = "uniform") -> Ranks:
    """Per-layer ranks at ``fraction`` under ``allocation`` (``importance`` ladders are cut uniformly here)."""
    return RANK_RULES.get(allocation, ranks_at_fraction)(model, fraction)


def check_fraction(field: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < float(value) <= 1.0):
        raise ValueError(f"{field} must be a fraction in (0, 1], got {value!r}")


def validate_ranks(model: nn.Module, ranks: Mapping[str, int]) -> None:
    """Raise ``ValueError`` naming the layer if a rank is unknown or out of range."""
    layers = lod_layers(model, every_name=True)
    given: dict[int, tuple[str, int]] = {}
    for name, r in ranks.items():
        if name not in layers:
            raise ValueError(f"ranks: unknown LoD layer {name!r}; LoD layers are {sorted(layers)}")
        first = given.setdefault(id(layers[name]), (name, r))
        if first[1] != r:
            raise ValueError(f"ranks: {first[0]!r} and {name!r} are one layer, given ranks {first[1]} and {r}")
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


#: the layer types factorize() replaces (exact types: see plan_factorization for subclasses)
FACTORIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`factorize` does with one module or parameter, and why."""

    name: str  # every name the module is registered under, joined by ' = '
    kind: str  # the module's class, or 'parameter'
    rank: int | None  # the LoD rank, when factorized
    reason: str  # why it stays dense ('' when factorized)

    @property
    def factorized(self) -> bool:
        return self.rank is not None


@dataclass(frozen=True)
class FactorizationPlan:
    """Every candidate of a model, factorized or left dense with the reason; printable as a table."""

    decisions: tuple[LayerDecision, ...]

    @property
    def factorized(self) -> tuple[LayerDecision, ...]:
        return tuple(d for d in self.decisions if d.factorized)

    def __str__(self) -> str:
        width = max((len(d.name) for d in self.decisions), default=4)
        kinds = max((len(d.kind) for d in self.decisions), default=4)
        lines = [f"{'layer':<{width}}  {'kind':<{kinds}}  decision"]
        for d in self.decisions:
            what = f"LoD rank {d.rank}" if d.factorized else f"dense: {d.reason}"
            lines.append(f"{d.name:<{width}}  {d.kind:<{kinds}}  {what}")
        return "\n".join(lines)


def plan_factorization(
    model: nn.Module,
    rank: float | Mapping[str, int] | None = None,
    *,
    energy: float | None = None,
    keep_first: int = 0,
    keep_classifier: bool = False,
    skip_unprofitable: bool = False,
) -> FactorizationPlan:
    """Decide, for every candidate of ``model``, whether :func:`factorize` replaces it and at which rank.

    The rule for what stays dense, in order:

    * modules that are not exactly ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``:
      a subclass may change ``forward``, or be read directly by its parent
      (``nn.MultiheadAttention`` reads its ``out_proj.weight``);
    * a layer whose weight is shared with another module (tied weights): factoring
      one would untie them;
    * grouped or non-zero-padded convolutions (no unfolded-kernel factorization);
    * vector-like layers, whose rank-1 factors are no smaller (``m + n ≥ m·n``);
    * the first ``keep_first`` candidates and, with ``keep_classifier``, the last Linear;
    * with ``skip_unprofitable``, layers whose chosen rank saves nothing (``r·(m + n) ≥ m·n``).

    Parameters of other modules (an attention's ``in_proj_weight``, an
    embedding) are listed as not factorizable. A module registered under
    several names is one decision, and stays one module.
    """
    if rank is not None and energy is not None:
        raise ValueError("factorize: give either rank or energy, not both")
    if isinstance(rank, float | int) and not isinstance(rank, bool):
        check_fraction("rank", float(rank))
    if energy is not None:
        check_fraction("energy", energy)
    if keep_first < 0:
        raise ValueError(f"keep_first must be >= 0, got {keep_first}")
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in _walk(model, every_name=True):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    inside_attention = {id(c) for m in modules.values() if type(m) is nn.MultiheadAttention for c in m.modules()
                        if c is not m}  # (its out_proj is one of its four projections, decided with it)
    owners: dict[int, set[int]] = {}  # parameter -> the modules holding it directly
    for key, module in modules.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(key)
    # every factorizable weight, in definition order: (module key, projection or None, its 2-D weight)
    candidates: list[tuple[int, str | None, torch.Tensor]] = []
    for key, module in modules.items():
        if isinstance(module, FACTORIZABLE) and type(module) in FACTORIZABLE and key not in inside_attention:
            weight = module.weight.detach()
            candidates.append((key, None, weight.reshape(weight.shape[0], -1)))
        elif isinstance(module, nn.MultiheadAttention) and type(module) is nn.MultiheadAttention \
                and attention_refusal(module) is None:
            candidates.extend((key, proj, w) for proj, (w, _) in attention_projections(module).items())

    def labels(key: int, proj: str | None) -> list[str]:
        return names[key] if proj is None else [f"{n}.{proj}" for n in names[key]]

    if isinstance(rank, Mapping):
        known = {n for key, proj, _ in candidates for n in labels(key, proj)}
        unknown = sorted(set(rank) - known)
        if unknown:
            raise ValueError(f"rank: unknown layers {unknown}; factorizable layers are {sorted(known)}")
    classifier = next((k for k, proj, _ in reversed(candidates) if proj is None and type(modules[k]) is nn.Linear),
                      None)
    decisions: list[LayerDecision] = []
    for key, module in modules.items():
        label, kind = " = ".join(names[key]), type(module).__name__
        if isinstance(module, LoDLayer | LoDMultiheadAttention) or key in inside_attention:
            continue
        if type(module) is nn.MultiheadAttention and (refusal := attention_refusal(module)) is not None:
            decisions.append(LayerDecision(label, kind, None, refusal))
            continue
        if isinstance(module, FACTORIZABLE + (nn.MultiheadAttention,)) and type(module) not in FACTORIZABLE + (
                nn.MultiheadAttention,):
            decisions.append(LayerDecision(label, kind, None, f"a subclass of {type(module).__mro__[1].__name__}"))
            continue
        own = [(i, c) for i, c in enumerate(candidates) if c[0] == key]
        if not own:
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim >= 2:
                    decisions.append(LayerDecision(f"{label}.{pname}", "parameter", None,
                                                   f"a raw {tuple(p.shape)} parameter of {kind}: not factorizable"))
            continue
        for index, (_, proj, w) in own:
            decisions.append(_decide(module, key, proj, w, index, labels(key, proj), rank, energy, keep_first,
                                     keep_classifier and key == classifier, skip_unprofitable, owners, names))
    return FactorizationPlan(tuple(decisions))


def _decide(module: nn.Module, key: int, proj: str | None, w: torch.Tensor, index: int, label_names: list[str],
            rank: float | Mapping[str, int] | None, energy: float | None, keep_first: int, is_kept_classifier: bool,
            skip_unprofitable: bool, owners: Mapping[int, set[int]], names: Mapping[int, list[str]]) -> LayerDecision:
    """One factorizable weight's decision (see :func:`plan_factorization` for the rule)."""
    label, kind = " = ".join(label_names), type(module).__name__
    m, n = w.shape
    full = min(m, n)
    reason = ""
    if proj is None and len(owners.get(id(module.weight), ())) > 1:
        others = sorted(" = ".join(names[o]) for o in owners[id(module.weight)] if o != key)
        reason = f"its weight is tied to {others}"
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and (module.groups != 1 or module.padding_mode != "zeros"):
        reason = "grouped or non-zero-padded convolution"
    elif m + n >= m * n:
        reason = f"vector-like ({m}x{n}): factors would be no smaller"
    elif index < keep_first:
        reason = f"keep_first={keep_first}"
    elif is_kept_classifier:
        reason = "keep_classifier"
    if reason:
        return LayerDecision(label, kind, None, reason)
    if rank is None and energy is None:
        r = full
    elif energy is not None:
        sq = torch.linalg.svdvals(w.double()).pow(2)
        kept = sq.cumsum(0) / sq.sum()
        r = int((kept < energy - 1e-12).sum().item()) + 1
    elif isinstance(rank, Mapping):
        given = [rank[n] for n in label_names if n in rank]
        r = int(given[0]) if given else full
        if not 1 <= r <= full:
            raise ValueError(f"rank[{label_names[0]!r}] = {r}; allowed: an integer in [1, {full}] (min(out, in·∏k))")
    else:
        assert rank is not None  # rank None with energy None is the first branch
        r = ceil_rank(float(rank), full)
    r = min(r, full)
    if skip_unprofitable and r * (m + n) >= m * n:
        return LayerDecision(label, kind, None, f"rank {r} saves nothing (skip_unprofitable)")
    return LayerDecision(label, kind, r, "")


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
    verbose: bool = False,
) -> nn.Module:
    """Replace the model's Linear/Conv1d/Conv2d layers by LoD layers, in place.

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
    verbose : bool
        Print the plan: every layer, factorized or dense and why.

    Notes
    -----
    What stays dense, and why, is :func:`plan_factorization`'s rule; call it to
    read the plan before factorizing. A module registered under several names
    is replaced by one LoD layer under all of them (it stays shared).
    """
    plan = plan_factorization(model, rank, energy=energy, keep_first=keep_first, keep_classifier=keep_classifier,
                              skip_unprofitable=skip_unprofitable)
    if verbose:
        print(plan)
    by_name = {n: m for n, m in _walk(model, every_name=True)}
    attention: dict[str, dict[str, int]] = {}  # an attention module's first name -> its factorized projections
    for decision in plan.factorized:
        names = decision.name.split(" = ")
        assert decision.rank is not None
        parent, _, proj = names[0].rpartition(".")
        if type(by_name.get(parent)) is nn.MultiheadAttention:  # one of an attention's four projections
            attention.setdefault(parent, {})[proj] = decision.rank
            continue
        lod = lod_from_dense(by_name[names[0]], decision.rank, init=init, generator=generator)
        if lod is not None:
            for name in names:
                _set_module(model, name, lod)
    for first, ranks in attention.items():
        mha = by_name[first]
        lod = lod_from_dense(mha, ranks, init=init, generator=generator)
        assert lod is not None  # an attention the plan factorizes always has its LoD form
        for name, module in by_name.items():
            if module is mha:
                _set_module(model, name, lod)
    return model


def truncate(model: nn.Module, ranks: Mapping[str, int]) -> nn.Module:
    """A copy whose LoD layers hold only their first ``ranks[name]`` components."""
    validate_ranks(model, ranks)
    out = copy.deepcopy(model)
    for name, layer in lod_layers(out, every_name=True).items():
        if name in ranks and ranks[name] < layer.max_rank:  # a layer under two names is cut once
            layer.truncate_(ranks[name])
        layer.active_rank = None
    return out


def _replace_by_dense(model: nn.Module, keep: Callable[[LoDLayer], bool]) -> None:
    """Replace every LoD layer for which ``keep`` is false by its dense module, under each of its names."""
    dense: dict[int, nn.Module] = {}
    for name, layer in lod_layers(model, every_name=True).items():
        if keep(layer):
            continue
        if id(layer) not in dense:
            dense[id(layer)] = layer.to_dense_module()
        _set_module(model, name, dense[id(layer)])


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
    out = truncate(model, ranks if isinstance(ranks, Mapping) else {})
    _replace_by_dense(out, keep=lambda layer: not dense_is_smaller(layer.fan_out, layer.fan_in, layer.max_rank))
    return out


def to_dense(model: nn.Module, ranks: Mapping[str, int] | None = None) -> nn.Module:
    """A copy with every LoD layer replaced by the dense layer ``U_r Vᵀ_r``."""
    out = truncate(model, ranks or {})
    _replace_by_dense(out, keep=lambda layer: False)
    return out
