"""Clinical records in: a watched inbox folder and `sclc-node clinical import`.

A file is imported whole or not at all.  An accepted file moves to
``accepted/``; a rejected one moves to ``rejected/`` beside a
``<name>.error.txt`` that lists every problem by place, field and what is
allowed, but never a value from the file (`withhold_content`): the note is a
new file, and what the sender wrote stays only in the sender's file.
`sclc-node clinical import FILE`, run by the operator, shows the values.

The inbox reads only regular files, opened with ``O_NOFOLLOW``: a symbolic
link (which could point at any file the service may read) or a FIFO, device
or socket is moved to ``rejected/`` unread.

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

import errno
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sclc_risk_node.node import audit
from sclc_risk_node.node.clinical_files import (
    CLINICAL_SUFFIXES,
    fhir_json,
    fhir_json_bytes,
    load_clinical_file,
    parse_clinical_bytes,
)
from sclc_risk_node.node.logs import get_logger, register_phi_values
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.scoring.clinical import ACCEPTED_FIELDS, ClinicalRecord
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError

ACCEPTED_DIR = "accepted"
REJECTED_DIR = "rejected"
#: A file younger than this may still be being written by the sender.
SETTLE_S = 1.0
#: Larger than any honest clinical file (a CSV of thousands of patients is a few MB).
MAX_CLINICAL_FILE_BYTES = 16 * 1024 * 1024
#: A FHIR file whose patient has no study in the spool is rejected after this long.
FHIR_FILE_WAIT_S = 24 * 3600.0
#: Without a `[fhir]` config (e.g. in tests), FHIR files use its defaults.
DEFAULT_LOOKBACK_DAYS = 90.0


@dataclass(frozen=True, slots=True)
class ImportReport:
    file_name: str
    records: int
    #: Studies whose current clinical record now comes from this file.
    matched_studies: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    #: Why a record was not attached to any study (yet).
    notes: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return not self.problems


def import_clinical_file(spool, path: Path, *, now: float, source: str | None = None, fhir=None) -> ImportReport:
    """Validate every record in ``path`` and store them in the spool; raises `ClinicalRecordError` if any is bad.

    ``source`` is who imports it, for the audit trail (default: the local user running this).
    A FHIR file gives records for the studies of its patient already in the spool without one
    (``fhir`` is the `FhirConfig`; None uses its defaults).
    """
    data = fhir_json(path)
    if data is not None:
        from sclc_risk_node.node.fhir_lookup import store_record

        fhir_records = fhir_records_for_spool(spool, data, fhir)
        if not fhir_records:
            raise ClinicalRecordError(["FHIR file: no study of its patient without a clinical record is in the spool"])
        for record in fhir_records:
            store_record(spool, record, now=now)
        return ImportReport(Path(path).name, len(fhir_records), tuple(r.study_instance_uid for r in fhir_records))
    return import_clinical_records(
        spool, load_clinical_file(path), Path(path).name, now=now, source=source or audit.local_user()
    )


def import_clinical_records(
    spool, records: Sequence[ClinicalRecord], file_name: str, *, now: float, source: str | None = None
) -> ImportReport:
    """Store validated records (all or none); raises `ClinicalRecordError` if any cannot be matched to a study."""
    unmatchable = [
        f"record {n}: needs an accession_number, or a patient_id and a study_instance_uid, to be matched to a study"
        for n, r in enumerate(records, start=1)
        if not r.accession_number and not (r.patient_id and r.study_instance_uid)
    ]
    if unmatchable:
        # Checked before storing anything, so a file is imported whole or not at all.
        raise ClinicalRecordError(unmatchable)
    register_phi_values(value for r in records for value in (r.patient_id, r.accession_number))
    machine = StudyMachine(spool)  # linking a record can move a waiting study on: the machine's job
    stored = [
        machine.add_clinical_record(
            json.dumps(record.to_mapping(), sort_keys=True),
            accession_number=record.accession_number,
            patient_id=record.patient_id,
            study_instance_uid=record.study_instance_uid,
            now=now,
            source=source,
        )
        for record in records
    ]
    # What the spool actually linked, read back: never what a record might match.
    matched: list[str] = []
    notes: list[str] = []
    for number, (record, row) in enumerate(zip(records, stored), start=1):
        linked = spool.studies_linked_to_record(row.record_id)
        matched += linked
        if not linked:
            notes.append(f"record {number}: " + _why_not_attached(spool, record))
    return ImportReport(file_name, len(records), tuple(dict.fromkeys(matched)), notes=tuple(notes))


def _why_not_attached(spool, record: ClinicalRecord) -> str:
    from sclc_risk_node.node.states import CLINICAL_LINKABLE_STATES

    named = spool.get_study(record.study_instance_uid) if record.study_instance_uid else None
    if named is None:
        return "no study received so far matches it; it is kept and attached when its study arrives"
    if named.state not in CLINICAL_LINKABLE_STATES:
        return (
            f"names study {named.study_instance_uid}, which is already {named.state}; "
            "a later record is kept but not used for a study whose scoring has started"
        )
    return (
        f"names study {named.study_instance_uid}, which is in the spool but has a different "
        "accession number or patient ID; not attached"
    )


def fhir_records_for_spool(spool, data: object, fhir=None) -> list:
    """Records from FHIR JSON for every study of its patient in the spool that still lacks one ([] if none).

    ``fhir`` is the `FhirConfig` (identifier system, look-back); None uses its defaults.
    Raises `ClinicalRecordError` listing every problem.
    """
    from sclc_risk_node.node.fhir_lookup import fhir_patient_ids, records_from_fhir_json, study_context

    system = fhir.patient_identifier_system if fhir else None
    lookback_days = fhir.lookback_days if fhir else DEFAULT_LOOKBACK_DAYS
    patient_ids = fhir_patient_ids(data, system)
    register_phi_values(patient_ids)
    if not patient_ids:
        raise ClinicalRecordError(
            [
                "FHIR file names no patient identifier (needed: a Patient resource with the study's PatientID"
                + (f" in system {system}" if system else "")
                + ", or Observation.subject.identifier)"
            ]
        )
    studies = [
        s
        for s in spool.list_studies(states=[StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL], limit=-1)
        if s.patient_id in patient_ids and s.clinical_record_id is None
    ]
    if not studies:
        return []
    contexts = [study_context(spool, s) for s in studies]
    return records_from_fhir_json(data, contexts, lookback_days=lookback_days, identifier_system=system)


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
        """Entries named like clinical files and settled, links and special files included (they are rejected)."""
        files = []
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(".") or entry.suffix.lower() not in CLINICAL_SUFFIXES:
                continue  # hidden files are senders' temporary files
            try:
                info = entry.lstat()  # the entry itself: never follow a link to judge it
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                continue
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime < SETTLE_S:
                continue
            files.append(entry)
        return files

    def scan(self, *, now: float | None = None) -> list[ImportReport]:
        now = time.time() if now is None else now
        reports = []
        for path in self.pending_files(now=now):
            # Read once, as a regular file and without following a link, before anything parses it.
            try:
                data = read_regular_file(path)
            except NotARegularFile as exc:
                reports.append(self._reject(path, [str(exc)]))
                continue
            fhir = fhir_json_bytes(path.name, data)
            report = self._import_fhir(path, fhir, now=now) if fhir is not None else self._import(path, data, now=now)
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
                info = entry.lstat()
                if not stat.S_ISDIR(info.st_mode) and now - info.st_mtime >= retention_s:
                    entry.unlink()
                    removed += 1
        return removed

    def _import(self, path: Path, data: bytes, *, now: float) -> ImportReport:
        try:
            report = import_clinical_records(
                self.spool,
                parse_clinical_bytes(path.name, data),
                path.name,
                now=now,
                source=audit.clinical_inbox(file_reference(path.name)),
            )
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
        from sclc_risk_node.node.fhir_lookup import store_record

        try:
            records = fhir_records_for_spool(self.spool, data, self.fhir)
            if not records and now - path.lstat().st_mtime >= FHIR_FILE_WAIT_S:
                raise ClinicalRecordError(
                    [
                        f"FHIR file: no study of its patient without a clinical record arrived within {FHIR_FILE_WAIT_S:.0f} s"
                    ]
                )
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
        self._log.info(
            "clinical_file_accepted",
            file_ref=file_reference(path.name),
            records=len(records),
            matched_studies=len(records),
            format="fhir",
        )
        return ImportReport(path.name, len(records), tuple(r.study_instance_uid for r in records))

    def _reject(self, path: Path, problems: list[str]) -> ImportReport:
        target = _unique_target(self.directory / REJECTED_DIR, path.name)
        os.replace(path, target)
        error_file = target.with_name(target.name + ".error.txt")
        note = (
            f"{path.name} was rejected; nothing from it was imported.\n"
            + "".join(f"- {withhold_content(problem)}\n" for problem in problems)
            + "Values from the file are not repeated here; `sclc-node clinical import FILE` shows them.\n"
        )
        fd = os.open(error_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(note)
        self._log.warning(
            "clinical_file_rejected",
            file_ref=file_reference(path.name),
            problems=len(problems),
            folder=str(target.parent),
        )
        return ImportReport(path.name, 0, problems=tuple(problems))


class NotARegularFile(InputError):
    """An inbox entry that is a symbolic link, FIFO, device or socket, or too large: rejected unread."""


def read_regular_file(path: Path, *, max_bytes: int = MAX_CLINICAL_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file, opened without following a symbolic link.

    ``O_NOFOLLOW`` makes the open itself fail on a link (no check-then-open
    race), ``O_NONBLOCK`` keeps a FIFO from blocking the scan, and ``fstat`` on
    the open descriptor checks what was actually opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotARegularFile(
                f"{path.name}: is a symbolic link; only regular files are read (nothing was read)"
            ) from None
        raise NotARegularFile(f"{path.name}: cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{path.name}: is not a regular file (a FIFO, device or socket); nothing was read")
        if info.st_size > max_bytes:
            raise NotARegularFile(
                f"{path.name}: {info.st_size} bytes is more than the {max_bytes} a clinical file may have"
            )
        return handle.read(max_bytes + 1)


#: Words a problem text may keep: the places and field names the parsers use.
_PLACE = re.compile(r"(record|row|line|column) \d+|header|json|csv|labs|identifier|identifiers|record")
_KNOWN_FIELDS = frozenset(ACCEPTED_FIELDS)
#: What a problem says, in the parsers' own words (scoring.clinical), most specific first.
_PROBLEM_KINDS = (
    ("is a symbolic link", "is a symbolic link; only regular files are read (nothing was read)"),
    ("is not a regular file", "is not a regular file; nothing was read"),
    ("bytes is more than", "is larger than a clinical file may be"),
    ("cannot be opened", "cannot be opened"),
    ("not valid JSON", "not valid JSON"),
    ("not valid CSV", "not valid CSV"),
    ("is not UTF-8 text", "is not UTF-8 text"),
    ("unknown format", "unknown format (expected .json or .csv)"),
    ("looks semicolon-separated", "looks semicolon-separated"),
    ("a header but no record rows", "a header but no record rows"),
    ("cells but the header has", "has a different number of cells than the header has columns"),
    ("appears twice", "a column appears twice"),
    ("has no name", "a column has no name"),
    ("unknown field", "unknown field"),
    ("given more than once", "given more than once"),
    ("same as", "same study as another record"),
    ("records where one object was expected", "a list where one object was expected"),
    ("is not an object", "is not an object"),
    ("does not refine t_stage", "does not refine t_stage"),
    ("does not match whether labs are present", "does not match whether labs are present"),
    ("is not less than wbc", "is not less than wbc"),
    ("but labs give", "disagrees with the LIPI the labs give"),
    ("contradicts m_stage", "contradicts m_stage"),
    ("is not an AJCC", "is not an AJCC 8th-edition stage"),
    ("is not a LIPI class", "is not a LIPI class"),
    ("is not a yes/no value", "is not a yes/no value"),
    ("is not a DICOM UID", "is not a DICOM UID"),
    ("contains a backslash or control character", "contains a backslash or control character"),
    ("characters", "is too long"),
    ("is not an integer", "is not an integer"),
    ("is not a number", "is not a number"),
    ("is a number", "is a number, not a string"),
    ("is not text", "is not text"),
    ("is not positive", "is not positive"),
    ("is out of range", "is out of range"),
    ("is not allowed", "is not allowed"),
    ("missing", "missing"),
    ("empty", "empty"),
)


#: A FHIR problem names the item it concerns as "<item> (LOINC <code>)" (scoring.fhir_mapping).
_FHIR_ITEM = re.compile(r"(?:(missing|conflict): )?(.{1,40}?) \(LOINC (\d{1,7}-\d)\)")
#: What a FHIR problem says (scoring.fhir_mapping's words), most specific first.
_FHIR_PROBLEM_KINDS = (
    ("is for another patient", "an Observation is for another patient than the study's"),
    ("has no effective date", "an Observation has no effective date"),
    ("carries several of the LOINC codes", "an Observation carries several of the LOINC codes read"),
    ("no usable Observation", "no usable Observation in the look-back window"),
    ("has different values", "Observations at the same time disagree"),
    ("reference-range upper limits", "needs exactly one reference-range upper limit (the ULN in U/L)"),
    ("is not UCUM", "unit system is not UCUM"),
    ("wrong unit", "wrong unit"),
    ("unit ", "wrong unit"),
    ("not an exact number", "not an exact number"),
    ("has no valueQuantity", "has no valueQuantity"),
    ("unknown value code", "unknown value code"),
    ("names several", "its value names several categories"),
    ("not a whole score", "is not a whole score (allowed: integer 0-4)"),
    ("has no value", "has no value"),
)


def _withhold_fhir_content(problem: str) -> str | None:
    """A FHIR problem kept to its item, LOINC code and kind (no resource ids, values or codes from the file)."""
    from sclc_risk_node.scoring.fhir_mapping import ITEM_BY_CODE

    found = _FHIR_ITEM.search(problem)
    if found is None:
        if problem.startswith("FHIR file: no study of its patient"):
            return problem  # our own words only
        if "not a valid FHIR R4" in problem or "not a resource" in problem:
            return "FHIR content: not a valid FHIR R4 resource"
        return None
    prefix, name, code = found.groups()
    item = ITEM_BY_CODE.get(code)
    if item is None or item.name != name.strip():
        return None
    kind = next((text for phrase, text in _FHIR_PROBLEM_KINDS if phrase in problem), "value not accepted")
    return f"{prefix + ': ' if prefix else ''}{item.name} (LOINC {item.code}): {kind}"


def withhold_content(problem: str) -> str:
    """A problem text rebuilt from the parsers' own words only: place, known field name, kind, allowed values.

    Anything that came from the file (a value, an unknown column name, a
    quoted key, a FHIR resource id) is left out, so a rejection note never
    repeats file content, whatever the file was (issue 10: a symlinked /etc
    file was quoted).
    """
    fhir = _withhold_fhir_content(problem)
    if fhir is not None:
        return fhir
    head, separator, allowed = problem.rpartition(" (allowed: ")
    if not separator:
        head, allowed = problem, ""
    parts = head.split(": ")
    kept = []
    while parts and _PLACE.fullmatch(parts[0]):
        kept.append(parts.pop(0))
    if parts and parts[0] in _KNOWN_FIELDS:
        kept.append(parts.pop(0))
    rest = ": ".join(parts)
    kind = next((text for phrase, text in _PROBLEM_KINDS if phrase in rest), "value not accepted")
    line = ": ".join([*kept, kind])
    # The allowed part is the parsers' fixed text, but only after a field or place we recognised.
    if allowed and kept and allowed.endswith(")") and "'" not in allowed and '"' not in allowed:
        line += f" (allowed: {allowed}"
    return line


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
