"""FHIR R4 Observations -> the validated `ClinicalRecord`.  Pure: resources in (parsed JSON), record out.

The node's FHIR client (node/fhir_client.py) and the clinical inbox hand this
module what a FHIR server or an exported Bundle holds; everything about which
value counts is decided here, so both paths agree.  The mapping is documented
in docs/clinical-record.md ("From FHIR R4"):

=========  ==========  ================================================  ===========================
field      LOINC       value                                             unit (UCUM)
=========  ==========  ================================================  ===========================
ecog       89247-1     valueInteger, or LOINC answer LA9622-7..LA9627-6  none
t_stage    21905-5     valueCodeableConcept/valueString, e.g. "cT2a"     none
n_stage    21906-3     ″ e.g. "cN2"                                      none
m_stage    21907-1     ″ e.g. "cM1c"                                     none
ldh        2532-0      valueQuantity; ``ldh_uln`` = referenceRange.high  U/L
wbc        6690-2      valueQuantity                                     10*9/L (10*3/uL, /uL, ...)
anc        751-8       valueQuantity                                     ″
=========  ==========  ================================================  ===========================

For each code the most recent usable Observation (status final, amended or
corrected) dated on or before the study date and at most ``lookback_days``
before it is taken.  Two different values at that same most recent date are a
conflict.  Every problem (a missing code, a conflict, a wrong unit, a value
code that maps to nothing, an Observation for another patient) is collected
and raised together as one `FhirRecordError` naming the LOINC code, so the
study waits with a reason an operator can act on.

Resources are parsed with ``fhir.resources`` (its R4B models: FHIR 4.3, whose
Patient, Observation and Bundle are R4's with no breaking change).  Patient
identifiers are PHI: no message here contains one, nor a patient's logical id.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sclc_risk_node.scoring.clinical import ClinicalRecord, ValueProvenance, clinical_record_from_mapping
from sclc_risk_node.scoring.errors import ClinicalRecordError

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
#: Statuses whose value may be used (FHIR R4 ObservationStatus); others (preliminary,
#: registered, entered-in-error, cancelled, unknown) are skipped without complaint.
USABLE_STATUSES = frozenset({"final", "amended", "corrected"})


@dataclass(frozen=True, slots=True)
class LoincItem:
    code: str
    name: str
    fields: tuple[str, ...]


ECOG = LoincItem("89247-1", "ECOG performance status", ("ecog",))
T_STAGE = LoincItem("21905-5", "clinical T category", ("t_stage",))
N_STAGE = LoincItem("21906-3", "clinical N category", ("n_stage",))
M_STAGE = LoincItem("21907-1", "clinical M category", ("m_stage",))
LDH = LoincItem("2532-0", "LDH", ("ldh", "ldh_uln"))
WBC = LoincItem("6690-2", "WBC", ("wbc",))
ANC = LoincItem("751-8", "ANC", ("anc",))
#: Every code the node asks for; all are needed (LIPI is computed from the three labs).
LOINC_ITEMS = (ECOG, T_STAGE, N_STAGE, M_STAGE, LDH, WBC, ANC)
ITEM_BY_CODE = {item.code: item for item in LOINC_ITEMS}

#: LOINC answer list LL529-9 (ECOG performance status) -> score.
ECOG_ANSWERS = {
    "LA9622-7": 0,
    "LA9623-5": 1,
    "LA9624-3": 2,
    "LA9625-0": 3,
    "LA9626-8": 4,
    "LA9627-6": 5,  # dead; refused by the record's 0-4 range check
}
#: UCUM codes of LDH activity concentration accepted as-is (U/L).
LDH_UNITS = {"U/L": Decimal(1), "[IU]/L": Decimal(1)}
#: UCUM codes of cell counts per volume -> factor to 10^9/L.
COUNT_UNITS = {
    "10*9/L": Decimal(1),
    "10*3/uL": Decimal(1),
    "10*3/mm3": Decimal(1),
    "/nL": Decimal(1),
    "10*6/mL": Decimal(1),
    "/uL": Decimal("0.001"),
    "/mm3": Decimal("0.001"),
}
# An AJCC category as EHRs write it: "cT2a", "T2a", "AJCC cT2a", SNOMED displays
# "American Joint Committee on Cancer cT2a (qualifier value)".
_CATEGORY = re.compile(r"(?<![A-Za-z0-9])(?:[cpy]|yc|yp)?([TNM])([0-4](?:mi|[a-c])?)(?![A-Za-z0-9])")


class FhirRecordError(ClinicalRecordError):
    """The FHIR resources do not (yet) give a complete, consistent record; ``problems`` names each code."""


@dataclass(frozen=True, slots=True)
class StudyContext:
    """The study the record is for: its identifiers and the date its CT was taken (DICOM StudyDate)."""

    patient_id: str
    study_instance_uid: str
    study_date: dt.date
    accession_number: str | None = None


@dataclass(frozen=True, slots=True)
class _Candidate:
    item: LoincItem
    values: tuple[tuple[str, object], ...]  # (field, value)
    resource: str
    effective: dt.datetime  # for ordering: UTC when the source gave an offset
    effective_text: str


def parse_resources(data: Any) -> list[Any]:
    """fhir.resources models of a Bundle's entries, an Observation, a Patient, or a JSON list of them.

    Raises `FhirRecordError` naming the resource and the invalid element (never its value).
    """

    items = data if isinstance(data, list) else [data]
    resources, problems = [], []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("resourceType"), str):
            problems.append("FHIR content: not a resource (a JSON object with a resourceType)")
            continue
        kind = item["resourceType"]
        if kind == "Bundle":
            problems_before = len(problems)
            bundle = _validated("Bundle", item, problems)
            if bundle is None or len(problems) > problems_before:
                continue
            for entry in bundle.entry or ():
                if entry.resource is not None:
                    resources.append(entry.resource)
            continue
        if kind not in ("Observation", "Patient"):
            continue  # other resource types carry nothing we read
        model = _validated(kind, item, problems)
        if model is not None:
            resources.append(model)
    if problems:
        raise FhirRecordError(problems)
    return resources


def _validated(kind: str, item: Mapping[str, Any], problems: list[str]) -> Any:
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        return get_fhir_model_class(kind).model_validate(dict(item))
    except ValidationError as exc:
        # Locations and messages only: pydantic's default text repeats input values, which may be PHI.
        where = f"{kind}/{item.get('id')}" if isinstance(item.get("id"), str) else kind
        details = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()[:3]
        )
        more = f" (and {len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
        problems.append(f"{where}: not a valid FHIR R4 {kind} ({details}{more})")
        return None


def patient_references(resources: Sequence[Any], patient_id: str, identifier_system: str | None) -> set[str]:
    """``Patient/<id>`` (and full-URL forms) of the Patient resources whose identifier is ``patient_id``."""
    references = set()
    for resource in resources:
        if resource.get_resource_type() != "Patient" or not resource.id:
            continue
        if any(
            _identifier_matches(identifier, patient_id, identifier_system) for identifier in resource.identifier or ()
        ):
            references.add(f"Patient/{resource.id}")
    return references


def _identifier_matches(identifier: Any, patient_id: str, identifier_system: str | None) -> bool:
    if identifier is None or identifier.value != patient_id:
        return False
    return identifier_system is None or identifier.system == identifier_system


def clinical_record_from_fhir(
    resources: Sequence[Any],
    study: StudyContext,
    *,
    patient_refs: Iterable[str],
    lookback_days: float,
    identifier_system: str | None = None,
) -> ClinicalRecord:
    """The record for ``study`` from parsed resources (see `parse_resources`).

    ``patient_refs`` are the study patient's references (``Patient/<id>``); an
    Observation whose subject is neither one of them nor a logical reference by
    the study's PatientID (``subject.identifier``) belongs to another patient
    and is an error.  Raises `FhirRecordError` listing every problem.
    """
    patient_refs = set(patient_refs)
    earliest = study.study_date - dt.timedelta(days=float(lookback_days))
    window = f"between {earliest.isoformat()} and the study date {study.study_date.isoformat()}"
    problems: list[str] = []
    candidates: dict[str, list[_Candidate]] = {item.code: [] for item in LOINC_ITEMS}
    refused: set[str] = set()
    for resource in resources:
        if resource.get_resource_type() != "Observation":
            continue
        item = _loinc_item(resource, problems)
        if item is None or (resource.status or "") not in USABLE_STATUSES:
            continue
        name = f"Observation/{resource.id or '(no id)'}"
        label = f"{item.name} (LOINC {item.code}) {name}"
        if not _subject_is_patient(resource.subject, patient_refs, study.patient_id, identifier_system):
            problems.append(f"{label} is for another patient than the study's (its subject does not match)")
            continue
        effective, local_date, effective_text = _effective(resource)
        if effective is None or local_date is None:  # both or neither (`_effective`)
            problems.append(f"{label} has no effective date (effectiveDateTime, effectivePeriod or issued)")
            continue
        if not earliest <= local_date <= study.study_date:
            continue
        problems_before = len(problems)
        values = _values(item, resource, label, problems)
        if len(problems) > problems_before:
            refused.add(item.code)
        if values is not None:
            candidates[item.code].append(_Candidate(item, values, name, effective, effective_text))

    chosen: dict[str, object] = {}
    provenance: list[ValueProvenance] = []
    for item in LOINC_ITEMS:
        found = candidates[item.code]
        if not found:
            if item.code in refused:
                continue  # its Observation's own problem says more than "missing"
            problems.append(f"missing: {item.name} (LOINC {item.code}): no usable Observation {window}")
            continue
        latest = max(c.effective for c in found)
        newest = [c for c in found if c.effective == latest]
        distinct = {c.values for c in newest}
        if len(distinct) > 1:
            listing = ", ".join(f"{c.resource}: {_describe(c.values)}" for c in newest)
            problems.append(
                f"conflict: {item.name} (LOINC {item.code}) has different values at {newest[0].effective_text} ({listing})"
            )
            continue
        pick = newest[0]
        for field_name, value in pick.values:
            chosen[field_name] = value
            provenance.append(ValueProvenance(field_name, f"LOINC {item.code}", pick.resource, pick.effective_text))
    if problems:
        raise FhirRecordError(problems)
    mapping: dict[str, object] = dict(chosen)
    mapping["patient_id"] = study.patient_id
    mapping["study_instance_uid"] = study.study_instance_uid
    if study.accession_number:
        mapping["accession_number"] = study.accession_number
    mapping["provenance"] = [p.to_mapping() for p in provenance]
    try:
        return clinical_record_from_mapping(mapping)
    except ClinicalRecordError as exc:
        # Name the code that carried each bad value, so the operator knows which Observation to fix.
        by_field = {p.field: p for p in provenance}
        raise FhirRecordError([_with_source(problem, by_field) for problem in exc.problems]) from None


def _with_source(problem: str, by_field: Mapping[str, ValueProvenance]) -> str:
    field_name = problem.split(":", 1)[0].strip()
    source = by_field.get(field_name)
    return f"{problem} [from {source.code} {source.resource}]" if source else problem


def _loinc_item(resource: Any, problems: list[str]) -> LoincItem | None:
    codes = (
        {
            coding.code
            for coding in resource.code.coding or ()
            if coding.system == LOINC_SYSTEM and coding.code in ITEM_BY_CODE
        }
        if resource.code is not None
        else set()
    )
    if len(codes) > 1:
        problems.append(
            f"Observation/{resource.id or '(no id)'} carries several of the LOINC codes read ({', '.join(sorted(codes))})"
        )
        return None
    return ITEM_BY_CODE[codes.pop()] if codes else None


def _subject_is_patient(subject: Any, patient_refs: set[str], patient_id: str, identifier_system: str | None) -> bool:
    if subject is None:
        return False
    if subject.reference:
        reference = subject.reference
        # An absolute reference ".../Patient/<id>" (Bundle fullUrl style) names the same resource.
        match = re.search(r"(Patient/[^/]+?)(?:/_history/[^/]+)?$", reference)
        return match is not None and match.group(1) in patient_refs
    return _identifier_matches(subject.identifier, patient_id, identifier_system)


def _effective(resource: Any) -> tuple[dt.datetime | None, dt.date | None, str]:
    """(instant for ordering, the date as written, the text for provenance).

    The window compares the date as the source wrote it, since DICOM StudyDate is a local date too.
    """
    for value in (
        resource.effectiveDateTime,
        resource.effectiveInstant,
        resource.effectivePeriod.end if resource.effectivePeriod else None,
        resource.effectivePeriod.start if resource.effectivePeriod else None,
        resource.issued,
    ):
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            ordering = value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value
            return ordering, value.date(), value.isoformat()
        if isinstance(value, dt.date):
            return dt.datetime.combine(value, dt.time()), value, value.isoformat()
        # Partial dates (year, year-month) come back as text; too vague to compare with a study date.
    return None, None, ""


def _values(item: LoincItem, resource: Any, label: str, problems: list[str]) -> tuple[tuple[str, object], ...] | None:
    if item is ECOG:
        score = _ecog(resource, label, problems)
        return None if score is None else (("ecog", score),)
    if item in (T_STAGE, N_STAGE, M_STAGE):
        letter = {T_STAGE: "T", N_STAGE: "N", M_STAGE: "M"}[item]
        category = _category(resource, letter, label, problems)
        return None if category is None else ((item.fields[0], category),)
    if item is LDH:
        ldh = _quantity(resource.valueQuantity, LDH_UNITS, "U/L", label, problems)
        if ldh is None:
            return None
        highs = [r.high for r in resource.referenceRange or () if r.high is not None]
        if len(highs) != 1:
            problems.append(
                f"{label} has {len(highs)} reference-range upper limits (needed: exactly one, the ULN in U/L)"
            )
            return None
        uln = _quantity(highs[0], LDH_UNITS, "U/L", f"{label} referenceRange.high", problems)
        return None if uln is None else (("ldh", ldh), ("ldh_uln", uln))
    count = _quantity(resource.valueQuantity, COUNT_UNITS, "10*9/L", label, problems)
    return None if count is None else ((item.fields[0], count),)


def _ecog(resource: Any, label: str, problems: list[str]) -> int | None:
    if resource.valueInteger is not None:
        return int(resource.valueInteger)
    if resource.valueCodeableConcept is not None:
        codings = [c for c in resource.valueCodeableConcept.coding or () if c.system == LOINC_SYSTEM]
        for coding in codings:
            if coding.code in ECOG_ANSWERS:
                return ECOG_ANSWERS[coding.code]
        shown = ", ".join(f"{c.system} {c.code}" for c in resource.valueCodeableConcept.coding or ()) or "none"
        problems.append(
            f"{label}: unknown value code ({shown}) (allowed: valueInteger 0-4 or LOINC answers "
            f"{', '.join(ECOG_ANSWERS)})"
        )
        return None
    if resource.valueQuantity is not None and resource.valueQuantity.value is not None:
        value = resource.valueQuantity.value
        unit = resource.valueQuantity.code or resource.valueQuantity.unit
        if unit not in (None, "{score}", "1"):
            problems.append(f"{label}: unit {unit!r} (allowed: none, {{score}} or 1)")
            return None
        if value != int(value):
            problems.append(f"{label}: {value} is not a whole score (allowed: integer 0-4)")
            return None
        return int(value)
    problems.append(f"{label} has no value (allowed: valueInteger 0-4 or a LOINC answer code)")
    return None


def _category(resource: Any, letter: str, label: str, problems: list[str]) -> str | None:
    texts: list[str] = []
    if resource.valueCodeableConcept is not None:
        concept = resource.valueCodeableConcept
        for coding in concept.coding or ():
            texts += [coding.code or "", coding.display or ""]
        texts.append(concept.text or "")
    if resource.valueString:
        texts.append(resource.valueString)
    found = {f"{letter}{m.group(2)}" for text in texts for m in _CATEGORY.finditer(text) if m.group(1) == letter}
    if len(found) == 1:
        return found.pop()
    if not texts:
        problems.append(
            f"{label} has no value (allowed: valueCodeableConcept or valueString naming the {letter} category)"
        )
    elif found:
        problems.append(f"{label}: its value names several {letter} categories ({', '.join(sorted(found))})")
    else:
        shown = ", ".join(
            f"{c.system} {c.code}"
            for c in (resource.valueCodeableConcept.coding or () if resource.valueCodeableConcept else ())
        )
        problems.append(
            f"{label}: unknown value code ({shown or 'text only'}): it names no AJCC {letter} category "
            f"(allowed: a code or display such as c{letter}1, or a SNOMED CT AJCC category concept)"
        )
    return None


def _quantity(
    quantity: Any, units: Mapping[str, Decimal], canonical: str, label: str, problems: list[str]
) -> float | None:
    if quantity is None or quantity.value is None:
        problems.append(f"{label} has no valueQuantity (needed: a number in {canonical})")
        return None
    if quantity.comparator:
        problems.append(f"{label}: value is {quantity.comparator} {quantity.value}, not an exact number")
        return None
    if quantity.system is not None and quantity.system != UCUM_SYSTEM:
        problems.append(f"{label}: unit system {quantity.system!r} is not UCUM ({UCUM_SYSTEM})")
        return None
    unit = quantity.code if quantity.code is not None else quantity.unit
    if unit not in units:
        problems.append(f"{label}: wrong unit {unit!r} (allowed UCUM: {', '.join(units)})")
        return None
    return float(Decimal(str(quantity.value)) * units[unit])


def _describe(values: tuple[tuple[str, object], ...]) -> str:
    return ", ".join(f"{name} {value}" for name, value in values)
