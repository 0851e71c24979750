"""The training cohort CSV: one row per patient, read and validated as a whole.

Columns (names are case-insensitive, except feature columns):

* ``id`` — unique, non-empty; used as the clinical ``patient_id`` when the row gives no identifier.
* ``split`` — ``train``, ``validation`` or ``validation_<name>`` (any number of
  validation sets, e.g. ``validation_1``), or ``control`` (a comparison group
  treated otherwise, e.g. chemotherapy alone).  At least one ``train`` row.
* ``pfs_months`` (> 0), ``pfs_event`` (``0``/``1``/``true``/``false``).
* optional ``os_months`` (> 0, at least ``pfs_months``) and ``os_event``, both or neither.
* the clinical record's fields (docs/clinical-record.md): ``t_stage``,
  ``n_stage``, ``m_stage``, ``ecog``, ``lipi`` or the labs ``anc``, ``wbc``,
  ``ldh``, ``ldh_uln``; optional ``age``, ``sex``, ``brain_metastases``,
  ``liver_metastases`` and the identifiers.
* per row EITHER ``ct`` and ``seg`` — ``ct`` a folder of DICOM CT files or an
  NRRD/NIfTI/MetaImage file, ``seg`` a DICOM SEG file or a label image
  (label 1 = tumour); relative paths are relative to the CSV's folder; a DICOM
  SEG needs a DICOM CT, because it is placed through the CT's UIDs —
  OR precomputed features in columns named ``region.imagetype_class_feature``
  (``tumour.original_firstorder_Mean``, see ``scoring.types.FeatureSpec``), a
  number or ``nan`` in every feature column of that row.

Every problem in the file is reported at once in one `CohortError`, each as
``row N: column: value ... (allowed: ...)``, where N is the line on which the
row ends (the header is row 1).  Identifier values (``id`` and the clinical
identifiers) are never shown.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from sclc_risk_node.node.errors import NodeError
from sclc_risk_node.scoring.clinical import (
    ACCEPTED_FIELDS as CLINICAL_FIELDS,
)
from sclc_risk_node.scoring.clinical import (
    IDENTIFIER_FIELDS,
    ClinicalRecord,
    clinical_record_from_mapping,
)
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError
from sclc_risk_node.scoring.types import FeatureSpec

OUTCOME_COLUMNS = ("pfs_months", "pfs_event", "os_months", "os_event")
IMAGE_COLUMNS = ("ct", "seg")
REQUIRED_COLUMNS = ("id", "split", "pfs_months", "pfs_event", "t_stage", "n_stage", "m_stage", "ecog")
KNOWN_COLUMNS = ("id", "split") + OUTCOME_COLUMNS + CLINICAL_FIELDS + IMAGE_COLUMNS

TRAIN_SPLIT = "train"
CONTROL_SPLIT = "control"
_SPLIT_PATTERN = re.compile(r"^(train|control|validation(_[a-z0-9][a-z0-9_-]*)?)$")
_SPLIT_ALLOWED = "train, validation, validation_<name> (e.g. validation_1), control"

#: Suffixes SimpleITK reads as one image file; anything else is taken for DICOM.
IMAGE_FILE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_IMAGE_FILE_ALLOWED = "NRRD, NIfTI or MetaImage: " + ", ".join(IMAGE_FILE_SUFFIXES)

_EVENT_WORDS = {"1": True, "true": True, "0": False, "false": False}
_SHOWN_VALUE_LENGTH = 40


class CohortError(NodeError, InputError):
    """The cohort CSV is unusable; ``problems`` lists every problem, one line each."""

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("invalid cohort CSV: " + "; ".join(self.problems))


@dataclass(frozen=True, slots=True)
class ImageInputs:
    """Where one patient's CT and tumour mask are (absolute paths) and in which form."""

    ct: Path
    seg: Path

    @property
    def ct_is_dicom(self) -> bool:
        """A folder of DICOM CT files (else one image file SimpleITK reads)."""
        return not is_image_file(self.ct)

    @property
    def seg_is_dicom(self) -> bool:
        """A DICOM SEG (else a label image with label 1 = tumour)."""
        return not is_image_file(self.seg)


@dataclass(frozen=True, slots=True)
class CohortPatient:
    """One validated row.  Exactly one of ``images`` and ``features`` is set."""

    id: str
    split: str
    row: int
    pfs_months: float
    pfs_event: bool
    os_months: float | None
    os_event: bool | None
    clinical: ClinicalRecord
    images: ImageInputs | None
    features: Mapping[str, float] | None

    def __repr__(self) -> str:
        # The id may be a hospital identifier: keep it out of logs and tracebacks.
        source = "images" if self.images is not None else "features"
        return f"CohortPatient(row={self.row}, split={self.split!r}, {source})"


@dataclass(frozen=True, slots=True)
class Cohort:
    """A validated cohort CSV: patients in file order."""

    source: Path
    patients: tuple[CohortPatient, ...]
    feature_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[CohortPatient]:
        return iter(self.patients)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.patients)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names present: ``train``, then validation sets in name order, then ``control``."""
        present = {p.split for p in self.patients}
        validation = sorted(s for s in present if s.startswith("validation"))
        return (TRAIN_SPLIT, *validation, *([CONTROL_SPLIT] if CONTROL_SPLIT in present else []))

    @property
    def validation_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("validation"))

    def in_split(self, split: str) -> tuple[CohortPatient, ...]:
        return tuple(p for p in self.patients if p.split == split)

    def patient(self, patient_id: str) -> CohortPatient:
        for p in self.patients:
            if p.id == patient_id:
                return p
        raise KeyError("no patient with that id in the cohort")

    def outcomes_frame(self) -> pd.DataFrame:
        """Split, outcomes and clinical values per patient (index ``id``), in file order.

        ``lipi`` is the factor count 0-2; ``overall_stage`` is the paper's
        TNM-stage covariate (``I-II``, ``III``, ``IV``).
        """
        rows = []
        for p in self.patients:
            c = p.clinical
            rows.append(
                {
                    "id": p.id,
                    "split": p.split,
                    "pfs_months": p.pfs_months,
                    "pfs_event": p.pfs_event,
                    "os_months": p.os_months,
                    "os_event": p.os_event,
                    "t_stage": c.t_stage,
                    "n_stage": c.n_stage,
                    "m_stage": c.m_stage,
                    "overall_stage": c.overall_stage,
                    "ecog": c.ecog,
                    "lipi": int(c.lipi),
                    "age": c.age,
                    "sex": c.sex,
                    "brain_metastases": c.brain_metastases,
                    "liver_metastases": c.liver_metastases,
                }
            )
        return pd.DataFrame(rows).set_index("id")


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in IMAGE_FILE_SUFFIXES)


def load_cohort(path: Path) -> Cohort:
    """Read and validate the cohort CSV at ``path``; raises `CohortError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CohortError([f"file: {path} does not exist (allowed: a cohort CSV file)"]) from None
    except UnicodeDecodeError as exc:
        raise CohortError([f"file: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_cohort_csv(text, base_dir=path.resolve().parent, source=path)


def parse_cohort_csv(text: str, *, base_dir: Path, source: Path | None = None) -> Cohort:
    """Validate cohort CSV ``text``; relative image paths are taken relative to ``base_dir``."""
    rows = _read_rows(text.removeprefix("\ufeff"))
    header_line, header = rows[0]
    columns, feature_columns = _check_header(header)
    if len(rows) == 1:
        raise CohortError(["csv: a header but no patient rows (allowed: at least one patient row)"])

    problems: list[str] = []
    patients: list[CohortPatient] = []
    first_row_of_id: dict[str, int] = {}
    for line, cells in rows[1:]:
        if len(cells) != len(columns):
            problems.append(f"row {line}: has {len(cells)} cells but the header has {len(columns)} columns")
            continue
        values = {name: cell.strip() for name, cell in zip(columns, cells)}
        row_problems: list[str] = []
        patient = _parse_row(line, values, feature_columns, Path(base_dir), row_problems)
        patient_id = values.get("id", "")
        if patient_id:
            if patient_id in first_row_of_id:
                row_problems.append(
                    f"id: (value withheld) is the id of row {first_row_of_id[patient_id]} too (allowed: each id once)"
                )
            else:
                first_row_of_id[patient_id] = line
        problems.extend(f"row {line}: {problem}" for problem in row_problems)
        if patient is not None and not row_problems:
            patients.append(patient)
    if not problems and not any(p.split == TRAIN_SPLIT for p in patients):
        present = ", ".join(sorted({p.split for p in patients}))
        problems.append(f"split: no row is in the train split (present: {present}; allowed: at least one train row)")
    if problems:
        raise CohortError(problems)
    return Cohort(
        source=Path(source) if source is not None else Path(base_dir),
        patients=tuple(patients),
        feature_columns=tuple(feature_columns),
    )


def _read_rows(text: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise CohortError([f"csv: not valid CSV at line {reader.line_num} ({exc})"]) from None
    rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise CohortError(["csv: empty (allowed: a header row and at least one patient row)"])
    return rows


def _check_header(header: list[str]) -> tuple[list[str], list[str]]:
    """Column names as used (known ones lower-cased) and the feature columns; raises on any header problem."""
    problems, columns, features, seen = [], [], [], set()
    if len(header) == 1 and ";" in header[0]:
        raise CohortError(["header: looks semicolon-separated (allowed: comma-separated columns)"])
    for position, cell in enumerate(header, start=1):
        raw = cell.strip()
        name = raw if "." in raw else raw.lower()
        columns.append(name)
        if not name:
            problems.append(f"header: column {position} has no name")
            continue
        if name in seen:
            problems.append(f"header: column {name!r} appears twice (allowed: each column once)")
            continue
        seen.add(name)
        if "." in name:
            try:
                FeatureSpec.from_name(name)
            except ValueError as exc:
                problems.append(
                    f"header: {_show(name)}: not a feature name ({exc}; allowed: region.imagetype_class_feature "
                    "with region tumour or ring, e.g. tumour.original_firstorder_Mean)"
                )
                continue
            features.append(name)
        elif name not in KNOWN_COLUMNS:
            problems.append(
                f"header: {_show(name)}: unknown column (allowed: {', '.join(KNOWN_COLUMNS)}, "
                "or feature columns named like tumour.original_firstorder_Mean)"
            )
    for name in REQUIRED_COLUMNS:
        if name not in seen:
            problems.append(f"header: column {name} is missing (required: {', '.join(REQUIRED_COLUMNS)})")
    if "lipi" not in seen and not all(lab in seen for lab in ("anc", "wbc", "ldh", "ldh_uln")):
        problems.append("header: neither lipi nor all of anc, wbc, ldh, ldh_uln (required: lipi, or the four labs)")
    if ("os_months" in seen) != ("os_event" in seen):
        problems.append("header: os_months and os_event come together (allowed: both columns or neither)")
    has_images = [name for name in IMAGE_COLUMNS if name in seen]
    if len(has_images) == 1:
        missing = "seg" if has_images == ["ct"] else "ct"
        problems.append(f"header: column {has_images[0]} without column {missing} (allowed: both ct and seg)")
    if not has_images and not features:
        problems.append(
            "header: no image columns (ct, seg) and no feature columns (required: ct and seg, "
            "or feature columns named like tumour.original_firstorder_Mean)"
        )
    if problems:
        raise CohortError(problems)
    return columns, features


def _parse_row(
    line: int, values: dict[str, str], feature_columns: list[str], base_dir: Path, problems: list[str]
) -> CohortPatient | None:
    patient_id = values["id"]
    if not patient_id:
        problems.append("id: missing (allowed: a non-empty text, unique in the file)")
    split = _parse_split(values["split"], problems)
    pfs_months = _parse_months("pfs_months", values["pfs_months"], problems)
    pfs_event = _parse_event("pfs_event", values["pfs_event"], problems)
    os_months = os_event = None
    if "os_months" in values and (values["os_months"] or values["os_event"]):
        os_months = _parse_months("os_months", values["os_months"], problems)
        os_event = _parse_event("os_event", values["os_event"], problems)
        if os_months is not None and pfs_months is not None and os_months < pfs_months:
            problems.append(
                f"os_months: {_show(values['os_months'])} is shorter than pfs_months {_show(values['pfs_months'])} "
                "(allowed: os_months >= pfs_months; progression-free survival ends at death at the latest)"
            )
    clinical = _parse_clinical(values, patient_id, problems)
    images, features = _parse_inputs(values, feature_columns, base_dir, problems)
    # A parser that gives None has reported why in ``problems``.
    if problems or split is None or pfs_months is None or pfs_event is None or clinical is None:
        return None
    return CohortPatient(
        id=patient_id,
        split=split,
        row=line,
        pfs_months=pfs_months,
        pfs_event=pfs_event,
        os_months=os_months,
        os_event=os_event,
        clinical=clinical,
        images=images,
        features=features,
    )


def _parse_split(value: str, problems: list[str]) -> str | None:
    split = value.lower()
    if not split:
        problems.append(f"split: missing (allowed: {_SPLIT_ALLOWED})")
    elif not _SPLIT_PATTERN.match(split):
        problems.append(f"split: {_show(value)} is not a split name (allowed: {_SPLIT_ALLOWED})")
    else:
        return split
    return None


def _parse_months(name: str, value: str, problems: list[str]) -> float | None:
    allowed = "a number of months > 0"
    if not value:
        problems.append(f"{name}: missing (allowed: {allowed})")
        return None
    try:
        number = float(value)
    except ValueError:
        problems.append(f"{name}: {_show(value)} is not a number (allowed: {allowed})")
        return None
    if not math.isfinite(number) or number <= 0:
        problems.append(f"{name}: {_show(value)} is not allowed (allowed: {allowed})")
        return None
    return number


def _parse_event(name: str, value: str, problems: list[str]) -> bool | None:
    word = value.lower()
    if word in _EVENT_WORDS:
        return _EVENT_WORDS[word]
    shown = "missing" if not value else f"{_show(value)} is not an event indicator"
    problems.append(f"{name}: {shown} (allowed: 1, 0, true, false)")
    return None


def _parse_clinical(values: dict[str, str], patient_id: str, problems: list[str]) -> ClinicalRecord | None:
    mapping: dict[object, object] = {name: values[name] for name in CLINICAL_FIELDS if name in values}
    if patient_id and not any(mapping.get(name) for name in IDENTIFIER_FIELDS):
        mapping["patient_id"] = patient_id
    try:
        return clinical_record_from_mapping(mapping)
    except ClinicalRecordError as exc:
        # Without an id the missing identifier is already reported, as the id.
        reported = [p for p in exc.problems if patient_id or not p.startswith("identifier:")]
        problems.extend(_withhold(problem, patient_id) for problem in reported)
        return None


def _parse_inputs(
    values: dict[str, str], feature_columns: list[str], base_dir: Path, problems: list[str]
) -> tuple[ImageInputs | None, Mapping[str, float] | None]:
    ct_text, seg_text = values.get("ct", ""), values.get("seg", "")
    given_features = [name for name in feature_columns if values[name]]
    if (ct_text or seg_text) and given_features:
        problems.append(
            "ct, seg and feature columns: both images and precomputed features given "
            "(allowed: either ct and seg, or the feature columns)"
        )
        return None, None
    if given_features:
        return None, _parse_features(values, feature_columns, problems)
    if not (ct_text or seg_text):
        allowed = "ct and seg paths" + (", or a number in every feature column" if feature_columns else "")
        problems.append(f"ct, seg: missing (allowed: {allowed})")
        return None, None
    ct = _resolve_ct(ct_text, base_dir, problems)
    seg = _resolve_seg(seg_text, base_dir, problems)
    if ct is None or seg is None:
        return None, None
    if not is_image_file(seg) and is_image_file(ct):
        problems.append(
            f"seg: {seg_text!r} is a DICOM SEG but ct {ct_text!r} is an image file "
            "(allowed: a DICOM SEG with a DICOM CT folder, or a label image NRRD/NIfTI)"
        )
        return None, None
    return ImageInputs(ct=ct, seg=seg), None


def _parse_features(values: dict[str, str], feature_columns: list[str], problems: list[str]) -> Mapping[str, float]:
    features, empty = {}, []
    for name in feature_columns:
        text = values[name]
        if not text:
            empty.append(name)
            continue
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is None or math.isinf(number):
            problems.append(f"{name}: {_show(text)} is not a number (allowed: a finite number, or nan)")
            continue
        features[name] = number
    if empty:
        example = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        problems.append(
            f"feature columns: {len(empty)} of {len(feature_columns)} empty ({example}) "
            "(allowed: a number or nan in every feature column of a row with precomputed features)"
        )
    return MappingProxyType(features)


def _resolve(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def _resolve_ct(text: str, base_dir: Path, problems: list[str]) -> Path | None:
    allowed = f"a folder of DICOM CT files, or an image file ({_IMAGE_FILE_ALLOWED})"
    if not text:
        problems.append(f"ct: missing (allowed: {allowed})")
        return None
    path = _resolve(text, base_dir)
    if path.is_dir() or (path.is_file() and is_image_file(path)):
        return path.resolve()
    shown = repr(text)
    if not path.exists():
        problems.append(f"ct: {shown} does not exist (allowed: {allowed}; relative to the CSV's folder)")
    else:
        problems.append(f"ct: {shown} is neither a folder nor an image file (allowed: {allowed})")
    return None


def _resolve_seg(text: str, base_dir: Path, problems: list[str]) -> Path | None:
    allowed = f"a DICOM SEG file, or a label image ({_IMAGE_FILE_ALLOWED}) with label 1 = tumour"
    if not text:
        problems.append(f"seg: missing (allowed: {allowed})")
        return None
    path = _resolve(text, base_dir)
    shown = repr(text)
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        problems.append(f"seg: {shown} {state} (allowed: {allowed}; relative to the CSV's folder)")
        return None
    if not is_image_file(path) and not _is_dicom_file(path):
        problems.append(f"seg: {shown} is not a DICOM file (no DICM preamble) (allowed: {allowed})")
        return None
    return path.resolve()


def _is_dicom_file(path: Path) -> bool:
    from pydicom.misc import is_dicom

    try:
        return is_dicom(path)
    except OSError:  # unreadable: refused like a file without the preamble
        return False


def _withhold(problem: str, patient_id: str) -> str:
    # A shifted column can carry the id into a clinical field the clinical parser quotes.
    return problem.replace(patient_id, "(withheld)") if len(patient_id) >= 3 else problem


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_LENGTH else text[: _SHOWN_VALUE_LENGTH - 1] + "…"
