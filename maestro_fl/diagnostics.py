"""Where a LoD federation's accuracy goes: coverage, update shares, the whole rank ladder, per-layer cuts.

Three measurements, each a pure function of the round's arrays and clients,
and one callback (:class:`LoDDiagnostics`) that writes them as the run goes:

* :func:`component_holders` and :func:`component_update_norms`: per LoD
  layer and rank component, how many accepted clients held it this round and
  how far the server's merge moved it (``components.csv``). Ordered dropout
  (Maestro, Horváth et al., ICML 2024, arXiv 2308.14929; FjORD, Horváth et
  al., NeurIPS 2021) makes the leading components shared by every client and
  the trailing ones held by the largest devices only: this shows how much
  training each actually gets.
* :func:`ladder_accuracy`: the global model cut at every rank fraction, not
  only at the tiers' ranks (``ladder_rounds.csv``), every few rounds.
* :func:`truncation_drops`: for each tier, the accuracy lost when *one* layer
  is cut to the tier's rank and the others stay at full rank
  (``truncation.csv``): which layers a tier's lost accuracy sits in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from .budget import Cost
from .callbacks import RoundCallback, RoundResult
from .convert import lod_layers, ranks_at
from .data import Split
from .footprint import Inputs, footprint
from .methods import FederatedMethod
from .results import COMPONENTS, LADDER_ROUNDS, TRUNCATION, ClientRound, RunDir
from .training import evaluate

#: the rank fractions the ladder is measured at: fine at the small end, where tiers differ most
LADDER_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def factor_keys(layer: str) -> tuple[str, str]:
    """The state-dict keys of a LoD layer's ordered factors: ``V`` (``r × fan_in``) and ``U`` (``fan_out × r``)."""
    return f"{layer}.in_network.weight", f"{layer}.out_network.weight"


def component_holders(clients: Sequence[ClientRound], layer_names: Sequence[str],
                      max_ranks: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per LoD layer, how many accepted clients held each rank component (a client of rank ``r`` holds 1..r)."""
    counts = {name: np.zeros(max_ranks[name], dtype=np.int64) for name in layer_names}
    for client in clients:
        if client.status != "ok" or len(client.ranks) != len(layer_names):
            continue
        for name, rank in zip(layer_names, client.ranks):
            counts[name][: min(int(rank), max_ranks[name])] += 1
    return counts


def component_update_norms(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                           layer_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per LoD layer, ``‖ΔU[:, j]‖² + ‖ΔV[j]‖²`` for each component ``j`` (squared; NaN where the rank changed)."""
    out: dict[str, np.ndarray] = {}
    for name in layer_names:
        v_key, u_key = factor_keys(name)
        v0, v1, u0, u1 = before[v_key], after[v_key], before[u_key], after[u_key]
        if v0.shape != v1.shape or u0.shape != u1.shape:  # the server shrank the layer: no per-component change
            out[name] = np.full(v1.shape[0], np.nan)
            continue
        dv = (v1.astype(np.float64) - v0).reshape(v1.shape[0], -1)
        du = np.moveaxis(u1.astype(np.float64) - u0, 1, 0).reshape(u1.shape[1], -1)
        out[name] = (dv**2).sum(axis=1) + (du**2).sum(axis=1)
    return out


def component_rows(round_: int, clients: Sequence[ClientRound], before: Mapping[str, np.ndarray] | None,
                   after: Mapping[str, np.ndarray], layer_names: Sequence[str]) -> list[dict[str, Any]]:
    """The ``components.csv`` rows of one round (update columns NaN when the previous model is unknown)."""
    max_ranks = {n: int(after[factor_keys(n)[0]].shape[0]) for n in layer_names}
    holders = component_holders(clients, layer_names, max_ranks)
    squared = component_update_norms(before, after, layer_names) if before is not None else {
        n: np.full(max_ranks[n], np.nan) for n in layer_names}
    total = float(np.nansum([v.sum() for v in squared.values()]))
    rows = []
    for name in layer_names:
        for j in range(max_ranks[name]):
            sq = float(squared[name][j])
            rows.append({"round": round_, "layer": name, "component": j + 1, "holders": int(holders[name][j]),
                         "update_norm": float(np.sqrt(sq)), "update_share": sq / total if total > 0 else float("nan")})
    return rows


def ladder_accuracy(model: nn.Module, test: Split, validation: Split | None, inputs: Inputs,
                    fractions: Sequence[float] = LADDER_FRACTIONS, allocation: str = "uniform") -> list[dict[str, Any]]:
    """The global LoD model cut at each rank fraction (under the run's rank rule): test and validation accuracy,
    parameters."""
    rows = []
    for p in sorted(set(fractions)):
        ranks = ranks_at(model, p, allocation)
        acc = evaluate(model, test, ranks)[1]
        val = evaluate(model, validation, ranks)[1] if validation is not None and len(validation) else float("nan")
        rows.append({"fraction": p, "accuracy": acc, "val_accuracy": val, "params": footprint(model, inputs,
                                                                                              ranks).params})
    return rows


def truncation_drops(model: nn.Module, test: Split, tier_ranks: Mapping[int, Mapping[str, int]]) -> list[dict[str, Any]]:
    """For each tier and LoD layer: the accuracy with only that layer at the tier's rank, and the drop from full rank.

    The drops of one tier need not add up to its whole loss (layers interact),
    but they rank the layers by how much of it each causes alone.
    """
    full = evaluate(model, test, None)[1]
    layers = lod_layers(model)
    rows = []
    for tier, ranks in tier_ranks.items():
        for name, layer in layers.items():
            rank = int(ranks.get(name, layer.max_rank))
            acc = full if rank >= layer.max_rank else evaluate(model, test, {name: rank})[1]
            rows.append({"tier": tier, "layer": name, "rank": rank, "max_rank": layer.max_rank, "accuracy": acc,
                         "drop": full - acc})
    return rows


class LoDDiagnostics(RoundCallback):
    """A round callback writing the three diagnoses of a LoD run.

    ``components.csv`` every round; ``ladder_rounds.csv`` and ``truncation.csv``
    every ``every`` rounds and at the last. Tiers whose sub-model is narrower
    than the global model (the width floor) have no rank cut to diagnose and
    are left out of ``truncation.csv``.
    """

    def __init__(self, method: FederatedMethod, run: RunDir, test: Split, validation: Split | None, inputs: Inputs,
                 every: int, last_round: int) -> None:
        self.method, self.test, self.validation, self.inputs = method, test, validation, inputs
        self.every, self.last_round = every, last_round
        self.layer_names = tuple(lod_layers(method.template))
        self.writers = {t.file: run.writer(t) for t in (COMPONENTS, LADDER_ROUNDS, TRUNCATION)}

    def on_run_start(self, first_round: int, last_round: int) -> None:
        self.last_round = last_round

    def after_round(self, result: RoundResult) -> bool:
        if not self.layer_names:
            return False
        self.writers[COMPONENTS.file].extend(
            component_rows(result.round, result.clients, result.before, result.arrays, self.layer_names))
        if result.round % self.every and result.round != self.last_round:
            return False
        model = self.method.family.global_model(result.arrays)
        ladder = ladder_accuracy(model, self.test, self.validation, self.inputs, allocation=self.method.rank_allocation)
        self.writers[LADDER_ROUNDS.file].extend({"round": result.round} | row for row in ladder)
        tier_ranks = self._rank_cut_tiers(model, result.tier_costs)
        self.writers[TRUNCATION.file].extend(
            {"round": result.round} | row for row in truncation_drops(model, self.test, tier_ranks))
        return False

    def _rank_cut_tiers(self, model: nn.Module, tier_costs: Mapping[int, Cost]) -> dict[int, dict[str, int]]:
        out = {}
        for tier, cost in tier_costs.items():
            deployed, ranks = self.method.deploy(model, cost)
            if deployed is model and ranks:
                out[tier] = dict(ranks)
        return out


