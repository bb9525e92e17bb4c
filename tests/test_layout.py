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
    assert top == ["__init__.py", "server_app.py", "submodel_strategy.py"]
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


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (both can close a cycle)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for pkg in ("maestro_fl", "strategies", "clients", "analysis")
               for p in (ROOT / pkg).rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                    else node.module or ""
                deps |= {owner(f"{base.rstrip('.')}.{a.name}") for a in node.names}
        graph[module] = {d for d in deps if d is not None and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """Imports inside functions count: a lazy import that closes a cycle is still a cycle."""
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_the_config_imports_only_leaf_modules() -> None:
    """The config sits below everything it configures: what it imports of the project imports nothing of it
    beyond other such leaves, so it never needs the data, models or methods it names."""
    graph = import_graph()
    used = graph["maestro_fl.config"]
    assert used, "the config imports the leaf modules it checks names with"
    for module in used:
        beyond = graph[module] - used
        assert not beyond, f"maestro_fl.config imports {module}, which imports {sorted(beyond)}"


def test_the_catalog_names_every_registry_entry() -> None:
    """The config checks names against :mod:`maestro_fl.catalog`; the registries must hold exactly those."""
    from maestro_fl import catalog
    from maestro_fl.methods import METHODS
    from maestro_fl.models import MODELS

    assert tuple(METHODS) == tuple(catalog.METHOD_CLASSES)
    assert all(METHODS[name].name == name for name in METHODS)  # each entry names the class of that strategy
    assert set(catalog.MODELS) == set(MODELS)


def test_no_two_modules_share_a_name() -> None:
    """A name says what a module is: two ``protocol.py`` (the wire keys, the tuning protocol) read as one."""
    seen: dict[str, list[str]] = {}
    for package in ("maestro_fl", "strategies", "clients", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                seen.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
