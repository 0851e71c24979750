"""Clinical records from FHIR: the scheduler job that asks the server, and FHIR files dropped in the inbox.

A study whose images are complete and that has no clinical record
(``waiting_for_clinical``) is looked up on the configured FHIR server
(node.fhir_client), at most once per ``[fhir] retry_interval_s``.  The values
are chosen in `scoring.fhir_mapping` for the study's date (DICOM StudyDate of
its instances); the record is stored like an imported one (matched by PatientID
+ StudyInstanceUID), so completion moves the study on.

When the record cannot be made (server unreachable, no Patient, a missing
code, a conflict, bad content), the study keeps waiting and the reason is kept
in ``<spool>/fhir-waiting.json`` for `sclc-node status`; it holds study UIDs
and reasons, never a patient identifier.  The reason is replaced at each try
and dropped once the study has a record.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from sclc_risk_node.node.config import FhirConfig
from sclc_risk_node.node.files import write_atomically
from sclc_risk_node.node.logs import get_logger, register_phi_values
from sclc_risk_node.node.records import StudyRecord
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError
from sclc_risk_node.scoring.fhir_mapping import (
    StudyContext,
    clinical_record_from_fhir,
    parse_resources,
    patient_references,
)

WAITING_REASONS_FILENAME = "fhir-waiting.json"
#: One pass stops starting lookups after this many request timeouts' worth of time.
PASS_BUDGET_TIMEOUTS = 3


class StudyContextError(InputError):
    """The spool's files do not say who the study's patient is or when it was taken."""


def study_context(spool, study: StudyRecord) -> StudyContext:
    """Patient, study UID, accession and StudyDate of a study in the spool (read from one instance header)."""
    if not study.patient_id:
        raise StudyContextError("the study's instances have no PatientID, so its patient cannot be looked up")
    for instance in spool.study_instances(study.study_instance_uid):
        try:
            header = pydicom.dcmread(instance.path, stop_before_pixels=True, specific_tags=["StudyDate"])
        except Exception:  # noqa: BLE001 - try the next instance
            continue
        text = str(header.get("StudyDate", "") or "").strip()
        try:
            study_date = dt.datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            continue
        return StudyContext(
            patient_id=study.patient_id,
            study_instance_uid=study.study_instance_uid,
            study_date=study_date,
            accession_number=study.accession_number,
        )
    raise StudyContextError("no instance of the study has a valid StudyDate (YYYYMMDD), needed to choose FHIR values")


class WaitingReasons:
    """Why each study still waits for FHIR values; a small JSON file shared with `sclc-node status`."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / WAITING_REASONS_FILENAME
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def reason(self, study_uid: str) -> str | None:
        entry = self.read().get(study_uid)
        return entry.get("reason") if isinstance(entry, dict) else None

    def update(self, changes: dict[str, dict[str, Any] | None], *, keep: Callable[[str], bool] | None = None) -> None:
        """Set (or, with None, drop) entries; with ``keep``, also drop studies it says no longer wait."""
        with self._lock:
            data = self.read()
            for study_uid, entry in changes.items():
                if entry is None:
                    data.pop(study_uid, None)
                else:
                    data[study_uid] = entry
            if keep is not None:
                data = {uid: entry for uid, entry in data.items() if keep(uid)}
            write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True), mode=0o600)


def store_record(spool: Spool, record: ClinicalRecord, *, now: float) -> None:
    StudyMachine(spool).add_clinical_record(
        json.dumps(record.to_mapping(), sort_keys=True),
        accession_number=record.accession_number,
        patient_id=record.patient_id,
        study_instance_uid=record.study_instance_uid,
        now=now,
    )


@dataclass(frozen=True, slots=True)
class LookupOutcome:
    study_instance_uid: str
    found: bool
    reason: str | None = None


class FhirLookup:
    """The `[fhir]` scheduler job: one pass over the studies waiting for a clinical record."""

    def __init__(self, spool, config: FhirConfig, *, client=None, reasons: WaitingReasons | None = None):
        from sclc_risk_node.node.fhir_client import FhirClient

        self.spool = spool
        self.config = config
        self.client = client or FhirClient(config)
        self.reasons = reasons or WaitingReasons(spool.directory)
        self._next_try_at: dict[str, float] = {}
        self._log = get_logger(stage="fhir")

    def run_once(self, *, now: float) -> list[LookupOutcome]:
        waiting = [
            s
            for s in self.spool.list_studies(states=[StudyState.WAITING_FOR_CLINICAL], limit=-1)
            if s.clinical_record_id is None
        ]
        waiting_uids = {s.study_instance_uid for s in waiting}
        outcomes = []
        changes: dict[str, dict[str, Any] | None] = {}
        started = time.monotonic()
        for study in waiting:
            uid = study.study_instance_uid
            if self._next_try_at.get(uid, 0.0) > now:
                continue
            if time.monotonic() - started > PASS_BUDGET_TIMEOUTS * self.config.timeout_s:
                break  # the rest get their turn at the next run, not held behind a slow server
            self._next_try_at[uid] = now + self.config.retry_interval_s
            outcome = self.look_up(study, now=now)
            outcomes.append(outcome)
            changes[uid] = None if outcome.found else {"reason": outcome.reason, "at": now}
        self._next_try_at = {uid: at for uid, at in self._next_try_at.items() if uid in waiting_uids}
        if changes or self.reasons.path.exists():
            self.reasons.update(changes, keep=lambda uid: uid in waiting_uids)
        return outcomes

    def look_up(self, study: StudyRecord, *, now: float) -> LookupOutcome:
        uid = study.study_instance_uid
        try:
            context = study_context(self.spool, study)
            register_phi_values([context.patient_id, context.accession_number])
            earliest = context.study_date - dt.timedelta(days=self.config.lookback_days)
            search = self.client.patient_resources(
                context.patient_id,
                since=earliest,
                until=context.study_date,
                identifier_system=self.config.patient_identifier_system,
            )
            resources = parse_resources(list(search.resources))
            record = clinical_record_from_fhir(
                resources,
                context,
                patient_refs=search.patient_refs,
                lookback_days=self.config.lookback_days,
                identifier_system=self.config.patient_identifier_system,
            )
        except ClinicalRecordError as exc:
            reason = "FHIR: " + "; ".join(exc.problems)
            self._log.info("fhir_record_incomplete", study_uid=uid, problems=len(exc.problems))
            return LookupOutcome(uid, False, reason)
        except InputError as exc:
            self._log.warning("fhir_lookup_failed", study_uid=uid, reason=str(exc))
            return LookupOutcome(uid, False, f"FHIR: {exc}")
        store_record(self.spool, record, now=now)
        self._log.info("fhir_record_stored", study_uid=uid, values=len(record.provenance))
        return LookupOutcome(uid, True)


def records_from_fhir_json(
    data: Any, contexts: list[StudyContext], *, lookback_days: float, identifier_system: str | None
) -> list[ClinicalRecord]:
    """Records for the studies in ``contexts`` from a dropped Bundle/Observation file's JSON.

    The patient is recognised by Patient resources carrying the study's PatientID,
    or by Observations whose subject is a logical reference with that identifier.
    Raises `ClinicalRecordError` (every problem, prefixed by the study UID when several).
    """
    resources = parse_resources(data)
    records, problems = [], []
    for context in contexts:
        refs = patient_references(resources, context.patient_id, identifier_system)
        try:
            records.append(
                clinical_record_from_fhir(
                    resources,
                    context,
                    patient_refs=refs,
                    lookback_days=lookback_days,
                    identifier_system=identifier_system,
                )
            )
        except ClinicalRecordError as exc:
            prefix = f"study {context.study_instance_uid}: " if len(contexts) > 1 else ""
            problems += [prefix + p for p in exc.problems]
    if problems:
        raise ClinicalRecordError(problems)
    return records


def fhir_patient_ids(data: Any, identifier_system: str | None) -> set[str]:
    """The patient identifier values a FHIR file names (Patient.identifier, Observation.subject.identifier)."""
    values = set()
    for resource in parse_resources(data):
        kind = resource.get_resource_type()
        identifiers = (
            list(resource.identifier or ())
            if kind == "Patient"
            else [resource.subject.identifier]
            if kind == "Observation" and resource.subject is not None
            else []
        )
        for identifier in identifiers:
            if (
                identifier is not None
                and identifier.value
                and (identifier_system is None or identifier.system == identifier_system)
            ):
                values.add(identifier.value)
    return values


def ct_study_context(ct_dir: Path) -> StudyContext:
    """The study a folder of CT files belongs to (for `sclc-node score --clinical bundle.json`)."""
    for path in sorted(Path(ct_dir).iterdir()):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not a DICOM file: try the next
            continue
        patient_id = str(header.get("PatientID", "") or "").strip()
        try:
            study_date = dt.datetime.strptime(str(header.get("StudyDate", "") or "").strip(), "%Y%m%d").date()
        except ValueError:
            raise StudyContextError(
                f"{path.name} has no valid StudyDate (YYYYMMDD), needed to choose FHIR values"
            ) from None
        if not patient_id:
            raise StudyContextError(f"{path.name} has no PatientID, needed to find the patient's FHIR resources")
        return StudyContext(
            patient_id=patient_id,
            study_instance_uid=str(header.StudyInstanceUID),
            study_date=study_date,
            accession_number=str(header.get("AccessionNumber", "") or "").strip() or None,
        )
    raise StudyContextError(f"no DICOM file in {ct_dir}")
