"""Central evaluation (maestro_fl/callbacks.py): every tier's test and validation accuracy at its budget,
each distinct sub-model evaluated once."""

from __future__ import annotations

from pathlib import Path

import pytest

import maestro_fl.callbacks as callbacks
from maestro_fl.callbacks import CentralEvaluation, RoundResult
from maestro_fl.config import SimConfig, resolve
from maestro_fl.federated import check_task
from maestro_fl.training import evaluate


@pytest.mark.parametrize("strategy", ["fedlod", "heterofl"])
def test_tiers_of_one_budget_are_evaluated_once_and_every_tier_gets_its_own_models_numbers(
        tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve(SimConfig, overrides={"model": "mlp", "num_clients": 6, "clients_per_round": 6, "strategy": strategy,
                                         "out_dir": str(tmp_path), "progress": False})
    fed = check_task(cfg)
    table = fed.method.cost_table(None)
    small, full = min(table, key=lambda c: c.fraction), max(table, key=lambda c: c.fraction)
    tiers = {0: small, 1: full, 2: full, 3: small}  # tiers 1-2 and 0, 3 share a budget
    arrays = {k: v.detach().numpy() for k, v in fed.method.template.state_dict().items()}
    calls: list[int] = []

    def counted(*args: object, **kw: object) -> tuple[float, float]:
        calls.append(1)
        return evaluate(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(callbacks, "evaluate", counted)
    central = CentralEvaluation(fed.method, fed.data.test, fed.method.inputs, fed.validation)
    central.on_run_start(1, 1)
    result = RoundResult(round=1, arrays=arrays, clients=[], tier_costs=tiers, train_wall_seconds=0.0,
                         server_seconds=0.0, started=0.0)
    central.after_round(result)
    assert len(calls) == 2 * 2  # two distinct sub-models, test and validation each
    global_model = fed.method.family.global_model(arrays)
    rows = {row["tier"]: row for row in result.tiers}
    assert sorted(rows) == [0, 1, 2, 3]
    for tier, cost in tiers.items():  # each tier's numbers are its own sub-model's, evaluated directly
        model, ranks = fed.method.deploy(global_model, cost)
        loss, acc = evaluate(model, fed.data.test, ranks)
        assert rows[tier]["accuracy"] == acc and rows[tier]["loss"] == pytest.approx(loss)
        assert rows[tier]["params"] == (rows[3 - tier if tier in (0, 3) else tier]["params"])
    assert rows[0]["params"] < rows[1]["params"]
