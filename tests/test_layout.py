"""The import rules of the layout: the core never imports Flower; servers and clients share only the core."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_levels(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(
    "package,forbidden",
    [("maestro_fl", {"flwr", "strategies", "clients", "analysis"}), ("strategies", {"clients"}), ("clients", {"strategies"})],
)
def test_import_rules(package: str, forbidden: set[str]) -> None:
    files = imported_top_levels(package)
    assert files, f"no python files under {package}"
    bad = {f: sorted(names & forbidden) for f, names in files.items() if names & forbidden}
    assert not bad, f"{package} must not import {sorted(forbidden)}: {bad}"


def test_flower_app_config_mirrors_simconfig() -> None:
    """`flwr run .` reads [tool.flwr.app.config]; it must hold every SimConfig field at its default."""
    import dataclasses
    import tomllib

    from maestro_fl.config import SimConfig, resolve

    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(SimConfig)}
    assert set(app_config) == fields
    assert resolve(SimConfig, overrides={k.replace("-", "_"): v for k, v in app_config.items()}) == SimConfig()


def test_strategy_registry_matches_the_config() -> None:
    from maestro_fl.config import STRATEGIES
    from strategies.baselines import STRATEGY_CLASSES

    assert tuple(STRATEGY_CLASSES) == STRATEGIES
