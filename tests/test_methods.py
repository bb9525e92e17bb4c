"""Every method through the same tiny federation: one table, one line per method.

Each row runs a real federation on the in-process grid (the ClientApp, the
generic strategy, the method's trainer and server rule) and checks what every
method must satisfy: every tier is evaluated, clients move exactly the bytes of
their sub-model, and the MACs a client reports equal what the budget's cost
model predicted for its sub-model (the same compute for every method).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from maestro_fl.convert import lod_layers
from maestro_fl.federated import federation
from maestro_fl.submodels import RankPrefix, RankWidthPrefix
from strategies.sweeps.compare import METHODS as COMPARED
from tests.test_simulation import local, small

#: (strategy, config overrides): every method and variant ``maestro-fl compare`` runs (derived from the
#: registry, so a method added there runs every test below), and the options no variant covers
METHOD_TABLE: list[tuple[str, dict[str, object]]] = [
    (str(values.get("strategy", "fedlod")), {k: v for k, v in values.items() if k != "strategy"})
    for values in COMPARED.values()
] + [
    ("fedlod", {"full_pass": True}),
]
IDS = [s + "".join(f"-{k}={v}" for k, v in extra.items()) for s, extra in METHOD_TABLE]


@pytest.fixture(scope="module", params=METHOD_TABLE, ids=IDS)
def finished(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 2-round run of the method on 6 clients of two tiers (rank fractions 0.25 and 1)."""
    strategy, extra = request.param
    tmp = tmp_path_factory.mktemp(strategy)
    cfg = small(tmp, strategy=strategy, backend="local", rounds=2, model="cnn", **extra)
    local(cfg, tmp / "run")
    return cfg, tmp / "run"


def test_every_method_runs_end_to_end(finished) -> None:  # type: ignore[no-untyped-def]
    cfg, run = finished
    clients = pd.read_csv(run / "clients.csv", keep_default_na=False)
    tiers = pd.read_csv(run / "tiers.csv")
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2]
    served = sorted(clients.loc[clients["status"] == "ok", "tier"].unique())
    expected = [1] if cfg.strategy == "fedavg_exclusive" else [0, 1]  # the 0.25 tier cannot hold the dense model
    assert served == expected
    assert set(clients["status"]) <= {"ok", "unaffordable"}
    assert sorted(tiers.loc[tiers["round"] == 2, "tier"]) == expected
    ok = clients[clients["status"] == "ok"]
    assert (ok["bytes_up"] == ok["bytes_down"]).all()  # the reply has the shapes it was sent
    assert (tiers["accuracy"].between(0, 1)).all() and tiers["loss"].notna().all()


def cost_of_row(method, table, row):  # type: ignore[no-untyped-def]
    """The server's cost of the sub-model a clients.csv row trained: per-layer ranks (rank_allocation=importance)
    are re-chosen every round, so a rank family's entry is rebuilt from the row's ranks, not its fraction."""
    family, ranks, fraction = method.family, str(row["ranks"]).split(), float(row["fraction"])
    narrowed = isinstance(family, RankWidthPrefix) and family.width_of(fraction) < 1.0
    if ranks and isinstance(family, RankPrefix) and not narrowed:
        names = list(lod_layers(method.template))
        cost = family.cost_of(float(row["fraction"]), dict(zip(names, map(int, ranks))))
        return dataclasses.replace(cost, passes=method.passes, live_graphs=method.live_graphs)
    return table[[c.fraction for c in table].index(float(row["fraction"]))]


def test_the_budgets_compute_model_and_the_clients_reported_macs_agree(finished) -> None:  # type: ignore[no-untyped-def]
    """What the server budgeted for a client's sub-model is what the client reports it spent (within 1%)."""
    cfg, run = finished
    method = federation(cfg).method
    table = method.cost_table()
    clients = pd.read_csv(run / "clients.csv", keep_default_na=False)
    ok = clients[clients["status"] == "ok"]
    assert len(ok) > 0
    for _, row in ok.iterrows():
        predicted = cost_of_row(method, table, row).train_macs(int(row["num_examples"]), cfg.local_epochs)
        assert row["macs"] == pytest.approx(predicted, rel=0.01), (row["partition_id"], row["fraction"])
    passes = 2 if cfg.full_pass or cfg.strategy == "dlrt" else 1
    assert all(c.passes == passes for c in table)


def test_bytes_are_what_each_tier_holds(finished) -> None:  # type: ignore[no-untyped-def]
    """Bytes per client are the bytes of the arrays its sub-model holds (its index into the global model)."""
    cfg, run = finished
    fed = federation(cfg)
    method = fed.method
    clients = pd.read_csv(run / "clients.csv", keep_default_na=False)
    ok = clients[clients["status"] == "ok"]
    table = method.cost_table()
    for _, row in ok.iterrows():
        model = method.client_model(method.assign(cost_of_row(method, table, row), list(table)))
        held = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        assert row["bytes_down"] == held


def test_the_table_runs_every_registered_method() -> None:
    """A method added to the registry is in this table, so it runs every test here."""
    from maestro_fl.methods import METHODS

    assert set(METHODS) <= {strategy for strategy, _ in METHOD_TABLE}
    assert len(METHOD_TABLE) == len({(s, tuple(sorted(e.items()))) for s, e in METHOD_TABLE})  # no run twice
