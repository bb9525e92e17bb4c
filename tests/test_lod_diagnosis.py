"""Issue 21's tools: where FedLoD's accuracy goes (diagnostics), the reference rows, the own-level sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import lod_diagnosis
from analysis.plots import reference_kind
from maestro_fl.convert import factorize, lod_layers
from maestro_fl.data import Split
from maestro_fl.diagnostics import (
    component_holders,
    component_rows,
    component_update_norms,
    factor_keys,
    truncation_drops,
)
from maestro_fl.results import ClientRound, RunDir
from maestro_fl.training import TierLevelSampler
from strategies.sweeps.compare import METHODS, REFERENCES, is_reference_method
from tests.fakes import tiny_mlp
from tests.test_simulation import local, small


def client(ranks: list[int], status: str = "ok") -> ClientRound:
    return ClientRound(round=1, node_id=1, partition_id=0, tier=0, ranks=ranks, status=status)


def test_holders_count_the_accepted_clients_that_held_each_component() -> None:
    clients = [client([2, 3]), client([4, 1]), client([4, 4], status="failed"), client([1, 4])]
    holders = component_holders(clients, ["a", "b"], {"a": 4, "b": 4})
    assert holders["a"].tolist() == [3, 2, 1, 1]  # ranks 2, 4, 1 (the failed client is not counted)
    assert holders["b"].tolist() == [3, 2, 2, 1]  # ranks 3, 1, 4


def test_update_norms_per_component_are_the_factor_rows_and_columns_that_moved() -> None:
    v0, u0 = np.zeros((3, 5), np.float32), np.zeros((4, 3), np.float32)
    v1, u1 = v0.copy(), u0.copy()
    v1[1] = 2.0  # component 2: ||dV[1]||^2 = 5 * 4 = 20
    u1[:, 2] = 1.0  # component 3: ||dU[:, 2]||^2 = 4
    v_key, u_key = factor_keys("layer")
    squared = component_update_norms({v_key: v0, u_key: u0}, {v_key: v1, u_key: u1}, ["layer"])
    assert squared["layer"].tolist() == [0.0, 20.0, 4.0]
    rows = component_rows(7, [client([2])], {v_key: v0, u_key: u0}, {v_key: v1, u_key: u1}, ["layer"])
    assert [r["update_share"] for r in rows] == pytest.approx([0.0, 20 / 24, 4 / 24])
    assert [r["holders"] for r in rows] == [1, 1, 0] and {r["round"] for r in rows} == {7}
    # a shrunk layer has no per-component change: NaN, never a wrong number
    assert np.isnan(component_update_norms({v_key: v0, u_key: u0}, {v_key: v1[:2], u_key: u1[:, :2]},
                                           ["layer"])["layer"]).all()


def test_truncation_drop_is_zero_at_full_rank_and_matches_a_direct_cut() -> None:
    torch.manual_seed(0)
    model = factorize(tiny_mlp(), init="svd")
    x = torch.randn(64, 6)
    data = Split(x, model(x).argmax(-1).detach())  # labels the full model gets right: full accuracy is 1
    names = list(lod_layers(model))
    rows = truncation_drops(model, data, {0: {n: 1 for n in names}, 1: {n: lod_layers(model)[n].max_rank
                                                                          for n in names}})
    full_tier = [r for r in rows if r["tier"] == 1]
    assert all(r["drop"] == 0.0 and r["accuracy"] == 1.0 for r in full_tier)
    from maestro_fl.training import evaluate

    for r in (r for r in rows if r["tier"] == 0):
        assert r["accuracy"] == pytest.approx(evaluate(model, data, {r["layer"]: 1})[1])
        assert r["drop"] == pytest.approx(1.0 - r["accuracy"])


def test_a_diagnosed_run_writes_every_table_and_the_figures(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=3, backend="local", diagnostics_every=2)
    run = tmp_path / "run"
    local(cfg, run)
    comps = pd.read_csv(run / "components.csv")
    clients = pd.read_csv(run / "clients.csv")
    assert sorted(comps["round"].unique()) == [1, 2, 3]
    # one row per component of every LoD layer, every round; shares of a round add up to 1
    ranks = RunDir(run).checkpoint(required=True).arrays
    per_round = sum(int(v.shape[0]) for k, v in ranks.items() if k.endswith("in_network.weight"))
    assert (comps.groupby("round").size() == per_round).all()
    assert np.allclose(comps.groupby("round")["update_share"].sum(), 1.0)
    # the first component of every layer is held by every accepted client
    ok = clients[clients["status"] == "ok"].groupby("round").size()
    first = comps[comps["component"] == 1].groupby("round")["holders"].max()
    assert (first == ok).all()
    ladder = pd.read_csv(run / "ladder_rounds.csv")
    assert sorted(ladder["round"].unique()) == [2, 3]  # every 2nd round and the last
    tiers = pd.read_csv(run / "tiers.csv")
    top = tiers[(tiers["round"] == 3) & (tiers["fraction"] == 1.0)]["accuracy"]
    at_full = ladder[(ladder["round"] == 3) & (ladder["fraction"] == 1.0)]["accuracy"]
    assert float(at_full.iloc[0]) == pytest.approx(float(top.iloc[0]))  # the same model, the same test set
    trunc = pd.read_csv(run / "truncation.csv")
    assert set(trunc["round"]) == {2, 3} and (trunc.loc[trunc["rank"] == trunc["max_rank"], "drop"] == 0).all()
    lod_diagnosis.main([str(run), "--out", str(tmp_path / "fig")])
    for name in ("coverage", "ladder", "truncation"):
        assert (tmp_path / f"fig_{name}.png").stat().st_size > 0


def test_resume_trims_the_diagnosis_tables_with_the_others(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for name in ("components.csv", "ladder_rounds.csv", "truncation.csv"):
        (tmp_path / name).write_text("round,x\n1,a\n2,b\n3,c\n")
    run.trim(2)
    for name in ("components.csv", "ladder_rounds.csv", "truncation.csv"):
        assert (tmp_path / name).read_text() == "round,x\n1,a\n2,b\n"


def test_ignore_budgets_gives_every_client_the_full_model(tmp_path: Path) -> None:
    """The homogeneous bound: the same federation, every device at full rank."""
    run = tmp_path / "bound"
    local(small(tmp_path, backend="local", ignore_budgets=True), run)
    clients = pd.read_csv(run / "clients.csv")
    assert (clients["fraction"] == 1.0).all()
    assert clients["ranks"].nunique() == 1


@pytest.mark.parametrize(("values", "kind"), [({"strategy": "fedavg_dense"}, "dense"),
                                              ({"strategy": "fedavg_exclusive"}, "exclusive"),
                                              ({"strategy": "fjord", "ignore_budgets": True}, "homogeneous"),
                                              ({"strategy": "fedlod", "ignore_budgets": False}, "")])
def test_figures_draw_each_reference_run_as_its_line(tmp_path: Path, values: dict[str, object], kind: str) -> None:
    RunDir(tmp_path).save_config(values)
    assert reference_kind(tmp_path) == kind


def test_the_reference_rows_are_in_compare_and_are_told_apart() -> None:
    assert set(REFERENCES) <= set(METHODS)
    assert all(is_reference_method(METHODS[m]) for m in REFERENCES)
    assert not any(is_reference_method(v) for m, v in METHODS.items() if m not in REFERENCES)


@pytest.mark.parametrize("share", [0.0, 0.5, 0.8])
def test_the_own_level_share_of_the_tiers_sampler(share: float) -> None:
    levels = [{"a": 1}, {"a": 2}, {"a": 4}]
    sampler = TierLevelSampler({"a": 4}, torch.Generator().manual_seed(0), levels, top_share=share)
    draws = [sampler()["a"] for _ in range(6000)]
    own = draws.count(4) / len(draws)
    expected = share if share > 0 else 1 / 3
    assert own == pytest.approx(expected, abs=0.03)
    lower = [d for d in draws if d != 4]
    assert lower.count(1) / len(lower) == pytest.approx(0.5, abs=0.04)  # the lower levels stay uniform


# -- per-layer ranks by importance (Maestro's layer granularity) ----------------------------------------------
def _factors(ranks: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, r in ranks.items():
        v_key, u_key = factor_keys(name)
        scale = np.linspace(2.0, 0.1, r)[:, None]  # importance falls along the ranks, as after an SVD
        out[v_key] = (rng.normal(size=(r, 6)) * scale).astype(np.float32)
        out[u_key] = (rng.normal(size=(5, r)) * scale.T).astype(np.float32)
    return out


def test_importance_ranks_are_nested_within_budget_and_never_starve_a_layer() -> None:
    from maestro_fl.submodels import importance_ranks

    arrays = _factors({"a": 8, "b": 16})
    cost = {"a": 1.0, "b": 3.0}
    table = importance_ranks(arrays, cost, fractions=(0.25, 0.5, 0.75, 1.0))
    previous = {"a": 0, "b": 0}
    for p in sorted(table):
        ranks = table[p]
        uniform = {"a": int(np.ceil(p * 8)), "b": int(np.ceil(p * 16))}
        assert all(ranks[n] >= previous[n] for n in ranks)  # a larger budget holds every smaller one's ranks
        assert sum(ranks[n] * cost[n] for n in ranks) <= sum(uniform[n] * cost[n] for n in uniform) + 1e-9
        assert ranks["a"] >= int(np.ceil(p / 2 * 8)) and ranks["b"] >= int(np.ceil(p / 2 * 16))
        previous = ranks
    assert table[1.0] == {"a": 8, "b": 16}


def test_importance_ranks_spend_the_budget_where_components_matter() -> None:
    from maestro_fl.submodels import importance_ranks

    arrays = _factors({"a": 8, "b": 8})
    v_key, u_key = factor_keys("b")
    arrays[v_key] *= 0.01  # layer b's components hardly matter
    table = importance_ranks(arrays, {"a": 1.0, "b": 1.0}, fractions=(0.5,))
    assert table[0.5] == {"a": 6, "b": 2}  # b keeps half its uniform rank (2 of 4); a takes the rest of b's share


def test_importance_allocation_runs_a_federation_with_per_layer_ranks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    local(small(tmp_path, backend="local", rounds=2, rank_allocation="importance", model="cnn", devices="",
                tier_shares=(0.5, 0.5), compute_budget_s=4.0), run)
    tiers = pd.read_csv(run / "tiers.csv")
    ranks = [tuple(int(r) for r in str(v).split()) for v in tiers["ranks"]]
    assert any(len(set(np.array(r) / np.array(ranks[-1]))) > 1 for r in ranks)  # not one fraction for every layer
    clients = pd.read_csv(run / "clients.csv")
    assert (clients["status"] == "ok").all()
