"""Clinical record files (JSON or CSV, see docs/clinical-record.md) read into validated records."""

from __future__ import annotations

from pathlib import Path

from scoring.clinical import ClinicalRecord, parse_clinical_csv, parse_clinical_json_many
from scoring.errors import ClinicalRecordError
from scoring.strict_json import loads_strict

CLINICAL_SUFFIXES = (".json", ".csv")


def fhir_json(path: Path) -> object | None:
    """The parsed JSON when ``path`` is a FHIR file (an object with a resourceType, or a list of them), else None.

    FHIR files need the study (patient, date) to become a record: see node.fhir_lookup.
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    try:
        data = loads_strict(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # load_clinical_file reports it
    items = data if isinstance(data, list) else [data]
    if items and all(isinstance(item, dict) and "resourceType" in item for item in items):
        return data
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
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ClinicalRecordError([f"clinical file {path} does not exist"]) from None
    except UnicodeDecodeError as exc:
        raise ClinicalRecordError([f"clinical file {path.name} is not UTF-8 text ({exc.reason})"]) from None
    except OSError as exc:
        raise ClinicalRecordError([f"clinical file {path.name} cannot be read: {exc.strerror}"]) from None
    if suffix == ".csv":
        return parse_clinical_csv(text)
    return parse_clinical_json_many(text)
