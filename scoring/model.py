"""Frozen integrated Cox model files: parsing, sealing and validation.

A model file is one JSON object (docs/model-format.md, schema in
models/frozen-model.schema.json).  Loading checks, in order: the JSON itself,
the schema, the sha256 seal, then what a schema cannot express (duplicate
features, shape features on filtered images, encodings that do not fit their
clinical field, a non-monotone baseline survival ...).  Any failure is a
`ModelFileError` with a one-line message.

Schema v2 (written by training) adds the applicability domain
(`scoring.domain`, checked against the model's features) and a per-feature
``transform``; v1 files still load, with no domain (`DOMAIN_UNKNOWN` results).

This module never opens user paths; the caller reads the file and passes its
text.  The schema ships as package data and is read with importlib.resources.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from importlib import resources
from types import MappingProxyType
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from sclc_risk_node.scoring.clinical import (
    AGE_RANGE,
    CLINICAL_FIELD_LEVELS,
    ECOG_RANGE,
    NUMERIC_CLINICAL_FIELDS,
    ClinicalRecord,
)
from sclc_risk_node.scoring.domain import ApplicabilityDomain, FeatureScale, transform_value
from sclc_risk_node.scoring.errors import ClinicalRecordError, ModelFileError
from sclc_risk_node.scoring.strict_json import loads_strict
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, ModelIdentity, RingDefinition

#: The schema version this node writes (v2: applicability domain and feature transforms).
SCHEMA_VERSION = 2
#: The schema versions this node reads; v1 files have no domain and give `DOMAIN_UNKNOWN`.
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
SCHEMA_PACKAGE = "sclc_risk_node.models"
SCHEMA_FILENAME = "frozen-model.schema.json"
HASH_KEY = "sha256"
#: The name of the radiomics-score term in `RiskResult.integrated_terms`.
RADIOMICS_SCORE_TERM = "radiomics_score"
#: The model must predict PFS at least this far (months): the node reports S(6) and S(12).
REQUIRED_HORIZON_MONTHS = 12.0

#: How a clinical field may become a number (`Encoding.kind`).
ENCODING_KINDS = ("indicator", "ordinal", "numeric", "threshold")

_NUMERIC_RANGES = {"ecog": ECOG_RANGE, "lipi": (0, 2), "age": AGE_RANGE}


# ---------------------------------------------------------------------------
# Canonical form and seal


def _plain(value: Any) -> Any:
    """Mappings -> dicts and tuples -> lists, so any frozen view hashes like the JSON it came from."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def canonical_json(mapping: Mapping[str, Any]) -> bytes:
    """The bytes the seal covers: everything but ``sha256``, sorted keys, no spaces, UTF-8."""
    content = {key: value for key, value in _plain(mapping).items() if key != HASH_KEY}
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise ModelFileError(f"model content cannot be canonicalised: {exc}") from None
    except TypeError as exc:
        raise ModelFileError(f"model content is not JSON data: {exc}") from None
    return text.encode("utf-8")


def canonical_sha256(mapping: Mapping[str, Any]) -> str:
    """Hex sha256 of `canonical_json` (the ``sha256`` key itself is excluded)."""
    return hashlib.sha256(canonical_json(mapping)).hexdigest()


def seal(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``mapping`` with ``sha256`` set to its canonical hash (replacing any old one)."""
    sealed = {key: value for key, value in _plain(mapping).items() if key != HASH_KEY}
    sealed[HASH_KEY] = canonical_sha256(sealed)
    return sealed


# ---------------------------------------------------------------------------
# Schema


@functools.lru_cache(maxsize=1)
def _shipped_schema_text() -> str:
    return resources.files(SCHEMA_PACKAGE).joinpath(SCHEMA_FILENAME).read_text(encoding="utf-8")


def load_shipped_schema() -> dict[str, Any]:
    """The JSON schema shipped in the ``sclc_risk_node.models`` package (a fresh copy)."""
    schema: dict[str, Any] = json.loads(_shipped_schema_text())
    return schema


@functools.lru_cache(maxsize=4)
def _validator_for(schema_text: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(schema_text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _json_path(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _describe_schema_error(error: jsonschema.ValidationError) -> str:
    path = _json_path(error.absolute_path)
    key = f"'{path}'" if path else "(top level)"
    # iter_errors sets both on every error it yields (the stubs also allow "unset"): the part of
    # the file that failed, and the schema keyword's value; JSON values of any type.
    instance: Any = error.instance
    expected: Any = error.validator_value
    if error.validator == "required":
        missing = [name for name in expected if name not in instance]
        full = f"{path}.{missing[0]}" if path else missing[0]
        return f"model file missing required key '{full}'"
    if error.validator == "additionalProperties":
        allowed = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        extra = [name for name in instance if name not in allowed]
        full = f"{path}.{extra[0]}" if path else extra[0]
        return f"model file has unknown key '{full}' (allowed here: {', '.join(allowed)})"
    if error.validator == "type":
        got = "null" if instance is None else _JSON_TYPES.get(type(instance), type(instance).__name__)
        shown = "" if instance is None or isinstance(instance, (dict, list)) else f" {_short(instance)}"
        return f"model file key {key} must be {expected}, got {got}{shown}"
    if error.validator in ("const", "enum") and path == "schema_version":
        readable = ", ".join(str(v) for v in (expected if isinstance(expected, list) else [expected]))
        return f"model file schema_version {_short(instance)} is not supported (this node reads {readable})"
    if error.validator == "enum" and "propertyNames" in error.schema_path:
        allowed = ", ".join(_short(item) for item in expected)
        return f"model file key {key} has a key {_short(instance)} that is not allowed (allowed: {allowed})"
    if error.validator in ("const", "enum"):
        allowed = ", ".join(_short(item) for item in ([expected] if error.validator == "const" else expected))
        return f"model file key {key} is {_short(instance)} (allowed: {allowed})"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if error.validator in bounds:
        return f"model file key {key} is {_short(instance)} (must be {bounds[error.validator]} {expected})"
    if error.validator == "pattern":
        return f"model file key {key} is {_short(instance)} (must match {expected})"
    if error.validator in ("minItems", "minProperties"):
        return f"model file key {key} has {len(instance)} entries (needs at least {expected})"
    if error.validator == "uniqueItems":
        return f"model file key {key} has repeated entries"
    return f"model file key {key}: {error.message}"


def _check_schema(data: Any, schema: Mapping[str, Any] | None) -> None:
    schema_text = _shipped_schema_text() if schema is None else json.dumps(_plain(schema), sort_keys=True)
    validator = _validator_for(schema_text)
    errors = list(validator.iter_errors(data))
    if errors:
        message = _describe_schema_error(best_match(errors))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more schema problem{'s' if len(errors) > 2 else ''})"
        raise ModelFileError(message)


# ---------------------------------------------------------------------------
# Model parts


@dataclass(frozen=True, slots=True)
class RadiomicsTerm:
    """One LASSO-Cox feature: z = (transform(value) - mean) / sd, contribution = coefficient * z.

    ``transform`` is ``none`` or ``signed_log1p`` (sign(x) * log1p(|x|), for
    features that scale with size); ``mean`` and ``sd`` are of the
    transformed training values (schema v2; v1 files are always ``none``).
    """

    spec: FeatureSpec
    mean: float
    sd: float
    coefficient: float
    transform: str = "none"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def scale(self) -> FeatureScale:
        return FeatureScale(self.name, self.transform, self.mean, self.sd)

    def standardise(self, value: float) -> float:
        return (transform_value(self.transform, value) - self.mean) / self.sd


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a clinical field becomes a number.

    ``kind`` is ``indicator`` (1 if the level is in ``levels`` else 0),
    ``ordinal`` (``mapping[level]``), ``numeric`` (the field's number) or
    ``threshold`` (1 if the field's number >= ``at_least`` else 0).
    """

    kind: str
    levels: frozenset[str] = frozenset()
    mapping: Mapping[str, float] = dataclass_field(default_factory=lambda: MappingProxyType({}))
    at_least: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ENCODING_KINDS:
            raise ValueError(f"encoding kind {self.kind!r} is not one of {', '.join(ENCODING_KINDS)}")
        if self.kind == "threshold" and self.at_least is None:
            raise ValueError("a threshold encoding needs at_least")

    @property
    def reads_level(self) -> bool:
        return self.kind in ("indicator", "ordinal")

    def encode(self, level: str | None, number: float | None) -> float:
        """The encoded value of a field's ``level`` (indicator, ordinal) or ``number`` (numeric, threshold)."""
        if self.kind == "indicator":
            return 1.0 if level in self.levels else 0.0
        if self.kind == "ordinal":
            if level is None:
                raise ValueError("an ordinal encoding needs the field's level")
            return float(self.mapping[level])
        if number is None:
            raise ValueError(f"a {self.kind} encoding needs the field's number")
        if self.kind == "numeric":
            return float(number)
        assert self.at_least is not None  # __post_init__: a threshold has its bound
        return 1.0 if number >= self.at_least else 0.0


@dataclass(frozen=True, slots=True)
class ClinicalCovariate:
    """One clinical term of the integrated Cox model."""

    name: str
    field: str
    encoding: Encoding
    coefficient: float

    def encode(self, record: ClinicalRecord) -> float:
        """The encoded value; `ClinicalRecordError` if the record lacks the (optional) field."""
        if self.encoding.reads_level:
            level, number = record.level(self.field), None
            missing = level is None
        else:
            level, number = None, record.number(self.field)
            missing = number is None
        if missing:
            raise ClinicalRecordError(
                [f"{self.field}: missing (allowed: any recorded value; the model's covariate {self.name} needs it)"]
            )
        return self.encoding.encode(level, number)


@dataclass(frozen=True, slots=True)
class BaselineSurvival:
    """Breslow baseline PFS survival S0(t), a right-continuous step function of months.

    S0(t) = 1 before ``times[0]`` and ``survival[i]`` for ``times[i] <= t <
    times[i+1]``; defined up to ``valid_until``.  For a patient with linear
    predictor lp, S(t | lp) = S0(t) ** exp(lp - ``centre``).
    """

    times: tuple[float, ...]
    survival: tuple[float, ...]
    valid_until: float
    centre: float

    def baseline_at(self, months: float) -> float:
        if not 0 <= months <= self.valid_until:
            raise ValueError(f"baseline survival is defined for 0-{self.valid_until:g} months, not {months:g}")
        steps_taken = bisect.bisect_right(self.times, months)
        return 1.0 if steps_taken == 0 else self.survival[steps_taken - 1]

    def survival_at(self, months: float, linear_predictor: float) -> float:
        baseline = self.baseline_at(months)
        try:
            relative_hazard = math.exp(linear_predictor - self.centre)
        except OverflowError:
            # exp overflows only for an enormous hazard; any S0 < 1 then goes to 0.
            return 1.0 if baseline == 1.0 else 0.0
        survival: float = baseline**relative_hazard  # real: 0 <= S0 <= 1 and the exponent is positive
        return survival


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


@dataclass(frozen=True, slots=True)
class FrozenModel:
    """A validated, sealed integrated clinical + radiomics Cox model.

    Build it with `FrozenModel.from_json` or `FrozenModel.from_mapping`; both
    refuse anything the checks in this module reject.
    """

    identity: ModelIdentity
    schema_version: int
    created: str
    extraction: ExtractionSettings
    radiomics_terms: tuple[RadiomicsTerm, ...]
    radiomics_cutoff: float
    radiomics_score_coefficient: float
    clinical_covariates: tuple[ClinicalCovariate, ...]
    risk_cutoff: float
    baseline_survival: BaselineSurvival
    training_summary: Mapping[str, Any]
    #: None for a schema-v1 file: results then carry `scoring.types.DOMAIN_UNKNOWN`.
    applicability_domain: ApplicabilityDomain | None = None

    @property
    def feature_specs(self) -> tuple[FeatureSpec, ...]:
        return tuple(term.spec for term in self.radiomics_terms)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(term.name for term in self.radiomics_terms)

    @property
    def clinical_fields(self) -> tuple[str, ...]:
        """The clinical fields the model reads, in covariate order, without repeats."""
        return tuple(dict.fromkeys(covariate.field for covariate in self.clinical_covariates))

    @classmethod
    def from_json(cls, text: str, schema: Mapping[str, Any] | None = None) -> FrozenModel:
        """Parse and validate a model file's text.  ``schema`` defaults to the shipped one."""
        return cls.from_mapping(_load_json(text), schema=schema)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> FrozenModel:
        """Validate already-parsed model content (schema, seal, semantics) and build the model."""
        if not isinstance(mapping, Mapping):
            got = _JSON_TYPES.get(type(mapping), type(mapping).__name__)
            raise ModelFileError(f"model file must hold a JSON object, not {got}")
        data = _plain(copy.deepcopy(dict(mapping)))
        _check_schema(data, schema)
        _check_seal(data)
        problems = _semantic_problems(data)
        if problems:
            raise ModelFileError("model file is inconsistent: " + "; ".join(problems))
        return _build(data)


def _check_seal(data: Mapping[str, Any]) -> None:
    stated, actual = data[HASH_KEY], canonical_sha256(data)
    if stated != actual:
        raise ModelFileError(
            f"model file sha256 mismatch: content hashes to {actual[:16]}…, file says {stated[:16]}…"
            " (file was modified after it was frozen)"
        )


def _load_json(text: str) -> Any:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"model file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return loads_strict(text)
    except ValueError as exc:
        raise ModelFileError(f"model file is not valid JSON: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------
# Semantic checks (what the schema cannot say)


def _produced_image_type_problem(image_type: str, extraction: Mapping[str, Any]) -> str | None:
    """Why pyradiomics, configured as ``extraction`` says, would not produce ``image_type``; None if it would."""
    image_types = extraction["image_types"]

    def needs(key: str) -> str | None:
        return None if key in image_types else f"needs image type {key} enabled in extraction.image_types"

    simple = {
        "original": "Original",
        "square": "Square",
        "squareroot": "SquareRoot",
        "logarithm": "Logarithm",
        "exponential": "Exponential",
        "gradient": "Gradient",
        "lbp-2D": "LBP2D",
    }
    if image_type in simple:
        return needs(simple[image_type])
    if re.fullmatch(r"wavelet[0-9]*-[LH]{2,3}", image_type):
        return needs("Wavelet")
    if re.fullmatch(r"lbp-3D-(m[0-9]+|k)", image_type):
        return needs("LBP3D")
    log_match = re.fullmatch(r"log-sigma-([0-9-]+)-mm-3D", image_type)
    if log_match:
        if "LoG" not in image_types:
            return needs("LoG")
        sigmas = image_types["LoG"].get("sigma", extraction["settings"].get("sigma", []))
        # pyradiomics names the image str(sigma) with '.' -> '-', so 2 and 2.0 differ.
        produced = {str(sigma).replace(".", "-") for sigma in (sigmas if isinstance(sigmas, list) else [sigmas])}
        if log_match.group(1) not in produced:
            wanted = log_match.group(1).replace("-", ".")
            return f"needs LoG sigma {wanted} (extraction gives {sorted(produced) or 'none'})"
        return None
    return "is not a pyradiomics image type (original, wavelet-XXX, log-sigma-S-mm-3D, square, ...)"


def _feature_spec(feature: Mapping[str, Any]) -> FeatureSpec:
    return FeatureSpec(feature["region"], feature["image_type"], feature["feature_class"], feature["feature"])


def _encoding_problems(where: str, field: str, encoding: Mapping[str, Any]) -> list[str]:
    kind = encoding["kind"]
    if kind in ("indicator", "ordinal"):
        domain = CLINICAL_FIELD_LEVELS.get(field)
        if domain is None:
            return [f"{where}: {kind} encoding needs a categorical field, {field} is numeric only"]
        if kind == "indicator":
            unknown = [level for level in encoding["levels"] if level not in domain]
            if unknown:
                return [f"{where}: levels {unknown} are not levels of {field} (allowed: {', '.join(domain)})"]
            if set(encoding["levels"]) == set(domain):
                return [f"{where}: indicator of every level of {field} is constant 1"]
            return []
        keys = set(encoding["map"])
        unknown, unmapped = sorted(keys - set(domain)), [level for level in domain if level not in keys]
        if unknown or unmapped:
            return [
                f"{where}: ordinal map must cover exactly {', '.join(domain)}"
                f" (unknown: {unknown}, unmapped: {unmapped})"
            ]
        if len(set(encoding["map"].values())) == 1:
            return [f"{where}: ordinal map gives every level the same value (a constant)"]
        return []
    if field not in NUMERIC_CLINICAL_FIELDS:
        return [f"{where}: {kind} encoding needs a numeric field ({', '.join(NUMERIC_CLINICAL_FIELDS)}), not {field}"]
    if kind == "threshold":
        low, high = _NUMERIC_RANGES[field]
        if not low < encoding["at_least"] <= high:
            return [f"{where}: threshold at_least {encoding['at_least']:g} makes {field} ({low}-{high}) a constant"]
    return []


def _domain_problems(data: Mapping[str, Any]) -> list[str]:
    """Schema v2's applicability domain must describe exactly the model's features; v1 has none."""
    features = data["radiomics"]["features"]
    domain = data.get("applicability_domain")
    if data["schema_version"] < 2:
        problems = []
        if domain is not None:
            problems.append("applicability_domain needs schema_version 2")
        problems += [
            f"radiomics.features[{index}]: transform needs schema_version 2"
            for index, feature in enumerate(features)
            if "transform" in feature
        ]
        return problems
    if domain is None:
        # The shipped schema requires it for v2; a caller's own schema may not.
        return ["schema_version 2 needs an applicability_domain"]
    names = [_feature_spec(feature).name for feature in features]
    recorded = list(domain["features"])
    problems = []
    missing = [name for name in names if name not in recorded]
    extra = [name for name in recorded if name not in names]
    if missing:
        problems.append(f"applicability_domain.features lacks model feature(s) {', '.join(missing)}")
    if extra:
        problems.append(f"applicability_domain.features has {', '.join(extra)}, which the model does not use")
    try:
        parsed = ApplicabilityDomain.from_mapping(domain)
    except ValueError as exc:
        return problems + [f"applicability_domain.rule: {exc}"]
    for name, distribution in parsed.features.items():
        problems += distribution.problems(f"applicability_domain.features[{name}]")
    for name in ("radiomics_score", "risk_score"):
        problems += getattr(parsed, name).problems(f"applicability_domain.{name}")
    return problems


def _semantic_problems(data: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    try:
        datetime.fromisoformat(data["created"].replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"created {data['created']!r} is not a valid date-time")

    extraction = data["extraction"]
    ring = extraction["ring"]
    try:
        RingDefinition(ring["outward_mm"], ring["inward_mm"], ring["method"])
    except ValueError as exc:
        problems.append(f"extraction.ring: {exc}")

    seen_features: dict[str, int] = {}
    for index, feature in enumerate(data["radiomics"]["features"]):
        where = f"radiomics.features[{index}]"
        name = _feature_spec(feature).name
        if name in seen_features:
            problems.append(f"{where}: duplicate feature {name} (also radiomics.features[{seen_features[name]}])")
        seen_features.setdefault(name, index)
        if not feature["sd"] > 0:
            problems.append(f"{where}: sd {feature['sd']:g} must be > 0")
        if feature["feature_class"] in ("shape", "shape2D") and feature["image_type"] != "original":
            problems.append(f"{where}: {name}: shape features exist only for image type original")
        image_problem = _produced_image_type_problem(feature["image_type"], extraction)
        if image_problem:
            problems.append(f"{where}: image type {feature['image_type']} {image_problem}")

    problems.extend(_domain_problems(data))

    seen_covariates: dict[str, int] = {}
    for index, covariate in enumerate(data["clinical_covariates"]):
        where = f"clinical_covariates[{index}] ({covariate['name']})"
        if covariate["name"] == RADIOMICS_SCORE_TERM:
            problems.append(f"{where}: the name {RADIOMICS_SCORE_TERM} is reserved for the radiomics-score term")
        if covariate["name"] in seen_covariates:
            first = seen_covariates[covariate["name"]]
            problems.append(f"{where}: duplicate covariate name (also clinical_covariates[{first}])")
        seen_covariates.setdefault(covariate["name"], index)
        problems.extend(_encoding_problems(where, covariate["field"], covariate["encoding"]))

    baseline = data["baseline_survival"]
    times, survival = baseline["times"], baseline["survival"]
    if len(times) != len(survival):
        problems.append(f"baseline_survival: {len(times)} times but {len(survival)} survival values")
    if any(later <= earlier for earlier, later in zip(times, times[1:])):
        problems.append("baseline_survival.times must be strictly increasing")
    if any(later > earlier for earlier, later in zip(survival, survival[1:])):
        problems.append("baseline_survival.survival must not increase over time")
    if times and baseline["valid_until"] < times[-1]:
        problems.append(
            f"baseline_survival.valid_until {baseline['valid_until']:g} is before the last time {times[-1]:g}"
        )
    if baseline["valid_until"] < REQUIRED_HORIZON_MONTHS:
        problems.append(f"baseline_survival must cover {REQUIRED_HORIZON_MONTHS:g} months")
    return problems


def _build(data: Mapping[str, Any]) -> FrozenModel:
    extraction = data["extraction"]
    ring = extraction["ring"]
    covariates = []
    for covariate in data["clinical_covariates"]:
        encoding = covariate["encoding"]
        covariates.append(
            ClinicalCovariate(
                name=covariate["name"],
                field=covariate["field"],
                encoding=Encoding(
                    kind=encoding["kind"],
                    levels=frozenset(encoding.get("levels", ())),
                    mapping=MappingProxyType({key: float(value) for key, value in encoding.get("map", {}).items()}),
                    at_least=None if "at_least" not in encoding else float(encoding["at_least"]),
                ),
                coefficient=float(covariate["coefficient"]),
            )
        )
    baseline = data["baseline_survival"]
    return FrozenModel(
        identity=ModelIdentity(
            name=data["name"],
            version=data["version"],
            sha256=data[HASH_KEY],
            demonstration=data["demonstration"],
            intended_use=data["intended_use"],
        ),
        schema_version=data["schema_version"],
        created=data["created"],
        extraction=ExtractionSettings(
            pyradiomics_version=extraction["pyradiomics_version"],
            settings=extraction["settings"],
            image_types=extraction["image_types"],
            ring=RingDefinition(float(ring["outward_mm"]), float(ring["inward_mm"]), ring["method"]),
        ),
        radiomics_terms=tuple(
            RadiomicsTerm(
                spec=_feature_spec(feature),
                mean=float(feature["mean"]),
                sd=float(feature["sd"]),
                coefficient=float(feature["coefficient"]),
                transform=feature.get("transform", "none"),
            )
            for feature in data["radiomics"]["features"]
        ),
        radiomics_cutoff=float(data["radiomics"]["cutoff"]),
        radiomics_score_coefficient=float(data["radiomics_score_coefficient"]),
        clinical_covariates=tuple(covariates),
        risk_cutoff=float(data["risk_cutoff"]),
        baseline_survival=BaselineSurvival(
            times=tuple(float(time) for time in baseline["times"]),
            survival=tuple(float(value) for value in baseline["survival"]),
            valid_until=float(baseline["valid_until"]),
            centre=float(baseline["linear_predictor_centre"]),
        ),
        training_summary=_freeze(data["training_summary"]),
        applicability_domain=(
            ApplicabilityDomain.from_mapping(data["applicability_domain"]) if "applicability_domain" in data else None
        ),
    )
