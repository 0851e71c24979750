"""The spool's SQLite database: one connection per thread, transactions offering the named queries.
The only module that imports sqlite3.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it
returns) and a busy timeout.  The one exception is a ``reconstructible``
transaction (``synchronous=NORMAL``): the received instance's index commit,
whose file is already fsynced and rebuilt into a row by recovery, so
acknowledging before the WAL reaches the disk loses nothing.  Every write
transaction is ``BEGIN IMMEDIATE``: it takes the write lock up front, so two
writers queue on the busy timeout instead of failing later with a lock upgrade
error, and a read-then-update inside one transaction cannot interleave with
another writer.

Each thread gets its own connection (pynetdicom handles each association in a
thread).  All SQL is in ``queries.sql`` (named queries) and ``schema.sql``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from sclc_risk_node.node.durable_files import os_error
from sclc_risk_node.node.errors import SpoolBusy, SpoolFull, SpoolIOError, SpoolSchemaError
from sclc_risk_node.node.records import Transition

SCHEMA_VERSION = 2
#: A thread's connection, named here so that callers need not import sqlite3 for the type.
Connection = sqlite3.Connection


def parse_named_queries(text: str) -> dict[str, str]:
    """``-- name: x`` blocks of a SQL file, by name."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip()
            name = stripped.removeprefix("-- name:").strip()
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice")
            lines = []
        elif name:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


def _package_text(filename: str) -> str:
    return files("sclc_risk_node.node").joinpath(filename).read_text(encoding="utf-8")


_QUERIES = parse_named_queries(_package_text("queries.sql"))


class Transaction:
    """One open SQLite transaction, offering the named queries.  Rows come back as plain dicts.

    ``applied`` collects the study transitions made in it; the spool logs them
    once the transaction has committed, so no log line describes a change
    that was rolled back.
    """

    def __init__(self, connection: sqlite3.Connection, queries: Mapping[str, str]):
        self._connection = connection
        self._queries = queries
        self.applied: list[Transition] = []

    def _run(self, name: str, params: Mapping[str, Any]) -> sqlite3.Cursor:
        return self._connection.execute(self._queries[name], dict(params))

    def execute(self, name: str, **params: Any) -> int:
        """Run a statement; return how many rows it changed."""
        return self._run(name, params).rowcount

    def insert(self, name: str, **params: Any) -> int:
        """Run an INSERT; return the new row's id."""
        row_id = self._run(name, params).lastrowid
        if row_id is None:
            raise LookupError(f"query {name} inserted no row")
        return row_id

    def one(self, name: str, **params: Any) -> dict[str, Any] | None:
        row = self._run(name, params).fetchone()
        return dict(row) if row is not None else None

    def row(self, name: str, **params: Any) -> dict[str, Any]:
        """`one` for a query that always finds its row (an aggregate, a row this transaction just read or wrote)."""
        row = self.one(name, **params)
        if row is None:
            raise LookupError(f"query {name} found no row for {params}")
        return row

    def all(self, name: str, **params: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in self._run(name, params).fetchall()]


def _translate_sqlite_error(exc: sqlite3.Error) -> Exception | None:
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return SpoolBusy(f"spool database stayed locked: {exc}")
    if name.startswith("SQLITE_FULL"):
        return SpoolFull(f"spool database: {exc}")
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return SpoolIOError(f"spool database: {exc}")
    return None


def _make_database_private(database: Path) -> None:
    """Create the database file 0600 before SQLite does, and tighten it and its -wal/-shm if looser.

    SQLite creates a new database with 0644 & ~umask, and gives the -wal and
    -shm files the mode of the database file; so a 0600 database means 0600
    companions whatever the umask.  They hold patient IDs and clinical values.
    """
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise os_error(exc, f"cannot create the database {database}") from exc
    for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, mode & 0o700)
        except FileNotFoundError:
            continue
        except PermissionError:
            continue  # someone else's file (a CLI run as another user); SQLite will say if it cannot open it


class Database:
    """The SQLite file ``path``, with one connection per thread (all closed by `close`)."""

    def __init__(self, path: Path, *, busy_timeout_s: float):
        self.path = Path(path)
        self.busy_timeout_s = float(busy_timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (WAL, ``synchronous=FULL``, busy timeout) on first use."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            _make_database_private(self.path)
            try:
                connection = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout_s,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # thread-local anyway; close() may run elsewhere
                )
                connection.row_factory = sqlite3.Row
                connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolIOError(f"{self.path}: SQLite refused WAL mode ({mode}); use a local disk, not NFS")
                connection.execute("PRAGMA synchronous = FULL")
                connection.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise _translate_sqlite_error(exc) or SpoolIOError(f"{self.path}: {exc}") from exc
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def ensure_schema(self) -> None:
        """Create the schema if the file has none; `SpoolSchemaError` if it is newer than this node knows."""
        connection = self.connection()
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolSchemaError(f"{self.path} has schema version {version}; this node knows up to {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            # Two processes starting together both run this; IF NOT EXISTS makes the second a no-op.
            connection.executescript("BEGIN IMMEDIATE;\n" + _package_text("schema.sql") + "\nCOMMIT;")

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True, reconstructible: bool = False) -> Iterator[Transaction]:
        """One transaction on this thread's connection: committed when the block ends, rolled back if it raises.

        SQLite's busy, full and I/O errors come out as `SpoolBusy`, `SpoolFull`
        and `SpoolIOError`.  See `Spool.transaction` for ``write`` and ``reconstructible``.
        """
        connection = self.connection()
        if getattr(self._local, "in_transaction", False):
            raise RuntimeError("Spool.transaction() is not re-entrant; pass the open Transaction down")
        tx = Transaction(connection, _QUERIES)
        self._local.in_transaction = True
        if reconstructible:
            connection.execute("PRAGMA synchronous = NORMAL")
        try:
            try:
                connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield tx
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            translated = _translate_sqlite_error(exc)
            if translated is None:
                raise
            raise translated from exc
        finally:
            self._local.in_transaction = False
            if reconstructible:
                connection.execute("PRAGMA synchronous = FULL")
