"""Clinical record files (JSON or CSV, see docs/clinical-record.md) read into validated records."""

from __future__ import annotations

from pathlib import Path

from sclc_risk_node.scoring.clinical import ClinicalRecord, parse_clinical_csv, parse_clinical_json_many
from sclc_risk_node.scoring.errors import ClinicalRecordError
from sclc_risk_node.scoring.strict_json import loads_strict

CLINICAL_SUFFIXES = (".json", ".csv")


def fhir_json(path: Path) -> object | None:
    """The parsed JSON when ``path`` is a FHIR file (an object with a resourceType, or a list of them), else None.

    FHIR files need the study (patient, date) to become a record: see node.fhir_lookup.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    try:
        return fhir_json_bytes(path.name, path.read_bytes())
    except OSError:
        return None  # load_clinical_file reports it


def fhir_json_bytes(name: str, data: bytes) -> object | None:
    """`fhir_json` for bytes already read (the inbox reads each file once, without following links)."""
    if not name.lower().endswith(".json"):
        return None
    try:
        parsed = loads_strict(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None  # the clinical-record parser reports it
    items = parsed if isinstance(parsed, list) else [parsed]
    if items and all(isinstance(item, dict) and "resourceType" in item for item in items):
        return parsed
    return None


def load_clinical_file(path: Path) -> list[ClinicalRecord]:
    """Every clinical record in a JSON (one object or a list) or CSV (one row per patient) file.

    The whole file is refused if any record is invalid, with every problem listed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CLINICAL_SUFFIXES:
        raise ClinicalRecordError([f"clinical file {path.name}: unknown format {suffix!r} (expected .json or .csv)"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ClinicalRecordError([f"clinical file {path} does not exist"]) from None
    except OSError as exc:
        raise ClinicalRecordError([f"clinical file {path.name} cannot be read: {exc.strerror}"]) from None
    return parse_clinical_bytes(path.name, data)


def parse_clinical_bytes(name: str, data: bytes) -> list[ClinicalRecord]:
    """`load_clinical_file` for bytes already read (the inbox reads them itself, without following links)."""
    suffix = Path(name).suffix.lower()
    if suffix not in CLINICAL_SUFFIXES:
        raise ClinicalRecordError([f"clinical file {name}: unknown format {suffix!r} (expected .json or .csv)"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ClinicalRecordError([f"clinical file {name} is not UTF-8 text ({exc.reason})"]) from None
    if suffix == ".csv":
        return parse_clinical_csv(text)
    return parse_clinical_json_many(text)
