"""The cheap client path gives the tables of the fresh one: a module reused per sub-model shape trains as a new one."""

from __future__ import annotations

from pathlib import Path

import pytest

from maestro_fl.methods import METHODS, FederatedMethod
from tests.test_ray_engine import assert_same_tables
from tests.test_simulation import local, small


def fresh_client_model(self: FederatedMethod, assignment):  # type: ignore[no-untyped-def]
    """What the ClientApp did before the speed work: a new module for every message."""
    return self.family.client_model(assignment.fraction, assignment.ranks)


CASES = [(s, "mlp") for s in sorted(METHODS)] + [("fedlod", "cnn"), ("fjord", "cnn")]  # convolutions and norms too


@pytest.mark.parametrize(("strategy", "model"), CASES)
def test_reused_client_models_give_the_tables_of_fresh_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, model: str
) -> None:
    """Reused, fresh, then reused again: modules left by an earlier run or client change nothing."""
    cfg = small(tmp_path, model=model, strategy=strategy, backend="local", local_epochs=2, rounds=2)
    local(cfg, tmp_path / "reused")
    with monkeypatch.context() as patch:
        patch.setattr(FederatedMethod, "client_model", fresh_client_model)
        local(cfg, tmp_path / "fresh")
    local(cfg, tmp_path / "reused_again")
    assert_same_tables(tmp_path / "reused", tmp_path / "fresh")
    assert_same_tables(tmp_path / "reused_again", tmp_path / "fresh")
