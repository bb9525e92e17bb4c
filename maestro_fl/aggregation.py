"""Server-side maths of heterogeneous-rank federated LoD, as pure functions.

Clients train nested prefixes of the ordered factors: a client at rank ``r``
holds the first ``r`` rows of ``Vᵀ`` (``in_network.weight``, rank axis 0) and
the first ``r`` columns of ``U`` (``out_network.weight``, rank axis 1).

Ordered-factor aggregation is FjORD's nested rule (Horváth et al., NeurIPS
2021) applied to the rank dimension: every rank component ``k`` is averaged,
weighted by the clients' example counts, over the clients that trained it;
a component no client trained keeps its value. Parameters without a rank
axis (norm layers, biases, dense layers) are averaged as in FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

Arrays = dict[str, NDArray[np.floating]]


def rank_axes(param_names: Sequence[str]) -> dict[str, int]:
    """The rank axis of every factor parameter (LoD naming convention)."""
    axes = {}
    for name in param_names:
        if name.endswith("in_network.weight"):
            axes[name] = 0
        elif name.endswith("out_network.weight"):
            axes[name] = 1
    return axes


def layer_of(param_name: str) -> str:
    """``'features.3.in_network.weight'`` → ``'features.3'``."""
    return param_name.rsplit(".", 2)[0]


def slice_prefix(global_arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> Arrays:
    """The sub-model of a client at per-layer ``ranks``: factor prefixes plus every dense parameter.

    Layers not named in ``ranks`` are sent whole.
    """
    axes = rank_axes(list(global_arrays))
    out: Arrays = {}
    for name, value in global_arrays.items():
        axis = axes.get(name)
        layer = layer_of(name)
        if axis is None or layer not in ranks:
            out[name] = value
        else:
            index = [slice(None)] * value.ndim
            index[axis] = slice(0, ranks[layer])
            out[name] = value[tuple(index)]
    return out


def aggregate_nested(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """Average nested corner blocks element-wise over the clients that hold them.

    Every client array must be the leading corner ``[:d0, :d1, ...]`` of the
    global array of the same name (a factor prefix, or a width slice). Each
    element becomes the weighted mean over the clients whose block contains
    it; an element no client holds keeps the global value.

    Parameters
    ----------
    global_arrays : mapping
        The current global model.
    updates : sequence of (arrays, weight)
        Each client's trained arrays and its weight (number of examples).
    """
    out: Arrays = {}
    for name, current in global_arrays.items():
        total = np.zeros(current.shape, dtype=np.float64)
        weight = np.zeros(current.shape, dtype=np.float64)
        for arrays, w in updates:
            block = arrays.get(name)
            if block is None:
                continue
            if block.ndim != current.ndim or any(b > c for b, c in zip(block.shape, current.shape)):
                raise ValueError(f"{name}: client block {block.shape} is not a corner of the global {current.shape}")
            corner = tuple(slice(0, d) for d in block.shape)
            total[corner] += w * block
            weight[corner] += w
        trained = weight > 0
        merged = np.array(current, dtype=np.float64, copy=True)
        merged[trained] = total[trained] / weight[trained]
        out[name] = merged.astype(current.dtype, copy=False)
    return out


def aggregate_heterofl(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    label_sets: Sequence[Sequence[int]] | None = None,
    classifier: Sequence[str] = (),
) -> Arrays:
    """HeteroFL's server rule (Diao et al., ICLR 2021): unweighted count-averaging of width slices.

    Every element becomes the plain mean over the clients whose slice holds it
    (the reference code's ``tmp_v / count``), whatever their example counts;
    elements no client holds keep their value. With ``label_sets`` (one per
    update), row ``c`` of the ``classifier`` parameters (output weight and
    bias, classes on axis 0) counts only for clients that hold class ``c``:
    the reference's masked output layer. An empty label set means unknown:
    all of that client's rows count.
    """
    uniform = [(arrays, 1.0) for arrays, _ in updates]
    if label_sets is None or not classifier:
        return aggregate_nested(global_arrays, uniform)
    if len(label_sets) != len(updates):
        raise ValueError(f"label_sets: expected one per update ({len(updates)}), got {len(label_sets)}")
    rest = {k: v for k, v in global_arrays.items() if k not in classifier}
    out = aggregate_nested(rest, [({k: v for k, v in a.items() if k in rest}, w) for a, w in uniform])
    for name in classifier:
        current = global_arrays[name]
        total = np.zeros(current.shape, dtype=np.float64)
        count = np.zeros(current.shape, dtype=np.float64)
        for (arrays, _), labels in zip(updates, label_sets):
            if name not in arrays:
                continue
            block = arrays[name]
            rows = np.asarray(sorted(set(labels)) if labels else range(block.shape[0]), dtype=int)
            region = (rows, *(slice(0, d) for d in block.shape[1:]))
            total[region] += block[rows]
            count[region] += 1.0
        merged = np.array(current, dtype=np.float64, copy=True)
        held = count > 0
        merged[held] = total[held] / count[held]
        out[name] = merged.astype(current.dtype, copy=False)
    return {k: out[k] for k in global_arrays}


def aggregate_fjord(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """FjORD's server rule (Horváth et al., NeurIPS 2021, ``fjord_average``): nested, example-weighted.

    The reference loops over width levels from the largest down, averaging
    slice ``p`` over the clients with ``p_max ≥ p`` and letting smaller slices
    overwrite larger ones. An element therefore ends up averaged over exactly
    the clients whose slice contains it, weighted by examples: the per-element
    form computed here, independent of the level grid.
    """
    return aggregate_nested(global_arrays, updates)


def aggregate_ordered_factors(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """FedLoD's server rule: per-component weighted averaging of ordered factor prefixes.

    Rank component ``k`` of a layer (column ``k`` of ``U``, row ``k`` of ``Vᵀ``)
    is averaged over the clients with rank > ``k``, weighted by examples;
    untrained components are unchanged; dense parameters are FedAvg'd. With
    every client at full rank this is exactly FedAvg.
    """
    axes = rank_axes(list(global_arrays))
    for arrays, _ in updates:
        for name, block in arrays.items():
            if name not in global_arrays:
                raise ValueError(f"update has unknown parameter {name!r}")
            if not fits(block.shape, global_arrays[name].shape, axes.get(name)):
                raise ValueError(f"{name}: shape {block.shape} does not fit the global {global_arrays[name].shape}")
    return aggregate_nested(global_arrays, updates)


def fits(shape: tuple[int, ...], full: tuple[int, ...], rank_axis: int | None) -> bool:
    """A client's array fits the global one: same shape, except a shorter prefix on the rank axis."""
    if len(shape) != len(full):
        return False
    return all(s == f or (i == rank_axis and 0 < s <= f) for i, (s, f) in enumerate(zip(shape, full)))


def fedavg(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Arrays:
    """Plain example-weighted FedAvg of identically-shaped updates (the reference rule)."""
    total = sum(w for _, w in updates)
    names = updates[0][0].keys()
    return {n: sum(a[n].astype(np.float64) * (w / total) for a, w in updates).astype(updates[0][0][n].dtype) for n in names}


def prefix_ranks(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Per-layer ranks implied by a set of factor prefixes (for checks of replies)."""
    ranks: dict[str, int] = {}
    for name, axis in rank_axes(list(arrays)).items():
        ranks.setdefault(layer_of(name), int(arrays[name].shape[axis]))
    return ranks


def validate_update(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a client's reply cannot be aggregated, or ``None`` if it can.

    The reply must hold exactly the parameters the client was sent, each with
    the shape it was sent (so a factor cannot come back at another rank), and
    only finite values.
    """
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"parameters differ from those sent: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, shape in expected.items():
        got = tuple(arrays[name].shape)
        if got != tuple(shape):
            axis = rank_axes([name]).get(name)
            only_rank_differs = (
                axis is not None
                and len(got) == len(shape)
                and all(g == e for i, (g, e) in enumerate(zip(got, shape)) if i != axis)
            )
            what = "rank" if only_rank_differs else "shape"
            return f"{name}: wrong {what}, got {got}, sent {tuple(shape)}"
        if not np.isfinite(arrays[name]).all():
            return f"{name}: non-finite values (NaN/Inf)"
    return None


def factor_importance(u: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """Maestro's tail importance ``‖Vᵀ_{b:}‖_F·‖U_{:, b:}‖_F`` from flattened factors."""
    v_tail = np.sqrt(np.cumsum((vt.reshape(vt.shape[0], -1) ** 2).sum(1)[::-1])[::-1])
    u_tail = np.sqrt(np.cumsum((u.reshape(u.shape[0], u.shape[1], -1) ** 2).sum((0, 2))[::-1])[::-1])
    return v_tail * u_tail


def shrink_factors(arrays: Mapping[str, np.ndarray], eps: float) -> tuple[Arrays, dict[str, int]]:
    """Server-side progressive shrinking: drop trailing components of importance < ``eps``."""
    ranks: dict[str, int] = {}
    for name in arrays:
        if name.endswith("in_network.weight"):
            layer = layer_of(name)
            imp = factor_importance(arrays[f"{layer}.out_network.weight"], arrays[name])
            ranks[layer] = max(1, int((imp >= eps).sum()))
    return slice_prefix(arrays, ranks), ranks


def aggregate_svd(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """Rebuild every client's dense ``W = U Vᵀ``, average, and re-factor by truncated SVD.

    The rule of FedHM (Yao et al. 2021) and FlexLoRA: clients may hold factors of
    any rank in any basis (DLRT clients rotate theirs every step), so only the
    products are comparable. The average is cut back to the global rank, with
    components ordered by singular value (``U = P√Σ``, ``Vᵀ = √Σ Qᵀ``), so a
    prefix of it is the best low-rank approximation at every rank. Dense
    parameters are averaged as in FedAvg.
    """
    axes = rank_axes(list(global_arrays))
    dense = {k: v for k, v in global_arrays.items() if k not in axes}
    out = aggregate_nested(dense, [({k: a[k] for k in dense if k in a}, w) for a, w in updates])
    for vt_name in (n for n in axes if n.endswith("in_network.weight")):
        u_name = vt_name.replace("in_network", "out_network")
        g_vt, g_u = global_arrays[vt_name], global_arrays[u_name]
        rank, fan_out = g_vt.shape[0], g_u.shape[0]
        total, weight = 0.0, 0.0
        for arrays, w in updates:
            if vt_name not in arrays:
                continue
            vt, u = arrays[vt_name], arrays[u_name]
            r = vt.shape[0]
            total = total + w * (u.reshape(fan_out, r).astype(np.float64) @ vt.reshape(r, -1).astype(np.float64))
            weight += w
        if weight == 0:
            out[vt_name], out[u_name] = g_vt, g_u
            continue
        p, s, qt = np.linalg.svd(total / weight, full_matrices=False)
        k = min(rank, len(s))
        root = np.sqrt(s[:k])
        u_new = np.zeros((fan_out, rank))
        vt_new = np.zeros((rank, qt.shape[1]))
        u_new[:, :k], vt_new[:k] = p[:, :k] * root, root[:, None] * qt[:k]
        out[u_name] = u_new.reshape(g_u.shape).astype(g_u.dtype)
        out[vt_name] = vt_new.reshape(g_vt.shape).astype(g_vt.dtype)
    return {k: out[k] for k in global_arrays}


def aggregate_zero_padded(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """Zero-pad every client's factors to the global rank, then take the weighted mean over all clients.

    The heterogeneous-LoRA rule (HetLoRA, FederatedLLM's ``ZeroPad2d``): a component a client did not
    train counts as zero for it, so component ``k`` is shrunk by the share of examples held by clients
    of rank ≤ ``k``. Dense parameters are averaged as in FedAvg. Compare
    :func:`aggregate_ordered_factors`, which averages each component over its trainers only.
    """
    axes = rank_axes(list(global_arrays))
    total = sum(w for _, w in updates)
    out: Arrays = {}
    for name, current in global_arrays.items():
        holders = [(a[name], w) for a, w in updates if name in a]
        if not holders:
            out[name] = np.array(current, copy=True)
            continue
        if name not in axes:
            weight = sum(w for _, w in holders)
            out[name] = (sum(w * b.astype(np.float64) for b, w in holders) / weight).astype(current.dtype)
            continue
        acc = np.zeros(current.shape, dtype=np.float64)
        for block, w in holders:
            acc[tuple(slice(0, d) for d in block.shape)] += w * block
        out[name] = (acc / total).astype(current.dtype)
    return out


def aggregate_fedhm(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """FedHM's server rule (Yao et al., arXiv 2111.14655, ``svd_agg.py``).

    The server's model is dense, kept as its exact full-rank SVD factors (so a
    client's truncated-SVD factorization at rank ``r`` is a prefix of them).
    Each client's factors are rebuilt into ``W = U Vᵀ`` and the dense matrices
    averaged with weight ``1/n``; the average is re-factored by SVD at full rank
    (:func:`aggregate_svd`, exact). When no client trained every layer at full
    rank, the server's own model joins the average as one more client, as the
    reference does to keep the directions no client could train.
    """
    axes = rank_axes(list(global_arrays))

    def full_rank(arrays: Mapping[str, np.ndarray]) -> bool:
        return all(arrays[n].shape[a] == global_arrays[n].shape[a] for n, a in axes.items() if n in arrays)

    uniform = [(arrays, 1.0) for arrays, _ in updates]
    if not any(full_rank(arrays) for arrays, _ in updates):
        uniform.append((dict(global_arrays), 1.0))
    return aggregate_svd(global_arrays, uniform)
