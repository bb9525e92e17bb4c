"""LoD attention: nn.MultiheadAttention (and so PyTorch's transformer layers) factorized, with unchanged outputs
and counted footprints (issue "Language: ... LoD transformers")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maestro_fl.convert import (
    active_ranks,
    extract,
    factorize,
    lod_layers,
    plan_factorization,
    ranks_at,
    ranks_at_fraction,
    truncate,
)
from maestro_fl.footprint import MISSING_FLOP_FORMULAS, footprint
from maestro_fl.layers import ATTENTION_PROJECTIONS, LoDLinear, LoDMultiheadAttention
from maestro_fl.models import InputSpec

E, HEADS, FFN, L, N = 16, 4, 32, 5, 3


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def sequence(batch_first: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((N, L, E) if batch_first else (L, N, E), generator=g)


CALLS = {  # nn.MultiheadAttention's keyword arguments, every mask path
    "weights averaged": {},
    "no weights (fused kernel)": {"need_weights": False},
    "causal hint": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True,
                    "need_weights": False},
    "padding": {"key_padding_mask": torch.tensor([[False] * 3 + [True] * 2] + [[False] * L] * (N - 1))},
    "bool mask, weights per head": {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1),
                                    "average_attn_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_attention_factorized_at_full_rank_gives_the_same_outputs_and_weights(batch_first: bool, mode: str,
                                                                              call: str) -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.MultiheadAttention(E, HEADS, batch_first=batch_first))
    lod = factorize(copy.deepcopy(dense))
    assert isinstance(lod[0], LoDMultiheadAttention)
    assert sorted(lod_layers(lod)) == sorted(f"0.{p}" for p in ATTENTION_PROJECTIONS)
    dense.train(mode == "train")
    lod.train(mode == "train")
    x = sequence(batch_first)
    (out, weights), (want, want_weights) = lod[0](x, x, x, **CALLS[call]), dense[0](x, x, x, **CALLS[call])
    close(out, want)
    assert (weights is None) == (want_weights is None)
    if want_weights is not None:
        assert weights is not None
        close(weights, want_weights)


def test_an_unbatched_sequence_and_separate_key_value_inputs_match() -> None:
    torch.manual_seed(1)
    dense = nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=8, vdim=12)).eval()
    lod = factorize(copy.deepcopy(dense)).eval()
    q, k, v = torch.randn(L, E), torch.randn(7, 8), torch.randn(7, 12)
    out, weights = lod[0](q, k, v)
    want, want_weights = dense[0](q, k, v)
    close(out, want)
    assert weights is not None and want_weights is not None
    close(weights, want_weights)
    assert lod[0].k_proj.in_features == 8 and lod[0].v_proj.in_features == 12


def encoder(batch_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, HEADS, FFN, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def decoder(batch_first: bool) -> nn.Module:
    return nn.TransformerDecoderLayer(E, HEADS, FFN, dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("build", [encoder, decoder], ids=["encoder", "decoder"])
def test_transformer_layers_are_factorized_everywhere_with_unchanged_outputs(build, batch_first: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    dense = build(batch_first)
    lod = factorize(copy.deepcopy(dense))
    attentions = [m for m in dense.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attentions and not any(isinstance(m, nn.MultiheadAttention) for m in lod.modules())
    linears = [m for m in dense.modules() if type(m) is nn.Linear]
    assert len(lod_layers(lod)) == 4 * len(attentions) + len(linears)  # attention's four and the FFN's two
    x = sequence(batch_first)
    args = (x,) if build is encoder else (x, sequence(batch_first, seed=1))
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    kwargs = {"mask": mask, "is_causal": True} if build is encoder else {"tgt_mask": mask, "tgt_is_causal": True}
    for mode in ("train", "eval"):
        dense.train(mode == "train")
        lod.train(mode == "train")
        close(lod(*args), dense(*args))
        close(lod(*args, **kwargs), dense(*args, **kwargs))
        with torch.no_grad():  # eval here takes PyTorch's fused inference path, which reads the dense weights
            close(lod(*args), dense(*args))
    lod.train()
    lod(*args).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lod.parameters())


def test_the_fused_nested_tensor_path_of_an_encoder_gives_the_lod_models_outputs() -> None:
    torch.manual_seed(3)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, FFN, dropout=0.0, batch_first=True), 2)
    lod = factorize(copy.deepcopy(dense))
    ranks = ranks_at_fraction(lod, 0.5)
    x, padding = sequence(True), torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    lod.eval()
    with active_ranks(lod, ranks):
        slow = lod(x, src_key_padding_mask=padding)  # autograd on: the layer-by-layer path
        with torch.no_grad():
            fused = lod(x, src_key_padding_mask=padding)
    close(fused[~padding], slow[~padding])  # (the fused path zeroes padded positions)


class CharModel(nn.Module):
    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, E)
        self.encoder = encoder(batch_first=True)
        self.head = nn.Linear(E, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def test_plan_and_factorize_agree_on_what_is_factorized_and_at_which_rank() -> None:
    model = CharModel()
    plan = plan_factorization(model, 0.25)
    planned = {d.name: d.rank for d in plan.factorized}
    lod = factorize(model, 0.25)
    assert planned == {name: layer.max_rank for name, layer in lod_layers(lod).items()}
    assert "encoder.layers.1.self_attn.v_proj" in planned


@pytest.mark.parametrize("length", [6, 20])
def test_attention_macs_are_counted_at_every_sequence_length(length: int) -> None:
    """The footprint's MACs against a hand count and against FlopCounterMode, at two sequence lengths: the
    projections grow with L, the attention itself (QKᵀ and the weighted sum of V, per head) with L²."""
    spec = InputSpec((length,), 30, "int64", 30)
    dense = CharModel()
    per_layer = length * (4 * E * E + 2 * E * FFN) + 2 * length * length * E
    hand = 2 * per_layer + length * E * 30
    assert footprint(dense, spec).macs == hand
    with FlopCounterMode(display=False, custom_mapping=MISSING_FLOP_FORMULAS) as counter:
        dense.train()(spec.example(2))
    assert counter.get_total_flops() // 2 // 2 == hand
    lod = factorize(copy.deepcopy(dense))
    ranks = ranks_at_fraction(lod, 0.25)
    small = footprint(lod, spec, ranks)
    r = 4  # ⌈0.25 · 16⌉ for every projection and both FFN layers
    lod_layer = length * (4 * r * 2 * E + 2 * r * (E + FFN)) + 2 * length * length * E
    head_r = 4  # ⌈0.25 · min(16, 30)⌉
    assert small.macs == 2 * lod_layer + length * head_r * (E + 30)
    attention_rows = [row for row in small.rows() if row["name"].endswith("self_attn")]
    assert [row["macs"] for row in attention_rows] == [2 * length * length * E] * 2
    deployed = extract(lod, ranks)
    assert small.params == sum(p.numel() for p in deployed.parameters())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in deployed.modules())
    assert isinstance(deployed.encoder.layers[0].self_attn.q_proj, LoDLinear)


@pytest.mark.parametrize("length", [6, 20])
def test_attention_activations_count_in_the_memory_budget_at_every_sequence_length(length: int) -> None:
    """Values kept for backward, per sample, against a hand count of one encoder layer's every output."""
    from maestro_fl.budget import activation_count

    class OneLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, E)
            self.layer = nn.TransformerEncoderLayer(E, HEADS, FFN, dropout=0.0, batch_first=True)
            self.head = nn.Linear(E, 30)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layer(self.embed(x)))

    spec, le = InputSpec((length,), 30, "int64", 30), length * E
    # embedding, two norms, three dropouts (one FFN-wide), linear1, linear2, head
    around = le + 2 * le + (2 * le + length * FFN) + length * FFN + le + length * 30
    kernel = le + HEADS * length  # the fused attention's output and log-sum-exp
    dense = OneLayer()
    assert activation_count(dense, spec) == around + kernel + 4 * le  # + nn.MultiheadAttention's Q, K, V, output
    lod = factorize(copy.deepcopy(dense))
    r = E  # full rank: each LoD layer also keeps its rank-r inner map, one per position
    assert activation_count(lod, spec) == around + kernel + 4 * le + 7 * length * r
    ranks = ranks_at_fraction(lod, 0.25)
    assert activation_count(lod, spec, ranks) == around + kernel + 4 * le + 7 * length * 4


def dense_shares(model: nn.Module, ranks: dict[str, int]) -> tuple[float, float]:
    """(attention projections', FFN layers') kept share of their dense weights at ``ranks``."""
    kept, dense = {True: 0, False: 0}, {True: 0, False: 0}
    for name, layer in lod_layers(model).items():
        if name == "head":  # the classifier is neither
            continue
        is_attention = name.rpartition(".")[2] in ATTENTION_PROJECTIONS
        kept[is_attention] += ranks[name] * (layer.fan_in + layer.fan_out)
        dense[is_attention] += layer.fan_in * layer.fan_out
    return kept[True] / dense[True], kept[False] / dense[False]


def char_model(length: int = 20) -> nn.Module:
    from maestro_fl.models import build_model

    return factorize(build_model("char_transformer", InputSpec((length,), 12, "int64", 12)), init="random",
                     generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", [lambda: factorize(encoder(True)), char_model], ids=["encoder", "char_transformer"])
def test_dense_share_keeps_every_layer_within_one_component_of_the_budgets_share(build) -> None:  # type: ignore[no-untyped-def]
    """One rank fraction keeps 2p of a square projection but 1.5p of a 1:2 FFN layer; dense_share keeps p of each,
    rounded up to whole rank components, nested, and full rank at p = 1."""
    model = build()
    layers = lod_layers(model)
    uniform_attention, uniform_ffn = dense_shares(model, ranks_at_fraction(model, 0.25))
    assert uniform_attention == pytest.approx(0.5) and uniform_attention > uniform_ffn  # the bias dense_share removes
    previous: dict[str, int] | None = None
    for p in (0.05, 0.1, 0.15, 0.25, 0.4, 0.7, 0.95):
        ranks = ranks_at(model, p, "dense_share")
        for name, layer in layers.items():
            one = (layer.fan_in + layer.fan_out) / (layer.fan_in * layer.fan_out)  # one component's share
            share = ranks[name] * one
            assert share >= p - 1e-9 or ranks[name] == layer.max_rank, (p, name)
            assert share < p + one or ranks[name] == 1, (p, name, share)
        attention, ffn = dense_shares(model, ranks)
        assert abs(attention - ffn) < max((lay.fan_in + lay.fan_out) / (lay.fan_in * lay.fan_out)
                                          for lay in layers.values())
        if previous is not None:  # nested: a larger budget's ranks contain the smaller one's
            assert all(ranks[n] >= previous[n] for n in ranks)
        previous = ranks
    assert ranks_at(model, 1.0, "dense_share") == {n: layer.max_rank for n, layer in layers.items()}


def test_at_the_smallest_budget_the_zoo_transformers_attention_keeps_no_more_of_its_weights_than_the_ffn() -> None:
    from maestro_fl.budget import FRACTION_GRID

    model = char_model(80)  # Shakespeare's windows
    smallest = min(FRACTION_GRID)
    attention, ffn = dense_shares(model, ranks_at(model, smallest, "dense_share"))
    assert attention <= ffn, (attention, ffn)
    attention, ffn = dense_shares(model, ranks_at_fraction(model, smallest))
    assert attention > ffn  # and the uniform rule's does not hold it


def test_dense_share_of_a_truncated_layer_scales_with_its_rank_as_the_uniform_rule_does() -> None:
    model = char_model()
    name = "blocks.1.ffn.0"
    layer = lod_layers(model)[name]
    halved = truncate(model, {name: layer.max_rank // 2})
    before, after = ranks_at(model, 0.5, "dense_share")[name], ranks_at(halved, 0.5, "dense_share")[name]
    assert abs(after - before / 2) <= 1
    assert ranks_at(halved, 1.0, "dense_share")[name] == layer.max_rank // 2
