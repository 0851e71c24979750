"""Clinical record files (JSON or CSV, see docs/clinical-record.md) read into validated records."""

from __future__ import annotations

from pathlib import Path

from scoring.clinical import ClinicalRecord, parse_clinical_csv, parse_clinical_json_many
from scoring.errors import ClinicalRecordError

CLINICAL_SUFFIXES = (".json", ".csv")


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
