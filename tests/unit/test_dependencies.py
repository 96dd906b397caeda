"""Every third-party module the services import is declared in pyproject.toml, so a fresh install
has it, and not only because some other package happened to bring it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# `make protos` regenerates the stubs with grpcio-tools, a test dependency.
TOOLS = {"services/mesh/rpc/protogen.py"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return {_name(r) for r in requirements}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "services"}


def _undeclared(declared: set[str], modules: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module in sorted(modules):
        candidates = {_name(dist) for dist in providers.get(module, [module])}
        if not candidates & declared:
            missing.append(f"{module} (from {', '.join(sorted(candidates))})")
    return missing


def test_every_module_the_services_import_is_a_declared_dependency() -> None:
    runtime, tools = set(), set()
    for path in (REPO / "services").rglob("*.py"):
        if "stubs" in path.parts:
            continue
        (tools if str(path.relative_to(REPO)) in TOOLS else runtime).update(_imports(path))
    assert _undeclared(_declared(), runtime) == []
    assert _undeclared(_declared("test"), tools) == []


def test_an_undeclared_import_is_reported() -> None:
    """The check above can fail: rich, imported without being declared, is named."""
    assert _undeclared(_declared() - {"rich"}, {"rich", "grpc"}) == ["rich (from rich)"]


def test_every_folder_of_code_is_a_package_the_wheel_ships() -> None:
    """A folder without __init__.py imports in a checkout (a namespace package) but is left out of
    the installed package (pip install ., the container image): setuptools ships packages only."""
    folders = {path.parent for path in (REPO / "services").rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").exists()) == []
