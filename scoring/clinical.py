"""The clinical record: T, N, M stage, ECOG performance status and LIPI.

Records arrive as JSON (one object or a list) or CSV (header row, one record
per row) and are validated field by field; every problem in a record is
reported at once in one `ClinicalRecordError`.  The accepted formats are
documented in docs/clinical-record.md.

Identifiers (patient_id, accession_number, study_instance_uid) are PHI: no
message raised here ever contains their values, and they are hidden from the
record's repr.
"""

from __future__ import annotations

import csv
import enum
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType

from sclc_risk_node.scoring.errors import ClinicalRecordError
from sclc_risk_node.scoring.strict_json import loads_strict


class Lipi(enum.IntEnum):
    """Lung Immune Prognostic Index: number of factors (dNLR > 3, LDH > ULN)."""

    GOOD = 0
    INTERMEDIATE = 1
    POOR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


T_STAGES = ("T1", "T2", "T3", "T4")
N_STAGES = ("N0", "N1", "N2", "N3")
M_STAGES = ("M0", "M1", "M1a", "M1b", "M1c")
# AJCC 8th-edition T descriptors that refine a main stage; kept in
# `ClinicalRecord.t_substage` because they move N0 tumours between IA1..IIA.
T_SUBSTAGES = ("T1mi", "T1a", "T1b", "T1c", "T2a", "T2b")
OVERALL_STAGES = ("I-II", "III", "IV")
ECOG_RANGE = (0, 4)
AGE_RANGE = (0, 130)
SEXES = ("F", "M", "O")

IDENTIFIER_FIELDS = ("patient_id", "accession_number", "study_instance_uid")
LAB_FIELDS = ("anc", "wbc", "ldh", "ldh_uln")
REQUIRED_FIELDS = ("t_stage", "n_stage", "m_stage", "ecog")
OPTIONAL_FIELDS = ("age", "sex", "brain_metastases", "liver_metastases")
#: Where each value came from (JSON only; written by the FHIR path, see `ValueProvenance`).
PROVENANCE_FIELD = "provenance"
ACCEPTED_FIELDS = IDENTIFIER_FIELDS + REQUIRED_FIELDS + ("lipi",) + LAB_FIELDS + OPTIONAL_FIELDS + (PROVENANCE_FIELD,)

# DICOM value-representation limits, so an identifier that cannot match any
# study is caught here rather than silently never matching.
_IDENTIFIER_MAX_LENGTH = {"patient_id": 64, "accession_number": 16, "study_instance_uid": 64}
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")

#: What a model covariate may read, and the levels each field can take
#: (as strings, the way a model file names them).  See docs/model-format.md.
CLINICAL_FIELD_LEVELS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "t_stage": T_STAGES,
        "n_stage": N_STAGES,
        "m_stage": M_STAGES,
        "overall_stage": OVERALL_STAGES,
        "ecog": tuple(str(score) for score in range(ECOG_RANGE[0], ECOG_RANGE[1] + 1)),
        "lipi": tuple(level.label for level in Lipi),
        "sex": SEXES,
        "brain_metastases": ("no", "yes"),
        "liver_metastases": ("no", "yes"),
    }
)
#: Fields that also have a numeric value a model may use directly.
NUMERIC_CLINICAL_FIELDS = ("ecog", "lipi", "age")
MODEL_CLINICAL_FIELDS = tuple(sorted(set(CLINICAL_FIELD_LEVELS) | set(NUMERIC_CLINICAL_FIELDS)))


@dataclass(frozen=True, slots=True)
class LabValues:
    """Blood counts and LDH used to compute LIPI.

    ``anc`` and ``wbc`` in the same unit (e.g. 10^9/L); ``ldh`` and ``ldh_uln`` in the same unit (U/L).
    """

    anc: float
    wbc: float
    ldh: float
    ldh_uln: float

    @property
    def dnlr(self) -> float:
        """Derived neutrophil-to-lymphocyte ratio ANC / (WBC - ANC)."""
        return self.anc / (self.wbc - self.anc)

    @property
    def lipi(self) -> Lipi:
        return lipi_from_labs(self)


def _exact(value: float) -> Decimal:
    # repr() is the shortest string that round-trips, i.e. the number as it was
    # written; comparing Decimals of that keeps dNLR == 3 and LDH == ULN exact.
    return Decimal(repr(float(value)))


def lipi_from_labs(labs: LabValues) -> Lipi:
    """LIPI from labs: one factor for dNLR > 3, one for LDH > ULN (Mezquita et al. 2018).

    Both comparisons are strict and exact on the decimal values as written:
    dNLR exactly 3 and LDH equal to the ULN are not factors.
    """
    anc, wbc = _exact(labs.anc), _exact(labs.wbc)
    # dNLR = anc / (wbc - anc) > 3  <=>  4 * anc > 3 * wbc, given wbc > anc.
    high_dnlr = 4 * anc > 3 * wbc
    high_ldh = _exact(labs.ldh) > _exact(labs.ldh_uln)
    return Lipi(int(high_dnlr) + int(high_ldh))


# AJCC 8th edition stage groups for M0, keyed by (T main stage, N stage).  Only
# N0 with T1/T2 depends on the T descriptor; see `_N0_BY_SUBSTAGE`.
_M0_STAGE_GROUPS = {
    ("T1", "N0"): "IA1-IA3",
    ("T2", "N0"): "IB-IIA",
    ("T3", "N0"): "IIB",
    ("T4", "N0"): "IIIA",
    ("T1", "N1"): "IIB",
    ("T2", "N1"): "IIB",
    ("T3", "N1"): "IIIA",
    ("T4", "N1"): "IIIA",
    ("T1", "N2"): "IIIA",
    ("T2", "N2"): "IIIA",
    ("T3", "N2"): "IIIB",
    ("T4", "N2"): "IIIB",
    ("T1", "N3"): "IIIB",
    ("T2", "N3"): "IIIB",
    ("T3", "N3"): "IIIC",
    ("T4", "N3"): "IIIC",
}
_N0_BY_SUBSTAGE = {"T1mi": "IA1", "T1a": "IA1", "T1b": "IA2", "T1c": "IA3", "T2a": "IB", "T2b": "IIA"}
_M1_STAGE_GROUPS = {"M1": "IVA-IVB", "M1a": "IVA", "M1b": "IVA", "M1c": "IVB"}


@dataclass(frozen=True, slots=True)
class ValueProvenance:
    """Where one record value came from: the FHIR resource and its clinically relevant date.

    ``field`` is a record field (``ecog``, ``t_stage``, ``ldh_uln``...), ``code``
    the LOINC code that carried it, ``resource`` the resource's type/id
    (``Observation/abc``) and ``date`` its effective date/time as written (ISO 8601).
    """

    field: str
    code: str
    resource: str
    date: str

    def to_mapping(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "resource": self.resource, "date": self.date}


_PROVENANCE_KEYS = ("field", "code", "resource", "date")


@dataclass(frozen=True, slots=True)
class ClinicalRecord:
    """One patient's clinical inputs, validated.

    ``t_stage`` is one of T1..T4, ``n_stage`` N0..N3, ``m_stage`` M0, M1, M1a, M1b, M1c;
    ``ecog`` 0..4.  ``lipi_source`` is ``"given"``, ``"labs"`` or ``"given+labs"`` (both, agreeing).
    At least one of the identifiers is set, so the node can match the record to a study.

    ``t_substage`` keeps an AJCC descriptor such as ``T1a`` when one was given
    (``t_stage`` is then its main stage).  ``age`` (years), ``sex`` (F/M/O),
    ``brain_metastases`` and ``liver_metastases`` are optional.
    """

    t_stage: str
    n_stage: str
    m_stage: str
    ecog: int
    lipi: Lipi
    lipi_source: str
    patient_id: str | None = field(default=None, repr=False)
    accession_number: str | None = field(default=None, repr=False)
    study_instance_uid: str | None = field(default=None, repr=False)
    labs: LabValues | None = None
    t_substage: str | None = None
    age: float | None = None
    sex: str | None = None
    brain_metastases: bool | None = None
    liver_metastases: bool | None = None
    provenance: tuple[ValueProvenance, ...] = ()

    def __post_init__(self) -> None:
        # A guard for records built directly in code; parsed records already
        # passed the fuller checks in `clinical_record_from_mapping`.
        if isinstance(self.lipi, int) and not isinstance(self.lipi, Lipi) and self.lipi in (0, 1, 2):
            object.__setattr__(self, "lipi", Lipi(self.lipi))
        problems = []
        if self.t_stage not in T_STAGES:
            problems.append(f"t_stage: {self.t_stage!r} is not allowed (allowed: {', '.join(T_STAGES)})")
        if self.t_substage is not None and (self.t_substage not in T_SUBSTAGES or self.t_substage[:2] != self.t_stage):
            problems.append(f"t_substage: {self.t_substage!r} does not refine t_stage {self.t_stage!r}")
        if self.n_stage not in N_STAGES:
            problems.append(f"n_stage: {self.n_stage!r} is not allowed (allowed: {', '.join(N_STAGES)})")
        if self.m_stage not in M_STAGES:
            problems.append(f"m_stage: {self.m_stage!r} is not allowed (allowed: {', '.join(M_STAGES)})")
        if isinstance(self.ecog, bool) or not isinstance(self.ecog, int) or not 0 <= self.ecog <= 4:
            problems.append(f"ecog: {self.ecog!r} is not allowed (allowed: integer 0-4)")
        if not isinstance(self.lipi, Lipi):
            problems.append(f"lipi: {self.lipi!r} is not allowed (allowed: Lipi)")
        if self.lipi_source not in ("given", "labs", "given+labs"):
            problems.append(f"lipi_source: {self.lipi_source!r} is not allowed (allowed: given, labs, given+labs)")
        if ("labs" in self.lipi_source) != (self.labs is not None):
            problems.append(f"lipi_source: {self.lipi_source!r} does not match whether labs are present")
        if not any(getattr(self, name) for name in IDENTIFIER_FIELDS):
            problems.append(f"identifier: missing (allowed: at least one of {', '.join(IDENTIFIER_FIELDS)})")
        if self.sex is not None and self.sex not in SEXES:
            problems.append(f"sex: {self.sex!r} is not allowed (allowed: {', '.join(SEXES)})")
        if problems:
            raise ClinicalRecordError(problems)

    def to_mapping(self) -> dict[str, object]:
        """The record as documented input keys; `clinical_record_from_mapping` reads it back to an equal record."""
        mapping: dict[str, object] = {
            name: getattr(self, name) for name in IDENTIFIER_FIELDS if getattr(self, name) is not None
        }
        mapping.update(
            t_stage=self.t_substage or self.t_stage,
            n_stage=self.n_stage,
            m_stage=self.m_stage,
            ecog=self.ecog,
        )
        if "given" in self.lipi_source:
            mapping["lipi"] = self.lipi.label
        if self.labs is not None:
            mapping.update(anc=self.labs.anc, wbc=self.labs.wbc, ldh=self.labs.ldh, ldh_uln=self.labs.ldh_uln)
        for name in ("age", "sex", "brain_metastases", "liver_metastases"):
            if getattr(self, name) is not None:
                mapping[name] = getattr(self, name)
        if self.provenance:
            mapping[PROVENANCE_FIELD] = [item.to_mapping() for item in self.provenance]
        return mapping

    @property
    def stage_group(self) -> str:
        """AJCC 8th-edition stage group, as fine as the given T/N/M allow.

        A range (``IA1-IA3``, ``IB-IIA``, ``IVA-IVB``) when the group depends on
        a T or M descriptor that was not given.
        """
        if self.m_stage != "M0":
            return _M1_STAGE_GROUPS[self.m_stage]
        if self.n_stage == "N0" and self.t_substage is not None:
            return _N0_BY_SUBSTAGE[self.t_substage]
        return _M0_STAGE_GROUPS[(self.t_stage, self.n_stage)]

    @property
    def overall_stage(self) -> str:
        """The paper's "TNM stage" covariate: ``I-II``, ``III`` or ``IV`` (AJCC 8th edition).

        Exact at this resolution: no T or M descriptor changes the Roman numeral.
        """
        group = self.stage_group
        if group.startswith("IV"):
            return "IV"
        if group.startswith("III"):
            return "III"
        return "I-II"

    def level(self, field_name: str) -> str | None:
        """The field's level as a model file names it (see `CLINICAL_FIELD_LEVELS`); None if not recorded."""
        if field_name not in CLINICAL_FIELD_LEVELS:
            raise KeyError(f"{field_name!r} is not a categorical clinical field")
        if field_name == "ecog":
            return str(self.ecog)
        if field_name == "lipi":
            return self.lipi.label
        value = getattr(self, field_name)
        if isinstance(value, bool):
            return "yes" if value else "no"
        return value

    def number(self, field_name: str) -> float | None:
        """The field's numeric value (ECOG score, LIPI factor count, age in years); None if not recorded."""
        if field_name not in NUMERIC_CLINICAL_FIELDS:
            raise KeyError(f"{field_name!r} is not a numeric clinical field")
        value = getattr(self, field_name)
        return None if value is None else float(value)


# ---------------------------------------------------------------------------
# Parsing


_SHOWN_VALUE_LENGTH = 24


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOWN_VALUE_LENGTH else text[: _SHOWN_VALUE_LENGTH - 1] + "…"


def _redact_identifiers(problems: list[str], values: Mapping[str, object]) -> list[str]:
    # A shifted CSV column can put an identifier into a field whose value we
    # quote; never let it through.
    secrets = sorted(
        {str(values[name]).strip() for name in IDENTIFIER_FIELDS if name in values} - {""}, key=len, reverse=True
    )
    for secret in (s for s in secrets if len(s) >= 3):
        problems = [problem.replace(secret, "(withheld)") for problem in problems]
    return problems


def _number(value: object) -> float | None:
    """The value as a finite float, or None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, Decimal)):
        try:
            number = float(value)
        except OverflowError:
            return None
    elif isinstance(value, str):
        try:
            number = float(Decimal(value.strip()))
        except (InvalidOperation, ValueError):
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _integer(value: object) -> int | None:
    number = _number(value)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _stage_token(value: object, letter: str) -> str | None:
    """'t2', 'T2', '2' or 2 -> 'T2'; descriptors in lower case: 't1A' -> 'T1a', 'T1MI' -> 'T1mi'."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[:1].upper() == letter:
        text = text[1:]
    match = re.fullmatch(r"([0-9])([A-Za-z]*)", text)
    if not match:
        return None
    return f"{letter}{match.group(1)}{match.group(2).lower()}"


def _parse_t(value: object, problems: list[str]) -> tuple[str | None, str | None]:
    token = _stage_token(value, "T")
    if token in T_STAGES:
        return token, None
    if token in T_SUBSTAGES:
        return token[:2], token
    allowed = ", ".join(T_STAGES) + ", or a descriptor " + ", ".join(T_SUBSTAGES)
    problems.append(f"t_stage: {_show(value)} is not an AJCC 8th-edition T stage (allowed: {allowed})")
    return None, None


def _parse_n(value: object, problems: list[str]) -> str | None:
    token = _stage_token(value, "N")
    if token in N_STAGES:
        return token
    problems.append(f"n_stage: {_show(value)} is not an AJCC 8th-edition N stage (allowed: {', '.join(N_STAGES)})")
    return None


def _parse_m(value: object, problems: list[str]) -> str | None:
    token = _stage_token(value, "M")
    if token in M_STAGES:
        return token
    problems.append(f"m_stage: {_show(value)} is not an AJCC 8th-edition M stage (allowed: {', '.join(M_STAGES)})")
    return None


def _parse_ecog(value: object, problems: list[str]) -> int | None:
    number = _number(value)
    if number is None:
        problems.append(f"ecog: {_show(value)} is not a number (allowed: integer 0-4)")
    elif not number.is_integer():
        problems.append(f"ecog: {_show(value)} is not an integer (allowed: integer 0-4)")
    elif not ECOG_RANGE[0] <= number <= ECOG_RANGE[1]:
        problems.append(f"ecog: {_show(value)} is out of range (allowed: integer 0-4)")
    else:
        return int(number)
    return None


_LIPI_ALLOWED = "good, intermediate, poor or 0-2"


def _parse_lipi(value: object, problems: list[str]) -> Lipi | None:
    if isinstance(value, Lipi):
        return value
    if isinstance(value, str) and value.strip().lower() in ("good", "intermediate", "poor"):
        return Lipi[value.strip().upper()]
    number = _integer(value)
    if number is not None and 0 <= number <= 2:
        return Lipi(number)
    problems.append(f"lipi: {_show(value)} is not a LIPI class (allowed: {_LIPI_ALLOWED})")
    return None


def _parse_positive(name: str, value: object, problems: list[str]) -> float | None:
    number = _number(value)
    if number is None:
        problems.append(f"{name}: {_show(value)} is not a number (allowed: positive number)")
    elif number <= 0:
        problems.append(f"{name}: {_show(value)} is not positive (allowed: positive number)")
    else:
        return number
    return None


_TRUE_WORDS = ("true", "yes", "y", "1")
_FALSE_WORDS = ("false", "no", "n", "0")


def _parse_flag(name: str, value: object, problems: list[str]) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    problems.append(f"{name}: {_show(value)} is not a yes/no value (allowed: true/false, yes/no, 1/0)")
    return None


_SEX_WORDS = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O"}


def _parse_sex(value: object, problems: list[str]) -> str | None:
    if isinstance(value, str) and value.strip().lower() in _SEX_WORDS:
        return _SEX_WORDS[value.strip().lower()]
    problems.append(f"sex: {_show(value)} is not allowed (allowed: F, M, O, female, male, other)")
    return None


def _parse_age(value: object, problems: list[str]) -> float | None:
    number = _number(value)
    if number is None:
        problems.append(f"age: {_show(value)} is not a number (allowed: years 0-130)")
    elif not AGE_RANGE[0] <= number <= AGE_RANGE[1]:
        problems.append(f"age: {_show(value)} is out of range (allowed: years 0-130)")
    else:
        return number
    return None


def _parse_identifier(name: str, value: object, problems: list[str]) -> str | None:
    # Values are PHI: the messages below describe the problem without them.
    if isinstance(value, int) and not isinstance(value, bool):
        # A JSON number would have lost leading zeros; insist on a string.
        problems.append(f"{name}: (value withheld) is a number (allowed: a string, so leading zeros survive)")
        return None
    if not isinstance(value, str):
        problems.append(f"{name}: (value withheld) is not text (allowed: a string)")
        return None
    text = value.strip()
    limit = _IDENTIFIER_MAX_LENGTH[name]
    if len(text) > limit:
        problems.append(f"{name}: (value withheld) has {len(text)} characters (allowed: at most {limit})")
        return None
    if "\\" in text or any(ord(ch) < 32 for ch in text):
        problems.append(f"{name}: (value withheld) contains a backslash or control character (allowed: DICOM text)")
        return None
    if name == "study_instance_uid" and not _UID_PATTERN.match(text):
        problems.append(f"{name}: (value withheld) is not a DICOM UID (allowed: digits separated by dots)")
        return None
    return text


def _parse_provenance(value: object, problems: list[str]) -> tuple[ValueProvenance, ...]:
    allowed = f"a JSON list of objects with the text keys {', '.join(_PROVENANCE_KEYS)}"
    if not isinstance(value, list):
        problems.append(f"{PROVENANCE_FIELD}: {_show(value)} is not a list (allowed: {allowed})")
        return ()
    items = []
    for index, item in enumerate(value, start=1):
        if (
            not isinstance(item, Mapping)
            or set(item) != set(_PROVENANCE_KEYS)
            or not all(isinstance(item[key], str) and item[key].strip() for key in _PROVENANCE_KEYS)
        ):
            problems.append(f"{PROVENANCE_FIELD}: entry {index} is malformed (allowed: {allowed})")
            continue
        items.append(ValueProvenance(**{key: item[key] for key in _PROVENANCE_KEYS}))
    return tuple(items)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _lipi_description(lipi: Lipi) -> str:
    return f"{lipi.label!r} ({int(lipi)})"


def _labs_reason(labs: LabValues) -> str:
    dnlr_relation = ">" if 4 * _exact(labs.anc) > 3 * _exact(labs.wbc) else "<="
    ldh_relation = ">" if _exact(labs.ldh) > _exact(labs.ldh_uln) else "<="
    return f"dNLR {labs.dnlr:.4g} {dnlr_relation} 3, LDH {labs.ldh:g} {ldh_relation} ULN {labs.ldh_uln:g}"


def _normalise_keys(mapping: Mapping[object, object], problems: list[str]) -> dict[str, object]:
    normalised: dict[str, object] = {}
    for key, value in mapping.items():
        name = str(key).strip().lower()
        if name in normalised:
            problems.append(f"{name}: given more than once (allowed: each field once)")
            continue
        normalised[name] = value
    unknown = [name for name in normalised if name not in ACCEPTED_FIELDS]
    for name in unknown:
        problems.append(f"{name}: unknown field (allowed: {', '.join(ACCEPTED_FIELDS)})")
    return {name: value for name, value in normalised.items() if name not in unknown}


def _record_problems(mapping: Mapping[object, object]) -> tuple[ClinicalRecord | None, list[str]]:
    problems: list[str] = []
    values = {name: value for name, value in _normalise_keys(mapping, problems).items() if not _is_missing(value)}

    identifiers = {}
    for name in IDENTIFIER_FIELDS:
        if name in values:
            identifiers[name] = _parse_identifier(name, values[name], problems)
    if not any(name in values for name in IDENTIFIER_FIELDS):
        problems.append(f"identifier: missing (allowed: at least one of {', '.join(IDENTIFIER_FIELDS)})")

    for name in REQUIRED_FIELDS:
        if name not in values:
            problems.append(f"{name}: missing (allowed: {_REQUIRED_ALLOWED[name]})")
    t_stage, t_substage = _parse_t(values["t_stage"], problems) if "t_stage" in values else (None, None)
    n_stage = _parse_n(values["n_stage"], problems) if "n_stage" in values else None
    m_stage = _parse_m(values["m_stage"], problems) if "m_stage" in values else None
    ecog = _parse_ecog(values["ecog"], problems) if "ecog" in values else None

    given_lipi = _parse_lipi(values["lipi"], problems) if "lipi" in values else None
    labs = None
    lab_names_given = [name for name in LAB_FIELDS if name in values]
    if lab_names_given and len(lab_names_given) < len(LAB_FIELDS):
        missing = [name for name in LAB_FIELDS if name not in values]
        problems.append(
            f"labs: {', '.join(lab_names_given)} given but {', '.join(missing)} missing"
            f" (allowed: all four of {', '.join(LAB_FIELDS)} or none)"
        )
    lab_numbers = {name: _parse_positive(name, values[name], problems) for name in lab_names_given}
    if len(lab_numbers) == len(LAB_FIELDS) and None not in lab_numbers.values():
        if lab_numbers["anc"] >= lab_numbers["wbc"]:
            problems.append(
                f"anc: {_show(values['anc'])} is not less than wbc {_show(values['wbc'])}"
                " (allowed: anc < wbc, both in the same unit)"
            )
        else:
            labs = LabValues(**lab_numbers)
    if "lipi" not in values and not lab_names_given:
        problems.append(
            f"lipi: missing (allowed: {_LIPI_ALLOWED}, or all four labs {', '.join(LAB_FIELDS)} to compute it)"
        )

    lipi, lipi_source = given_lipi, "given"
    if labs is not None:
        computed = lipi_from_labs(labs)
        if given_lipi is not None and given_lipi != computed:
            problems.append(
                f"lipi: given {_lipi_description(given_lipi)} but labs give {_lipi_description(computed)}:"
                f" {_labs_reason(labs)} (allowed: a LIPI that agrees with the labs, or only one of them)"
            )
        lipi, lipi_source = computed, ("given+labs" if given_lipi is not None else "labs")

    optional: dict[str, object] = {}
    if "age" in values:
        optional["age"] = _parse_age(values["age"], problems)
    if "sex" in values:
        optional["sex"] = _parse_sex(values["sex"], problems)
    for name in ("brain_metastases", "liver_metastases"):
        if name in values:
            optional[name] = _parse_flag(name, values[name], problems)
            if optional[name] and m_stage in ("M0", "M1a"):
                problems.append(
                    f"{name}: true contradicts m_stage {m_stage} (allowed: false, or m_stage M1, M1b or M1c,"
                    " since extrathoracic organ metastases are M1b/M1c)"
                )

    provenance = _parse_provenance(values[PROVENANCE_FIELD], problems) if PROVENANCE_FIELD in values else ()

    if problems:
        return None, _redact_identifiers(problems, values)
    record = ClinicalRecord(
        provenance=provenance,
        t_stage=t_stage,
        n_stage=n_stage,
        m_stage=m_stage,
        ecog=ecog,
        lipi=lipi,
        lipi_source=lipi_source,
        labs=labs,
        t_substage=t_substage,
        **identifiers,
        **optional,
    )
    return record, []


_REQUIRED_ALLOWED = {
    "t_stage": ", ".join(T_STAGES),
    "n_stage": ", ".join(N_STAGES),
    "m_stage": ", ".join(M_STAGES),
    "ecog": "integer 0-4",
}


def clinical_record_from_mapping(mapping: Mapping[object, object]) -> ClinicalRecord:
    """Validate one record given as field -> value (keys are case-insensitive).

    Missing values are ``None`` or blank strings.  Raises `ClinicalRecordError`
    listing every problem found.
    """
    if not isinstance(mapping, Mapping):
        raise ClinicalRecordError([f"record: a {type(mapping).__name__} is not an object (allowed: a JSON object)"])
    record, problems = _record_problems(mapping)
    if problems:
        raise ClinicalRecordError(problems)
    return record


@dataclass(frozen=True, slots=True)
class _RowProblem:
    """A row that could not even become a mapping; reported in row order."""

    text: str


def _records_from_mappings(items: Iterable[tuple[str, object]]) -> list[ClinicalRecord]:
    records, problems = [], []
    for label, item in items:
        if isinstance(item, _RowProblem):
            problems.append(f"{label}: {item.text}")
            continue
        if not isinstance(item, Mapping):
            problems.append(f"{label}: a {type(item).__name__} is not an object (allowed: a JSON object)")
            continue
        record, item_problems = _record_problems(item)
        problems.extend(f"{label}: {problem}" for problem in item_problems)
        if record is not None:
            records.append((label, record))
    problems.extend(_duplicate_problems(records))
    if problems:
        raise ClinicalRecordError(problems)
    return [record for _, record in records]


def _duplicate_problems(labelled: list[tuple[str, ClinicalRecord]]) -> list[str]:
    # Two records for one study would make matching ambiguous.
    problems, seen_uid, seen_ids = [], {}, {}
    for label, record in labelled:
        uid = record.study_instance_uid
        if uid is not None:
            if uid in seen_uid:
                problems.append(f"{label}: study_instance_uid: same as {seen_uid[uid]} (allowed: each study once)")
            else:
                seen_uid[uid] = label
        ids = tuple(getattr(record, name) for name in IDENTIFIER_FIELDS)
        if uid is None:
            if ids in seen_ids:
                problems.append(f"{label}: identifiers: same as {seen_ids[ids]} (allowed: each study once)")
            else:
                seen_ids[ids] = label
    return problems


def _load_json(text: str) -> object:
    try:
        return loads_strict(text)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        reason = str(exc).splitlines()[0]
        raise ClinicalRecordError([f"json: not valid JSON ({reason})"]) from None


def parse_clinical_json(text: str) -> ClinicalRecord:
    """Parse one record from a JSON object.  A JSON list is refused: use `parse_clinical_json_many`."""
    data = _load_json(text)
    if isinstance(data, list):
        raise ClinicalRecordError(
            [f"json: a list of {len(data)} records where one object was expected (use parse_clinical_json_many)"]
        )
    return clinical_record_from_mapping(data)


def parse_clinical_json_many(text: str) -> list[ClinicalRecord]:
    """Parse a JSON list of record objects (or a single object, giving one record).

    Problems are prefixed ``record N:`` (1-based) and all reported together.
    """
    data = _load_json(text)
    if isinstance(data, Mapping):
        return [clinical_record_from_mapping(data)]
    if not isinstance(data, list):
        raise ClinicalRecordError([f"json: a {type(data).__name__} (allowed: an object or a list of objects)"])
    if not data:
        raise ClinicalRecordError(["json: an empty list (allowed: at least one record)"])
    return _records_from_mappings((f"record {index}", item) for index, item in enumerate(data, start=1))


def parse_clinical_csv(text: str) -> list[ClinicalRecord]:
    """Parse comma-separated text with a header row; one record per row.

    ``row N`` in a problem is the line on which the record ends (the header
    is row 1), which is the spreadsheet row unless a quoted cell holds a line break.
    Empty cells are missing values; blank lines are skipped.  Any problem in
    any row rejects the whole file, with every problem listed.
    """
    text = text.removeprefix("\ufeff")
    # One row per physical line would miscount quoted cells with newlines; the
    # reader's line_num is the physical line where a record ends.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise ClinicalRecordError([f"csv: not valid CSV at line {reader.line_num} ({exc})"]) from None
    rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise ClinicalRecordError(["csv: empty (allowed: a header row and at least one record row)"])
    header_line, header = rows[0]
    names = [cell.strip().lower() for cell in header]
    problems = []
    if len(names) == 1 and ";" in names[0]:
        problems.append("header: looks semicolon-separated (allowed: comma-separated columns)")
    else:
        seen = set()
        for column, name in enumerate(names, start=1):
            if not name:
                problems.append(f"header: column {column} has no name (allowed: {', '.join(ACCEPTED_FIELDS)})")
            elif name in seen:
                problems.append(f"header: column {name!r} appears twice (allowed: each field once)")
            elif name not in ACCEPTED_FIELDS:
                problems.append(f"header: {name}: unknown field (allowed: {', '.join(ACCEPTED_FIELDS)})")
            seen.add(name)
    if problems:
        raise ClinicalRecordError(problems)
    if len(rows) == 1:
        raise ClinicalRecordError(["csv: a header but no record rows (allowed: at least one record row)"])

    items: list[tuple[str, object]] = []
    for line, row in rows[1:]:
        if len(row) != len(names):
            items.append((f"row {line}", _RowProblem(f"has {len(row)} cells but the header has {len(names)} columns")))
        else:
            items.append((f"row {line}", dict(zip(names, row))))
    return _records_from_mappings(items)
