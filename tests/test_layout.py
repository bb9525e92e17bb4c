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


#: the one place outside analysis/ that may import it: the `maestro-fl report` command
REPORT_COMMAND = "strategies/cli/main.py"


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("maestro_fl", {"flwr", "strategies", "clients", "analysis"}),
        ("strategies", {"clients", "analysis"}),
        ("clients", {"strategies", "analysis"}),
    ],
)
def test_import_rules(package: str, forbidden: set[str]) -> None:
    files = imported_top_levels(package)
    assert files, f"no python files under {package}"
    bad = {
        f: sorted(names & forbidden - ({"analysis"} if f == REPORT_COMMAND else set()))
        for f, names in files.items()
    }
    bad = {f: names for f, names in bad.items() if names}
    assert not bad, f"{package} must not import {sorted(forbidden)}: {bad}"


def test_strategies_holds_only_strategies_at_its_top_level() -> None:
    """What is not a strategy (Python API, command line, runners, sweeps) lives in a subpackage that says what it is."""
    top = sorted(p.name for p in (ROOT / "strategies").glob("*.py"))
    assert top == ["__init__.py", "server_app.py", "submodel.py"]
    assert {p.name for p in (ROOT / "strategies").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "api", "cli", "runners", "sweeps"}


def test_flower_app_config_mirrors_simconfig() -> None:
    """`flwr run .` reads [tool.flwr.app.config]; it must hold every SimConfig field at its default."""
    import dataclasses
    import tomllib

    from maestro_fl.config import SimConfig, resolve

    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(SimConfig)}
    assert set(app_config) == fields
    assert resolve(SimConfig, overrides={k.replace("-", "_"): v for k, v in app_config.items()}) == SimConfig()


def test_every_method_is_a_config_strategy_and_the_flower_side_never_names_one() -> None:
    """Methods live in maestro_fl.methods only: no strategy name appears in strategies/ or clients/."""
    from maestro_fl.config import strategies
    from maestro_fl.methods import METHODS

    assert strategies() == tuple(METHODS)
    for package in ("strategies", "clients"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parent.name == "sweeps":  # the comparison lists the methods it runs, as configs
                continue
            text = path.read_text()
            named = [m for m in METHODS if f'"{m}"' in text or f"'{m}'" in text]
            assert not named, f"{path.relative_to(ROOT)} branches on methods {named}"


def test_the_run_directory_reference_is_generated_from_the_schema() -> None:
    """docs/run_directory.md is maestro_fl.results.schema_markdown(): regenerate it when the schema changes."""
    from maestro_fl.results import schema_markdown

    assert (ROOT / "docs" / "run_directory.md").read_text() == schema_markdown()
