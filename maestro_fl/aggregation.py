"""Server-side maths of heterogeneous sub-model federated learning, as pure functions.

Every client holds a part of each global array, described by an
:data:`~maestro_fl.submodels.Index` (see :mod:`maestro_fl.submodels`): a rank
prefix of LoD factors (the first ``r`` rows of ``Vᵀ``, ``in_network.weight``,
and columns of ``U``, ``out_network.weight``), a width corner, a rolling window.
:func:`aggregate_indexed` is the one merge they share: every element becomes
the weighted mean over the clients whose part holds it, and an element no
client holds keeps its value. Products and sums are formed in float64.

Ordered-factor aggregation (FedLoD) is FjORD's nested rule (Horváth et al.,
NeurIPS 2021) on the rank dimension: rank component ``k`` is averaged,
weighted by the clients' example counts, over the clients that trained it;
RBLA (arXiv 2408.08699) averages rank slices the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from .submodels import DimIndex, Index, corner_index, index_shape, layer_of, numpy_index, rank_axes, take

Arrays = dict[str, NDArray[np.floating]]
#: a client's trained arrays (leading corners of the global ones) and its weight
Update = tuple[Mapping[str, np.ndarray], float]
#: a client's trained arrays, where they sit in the global ones, and its weight
IndexedUpdate = tuple[Mapping[str, np.ndarray], Index, float]


def aggregate_indexed(global_arrays: Mapping[str, np.ndarray], updates: Sequence[IndexedUpdate]) -> Arrays:
    """Average every element over the clients whose part holds it; elements no client holds keep their value.

    Parameters
    ----------
    global_arrays : mapping
        The current global model.
    updates : sequence of (arrays, index, weight)
        Each client's trained arrays, the index of each in the global array
        of the same name (``arrays[name] == global[name][index[name]]`` in shape),
        and its weight (examples, or 1 for count-averaging).
    """
    out: Arrays = {}
    for name, current in global_arrays.items():
        # the clients of one budget hold the same part: sum each part's blocks first, then place it once
        groups: dict[tuple[object, ...], tuple[tuple[DimIndex, ...], list[tuple[np.ndarray, float]]]] = {}
        for arrays, index, w in updates:
            block = arrays.get(name)
            if block is not None:
                groups.setdefault(part_key(index[name]), (index[name], []))[1].append((block, w))
        total = np.zeros(current.shape, dtype=np.float64)
        weight = np.zeros(current.shape, dtype=np.float64)
        for idx, members in groups.values():
            shape = index_shape(idx, current.shape)
            part = np.zeros(shape, dtype=np.float64)
            for block, w in members:
                if block.shape != shape:
                    raise ValueError(f"{name}: client block {block.shape} does not match its index {shape}")
                add_scaled(part, block, w)
            where = numpy_index(idx, current.shape)
            total[where] += part
            weight[where] += sum(w for _, w in members)
        held = weight > 0
        merged = np.array(current, dtype=np.float64, copy=True)
        merged[held] = total[held] / weight[held]
        out[name] = merged.astype(current.dtype, copy=False)
    return out


def part_key(index: Sequence[DimIndex]) -> tuple[object, ...]:
    """A hashable key of one array's index: equal parts, equal keys (slices are unhashable in Python 3.11)."""
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i.tobytes() for i in index)


def add_scaled(out: np.ndarray, block: np.ndarray, weight: float) -> None:
    """``out += weight * block`` in ``out``'s float64, in place and without a temporary (torch's fused ``add_``).

    NumPy's ``out += block * weight`` makes a float64 temporary of the block
    first; with 1,000 replies of a 137k-parameter model a round that was 2.7x
    slower (``benchmarks/server_round.py``).
    """
    with warnings.catch_warnings():  # reply arrays are read-only views of the received bytes; torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        block = np.asarray(block)
        if not block.dtype.isnative:  # torch reads native byte order only (a reply is checked, a caller may not be)
            block = block.astype(block.dtype.newbyteorder("="))
        src = torch.from_numpy(block)
    if out.flags.writeable and out.flags.c_contiguous and src.is_contiguous():
        torch.from_numpy(out).add_(src, alpha=float(weight))
    else:
        out += block * np.float64(weight)


def slice_prefix(global_arrays: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> Arrays:
    """The factor prefixes of a client at per-layer ``ranks`` plus every dense parameter (layers not named: whole)."""
    axes = rank_axes(list(global_arrays))
    index: Index = {}
    for name, value in global_arrays.items():
        idx = [slice(None)] * value.ndim
        if name in axes and layer_of(name) in ranks:
            idx[axes[name]] = slice(0, ranks[layer_of(name)])
        index[name] = tuple(idx)
    return take(global_arrays, index)


def aggregate_nested(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Arrays:
    """Average nested corner blocks element-wise over the clients that hold them.

    Every client array is the leading corner ``[:d0, :d1, ...]`` of the global
    array of the same name (a factor prefix, or a width slice); see
    :func:`aggregate_indexed`.
    """
    indexed = []
    for arrays, w in updates:
        for name, block in arrays.items():
            full = global_arrays[name].shape if name in global_arrays else None
            if full is None or block.ndim != len(full) or any(b > c for b, c in zip(block.shape, full)):
                raise ValueError(f"{name}: client block {block.shape} is not a corner of the global {full}")
        indexed.append((arrays, corner_index({k: v.shape for k, v in arrays.items()}), w))
    return aggregate_indexed(global_arrays, indexed)


def aggregate_heterofl(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[IndexedUpdate],
    label_sets: Sequence[Sequence[int]] | None = None,
    classifier: Sequence[str] = (),
) -> Arrays:
    """HeteroFL's server rule (Diao et al., ICLR 2021): unweighted count-averaging of the parts clients hold.

    Every element becomes the plain mean over the clients whose part holds it
    (the reference code's ``tmp_v / count``), whatever their example counts;
    elements no client holds keep their value. With ``label_sets`` (one per
    update), row ``c`` of the ``classifier`` parameters (output weight and
    bias, classes on axis 0) counts only for clients that hold class ``c``:
    the reference's masked output layer. An empty label set means unknown:
    all of that client's rows count. FedRolex (``split_model``/``combine`` of
    its official code) uses the same rule on rolling windows.
    """
    if label_sets is not None and len(label_sets) != len(updates):
        raise ValueError(f"label_sets: expected one per update ({len(updates)}), got {len(label_sets)}")
    counted: list[IndexedUpdate] = []
    for i, (arrays, index, _) in enumerate(updates):
        labels = sorted(set(label_sets[i])) if label_sets is not None else []
        if not labels or not classifier:
            counted.append((arrays, index, 1.0))
            continue
        rows = np.asarray(labels, dtype=np.int64)
        width = min((arrays[n].shape[0] for n in classifier if n in arrays), default=0)
        if rows.min() < 0 or rows.max() >= width:  # not class indices of this classifier: count all its rows
            counted.append((arrays, index, 1.0))
            continue
        arrays, index = dict(arrays), dict(index)
        for name in classifier:
            if name in arrays:  # keep only the rows of the client's classes, where they sit in the global array
                first = index[name][0]
                held = np.arange(*first.indices(global_arrays[name].shape[0])) if isinstance(first, slice) else first
                arrays[name] = arrays[name][rows]
                index[name] = (held[rows], *index[name][1:])
        counted.append((arrays, index, 1.0))
    return aggregate_indexed(global_arrays, counted)


def aggregate_robust(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Index]],
    rule: str = "median",
    trim_fraction: float = 0.2,
) -> Arrays:
    """A robust merge per element over the clients whose part holds it: median or trimmed mean.

    For clients holding equal shapes this is Flower's ``FedMedian``
    (coordinate-wise median) and ``FedTrimmedAvg`` (drop ``⌊β·n⌋`` of the
    ``n`` values at each end, average the rest); here ``n`` is the number of
    clients holding the element, so it serves every sub-model family.
    Elements no client holds keep their value. Unweighted, as Flower's.
    """
    if rule not in ("median", "trimmed_mean"):
        raise ValueError(f"rule must be 'median' or 'trimmed_mean', got {rule!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    out: Arrays = {}
    for name, current in global_arrays.items():
        holders = [(a[name], idx[name]) for a, idx in updates if name in a]
        if not holders:
            out[name] = np.array(current, copy=True)
            continue
        stack = np.full((len(holders), *current.shape), np.nan)  # NaN: this client does not hold the element
        for k, (block, index) in enumerate(holders):
            stack[k][numpy_index(index, current.shape)] = block
        count = (~np.isnan(stack)).sum(axis=0)
        ordered = np.sort(stack, axis=0)  # NaNs last
        if rule == "median":
            lo = np.maximum(count - 1, 0) // 2
            hi = count // 2
            value = 0.5 * (np.take_along_axis(ordered, lo[None], 0)[0] + np.take_along_axis(ordered, hi[None], 0)[0])
        else:
            cut = np.floor(trim_fraction * count).astype(int)
            sums = np.concatenate([np.zeros((1, *current.shape)), np.cumsum(np.nan_to_num(ordered), axis=0)])
            kept = count - 2 * cut
            total = np.take_along_axis(sums, (count - cut)[None], 0)[0] - np.take_along_axis(sums, cut[None], 0)[0]
            value = total / np.maximum(kept, 1)
        merged = np.array(current, dtype=np.float64, copy=True)
        held = count > 0
        merged[held] = value[held]
        out[name] = merged.astype(current.dtype, copy=False)
    return out


def aggregate_fedrolex(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Index]],
) -> Arrays:
    """FedRolex's server rule (Alam et al., NeurIPS 2022, ``combine`` of the official code).

    Each client holds a rolling window of every array (:data:`~maestro_fl.submodels.Index`,
    possibly wrapping around); every element becomes the unweighted mean over
    the clients whose window covered it, and an element no window covered
    keeps its value.
    """
    return aggregate_indexed(global_arrays, [(arrays, index, 1.0) for arrays, index in updates])


def aggregate_fiarse(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], Index]],
) -> Arrays:
    """FIARSE's server rule (Wu et al., NeurIPS 2024, ``fiarse/server.py`` of the official code).

    Every element moves by the mean of the clients' updates ``trained - current``
    over the clients whose update of that element is non-zero (the official
    ``tot_grad / tot_mask`` with ``tot_mask += grad != 0``); an element that no
    client changed keeps its value. Unweighted, as the official code. Where
    every holder changed an element this is the count average over holders;
    it differs where a held element came back unchanged.
    """
    out: Arrays = {}
    for name, current in global_arrays.items():
        base = np.asarray(current, dtype=np.float64)
        total = np.zeros(current.shape, dtype=np.float64)
        count = np.zeros(current.shape, dtype=np.float64)
        for arrays, index in updates:
            block = arrays.get(name)
            if block is None:
                continue
            where = numpy_index(index[name], current.shape)
            if block.shape != base[where].shape:
                raise ValueError(f"{name}: client block {block.shape} does not match its index {base[where].shape}")
            delta = np.asarray(block, dtype=np.float64) - base[where]
            total[where] += delta
            count[where] += delta != 0
        moved = count > 0
        merged = np.array(base, copy=True)
        merged[moved] += total[moved] / count[moved]
        out[name] = merged.astype(current.dtype, copy=False)
    return out


def aggregate_flanc(global_arrays: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    """FLANC's server rule (Mei et al., NeurIPS 2022, ``sync`` of the official ``trainer_FL.py``).

    Each client returns the bases' slices it holds (leading corners of the
    shared global bases) and its width's anchor (whole arrays named for that
    width). Every element becomes the unweighted mean over the clients that
    hold it: a basis element over every client whose slice covers it, an
    anchor over the clients of its width; an anchor no client of its width
    trained keeps its value (the official code samples every width every round).
    """
    return aggregate_nested(global_arrays, [(arrays, 1.0) for arrays in updates])


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
    narrowed: bool = False,
) -> Arrays:
    """FedLoD's server rule: per-component weighted averaging of ordered factor prefixes.

    Rank component ``k`` of a layer (column ``k`` of ``U``, row ``k`` of ``Vᵀ``)
    is averaged over the clients with rank > ``k``, weighted by examples;
    untrained components are unchanged; dense parameters are FedAvg'd. With
    every client at full rank this is exactly FedAvg. With ``narrowed``,
    clients below the smallest rank prefix hold leading corners (narrower
    hidden layers too, :class:`~maestro_fl.submodels.RankWidthPrefix`): each
    element is averaged over the clients whose corner holds it, the same rule.
    """
    check_prefixes(global_arrays, updates, narrowed)
    return aggregate_nested(global_arrays, updates)


def check_prefixes(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    narrowed: bool = False,
) -> None:
    """Every client array is a known parameter, and a rank prefix of the global one (``ValueError`` otherwise).

    ``narrowed``: clients may also hold narrower hidden layers, so any leading corner fits.
    """
    axes = rank_axes(list(global_arrays))
    for arrays, _ in updates:
        for name, block in arrays.items():
            if name not in global_arrays:
                raise ValueError(f"update has unknown parameter {name!r}")
            full = global_arrays[name].shape
            corner = len(block.shape) == len(full) and all(0 < b <= f for b, f in zip(block.shape, full))
            if not (corner if narrowed else fits(block.shape, full, axes.get(name))):
                raise ValueError(f"{name}: shape {block.shape} does not fit the global {global_arrays[name].shape}")


def fits(shape: tuple[int, ...], full: tuple[int, ...], rank_axis: int | None) -> bool:
    """A client's array fits the global one: same shape, except a shorter prefix on the rank axis."""
    if len(shape) != len(full):
        return False
    return all(s == f or (i == rank_axis and 0 < s <= f) for i, (s, f) in enumerate(zip(shape, full)))


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
        shape = (fan_out, *g_vt.shape[1:])  # W's shape: (out, in) or (out, in, *kernel)
        total, weight = np.zeros(shape), np.zeros(shape)
        for arrays, w in updates:
            if vt_name not in arrays:
                continue
            vt, u = arrays[vt_name], arrays[u_name]
            r, fo = vt.shape[0], u.shape[0]
            # a narrower client (the width floor) holds W's leading corner: each element is averaged over its holders
            product = (u.reshape(fo, r).astype(np.float64) @ vt.reshape(r, -1).astype(np.float64)).reshape(
                fo, *vt.shape[1:])
            corner = tuple(slice(0, d) for d in product.shape)
            total[corner] += w * product
            weight[corner] += w
        if not weight.any():
            out[vt_name], out[u_name] = g_vt, g_u
            continue
        held = weight > 0
        mean = total / np.where(held, weight, 1.0)
        if not held.all():  # elements no client held keep the global product
            kept = (g_u.reshape(fan_out, rank).astype(np.float64) @ g_vt.reshape(rank, -1).astype(np.float64))
            mean = np.where(held, mean, kept.reshape(shape))
        p, s, qt = np.linalg.svd(mean.reshape(fan_out, -1), full_matrices=False)
        k = min(rank, len(s))
        root = np.sqrt(s[:k])
        u_new = np.zeros((fan_out, rank))
        vt_new = np.zeros((rank, qt.shape[1]))
        u_new[:, :k], vt_new[:k] = p[:, :k] * root, root[:, None] * qt[:k]
        out[u_name] = u_new.reshape(g_u.shape).astype(g_u.dtype)
        out[vt_name] = vt_new.reshape(g_vt.shape).astype(g_vt.dtype)
    return {k: out[k] for k in global_arrays}


def _factor_pairs(global_arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """``(Vᵀ name, U name)`` of every LoD layer."""
    axes = rank_axes(list(global_arrays))
    return [(n, n.replace("in_network", "out_network")) for n in axes if n.endswith("in_network.weight")]


def _rank_blocks(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The nested levels the clients' ranks make: ``[(0, r_1), (r_1, r_2), ...]`` for their sorted distinct ranks."""
    levels = sorted(set(int(r) for r in ranks if r > 0))
    return list(zip([0, *levels[:-1]], levels))


def _block_product_means(
    global_arrays: Mapping[str, np.ndarray], updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    vt_name: str, u_name: str,
) -> list[tuple[int, int, np.ndarray]]:
    """Per nested level ``(lo, hi)``: the example-weighted mean of ``U[:, lo:hi] Vᵀ[lo:hi]`` over the clients
    holding components ``lo..hi-1`` (float64, ``fan_out × fan_in``)."""
    fan_out = global_arrays[u_name].shape[0]
    held = [(a[u_name].reshape(fan_out, a[vt_name].shape[0]), a[vt_name].reshape(a[vt_name].shape[0], -1), w)
            for a, w in updates if vt_name in a]
    out = []
    for lo, hi in _rank_blocks([vt.shape[0] for _, vt, _ in held]):
        total = np.zeros((fan_out, held[0][1].shape[1]), dtype=np.float64)
        weight = 0.0
        for u, vt, w in held:
            if vt.shape[0] >= hi:
                total += w * (u[:, lo:hi].astype(np.float64) @ vt[lo:hi].astype(np.float64))
                weight += w
        out.append((lo, hi, total / weight))
    return out


def aggregate_ordered_products(
    global_arrays: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> Arrays:
    """FedLoD's ordered rule without the cross-term: per nested level, the mean of the block's products, re-factored.

    The clients' distinct ranks ``r_1 < r_2 < ...`` cut each layer's components
    into nested levels ``[r_{l-1}, r_l)``. For each level, the clients that hold
    it (rank ≥ ``r_l``) send ``U[:, level] Vᵀ[level]``; their example-weighted
    mean is re-factored by truncated SVD into the level's ``r_l − r_{l-1}``
    components (``U = P√Σ``, ``Vᵀ = √Σ Qᵀ``, ordered by singular value).
    Averaging ``U`` and ``Vᵀ`` separately (:func:`aggregate_ordered_factors`)
    gives ``mean(U) mean(V)ᵀ``, which differs from ``mean(U Vᵀ)`` by the clients'
    cross-terms; this rule trades that for the SVD's truncation error instead
    (:func:`cross_term_share` measures both). Components no client holds keep
    their value; dense parameters are FedAvg'd. With one level it is
    :func:`aggregate_svd` of the clients' products.
    """
    check_prefixes(global_arrays, updates)
    pairs = _factor_pairs(global_arrays)
    factors = {n for pair in pairs for n in pair}
    dense = {k: v for k, v in global_arrays.items() if k not in factors}
    out = aggregate_nested(dense, [({k: a[k] for k in dense if k in a}, w) for a, w in updates])
    for vt_name, u_name in pairs:
        g_vt, g_u = global_arrays[vt_name], global_arrays[u_name]
        rank, fan_out = g_vt.shape[0], g_u.shape[0]
        u_new = g_u.reshape(fan_out, rank).astype(np.float64, copy=True)
        vt_new = g_vt.reshape(rank, -1).astype(np.float64, copy=True)
        for lo, hi, mean in _block_product_means(global_arrays, updates, vt_name, u_name):
            p, s, qt = np.linalg.svd(mean, full_matrices=False)
            k = min(hi - lo, len(s))
            root = np.sqrt(s[:k])
            u_new[:, lo:hi], vt_new[lo:hi] = 0.0, 0.0
            u_new[:, lo:lo + k], vt_new[lo:lo + k] = p[:, :k] * root, root[:, None] * qt[:k]
        out[u_name] = u_new.reshape(g_u.shape).astype(g_u.dtype)
        out[vt_name] = vt_new.reshape(g_vt.shape).astype(g_vt.dtype)
    return {k: out[k] for k in global_arrays}


def cross_term_share(
    global_arrays: Mapping[str, np.ndarray],
    merged: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> dict[str, float]:
    """Per LoD layer, how far a merge's product is from the clients' mean products, relative to the update.

    ``‖W_merged − W_mean‖_F / ‖W_mean − W_global‖_F`` over the components the
    clients hold, where ``W_mean`` sums, level by level, the mean of the block
    products over the block's holders (what :func:`aggregate_ordered_products`
    re-factors) and ``W_merged``, ``W_global`` are the products of the same
    components after and before the merge. For :func:`aggregate_ordered_factors`
    it is the cross-term's share of the update; for the product rule, the SVD's
    truncation error.
    """
    shares = {}
    for vt_name, u_name in _factor_pairs(global_arrays):
        blocks = _block_product_means(global_arrays, updates, vt_name, u_name)
        if not blocks:
            continue
        top = blocks[-1][1]
        fan_out, rank = global_arrays[u_name].shape[0], global_arrays[vt_name].shape[0]

        def product(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
            u = arrays[u_name].reshape(fan_out, rank)[:, :top].astype(np.float64)
            return u @ arrays[vt_name].reshape(rank, -1)[:top].astype(np.float64)

        target = sum(mean for _, _, mean in blocks)
        moved = float(np.linalg.norm(target - product(global_arrays)))
        shares[layer_of(vt_name)] = float(np.linalg.norm(product(merged) - target)) / max(moved, 1e-30)
    return shares


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
            weighted = np.zeros(current.shape, dtype=np.float64)
            for block, w in holders:
                weighted += np.float64(w) * block.astype(np.float64)
            out[name] = (weighted / sum(w for _, w in holders)).astype(current.dtype)
            continue
        acc = np.zeros(current.shape, dtype=np.float64)
        for block, w in holders:
            acc[tuple(slice(0, d) for d in block.shape)] += np.float64(w) * block.astype(np.float64)
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
