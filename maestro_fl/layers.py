"""Low-rank ordered decomposition (LoD) layers.

Maestro (Horváth, Laskaridis, Rajput, Wang; ICML 2024, arXiv 2308.14929)
writes a layer ``W`` (out × n) as ``U Vᵀ`` with ``U`` out × r and ``Vᵀ`` r × n.
Training with ordered dropout on the inner dimension orders the rank
components by importance, so the first ``b`` columns of ``U`` and rows of
``Vᵀ`` alone form a good rank-``b`` layer.

Both layers keep the authors' two-stage structure:

* ``in_network`` maps the input to the ``r`` inner channels (weight ``Vᵀ``);
* ``out_network`` maps them to the output and holds the bias (weight ``U``).

The rank axis is dim 0 of ``in_network.weight`` and dim 1 of
``out_network.weight`` for both layer types; :mod:`maestro_fl.aggregation`
relies on that.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Init = Literal["svd", "random"]


class LoDLayer(nn.Module, metaclass=ABCMeta):
    """Base class of the LoD layers.

    Attributes
    ----------
    max_rank : int
        Number of rank components the layer currently holds. Progressive
        shrinking and extraction reduce it; the tensors shrink with it.
    active_rank : int or None
        Rank used by ``forward`` when no ``rank`` argument is given. ``None``
        means ``max_rank``.
    """

    # the concrete layers narrow these; every one has ``weight`` and ``bias``
    in_network: nn.Linear | nn.Conv1d | nn.Conv2d
    out_network: nn.Linear | nn.Conv1d | nn.Conv2d

    def __init__(self, max_rank: int) -> None:
        super().__init__()
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.max_rank = int(max_rank)
        self.active_rank: int | None = None

    # -- shapes ---------------------------------------------------------
    @property
    @abstractmethod
    def fan_in(self) -> int:
        """Columns of the unfolded dense weight (``in`` or ``in·k·k``)."""

    @property
    @abstractmethod
    def fan_out(self) -> int:
        """Rows of the dense weight (output features or channels)."""

    @property
    def full_rank(self) -> int:
        """Largest rank a factorization of this layer can have."""
        return min(self.fan_out, self.fan_in)

    def resolve_rank(self, rank: int | None) -> int:
        r = rank if rank is not None else self.active_rank
        if r is None:
            return self.max_rank
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"rank must be in [1, {self.max_rank}], got {r}")
        return int(r)

    # -- factors as matrices ---------------------------------------------
    def v_matrix(self, rank: int | None = None) -> torch.Tensor:
        """``Vᵀ`` truncated to ``rank`` rows: (rank × fan_in)."""
        r = self.max_rank if rank is None else rank
        return self.in_network.weight[:r].reshape(r, -1)

    def u_matrix(self, rank: int | None = None) -> torch.Tensor:
        """``U`` truncated to ``rank`` columns: (fan_out × rank)."""
        r = self.max_rank if rank is None else rank
        return self.out_network.weight[:, :r].reshape(self.fan_out, r)

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """The dense weight ``U_{:, :r} Vᵀ_{:r}`` in the original layer's shape."""
        r = self.resolve_rank(rank)
        return (self.u_matrix(r) @ self.v_matrix(r)).reshape(self._dense_shape())

    @abstractmethod
    def _dense_shape(self) -> tuple[int, ...]:
        ...

    @property
    def bias(self) -> torch.Tensor | None:
        return self.out_network.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight at the active rank: for code that reads a layer's ``.weight`` directly
        (PyTorch's fused ``TransformerEncoderLayer`` inference path). Not a parameter: train the factors."""
        return self.dense_weight()

    # -- Maestro's regulariser and importance ------------------------------
    def tail_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖Vᵀ_{b:, :}‖_F, ‖U_{:, b:}‖_F)`` for every ``b`` (reverse cumsum)."""
        v_sq = self.v_matrix().pow(2).sum(dim=1)
        u_sq = self.u_matrix().pow(2).sum(dim=0)
        v_tail = v_sq.flip(0).cumsum(0).flip(0)
        u_tail = u_sq.flip(0).cumsum(0).flip(0)
        # clamp: sqrt has an infinite derivative at an exactly-zero tail
        return v_tail.clamp_min(1e-24).sqrt(), u_tail.clamp_min(1e-24).sqrt()

    def group_lasso(self) -> torch.Tensor:
        """Hierarchical group lasso ``Σ_b ‖Vᵀ_{b:}‖_F + ‖U_{:, b:}‖_F`` (Maestro §3)."""
        v_tail, u_tail = self.tail_norms()
        return v_tail.sum() + u_tail.sum()

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """Tail importance ``imp_b = ‖Vᵀ_{b:}‖_F · ‖U_{:, b:}‖_F``; non-increasing in b."""
        v_tail, u_tail = self.tail_norms()
        return v_tail * u_tail

    @torch.no_grad()
    def component_norms(self) -> torch.Tensor:
        """``‖u_i‖·‖v_i‖`` per component; equals σ_i when the factors are balanced."""
        return self.u_matrix().norm(dim=0) * self.v_matrix().norm(dim=1)

    # -- physical truncation ---------------------------------------------
    @torch.no_grad()
    def truncate_(self, rank: int) -> None:
        """Drop every component beyond ``rank``; the tensors really shrink.

        The parameters are replaced by new ``nn.Parameter`` objects; use
        :func:`maestro_fl.training.shrink` to keep an optimizer's state in step.
        """
        rank = self.resolve_rank(rank)
        if rank == self.max_rank:
            return
        self.in_network.weight = nn.Parameter(self.in_network.weight[:rank].clone())
        self.out_network.weight = nn.Parameter(self.out_network.weight[:, :rank].clone())
        self._set_inner(rank)
        self.max_rank = rank
        if self.active_rank is not None:
            self.active_rank = min(self.active_rank, rank)

    @torch.no_grad()
    def pad_(self, rank: int) -> None:
        """Grow to ``rank`` components with zeros: the outputs do not change (inverse of ``truncate_``)."""
        extra = rank - self.max_rank
        if extra <= 0:
            return
        w_in, w_out = self.in_network.weight, self.out_network.weight
        self.in_network.weight = nn.Parameter(torch.cat([w_in, w_in.new_zeros(extra, *w_in.shape[1:])], 0))
        self.out_network.weight = nn.Parameter(
            torch.cat([w_out, w_out.new_zeros(w_out.shape[0], extra, *w_out.shape[2:])], 1)
        )
        self._set_inner(rank)
        self.max_rank = rank

    @abstractmethod
    def _set_inner(self, rank: int) -> None:
        ...

    @abstractmethod
    def to_dense_module(self, rank: int | None = None) -> nn.Module:
        """A plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` computing this layer at ``rank``."""

    def extra_repr(self) -> str:
        return f"max_rank={self.max_rank}, active_rank={self.active_rank}"


class LoDLinear(LoDLayer):
    """``y = U_{:, :r} (Vᵀ_{:r} x) + bias``, a Linear layer as ordered factors.

    Parameters
    ----------
    in_features, out_features : int
        Shape of the dense layer being replaced.
    max_rank : int
        Number of rank components; at most ``min(in_features, out_features)``.
    bias : bool
        Whether ``out_network`` carries a bias.
    """

    in_network: nn.Linear
    out_network: nn.Linear

    def __init__(self, in_features: int, out_features: int, max_rank: int, bias: bool = True) -> None:
        super().__init__(max_rank)
        if max_rank > min(in_features, out_features):
            raise ValueError(
                f"max_rank {max_rank} exceeds min(in_features, out_features) = {min(in_features, out_features)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.in_network = nn.Linear(in_features, max_rank, bias=False)
        self.out_network = nn.Linear(max_rank, out_features, bias=bias)

    @property
    def fan_in(self) -> int:
        return self.in_features

    @property
    def fan_out(self) -> int:
        return self.out_features

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def _set_inner(self, rank: int) -> None:
        self.in_network.out_features = rank
        self.out_network.in_features = rank

    def forward(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        r = self.resolve_rank(rank)
        w_in, w_out = self.in_network.weight, self.out_network.weight
        if r < self.max_rank:  # ordered dropout: only the first r components take part
            w_in, w_out = w_in[:r], w_out[:, :r]
        return F.linear(F.linear(x, w_in), w_out, self.out_network.bias)

    def to_dense_module(self, rank: int | None = None) -> nn.Linear:
        w = self.dense_weight(rank)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense = dense.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None and dense.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


class LoDConv(LoDLayer):
    """A k-wide (1-D) or k×k (2-D) convolution into ``r`` channels followed by a 1-wide/1×1 convolution.

    This factorizes the kernel unfolded to ``out × (in·∏k)``: ``in_network``
    is ``Vᵀ`` reshaped to ``r × in × k...`` and keeps the original stride,
    padding and dilation; ``out_network`` is ``U`` as a pointwise convolution
    with the bias. Grouped convolutions are not factorized
    (:func:`maestro_fl.convert.factorize` leaves them dense).
    """

    dims: int = 2
    in_network: nn.Conv1d | nn.Conv2d
    out_network: nn.Conv1d | nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        max_rank: int,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(max_rank)
        conv = _conv_class(self.dims)
        self.in_network = conv(in_channels, max_rank, kernel_size, stride=stride, padding=padding, dilation=dilation,
                               bias=False)
        self.out_network = conv(max_rank, out_channels, 1, bias=bias)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = self.in_network.kernel_size
        if max_rank > self.full_rank:
            raise ValueError(f"max_rank {max_rank} exceeds min(out, in·∏k) = {self.full_rank}")

    @property
    def fan_in(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)

    @property
    def fan_out(self) -> int:
        return self.out_channels

    def _dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _set_inner(self, rank: int) -> None:
        self.in_network.out_channels = rank
        self.out_network.in_channels = rank

    def forward(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        r = self.resolve_rank(rank)
        w_in, w_out = self.in_network.weight, self.out_network.weight
        if r < self.max_rank:
            w_in, w_out = w_in[:r], w_out[:, :r]
        conv = self.in_network
        fn = F.conv1d if self.dims == 1 else F.conv2d
        h = fn(x, w_in, None, conv.stride, conv.padding, conv.dilation)
        return fn(h, w_out, self.out_network.bias)

    def to_dense_module(self, rank: int | None = None) -> nn.Conv1d | nn.Conv2d:
        w = self.dense_weight(rank)
        conv = self.in_network
        dense = _conv_class(self.dims)(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=self.bias is not None,
        ).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None and dense.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


def _conv_class(dims: int) -> Callable[..., nn.Conv1d | nn.Conv2d]:
    # typed as a plain callable: the kernel, stride and padding tuples here are dimension-generic
    # (``tuple[int, ...]``), which torch's stubs type per class as ``tuple[int]`` / ``tuple[int, int]``
    return nn.Conv1d if dims == 1 else nn.Conv2d


class LoDConv1d(LoDConv):
    """An ``nn.Conv1d`` as ordered factors (:class:`LoDConv` on a 1-D kernel)."""

    dims = 1


class LoDConv2d(LoDConv):
    """An ``nn.Conv2d`` as ordered factors (:class:`LoDConv` on a k×k kernel)."""

    dims = 2


def _unfolded_weight(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


@torch.no_grad()
def singular_values(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    """Singular values of a dense layer's (unfolded) weight."""
    return torch.linalg.svdvals(_unfolded_weight(layer).double()).to(layer.weight.dtype)


# LAPACK's divide-and-conquer SVD of a wide matrix is ~3x slower than of its transpose (float64, 2 cores:
# 512 x 4608, a CIFAR ResNet/VGG conv, 0.67 s against 0.22 s; 128 x 12800 0.17 against 0.04). The transpose is
# taken from 512 rows (a gain of 0.15 s or more per layer there); the built-in tasks' layers (at most 128 rows) keep
# their orientation and so their factors bit for bit.
TRANSPOSED_SVD_FROM_ROWS = 512


def thin_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P, Σ, Qᵀ`` of ``w`` (thin), computed on the tall side of a large wide matrix."""
    if w.shape[1] > w.shape[0] >= TRANSPOSED_SVD_FROM_ROWS:
        q, s, pt = torch.linalg.svd(w.T, full_matrices=False)
        return pt.T, s, q.T
    p, s, qt = torch.linalg.svd(w, full_matrices=False)
    return p, s, qt


def lod_from_dense(
    layer: nn.Module, rank: int | Mapping[str, int], init: Init = "svd", generator: torch.Generator | None = None
) -> nn.Module | None:
    """Build the LoD counterpart of ``layer``, or ``None`` if it has none.

    The single dispatch point on layer type (PEFT style): an :class:`LoDLinear`,
    :class:`LoDConv1d` or :class:`LoDConv2d` for a Linear or convolution; for an
    ``nn.MultiheadAttention``, an :class:`LoDMultiheadAttention` whose
    projections named in ``rank`` (a mapping; an int: all four) are factorized.
    ``init="svd"`` sets
    ``U = P_r √Σ_r`` and ``Vᵀ = √Σ_r Q_rᵀ`` from the SVD of the layer's
    weights, so that at full rank the outputs are unchanged; ``"random"``
    draws fresh factors whose product has the variance of PyTorch's default
    initialization.
    """
    lod: LoDLayer
    if type(layer) is nn.MultiheadAttention:
        ranks = dict(rank) if isinstance(rank, Mapping) else dict.fromkeys(ATTENTION_PROJECTIONS, rank)
        return LoDMultiheadAttention.from_dense(layer, ranks, init=init, generator=generator)
    if isinstance(rank, Mapping):
        raise TypeError(f"rank: one integer for a {type(layer).__name__}, got a mapping")
    if isinstance(layer, nn.Linear):
        lod = LoDLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            return None
        lod = (LoDConv1d if isinstance(layer, nn.Conv1d) else LoDConv2d)(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            rank,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=layer.bias is not None,
        )
    else:
        return None
    lod = lod.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        if init == "svd":
            p, s, qt = thin_svd(_unfolded_weight(layer).double())
            root = s[:rank].sqrt()
            u = (p[:, :rank] * root).to(layer.weight.dtype)
            vt = (root[:, None] * qt[:rank]).to(layer.weight.dtype)
        elif init == "random":
            # Var(U V) = r·σ_u²·σ_v² should equal the dense default Var(W) = 1/(3·fan_in)
            fan_in = _unfolded_weight(layer).shape[1]
            std = (1.0 / (3.0 * fan_in * rank)) ** 0.25
            u = torch.randn(lod.fan_out, rank, generator=generator).mul_(std)
            vt = torch.randn(rank, fan_in, generator=generator).mul_(std)
        else:
            raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
        lod.in_network.weight.copy_(vt.reshape(lod.in_network.weight.shape))
        lod.out_network.weight.copy_(u.reshape(lod.out_network.weight.shape))
        if layer.bias is not None and lod.out_network.bias is not None:
            lod.out_network.bias.copy_(layer.bias)
    return lod


def dense_is_smaller(fan_out: int, fan_in: int, rank: int) -> bool:
    """True when rank-``rank`` factors hold more weights than the dense layer.

    The rule ``r·(m + n) > m·n`` (Maestro's ``model_to_full``) decides which
    layers :func:`maestro_fl.convert.extract` turns dense again.
    """
    return rank * (fan_out + fan_in) > fan_out * fan_in


def ceil_rank(fraction: float, max_rank: int) -> int:
    """``⌈p·r⌉`` clamped to [1, r], the ordered-dropout rank at fraction p."""
    return max(1, min(max_rank, math.ceil(fraction * max_rank - 1e-9)))


#: an attention's projections, in the order PyTorch stacks them in ``in_proj_weight`` (then the output)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoDMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose Q, K, V and output projections are separate, ordered low-rank layers.

    PyTorch keeps Q, K and V stacked in one raw ``in_proj_weight`` and calls
    the output projection's ``.weight`` directly, so neither is a layer that
    factorization can reach. Here each of the four is its own module
    (:data:`ATTENTION_PROJECTIONS`): an :class:`LoDLinear` when factorized, a
    plain ``nn.Linear`` otherwise, and the rank budget reaches attention as it
    reaches every other layer (Maestro factorizes a transformer's attention
    projections the same way; Horváth et al., arXiv 2308.14929, §5).

    The forward pass is ``nn.MultiheadAttention``'s: the same masks
    (``key_padding_mask``, ``attn_mask``, ``is_causal``), head averaging,
    dropout on the attention weights, ``batch_first`` and unbatched inputs,
    and after SVD initialization at full rank the same outputs.
    ``add_bias_kv`` and ``add_zero_attn`` are not supported
    (:func:`maestro_fl.convert.plan_factorization` leaves such a module dense).
    """

    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    out_proj: nn.Module

    def __init__(self, embed_dim: int, num_heads: int, projections: dict[str, nn.Module], dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if sorted(projections) != sorted(ATTENTION_PROJECTIONS):
            raise ValueError(f"projections must be exactly {ATTENTION_PROJECTIONS}, got {sorted(projections)}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        for name in ATTENTION_PROJECTIONS:
            self.add_module(name, projections[name])

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, ranks: dict[str, int], init: Init = "svd",
                   generator: torch.Generator | None = None) -> LoDMultiheadAttention:
        """Split ``mha``'s projections and factorize those named in ``ranks`` at their rank (others stay dense)."""
        projections: dict[str, nn.Module] = {}
        for name, (w, b) in attention_projections(mha).items():
            dense = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                dense.weight.copy_(w)
                if b is not None and dense.bias is not None:
                    dense.bias.copy_(b)
            lod = lod_from_dense(dense, ranks[name], init=init, generator=generator) if name in ranks else None
            projections[name] = dense if lod is None else lod
        return cls(mha.embed_dim, mha.num_heads, projections, dropout=mha.dropout, batch_first=mha.batch_first)

    # -- what PyTorch's fused inference paths read from an attention module (TransformerEncoderLayer's and
    # TransformerEncoder's eval-mode fast paths): the dense weights at the active ranks, never parameters
    _qkv_same_embed_dim = True  # (q, k and v all map embed_dim to embed_dim: their stack is in_proj_weight)
    merge_masks = nn.MultiheadAttention.merge_masks  # (reads only num_heads)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return torch.cat([_dense_of(getattr(self, n)) for n in ATTENTION_PROJECTIONS[:3]])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        biases = [getattr(self, n).bias for n in ATTENTION_PROJECTIONS[:3]]
        return None if any(b is None for b in biases) else torch.cat(biases)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src, h, d = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal is a hint and needs attn_mask (as nn.MultiheadAttention does)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the fused kernel applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            is_causal = is_causal and key_padding_mask is None
        mask = None  # one additive float mask of shape (N, H, L, S), or broadcastable to it
        if attn_mask is not None:
            mask = attn_mask.view(1, 1, tgt, src) if attn_mask.dim() == 2 else attn_mask.view(n, h, tgt, src)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        weights: torch.Tensor | None = None
        if need_weights:  # the weights themselves are asked for: the explicit softmax(QKᵀ/√d + mask)
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p) @ v if p > 0 else weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def attention_refusal(mha: nn.MultiheadAttention) -> str | None:
    """Why an attention module stays dense, or ``None`` when its projections can be factorized."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn: not supported by LoD attention"
    return None


def attention_projections(mha: nn.MultiheadAttention) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``mha``'s four projections as ``(weight, bias)`` (detached views), by :data:`ATTENTION_PROJECTIONS` name."""
    if (refusal := attention_refusal(mha)) is not None:
        raise ValueError(refusal)
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        assert mha.in_proj_weight is not None
        weights = list(mha.in_proj_weight.detach().split(e))
    else:
        weights = [w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    biases: list[torch.Tensor | None] = (list(mha.in_proj_bias.detach().split(e)) if mha.in_proj_bias is not None
                                         else [None, None, None])
    weights.append(mha.out_proj.weight.detach())
    biases.append(None if mha.out_proj.bias is None else mha.out_proj.bias.detach())
    return dict(zip(ATTENTION_PROJECTIONS, zip(weights, biases, strict=True), strict=True))


def _dense_of(layer: nn.Module) -> torch.Tensor:
    assert isinstance(layer, LoDLayer | nn.Linear)  # an attention's projections are one or the other
    return layer.dense_weight() if isinstance(layer, LoDLayer) else layer.weight
