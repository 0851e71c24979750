"""Imports run one way: research -> node -> dicom_io -> scoring.  The scoring core never imports the others;
nothing imports the research side (research/, installed with the [train] extra)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "sclc_risk_node"
FORBIDDEN = {
    "scoring": ("node", "dicom_io", "research", "pynetdicom", "sqlite3"),
    "dicom_io": ("node", "research", "pynetdicom", "sqlite3"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_of(module: str) -> str:
    """`sclc_risk_node.scoring.model` -> `scoring`; third-party `sqlite3` -> `sqlite3`."""
    parts = module.split(".")
    return parts[1] if parts[0] == NAMESPACE and len(parts) > 1 else parts[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_layers(package):
    offences = []
    for path in sorted((REPO / package).rglob("*.py")):
        for module in imported_modules(path):
            if layer_of(module) in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(REPO)} imports {module}")
    assert offences == []


def test_the_service_imports_the_research_side_only_to_hand_it_a_research_command():
    """node/cli.py imports research/cli.py inside the handler of `train`, `simulate-cohort` and `stats`,
    never at module level: `serve` and every other service command run without the [train] extra."""
    importers = {}
    for path in sorted((REPO / "node").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top_level = {id(statement) for statement in tree.body}
        for statement in ast.walk(tree):
            if isinstance(statement, ast.ImportFrom) and statement.module and layer_of(statement.module) == "research":
                importers.setdefault(str(path.relative_to(REPO)), []).append(
                    (statement.module, "module level" if id(statement) in top_level else "in a function")
                )
    assert importers in ({}, {"node/cli.py": [("sclc_risk_node.research.cli", "in a function")]})


def test_only_the_spool_imports_sqlite3():
    importers = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "node").rglob("*.py") if "sqlite3" in imported_modules(path)
    )
    assert importers in ([], ["node/spool.py"])


def test_every_python_package_is_installed():
    """A package missing from pyproject's explicit list works in an editable install and breaks a real one."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join((NAMESPACE, *init.parent.relative_to(REPO).parts))
        for top in ("node", "dicom_io", "scoring", "research")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_code_imports_its_own_packages_only_through_the_namespace():
    """A bare `import node` resolves only from the repository root and could pick up another
    distribution's `node`; installed, the folders exist only as sclc_risk_node.node etc."""
    bare = ("node", "dicom_io", "scoring", "models", "config", "research")
    offences = []
    for top in ("node", "dicom_io", "scoring", "research", "tests", "benchmarks", "models", "config"):
        for path in sorted((REPO / top).rglob("*.py")):
            offences += [
                f"{path.relative_to(REPO)} imports {module}"
                for module in imported_modules(path)
                if module.split(".")[0] in bare
            ]
    assert offences == []
