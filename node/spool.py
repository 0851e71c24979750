"""The durable spool: received files on disk, all state in SQLite.

The spool is files plus named queries: it places and removes files, runs
transactions, and reads.  It never changes a study's state: ``studies.state``
and the columns that move with it (``state_changed_at``, ``failure_reason``,
the scoring lease, ``claim_attempts``), and the linking of a clinical record
(which can move a study on), are written only by `node.study_machine`, which
calls into the spool (never the other way round).  Where a file operation
and a transition must commit together (receiving an instance, re-indexing
one at recovery) the spool takes an ``on_indexed`` callable from the machine.

`Spool` is the facade over these modules, each focused on one thing:

* `node.durable_files`: placing a file durably (fdatasync, rename, fsync of
  the folder) and removing empty folders, OS errors as `SpoolFull` / `SpoolIOError`;
* `node.database`: the SQLite connections (WAL, one per thread) and
  `Transaction` over the named queries of ``queries.sql``; ``schema.sql``;
* `node.retention`: finished studies due for cleanup, removing their files,
  expiring unmatched clinical records (functions over a `Spool`);
* `node.recovery`: bringing files and index back in line at start-up.

Durability before acknowledgement.  `Spool.place_instance` writes the bytes it
was given to a temp file in the destination folder, fsyncs it, renames it over
the final name, fsyncs the folder, and only then commits the index row (with
the study row and, when the study changes state, its event row) in one
transaction.  It returns after the commit, so anything it acknowledged survives
``kill -9`` and power loss.  A crash between rename and commit leaves a complete
file without a row; `node.recovery.recover` indexes it on the next start and
removes leftover temp files.  The index commit is the one ``reconstructible``
transaction (``synchronous=NORMAL``, see `Spool.transaction`).

Work on one study's files (store, purge) is serialised by a lock striped over
`LOCK_STRIPES` lock files, which also holds across processes.

Layout under the spool directory (every path component is a validated UID):

    instances/<study_uid>/<series_uid>/<sop_uid>.dcm
    sr/<study_uid>/<sr_sop_uid>.dcm
    quarantine/                 unreadable orphan files found by recovery
    locks/NN.lock
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sclc_risk_node.node import audit
from sclc_risk_node.node.database import Connection, Database, Transaction
from sclc_risk_node.node.durable_files import place_file_atomically
from sclc_risk_node.node.errors import InvalidTransition, NotPart10, SpoolBusy, SpoolFull, UnknownStudy
from sclc_risk_node.node.files import fsync_directory
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import (
    ClinicalRecordRow,
    ImageSeries,
    InstanceHeader,
    InstanceRecord,
    OutboxItem,
    SegmentationRefs,
    StoreOutcome,
    StudyRecord,
    StudySnapshot,
    Transition,
    safe_uid,
)
from sclc_risk_node.node.states import StudyState

DATABASE_FILENAME = "node.sqlite3"
INSTANCES_DIR = "instances"
SR_DIR = "sr"
QUARANTINE_DIR = "quarantine"
LOCKS_DIR = "locks"
SERVICE_LOCK_FILENAME = "service.lock"
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


def states_json(states: Iterable[StudyState] | None) -> str | None:
    """The ``:states`` parameter of the named queries that filter by state (``None``: any state)."""
    return None if states is None else json.dumps(sorted(str(s) for s in states))


#: Runs inside the transaction that indexed a new instance (``tx, header, now``): the study
#: machine creates or advances its study there (`StudyMachine.store_instance`, `StudyMachine.recover`).
InstanceIndexed = Callable[[Transaction, InstanceHeader, float], None]


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
        self._database = Database(self.database, busy_timeout_s=self.busy_timeout_s)
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
        """Create the folders and the schema if needed.  Run `StudyMachine.recover` before receiving."""
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
        spool._database.ensure_schema()
        return spool

    def close(self) -> None:
        self._database.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- connections and transactions ---

    def _connection(self) -> Connection:
        """This thread's SQLite connection (tests read its pragmas and trace its statements)."""
        return self._database.connection()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True, reconstructible: bool = False) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back if it raises.

        ``write=False`` gives a consistent read snapshot without taking the write lock.
        ``reconstructible=True`` commits with ``synchronous=NORMAL`` (no WAL fsync):
        only for rows that `node.recovery.recover` rebuilds from an fsynced file, so a power
        loss can lose the row but not what it records.  Any later FULL commit
        fsyncs the WAL up to and including it.
        Not re-entrant: pass the `Transaction` down instead of opening another.
        """
        with self._database.transaction(write=write, reconstructible=reconstructible) as tx:
            yield tx
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
    def study_lock(self, study_uid: str) -> Iterator[None]:
        """Hold the lock on ``study_uid``'s files (shared by the studies of one stripe), also across processes."""
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
        with self.study_lock(header.study_instance_uid):
            with self.transaction(write=False) as tx:
                existing = tx.one("instance_by_sop", sop_uid=header.sop_instance_uid)
            if existing is not None and existing["purged_at"] is None:
                outcome = self._duplicate_outcome(existing, header, digest)
            else:
                place_file_atomically(self.path_of(relative_path), encoded_bytes, root=self.directory)
                # The file and its folder entry are fsynced: recovery rebuilds this row from them,
                # so the commit need not wait for the disk (issue 9: a third fsync per instance).
                with self.transaction(reconstructible=True) as tx:
                    outcome = self.index_instance_in(
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

    def index_instance_in(
        self,
        tx: Transaction,
        header: InstanceHeader,
        relative_path: str,
        size_bytes: int,
        digest: str,
        now: float,
        on_indexed: InstanceIndexed,
    ) -> StoreOutcome:
        """Insert the index row of a file already in place, inside ``tx``; ``on_indexed`` runs if the row is new.

        The caller holds `study_lock` (`place_instance`, and recovery for a file found without its row).
        """
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
            fsync_directory(path.parent)

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
            rows = tx.all("list_studies", states=states_json(states), limit=limit)
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
