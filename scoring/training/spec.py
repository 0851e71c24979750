"""The training specification: everything a researcher fixes before fitting a model.

A spec is a TOML document.  `TrainingSpec.from_toml` validates it completely
and raises `TrainingSpecError` naming the offending key (``lasso.cv_folds``,
``clinical.candidates[2].encoding.kind``); unknown keys are refused rather than
ignored, because a misspelt ``univariate_p`` silently falling back to its
default would change the model.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
    def from_toml(cls, text: str) -> TrainingSpec:
        if isinstance(text, (bytes, bytearray)):
            try:
                text = text.decode("utf-8")
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
        root = _Table(document, "")
        root.only(
            {"model", "extraction", "lasso", "clinical", "evaluation", "preprocessing", "stability", "validation"}
        )
        lasso = _lasso_section(root.table("lasso", required=True))
        evaluation = _evaluation_section(root.table("evaluation", required=True))
        spec = cls(
            model=_model_section(root.table("model", required=True)),
            extraction=_extraction_section(root.table("extraction", required=True)),
            lasso=lasso,
            clinical=_clinical_section(root.table("clinical")),
            evaluation=evaluation,
            preprocessing=_preprocessing_section(root.table("preprocessing")),
            stability=_stability_section(root.table("stability"), default_seed=lasso.seed),
            validation=_validation_section(root.table("validation"), default_seed=evaluation.seed),
        )
        return spec

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


class _Table:
    """One TOML table plus its dotted path, for error messages that name the key."""

    def __init__(self, data: Any, path: str):
        if not isinstance(data, Mapping):
            raise TrainingSpecError(f"training spec key '{path}' must be a table, got {_describe(data)}")
        self.data, self.path = data, path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, problem: str) -> TrainingSpecError:
        return TrainingSpecError(f"training spec key '{self.key(name)}' {problem}")

    def only(self, allowed: set[str]) -> None:
        for name in self.data:
            if name not in allowed:
                raise TrainingSpecError(
                    f"training spec has unknown key '{self.key(name)}' (allowed here: {', '.join(sorted(allowed))})"
                )

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                raise TrainingSpecError(f"training spec is missing required key '{self.key(name)}'")
            return default
        return self.data[name]

    def table(self, name: str, *, required: bool = False) -> _Table:
        return _Table(self.get(name, {}, required=required), self.key(name))

    def text(
        self, name: str, *, required: bool = False, default: str | None = None, pattern: re.Pattern | None = None
    ) -> str:
        value = self.get(name, default, required=required)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, f"must be non-empty text, got {_describe(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(name, f"is {_describe(value)} (must match {pattern.pattern})")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(name, default)
        if value not in allowed:
            raise self.fail(name, f"is {_describe(value)} (allowed: {', '.join(allowed)})")
        return value

    def boolean(self, name: str, *, required: bool = False) -> bool:
        value = self.get(name, required=required)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {_describe(value)}")
        return value

    def integer(self, name: str, *, default: int | None = None, required: bool = False, minimum: int = 0) -> int:
        value = self.get(name, default, required=required)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {_describe(value)}")
        if value < minimum:
            raise self.fail(name, f"is {value} (must be >= {minimum})")
        return value

    def number(self, name: str, *, default: float, low: float, high: float, open_low: bool = True) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, f"must be a number, got {_describe(value)}")
        if not ((low < value) if open_low else (low <= value)) or not value <= high:
            bound = "(" if open_low else "["
            raise self.fail(name, f"is {value:g} (must be in {bound}{low:g}, {high:g}])")
        return float(value)

    def string_list(self, name: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list(default))
        if not isinstance(value, list) or not value:
            raise self.fail(name, f"must be a non-empty array, got {_describe(value)}")
        for item in value:
            if item not in allowed:
                raise self.fail(name, f"has {_describe(item)}, not one of {', '.join(allowed)}")
        if len(set(value)) != len(value):
            raise self.fail(name, "has repeated entries")
        return tuple(value)


# --------------------------------------------------------------------------- sections


def _model_section(table: _Table) -> ModelSpec:
    table.only({"name", "version", "intended_use", "demonstration"})
    return ModelSpec(
        name=table.text("name", required=True, pattern=_MODEL_NAME_PATTERN),
        version=table.text("version", required=True, pattern=_MODEL_VERSION_PATTERN),
        intended_use=table.text("intended_use", required=True),
        demonstration=table.boolean("demonstration", required=True),
    )


def _extraction_section(table: _Table) -> ExtractionSpec:
    table.only({"settings", "image_types", "feature_classes", "regions", "ring"})
    settings = table.table("settings", required=True).data
    image_types = table.table("image_types", required=True)
    if not image_types.data:
        raise TrainingSpecError(f"training spec key '{image_types.path}' must enable at least one image type")
    image_types.only(set(PYRADIOMICS_IMAGE_TYPES))
    for name in image_types.data:
        image_types.table(name)
    ring = table.table("ring")
    ring.only({"outward_mm", "inward_mm", "method"})
    outward = ring.number("outward_mm", default=2.0, low=0.0, high=100.0, open_low=False)
    inward = ring.number("inward_mm", default=2.0, low=0.0, high=100.0, open_low=False)
    method = ring.text("method", default=RingDefinition().method)
    try:
        ring_definition = RingDefinition(outward, inward, method)
    except ValueError as exc:
        raise TrainingSpecError(f"training spec key '{ring.path}': {exc}") from None
    return ExtractionSpec(
        settings=settings,
        image_types=image_types.data,
        feature_classes=table.string_list("feature_classes", DEFAULT_FEATURE_CLASSES, ALL_FEATURE_CLASSES),
        regions=table.string_list("regions", REGIONS, REGIONS),
        ring=ring_definition,
    )


def _lasso_section(table: _Table) -> LassoSpec:
    table.only({"cv_folds", "seed", "n_alphas", "alpha_min_ratio", "selection"})
    ratio = table.get("alpha_min_ratio", "auto")
    if ratio != "auto":
        ratio = table.number("alpha_min_ratio", default=0.0, low=0.0, high=1.0)
        if ratio >= 1.0:
            raise table.fail("alpha_min_ratio", f'is {ratio:g} (must be "auto" or a number in (0, 1))')
    return LassoSpec(
        seed=table.integer("seed", required=True),
        cv_folds=table.integer("cv_folds", default=10, minimum=2),
        n_alphas=table.integer("n_alphas", default=100, minimum=2),
        alpha_min_ratio=ratio,
        selection=table.choice("selection", ALPHA_SELECTION_RULES, "min"),
    )


def _clinical_section(table: _Table) -> ClinicalSpec:
    table.only({"candidates", "univariate_p", "multivariate_p", "multivariate_elimination"})
    raw = table.get("candidates", [])
    if not isinstance(raw, list):
        raise table.fail("candidates", f"must be an array of tables ([[clinical.candidates]]), got {_describe(raw)}")
    candidates: list[ClinicalCandidate] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(raw):
        candidate = _candidate(_Table(item, f"{table.key('candidates')}[{index}]"))
        if candidate.name in first_index:
            raise TrainingSpecError(
                f"training spec key '{table.key('candidates')}[{index}].name' repeats {candidate.name!r}"
                f" (also candidates[{first_index[candidate.name]}])"
            )
        first_index[candidate.name] = index
        candidates.append(candidate)
    return ClinicalSpec(
        candidates=tuple(candidates),
        univariate_p=table.number("univariate_p", default=0.05, low=0.0, high=1.0),
        multivariate_p=table.number("multivariate_p", default=0.05, low=0.0, high=1.0),
        multivariate_elimination=table.choice("multivariate_elimination", ELIMINATION_RULES, "single-pass"),
    )


def _candidate(table: _Table) -> ClinicalCandidate:
    table.only({"name", "field", "encoding"})
    name = table.text("name", required=True, pattern=_COVARIATE_NAME_PATTERN)
    if name == RADIOMICS_SCORE_TERM:
        raise table.fail("name", f"is {name!r}, which is reserved for the radiomics-score term")
    field_name = table.get("field", required=True)
    if field_name not in MODEL_CLINICAL_FIELDS:
        raise table.fail("field", f"is {_describe(field_name)} (allowed: {', '.join(MODEL_CLINICAL_FIELDS)})")
    encoding = table.table("encoding", required=True)
    encoding.get("kind", required=True)
    kind = encoding.choice("kind", ENCODING_KINDS, default="")
    extra = {"indicator": "levels", "ordinal": "map", "threshold": "at_least"}.get(kind)
    encoding.only({"kind"} | ({extra} if extra else set()))
    if kind == "indicator":
        levels = encoding.get("levels", required=True)
        if not isinstance(levels, list) or not levels or not all(isinstance(level, str) for level in levels):
            raise encoding.fail("levels", f"must be a non-empty array of level names, got {_describe(levels)}")
        if len(set(levels)) != len(levels):
            raise encoding.fail("levels", "has repeated entries")
    elif kind == "ordinal":
        mapping = encoding.table("map", required=True)
        for level, value in mapping.data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise mapping.fail(level, f"must be a number, got {_describe(value)}")
    elif kind == "threshold":
        value = encoding.get("at_least", required=True)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise encoding.fail("at_least", f"must be a number, got {_describe(value)}")
    problems = model_encoding_problems(encoding.path, field_name, _plain(encoding.data))
    if problems:
        raise TrainingSpecError("training spec key " + "; ".join(problems).replace(encoding.path, f"'{encoding.path}'"))
    return ClinicalCandidate(name=name, field=field_name, encoding=_plain(encoding.data))


def _evaluation_section(table: _Table) -> EvaluationSettings:
    table.only({"horizons_months", "bootstrap", "seed", "treated_splits"})
    horizons = table.get("horizons_months", [6, 12])
    if not isinstance(horizons, list) or not horizons:
        raise table.fail("horizons_months", f"must be a non-empty array of months, got {_describe(horizons)}")
    for value in horizons:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise table.fail("horizons_months", f"has {_describe(value)} (each must be a number of months > 0)")
    if len(set(horizons)) != len(horizons):
        raise table.fail("horizons_months", "has repeated entries")
    return EvaluationSettings(
        seed=table.integer("seed", required=True),
        horizons_months=tuple(float(value) for value in horizons),
        bootstrap=table.integer("bootstrap", default=1000, minimum=10),
        treated_splits=table.choice("treated_splits", TREATED_SPLITS, "all"),
    )


def _preprocessing_section(table: _Table) -> PreprocessingSpec:
    table.only({"log_transform", "log_skewness"})
    value = table.get("log_transform", "auto")
    if isinstance(value, list):
        if not value or not all(isinstance(item, str) and item for item in value):
            raise table.fail("log_transform", 'must be "auto", "none" or a non-empty array of feature names')
        if len(set(value)) != len(value):
            raise table.fail("log_transform", "has repeated entries")
        for item in value:
            try:
                FeatureSpec.from_name(item)
            except ValueError as exc:
                raise table.fail("log_transform", f"has {_describe(item)}, not a feature name ({exc})") from None
        log_transform: str | tuple[str, ...] = tuple(value)
    elif value in ("auto", "none"):
        log_transform = value
    else:
        raise table.fail(
            "log_transform", f'is {_describe(value)} (allowed: "auto", "none", or an array of feature names)'
        )
    return PreprocessingSpec(
        log_transform=log_transform,
        log_skewness=table.number("log_skewness", default=1.0, low=0.0, high=1000.0),
    )


def _stability_section(table: _Table, default_seed: int) -> StabilitySpec:
    table.only({"enabled", "patients", "seed", "perturbations", "noise_sd_hu", "shift_voxels", "icc", "icc_threshold"})
    return StabilitySpec(
        enabled=table.boolean("enabled") if "enabled" in table.data else True,
        patients=table.integer("patients", default=30, minimum=3),
        seed=table.integer("seed", default=default_seed),
        perturbations=table.string_list("perturbations", PERTURBATIONS, PERTURBATIONS),
        noise_sd_hu=table.number("noise_sd_hu", default=10.0, low=0.0, high=1000.0),
        shift_voxels=table.number("shift_voxels", default=0.5, low=0.0, high=1.0, open_low=True),
        icc=table.choice("icc", ICC_KINDS, "ICC(1,1)"),
        icc_threshold=table.number("icc_threshold", default=0.75, low=-1.0, high=1.0, open_low=False),
    )


def _validation_section(table: _Table, default_seed: int) -> ValidationSpec:
    table.only({"bootstrap", "refit", "seed"})
    bootstrap = table.integer("bootstrap", default=200, minimum=0)
    if 0 < bootstrap < 10:
        raise table.fail("bootstrap", f"is {bootstrap} (must be 0 to switch it off, or >= 10)")
    return ValidationSpec(
        bootstrap=bootstrap,
        refit=table.choice("refit", REFIT_RULES, "fixed-alpha"),
        seed=table.integer("seed", default=default_seed),
    )
