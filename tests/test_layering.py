"""Imports run one way: node -> dicom_io -> scoring.  The scoring core never imports the other two."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "scoring": ("node", "dicom_io", "pynetdicom", "sqlite3"),
    "dicom_io": ("node", "pynetdicom", "sqlite3"),
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


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_layers(package):
    offences = []
    for path in sorted((REPO / package).rglob("*.py")):
        for module in imported_modules(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(REPO)} imports {module}")
    assert offences == []


def test_only_the_spool_imports_sqlite3():
    importers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "node").rglob("*.py")
        if "sqlite3" in imported_modules(path)
    )
    assert importers in ([], ["node/spool.py"])


def test_every_python_package_is_installed():
    """A package missing from pyproject's explicit list works in an editable install and breaks a real one."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("node", "dicom_io", "scoring")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert on_disk <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"
