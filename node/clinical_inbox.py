"""Clinical records in: a watched inbox folder and `sclc-node clinical import`.

A file is imported whole or not at all.  An accepted file moves to
``accepted/``; a rejected one moves to ``rejected/`` beside a
``<name>.error.txt`` that lists every problem (field, value, what is allowed).
Records are matched to studies by the spool (AccessionNumber, else PatientID +
StudyInstanceUID), whether the images came first or not.

A FHIR R4 Bundle or Observation file (``.json`` with a ``resourceType``) is
different: its values are chosen per study date (scoring.fhir_mapping), so it
is read when a study of its patient (Patient.identifier or the Observations'
``subject.identifier`` equal to the study's PatientID) is in the spool without
a record.  Until then it stays in the inbox; after `FHIR_FILE_WAIT_S` with no
such study it is rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from node.clinical_files import CLINICAL_SUFFIXES, fhir_json, load_clinical_file
from node.logs import get_logger, register_phi_values
from node.states import StudyState
from scoring.errors import ClinicalRecordError, InputError

ACCEPTED_DIR = "accepted"
REJECTED_DIR = "rejected"
#: A file younger than this may still be being written by the sender.
SETTLE_S = 1.0
#: A FHIR file whose patient has no study in the spool is rejected after this long.
FHIR_FILE_WAIT_S = 24 * 3600.0
#: Without a `[fhir]` config (e.g. in tests), FHIR files use its defaults.
DEFAULT_LOOKBACK_DAYS = 90.0


@dataclass(frozen=True, slots=True)
class ImportReport:
    file_name: str
    records: int
    matched_studies: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.problems


def import_clinical_file(spool, path: Path, *, now: float, fhir=None) -> ImportReport:
    """Validate every record in ``path`` and store them in the spool; raises `ClinicalRecordError` if any is bad.

    A FHIR file gives records for the studies of its patient already in the spool without one.
    """
    data = fhir_json(path)
    if data is not None:
        from node.fhir_lookup import store_record

        fhir_records = fhir_records_for_spool(spool, data, fhir)
        if not fhir_records:
            raise ClinicalRecordError(["FHIR file: no study of its patient without a clinical record is in the spool"])
        for record in fhir_records:
            store_record(spool, record, now=now)
        return ImportReport(Path(path).name, len(fhir_records), tuple(r.study_instance_uid for r in fhir_records))
    records = load_clinical_file(path)
    unmatchable = [
        f"record {n}: needs an accession_number, or a patient_id and a study_instance_uid, to be matched to a study"
        for n, r in enumerate(records, start=1)
        if not r.accession_number and not (r.patient_id and r.study_instance_uid)
    ]
    if unmatchable:
        # Checked before storing anything, so a file is imported whole or not at all.
        raise ClinicalRecordError(unmatchable)
    register_phi_values(value for r in records for value in (r.patient_id, r.accession_number))
    matched: list[str] = []
    for record in records:
        spool.add_clinical_record(
            json.dumps(record.to_mapping(), sort_keys=True),
            accession_number=record.accession_number,
            patient_id=record.patient_id,
            study_instance_uid=record.study_instance_uid,
            now=now,
        )
        matched += [
            s.study_instance_uid
            for s in spool.list_studies(limit=-1)
            if s.clinical_record_id is not None and _matches(record, s)
        ]
    return ImportReport(Path(path).name, len(records), tuple(dict.fromkeys(matched)))


def fhir_records_for_spool(spool, data: object, fhir=None) -> list:
    """Records from FHIR JSON for every study of its patient in the spool that still lacks one ([] if none).

    ``fhir`` is the `FhirConfig` (identifier system, look-back); None uses its defaults.
    Raises `ClinicalRecordError` listing every problem.
    """
    from node.fhir_lookup import fhir_patient_ids, records_from_fhir_json, study_context

    system = fhir.patient_identifier_system if fhir else None
    lookback_days = fhir.lookback_days if fhir else DEFAULT_LOOKBACK_DAYS
    patient_ids = fhir_patient_ids(data, system)
    register_phi_values(patient_ids)
    if not patient_ids:
        raise ClinicalRecordError([
            "FHIR file names no patient identifier (needed: a Patient resource with the study's PatientID"
            + (f" in system {system}" if system else "")
            + ", or Observation.subject.identifier)"
        ])
    studies = [
        s for s in spool.list_studies(states=[StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL], limit=-1)
        if s.patient_id in patient_ids and s.clinical_record_id is None
    ]
    if not studies:
        return []
    contexts = [study_context(spool, s) for s in studies]
    return records_from_fhir_json(data, contexts, lookback_days=lookback_days, identifier_system=system)


def _matches(record, study) -> bool:
    if record.accession_number and study.accession_number:
        return record.accession_number == study.accession_number
    return bool(record.study_instance_uid) and record.study_instance_uid == study.study_instance_uid


class ClinicalInbox:
    """Polls a folder for ``.json``/``.csv`` clinical files."""

    def __init__(self, directory: Path, spool, *, fhir=None):
        self.directory = Path(directory)
        self.spool = spool
        #: `FhirConfig` (identifier system, look-back) for FHIR files; None: its defaults.
        self.fhir = fhir
        self._waiting_files: set[str] = set()
        self._log = get_logger(stage="clinical_inbox")
        for name in (ACCEPTED_DIR, REJECTED_DIR):
            (self.directory / name).mkdir(mode=0o700, parents=True, exist_ok=True)

    def pending_files(self, *, now: float) -> list[Path]:
        files = []
        for entry in sorted(self.directory.iterdir()):
            if not entry.is_file() or entry.name.startswith("."):
                continue  # hidden files are senders' temporary files
            if entry.suffix.lower() not in CLINICAL_SUFFIXES:
                continue
            if now - entry.stat().st_mtime < SETTLE_S:
                continue
            files.append(entry)
        return files

    def scan(self, *, now: float | None = None) -> list[ImportReport]:
        now = time.time() if now is None else now
        reports = []
        for path in self.pending_files(now=now):
            data = fhir_json(path)
            report = self._import_fhir(path, data, now=now) if data is not None else self._import(path, now=now)
            if report is not None:
                reports.append(report)
        return reports

    def remove_old_files(self, *, now: float, accepted_retention_s: float, rejected_retention_s: float) -> int:
        """Delete imported and rejected files past their retention: they hold patient identifiers.

        The records themselves live on in the spool; a rejected file (and its
        ``.error.txt``) is kept as long as failed studies, for investigation.
        """
        removed = 0
        for folder, retention_s in ((ACCEPTED_DIR, accepted_retention_s), (REJECTED_DIR, rejected_retention_s)):
            for entry in (self.directory / folder).iterdir():
                if entry.is_file() and now - entry.stat().st_mtime >= retention_s:
                    entry.unlink()
                    removed += 1
        return removed

    def _import(self, path: Path, *, now: float) -> ImportReport:
        try:
            report = import_clinical_file(self.spool, path, now=now)
        except ClinicalRecordError as exc:
            return self._reject(path, list(exc.problems))
        except InputError as exc:
            return self._reject(path, [str(exc)])
        target = _unique_target(self.directory / ACCEPTED_DIR, path.name)
        os.replace(path, target)
        self._log.info(
            "clinical_file_accepted",
            file_ref=file_reference(path.name),
            records=report.records,
            matched_studies=len(report.matched_studies),
        )
        return report

    def _import_fhir(self, path: Path, data: object, *, now: float) -> ImportReport | None:
        """Records from a FHIR file for its patient's studies that lack one; None while no such study is here."""
        from node.fhir_lookup import store_record

        try:
            records = fhir_records_for_spool(self.spool, data, self.fhir)
            if not records and now - path.stat().st_mtime >= FHIR_FILE_WAIT_S:
                raise ClinicalRecordError([
                    f"FHIR file: no study of its patient without a clinical record arrived within {FHIR_FILE_WAIT_S:.0f} s"
                ])
        except ClinicalRecordError as exc:
            self._waiting_files.discard(path.name)
            return self._reject(path, list(exc.problems))
        except InputError as exc:
            self._waiting_files.discard(path.name)
            return self._reject(path, [str(exc)])
        if not records:
            if path.name not in self._waiting_files:
                self._waiting_files.add(path.name)
                self._log.info("fhir_file_waiting_for_study", file_ref=file_reference(path.name))
            return None
        for record in records:
            store_record(self.spool, record, now=now)
        self._waiting_files.discard(path.name)
        os.replace(path, _unique_target(self.directory / ACCEPTED_DIR, path.name))
        self._log.info("clinical_file_accepted", file_ref=file_reference(path.name), records=len(records),
                       matched_studies=len(records), format="fhir")
        return ImportReport(path.name, len(records), tuple(r.study_instance_uid for r in records))

    def _reject(self, path: Path, problems: list[str]) -> ImportReport:
        target = _unique_target(self.directory / REJECTED_DIR, path.name)
        os.replace(path, target)
        error_file = target.with_name(target.name + ".error.txt")
        error_file.write_text(
            f"{path.name} was rejected; nothing from it was imported.\n"
            + "".join(f"- {problem}\n" for problem in problems),
            encoding="utf-8",
        )
        self._log.warning(
            "clinical_file_rejected", file_ref=file_reference(path.name), problems=len(problems), folder=str(target.parent)
        )
        return ImportReport(path.name, 0, problems=tuple(problems))


def file_reference(name: str) -> str:
    """A stable short tag for a file name; senders often name files after the patient, so the name is not logged."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def _unique_target(directory: Path, name: str) -> Path:
    target = directory / name
    counter = 1
    while target.exists():
        target = directory / f"{Path(name).stem}.{counter}{Path(name).suffix}"
        counter += 1
    return target
