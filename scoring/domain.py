"""The applicability domain of a frozen model (model file schema v2): record it, and judge a study by it.

A model fitted on one population says nothing trustworthy about a study whose
features lie far outside what it was fitted on: a linear Cox predictor
extrapolates without limit (one feature 136 training SDs out gave PFS 0.0 %).
Following OECD QSAR validation principle 3 ("a defined domain of
applicability") the model file records, from the training set itself, the
distribution of every model feature and of the two scores, plus a
parameterised rule (docs/model-format.md):

``widened-training-range`` (``margin_fraction`` m, ``max_abs_z`` Z or null)
    For each model feature, on the scale the model z-scores (after its
    ``transform``), the accepted interval is the training range
    [min, max] widened by m x (max - min) on each side; if Z is set, it is
    further cut to mean +/- Z x sd (the model's own z).  The radiomics score
    and the risk score are judged the same way with their training
    distributions.  Any value outside its interval puts the study out of
    domain; every such value is reported (`scoring.types.DomainViolation`,
    bounds mapped back to the feature's own units).

Feature transforms (applied before z-scoring, ``FeatureTransform``): ``none``
and ``signed_log1p`` = sign(x) * log1p(|x|), for features that scale with
size.  Both are strictly increasing, so "inside the interval" means the same
on either scale.

Pure: no files, no imports from the node or DICOM layers, nor from
`scoring.model` (which imports this module).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sclc_risk_node.scoring.types import Applicability, DomainStatus, DomainViolation

#: Feature transforms a model file may name (``radiomics.features[].transform``).
TRANSFORMS = ("none", "signed_log1p")
#: The one rule kind this node knows.
RULE_WIDENED_TRAINING_RANGE = "widened-training-range"
#: Quantiles recorded per quantity, as model-file keys -> fraction.
QUANTILES = MappingProxyType({"p01": 0.01, "p05": 0.05, "p50": 0.50, "p95": 0.95, "p99": 0.99})
#: The names of the two score quantities in `DomainViolation.name`.
RADIOMICS_SCORE: Final = "radiomics_score"
RISK_SCORE: Final = "risk_score"

# expm1 overflows a double just above 709.78.
_LARGEST_LOG = 709.0


def transform_value(kind: str, value: float) -> float:
    """``kind`` applied to one raw feature value (``none`` or ``signed_log1p``)."""
    if kind == "none":
        return float(value)
    if kind == "signed_log1p":
        return math.copysign(math.log1p(abs(value)), value)
    raise ValueError(f"feature transform {kind!r} is not one of {', '.join(TRANSFORMS)}")


def transform_array(kind: str, values: ArrayLike) -> NDArray[np.float64]:
    """Vectorised `transform_value` (the training side applies it to whole columns)."""
    array = np.asarray(values, dtype=np.float64)
    if kind == "none":
        return array
    if kind == "signed_log1p":
        return np.sign(array) * np.log1p(np.abs(array))
    raise ValueError(f"feature transform {kind!r} is not one of {', '.join(TRANSFORMS)}")


def inverse_transform_value(kind: str, value: float) -> float:
    """The raw value whose transform is ``value`` (+/-inf where a double cannot hold it)."""
    if kind == "none" or not math.isfinite(value):
        return float(value)
    if kind == "signed_log1p":
        if abs(value) > _LARGEST_LOG:
            return math.copysign(math.inf, value)
        return math.copysign(math.expm1(abs(value)), value)
    raise ValueError(f"feature transform {kind!r} is not one of {', '.join(TRANSFORMS)}")


class DistributionDocument(TypedDict):
    """A ``training_distribution`` of the model file (models/frozen-model.schema.json)."""

    min: float
    max: float
    mean: float
    sd: float
    quantiles: Mapping[str, float]


class RuleDocument(TypedDict):
    """The model file's ``applicability_domain.rule``."""

    kind: str
    margin_fraction: float
    max_abs_z: float | None


class DomainDocument(TypedDict):
    """The model file's ``applicability_domain`` section (schema v2)."""

    rule: RuleDocument
    training_n: int
    features: Mapping[str, DistributionDocument]
    radiomics_score: DistributionDocument
    risk_score: DistributionDocument


@dataclass(frozen=True, slots=True)
class TrainingDistribution:
    """One quantity over the training set, in its own units (a feature before any transform).

    ``sd`` is the sample SD (ddof=1); ``quantiles`` maps ``p01`` ... ``p99``
    to numpy's default (linear) quantiles.
    """

    minimum: float
    maximum: float
    mean: float
    sd: float
    quantiles: Mapping[str, float]

    @classmethod
    def of(cls, values: Iterable[float]) -> TrainingDistribution:
        array = np.asarray(list(values), dtype=float)
        if array.size < 2 or not np.isfinite(array).all():
            raise ValueError("a training distribution needs at least two finite values")
        return cls(
            minimum=float(array.min()),
            maximum=float(array.max()),
            mean=float(array.mean()),
            sd=float(array.std(ddof=1)),
            quantiles=MappingProxyType({key: float(np.quantile(array, q)) for key, q in QUANTILES.items()}),
        )

    @classmethod
    def from_mapping(cls, mapping: DistributionDocument) -> TrainingDistribution:
        return cls(
            minimum=float(mapping["min"]),
            maximum=float(mapping["max"]),
            mean=float(mapping["mean"]),
            sd=float(mapping["sd"]),
            quantiles=MappingProxyType({key: float(mapping["quantiles"][key]) for key in QUANTILES}),
        )

    def to_mapping(self) -> dict[str, Any]:
        return {
            "min": self.minimum,
            "max": self.maximum,
            "mean": self.mean,
            "sd": self.sd,
            "quantiles": dict(self.quantiles),
        }

    def problems(self, where: str) -> list[str]:
        """Why these numbers cannot be a training distribution (empty if they can)."""
        ordered = [self.minimum, *(self.quantiles[key] for key in QUANTILES), self.maximum]
        problems = []
        if any(later < earlier for earlier, later in zip(ordered, ordered[1:])):
            problems.append(f"{where}: min <= p01 <= p05 <= p50 <= p95 <= p99 <= max does not hold")
        if not self.minimum < self.maximum:
            problems.append(
                f"{where}: min {self.minimum:g} must be below max {self.maximum:g} (a constant has no range)"
            )
        if not self.minimum <= self.mean <= self.maximum:
            problems.append(f"{where}: mean {self.mean:g} is outside [min, max]")
        if not self.sd > 0:
            problems.append(f"{where}: sd {self.sd:g} must be > 0")
        return problems


@dataclass(frozen=True, slots=True)
class DomainRule:
    """The model's documented rule (module docstring)."""

    kind: str = RULE_WIDENED_TRAINING_RANGE
    margin_fraction: float = 0.1
    max_abs_z: float | None = None

    def __post_init__(self) -> None:
        if self.kind != RULE_WIDENED_TRAINING_RANGE:
            raise ValueError(f"applicability rule kind {self.kind!r} is not {RULE_WIDENED_TRAINING_RANGE!r}")
        if not (math.isfinite(self.margin_fraction) and self.margin_fraction >= 0):
            raise ValueError(f"margin_fraction must be a finite number >= 0, got {self.margin_fraction!r}")
        if self.max_abs_z is not None and not (math.isfinite(self.max_abs_z) and self.max_abs_z > 0):
            raise ValueError(f"max_abs_z must be a finite number > 0 or null, got {self.max_abs_z!r}")

    @classmethod
    def from_mapping(cls, mapping: RuleDocument) -> DomainRule:
        max_abs_z = mapping.get("max_abs_z")
        return cls(mapping["kind"], float(mapping["margin_fraction"]), None if max_abs_z is None else float(max_abs_z))

    def to_mapping(self) -> dict[str, Any]:
        return {"kind": self.kind, "margin_fraction": self.margin_fraction, "max_abs_z": self.max_abs_z}

    def describe(self) -> str:
        """The rule in words, for `Applicability.rule` (JSON, SR, CLI summary)."""
        text = (
            f"{self.kind}: every model feature, the radiomics score and the risk score must lie within"
            f" the training range widened by {self.margin_fraction * 100:g}% of its width on each side"
            " (on the scale the model z-scores)"
        )
        if self.max_abs_z is not None:
            text += f" and within {self.max_abs_z:g} training SDs of the training mean"
        return text


@dataclass(frozen=True, slots=True)
class FeatureScale:
    """How the model puts one feature on its z scale: transform, then (t - mean) / sd."""

    name: str
    transform: str
    mean: float
    sd: float

    def z(self, value: float) -> float:
        return (transform_value(self.transform, value) - self.mean) / self.sd


@dataclass(frozen=True, slots=True)
class ApplicabilityDomain:
    """A model file's ``applicability_domain`` section, parsed."""

    rule: DomainRule
    training_n: int
    features: Mapping[str, TrainingDistribution]
    radiomics_score: TrainingDistribution
    risk_score: TrainingDistribution

    @classmethod
    def from_mapping(cls, mapping: DomainDocument) -> ApplicabilityDomain:
        return cls(
            rule=DomainRule.from_mapping(mapping["rule"]),
            training_n=int(mapping["training_n"]),
            features=MappingProxyType(
                {name: TrainingDistribution.from_mapping(value) for name, value in mapping["features"].items()}
            ),
            radiomics_score=TrainingDistribution.from_mapping(mapping[RADIOMICS_SCORE]),
            risk_score=TrainingDistribution.from_mapping(mapping[RISK_SCORE]),
        )

    def to_mapping(self) -> dict[str, Any]:
        return {
            "rule": self.rule.to_mapping(),
            "training_n": self.training_n,
            "features": {name: value.to_mapping() for name, value in self.features.items()},
            RADIOMICS_SCORE: self.radiomics_score.to_mapping(),
            RISK_SCORE: self.risk_score.to_mapping(),
        }

    def feature_interval(self, scale: FeatureScale) -> tuple[float, float]:
        """Accepted (low, high) for one model feature, in the feature's own (untransformed) units."""
        low, high = _interval_on_model_scale(
            self.rule,
            transform_value(scale.transform, self.features[scale.name].minimum),
            transform_value(scale.transform, self.features[scale.name].maximum),
            scale.mean,
            scale.sd,
        )
        return inverse_transform_value(scale.transform, low), inverse_transform_value(scale.transform, high)

    def score_interval(self, which: str) -> tuple[float, float]:
        """Accepted (low, high) for ``radiomics_score`` or ``risk_score``."""
        training = self.radiomics_score if which == RADIOMICS_SCORE else self.risk_score
        return _interval_on_model_scale(self.rule, training.minimum, training.maximum, training.mean, training.sd)

    def assess(
        self,
        features: Mapping[str, float],
        scales: Sequence[FeatureScale],
        radiomics_score: float,
        risk_score: float,
    ) -> Applicability:
        """The verdict for one study: every model feature (in model order), then the two scores."""
        violations: list[DomainViolation] = []
        for scale in scales:
            value = float(features[scale.name])
            low, high = self.feature_interval(scale)
            # Compared on the model's scale: the transform is increasing, and this
            # avoids round-off of the mapped-back bounds deciding a borderline case.
            t_low, t_high = (transform_value(scale.transform, bound) for bound in (low, high))
            if not t_low <= transform_value(scale.transform, value) <= t_high:
                violations.append(DomainViolation(scale.name, value, low, high, scale.z(value)))
        for name, value, training in (
            (RADIOMICS_SCORE, radiomics_score, self.radiomics_score),
            (RISK_SCORE, risk_score, self.risk_score),
        ):
            low, high = self.score_interval(name)
            if not low <= value <= high:
                violations.append(DomainViolation(name, float(value), low, high, (value - training.mean) / training.sd))
        status = DomainStatus.OUT_OF_DOMAIN if violations else DomainStatus.IN_DOMAIN
        return Applicability(status, tuple(violations), self.rule.describe())


def _interval_on_model_scale(
    rule: DomainRule, minimum: float, maximum: float, mean: float, sd: float
) -> tuple[float, float]:
    margin = rule.margin_fraction * (maximum - minimum)
    low, high = minimum - margin, maximum + margin
    if rule.max_abs_z is not None:
        low, high = max(low, mean - rule.max_abs_z * sd), min(high, mean + rule.max_abs_z * sd)
    return low, high


def domain_from_training(
    feature_columns: Mapping[str, Sequence[float]],
    radiomics_score: Sequence[float],
    risk_score: Sequence[float],
    rule: DomainRule = DomainRule(),
) -> ApplicabilityDomain:
    """The domain of a model fitted on these training values (features in their own units, model order)."""
    lengths = {len(values) for values in (*feature_columns.values(), radiomics_score, risk_score)}
    if len(lengths) != 1:
        raise ValueError(f"training columns differ in length: {sorted(lengths)}")
    return ApplicabilityDomain(
        rule=rule,
        training_n=lengths.pop(),
        features=MappingProxyType({name: TrainingDistribution.of(values) for name, values in feature_columns.items()}),
        radiomics_score=TrainingDistribution.of(radiomics_score),
        risk_score=TrainingDistribution.of(risk_score),
    )
