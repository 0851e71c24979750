"""Small frozen values that the scoring stages hand each other.

Images are SimpleITK images in physical space (LPS, mm).  Masks are
``sitkUInt8`` images with 1 inside the region and exactly the geometry
(size, origin, spacing, direction) of the CT they belong to.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

REGIONS = ("tumour", "ring")


class RiskGroup(str, enum.Enum):
    """Progression-risk group: the integrated risk score vs. the model's cut-off."""

    LOW = "low"
    HIGH = "high"


@dataclass(frozen=True, slots=True)
class RingDefinition:
    """The peritumoral ring: the tumour border grown by ``outward_mm`` minus it shrunk by ``inward_mm``.

    Distances are physical millimetres, so the ring is the same at any slice
    thickness.  ``method`` names the algorithm (see ``scoring.ring``).
    """

    outward_mm: float = 2.0
    inward_mm: float = 2.0
    method: str = "signed-distance-mm"

    def __post_init__(self) -> None:
        for name in ("outward_mm", "inward_mm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ring {name} must be a finite number >= 0, got {value!r}")
        if self.outward_mm + self.inward_mm <= 0:
            raise ValueError("ring must have a positive thickness")


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One radiomics feature a model needs.

    ``image_type`` is pyradiomics' own prefix: ``original``, ``wavelet-LLH`` (any
    of the eight sub-bands), or ``log-sigma-2-0-mm-3D``.  ``feature_class`` and
    ``feature`` are pyradiomics names (``glcm``, ``Correlation``).
    """

    region: str
    image_type: str
    feature_class: str
    feature: str

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"feature region must be one of {REGIONS}, got {self.region!r}")

    @property
    def pyradiomics_key(self) -> str:
        """The key pyradiomics' extractor uses, e.g. ``wavelet-LLH_glcm_Correlation``."""
        return f"{self.image_type}_{self.feature_class}_{self.feature}"

    @property
    def name(self) -> str:
        """Our stable name, e.g. ``ring.wavelet-LLH_glcm_Correlation``."""
        return f"{self.region}.{self.pyradiomics_key}"

    @classmethod
    def from_name(cls, name: str) -> FeatureSpec:
        region, sep, key = name.partition(".")
        parts = key.split("_", 2)
        if not sep or len(parts) != 3:
            raise ValueError(f"feature name {name!r} is not REGION.IMAGETYPE_CLASS_FEATURE")
        return cls(region, parts[0], parts[1], parts[2])


@dataclass(frozen=True, slots=True)
class ExtractionSettings:
    """Exactly what pyradiomics must do, as pinned by a model file.

    ``settings`` is pyradiomics' ``setting`` section (binWidth,
    resampledPixelSpacing, interpolator, ...); ``image_types`` its
    ``imageType`` section (``{"Original": {}, "Wavelet": {}, "LoG": {"sigma": [2.0]}}``).
    """

    pyradiomics_version: str
    settings: Mapping[str, object]
    image_types: Mapping[str, Mapping[str, object]]
    ring: RingDefinition = field(default_factory=RingDefinition)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "image_types", MappingProxyType({k: dict(v) for k, v in self.image_types.items()}))


@dataclass(frozen=True, slots=True)
class FeatureVector:
    """Feature values keyed by ``FeatureSpec.name``, in the model's order."""

    values: Mapping[str, float]

    def __post_init__(self) -> None:
        clean = {}
        for name, value in self.values.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"feature {name} is not finite ({value})")
            clean[name] = value
        object.__setattr__(self, "values", MappingProxyType(clean))

    def __getitem__(self, name: str) -> float:
        return self.values[name]


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str
    demonstration: bool
    intended_use: str


@dataclass(frozen=True, slots=True)
class TermContribution:
    """One term of a linear predictor: ``contribution = coefficient * value``.

    For a radiomics feature ``value`` is the z-scored feature; for a clinical
    covariate it is the encoded value; for the radiomics score it is the score.
    """

    name: str
    value: float
    coefficient: float

    @property
    def contribution(self) -> float:
        return self.coefficient * self.value


class DomainStatus(str, enum.Enum):
    """Whether a study lies inside the model's applicability domain (model file schema v2).

    ``UNKNOWN`` is what a schema-v1 model (no recorded domain) gives.
    """

    IN_DOMAIN = "in_domain"
    OUT_OF_DOMAIN = "out_of_domain"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class DomainViolation:
    """One quantity outside the model's applicability domain.

    ``name`` is a feature name (``FeatureSpec.name``) or ``radiomics_score`` /
    ``risk_score``.  ``low``/``high`` are the accepted bounds the model's rule
    gives (training range widened by the rule's margin); ``z`` is the value
    standardised by the training mean and SD (NaN for the scores when the model
    records no SD).
    """

    name: str
    value: float
    low: float
    high: float
    z: float


@dataclass(frozen=True, slots=True)
class Applicability:
    """The applicability-domain verdict for one study.

    ``rule`` is the model's documented rule in words, so a report can say why.
    """

    status: DomainStatus
    violations: tuple[DomainViolation, ...] = ()
    rule: str = ""

    @property
    def in_domain(self) -> bool | None:
        """True / False, or None when the model records no domain (schema v1)."""
        if self.status is DomainStatus.UNKNOWN:
            return None
        return self.status is DomainStatus.IN_DOMAIN


#: The verdict for a model with no recorded applicability domain (schema v1).
DOMAIN_UNKNOWN = Applicability(DomainStatus.UNKNOWN, (), "the model file records no applicability domain (schema v1)")


@dataclass(frozen=True, slots=True)
class RiskResult:
    """What a frozen integrated model says about one study.

    ``risk_score`` is the integrated Cox linear predictor (higher = higher
    progression risk); ``risk_group`` compares it with ``risk_cutoff`` (the
    training median).  ``pfs_probability`` maps months (6, 12) to the
    predicted probability of being progression-free at that time.
    ``applicability`` says whether the study lies inside the model's
    applicability domain.  The result always carries every computed value;
    whether a report withholds the risk group and PFS for an out-of-domain
    study is the reporting side's decision (config ``scoring.report_out_of_domain``).
    """

    radiomics_score: float
    radiomics_cutoff: float
    risk_score: float
    risk_cutoff: float
    risk_group: RiskGroup
    pfs_probability: Mapping[int, float]
    radiomics_terms: tuple[TermContribution, ...]
    integrated_terms: tuple[TermContribution, ...]
    features: FeatureVector
    model: ModelIdentity
    applicability: Applicability = DOMAIN_UNKNOWN

    @property
    def radiomics_group(self) -> RiskGroup:
        return RiskGroup.HIGH if self.radiomics_score > self.radiomics_cutoff else RiskGroup.LOW
