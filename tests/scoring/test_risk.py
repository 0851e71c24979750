"""Applying a frozen model: arithmetic worked out by hand, tie rule, errors, and a scikit-survival cross-check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
from sclc_risk_node.scoring.errors import ClinicalRecordError, FeatureExtractionError
from sclc_risk_node.scoring.model import FrozenModel
from sclc_risk_node.scoring.risk import PFS_HORIZONS_MONTHS, apply_model
from sclc_risk_node.scoring.types import FeatureVector, RiskGroup
from tests.scoring.model_fixtures import model_content, sealed_model

MEAN = "ring.original_firstorder_Mean"
CORRELATION = "tumour.wavelet-LLH_glcm_Correlation"
ZONE_ENTROPY = "ring.log-sigma-2-0-mm-3D_glszm_ZoneEntropy"
SPHERICITY = "tumour.original_shape_Sphericity"

# Patient A: every feature one step from its mean.
FEATURES_A = {MEAN: 13.0, CORRELATION: 0.25, ZONE_ENTROPY: 4.5, SPHERICITY: 0.5, "ring.original_glcm_Unused": 7.0}
CLINICAL_A = {"patient_id": "A", "t_stage": "T3", "n_stage": "N2", "m_stage": "M1c", "ecog": 2, "lipi": "poor"}
# Patient B: features at the training means, little clinical risk.
FEATURES_B = {MEAN: 10.0, CORRELATION: 0.5, ZONE_ENTROPY: 4.0, SPHERICITY: 0.625}
CLINICAL_B = {"patient_id": "B", "t_stage": "T2", "n_stage": "N1", "m_stage": "M1a", "ecog": 0, "lipi": "good"}


def model_with(change=None) -> FrozenModel:
    content = model_content()
    if change:
        change(content)
    return FrozenModel.from_mapping(sealed_model(content))


def score(features, clinical, model=None):
    return apply_model(model or model_with(), FeatureVector(features), clinical_record_from_mapping(clinical))


def test_patient_a_by_hand():
    result = score(FEATURES_A, CLINICAL_A)
    # z-scores: (13-10)/2 = 1.5, (0.25-0.5)/0.25 = -1, (4.5-4)/0.5 = 1, (0.5-0.625)/0.125 = -1
    # radiomics score = 0.5*1.5 + (-1.0)*(-1) + 0.25*1 + 0.25*(-1) = 0.75 + 1 + 0.25 - 0.25 = 1.75
    assert result.radiomics_score == 1.75
    assert [(t.name, t.value, t.coefficient, t.contribution) for t in result.radiomics_terms] == [
        (MEAN, 1.5, 0.5, 0.75),
        (CORRELATION, -1.0, -1.0, 1.0),
        (ZONE_ENTROPY, 1.0, 0.25, 0.25),
        (SPHERICITY, -1.0, 0.25, -0.25),
    ]
    # T3 N2 M1c is stage IV; ECOG 2 >= 2; LIPI poor = 2; T3 in {T3,T4}; N2 -> 2; M1c.
    # risk = 0.75*1.75 + 0.5*1 + 0.75*1 + 0.25*2 + 0.25*1 + 0.125*2 + 0.125*1
    #      = 1.3125 + 0.5 + 0.75 + 0.5 + 0.25 + 0.25 + 0.125 = 3.6875
    assert [(t.name, t.value, t.coefficient) for t in result.integrated_terms] == [
        ("radiomics_score", 1.75, 0.75),
        ("overall_stage:IV", 1.0, 0.5),
        ("ecog>=2", 1.0, 0.75),
        ("lipi", 2.0, 0.25),
        ("t_stage:T3-T4", 1.0, 0.25),
        ("n_stage", 2.0, 0.125),
        ("m_stage:M1c", 1.0, 0.125),
    ]
    assert result.risk_score == 3.6875
    assert result.risk_cutoff == 2.5 and result.risk_group is RiskGroup.HIGH
    assert result.radiomics_cutoff == 0.125 and result.radiomics_group is RiskGroup.HIGH
    # S(t) = S0(t) ** exp(3.6875 - 2.5); S0(6) = 0.7, S0(12) = 0.35; exp(1.1875) = 3.27887...
    hazard_ratio = 3.2788737679387
    assert dict(result.pfs_probability) == {
        6: pytest.approx(0.7**hazard_ratio, rel=1e-9),
        12: pytest.approx(0.35**hazard_ratio, rel=1e-9),
    }
    assert result.pfs_probability[6] == pytest.approx(0.310525, abs=1e-6)
    assert result.pfs_probability[12] == pytest.approx(0.031993, abs=1e-6)


def test_patient_b_by_hand():
    result = score(FEATURES_B, CLINICAL_B)
    # all z = 0 -> radiomics score 0; M1a is stage IV (0.5); N1 -> 1*0.125; nothing else.
    assert result.radiomics_score == 0.0 and result.radiomics_group is RiskGroup.LOW
    assert result.risk_score == 0.625 and result.risk_group is RiskGroup.LOW
    # exp(0.625 - 2.5) = exp(-1.875) = 0.153354966844...
    assert result.pfs_probability[6] == pytest.approx(0.7**0.153354966844, rel=1e-9)
    assert result.pfs_probability[12] == pytest.approx(0.35**0.153354966844, rel=1e-9)
    assert result.pfs_probability[6] == pytest.approx(0.946772, abs=1e-6)


def test_result_carries_the_model_features_in_model_order_and_identity():
    model = model_with()
    result = score(FEATURES_A, CLINICAL_A, model)
    assert list(result.features.values) == [MEAN, CORRELATION, ZONE_ENTROPY, SPHERICITY]
    assert result.model == model.identity and result.model.demonstration is True
    assert tuple(result.pfs_probability) == PFS_HORIZONS_MONTHS == (6, 12)


def test_a_score_equal_to_the_cutoff_is_low():
    at_cutoff = model_with(lambda c: c.update(risk_cutoff=3.6875))
    assert score(FEATURES_A, CLINICAL_A, at_cutoff).risk_group is RiskGroup.LOW
    just_below = model_with(lambda c: c.update(risk_cutoff=math.nextafter(3.6875, 0.0)))
    assert score(FEATURES_A, CLINICAL_A, just_below).risk_group is RiskGroup.HIGH


def test_missing_features_are_all_named():
    features = {MEAN: 13.0, SPHERICITY: 0.5}
    with pytest.raises(FeatureExtractionError) as caught:
        score(features, CLINICAL_A)
    assert str(caught.value) == (
        f"feature vector lacks 2 features that model test-fixture-integrated 0.0.1 needs: {CORRELATION}, {ZONE_ENTROPY}"
    )


def test_optional_clinical_fields_a_model_reads():
    def add_covariates(content):
        content["clinical_covariates"] += [
            {"name": "age", "field": "age", "encoding": {"kind": "numeric"}, "coefficient": 0.0625},
            {
                "name": "liver_metastases",
                "field": "liver_metastases",
                "encoding": {"kind": "indicator", "levels": ["yes"]},
                "coefficient": 0.5,
            },
        ]

    model = model_with(add_covariates)
    result = score(FEATURES_B, {**CLINICAL_B, "m_stage": "M1c", "age": 64, "liver_metastases": "yes"}, model)
    # 0.625 (patient B) + 0.125 (M1c) + 0.0625*64 + 0.5*1 = 0.75 + 4 + 0.5 = 5.25
    assert result.risk_score == 5.25
    assert result.integrated_terms[-2].value == 64.0 and result.integrated_terms[-1].value == 1.0
    with pytest.raises(ClinicalRecordError) as caught:
        score(FEATURES_B, CLINICAL_B, model)
    assert caught.value.problems == ("age: missing (allowed: any recorded value; the model's covariate age needs it)",)


def test_pfs_matches_scikit_survival_for_a_model_fitted_by_it():
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rng = np.random.default_rng(20230607)
    n = 300
    x = rng.normal(size=n)
    ecog = rng.integers(0, 3, size=n)
    event_time = rng.exponential(1.0 / (0.08 * np.exp(0.7 * x + 0.4 * ecog)))
    censor_time = rng.uniform(8.0, 30.0, size=n)
    time = np.minimum(event_time, censor_time)
    y = Surv.from_arrays(event=event_time <= censor_time, time=time)
    fitted = CoxPHSurvivalAnalysis().fit(np.column_stack([x, ecog]), y)
    radiomics_coef, ecog_coef = (float(value) for value in fitted.coef_)
    baseline = fitted.baseline_survival_

    def sksurv_model(content):
        # One raw feature (50 + 10x) standardised back to x, so the radiomics score is x itself.
        feature = {**content["radiomics"]["features"][0], "mean": 50.0, "sd": 10.0, "coefficient": 1.0}
        content["radiomics"]["features"] = [feature]
        content["radiomics_score_coefficient"] = radiomics_coef
        content["clinical_covariates"] = [
            {"name": "ecog", "field": "ecog", "encoding": {"kind": "numeric"}, "coefficient": ecog_coef}
        ]
        content["baseline_survival"] = {
            "time_unit": "months",
            "times": [float(t) for t in baseline.x],
            "survival": [float(s) for s in baseline.y],
            "valid_until": float(baseline.x[-1]),
            "linear_predictor_centre": 0.0,  # sksurv's Breslow baseline is at lp = X @ coef = 0
        }

    model = model_with(sksurv_model)
    for patient_x, patient_ecog in [(-1.2, 0), (0.0, 1), (0.8, 2), (2.1, 1)]:
        result = score({MEAN: 50.0 + 10.0 * patient_x}, {**CLINICAL_B, "ecog": patient_ecog}, model)
        assert result.risk_score == pytest.approx(radiomics_coef * patient_x + ecog_coef * patient_ecog, rel=1e-12)
        (curve,) = fitted.predict_survival_function(np.array([[patient_x, patient_ecog]]))
        for months in (6, 12):
            assert result.pfs_probability[months] == pytest.approx(float(curve(months)), rel=1e-9)


def test_model_format_doc_worked_example():
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "model-format.md").read_text(encoding="utf-8")
    model = FrozenModel.from_json(re.findall(r"```json\n(.*?)```", doc, re.S)[-1])
    features = {"ring.wavelet-LLH_glcm_Correlation": 0.53, "tumour.original_firstorder_Skewness": 0.35}
    clinical = {"patient_id": "X", "t_stage": "T2", "n_stage": "N1", "m_stage": "M1b", "ecog": 1, "lipi": 1}
    result = score(features, clinical, model)
    assert result.radiomics_score == pytest.approx(0.13, abs=1e-12)
    assert result.risk_score == pytest.approx(0.987, abs=1e-12)
    assert (result.radiomics_group, result.risk_group) == (RiskGroup.HIGH, RiskGroup.HIGH)
    assert round(result.pfs_probability[6], 3) == 0.650 and round(result.pfs_probability[12], 3) == 0.297
