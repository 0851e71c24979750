"""Imports run one way: research -> node -> dicom_io -> scoring.  The scoring core never imports the others;
nothing imports the research side (research/, installed with the [train] extra)."""

from __future__ import annotations

import ast
import re
import textwrap
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


def test_only_the_database_module_imports_sqlite3():
    """node/database.py is the spool's SQLite layer (connections, transactions, named queries);
    everything else reaches the database through `Spool` and the `Transaction` it hands out."""
    importers = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "node").rglob("*.py") if "sqlite3" in imported_modules(path)
    )
    assert importers in ([], ["node/database.py"])


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
                for module in imported_modules(path) | imported_in_code_strings(path)
                if module.split(".")[0] in bare
            ]
    assert offences == []


def imported_in_code_strings(path: Path) -> set[str]:
    """Imports inside string constants that are Python code (``python -c`` scripts of the tests)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:
                tree = ast.parse(textwrap.dedent(node.value))
            except SyntaxError:
                continue
            for inner in ast.walk(tree):
                if isinstance(inner, ast.Import):
                    names.update(alias.name for alias in inner.names)
                elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                    names.add(inner.module)
    return names


# --- no import cycles -------------------------------------------------------------------

#: The folders whose modules form the graph; each installs as sclc_risk_node.<folder>.
GRAPH_PACKAGES = ("node", "dicom_io", "scoring", "research")


def module_files(root: Path = REPO, packages: tuple[str, ...] = GRAPH_PACKAGES) -> dict[str, Path]:
    """``sclc_risk_node.node.spool`` -> node/spool.py, for every module under ``packages`` (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((NAMESPACE, *parts))] = path
    return modules


def import_targets(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body: top level, in functions, under TYPE_CHECKING.

    ``from package import name`` counts as importing the submodule ``package.name`` when
    there is one, else the package itself; relative imports are resolved against ``module``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` runs a.b.c; the longest project module named is the one imported.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(root: Path = REPO, packages: tuple[str, ...] = GRAPH_PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    known = set(files)
    return {module: import_targets(path, module, known) for module, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> b -> ... -> a``) per strongly connected group of modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan, iteratively: deep graphs must not hit the recursion limit
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[module] = min(low[module], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)

    cycles = []
    for group in groups:
        first = min(group)
        # Shortest way back to `first` inside the group (breadth first), so the message is short.
        previous: dict[str, str] = {}
        frontier = [first]
        while frontier and first not in previous:
            following = []
            for module in frontier:
                for successor in sorted(graph[module] & group):
                    if successor not in previous:
                        previous[successor] = module
                        following.append(successor)
            frontier = following
        path = [first]
        while len(path) == 1 or path[-1] != first:
            path.append(previous[path[-1]])
        cycles.append(list(reversed(path)))
    return sorted(cycles)


def test_no_module_imports_itself_through_others():
    """No import cycle among node/, dicom_io/ and scoring/, counting imports inside functions and
    under TYPE_CHECKING too: a cycle hidden in a function still ties the two modules together."""
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a cycle closed by an import inside a function, and a relative one."""
    package = tmp_path / "node"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from sclc_risk_node.node import b\n")
    (package / "b.py").write_text("def later():\n    from sclc_risk_node.node.c import thing\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("import sclc_risk_node.node.a\n")  # imports into the cycle, not part of it
    graph = import_graph(tmp_path, ("node",))
    assert graph["sclc_risk_node.node.d"] == {"sclc_risk_node.node.a"}
    assert import_cycles(graph) == [
        ["sclc_risk_node.node.a", "sclc_risk_node.node.b", "sclc_risk_node.node.c", "sclc_risk_node.node.a"]
    ]


# --- one writer of study state ---------------------------------------------------------------

#: ``studies`` columns that only the study machine writes: the state and what moves with it
#: (the scoring lease, the failure reason), and the clinical-record link that can move a study on.
LIFECYCLE_COLUMNS = {"state", "state_changed_at", "failure_reason", "claimed_by", "lease_until", "claim_attempts"}
#: Named queries that only the machine may run although they write no lifecycle column:
#: the history of transitions, and the link that decides waiting_for_clinical vs ready.
MACHINE_ONLY_QUERIES = {"insert_study_event", "link_clinical_record"}
STUDY_MACHINE = "node/study_machine.py"


def _sql_without_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def studies_columns_written(sql: str) -> set[str]:
    """Columns of ``studies`` that an INSERT or UPDATE in ``sql`` writes (an INSERT writes all it lists)."""
    sql = _sql_without_comments(sql)
    written: set[str] = set()
    for columns in re.findall(r"\bINSERT\s+(?:OR\s+\w+\s+)?INTO\s+studies\s*\(([^)]*)\)", sql, re.I):
        written |= {column.strip().lower() for column in columns.split(",")}
    for assignments in re.findall(r"\bUPDATE\s+studies\s+SET\s+(.*?)(?:\bWHERE\b|;|$)", sql, re.I | re.S):
        written |= {column.lower() for column in re.findall(r"(?:^|,)\s*(\w+)\s*=", assignments)}
    return written


def named_queries() -> dict[str, str]:
    from sclc_risk_node.node.database import parse_named_queries

    return parse_named_queries((REPO / "node" / "queries.sql").read_text(encoding="utf-8"))


def string_constants(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_column_reader_sees_inserts_and_updates_of_studies():
    assert studies_columns_written("INSERT INTO studies (study_instance_uid, state) VALUES (:a, 'x')") == {
        "study_instance_uid",
        "state",
    }
    assert studies_columns_written(
        "UPDATE studies\n   SET state = :s, -- why\n       lease_until = CASE WHEN :x THEN 1 ELSE lease_until END\n"
        " WHERE state = 'ready'"
    ) == {"state", "lease_until"}
    assert studies_columns_written("UPDATE outbox SET state = 'sent'") == set()
    assert studies_columns_written("SELECT state FROM studies") == set()


def test_only_the_study_machine_runs_the_queries_that_change_study_state():
    """Every named query that writes a lifecycle column of ``studies`` (or a study event, or the
    clinical link) is run from node/study_machine.py and from no other module."""
    queries = named_queries()
    machine_only = {
        name for name, sql in queries.items() if studies_columns_written(sql) & LIFECYCLE_COLUMNS
    } | MACHINE_ONLY_QUERIES
    # Not vacuous: the compare-and-set, the creation of a study and the lease renewal are among them.
    assert {"advance_study", "create_study", "renew_lease"} <= machine_only
    users: dict[str, set[str]] = {name: set() for name in machine_only}
    for top in ("node", "dicom_io", "scoring"):
        for path in sorted((REPO / top).rglob("*.py")):
            for text in set(string_constants(path)) & machine_only:
                users[text].add(path.relative_to(REPO).as_posix())
    assert users == {name: {STUDY_MACHINE} for name in machine_only}


def test_no_python_code_or_schema_writes_study_state_outside_the_named_queries():
    """SQL written inline (a string in a module, a trigger in the schema) cannot bypass the machine."""
    offences = []
    for top in ("node", "dicom_io", "scoring"):
        for path in sorted((REPO / top).rglob("*.py")):
            for text in string_constants(path):
                if studies_columns_written(text) & LIFECYCLE_COLUMNS:
                    offences.append(f"{path.relative_to(REPO)}: {text.strip()[:60]!r}")
    schema = (REPO / "node" / "schema.sql").read_text(encoding="utf-8")
    if studies_columns_written(schema):
        offences.append(f"node/schema.sql writes {sorted(studies_columns_written(schema))}")
    assert offences == []
