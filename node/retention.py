"""Retention: which finished studies' files are due to go, removing them, and expiring unmatched clinical records.

Functions over a `Spool`: the service's cleanup pass (`NodeService`) and the
tests call them.  Removing a study's files never changes its state; the
study keeps its UID, states and history (``purged_at`` marks it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sclc_risk_node.node.durable_files import remove_empty_directories
from sclc_risk_node.node.errors import InvalidTransition, UnknownStudy
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import StudyRecord, safe_uid
from sclc_risk_node.node.spool import Spool, states_json
from sclc_risk_node.node.states import FINISHED_STATES, StudyState


def _log():
    # The spool's stage: operators filter the spool's file work (placing, removing) by it.
    return get_logger(stage="spool")


def studies_due_for_cleanup(
    spool: Spool, *, now: float, retention_s: float, states: Iterable[StudyState] = FINISHED_STATES
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
    with spool.transaction(write=False) as tx:
        rows = tx.all("studies_due_for_cleanup", states=states_json(states), changed_before=now - retention_s)
    return [StudyRecord.from_row(row) for row in rows]


def remove_study_files(spool: Spool, study_uid: str, *, now: float) -> int:
    """Delete a finished study's instance and SR files and forget its patient data; keep its state and history.

    Patient data: the study row's Patient ID and Accession Number, and
    the clinical records that were its (linked or superseded), unless
    another study still uses one.  What stays is the Study Instance UID,
    states, event history and file index rows (UIDs, sizes, hashes).

    Rows are marked purged first, files deleted after: a crash in between
    leaves purged rows with files, which `node.recovery.recover` deletes.  Raises
    `InvalidTransition` if the study is not finished (e.g. new instances
    revived it) or already purged.  Returns the number of files deleted.
    """
    with spool.study_lock(safe_uid(study_uid, "StudyInstanceUID")):
        with spool.transaction() as tx:
            if not tx.execute("mark_study_purged", study_uid=study_uid, states=states_json(FINISHED_STATES), now=now):
                study = tx.one("study_by_uid", study_uid=study_uid)
                if study is None:
                    raise UnknownStudy(f"no study {study_uid} in the spool")
                raise InvalidTransition(
                    f"study {study_uid} is {study['state']}"
                    + (" and already purged" if study["purged_at"] is not None else ", not finished"),
                    study_uid=study_uid,
                    state=study["state"],
                )
            paths = [r["relative_path"] for r in tx.all("study_instances", study_uid=study_uid, include_purged=False)]
            paths += [r["relative_path"] for r in tx.all("study_sr_files", study_uid=study_uid)]
            tx.execute("mark_instances_purged", study_uid=study_uid, now=now)
            tx.execute("mark_srs_purged", study_uid=study_uid, now=now)
            # The patient data goes with the files: identifiers and clinical values.
            record_ids = [r["id"] for r in tx.all("clinical_records_of_study", study_uid=study_uid)]
            tx.execute("forget_study_identifiers", study_uid=study_uid)
            records_deleted = tx.execute("delete_unlinked_clinical_records", ids=json.dumps(record_ids))
        removed = 0
        for relative_path in paths:
            path = spool.path_of(relative_path)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        for relative_path in paths:
            top = spool.directory / relative_path.split("/", 1)[0]  # instances/ or sr/ stay
            remove_empty_directories(spool.path_of(relative_path).parent, top)
    _log().info("study_files_removed", study_uid=study_uid, files=removed, clinical_records_deleted=records_deleted)
    return removed


def expire_unmatched_clinical_records(spool: Spool, *, now: float, retention_s: float) -> int:
    """Delete clinical records no study uses that arrived more than ``retention_s`` ago; returns how many.

    A record whose study never arrives (or that a correction superseded)
    would otherwise keep a patient's identifiers and clinical values forever.
    """
    with spool.transaction() as tx:
        deleted = tx.execute("expire_unmatched_clinical_records", received_before=now - retention_s)
    if deleted:
        _log().info("clinical_records_expired", count=deleted)
    return deleted
