"""The durable spool: received files on disk, all state in SQLite.  The only module that imports sqlite3.

The spool is files plus named queries: it places and removes files, runs
transactions, and reads.  It never changes a study's state: ``studies.state``
and the columns that move with it (``state_changed_at``, ``failure_reason``,
the scoring lease, ``claim_attempts``), and the linking of a clinical record
(which can move a study on), are written only by `node.study_machine`, which
calls into the spool (never the other way round).  Where a file operation
and a transition must commit together (receiving an instance, re-indexing
one at recovery) the spool takes an ``on_indexed`` callable from the machine.

Durability before acknowledgement.  `Spool.place_instance` writes the bytes it
was given to a temp file in the destination folder, fsyncs it, renames it over
the final name, fsyncs the folder, and only then commits the index row (with
the study row and, when the study changes state, its event row) in one
transaction.  It returns after the commit, so anything it acknowledged survives
``kill -9`` and power loss.  A crash between rename and commit leaves a complete
file without a row; `Spool.recover` indexes it on the next start and removes
leftover temp files.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is on disk when it
returns) and a busy timeout.  The one exception is the received instance's
index commit (``synchronous=NORMAL``): its file is already fsynced and
`Spool.recover` rebuilds the row from it, so acknowledging before the WAL
reaches the disk loses nothing.  Every write transaction is ``BEGIN IMMEDIATE``:
it takes the write lock up front, so two writers queue on the busy timeout
instead of failing later with a lock upgrade error, and a read-then-update
inside one transaction cannot interleave with another writer.

Each thread gets its own connection (pynetdicom handles each association in a
thread).  Work on one study's files (store, purge) is serialised by a lock
striped over `LOCK_STRIPES` lock files, which also holds across processes.

Layout under the spool directory (every path component is a validated UID):

    instances/<study_uid>/<series_uid>/<sop_uid>.dcm
    sr/<study_uid>/<sr_sop_uid>.dcm
    quarantine/                 unreadable orphan files found by recover()
    locks/NN.lock

All SQL is in ``queries.sql`` (named queries) and ``schema.sql``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from sclc_risk_node.node import audit
from sclc_risk_node.node.errors import (
    InvalidTransition,
    NotPart10,
    SpoolBusy,
    SpoolFull,
    SpoolIOError,
    SpoolSchemaError,
    UnknownStudy,
)
from sclc_risk_node.node.files import write_atomically
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import (
    ClinicalRecordRow,
    ImageSeries,
    InstanceHeader,
    InstanceRecord,
    OutboxItem,
    RecoveryReport,
    SegmentationRefs,
    StoreOutcome,
    StudyRecord,
    StudySnapshot,
    Transition,
    safe_uid,
)
from sclc_risk_node.node.states import FINISHED_STATES, StudyState

SCHEMA_VERSION = 2
DATABASE_FILENAME = "node.sqlite3"
INSTANCES_DIR = "instances"
SR_DIR = "sr"
QUARANTINE_DIR = "quarantine"
LOCKS_DIR = "locks"
SERVICE_LOCK_FILENAME = "service.lock"
#: Temp files are hidden and carry this suffix so recover() can tell them from spooled files.
TEMP_SUFFIX = ".partial"
#: Bounded number of lock files; two studies sharing a stripe only wait for each other briefly.
LOCK_STRIPES = 64
#: A Part-10 file is a 128-byte preamble, then these four bytes, then the file meta group.
PART10_MAGIC = b"DICM"
DEFAULT_BUSY_TIMEOUT_S = 30.0
DEFAULT_MIN_FREE_BYTES = 2 * 1024**3


def _log():
    # Looked up per call so configure_logging() applies even to a spool opened before it ran.
    return get_logger(stage="spool")


def free_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) user on the file system holding ``path``."""
    return shutil.disk_usage(path).free


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


def _states_json(states: Iterable[StudyState] | None) -> str | None:
    return None if states is None else json.dumps(sorted(str(s) for s in states))


# --- files -------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directories_durably(directory: Path, root: Path) -> None:
    """Create ``directory`` (under ``root``) and fsync each parent that gained an entry.

    Without the parent fsync a new folder can vanish in a power loss, taking
    the fsynced file inside it along.
    """
    if directory.is_dir():
        return
    missing = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current == root or current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_directory(path.parent)


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc.strerror}")
    return SpoolIOError(f"{what}: {exc}")


def place_file_atomically(final_path: Path, data: bytes, *, root: Path) -> None:
    """Make ``final_path`` hold exactly ``data``, durably, or leave it as it was.

    Temp file in the same folder (so the rename cannot cross file systems),
    fdatasync, atomic rename, fsync of the folder.  fdatasync writes the data
    and the metadata needed to read it back (the size), not the timestamps,
    which saves ~0.7 ms per instance (ext4, issue 9).  Files are created 0600:
    they hold patient data.
    """
    directory = final_path.parent
    try:
        _make_directories_durably(directory, root)
    except OSError as exc:
        raise _os_error(exc, f"cannot create a file in {directory}") from exc
    try:
        write_atomically(final_path, data, mode=0o600, durable=True, temp_suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise _os_error(exc, f"cannot write {final_path.name}") from exc


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
        raise _os_error(exc, f"cannot create the database {database}") from exc
    for path in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, mode & 0o700)
        except FileNotFoundError:
            continue
        except PermissionError:
            continue  # someone else's file (a CLI run as another user); SQLite will say if it cannot open it


def _remove_empty_directories(directory: Path, stop_at: Path) -> None:
    while directory != stop_at and stop_at in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        _fsync_directory(directory.parent)
        directory = directory.parent


# --- database ----------------------------------------------------------------------


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


#: Runs inside the transaction that indexed a new instance (``tx, header, now``): the study
#: machine creates or advances its study there (`StudyMachine.store_instance`, `StudyMachine.recover`).
InstanceIndexed = Callable[[Transaction, InstanceHeader, float], None]


def _translate_sqlite_error(exc: sqlite3.Error) -> Exception | None:
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return SpoolBusy(f"spool database stayed locked: {exc}")
    if name.startswith("SQLITE_FULL"):
        return SpoolFull(f"spool database: {exc}")
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY")):
        return SpoolIOError(f"spool database: {exc}")
    return None


class Spool:
    """Received instances, SRs and every piece of node state.  Open with `Spool.open`.

    Thread-safe: each thread uses its own SQLite connection.  Several
    processes may share one spool (SQLite locking plus file locks per study).
    """

    def __init__(
        self,
        directory: Path,
        database: Path,
        *,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ):
        self.directory = Path(directory)
        self.database = Path(database)
        self.min_free_bytes = int(min_free_bytes)
        self.busy_timeout_s = float(busy_timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._service_lock_fd: int | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        database: Path | None = None,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> Spool:
        """Create the folders and the schema if needed.  Call `recover` before receiving."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (INSTANCES_DIR, SR_DIR, QUARANTINE_DIR, LOCKS_DIR):
            (directory / name).mkdir(mode=0o700, exist_ok=True)
        spool = cls(
            directory,
            Path(database) if database is not None else directory / DATABASE_FILENAME,
            min_free_bytes=min_free_bytes,
            busy_timeout_s=busy_timeout_s,
        )
        spool._ensure_schema()
        return spool

    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- connections and transactions ---

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            _make_database_private(self.database)
            try:
                connection = sqlite3.connect(
                    self.database,
                    timeout=self.busy_timeout_s,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,  # thread-local anyway; close() may run elsewhere
                )
                connection.row_factory = sqlite3.Row
                connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SpoolIOError(f"{self.database}: SQLite refused WAL mode ({mode}); use a local disk, not NFS")
                connection.execute("PRAGMA synchronous = FULL")
                connection.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as exc:
                raise _translate_sqlite_error(exc) or SpoolIOError(f"{self.database}: {exc}") from exc
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _ensure_schema(self) -> None:
        connection = self._connection()
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolSchemaError(
                f"{self.database} has schema version {version}; this node knows up to {SCHEMA_VERSION}"
            )
        if version < SCHEMA_VERSION:
            # Two processes starting together both run this; IF NOT EXISTS makes the second a no-op.
            connection.executescript("BEGIN IMMEDIATE;\n" + _package_text("schema.sql") + "\nCOMMIT;")

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True, reconstructible: bool = False) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises.

        ``write=False`` gives a consistent read snapshot without taking the write lock.
        ``reconstructible=True`` commits with ``synchronous=NORMAL`` (no WAL fsync):
        only for rows that `recover` rebuilds from an fsynced file, so a power
        loss can lose the row but not what it records.  Any later FULL commit
        fsyncs the WAL up to and including it.
        Not re-entrant: pass the `Transaction` down instead of opening another.
        """
        connection = self._connection()
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
        for transition in tx.applied:
            _log().info(
                "study_transition",
                study_uid=transition.study_instance_uid,
                from_state=str(transition.from_state) if transition.from_state else None,
                to_state=str(transition.to_state),
                study_event=str(transition.event),
                reason=transition.reason,
            )

    @contextlib.contextmanager
    def _study_lock(self, study_uid: str) -> Iterator[None]:
        stripe = zlib.crc32(study_uid.encode()) % LOCK_STRIPES
        fd = os.open(self.directory / LOCKS_DIR / f"{stripe:02d}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    # --- the one service per spool ---

    def lock_service(self, instance_id: str) -> None:
        """Hold the spool's service lock for this process's lifetime; `SpoolBusy` if another service holds it.

        An exclusive ``flock`` on ``locks/service.lock``: the kernel drops it
        when the process dies, even by SIGKILL, so whoever holds it knows every
        scoring claim or delivery hold of another instance is dead
        (`StudyMachine.reclaim_previous_instances`, `release_delivery_holds`).
        """
        path = self.directory / LOCKS_DIR / SERVICE_LOCK_FILENAME
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SpoolBusy(
                f"spool {self.directory} is already served by {holder}; one `sclc-node serve` per spool"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, instance_id.encode("utf-8"), 0)
        self._service_lock_fd = fd

    def unlock_service(self) -> None:
        fd = self._service_lock_fd
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock
            self._service_lock_fd = None

    def service_running(self) -> bool:
        """Whether some process holds the service lock (a `sclc-node serve` is running on this spool)."""
        if self._service_lock_fd is not None:
            return True
        path = self.directory / LOCKS_DIR / SERVICE_LOCK_FILENAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release_delivery_holds(self, *, now: float) -> int:
        """Make every 'sending' delivery due now; only for the holder of the service lock, at start-up."""
        with self.transaction() as tx:
            return tx.execute("release_delivery_holds", now=now)

    # --- paths and disk ---

    @staticmethod
    def instance_relative_path(header: InstanceHeader) -> str:
        return f"{INSTANCES_DIR}/{header.study_instance_uid}/{header.series_instance_uid}/{header.sop_instance_uid}.dcm"

    @staticmethod
    def sr_relative_path(study_uid: str, sr_sop_instance_uid: str) -> str:
        return f"{SR_DIR}/{safe_uid(study_uid, 'StudyInstanceUID')}/{safe_uid(sr_sop_instance_uid, 'SR SOPInstanceUID')}.dcm"

    def path_of(self, relative_path: str) -> Path:
        return self.directory / relative_path

    def ensure_free_space(self, incoming_bytes: int = 0) -> None:
        """Raise `SpoolFull` if writing ``incoming_bytes`` would leave less than ``min_free_bytes`` free."""
        available = free_bytes(self.directory)
        if available - incoming_bytes < self.min_free_bytes:
            raise SpoolFull(
                f"spool {self.directory} has {available} bytes free; "
                f"{incoming_bytes} more would go below the floor of {self.min_free_bytes}"
            )

    # --- receiving ---

    def place_instance(
        self, encoded_bytes: bytes, header: InstanceHeader, *, now: float, on_indexed: InstanceIndexed
    ) -> StoreOutcome:
        """Durably store one received instance (a Part-10 file as received) and index it.

        Returns only after the file is fsynced in place and its row committed:
        acknowledge the C-STORE after this returns, never before.  A SOP
        Instance UID already stored is not written again (see `StoreOutcome`).
        ``on_indexed`` runs inside the index row's transaction when the
        instance is new: `StudyMachine.store_instance` creates or advances the
        study there, so the row, the study and its event commit together.
        """
        if encoded_bytes[128:132] != PART10_MAGIC:
            raise NotPart10(
                f"instance {header.sop_instance_uid}: not a DICOM Part-10 file "
                "(expected a 128-byte preamble and 'DICM'; use event.encoded_dataset())"
            )
        self.ensure_free_space(len(encoded_bytes))
        digest = hashlib.sha256(encoded_bytes).hexdigest()
        relative_path = self.instance_relative_path(header)
        with self._study_lock(header.study_instance_uid):
            with self.transaction(write=False) as tx:
                existing = tx.one("instance_by_sop", sop_uid=header.sop_instance_uid)
            if existing is not None and existing["purged_at"] is None:
                outcome = self._duplicate_outcome(existing, header, digest)
            else:
                place_file_atomically(self.path_of(relative_path), encoded_bytes, root=self.directory)
                # The file and its folder entry are fsynced: `recover` rebuilds this row from them,
                # so the commit need not wait for the disk (issue 9: a third fsync per instance).
                with self.transaction(reconstructible=True) as tx:
                    outcome = self._index_instance(
                        tx, header, relative_path, len(encoded_bytes), digest, now, on_indexed
                    )
                if outcome is not StoreOutcome.STORED:
                    # Lost a race with the same SOP Instance UID arriving under another study
                    # (another lock stripe): the first row wins, so our copy goes.
                    self._remove_file(relative_path)
        if outcome is StoreOutcome.STORED:
            _log().debug("instance_stored", study_uid=header.study_instance_uid, sop_uid=header.sop_instance_uid)
        return outcome

    def _duplicate_outcome(self, existing: Mapping[str, Any], header: InstanceHeader, digest: str) -> StoreOutcome:
        if existing["sha256"] == digest and existing["study_instance_uid"] == header.study_instance_uid:
            _log().info("instance_duplicate", study_uid=header.study_instance_uid, sop_uid=header.sop_instance_uid)
            return StoreOutcome.DUPLICATE
        _log().warning(
            "instance_duplicate_differs_kept_first",
            study_uid=existing["study_instance_uid"],
            sop_uid=header.sop_instance_uid,
            received_study_uid=header.study_instance_uid,
            kept_sha256=existing["sha256"],
            received_sha256=digest,
        )
        return StoreOutcome.DUPLICATE_KEPT_FIRST

    def _index_instance(
        self,
        tx: Transaction,
        header: InstanceHeader,
        relative_path: str,
        size_bytes: int,
        digest: str,
        now: float,
        on_indexed: InstanceIndexed,
    ) -> StoreOutcome:
        inserted = tx.execute(
            "upsert_instance",
            sop_uid=header.sop_instance_uid,
            study_uid=header.study_instance_uid,
            series_uid=header.series_instance_uid,
            sop_class_uid=header.sop_class_uid,
            modality=header.modality,
            frame_of_reference_uid=header.frame_of_reference_uid,
            referenced_series_json=json.dumps(list(header.referenced_series_instance_uids)),
            referenced_instances_json=json.dumps(list(header.referenced_sop_instance_uids)),
            relative_path=relative_path,
            size_bytes=size_bytes,
            sha256=digest,
            now=now,
        )
        if not inserted:
            existing = tx.one("instance_by_sop", sop_uid=header.sop_instance_uid)
            assert existing is not None  # the upsert matched nothing only because the row exists
            return self._duplicate_outcome(existing, header, digest)
        on_indexed(tx, header, now)
        return StoreOutcome.STORED

    def _remove_file(self, relative_path: str) -> None:
        path = self.path_of(relative_path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fsync_directory(path.parent)

    # --- clinical records ---

    def audit_events(
        self, *, since: float = 0.0, study_uid: str | None = None, limit: int = -1
    ) -> list[audit.AuditEvent]:
        """The audit trail, oldest first."""
        with self.transaction(write=False) as tx:
            rows = tx.all("audit_events", since=since, study_uid=study_uid, limit=limit)
        return [audit.AuditEvent.from_row(row) for row in rows]

    def studies_linked_to_record(self, record_id: int) -> list[str]:
        """Study Instance UIDs whose current clinical record is ``record_id``."""
        with self.transaction(write=False) as tx:
            return [row["study_instance_uid"] for row in tx.all("studies_linked_to_record", record_id=record_id)]

    def clinical_record_for(self, study_uid: str) -> ClinicalRecordRow | None:
        with self.transaction(write=False) as tx:
            study = tx.one("study_by_uid", study_uid=study_uid)
            if study is None:
                raise UnknownStudy(f"no study {study_uid} in the spool")
            if study["clinical_record_id"] is None:
                return None
            row = tx.row("clinical_record_by_id", record_id=study["clinical_record_id"])
        return ClinicalRecordRow.from_row(row)

    # --- reading ---

    def get_study(self, study_uid: str) -> StudyRecord | None:
        with self.transaction(write=False) as tx:
            row = tx.one("study_by_uid", study_uid=study_uid)
        return StudyRecord.from_row(row) if row else None

    def list_studies(self, *, states: Iterable[StudyState] | None = None, limit: int = 200) -> list[StudyRecord]:
        """Newest first.  ``limit=-1`` for all."""
        with self.transaction(write=False) as tx:
            rows = tx.all("list_studies", states=_states_json(states), limit=limit)
        return [StudyRecord.from_row(row) for row in rows]

    def counts_by_state(self) -> dict[StudyState, int]:
        """Every state, with 0 for the empty ones (metrics want the series from the start)."""
        with self.transaction(write=False) as tx:
            rows = tx.all("counts_by_state")
        counts = {state: 0 for state in StudyState}
        counts.update({StudyState(row["state"]): row["n"] for row in rows})
        return counts

    def study_instances(self, study_uid: str, *, include_purged: bool = False) -> list[InstanceRecord]:
        with self.transaction(write=False) as tx:
            rows = tx.all("study_instances", study_uid=study_uid, include_purged=include_purged)
        return [InstanceRecord.from_row(row, self.directory) for row in rows]

    def study_events(self, study_uid: str) -> list[Transition]:
        with self.transaction(write=False) as tx:
            rows = tx.all("study_events", study_uid=study_uid)
        return [Transition.from_row(row) for row in rows]

    def study_snapshot(self, study_uid: str) -> StudySnapshot:
        with self.transaction(write=False) as tx:
            return self.snapshot_in(tx, study_uid)

    def snapshot_in(self, tx: Transaction, study_uid: str) -> StudySnapshot:
        """The completion view of one study, read inside ``tx`` (so it cannot change under the caller)."""
        row = tx.one("study_by_uid", study_uid=study_uid)
        if row is None:
            raise UnknownStudy(f"no study {study_uid} in the spool")
        segmentations: list[SegmentationRefs] = []
        series: dict[str, tuple[str | None, set[str]]] = {}
        for instance in (
            InstanceRecord.from_row(r, self.directory)
            for r in tx.all("study_instances", study_uid=study_uid, include_purged=False)
        ):
            if instance.is_tumour_source:
                segmentations.append(
                    SegmentationRefs(
                        sop_instance_uid=instance.sop_instance_uid,
                        frame_of_reference_uid=instance.frame_of_reference_uid,
                        referenced_series_instance_uids=instance.referenced_series_instance_uids,
                        referenced_sop_instance_uids=instance.referenced_sop_instance_uids,
                        kind="RTSTRUCT" if instance.is_rtstruct else "SEG",
                    )
                )
            else:
                frame_of_reference, uids = series.setdefault(
                    instance.series_instance_uid, (instance.frame_of_reference_uid, set())
                )
                uids.add(instance.sop_instance_uid)
        return StudySnapshot(
            study=StudyRecord.from_row(row),
            segmentations=tuple(segmentations),
            image_series=tuple(
                ImageSeries(uid, frame_of_reference, frozenset(uids))
                for uid, (frame_of_reference, uids) in sorted(series.items())
            ),
        )

    # --- outbox ---

    def write_sr_file(self, study_uid: str, sr_sop_instance_uid: str, encoded_bytes: bytes) -> tuple[str, int, str]:
        """Place an SR file durably unless that SR already exists; return (relative path, size, sha256).

        The first SR with a given SOP Instance UID wins: if it exists (and was
        not purged), its file is kept and its path returned, so re-scoring
        after a crash never yields a second, different object under one UID.
        """
        if encoded_bytes[128:132] != PART10_MAGIC:
            raise NotPart10(f"SR {sr_sop_instance_uid}: not a DICOM Part-10 file")
        relative_path = self.sr_relative_path(study_uid, sr_sop_instance_uid)
        with self.transaction(write=False) as tx:
            existing = tx.one("sr_by_uid", sr_uid=sr_sop_instance_uid)
        if existing is not None and existing["purged_at"] is None:
            return existing["relative_path"], existing["size_bytes"], existing["sha256"]
        self.ensure_free_space(len(encoded_bytes))
        place_file_atomically(self.path_of(relative_path), encoded_bytes, root=self.directory)
        return relative_path, len(encoded_bytes), hashlib.sha256(encoded_bytes).hexdigest()

    def enqueue_sr_in(
        self,
        tx: Transaction,
        study_uid: str,
        sr_sop_instance_uid: str,
        sr_file: tuple[str, int, str],
        destinations: Sequence[str],
        *,
        now: float,
    ) -> None:
        """Record the SR and one pending delivery per destination, inside ``tx``."""
        relative_path, size_bytes, digest = sr_file
        tx.execute(
            "upsert_sr_document",
            sr_uid=sr_sop_instance_uid,
            study_uid=study_uid,
            relative_path=relative_path,
            size_bytes=size_bytes,
            sha256=digest,
            now=now,
        )
        owner = tx.row("sr_by_uid", sr_uid=sr_sop_instance_uid)
        if owner["study_instance_uid"] != study_uid:
            raise InvalidTransition(
                f"SR {sr_sop_instance_uid} already belongs to study {owner['study_instance_uid']}",
                study_uid=study_uid,
            )
        if owner["sha256"] != digest:
            _log().warning("sr_exists_kept_first", study_uid=study_uid, sr_uid=sr_sop_instance_uid)
        for destination in destinations:
            tx.execute(
                "enqueue_delivery", study_uid=study_uid, sr_uid=sr_sop_instance_uid, destination=destination, now=now
            )

    def enqueue_sr(
        self,
        study_uid: str,
        sr_sop_instance_uid: str,
        encoded_bytes: bytes,
        destinations: Sequence[str],
        *,
        now: float,
    ) -> list[OutboxItem]:
        """Store the SR file and queue it for each destination.  Idempotent per (SR UID, destination).

        The worker normally uses `StudyMachine.record_scored`, which does this
        in the same transaction as the ``scored`` transition.
        """
        sr_file = self.write_sr_file(study_uid, sr_sop_instance_uid, encoded_bytes)
        with self.transaction() as tx:
            self.enqueue_sr_in(tx, study_uid, sr_sop_instance_uid, sr_file, destinations, now=now)
            rows = tx.all("study_deliveries", study_uid=study_uid)
        return [OutboxItem.from_row(row, self.directory) for row in rows]

    def due_deliveries(self, *, now: float, limit: int = 100) -> list[OutboxItem]:
        """Pending deliveries whose time has come, and 'sending' ones whose sender went quiet."""
        with self.transaction(write=False) as tx:
            rows = tx.all("due_deliveries", now=now, limit=limit)
        return [OutboxItem.from_row(row, self.directory) for row in rows]

    def start_delivery(self, item_id: int, *, now: float, hold_s: float) -> OutboxItem:
        """Take a due delivery for ``hold_s`` seconds, so no other sender sends it meanwhile."""
        with self.transaction() as tx:
            if not tx.execute("start_delivery", item_id=item_id, now=now, sending_until=now + hold_s):
                raise InvalidTransition(f"outbox item {item_id} is not due (already taken, delivered or waiting)")
            row = tx.row("outbox_item", item_id=item_id)
        return OutboxItem.from_row(row, self.directory)

    def study_deliveries(self, study_uid: str) -> list[OutboxItem]:
        with self.transaction(write=False) as tx:
            rows = tx.all("study_deliveries", study_uid=study_uid)
        return [OutboxItem.from_row(row, self.directory) for row in rows]

    def outbox_depth(self) -> int:
        """Deliveries not yet accepted (pending, sending or given up)."""
        with self.transaction(write=False) as tx:
            return int(tx.row("outbox_depth")["n"])

    # --- retention ---

    def studies_due_for_cleanup(
        self, *, now: float, retention_s: float, states: Iterable[StudyState] = FINISHED_STATES
    ) -> list[StudyRecord]:
        """Finished studies (by default delivered, failed, expired) whose files are older than ``retention_s``.

        Age counts from the last state change.  Call once per retention
        period, e.g. ``states={DELIVERED}`` and ``states={FAILED, EXPIRED}``.
        ``scored`` may be asked for too (a node with no destinations): only
        studies with no pending or in-flight delivery are returned.
        """
        unfinished = set(states) - FINISHED_STATES - {StudyState.SCORED}
        if unfinished:
            raise ValueError(f"only finished studies may be cleaned up, not {sorted(map(str, unfinished))}")
        with self.transaction(write=False) as tx:
            rows = tx.all("studies_due_for_cleanup", states=_states_json(states), changed_before=now - retention_s)
        return [StudyRecord.from_row(row) for row in rows]

    def remove_study_files(self, study_uid: str, *, now: float) -> int:
        """Delete a finished study's instance and SR files and forget its patient data; keep its state and history.

        Patient data: the study row's Patient ID and Accession Number, and
        the clinical records that were its (linked or superseded), unless
        another study still uses one.  What stays is the Study Instance UID,
        states, event history and file index rows (UIDs, sizes, hashes).

        Rows are marked purged first, files deleted after: a crash in between
        leaves purged rows with files, which `recover` deletes.  Raises
        `InvalidTransition` if the study is not finished (e.g. new instances
        revived it) or already purged.  Returns the number of files deleted.
        """
        with self._study_lock(safe_uid(study_uid, "StudyInstanceUID")):
            with self.transaction() as tx:
                if not tx.execute(
                    "mark_study_purged", study_uid=study_uid, states=_states_json(FINISHED_STATES), now=now
                ):
                    study = tx.one("study_by_uid", study_uid=study_uid)
                    if study is None:
                        raise UnknownStudy(f"no study {study_uid} in the spool")
                    raise InvalidTransition(
                        f"study {study_uid} is {study['state']}"
                        + (" and already purged" if study["purged_at"] is not None else ", not finished"),
                        study_uid=study_uid,
                        state=study["state"],
                    )
                paths = [
                    r["relative_path"] for r in tx.all("study_instances", study_uid=study_uid, include_purged=False)
                ]
                paths += [r["relative_path"] for r in tx.all("study_sr_files", study_uid=study_uid)]
                tx.execute("mark_instances_purged", study_uid=study_uid, now=now)
                tx.execute("mark_srs_purged", study_uid=study_uid, now=now)
                # The patient data goes with the files: identifiers and clinical values.
                record_ids = [r["id"] for r in tx.all("clinical_records_of_study", study_uid=study_uid)]
                tx.execute("forget_study_identifiers", study_uid=study_uid)
                records_deleted = tx.execute("delete_unlinked_clinical_records", ids=json.dumps(record_ids))
            removed = 0
            for relative_path in paths:
                path = self.path_of(relative_path)
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            for relative_path in paths:
                top = self.directory / relative_path.split("/", 1)[0]  # instances/ or sr/ stay
                _remove_empty_directories(self.path_of(relative_path).parent, top)
        _log().info("study_files_removed", study_uid=study_uid, files=removed, clinical_records_deleted=records_deleted)
        return removed

    def expire_unmatched_clinical_records(self, *, now: float, retention_s: float) -> int:
        """Delete clinical records no study uses that arrived more than ``retention_s`` ago; returns how many.

        A record whose study never arrives (or that a correction superseded)
        would otherwise keep a patient's identifiers and clinical values forever.
        """
        with self.transaction() as tx:
            deleted = tx.execute("expire_unmatched_clinical_records", received_before=now - retention_s)
        if deleted:
            _log().info("clinical_records_expired", count=deleted)
        return deleted

    # --- crash recovery ---

    def recover(self, *, now: float, on_indexed: InstanceIndexed) -> RecoveryReport:
        """Bring files and index back in line after a crash.  Run at startup, before receiving.

        `StudyMachine.recover` runs it, with the ``on_indexed`` that files a
        re-indexed instance under its study (as `place_instance` does).

        * temp files (``*.partial``) are deleted: their store never returned;
        * a spooled file without a row (crash between rename and commit) is
          read and indexed, as if it had just arrived;
        * a file whose row is purged (crash during a purge) is deleted;
        * a file that lost a duplicate race, or cannot be read as the DICOM
          file its path names, is removed or moved to ``quarantine/``;
        * rows whose file is missing are reported (and logged), not deleted.

        Study states need no repair: they are only ever changed by committed
        transactions, and expired scoring leases / delivery holds are picked
        up by `StudyMachine.reclaim_stale_leases` and `due_deliveries`.
        """
        import pydicom  # only recovery parses files; the SCP hands us a parsed header

        temp_removed = 0
        for base in (INSTANCES_DIR, SR_DIR):
            for temp in (self.directory / base).rglob("*" + TEMP_SUFFIX):
                temp.unlink(missing_ok=True)
                temp_removed += 1

        with self.transaction(write=False) as tx:
            instance_rows = tx.all("all_instance_files")
            sr_rows = tx.all("all_sr_files")
        by_path = {row["relative_path"]: row for row in instance_rows}
        by_sop = {row["sop_instance_uid"]: row for row in instance_rows}

        reindexed: list[str] = []
        quarantined: list[Path] = []
        purges_finished = 0
        losers_removed = 0
        for path in sorted((self.directory / INSTANCES_DIR).rglob("*.dcm")):
            relative_path = path.relative_to(self.directory).as_posix()
            row = by_path.get(relative_path)
            if row is not None:
                if row["purged_at"] is not None:
                    path.unlink(missing_ok=True)
                    purges_finished += 1
                continue
            try:
                header = InstanceHeader.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception as exc:  # noqa: BLE001 - any unreadable file goes to quarantine, never deleted
                quarantined.append(self._quarantine(path, f"unreadable: {exc}"))
                continue
            if self.instance_relative_path(header) != relative_path:
                quarantined.append(self._quarantine(path, "its UIDs do not match its path"))
                continue
            known = by_sop.get(header.sop_instance_uid)
            if known is not None and known["purged_at"] is None:
                path.unlink()
                losers_removed += 1
                continue
            data = path.read_bytes()
            with self._study_lock(header.study_instance_uid):
                with self.transaction() as tx:
                    outcome = self._index_instance(
                        tx,
                        header,
                        relative_path,
                        len(data),
                        hashlib.sha256(data).hexdigest(),
                        now,
                        on_indexed,
                    )
            if outcome is StoreOutcome.STORED:
                reindexed.append(header.sop_instance_uid)

        for row in sr_rows:
            if row["purged_at"] is not None and self.path_of(row["relative_path"]).exists():
                self.path_of(row["relative_path"]).unlink()
                purges_finished += 1

        missing = tuple(
            row["sop_instance_uid"]
            for row in instance_rows
            if row["purged_at"] is None and not self.path_of(row["relative_path"]).exists()
        )
        report = RecoveryReport(
            temp_files_removed=temp_removed,
            reindexed_sop_instance_uids=tuple(reindexed),
            purges_finished=purges_finished,
            losing_duplicates_removed=losers_removed,
            quarantined=tuple(quarantined),
            missing_files=missing,
        )
        log = _log()
        if missing:
            log.error("spool_files_missing", count=len(missing), first_sop_uids=list(missing[:10]))
        log.info(
            "spool_recovered",
            temp_files_removed=temp_removed,
            reindexed=len(reindexed),
            purges_finished=purges_finished,
            losing_duplicates_removed=losers_removed,
            quarantined=len(quarantined),
            missing_files=len(missing),
        )
        return report

    def _quarantine(self, path: Path, why: str) -> Path:
        target = self.directory / QUARANTINE_DIR / f"{path.parent.name}-{path.name}"
        suffix = 0
        while target.exists():
            suffix += 1
            target = target.with_name(f"{path.parent.name}-{path.name}.{suffix}")
        os.replace(path, target)
        _fsync_directory(target.parent)
        _log().warning("spool_file_quarantined", file=target.name, why=why)
        return target
