"""Apply a frozen integrated Cox model to one study's features and clinical record.

radiomics score  = sum_i coef_i * (T_i(x_i) - mean_i) / sd_i      (no intercept: Cox;
                   T_i = the feature's transform, none or signed_log1p)
risk score (lp)  = radiomics_score_coefficient * radiomics score
                   + sum_j coef_j * encode_j(clinical record)
risk group       = HIGH if lp > risk_cutoff else LOW              (a tie is LOW)
PFS(t)           = S0(t) ** exp(lp - centre)                     (t = 6, 12 months)

applicability    = the model's applicability domain (scoring.domain) judged on
                   the features and both scores; DOMAIN_UNKNOWN for a schema-v1 model

The tie rule matches `RiskResult.radiomics_group`: the cut-off is the training
median, and "above the median" is the paper's high-progression-risk group.
"""

from __future__ import annotations

import math
from types import MappingProxyType

from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.errors import FeatureExtractionError
from sclc_risk_node.scoring.model import RADIOMICS_SCORE_TERM, FrozenModel
from sclc_risk_node.scoring.types import (
    DOMAIN_UNKNOWN,
    Applicability,
    FeatureVector,
    RiskGroup,
    RiskResult,
    TermContribution,
)

#: Months at which the node reports the predicted progression-free probability.
PFS_HORIZONS_MONTHS = (6, 12)


def radiomics_terms(model: FrozenModel, features: FeatureVector) -> tuple[TermContribution, ...]:
    """One term per model feature, in model order: value = z-scored feature."""
    missing = [name for name in model.feature_names if name not in features.values]
    if missing:
        raise FeatureExtractionError(
            f"feature vector lacks {len(missing)} feature{'s' if len(missing) > 1 else ''} that model"
            f" {model.identity.name} {model.identity.version} needs: {', '.join(missing)}"
        )
    return tuple(
        TermContribution(term.name, term.standardise(features[term.name]), term.coefficient)
        for term in model.radiomics_terms
    )


def assess_applicability(
    model: FrozenModel, features: FeatureVector, radiomics_score: float, risk_score: float
) -> Applicability:
    """The study's applicability-domain verdict; `DOMAIN_UNKNOWN` when the model records no domain."""
    if model.applicability_domain is None:
        return DOMAIN_UNKNOWN
    return model.applicability_domain.assess(
        features.values, [term.scale for term in model.radiomics_terms], radiomics_score, risk_score
    )


def apply_model(model: FrozenModel, features: FeatureVector, clinical: ClinicalRecord) -> RiskResult:
    """Score one study.

    Raises `FeatureExtractionError` naming every model feature missing from
    ``features`` and `ClinicalRecordError` if the model reads an optional
    clinical field the record lacks.  Features the model does not use are ignored.
    """
    feature_terms = radiomics_terms(model, features)
    radiomics_score = math.fsum(term.contribution for term in feature_terms)
    integrated_terms: tuple[TermContribution, ...] = (
        TermContribution(RADIOMICS_SCORE_TERM, radiomics_score, model.radiomics_score_coefficient),
    )
    integrated_terms += tuple(
        TermContribution(covariate.name, covariate.encode(clinical), covariate.coefficient)
        for covariate in model.clinical_covariates
    )
    risk_score = math.fsum(term.contribution for term in integrated_terms)
    used_features = FeatureVector({name: features[name] for name in model.feature_names})
    pfs_probability = {
        months: model.baseline_survival.survival_at(months, risk_score) for months in PFS_HORIZONS_MONTHS
    }
    return RiskResult(
        radiomics_score=radiomics_score,
        radiomics_cutoff=model.radiomics_cutoff,
        risk_score=risk_score,
        risk_cutoff=model.risk_cutoff,
        risk_group=RiskGroup.HIGH if risk_score > model.risk_cutoff else RiskGroup.LOW,
        pfs_probability=MappingProxyType(pfs_probability),
        radiomics_terms=feature_terms,
        integrated_terms=integrated_terms,
        features=used_features,
        model=model.identity,
        applicability=assess_applicability(model, used_features, radiomics_score, risk_score),
    )
