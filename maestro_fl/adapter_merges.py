"""Server rules of heterogeneous-rank LoRA fine-tuning, as pure functions of the clients' adapters.

A client ``k`` fine-tunes a frozen base weight ``W`` with a low-rank adapter
``ΔW_k = s_k · B_k A_k`` (``B_k``: ``d_out × r_k``, ``A_k``: ``r_k × d_in``, scaling
``s_k = α / r_k`` in LoRA's convention) at the rank ``r_k`` its device affords.
The rules below merge such adapters of different ranks; each is one small
function on NumPy arrays, so that it can be checked against its formula on
hand-made adapters (``tests/test_adapter_merges.py``):

* :func:`zero_pad_merge` with :func:`hetlora_weights`: HetLoRA (Cho et al.,
  EMNLP 2024, arXiv 2401.06432) pads every ``B_k`` and ``A_k`` with zeros to the
  largest rank and averages them with weights ``‖B_k A_k‖_F / Z``;
* :func:`flexlora_merge`: FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505)
  averages the full-size products by data size and hands each client the
  truncated SVD of the mean at its own rank (:func:`truncated_factors`);
* :func:`flora_stack`: FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976)
  stacks the factors so that their product is exactly ``Σ p_k s_k B_k A_k``,
  which the server folds into the base;
* :func:`sketch_indices`, :func:`sketched_product`, :func:`fslora_merge`:
  FSLoRA (arXiv 2501.19389) lets a client train a random subset of ``m_k`` of
  the global adapter's ``r`` rank indices, rescaled by ``r / m_k`` so that the
  sketched product is an unbiased estimate of the full one;
* :func:`rank_partitioned_merge`: each rank segment averaged over the clients
  that hold it, weighted by their examples (RBLA, arXiv 2408.08699; raFLoRA,
  arXiv 2602.13486); with equal weights it is FedLoD's ``ordered`` rule.

The rules are written here from the papers' descriptions; where a detail is
ours, the function says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Factors = tuple[np.ndarray, np.ndarray]  # (B: d_out x r, A: r x d_in)


def _normalized(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)!r}")
    return w / w.sum()


def adapter_product(b: np.ndarray, a: np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """``scaling · B A``: the adapter's full-size update of the base weight."""
    return scaling * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def zero_padded(b: np.ndarray, a: np.ndarray, rank: int) -> Factors:
    """``B`` and ``A`` padded with zero components to ``rank`` (HetLoRA's and FedIT-style zero-padding)."""
    r = b.shape[1]
    if a.shape[0] != r or r > rank:
        raise ValueError(f"B is {b.shape} and A is {a.shape}: their ranks must agree and be <= {rank}")
    pb = np.zeros((b.shape[0], rank), dtype=np.float64)
    pa = np.zeros((rank, a.shape[1]), dtype=np.float64)
    pb[:, :r], pa[:r] = b, a
    return pb, pa


def hetlora_weights(adapters: Sequence[Factors]) -> np.ndarray:
    """HetLoRA's sparsity-weighted aggregation: client ``k`` weighs ``‖B_k A_k‖_F / Σ_j ‖B_j A_j‖_F``."""
    norms = [float(np.linalg.norm(adapter_product(b, a))) for b, a in adapters]
    return _normalized(norms)


def zero_pad_merge(adapters: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """``(Σ w_k pad(B_k), Σ w_k pad(A_k))`` at the largest rank, ``w`` normalized to sum to 1.

    A client is then sent the first ``r_k`` components (HetLoRA's truncation). Note that the product of the
    averaged factors is not the average of the products: the cross terms ``w_j w_k B_j A_k`` are what
    FLoRA's stacking avoids.
    """
    w = _normalized(weights)
    rank = max(b.shape[1] for b, _ in adapters)
    padded = [zero_padded(b, a, rank) for b, a in adapters]
    return (sum(wk * pb for wk, (pb, _) in zip(w, padded)),
            sum(wk * pa for wk, (_, pa) in zip(w, padded)))


def truncated_factors(delta: np.ndarray, rank: int, scaling: float = 1.0) -> Factors:
    """Factors ``(B, A)`` of rank ``rank`` with ``scaling · B A`` the best rank-``rank`` approximation of ``delta``
    (Eckart-Young). The singular values are split evenly, ``B = U √S``, ``A = √S Vᵀ`` (our choice: FlexLoRA's
    code puts them on one side; the product, which is what the rule fixes, is the same)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    rank = min(rank, len(s))
    root = np.sqrt(s[:rank] / scaling)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def flexlora_merge(adapters: Sequence[Factors], examples: Sequence[float], scalings: Sequence[float],
                   ranks: Sequence[int], out_scalings: Sequence[float] | None = None) -> tuple[np.ndarray, list[Factors]]:
    """FlexLoRA: the data-weighted mean of the products ``s_k B_k A_k``, and per requested rank its truncated SVD.

    Parameters
    ----------
    adapters, examples, scalings : per client, its ``(B_k, A_k)``, its examples and its scaling ``s_k``.
    ranks : the ranks to redistribute at (each client's, or each tier's).
    out_scalings : the scaling each redistributed adapter is used with (default: 1).

    Returns
    -------
    (mean product, factors per rank)
    """
    p = _normalized(examples)
    mean = sum(pk * adapter_product(b, a, s) for pk, (b, a), s in zip(p, adapters, scalings))
    outs = out_scalings if out_scalings is not None else [1.0] * len(ranks)
    return mean, [truncated_factors(mean, r, s) for r, s in zip(ranks, outs)]


def flora_stack(adapters: Sequence[Factors], weights: Sequence[float], scalings: Sequence[float]) -> Factors:
    """FLoRA's stacking: ``B = [B_1 … B_K]`` and ``A = [p_1 s_1 A_1; …; p_K s_K A_K]``, so that
    ``B A = Σ p_k s_k B_k A_k`` exactly, with global rank ``Σ r_k``. The server folds ``B A`` into the base
    and the clients start fresh adapters next round."""
    p = _normalized(weights)
    b = np.concatenate([np.asarray(bk, np.float64) for bk, _ in adapters], axis=1)
    a = np.concatenate([pk * sk * np.asarray(ak, np.float64) for pk, sk, (_, ak) in zip(p, scalings, adapters)], axis=0)
    return b, a


def sketch_indices(rank: int, kept: int, rng: np.random.Generator) -> np.ndarray:
    """FSLoRA's sketch: ``kept`` of the global adapter's ``rank`` indices, uniformly without replacement, sorted."""
    if not 0 < kept <= rank:
        raise ValueError(f"a sketch keeps 1..{rank} of {rank} rank indices, got {kept}")
    return np.sort(rng.choice(rank, size=kept, replace=False))


def sketched_product(b: np.ndarray, a: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``(r / m) · B[:, S] A[S, :]``: what a client with sketch ``S`` (``m`` of ``r`` indices) adds to the base.
    Each index is kept with probability ``m / r``, so the expectation over sketches is ``B A``."""
    rank = b.shape[1]
    return (rank / len(indices)) * adapter_product(b[:, indices], a[indices])


def fslora_merge(rank: int, shape_b: tuple[int, int], shape_a: tuple[int, int],
                 updates: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 weights: Sequence[float]) -> Factors:
    """FSLoRA's server average: each client's update of its sketched rows of ``A`` and columns of ``B``, scattered
    into the global adapter's shape and averaged with weights ``p_k`` (zero where a client's sketch left an
    index out). ``updates``: per client ``(indices, ΔB[:, S], ΔA[S, :])``. The result is the pseudo-gradient a
    server optimizer steps with."""
    p = _normalized(weights)
    db, da = np.zeros(shape_b), np.zeros(shape_a)
    for pk, (indices, ub, ua) in zip(p, updates):
        if ub.shape[1] != len(indices) or ua.shape[0] != len(indices) or (np.asarray(indices) >= rank).any():
            raise ValueError(f"an update of {len(indices)} indices of rank {rank} has B {ub.shape} and A {ua.shape}")
        db[:, indices] += pk * ub
        da[indices] += pk * ua
    return db, da


def rank_partitioned_merge(adapters: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """Each rank component averaged over the clients that hold it: component ``j`` of ``B`` and ``A`` is
    ``Σ_{k: r_k > j} w_k x_kj / Σ_{k: r_k > j} w_k`` (RBLA, raFLoRA). With equal weights this is FedLoD's
    ``ordered`` rule; zero-padding instead divides every component by all clients' weights."""
    w = _normalized(weights)  # a scale of the weights changes nothing: each component divides by its holders'
    rank = max(b.shape[1] for b, _ in adapters)
    num_b = np.zeros((adapters[0][0].shape[0], rank))
    num_a = np.zeros((rank, adapters[0][1].shape[1]))
    held = np.zeros(rank)
    for wk, (b, a) in zip(w, adapters):
        r = b.shape[1]
        num_b[:, :r] += wk * b
        num_a[:r] += wk * a
        held[:r] += wk
    if (held <= 0).any():
        raise ValueError("a rank component no client holds with a positive weight")
    return num_b / held, num_a / held[:, None]
