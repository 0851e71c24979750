"""The clinical record: T, N, M stage, ECOG performance status and LIPI.

Records arrive as JSON (one object or a list) or CSV (header row, one record
per row) and are validated field by field; every problem in a record is
reported at once in one `ClinicalRecordError`.  The accepted formats are
documented in docs/clinical-record.md.

Validation is pydantic's: `ClinicalInput` (a model with ``extra="forbid"``)
parses each field as given, with a validator per field for the lenient
spellings, and checks the rules over the whole record; `ClinicalRecord`,
`LabValues` and `ValueProvenance` are frozen pydantic dataclasses, so one
built in code is held to the same types.  `_problems` turns pydantic's errors
into the ``field: why (allowed: ...)`` problems the formats document.

Identifiers (patient_id, accession_number, study_instance_uid) are PHI: no
message raised here ever contains their values, and they are hidden from the
record's repr.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass as stdlib_dataclass
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from sclc_risk_node.scoring.errors import ClinicalRecordError
from sclc_risk_node.scoring.strict_json import loads_strict
from sclc_risk_node.scoring.validated import raising_on_invalid


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
LIPI_SOURCES = ("given", "labs", "given+labs")

# --- pydantic: the records and the input are pydantic models; these turn its
# errors into the ``field: why (allowed: ...)`` problems of `ClinicalRecordError`.

_PROBLEM = "clinical_problem"
_RULES = "clinical_rules"
#: Records and their parts: unknown fields refused, instances frozen.
_RECORD_CONFIG = ConfigDict(extra="forbid")


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError(_PROBLEM, "{problem}", {"problem": text})


def _construction_problems(error: ValidationError, cls: type) -> list[str]:
    """Problems of a record built directly in code: ``field: value is not allowed (...)``."""
    problems: list[str] = []
    names = [f.name for f in dataclasses.fields(cls)]
    for item in error.errors(include_url=False):
        loc, kind, ctx = item["loc"], item["type"], item.get("ctx") or {}
        if loc and isinstance(loc[0], int) and loc[0] < len(names):  # a positional argument
            loc = (names[loc[0]], *loc[1:])
        name = ".".join(str(part) for part in loc) or "record"
        if kind == _RULES:
            problems += [text for _slot, text in ctx["rules"]]
        elif kind == _PROBLEM:
            problems.append(f"{name}: {ctx['problem']}")
        elif name == "ecog":
            problems.append(f"ecog: {item['input']!r} is not allowed (allowed: integer 0-4)")
        elif name == "lipi":
            problems.append(f"lipi: {item['input']!r} is not allowed (allowed: Lipi)")
        else:
            problems.append(f"{name}: {item['input']!r} is not allowed ({item['msg']})")
    return problems


#: Direct construction raises `ClinicalRecordError` listing every problem, as parsing does.
_clinical_errors = raising_on_invalid(lambda exc, cls: ClinicalRecordError(_construction_problems(exc, cls)))


@_clinical_errors
@dataclass(frozen=True, slots=True, config=_RECORD_CONFIG)
class LabValues:
    """Blood counts and LDH used to compute LIPI.

    ``anc`` and ``wbc`` in the same unit (e.g. 10^9/L); ``ldh`` and ``ldh_uln`` in the same unit (U/L).
    """

    anc: Annotated[float, Strict()]
    wbc: Annotated[float, Strict()]
    ldh: Annotated[float, Strict()]
    ldh_uln: Annotated[float, Strict()]

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


_NonBlankText = Annotated[str, Strict(), Field(pattern=r"\S")]


@_clinical_errors
@dataclass(frozen=True, slots=True, config=_RECORD_CONFIG)
class ValueProvenance:
    """Where one record value came from: the FHIR resource and its clinically relevant date.

    ``field`` is a record field (``ecog``, ``t_stage``, ``ldh_uln``...), ``code``
    the LOINC code that carried it, ``resource`` the resource's type/id
    (``Observation/abc``) and ``date`` its effective date/time as written (ISO 8601).
    """

    field: _NonBlankText
    code: _NonBlankText
    resource: _NonBlankText
    date: _NonBlankText

    def to_mapping(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "resource": self.resource, "date": self.date}


_PROVENANCE_KEYS = ("field", "code", "resource", "date")


def _one_of(allowed: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise _problem(f"{value!r} is not allowed (allowed: {', '.join(allowed)})")
        return value

    return AfterValidator(check)


@_clinical_errors
@dataclass(frozen=True, slots=True, config=_RECORD_CONFIG)
class ClinicalRecord:
    """One patient's clinical inputs, validated.

    ``t_stage`` is one of T1..T4, ``n_stage`` N0..N3, ``m_stage`` M0, M1, M1a, M1b, M1c;
    ``ecog`` 0..4.  ``lipi_source`` is ``"given"``, ``"labs"`` or ``"given+labs"`` (both, agreeing).
    At least one of the identifiers is set, so the node can match the record to a study.

    ``t_substage`` keeps an AJCC descriptor such as ``T1a`` when one was given
    (``t_stage`` is then its main stage).  ``age`` (years), ``sex`` (F/M/O),
    ``brain_metastases`` and ``liver_metastases`` are optional.

    A pydantic dataclass: one built directly in code is held to the same types
    and values as one parsed by `clinical_record_from_mapping` (which first
    accepts the lenient spellings, see `ClinicalInput`).
    """

    t_stage: Annotated[str, Strict(), _one_of(T_STAGES)]
    n_stage: Annotated[str, Strict(), _one_of(N_STAGES)]
    m_stage: Annotated[str, Strict(), _one_of(M_STAGES)]
    ecog: Annotated[int, Strict(), Field(ge=ECOG_RANGE[0], le=ECOG_RANGE[1])]
    #: A `Lipi`; an integer 0-2 is turned into one.
    lipi: Lipi
    lipi_source: Annotated[str, Strict(), _one_of(LIPI_SOURCES)]
    patient_id: Annotated[str, Strict()] | None = Field(default=None, repr=False)
    accession_number: Annotated[str, Strict()] | None = Field(default=None, repr=False)
    study_instance_uid: Annotated[str, Strict()] | None = Field(default=None, repr=False)
    labs: LabValues | None = None
    t_substage: Annotated[str, Strict()] | None = None
    age: Annotated[float, Strict()] | None = None
    sex: Annotated[str, Strict(), _one_of(SEXES)] | None = None
    brain_metastases: Annotated[bool, Strict()] | None = None
    liver_metastases: Annotated[bool, Strict()] | None = None
    provenance: tuple[ValueProvenance, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> ClinicalRecord:
        rules = []
        if self.t_substage is not None and (self.t_substage not in T_SUBSTAGES or self.t_substage[:2] != self.t_stage):
            rules.append(("t_substage", f"t_substage: {self.t_substage!r} does not refine t_stage {self.t_stage!r}"))
        if ("labs" in self.lipi_source) != (self.labs is not None):
            rules.append(("lipi_source", f"lipi_source: {self.lipi_source!r} does not match whether labs are present"))
        if not any(getattr(self, name) for name in IDENTIFIER_FIELDS):
            rules.append(
                ("identifier", f"identifier: missing (allowed: at least one of {', '.join(IDENTIFIER_FIELDS)})")
            )
        if rules:
            raise PydanticCustomError(_RULES, "{rules}", {"rules": tuple(rules)})
        return self

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
        value: object = getattr(self, field_name)
        if isinstance(value, bool):
            return "yes" if value else "no"
        return None if value is None else str(value)

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


def _t_stage(value: object) -> str:
    """The T stage as written, canonical: a main stage (``T2``) or a descriptor (``T1a``)."""
    token = _stage_token(value, "T")
    if token in T_STAGES or token in T_SUBSTAGES:
        return token
    allowed = ", ".join(T_STAGES) + ", or a descriptor " + ", ".join(T_SUBSTAGES)
    raise _problem(f"{_show(value)} is not an AJCC 8th-edition T stage (allowed: {allowed})")


def _n_stage(value: object) -> str:
    token = _stage_token(value, "N")
    if token in N_STAGES:
        return token
    raise _problem(f"{_show(value)} is not an AJCC 8th-edition N stage (allowed: {', '.join(N_STAGES)})")


def _m_stage(value: object) -> str:
    token = _stage_token(value, "M")
    if token in M_STAGES:
        return token
    raise _problem(f"{_show(value)} is not an AJCC 8th-edition M stage (allowed: {', '.join(M_STAGES)})")


def _ecog(value: object) -> int:
    number = _number(value)
    if number is None:
        raise _problem(f"{_show(value)} is not a number (allowed: integer 0-4)")
    if not number.is_integer():
        raise _problem(f"{_show(value)} is not an integer (allowed: integer 0-4)")
    if not ECOG_RANGE[0] <= number <= ECOG_RANGE[1]:
        raise _problem(f"{_show(value)} is out of range (allowed: integer 0-4)")
    return int(number)


_LIPI_ALLOWED = "good, intermediate, poor or 0-2"


def _lipi(value: object) -> Lipi:
    if isinstance(value, Lipi):
        return value
    if isinstance(value, str) and value.strip().lower() in ("good", "intermediate", "poor"):
        return Lipi[value.strip().upper()]
    number = _integer(value)
    if number is not None and 0 <= number <= 2:
        return Lipi(number)
    raise _problem(f"{_show(value)} is not a LIPI class (allowed: {_LIPI_ALLOWED})")


def _positive(value: object) -> float:
    number = _number(value)
    if number is None:
        raise _problem(f"{_show(value)} is not a number (allowed: positive number)")
    if number <= 0:
        raise _problem(f"{_show(value)} is not positive (allowed: positive number)")
    return number


_TRUE_WORDS = ("true", "yes", "y", "1")
_FALSE_WORDS = ("false", "no", "n", "0")


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise _problem(f"{_show(value)} is not a yes/no value (allowed: true/false, yes/no, 1/0)")


_SEX_WORDS = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O"}


def _sex(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _SEX_WORDS:
        return _SEX_WORDS[value.strip().lower()]
    raise _problem(f"{_show(value)} is not allowed (allowed: F, M, O, female, male, other)")


def _age(value: object) -> float:
    number = _number(value)
    if number is None:
        raise _problem(f"{_show(value)} is not a number (allowed: years 0-130)")
    if not AGE_RANGE[0] <= number <= AGE_RANGE[1]:
        raise _problem(f"{_show(value)} is out of range (allowed: years 0-130)")
    return number


def _identifier(name: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        # Values are PHI: the messages below describe the problem without them.
        if isinstance(value, int) and not isinstance(value, bool):
            # A JSON number would have lost leading zeros; insist on a string.
            raise _problem("(value withheld) is a number (allowed: a string, so leading zeros survive)")
        if not isinstance(value, str):
            raise _problem("(value withheld) is not text (allowed: a string)")
        text = value.strip()
        limit = _IDENTIFIER_MAX_LENGTH[name]
        if len(text) > limit:
            raise _problem(f"(value withheld) has {len(text)} characters (allowed: at most {limit})")
        if "\\" in text or any(ord(ch) < 32 for ch in text):
            raise _problem("(value withheld) contains a backslash or control character (allowed: DICOM text)")
        if name == "study_instance_uid" and not _UID_PATTERN.match(text):
            raise _problem("(value withheld) is not a DICOM UID (allowed: digits separated by dots)")
        return text

    return parse


_PROVENANCE_ALLOWED = f"a JSON list of objects with the text keys {', '.join(_PROVENANCE_KEYS)}"


def _provenance_list(value: object) -> object:
    # The entries themselves are `ValueProvenance`s, validated by pydantic (see `_field_problems`).
    if not isinstance(value, list):
        raise _problem(f"{_show(value)} is not a list (allowed: {_PROVENANCE_ALLOWED})")
    return tuple(value)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _lipi_description(lipi: Lipi) -> str:
    return f"{lipi.label!r} ({int(lipi)})"


def _labs_reason(labs: LabValues) -> str:
    dnlr_relation = ">" if 4 * _exact(labs.anc) > 3 * _exact(labs.wbc) else "<="
    ldh_relation = ">" if _exact(labs.ldh) > _exact(labs.ldh_uln) else "<="
    return f"dNLR {labs.dnlr:.4g} {dnlr_relation} 3, LDH {labs.ldh:g} {ldh_relation} ULN {labs.ldh_uln:g}"


def _normalise_keys(mapping: Mapping[object, object], problems: list[str]) -> dict[str, object]:
    # Keys are case-insensitive and trimmed (spreadsheet headers); pydantic then refuses unknown ones.
    normalised: dict[str, object] = {}
    for key, value in mapping.items():
        name = str(key).strip().lower()
        if name in normalised:
            problems.append(f"{name}: given more than once (allowed: each field once)")
            continue
        normalised[name] = value
    return normalised


_REQUIRED_ALLOWED = {
    "t_stage": ", ".join(T_STAGES),
    "n_stage": ", ".join(N_STAGES),
    "m_stage": ", ".join(M_STAGES),
    "ecog": "integer 0-4",
}

_PatientId = Annotated[str, Strict(), BeforeValidator(_identifier("patient_id"))]
_AccessionNumber = Annotated[str, Strict(), BeforeValidator(_identifier("accession_number"))]
_StudyUid = Annotated[str, Strict(), BeforeValidator(_identifier("study_instance_uid"))]
_LabValue = Annotated[float, Strict(), BeforeValidator(_positive)]
_Flag = Annotated[bool, Strict(), BeforeValidator(_flag)]


class ClinicalInput(BaseModel):
    """One record as given (JSON object or CSV row), each field parsed by its own validator.

    Keys are the documented input fields; anything else is refused (``extra="forbid"``).
    Every field is optional here: which ones a record needs is a rule over the whole
    record (`_record_rules`), so that a missing field and a malformed one are reported
    together.  Lenient spellings (``t2``, ``2``, ``"yes"``, ``"female"``) are turned
    into the canonical value by the field's `BeforeValidator`; the declared type then
    holds pydantic to it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: _PatientId | None = None
    accession_number: _AccessionNumber | None = None
    study_instance_uid: _StudyUid | None = None
    #: A main stage (T1..T4) or an AJCC descriptor (T1mi, T1a ... T2b).
    t_stage: Annotated[str, Strict(), BeforeValidator(_t_stage)] | None = None
    n_stage: Annotated[str, Strict(), BeforeValidator(_n_stage)] | None = None
    m_stage: Annotated[str, Strict(), BeforeValidator(_m_stage)] | None = None
    ecog: Annotated[int, Strict(), BeforeValidator(_ecog)] | None = None
    lipi: Annotated[Lipi, Strict(), BeforeValidator(_lipi)] | None = None
    anc: _LabValue | None = None
    wbc: _LabValue | None = None
    ldh: _LabValue | None = None
    ldh_uln: _LabValue | None = None
    age: Annotated[float, Strict(), BeforeValidator(_age)] | None = None
    sex: Annotated[str, Strict(), BeforeValidator(_sex)] | None = None
    brain_metastases: _Flag | None = None
    liver_metastases: _Flag | None = None
    provenance: Annotated[tuple[ValueProvenance, ...], BeforeValidator(_provenance_list)] = ()

    @property
    def labs(self) -> LabValues | None:
        """The four lab values when all four are given and anc < wbc (else `_record_rules` complains)."""
        if self.anc is None or self.wbc is None or self.ldh is None or self.ldh_uln is None or self.anc >= self.wbc:
            return None
        return LabValues(self.anc, self.wbc, self.ldh, self.ldh_uln)

    @model_validator(mode="after")
    def _record_rules(self, info: ValidationInfo) -> ClinicalInput:
        """The rules over several fields, run on the fields that parsed; all problems at once."""
        context = info.context if isinstance(info.context, Mapping) else {}
        raw: Mapping[str, object] = context.get("raw", {})
        # The keys as given (invalid values included) when parsing; else the fields that are set.
        given = (
            set(raw)
            if "raw" in context
            else {name for name in type(self).model_fields if getattr(self, name) not in (None, ())}
        )
        rules: list[tuple[str, str]] = []
        if not given & set(IDENTIFIER_FIELDS):
            rules.append(
                ("identifier", f"identifier: missing (allowed: at least one of {', '.join(IDENTIFIER_FIELDS)})")
            )
        rules += [
            (f"missing:{name}", f"{name}: missing (allowed: {_REQUIRED_ALLOWED[name]})")
            for name in REQUIRED_FIELDS
            if name not in given
        ]
        lab_names_given = [name for name in LAB_FIELDS if name in given]
        if lab_names_given and len(lab_names_given) < len(LAB_FIELDS):
            missing = [name for name in LAB_FIELDS if name not in given]
            rules.append(
                (
                    "labs",
                    f"labs: {', '.join(lab_names_given)} given but {', '.join(missing)} missing"
                    f" (allowed: all four of {', '.join(LAB_FIELDS)} or none)",
                )
            )
        if self.anc is not None and self.wbc is not None and self.ldh is not None and self.ldh_uln is not None:
            if self.anc >= self.wbc:
                shown_anc, shown_wbc = _show(raw.get("anc", self.anc)), _show(raw.get("wbc", self.wbc))
                rules.append(
                    (
                        "anc<wbc",
                        f"anc: {shown_anc} is not less than wbc {shown_wbc} (allowed: anc < wbc, both in the same unit)",
                    )
                )
        if "lipi" not in given and not lab_names_given:
            rules.append(
                (
                    "lipi:missing",
                    f"lipi: missing (allowed: {_LIPI_ALLOWED}, or all four labs {', '.join(LAB_FIELDS)} to compute it)",
                )
            )
        labs = self.labs
        if labs is not None and self.lipi is not None and self.lipi != lipi_from_labs(labs):
            rules.append(
                (
                    "lipi:labs",
                    f"lipi: given {_lipi_description(self.lipi)} but labs give {_lipi_description(lipi_from_labs(labs))}:"
                    f" {_labs_reason(labs)} (allowed: a LIPI that agrees with the labs, or only one of them)",
                )
            )
        for name in ("brain_metastases", "liver_metastases"):
            if getattr(self, name) and self.m_stage in ("M0", "M1a"):
                rules.append(
                    (
                        f"{name}:m_stage",
                        f"{name}: true contradicts m_stage {self.m_stage} (allowed: false, or m_stage M1, M1b or M1c,"
                        " since extrathoracic organ metastases are M1b/M1c)",
                    )
                )
        if rules:
            raise PydanticCustomError(_RULES, "{rules}", {"rules": tuple(rules)})
        return self

    def record(self) -> ClinicalRecord:
        """The validated record (LIPI from the labs when they are given)."""
        assert self.t_stage and self.n_stage and self.m_stage and self.ecog is not None  # by `_record_rules`
        labs = self.labs
        if labs is not None:
            lipi, source = lipi_from_labs(labs), ("given+labs" if self.lipi is not None else "labs")
        else:
            assert self.lipi is not None  # by `_record_rules`
            lipi, source = self.lipi, "given"
        return ClinicalRecord(
            t_stage=self.t_stage[:2],
            t_substage=self.t_stage if self.t_stage in T_SUBSTAGES else None,
            n_stage=self.n_stage,
            m_stage=self.m_stage,
            ecog=self.ecog,
            lipi=lipi,
            lipi_source=source,
            labs=labs,
            patient_id=self.patient_id,
            accession_number=self.accession_number,
            study_instance_uid=self.study_instance_uid,
            age=self.age,
            sex=self.sex,
            brain_metastases=self.brain_metastases,
            liver_metastases=self.liver_metastases,
            provenance=self.provenance,
        )


#: The order problems are reported in: the record's fields as documented, each
#: cross-field rule next to the field it is about.
_PROBLEM_ORDER = (
    "unknown",
    "patient_id",
    "accession_number",
    "study_instance_uid",
    "identifier",
    *(f"missing:{name}" for name in REQUIRED_FIELDS),
    *REQUIRED_FIELDS,
    "lipi",
    "labs",
    *LAB_FIELDS,
    "anc<wbc",
    "lipi:missing",
    "lipi:labs",
    "age",
    "sex",
    "brain_metastases",
    "brain_metastases:m_stage",
    "liver_metastases",
    "liver_metastases:m_stage",
    PROVENANCE_FIELD,
)


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    """Pydantic's errors as (order key, ``"field: why"``); the field is the key as given."""
    problems: list[tuple[str, str]] = []
    malformed_entries: set[int] = set()
    for item in error.errors(include_url=False):
        loc, kind, ctx = tuple(item["loc"]), item["type"], item.get("ctx") or {}
        if kind == _RULES:
            problems += list(ctx["rules"])
            continue
        name = str(loc[0]) if loc else "record"
        if kind == "extra_forbidden":
            problems.append(("unknown", f"{name}: unknown field (allowed: {', '.join(ACCEPTED_FIELDS)})"))
        elif kind == _PROBLEM:
            problems.append((name, f"{name}: {ctx['problem']}"))
        elif name == PROVENANCE_FIELD and len(loc) > 1 and isinstance(loc[1], int):
            # One line per malformed entry, however many of its keys are wrong.
            if loc[1] not in malformed_entries:
                malformed_entries.add(loc[1])
                problems.append((name, f"{name}: entry {loc[1] + 1} is malformed (allowed: {_PROVENANCE_ALLOWED})"))
        else:  # a parser returned the wrong type: a bug here, still reported under the field
            problems.append((name, f"{name}: {item['msg']}"))
    return problems


def _record_problems(mapping: Mapping[object, object]) -> tuple[ClinicalRecord | None, list[str]]:
    """Validate one record: pydantic parses every field, then checks the rules over the whole record.

    Pydantic skips a model's own rules while any field is invalid; to report a
    malformed field and a missing one together, the rules are then run again on
    the fields that did parse.
    """
    problems: list[str] = []
    values = {name: value for name, value in _normalise_keys(mapping, problems).items() if not _is_missing(value)}
    context = {"raw": values}
    try:
        record = ClinicalInput.model_validate(values, context=context).record()
        return (None, _redact_identifiers(problems, values)) if problems else (record, [])
    except ValidationError as exc:
        found = _problems(exc)
        invalid = {str(item["loc"][0]) for item in exc.errors() if item["loc"] and item["type"] != _RULES}
    if invalid:
        parsed = {name: value for name, value in values.items() if name not in invalid}
        try:
            ClinicalInput.model_validate(parsed, context=context)
        except ValidationError as rules:
            found += _problems(rules)
    found.sort(key=lambda item: _PROBLEM_ORDER.index(item[0]) if item[0] in _PROBLEM_ORDER else len(_PROBLEM_ORDER))
    return None, _redact_identifiers(problems + [text for _, text in found], values)


def clinical_record_from_mapping(mapping: Mapping[object, object] | object) -> ClinicalRecord:
    """Validate one record given as field -> value (keys are case-insensitive).

    Missing values are ``None`` or blank strings.  Raises `ClinicalRecordError`
    listing every problem found.
    """
    if not isinstance(mapping, Mapping):
        raise ClinicalRecordError([f"record: a {type(mapping).__name__} is not an object (allowed: a JSON object)"])
    record, problems = _record_problems(mapping)
    if record is None:
        raise ClinicalRecordError(problems)
    return record


@stdlib_dataclass(frozen=True, slots=True)
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
    problems: list[str] = []
    seen_uid: dict[str, str] = {}
    seen_ids: dict[tuple[str | None, ...], str] = {}
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
