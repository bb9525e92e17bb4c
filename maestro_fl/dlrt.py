"""DLRT: rank-adaptive dynamical low-rank training with the KLS integrator.

"Low-rank lottery tickets" (Schotthöfer, Zangrando, Kusch, Ceruti, Tudisco;
NeurIPS 2022, arXiv 2205.13571). Each layer is ``W = U S Vᵀ`` with ``U``
(out × r) and ``V`` (fan_in × r) orthonormal and ``S`` (r × r) dense. One
training step (:meth:`KLSIntegrator.step`):

1. **K- and L-steps** at the same point: ``K = U S`` and ``L = V Sᵀ`` each take a
   gradient step. We get both gradients from one forward/backward pass whose
   layer output is ``½(x V Kᵀ) + ½(x L Uᵀ)`` (equal in value to the layer's
   output, with each gradient halved), instead of the reference code's two passes.
2. **Basis augmentation**: ``Û = qr([K₁ | U₀])``, ``V̂ = qr([L₁ | V₀])`` (rank 2r).
3. **Galerkin S-step**: ``S̃₀ = (ÛᵀU₀) S₀ (V̂ᵀV₀)ᵀ`` takes a gradient step in a
   second pass on ``Û S̃ V̂ᵀ``.
4. **Truncation**: with ``S̃₁ = P Σ Qᵀ``, keep the smallest rank ``r₁`` whose
   discarded singular values have norm below ``ϑ = τ‖Σ‖₂``, clamped to
   ``[min_rank, max_rank]``; ``U = Û P₁``, ``V = V̂ Q₁``, ``S = Σ₁``.

The fixed-rank variant replaces 2-4 by ``U₁ = qr(K₁)``, ``V₁ = qr(L₁)``,
``S̃ = (U₁ᵀU₀) S (V₁ᵀV₀)ᵀ`` and an S-step, with no augmentation or truncation.
The full ``W`` is never formed: every product goes through the factors.
Parameters outside DLRT layers (biases, norms, the dense classifier) take a
plain SGD step with the S-step's gradients.
"""

from __future__ import annotations

import copy
import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .convert import _set_module, _walk, lod_layers
from .data import Split
from .layers import LoDConv, LoDConv1d, LoDConv2d, LoDLayer, LoDLinear, _conv_class, thin_svd
from .training import EpochStats, Step, WholeModel, run_epoch


def _orth(a: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(a)
    return q


class DLRTLayer(nn.Module, metaclass=ABCMeta):
    """``W = U S Vᵀ`` with orthonormal bases; a Linear or (unfolded-kernel) Conv2d layer.

    Attributes
    ----------
    rank : int
        Current rank (columns of ``U`` and ``V``).
    max_rank, min_rank : int
        Bounds of the adaptive rank (the reference clamps to ``[2, ⌊min(m, n)/2⌋]``).
    """

    # buffers (registered in __init__): declared so that type checkers see tensors, not modules
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def __init__(self, fan_out: int, fan_in: int, rank: int, bias: bool, max_rank: int | None, min_rank: int) -> None:
        super().__init__()
        full = min(fan_out, fan_in)
        self.fan_out, self.fan_in = fan_out, fan_in
        self.max_rank = max(1, min(max_rank or full // 2, full))
        self.min_rank = max(1, min(min_rank, self.max_rank))
        rank = max(self.min_rank, min(rank, self.max_rank))
        self.register_buffer("U", torch.empty(fan_out, rank))
        self.register_buffer("S", torch.empty(rank, rank))
        self.register_buffer("V", torch.empty(fan_in, rank))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None
        self.mode = "plain"  # plain | kl | s
        self.K: torch.Tensor | None = None
        self.L: torch.Tensor | None = None
        self.U_hat: torch.Tensor | None = None
        self.V_hat: torch.Tensor | None = None
        self.S_tilde: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @abstractmethod
    def _apply_factors(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``x ↦ left · (rightᵀ x)`` through the layer's own input map; ``left`` out × q, ``right`` fan_in × q."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "kl":
            assert self.K is not None and self.L is not None
            y = 0.5 * (self._apply_factors(x, self.K, self.V) + self._apply_factors(x, self.U, self.L))
        elif self.mode == "s":
            assert self.U_hat is not None and self.S_tilde is not None and self.V_hat is not None
            y = self._apply_factors(x, self.U_hat @ self.S_tilde, self.V_hat)
        else:
            y = self._apply_factors(x, self.U @ self.S, self.V)
        return self._add_bias(y)

    @abstractmethod
    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        ...

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        """SVD of a dense (unfolded) weight: ``U = P_r``, ``S = Σ_r``, ``V = Q_r``."""
        p, s, qt = thin_svd(w.reshape(self.fan_out, -1).double())
        r = self.rank
        self.U.copy_(p[:, :r])
        self.S.copy_(torch.diag(s[:r]))
        self.V.copy_(qt[:r].T)

    @torch.no_grad()
    def init_random(self, generator: torch.Generator | None = None) -> None:
        """Random orthonormal bases and a sorted ``|N(0, σ²)|`` diagonal S, σ matching the dense init scale."""
        r = self.rank
        self.U.copy_(_orth(torch.randn(self.fan_out, r, generator=generator)))
        self.V.copy_(_orth(torch.randn(self.fan_in, r, generator=generator)))
        scale = (self.fan_out / (3.0 * r)) ** 0.5  # ‖W‖_F² ≈ out·in·1/(3·in), spread over r values
        s = torch.randn(r, generator=generator).abs().sort(descending=True).values * scale
        self.S.copy_(torch.diag(s))

    @abstractmethod
    def empty_lod(self, rank: int) -> LoDLayer:
        """An LoD layer of this shape at ``rank`` (weights uninitialized)."""

    @torch.no_grad()
    def to_lod(self) -> LoDLayer:
        """The same layer as LoD factors ordered by singular value (``U P √Σ``, ``√Σ Qᵀ Vᵀ``)."""
        p, s, qt = torch.linalg.svd(self.S.double())
        root = s.sqrt()
        u = ((self.U.double() @ p) * root).to(self.U.dtype)
        vt = (root[:, None] * (qt @ self.V.double().T)).to(self.U.dtype)
        lod = self.empty_lod(self.rank)
        lod.in_network.weight.copy_(vt.reshape(lod.in_network.weight.shape))
        lod.out_network.weight.copy_(u.reshape(lod.out_network.weight.shape))
        if self.bias is not None and lod.out_network.bias is not None:
            lod.out_network.bias.copy_(self.bias)
        return lod

    def extra_repr(self) -> str:
        return f"fan_out={self.fan_out}, fan_in={self.fan_in}, rank={self.rank}, max_rank={self.max_rank}"


class DLRTLinear(DLRTLayer):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 max_rank: int | None = None, min_rank: int = 2) -> None:
        super().__init__(out_features, in_features, rank, bias, max_rank, min_rank)

    def _apply_factors(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, right.T), left)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def empty_lod(self, rank: int) -> LoDLinear:
        return LoDLinear(self.fan_in, self.fan_out, rank, bias=self.bias is not None).to(self.U.device)


class DLRTConv(DLRTLayer):
    """The kernel unfolded to ``out × (in·∏k)``: ``Vᵀ`` acts as a convolution into r channels (1-D or 2-D)."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: int, max_rank: int | None = None, min_rank: int = 2) -> None:
        super().__init__(conv.out_channels, conv.in_channels * math.prod(conv.kernel_size), rank, conv.bias is not None,
                         max_rank, min_rank)
        self.in_channels, self.kernel_size = conv.in_channels, tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.dims = len(self.kernel_size)
        self._conv = F.conv1d if self.dims == 1 else F.conv2d

    def _apply_factors(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        q = right.shape[1]
        h = self._conv(x, right.T.reshape(q, self.in_channels, *self.kernel_size), None,
                       self.stride, self.padding, self.dilation)
        return self._conv(h, left.reshape(self.fan_out, q, *(1,) * self.dims))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, *(1,) * self.dims)

    def empty_lod(self, rank: int) -> LoDConv:
        cls = LoDConv1d if self.dims == 1 else LoDConv2d
        return cls(self.in_channels, self.fan_out, self.kernel_size, rank, stride=self.stride,
                   padding=self.padding, dilation=self.dilation, bias=self.bias is not None).to(self.U.device)


DLRTConv2d = DLRTConv  # the name of the 2-D case


def dlrt_layers(model: nn.Module) -> dict[str, DLRTLayer]:
    return {n: m for n, m in _walk(model) if isinstance(m, DLRTLayer)}


def dlrt_factorize(
    model: nn.Module,
    rank_fraction: float = 0.5,
    *,
    init: str = "random",
    keep_classifier: bool = True,
    keep_first: int = 0,
    max_rank: int | None = None,
    min_rank: int = 2,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace Linear/Conv2d layers by DLRT layers at ``⌈p·max_rank⌉``, in place.

    The classifier (last Linear) stays dense by default, as in the paper;
    grouped convolutions and layers too small to factor stay dense too.
    """
    candidates: list[tuple[str, nn.Linear | nn.Conv1d | nn.Conv2d]] = [
        (n, m) for n, m in _walk(model) if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)  # type: ignore[misc]
    ]
    classifier = next((n for n, m in reversed(candidates) if isinstance(m, nn.Linear)), None)
    for i, (name, layer) in enumerate(candidates):
        if i < keep_first or (keep_classifier and name == classifier):
            continue
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            continue
        fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        if min(fan_out, fan_in) < 4:
            continue
        bound = max(1, min(max_rank or min(fan_out, fan_in) // 2, min(fan_out, fan_in)))
        rank = max(1, int(round(rank_fraction * bound)))
        new: DLRTLayer
        if isinstance(layer, nn.Linear):
            new = DLRTLinear(layer.in_features, layer.out_features, rank, layer.bias is not None, max_rank, min_rank)
        else:
            new = DLRTConv(layer, rank, max_rank, min_rank)
        new = new.to(layer.weight.device)
        if init == "svd":
            new.init_from_weight(layer.weight.detach())
        else:
            new.init_random(generator)
        if layer.bias is not None and new.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        _set_module(model, name, new)
    return model


def dlrt_to_lod(model: nn.Module) -> nn.Module:
    """A copy whose DLRT layers are LoD layers ordered by singular value: the LoD ladder and
    extraction then apply, and truncating to rank b keeps DLRT's b largest singular values."""
    out = copy.deepcopy(model)
    for name, layer in dlrt_layers(out).items():
        _set_module(out, name, layer.to_lod())
    return out


@torch.no_grad()
def lod_to_dlrt(model: nn.Module, min_rank: int = 1) -> nn.Module:
    """A copy whose LoD layers are DLRT layers of the same product, capped at their current rank.

    ``U Vᵀ`` (LoD) becomes ``Q_u (R_u R_vᵀ) Q_vᵀ`` with ``U = Q_u R_u`` and ``V = Q_v R_v`` (QR):
    orthonormal bases and a dense S, no SVD of the full weight. The cap is the
    federated client's budget: DLRT may lower its rank but never exceed what it was sent.
    """
    out = copy.deepcopy(model)
    for name, lod in lod_layers(out).items():
        r = lod.max_rank
        new: DLRTLayer
        if isinstance(lod, LoDConv):
            conv = _conv_class(lod.dims)(lod.in_channels, lod.out_channels, lod.kernel_size, stride=lod.in_network.stride,
                             padding=lod.in_network.padding, dilation=lod.in_network.dilation,
                             bias=lod.bias is not None, device="meta")
            new = DLRTConv(conv, r, max_rank=r, min_rank=min_rank)
        else:
            new = DLRTLinear(lod.fan_in, lod.fan_out, r, bias=lod.bias is not None, max_rank=r, min_rank=min_rank)
        new = new.to_empty(device=lod.u_matrix().device)
        qu, ru = torch.linalg.qr(lod.u_matrix())
        qv, rv = torch.linalg.qr(lod.v_matrix().T)
        new.U.copy_(qu)
        new.V.copy_(qv)
        new.S.copy_(ru @ rv.T)
        if lod.bias is not None and new.bias is not None:
            new.bias.data = lod.bias.detach().clone()
        _set_module(out, name, new)
    return out


def truncation_rank(sigma: torch.Tensor, tau: float, min_rank: int = 1, max_rank: int | None = None) -> int:
    """Smallest ``r`` with ``‖σ_{r:}‖₂ < τ·‖σ‖₂`` (σ sorted descending), clamped to the bounds."""
    theta = tau * float(torch.linalg.vector_norm(sigma))
    tails = torch.flip(torch.cumsum(torch.flip(sigma.double() ** 2, [0]), 0), [0]).sqrt()  # ‖σ_{j:}‖ for j = 0..
    below = (tails < theta).nonzero()
    r = int(below[0]) if len(below) else len(sigma)
    upper = len(sigma) if max_rank is None else max_rank
    return max(min_rank, min(r, upper))


class KLSIntegrator(Step):
    """The rank-adaptive (or fixed-rank) KLS step for every DLRT layer of a model.

    As a :class:`~maestro_fl.training.Step` of the one epoch loop it runs the
    batch's closure twice: the K/L pass and the S pass.

    Parameters
    ----------
    model : nn.Module
        A model built from :class:`DLRTLayer` (and any dense layers).
    lr : float
        Step size of the K, L and S steps (the reference's ``tau``; 0.05 for LeNet-5).
    tau : float
        Relative truncation tolerance ϑ/‖Σ‖ (the reference's ``theta``).
    adaptive : bool
        Rank-adaptive integrator; ``False`` is the fixed-rank variant.
    momentum, weight_decay : float
        For the dense parameters' SGD.
    """

    def __init__(self, model: nn.Module, lr: float = 0.05, tau: float = 0.1, adaptive: bool = True,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.model, self.lr, self.tau, self.adaptive = model, lr, tau, adaptive
        self.layers = dlrt_layers(model)
        if not self.layers:
            raise ValueError("model has no DLRT layers; build it with dlrt_factorize")
        dense = [p for p in model.parameters() if p.requires_grad]
        self.dense_opt = torch.optim.SGD(dense, lr=lr, momentum=momentum, weight_decay=weight_decay) if dense else None

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.layers.items()}

    def __call__(self, closure: Callable[[], torch.Tensor]) -> None:
        self.step(closure)

    def _set_mode(self, mode: str) -> None:
        for layer in self.layers.values():
            layer.mode = mode

    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        """One KLS step; ``closure`` returns the mini-batch loss of ``self.model``. Returns the K/L-pass loss."""
        layers = list(self.layers.values())
        # 1. K- and L-steps from one pass (each gradient comes out halved)
        ks = [(layer.U @ layer.S).requires_grad_() for layer in layers]
        ls = [(layer.V @ layer.S.T).requires_grad_() for layer in layers]
        for layer, k_factor, l_factor in zip(layers, ks, ls):
            layer.K, layer.L = k_factor, l_factor
        self._set_mode("kl")
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        try:
            loss = closure()
            grads = torch.autograd.grad(loss, [t for pair in zip(ks, ls) for t in pair])
        finally:
            self._set_mode("plain")
        s_tildes: list[torch.Tensor] = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                k1 = ks[i] - self.lr * 2.0 * grads[2 * i]
                l1 = ls[i] - self.lr * 2.0 * grads[2 * i + 1]
                if self.adaptive:  # 2. augment the bases to rank 2r
                    u_hat = _orth(torch.cat([k1, layer.U], 1))
                    v_hat = _orth(torch.cat([l1, layer.V], 1))
                else:
                    u_hat, v_hat = _orth(k1), _orth(l1)
                layer.U_hat, layer.V_hat = u_hat, v_hat
                s_tilde = ((u_hat.T @ layer.U) @ layer.S @ (v_hat.T @ layer.V).T).requires_grad_()
                layer.S_tilde = s_tilde
                s_tildes.append(s_tilde)
                layer.K = layer.L = None
        # 3. the Galerkin S-step (dense parameters step with these gradients)
        self._set_mode("s")
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        try:
            closure().backward()
        finally:
            self._set_mode("plain")
        with torch.no_grad():
            for name, layer, s_tilde in zip(self.layers, layers, s_tildes):
                # every S-tilde is in the loss's graph (each layer runs in mode "s"), so it has a gradient
                assert s_tilde.grad is not None
                basis_u, basis_v = layer.U_hat, layer.V_hat
                assert basis_u is not None and basis_v is not None
                s1 = s_tilde - self.lr * s_tilde.grad
                if not torch.isfinite(s1).all():
                    raise FloatingPointError(f"DLRT layer {name!r}: non-finite coefficients after the S-step; lower lr")
                if self.adaptive:  # 4. truncate by the relative tolerance
                    p, sigma, qt = torch.linalg.svd(s1)
                    r = truncation_rank(sigma, self.tau, layer.min_rank, min(layer.max_rank, len(sigma)))
                    layer.U = basis_u @ p[:, :r]
                    layer.V = basis_v @ qt[:r].T
                    layer.S = torch.diag(sigma[:r])
                else:
                    layer.U, layer.V, layer.S = basis_u, basis_v, s1.detach().clone()
                layer.U_hat = layer.V_hat = layer.S_tilde = None
        if self.dense_opt is not None:
            self.dense_opt.step()
        return float(loss.detach())


def dlrt_train_epoch(
    model: nn.Module,
    integrator: KLSIntegrator,
    data: Split,
    *,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str = "cpu",
) -> EpochStats:
    """One epoch of KLS steps (:func:`~maestro_fl.training.run_epoch`; two passes per mini-batch)."""
    model.train()
    return run_epoch(data, WholeModel(model), integrator, batch_size=batch_size, generator=generator,
                     augment=augment, device=device)
