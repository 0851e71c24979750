"""scoring.clinical on pydantic: the input model, the rules over a whole record, and the record dataclasses."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from pydantic import ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

from sclc_risk_node.scoring.clinical import (
    ClinicalInput,
    ClinicalRecord,
    LabValues,
    Lipi,
    ValueProvenance,
    clinical_record_from_mapping,
    parse_clinical_csv,
)
from sclc_risk_node.scoring.errors import ClinicalRecordError

BASE = {"patient_id": "PAT-0001", "t_stage": "T3", "n_stage": "N2", "m_stage": "M1c", "ecog": 1, "lipi": "poor"}


def problems_of(mapping) -> tuple[str, ...]:
    with pytest.raises(ClinicalRecordError) as caught:
        clinical_record_from_mapping(mapping)
    return caught.value.problems


def test_the_input_model_refuses_unknown_fields_and_canonicalises_each_field():
    with pytest.raises(ValidationError) as caught:
        ClinicalInput.model_validate({**BASE, "stage": "IV"})
    assert [(e["type"], e["loc"]) for e in caught.value.errors()] == [("extra_forbidden", ("stage",))]
    given = ClinicalInput.model_validate({**BASE, "t_stage": "t1A", "ecog": "2", "sex": "female", "lipi": 0})
    assert (given.t_stage, given.ecog, given.sex, given.lipi) == ("T1a", 2, "F", Lipi.GOOD)
    record = given.record()
    assert (record.t_stage, record.t_substage, record.lipi_source) == ("T1", "T1a", "given")


def test_a_malformed_field_and_a_rule_over_the_record_are_reported_together_in_order():
    # pydantic skips a model's own validator when a field fails; the rules still run on the fields that parsed
    problems = problems_of(
        {
            "patient_id": "P",
            "t_stage": "T9",
            "n_stage": "N0",
            "m_stage": "M1a",
            "anc": 4,
            "brain_metastases": "yes",
            "foo": 1,
        }
    )
    assert [p.split(" (allowed")[0] for p in problems] == [
        "foo: unknown field",
        "ecog: missing",
        "t_stage: 'T9' is not an AJCC 8th-edition T stage",
        "labs: anc given but wbc, ldh, ldh_uln missing",
        "brain_metastases: true contradicts m_stage M1a",
    ]


def test_a_wrong_type_in_csv_names_row_and_field():
    text = "patient_id,t_stage,n_stage,m_stage,ecog,lipi\nP1,T1,N0,M0,0,good\nP2,T1,N0,M0,x,good\n"
    with pytest.raises(ClinicalRecordError) as caught:
        parse_clinical_csv(text)
    assert caught.value.problems == ("row 3: ecog: 'x' is not a number (allowed: integer 0-4)",)


def test_records_are_frozen_hashable_pydantic_dataclasses_validated_on_replace():
    record = clinical_record_from_mapping(
        {
            **BASE,
            "lipi": None,
            "anc": 7,
            "wbc": 9,
            "ldh": 300,
            "ldh_uln": 250,
            "provenance": [
                {"field": "ecog", "code": "LOINC 89247-1", "resource": "Observation/1", "date": "2024-01-02"}
            ],
        }
    )
    for cls in (ClinicalRecord, LabValues, ValueProvenance):
        assert is_pydantic_dataclass(cls)
    assert record.labs == LabValues(7.0, 9.0, 300.0, 250.0) and record.lipi is Lipi.POOR
    assert pickle.loads(pickle.dumps(record)) == record and hash(pickle.loads(pickle.dumps(record))) == hash(record)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.ecog = 2  # type: ignore[misc]
    with pytest.raises(ClinicalRecordError, match=r"ecog: 9 is not allowed \(allowed: integer 0-4\)"):
        dataclasses.replace(record, ecog=9)
    with pytest.raises(ClinicalRecordError, match="lipi_source: 'given' does not match whether labs are present"):
        dataclasses.replace(record, lipi_source="given")
    with pytest.raises(ClinicalRecordError, match=r"sex: 'X' is not allowed \(allowed: F, M, O\)"):
        dataclasses.replace(record, sex="X")
    with pytest.raises(ClinicalRecordError, match="code"):
        ValueProvenance("ecog", "  ", "Observation/1", "2024-01-02")


def test_malformed_provenance_entries_are_each_named_once():
    entry = {"field": "ecog", "code": "c", "resource": "r", "date": "d"}
    problems = problems_of({**BASE, "provenance": [entry, {**entry, "code": 1, "date": ""}, {**entry, "x": 1}]})
    assert [p.split(" (allowed")[0] for p in problems] == [
        "provenance: entry 2 is malformed",
        "provenance: entry 3 is malformed",
    ]
