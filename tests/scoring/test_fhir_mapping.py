"""FHIR R4 Observations -> ClinicalRecord: value choice, provenance and every kind of bad content."""

from __future__ import annotations

import datetime as dt

import pytest

from sclc_risk_node.scoring.clinical import Lipi, ValueProvenance, clinical_record_from_mapping
from sclc_risk_node.scoring.fhir_mapping import (
    FhirRecordError,
    StudyContext,
    clinical_record_from_fhir,
    parse_resources,
    patient_references,
)
from tests.fhir_fixtures import MRN_SYSTEM, bundle, complete_set, observation, patient, quantity

STUDY_DATE = dt.date(2024, 3, 20)
STUDY = StudyContext("PAT-SECRET-9", "1.2.826.0.1.3680043.8.498.77", STUDY_DATE, "ACC-9")


def record_from(resources, *, lookback_days=90):
    parsed = parse_resources(bundle([patient("p1", STUDY.patient_id), *resources]))
    refs = patient_references(parsed, STUDY.patient_id, MRN_SYSTEM)
    return clinical_record_from_fhir(
        parsed, STUDY, patient_refs=refs, lookback_days=lookback_days, identifier_system=MRN_SYSTEM
    )


def problems_of(resources, **kwargs) -> tuple[str, ...]:
    with pytest.raises(FhirRecordError) as caught:
        record_from(resources, **kwargs)
    text = " ".join(caught.value.problems)
    assert STUDY.patient_id not in text and "p1" not in text.replace("Patient/p1", "")
    return caught.value.problems


def replace(resources, logical_id, **changes):
    return [{**r, **changes} if r["id"] == logical_id else r for r in resources]


def test_complete_set_gives_the_same_record_the_inbox_makes_with_provenance():
    record = record_from(complete_set(STUDY_DATE))
    assert (record.t_stage, record.n_stage, record.m_stage, record.ecog) == ("T3", "N2", "M1c", 1)
    assert record.labs.anc == 5.1 and record.labs.wbc == 7.4  # /uL and 10*3/uL both to 10^9/L
    assert (record.labs.ldh, record.labs.ldh_uln) == (310.0, 250.0)
    assert record.lipi is Lipi.INTERMEDIATE and record.lipi_source == "labs"
    assert (record.patient_id, record.study_instance_uid, record.accession_number) == (
        STUDY.patient_id,
        STUDY.study_instance_uid,
        "ACC-9",
    )
    day = (STUDY_DATE - dt.timedelta(days=3)).isoformat()
    assert ValueProvenance("ldh_uln", "LOINC 2532-0", "Observation/ldh", day) in record.provenance
    assert {p.field for p in record.provenance} == {
        "ecog",
        "t_stage",
        "n_stage",
        "m_stage",
        "ldh",
        "ldh_uln",
        "wbc",
        "anc",
    }
    # The record travels as JSON through the spool and reads back equal, provenance included.
    assert clinical_record_from_mapping(record.to_mapping()) == record


def test_most_recent_value_on_or_before_the_study_date_within_the_window_wins():
    resources = complete_set(STUDY_DATE) + [
        observation("ecog-old", "89247-1", STUDY_DATE - dt.timedelta(days=40), valueInteger=3),
        observation("ecog-same-day", "89247-1", STUDY_DATE, valueInteger=2),
        observation("ecog-after", "89247-1", STUDY_DATE + dt.timedelta(days=1), valueInteger=0),
        observation("ecog-wrong", "89247-1", STUDY_DATE, status="entered-in-error", valueInteger=4),
    ]
    record = record_from(resources)
    assert record.ecog == 2
    assert (
        ValueProvenance("ecog", "LOINC 89247-1", "Observation/ecog-same-day", STUDY_DATE.isoformat())
        in record.provenance
    )


def test_ecog_as_a_loinc_answer_code():
    resources = replace(
        complete_set(STUDY_DATE),
        "ecog",
        valueInteger=None,
        valueCodeableConcept={"coding": [{"system": "http://loinc.org", "code": "LA9624-3"}]},
    )
    assert record_from(resources).ecog == 2


def test_a_missing_code_is_named_with_the_window():
    resources = [r for r in complete_set(STUDY_DATE) if r["id"] != "anc"]
    assert problems_of(resources) == (
        "missing: ANC (LOINC 751-8): no usable Observation between 2023-12-21 and the study date 2024-03-20",
    )


def test_values_older_than_the_window_do_not_count():
    problems = problems_of(complete_set(STUDY_DATE), lookback_days=2)
    assert len(problems) == 7 and all(p.startswith("missing: ") for p in problems)


def test_different_values_on_the_same_latest_date_are_a_conflict():
    day = STUDY_DATE - dt.timedelta(days=3)
    resources = complete_set(STUDY_DATE) + [
        observation("t-other", "21905-5", day, valueCodeableConcept={"text": "cT4"})
    ]
    (problem,) = problems_of(resources)
    assert problem.startswith(
        f"conflict: clinical T category (LOINC 21905-5) has different values at {day.isoformat()}"
    )
    assert "Observation/t: t_stage T3" in problem and "Observation/t-other: t_stage T4" in problem


def test_wrong_units_are_refused_naming_the_unit_and_code():
    resources = replace(complete_set(STUDY_DATE), "anc", valueQuantity=quantity(69, "%"))
    resources = replace(
        resources, "ldh", valueQuantity=quantity(5.2, "ukat/L"), referenceRange=[{"high": quantity(250, "U/L")}]
    )
    problems = problems_of(resources)
    assert (
        "ANC (LOINC 751-8) Observation/anc: wrong unit '%' (allowed UCUM: 10*9/L, 10*3/uL, 10*3/mm3, /nL, 10*6/mL, /uL, /mm3)"
        in problems
    )
    assert any(p.startswith("LDH (LOINC 2532-0) Observation/ldh: wrong unit 'ukat/L'") for p in problems)


def test_ldh_without_a_reference_range_has_no_uln():
    resources = replace(complete_set(STUDY_DATE), "ldh", referenceRange=[])
    assert problems_of(resources) == (
        "LDH (LOINC 2532-0) Observation/ldh has 0 reference-range upper limits (needed: exactly one, the ULN in U/L)",
    )


def test_unknown_value_codes_are_refused():
    resources = replace(
        complete_set(STUDY_DATE),
        "ecog",
        valueInteger=None,
        valueCodeableConcept={"coding": [{"system": "http://loinc.org", "code": "LA0000-0"}]},
    )
    resources = replace(
        resources, "n", valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "999999"}]}
    )
    problems = problems_of(resources)
    assert any(
        p.startswith(
            "ECOG performance status (LOINC 89247-1) Observation/ecog: unknown value code (http://loinc.org LA0000-0)"
        )
        for p in problems
    )
    assert any(
        p.startswith(
            "clinical N category (LOINC 21906-3) Observation/n: unknown value code (http://snomed.info/sct 999999)"
        )
        for p in problems
    )


def test_an_out_of_range_value_names_its_observation():
    resources = replace(complete_set(STUDY_DATE), "ecog", valueInteger=5)
    (problem,) = problems_of(resources)
    assert problem.startswith("ecog: 5 is out of range") and problem.endswith("[from LOINC 89247-1 Observation/ecog]")


def test_an_observation_for_another_patient_is_refused():
    resources = complete_set(STUDY_DATE) + [
        observation("intruder", "89247-1", STUDY_DATE, subject="Patient/p2", valueInteger=0)
    ]
    assert problems_of(resources) == (
        "ECOG performance status (LOINC 89247-1) Observation/intruder is for another patient than the study's"
        " (its subject does not match)",
    )


def test_a_logical_subject_reference_by_identifier_counts_as_the_patient():
    resources = [
        {**r, "subject": {"identifier": {"system": MRN_SYSTEM, "value": STUDY.patient_id}}}
        for r in complete_set(STUDY_DATE)
    ]
    parsed = parse_resources(resources)
    record = clinical_record_from_fhir(parsed, STUDY, patient_refs=(), lookback_days=90, identifier_system=MRN_SYSTEM)
    assert record.ecog == 1


def test_invalid_fhir_is_refused_without_quoting_values():
    broken = observation("bad", "89247-1", "not-a-date-PAT-SECRET-9", valueInteger=1)
    with pytest.raises(FhirRecordError) as caught:
        parse_resources(bundle([broken]))
    (problem,) = caught.value.problems
    assert problem.startswith("Bundle: not a valid FHIR R4 Bundle (") and "PAT-SECRET-9" not in problem
    with pytest.raises(FhirRecordError, match="not a resource"):
        parse_resources({"hello": "world"})
