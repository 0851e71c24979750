"""FHIR R4 resources for one patient, as an EHR would hold them (dates relative to the study date)."""

from __future__ import annotations

import datetime as dt
from typing import Any

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.1"
UCUM = "http://unitsofmeasure.org"


def quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def patient(logical_id: str, patient_id: str, system: str = MRN_SYSTEM) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": logical_id, "identifier": [{"system": system, "value": patient_id}]}


def observation(
    logical_id: str, code: str, when: dt.date | str, *, subject: str = "Patient/p1", status: str = "final", **value: Any
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": logical_id,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "effectiveDateTime": when.isoformat() if isinstance(when, dt.date) else when,
        **value,
    }


def complete_set(study_date: dt.date, *, subject: str = "Patient/p1", prefix: str = "") -> list[dict[str, Any]]:
    """ECOG 1, cT3 cN2 cM1c, LDH 310 U/L (ULN 250), WBC 7.4, ANC 5.1 (10^9/L): LIPI intermediate."""
    day = study_date - dt.timedelta(days=3)
    return [
        observation(f"{prefix}ecog", "89247-1", day, subject=subject, valueInteger=1),
        observation(
            f"{prefix}t",
            "21905-5",
            day,
            subject=subject,
            valueCodeableConcept={
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "1228951002",
                        "display": "American Joint Committee on Cancer cT3 (qualifier value)",
                    }
                ]
            },
        ),
        observation(f"{prefix}n", "21906-3", day, subject=subject, valueCodeableConcept={"text": "cN2"}),
        observation(f"{prefix}m", "21907-1", day, subject=subject, valueCodeableConcept={"text": "cM1c"}),
        observation(
            f"{prefix}ldh",
            "2532-0",
            day,
            subject=subject,
            valueQuantity=quantity(310, "U/L"),
            referenceRange=[{"low": quantity(120, "U/L"), "high": quantity(250, "U/L")}],
        ),
        observation(f"{prefix}wbc", "6690-2", day, subject=subject, valueQuantity=quantity(7.4, "10*3/uL")),
        observation(f"{prefix}anc", "751-8", day, subject=subject, valueQuantity=quantity(5100, "/uL")),
    ]


def bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
