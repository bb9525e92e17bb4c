"""docs/adding_a_method.md's example, run: a new method with one option is its module and one registry line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from maestro_fl import catalog
from maestro_fl.config import ConfigError
from maestro_fl.federated import federation
from maestro_fl.methods import LocalTraining
from strategies.sweeps.compare import compared_methods
from tests.test_simulation import local, small

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fedprox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The page's module, saved where Python finds it, and its one registry line (the catalog's entry)."""
    page = (ROOT / "docs" / "adding_a_method.md").read_text()
    module, registry_line = re.findall(r"```python\n(.*?)```", page, flags=re.S)[:2]
    (tmp_path / "toy_fedprox.py").write_text(module.replace("maestro_fl.methods.fedprox", "toy_fedprox"))
    monkeypatch.syspath_prepend(str(tmp_path))
    name, reference = (s.strip().strip('",') for s in registry_line.strip().rstrip(",").split(":", 1))
    assert reference == "maestro_fl.methods.fedprox:FedProx"  # the line the page tells a developer to add
    monkeypatch.setitem(catalog.METHOD_CLASSES, name, "toy_fedprox:FedProx")
    yield name
    sys.modules.pop("toy_fedprox", None)


def test_the_pages_method_runs_with_its_option_and_is_compared(fedprox: str, tmp_path: Path) -> None:
    cfg = small(tmp_path, strategy=fedprox, backend="local", rounds=2, **{"method.mu": 0.5})
    assert cfg.method == ("mu=0.5",)
    method = federation(cfg).method
    assert method.params.mu == 0.5
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert (clients["status"] == "ok").all() and len(clients) > 0
    assert {"fedprox", "fedprox_strong"} <= set(compared_methods())  # compare lists it and its variant


def test_the_option_reaches_the_clients_training(fedprox: str, tmp_path: Path) -> None:
    """The proximal term changes local training: the same client, round and data, mu 0 against mu 10."""
    trained = []
    for mu in (0.0, 10.0):
        cfg = small(tmp_path, strategy=fedprox, backend="local", **{"method.mu": mu})
        fed = federation(cfg)
        method = fed.method
        assignment = method.assign(method.cost_table()[0], method.cost_table())
        model = method.client_model(assignment)
        model.load_state_dict(method.template.state_dict())
        result = method.train(model, fed.client_split(0)[0], assignment,
                              LocalTraining(epochs=2, lr=cfg.lr, generator=torch.Generator().manual_seed(0)))
        trained.append({k: v.clone() for k, v in result.model.state_dict().items()})
    start = method.template.state_dict()
    moved = [sum(float((t[k] - start[k]).norm()) for k in start) for t in trained]
    assert moved[1] < moved[0]  # mu pulls the client towards the model it received


def test_a_bad_option_is_refused_naming_it(fedprox: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method\.mu must be >= 0"):
        federation(small(tmp_path, strategy=fedprox, **{"method.mu": -1.0}))
    with pytest.raises(ConfigError, match=r"method\.nu: strategy 'fedprox' has no option 'nu' \(did you mean method\.mu\?\)"):
        federation(small(tmp_path, strategy=fedprox, **{"method.nu": 1.0}))


def test_method_options_from_a_file_the_command_line_and_a_run_config_agree(tmp_path: Path) -> None:
    from maestro_fl.config import SimConfig, resolve, to_dict
    from maestro_fl.methods import METHODS

    file = tmp_path / "run.toml"
    file.write_text('strategy = "flanc"\n[method]\nbasis = 0.5\northogonality = 1\n')
    cfg = resolve(SimConfig, file, ["method.orthogonality=2.5"])  # the command line wins over the file
    assert cfg.method == ("basis=0.5", "orthogonality=2.5")
    params = METHODS["flanc"].parse_params(cfg)
    assert (params.basis, params.orthogonality) == (0.5, 2.5)
    assert resolve(SimConfig, overrides=to_dict(cfg)) == cfg  # config.json, as a resumed run or a client reads it
    assert resolve(SimConfig, overrides={"strategy": "flanc", "method": "basis=0.5,orthogonality=2.5"}) == cfg
    with pytest.raises(ConfigError, match=r"method\.basis must be a number, got 'wide'"):
        METHODS["flanc"].parse_params(resolve(SimConfig, overrides=["strategy=flanc", "method.basis=wide"]))
