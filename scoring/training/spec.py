"""The training specification: everything a researcher fixes before fitting a model.

A spec is a TOML document.  `TrainingSpec.from_toml` validates it completely
(pydantic models of the document, ``extra="forbid"``) and raises
`TrainingSpecError` naming the offending key (``lasso.cv_folds``,
``clinical.candidates[2].encoding.kind``); unknown keys are refused rather than
ignored, because a misspelt ``univariate_p`` silently falling back to its
default would change the model.  Every problem found is reported, joined by "; ".

Sections and keys (defaults in brackets; keys without a default are required):

``[model]`` -- the identity written into the model file.
    ``name`` (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``), ``version``
    (``[0-9A-Za-z][0-9A-Za-z.+-]{0,31}``), ``intended_use`` (non-empty text),
    ``demonstration`` (boolean).

``[extraction]`` -- how the candidate features were computed (pinned in the model file).
    ``settings``: pyradiomics' ``setting`` section, verbatim (may be empty);
    ``image_types``: pyradiomics' ``imageType`` section (``Original``, ``Wavelet``,
    ``LoG``, ``Square``, ``SquareRoot``, ``Logarithm``, ``Exponential``,
    ``Gradient``, ``LBP2D``, ``LBP3D``; each value a table of that filter's
    arguments); ``feature_classes`` [all of firstorder, shape, glcm, glrlm,
    glszm, gldm, ngtdm; ``shape2D`` may be added]; ``regions`` [``["tumour", "ring"]``].
    ``[extraction.ring]``: ``outward_mm`` [2.0], ``inward_mm`` [2.0] (the paper:
    the border grown and shrunk by 2 mm), ``method`` [``signed-distance-mm``].
    The pyradiomics version is not written here: the installed one is pinned
    (`TrainingSpec.extraction_settings`).

``[lasso]`` -- LASSO-Cox feature selection.
    ``cv_folds`` [10], ``seed`` (required, so the folds are on record),
    ``n_alphas`` [100] and ``alpha_min_ratio`` [``"auto"``: 1e-4 if patients >
    features, else 1e-2] shape the alpha path exactly as in scikit-survival's
    ``CoxnetSurvivalAnalysis``; ``selection`` [``"min"``]: ``"min"`` takes the
    alpha with the best mean cross-validated Harrell's C, ``"1se"`` the largest
    (sparsest) alpha whose mean C is within one standard error of that best.

``[clinical]`` -- clinical candidate variables and their screening.
    ``candidates`` [none]: an array of tables ``{name, field, encoding}`` in the
    model-file covariate format (docs/model-format.md, ``clinical_covariates``
    without ``coefficient``): ``field`` is a clinical-record field (t_stage,
    n_stage, m_stage, overall_stage, ecog, lipi, sex, brain_metastases,
    liver_metastases, age) and ``encoding`` one of ``{kind = "indicator",
    levels = [...]}``, ``{kind = "ordinal", map = {level = number, ...}}``,
    ``{kind = "numeric"}``, ``{kind = "threshold", at_least = number}``.
    ``univariate_p`` [0.05]: a candidate enters the multivariate model if its
    univariate Cox Wald p is below this; ``multivariate_p`` [0.05]: it enters the
    integrated model if its multivariate Wald p is below this.
    ``multivariate_elimination`` [``"single-pass"``]: ``"single-pass"`` is the
    paper's rule (one multivariate model; keep every variable with p below the
    threshold); ``"backward"`` refits after dropping the variable with the
    largest p, one at a time, until all remaining p are below the threshold.

``[preprocessing]`` -- what is done to the candidate features before LASSO.
    ``log_transform`` [``"auto"``]: ``"none"``; ``"auto"`` (signed_log1p,
    sign(x)·log1p(|x|), for every candidate whose training values are all
    >= 0 and whose sample skewness exceeds ``log_skewness`` [1.0] -- the
    heavy-tailed, size-like features; `scoring.training.method`); or an array
    of feature names to transform.  The transform is applied before
    z-scoring and written per feature into the model file
    (``"transform": "signed_log1p"``).

``[stability]`` -- the perturbation stability screen before LASSO
    (`scoring.training.stability`, after Zwanenburg et al., Sci Rep 2019;9:614).
    ``enabled`` [true]; ``patients`` [30]: training patients (with images)
    re-extracted under each perturbation, drawn with ``seed`` [the LASSO seed];
    ``perturbations`` [all of ``"dilation"``, ``"erosion"`` (the tumour mask
    grown / shrunk by one voxel, ball structuring element; the ring is rebuilt
    from it), ``"noise"`` (Gaussian noise of ``noise_sd_hu`` [10.0] HU added),
    ``"shift"`` (the CT and mask resampled on a grid translated by
    ``shift_voxels`` [0.5] of a voxel along every axis)]; ``icc``
    [``"ICC(1,1)"``, or ``"ICC(3,1)"``]; a feature is kept when its ICC over
    the original and the perturbed extractions is >= ``icc_threshold`` [0.75].

``[validation]`` -- internal validation of the fit on the training split.
    ``bootstrap`` [200] resamples (0 = off) for Harrell's optimism-corrected
    C-index and calibration slope; ``refit`` [``"fixed-alpha"``]:
    ``"fixed-alpha"`` repeats the LASSO-Cox path down to the chosen alpha and
    the integrated Cox of the kept clinical variables on every resample (no
    inner cross-validation); ``"full"`` repeats the whole method (LASSO
    cross-validation, clinical screening), which is slow; ``seed`` [the
    evaluation seed].

``[evaluation]`` -- how splits are evaluated (`scoring.training.evaluation`).
    ``horizons_months`` [``[6, 12]``] for the time-dependent AUC, calibration
    and decision curves; ``bootstrap`` [1000] resamples for the C-index
    confidence interval; ``seed`` (required); ``treated_splits``
    [``"all"``]: which chemoimmunotherapy patients the predictive analysis
    (treated vs ``control`` by risk group, the paper's Figure 7) compares with
    the control split: ``"all"`` (train and validation, as the paper) or
    ``"validation"``.

A complete example::

    [model]
    name = "zhao-integrated-cox"
    version = "1.0.0"
    intended_use = "Research use only: PFS risk under first-line chemoimmunotherapy for ES-SCLC."
    demonstration = false

    [extraction]
    feature_classes = ["firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm"]
    regions = ["tumour", "ring"]

    [extraction.settings]
    binWidth = 25
    resampledPixelSpacing = [1.0, 1.0, 1.0]
    interpolator = "sitkBSpline"
    label = 1

    [extraction.image_types]
    Original = {}
    Wavelet = {}

    [extraction.ring]
    outward_mm = 2.0
    inward_mm = 2.0

    [lasso]
    cv_folds = 10
    seed = 20231124
    n_alphas = 100
    alpha_min_ratio = "auto"
    selection = "min"

    [clinical]
    univariate_p = 0.05
    multivariate_p = 0.05
    multivariate_elimination = "single-pass"

    [[clinical.candidates]]
    name = "overall_stage:IV"
    field = "overall_stage"
    encoding = { kind = "indicator", levels = ["IV"] }

    [[clinical.candidates]]
    name = "ecog>=2"
    field = "ecog"
    encoding = { kind = "threshold", at_least = 2 }

    [[clinical.candidates]]
    name = "lipi"
    field = "lipi"
    encoding = { kind = "ordinal", map = { good = 0, intermediate = 1, poor = 2 } }

    [[clinical.candidates]]
    name = "t_stage:T3-T4"
    field = "t_stage"
    encoding = { kind = "indicator", levels = ["T3", "T4"] }

    [evaluation]
    horizons_months = [6, 12]
    bootstrap = 1000
    seed = 20231124
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from sclc_risk_node.scoring.clinical import MODEL_CLINICAL_FIELDS, ClinicalRecord
from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.model import RADIOMICS_SCORE_TERM, ClinicalCovariate, Encoding

# The model file's own rule for which encodings fit which field; reused so a
# spec can never describe a covariate that the frozen model would refuse.
from sclc_risk_node.scoring.model import _encoding_problems as model_encoding_problems
from sclc_risk_node.scoring.types import REGIONS, ExtractionSettings, FeatureSpec, RingDefinition

__all__ = [
    "ALL_FEATURE_CLASSES",
    "DEFAULT_FEATURE_CLASSES",
    "ClinicalCandidate",
    "ClinicalSpec",
    "EvaluationSettings",
    "ExtractionSpec",
    "LassoSpec",
    "ModelSpec",
    "PreprocessingSpec",
    "StabilitySpec",
    "TrainingSpec",
    "TrainingSpecError",
    "ValidationSpec",
]

DEFAULT_FEATURE_CLASSES = ("firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
ALL_FEATURE_CLASSES = DEFAULT_FEATURE_CLASSES + ("shape2D",)
PYRADIOMICS_IMAGE_TYPES = (
    "Original",
    "Wavelet",
    "LoG",
    "Square",
    "SquareRoot",
    "Logarithm",
    "Exponential",
    "Gradient",
    "LBP2D",
    "LBP3D",
)
ALPHA_SELECTION_RULES = ("min", "1se")
ELIMINATION_RULES = ("single-pass", "backward")
ENCODING_KINDS = ("indicator", "ordinal", "numeric", "threshold")
PERTURBATIONS = ("dilation", "erosion", "noise", "shift")
ICC_KINDS = ("ICC(1,1)", "ICC(3,1)")
REFIT_RULES = ("fixed-alpha", "full")
TREATED_SPLITS = ("all", "validation")

# The model-file schema's patterns (models/frozen-model.schema.json), checked
# here so a spec error names the spec key instead of surfacing after the fit.
_MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODEL_VERSION_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}")
_COVARIATE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:<>=+-]{0,63}")


class TrainingSpecError(InputError):
    """A training spec is malformed; the message names the key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    intended_use: str
    demonstration: bool


@dataclass(frozen=True, slots=True)
class ExtractionSpec:
    settings: Mapping[str, Any]
    image_types: Mapping[str, Mapping[str, Any]]
    feature_classes: tuple[str, ...] = DEFAULT_FEATURE_CLASSES
    regions: tuple[str, ...] = REGIONS
    ring: RingDefinition = field(default_factory=RingDefinition)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(
            self, "image_types", MappingProxyType({key: dict(value) for key, value in self.image_types.items()})
        )


@dataclass(frozen=True, slots=True)
class LassoSpec:
    seed: int
    cv_folds: int = 10
    n_alphas: int = 100
    #: A number in (0, 1), or "auto" (scikit-survival's rule).
    alpha_min_ratio: float | str = "auto"
    selection: str = "min"


@dataclass(frozen=True, slots=True)
class ClinicalCandidate:
    """One clinical variable offered to the Cox screening, encoded as in a model file."""

    name: str
    field: str
    encoding: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoding", MappingProxyType(dict(self.encoding)))

    def covariate(self, coefficient: float = 0.0) -> ClinicalCovariate:
        """The model-file covariate this candidate becomes, with ``coefficient``."""
        encoding = self.encoding
        return ClinicalCovariate(
            name=self.name,
            field=self.field,
            encoding=Encoding(
                kind=encoding["kind"],
                levels=frozenset(encoding.get("levels", ())),
                mapping=MappingProxyType({key: float(value) for key, value in encoding.get("map", {}).items()}),
                at_least=None if "at_least" not in encoding else float(encoding["at_least"]),
            ),
            coefficient=float(coefficient),
        )

    def encode(self, record: ClinicalRecord) -> float:
        """The encoded value, exactly as the frozen model will compute it (`ClinicalRecordError` if missing)."""
        return self.covariate().encode(record)

    def as_model_covariate(self, coefficient: float) -> dict[str, Any]:
        """The ``clinical_covariates`` entry of a model file."""
        return {
            "name": self.name,
            "field": self.field,
            "encoding": _plain(self.encoding),
            "coefficient": float(coefficient),
        }


@dataclass(frozen=True, slots=True)
class ClinicalSpec:
    candidates: tuple[ClinicalCandidate, ...] = ()
    univariate_p: float = 0.05
    multivariate_p: float = 0.05
    multivariate_elimination: str = "single-pass"


@dataclass(frozen=True, slots=True)
class EvaluationSettings:
    seed: int
    horizons_months: tuple[float, ...] = (6.0, 12.0)
    bootstrap: int = 1000
    treated_splits: str = "all"


@dataclass(frozen=True, slots=True)
class PreprocessingSpec:
    #: "none", "auto", or the feature names to transform.
    log_transform: str | tuple[str, ...] = "auto"
    log_skewness: float = 1.0


@dataclass(frozen=True, slots=True)
class StabilitySpec:
    seed: int
    enabled: bool = True
    patients: int = 30
    perturbations: tuple[str, ...] = PERTURBATIONS
    noise_sd_hu: float = 10.0
    shift_voxels: float = 0.5
    icc: str = "ICC(1,1)"
    icc_threshold: float = 0.75

    def as_mapping(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "patients": self.patients,
            "seed": self.seed,
            "perturbations": list(self.perturbations),
            "noise_sd_hu": self.noise_sd_hu,
            "shift_voxels": self.shift_voxels,
            "icc": self.icc,
            "icc_threshold": self.icc_threshold,
        }


@dataclass(frozen=True, slots=True)
class ValidationSpec:
    seed: int
    bootstrap: int = 200
    refit: str = "fixed-alpha"


@dataclass(frozen=True, slots=True)
class TrainingSpec:
    """A validated training specification (see the module docstring for the TOML format)."""

    model: ModelSpec
    extraction: ExtractionSpec
    lasso: LassoSpec
    clinical: ClinicalSpec
    evaluation: EvaluationSettings
    preprocessing: PreprocessingSpec = field(default_factory=PreprocessingSpec)
    stability: StabilitySpec = field(default_factory=lambda: StabilitySpec(seed=0))
    validation: ValidationSpec = field(default_factory=lambda: ValidationSpec(seed=0))

    @classmethod
    def from_toml(cls, text: str | bytes) -> TrainingSpec:
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TrainingSpecError(f"training spec is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise TrainingSpecError(f"training spec is not valid TOML: {exc}") from None
        return cls.from_mapping(document)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any]) -> TrainingSpec:
        """Validate an already-parsed spec (the TOML document as nested dicts)."""
        try:
            return _Document.model_validate(document).spec()
        except ValidationError as exc:
            raise TrainingSpecError("; ".join(_problems(exc))) from None

    @property
    def extraction_settings(self) -> ExtractionSettings:
        """What pyradiomics must do, pinned to the installed pyradiomics version."""
        from sclc_risk_node.scoring.features import (
            installed_pyradiomics_version,  # imports pyradiomics: only when asked
        )

        return ExtractionSettings(
            pyradiomics_version=installed_pyradiomics_version(),
            settings=self.extraction.settings,
            image_types=self.extraction.image_types,
            ring=self.extraction.ring,
        )

    def to_mapping(self) -> dict[str, Any]:
        """The spec as plain data (the shape of the TOML document, every default filled in)."""
        ring = self.extraction.ring
        return {
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "intended_use": self.model.intended_use,
                "demonstration": self.model.demonstration,
            },
            "extraction": {
                "settings": _plain(self.extraction.settings),
                "image_types": _plain(self.extraction.image_types),
                "feature_classes": list(self.extraction.feature_classes),
                "regions": list(self.extraction.regions),
                "ring": {"outward_mm": ring.outward_mm, "inward_mm": ring.inward_mm, "method": ring.method},
            },
            "lasso": {
                "cv_folds": self.lasso.cv_folds,
                "seed": self.lasso.seed,
                "n_alphas": self.lasso.n_alphas,
                "alpha_min_ratio": self.lasso.alpha_min_ratio,
                "selection": self.lasso.selection,
            },
            "clinical": {
                "candidates": [
                    {"name": c.name, "field": c.field, "encoding": _plain(c.encoding)} for c in self.clinical.candidates
                ],
                "univariate_p": self.clinical.univariate_p,
                "multivariate_p": self.clinical.multivariate_p,
                "multivariate_elimination": self.clinical.multivariate_elimination,
            },
            "evaluation": {
                "horizons_months": list(self.evaluation.horizons_months),
                "bootstrap": self.evaluation.bootstrap,
                "seed": self.evaluation.seed,
                "treated_splits": self.evaluation.treated_splits,
            },
            "preprocessing": {
                "log_transform": (
                    self.preprocessing.log_transform
                    if isinstance(self.preprocessing.log_transform, str)
                    else list(self.preprocessing.log_transform)
                ),
                "log_skewness": self.preprocessing.log_skewness,
            },
            "stability": self.stability.as_mapping(),
            "validation": {
                "bootstrap": self.validation.bootstrap,
                "refit": self.validation.refit,
                "seed": self.validation.seed,
            },
        }


# --------------------------------------------------------------------------- validation helpers


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


# --------------------------------------------------------------------------- the TOML document, in pydantic
#
# `_Document` and its section models describe the TOML file: unknown keys are
# refused (``extra="forbid"``) and each key has a validator that checks and
# canonicalises its value.  The public sections above stay plain frozen
# dataclasses (code builds them directly, e.g. `PreprocessingSpec("none")`);
# `_Document.spec()` turns a validated document into them.  A validator raises
# `_SpecProblem`s naming the key relative to where pydantic found the error;
# `_problems` turns pydantic's errors into the spec's own sentences.

_SPEC = "training_spec_problem"


def _fail(problem: str, key: str = "") -> PydanticCustomError:
    """``training spec key 'path.key' <problem>``."""
    return PydanticCustomError(_SPEC, "{problem}", {"form": "key", "problem": problem, "key": key})


def _unknown(key: str, allowed: Iterable[str]) -> PydanticCustomError:
    return PydanticCustomError(
        _SPEC, "unknown key {key}", {"form": "unknown", "problem": ", ".join(sorted(allowed)), "key": key}
    )


def _missing(key: str) -> PydanticCustomError:
    return PydanticCustomError(_SPEC, "missing {key}", {"form": "missing", "problem": "", "key": key})


#: Stands for the quoted dotted path in a `_sentence` (used where a message names the key mid-sentence).
_HERE = "\0"


def _sentence(text: str, key: str = "") -> PydanticCustomError:
    return PydanticCustomError(_SPEC, "{problem}", {"form": "sentence", "problem": text, "key": key})


def _text(pattern: re.Pattern[str] | None = None) -> BeforeValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"must be non-empty text, got {_describe(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise _fail(f"is {_describe(value)} (must match {pattern.pattern})")
        return value

    return BeforeValidator(check)


def _choice(allowed: tuple[str, ...]) -> BeforeValidator:
    def check(value: Any) -> str:
        if value not in allowed:
            raise _fail(f"is {_describe(value)} (allowed: {', '.join(allowed)})")
        return str(value)

    return BeforeValidator(check)


def _check_boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"must be true or false, got {_describe(value)}")
    return value


def _integer(minimum: int = 0) -> BeforeValidator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"must be an integer, got {_describe(value)}")
        if value < minimum:
            raise _fail(f"is {value} (must be >= {minimum})")
        return value

    return BeforeValidator(check)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _number(low: float, high: float, *, open_low: bool = True) -> BeforeValidator:
    def check(value: Any) -> float:
        if not _is_number(value):
            raise _fail(f"must be a number, got {_describe(value)}")
        if not ((low < value) if open_low else (low <= value)) or not value <= high:
            bound = "(" if open_low else "["
            raise _fail(f"is {value:g} (must be in {bound}{low:g}, {high:g}])")
        return float(value)

    return BeforeValidator(check)


def _string_list(allowed: tuple[str, ...]) -> BeforeValidator:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise _fail(f"must be a non-empty array, got {_describe(value)}")
        for item in value:
            if item not in allowed:
                raise _fail(f"has {_describe(item)}, not one of {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise _fail("has repeated entries")
        return tuple(value)

    return BeforeValidator(check)


_Boolean = Annotated[bool, Strict(), BeforeValidator(_check_boolean)]
_Seed = Annotated[int, Strict(), _integer()]
_Names = Annotated[tuple[str, ...], Strict()]
_Probability = Annotated[float, Strict(), _number(0.0, 1.0)]
_Table = dict[str, Any]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _ModelSection(_Section):
    name: Annotated[str, _text(_MODEL_NAME_PATTERN)]
    version: Annotated[str, _text(_MODEL_VERSION_PATTERN)]
    intended_use: Annotated[str, _text()]
    demonstration: _Boolean


class _RingSection(_Section):
    outward_mm: Annotated[float, _number(0.0, 100.0, open_low=False)] = 2.0
    inward_mm: Annotated[float, _number(0.0, 100.0, open_low=False)] = 2.0
    method: Annotated[str, _text()] = RingDefinition().method

    @model_validator(mode="after")
    def _is_a_ring(self) -> _RingSection:
        try:
            RingDefinition(self.outward_mm, self.inward_mm, self.method)
        except ValueError as exc:
            raise _sentence(f"training spec key '{_HERE}': {exc}") from None
        return self


def _image_types(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise _fail(f"must be a table, got {_describe(value)}")
    if not value:
        raise _sentence(f"training spec key '{_HERE}' must enable at least one image type")
    for name, arguments in value.items():
        if name not in PYRADIOMICS_IMAGE_TYPES:
            raise _unknown(name, PYRADIOMICS_IMAGE_TYPES)
        if not isinstance(arguments, Mapping):
            raise _fail(f"must be a table, got {_describe(arguments)}", name)
    return {name: dict(arguments) for name, arguments in value.items()}


class _ExtractionSection(_Section):
    settings: _Table
    image_types: Annotated[dict[str, _Table], BeforeValidator(_image_types)]
    feature_classes: Annotated[_Names, _string_list(ALL_FEATURE_CLASSES)] = DEFAULT_FEATURE_CLASSES
    regions: Annotated[_Names, _string_list(REGIONS)] = REGIONS
    ring: _RingSection = _RingSection()


def _alpha_min_ratio(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if not _is_number(value):
        raise _fail(f"must be a number, got {_describe(value)}")
    if not 0.0 < value <= 1.0:
        raise _fail(f"is {value:g} (must be in (0, 1])")
    if value >= 1.0:
        raise _fail(f'is {value:g} (must be "auto" or a number in (0, 1))')
    return float(value)


class _LassoSection(_Section):
    seed: _Seed
    cv_folds: Annotated[int, _integer(2)] = 10
    n_alphas: Annotated[int, _integer(2)] = 100
    alpha_min_ratio: Annotated[float | str, BeforeValidator(_alpha_min_ratio)] = "auto"
    selection: Annotated[str, _choice(ALPHA_SELECTION_RULES)] = "min"


def _encoding(field_name: str, encoding: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate's ``encoding`` table, held to the model file's own rules (keys relative to the candidate)."""
    if "kind" not in encoding:
        raise _missing("encoding.kind")
    kind = encoding["kind"]
    if kind not in ENCODING_KINDS:
        raise _fail(f"is {_describe(kind)} (allowed: {', '.join(ENCODING_KINDS)})", "encoding.kind")
    extra = {"indicator": "levels", "ordinal": "map", "threshold": "at_least"}.get(kind)
    allowed = {"kind"} | ({extra} if extra else set())
    for name in encoding:
        if name not in allowed:
            raise _unknown(f"encoding.{name}", allowed)
    if extra is not None and extra not in encoding:
        raise _missing(f"encoding.{extra}")
    if kind == "indicator":
        levels = encoding["levels"]
        if not isinstance(levels, list) or not levels or not all(isinstance(level, str) for level in levels):
            raise _fail(f"must be a non-empty array of level names, got {_describe(levels)}", "encoding.levels")
        if len(set(levels)) != len(levels):
            raise _fail("has repeated entries", "encoding.levels")
    elif kind == "ordinal":
        mapping = encoding["map"]
        if not isinstance(mapping, Mapping):
            raise _fail(f"must be a table, got {_describe(mapping)}", "encoding.map")
        for level, value in mapping.items():
            if not _is_number(value):
                raise _fail(f"must be a number, got {_describe(value)}", f"encoding.map.{level}")
    elif kind == "threshold" and not _is_number(encoding["at_least"]):
        raise _fail(f"must be a number, got {_describe(encoding['at_least'])}", "encoding.at_least")
    plain: dict[str, Any] = _plain(encoding)
    problems = model_encoding_problems(_HERE, field_name, plain)
    if problems:
        raise _sentence("training spec key " + "; ".join(problems).replace(_HERE, f"'{_HERE}'"), "encoding")
    return plain


def _covariate_name(value: Any) -> Any:
    if value == RADIOMICS_SCORE_TERM:
        raise _fail(f"is {value!r}, which is reserved for the radiomics-score term")
    return value


class _CandidateSection(_Section):
    name: Annotated[str, _text(_COVARIATE_NAME_PATTERN), AfterValidator(_covariate_name)]
    field: Annotated[str, _choice(MODEL_CLINICAL_FIELDS)]
    encoding: _Table

    @model_validator(mode="after")
    def _encoding_fits_the_field(self) -> _CandidateSection:
        _encoding(self.field, self.encoding)
        return self


def _candidate_array(value: Any) -> Any:
    if not isinstance(value, list):
        raise _fail(f"must be an array of tables ([[clinical.candidates]]), got {_describe(value)}")
    return tuple(value)


class _ClinicalSection(_Section):
    candidates: Annotated[tuple[_CandidateSection, ...], BeforeValidator(_candidate_array)] = ()
    univariate_p: _Probability = 0.05
    multivariate_p: _Probability = 0.05
    multivariate_elimination: Annotated[str, _choice(ELIMINATION_RULES)] = "single-pass"

    @model_validator(mode="after")
    def _names_are_unique(self) -> _ClinicalSection:
        first_index: dict[str, int] = {}
        for index, candidate in enumerate(self.candidates):
            if candidate.name in first_index:
                raise _sentence(
                    f"training spec key '{_HERE}' repeats {candidate.name!r} (also candidates[{first_index[candidate.name]}])",
                    f"candidates[{index}].name",
                )
            first_index[candidate.name] = index
        return self


def _horizons(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(f"must be a non-empty array of months, got {_describe(value)}")
    for item in value:
        if not (_is_number(item) and item > 0):
            raise _fail(f"has {_describe(item)} (each must be a number of months > 0)")
    if len(set(value)) != len(value):
        raise _fail("has repeated entries")
    return tuple(float(item) for item in value)


class _EvaluationSection(_Section):
    seed: _Seed
    horizons_months: Annotated[tuple[float, ...], BeforeValidator(_horizons)] = (6.0, 12.0)
    bootstrap: Annotated[int, _integer(10)] = 1000
    treated_splits: Annotated[str, _choice(TREATED_SPLITS)] = "all"


def _log_transform(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, list):
        if not value or not all(isinstance(item, str) and item for item in value):
            raise _fail('must be "auto", "none" or a non-empty array of feature names')
        if len(set(value)) != len(value):
            raise _fail("has repeated entries")
        for item in value:
            try:
                FeatureSpec.from_name(item)
            except ValueError as exc:
                raise _fail(f"has {_describe(item)}, not a feature name ({exc})") from None
        return tuple(value)
    if value in ("auto", "none"):
        return str(value)
    raise _fail(f'is {_describe(value)} (allowed: "auto", "none", or an array of feature names)')


class _PreprocessingSection(_Section):
    log_transform: Annotated[str | tuple[str, ...], BeforeValidator(_log_transform)] = "auto"
    log_skewness: Annotated[float, _number(0.0, 1000.0)] = 1.0


class _StabilitySection(_Section):
    enabled: _Boolean = True
    patients: Annotated[int, _integer(3)] = 30
    #: None: the LASSO seed.
    seed: _Seed | None = None
    perturbations: Annotated[_Names, _string_list(PERTURBATIONS)] = PERTURBATIONS
    noise_sd_hu: Annotated[float, _number(0.0, 1000.0)] = 10.0
    shift_voxels: Annotated[float, _number(0.0, 1.0)] = 0.5
    icc: Annotated[str, _choice(ICC_KINDS)] = "ICC(1,1)"
    icc_threshold: Annotated[float, _number(-1.0, 1.0, open_low=False)] = 0.75


def _validation_bootstrap(value: int) -> int:
    if 0 < value < 10:
        raise _fail(f"is {value} (must be 0 to switch it off, or >= 10)")
    return value


class _ValidationSection(_Section):
    bootstrap: Annotated[int, _integer(0), AfterValidator(_validation_bootstrap)] = 200
    refit: Annotated[str, _choice(REFIT_RULES)] = "fixed-alpha"
    #: None: the evaluation seed.
    seed: _Seed | None = None


class _Document(_Section):
    """The whole TOML document."""

    model: _ModelSection
    extraction: _ExtractionSection
    lasso: _LassoSection
    clinical: _ClinicalSection = _ClinicalSection()
    evaluation: _EvaluationSection
    preprocessing: _PreprocessingSection = _PreprocessingSection()
    stability: _StabilitySection = _StabilitySection()
    validation: _ValidationSection = _ValidationSection()

    def spec(self) -> TrainingSpec:
        extraction, clinical, stability = self.extraction, self.clinical, self.stability
        ring = extraction.ring
        return TrainingSpec(
            model=ModelSpec(**self.model.model_dump()),
            extraction=ExtractionSpec(
                settings=extraction.settings,
                image_types=extraction.image_types,
                feature_classes=extraction.feature_classes,
                regions=extraction.regions,
                ring=RingDefinition(ring.outward_mm, ring.inward_mm, ring.method),
            ),
            lasso=LassoSpec(**self.lasso.model_dump()),
            clinical=ClinicalSpec(
                candidates=tuple(
                    ClinicalCandidate(name=c.name, field=c.field, encoding=_plain(c.encoding))
                    for c in clinical.candidates
                ),
                univariate_p=clinical.univariate_p,
                multivariate_p=clinical.multivariate_p,
                multivariate_elimination=clinical.multivariate_elimination,
            ),
            evaluation=EvaluationSettings(**self.evaluation.model_dump()),
            preprocessing=PreprocessingSpec(**self.preprocessing.model_dump()),
            stability=StabilitySpec(
                **{**stability.model_dump(), "seed": self.lasso.seed if stability.seed is None else stability.seed}
            ),
            validation=ValidationSpec(
                bootstrap=self.validation.bootstrap,
                refit=self.validation.refit,
                seed=self.evaluation.seed if self.validation.seed is None else self.validation.seed,
            ),
        )


def _dotted(loc: Iterable[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _join(path: str, key: str) -> str:
    if not key:
        return path
    return f"{path}{key}" if key.startswith("[") or not path else f"{path}.{key}"


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model that holds the key at ``loc`` (for "allowed here")."""
    section: Any = _Document
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(section, type) and issubclass(section, BaseModel)) or part not in section.model_fields:
            return None
        annotation = section.model_fields[part].annotation
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis] or [annotation]
        section = next((arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
    return section if isinstance(section, type) and issubclass(section, BaseModel) else None


def _problems(error: ValidationError) -> list[str]:
    """Each pydantic error as the spec's own sentence naming the dotted key."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        where = _dotted(loc)
        kind, ctx = item["type"], item.get("ctx") or {}
        if kind == _SPEC:
            path, form, problem = _join(where, ctx["key"]), ctx["form"], ctx["problem"]
            if form == "unknown":
                problems.append(f"training spec has unknown key '{path}' (allowed here: {problem})")
            elif form == "missing":
                problems.append(f"training spec is missing required key '{path}'")
            elif form == "sentence":
                problems.append(problem.replace(_HERE, path))
            else:
                problems.append(f"training spec key '{path}' {problem}")
        elif kind == "missing":
            problems.append(f"training spec is missing required key '{where}'")
        elif kind == "extra_forbidden":
            section = _section_at(loc)
            allowed = ", ".join(sorted(section.model_fields)) if section is not None else ""
            problems.append(f"training spec has unknown key '{where}' (allowed here: {allowed})")
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            problems.append(f"training spec key '{where}' must be a table, got {_describe(item['input'])}")
        else:
            problems.append(f"training spec key '{where}' {item['msg']}")
    return problems
