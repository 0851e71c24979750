"""Crash recovery: bring the spool's files and its index back in line at start-up, before receiving.

`StudyMachine.recover` runs `recover` with the ``on_indexed`` that files a
re-indexed instance under its study, so recovery itself changes no study state.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sclc_risk_node.node.durable_files import TEMP_SUFFIX
from sclc_risk_node.node.files import fsync_directory
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import InstanceHeader, RecoveryReport, StoreOutcome
from sclc_risk_node.node.spool import INSTANCES_DIR, QUARANTINE_DIR, SR_DIR, InstanceIndexed, Spool


def _log():
    # The spool's stage: operators filter the spool's file work (placing, removing) by it.
    return get_logger(stage="spool")


def recover(spool: Spool, *, now: float, on_indexed: InstanceIndexed) -> RecoveryReport:
    """Bring files and index back in line after a crash.  Run at startup, before receiving.

    `StudyMachine.recover` runs it, with the ``on_indexed`` that files a
    re-indexed instance under its study (as `Spool.place_instance` does).

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
        for temp in (spool.directory / base).rglob("*" + TEMP_SUFFIX):
            temp.unlink(missing_ok=True)
            temp_removed += 1

    with spool.transaction(write=False) as tx:
        instance_rows = tx.all("all_instance_files")
        sr_rows = tx.all("all_sr_files")
    by_path = {row["relative_path"]: row for row in instance_rows}
    by_sop = {row["sop_instance_uid"]: row for row in instance_rows}

    reindexed: list[str] = []
    quarantined: list[Path] = []
    purges_finished = 0
    losers_removed = 0
    for path in sorted((spool.directory / INSTANCES_DIR).rglob("*.dcm")):
        relative_path = path.relative_to(spool.directory).as_posix()
        row = by_path.get(relative_path)
        if row is not None:
            if row["purged_at"] is not None:
                path.unlink(missing_ok=True)
                purges_finished += 1
            continue
        try:
            header = InstanceHeader.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable file goes to quarantine, never deleted
            quarantined.append(_quarantine(spool, path, f"unreadable: {exc}"))
            continue
        if spool.instance_relative_path(header) != relative_path:
            quarantined.append(_quarantine(spool, path, "its UIDs do not match its path"))
            continue
        known = by_sop.get(header.sop_instance_uid)
        if known is not None and known["purged_at"] is None:
            path.unlink()
            losers_removed += 1
            continue
        data = path.read_bytes()
        with spool.study_lock(header.study_instance_uid):
            with spool.transaction() as tx:
                outcome = spool.index_instance_in(
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
        if row["purged_at"] is not None and spool.path_of(row["relative_path"]).exists():
            spool.path_of(row["relative_path"]).unlink()
            purges_finished += 1

    missing = tuple(
        row["sop_instance_uid"]
        for row in instance_rows
        if row["purged_at"] is None and not spool.path_of(row["relative_path"]).exists()
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


def _quarantine(spool: Spool, path: Path, why: str) -> Path:
    target = spool.directory / QUARANTINE_DIR / f"{path.parent.name}-{path.name}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{path.parent.name}-{path.name}.{suffix}")
    os.replace(path, target)
    fsync_directory(target.parent)
    _log().warning("spool_file_quarantined", file=target.name, why=why)
    return target
