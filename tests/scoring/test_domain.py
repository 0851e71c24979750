"""Applicability domain (model file schema v2): round trip, seal, rule arithmetic, transforms, v1 as unknown."""

from __future__ import annotations

import copy
import json
import math

import pytest

from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.scoring.domain import (
    ApplicabilityDomain,
    DomainRule,
    FeatureScale,
    TrainingDistribution,
    domain_from_training,
    inverse_transform_value,
    transform_value,
)
from sclc_risk_node.scoring.errors import ModelFileError
from sclc_risk_node.scoring.model import FrozenModel, canonical_json
from sclc_risk_node.scoring.types import DOMAIN_UNKNOWN, DomainStatus, DomainViolation
from tests.scoring.model_fixtures import model_content, model_content_v2, sealed_model
from tests.scoring.test_risk import CLINICAL_A, CLINICAL_B, FEATURES_A, FEATURES_B, MEAN, SPHERICITY, score


def v2_model(change=None, **rule) -> FrozenModel:
    content = model_content_v2(**rule)
    if change:
        change(content)
    return FrozenModel.from_mapping(sealed_model(content))


def v2_error(change) -> str:
    with pytest.raises(ModelFileError) as caught:
        v2_model(change)
    return str(caught.value)


# --- the file ----------------------------------------------------------------------


def test_v2_round_trip_keeps_every_domain_number():
    content = model_content_v2()
    model = FrozenModel.from_json(json.dumps(sealed_model(content)))
    assert model.schema_version == 2
    assert model.applicability_domain.to_mapping() == content["applicability_domain"]
    assert model.applicability_domain.rule == DomainRule("widened-training-range", 0.125, None)
    assert model.applicability_domain.training_n == 64
    assert list(model.applicability_domain.features) == list(model.feature_names)


def test_seal_covers_the_domain():
    sealed = sealed_model(model_content_v2())
    assert b'"applicability_domain"' in canonical_json(sealed)
    tampered = copy.deepcopy(sealed)
    tampered["applicability_domain"]["features"][MEAN]["max"] = 1000.0  # widen the domain after freezing
    with pytest.raises(
        ModelFileError, match=r"^model file sha256 mismatch: .*\(file was modified after it was frozen\)$"
    ):
        FrozenModel.from_mapping(tampered)
    rule_tampered = copy.deepcopy(sealed)
    rule_tampered["applicability_domain"]["rule"]["margin_fraction"] = 10.0
    with pytest.raises(ModelFileError, match="sha256 mismatch"):
        FrozenModel.from_mapping(rule_tampered)


def test_v1_files_still_load_and_give_domain_unknown():
    shipped = FrozenModel.from_json(shipped_model_path("demo-integrated-cox-2.0.0.json").read_text(encoding="utf-8"))
    assert shipped.schema_version == 1 and shipped.applicability_domain is None
    fixture_v1 = FrozenModel.from_mapping(sealed_model(model_content()))
    result = score(FEATURES_A, CLINICAL_A, fixture_v1)
    assert result.applicability is DOMAIN_UNKNOWN
    assert result.applicability.in_domain is None and result.applicability.status is DomainStatus.UNKNOWN


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["applicability_domain"]["features"].pop(SPHERICITY),
            f"applicability_domain.features lacks model feature(s) {SPHERICITY}",
        ),
        (
            lambda c: c["applicability_domain"]["features"].update(
                {"ring.original_glcm_Idn": c["applicability_domain"]["features"][MEAN]}
            ),
            "applicability_domain.features has ring.original_glcm_Idn, which the model does not use",
        ),
        (
            lambda c: c["applicability_domain"]["features"][MEAN]["quantiles"].update(p99=99.0),
            f"applicability_domain.features[{MEAN}]: min <= p01 <= p05 <= p50 <= p95 <= p99 <= max does not hold",
        ),
        (
            lambda c: c["applicability_domain"]["risk_score"].update(min=7.0),
            "applicability_domain.risk_score: min 7 must be below max 7",
        ),
        (lambda c: c.update(schema_version=1), "applicability_domain needs schema_version 2"),
        (
            lambda c: (
                c.pop("applicability_domain"),
                c.update(schema_version=1),
                c["radiomics"]["features"][0].update(transform="none"),
            ),
            "radiomics.features[0]: transform needs schema_version 2",
        ),
    ],
)
def test_semantic_domain_problems_are_named(change, message):
    assert message in v2_error(change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["applicability_domain"]["rule"].update(kind="convex-hull"),
            'model file key \'applicability_domain.rule.kind\' is "convex-hull" (allowed: "widened-training-range")',
        ),
        (
            lambda c: c["applicability_domain"]["rule"].update(margin_fraction=-0.1),
            "model file key 'applicability_domain.rule.margin_fraction' is -0.1 (must be >= 0)",
        ),
        (
            lambda c: c["applicability_domain"]["features"][MEAN]["quantiles"].pop("p05"),
            f"model file missing required key 'applicability_domain.features.{MEAN}.quantiles.p05'",
        ),
        (
            lambda c: c["radiomics"]["features"][0].update(transform="log"),
            'model file key \'radiomics.features[0].transform\' is "log" (allowed: "none", "signed_log1p")',
        ),
    ],
)
def test_schema_domain_problems_are_named(change, message):
    assert v2_error(change).startswith(message)


# --- the verdict --------------------------------------------------------------------


def test_in_domain_study():
    for features, clinical in ((FEATURES_A, CLINICAL_A), (FEATURES_B, CLINICAL_B)):
        result = score(features, clinical, v2_model())
        assert result.applicability.status is DomainStatus.IN_DOMAIN
        assert result.applicability.in_domain is True and result.applicability.violations == ()
        assert result.applicability.rule.startswith("widened-training-range: every model feature")
        assert "widened by 12.5% of its width on each side" in result.applicability.rule


def test_out_of_range_feature_is_flagged_with_value_bounds_and_z():
    # ring Mean 34: training 4..16 widened by 1/8 of 12 = 1.5 -> [2.5, 17.5]; z = (34-10)/2 = 12.
    # It alone moves the radiomics score to 0.5*12 = 6, above the training -4..4 widened to [-5, 5].
    result = score({**FEATURES_B, MEAN: 34.0}, CLINICAL_B, v2_model())
    assert result.applicability.status is DomainStatus.OUT_OF_DOMAIN and result.applicability.in_domain is False
    assert result.applicability.violations == (
        DomainViolation(MEAN, 34.0, 2.5, 17.5, 12.0),
        DomainViolation("radiomics_score", 6.0, -5.0, 5.0, 6.0 / 1.5),
    )
    # The result still carries every computed value; withholding is the reporting side's decision.
    assert result.risk_score == 0.75 * 6.0 + 0.5 + 0.125
    assert set(result.pfs_probability) == {6, 12}


def test_bounds_are_inclusive_and_the_low_side_counts_too():
    at_edge = score({**FEATURES_B, MEAN: 17.5}, CLINICAL_B, v2_model())
    assert at_edge.applicability.status is DomainStatus.IN_DOMAIN
    below = score({**FEATURES_B, MEAN: 2.0}, CLINICAL_B, v2_model())
    assert below.applicability.violations == (DomainViolation(MEAN, 2.0, 2.5, 17.5, -4.0),)


def test_risk_score_alone_out_of_range():
    # Every feature at its mean, all clinical risk factors: risk = 0.5+0.75+0.5+0.25+0.375+0.125 = 2.5.
    # A narrow risk-score domain (training 0..1, margin 0 here) puts only the risk score out.
    def narrow(content):
        content["applicability_domain"]["risk_score"] = {
            "min": 0.0,
            "max": 1.0,
            "mean": 0.5,
            "sd": 0.25,
            "quantiles": {"p01": 0.0, "p05": 0.0625, "p50": 0.5, "p95": 0.9375, "p99": 1.0},
        }

    model = v2_model(narrow, margin_fraction=0.0)
    result = score(FEATURES_B, {**CLINICAL_A, "m_stage": "M1c"}, model)
    assert [v.name for v in result.applicability.violations] == ["risk_score"]
    violation = result.applicability.violations[0]
    assert (violation.low, violation.high) == (0.0, 1.0) and violation.value == result.risk_score
    assert violation.z == (result.risk_score - 0.5) / 0.25


def test_max_abs_z_cuts_the_widened_range():
    # ring Mean 16 is inside [2.5, 17.5] but 3 SDs out; with max_abs_z 2.5 the accepted range is [5, 15].
    model = v2_model(max_abs_z=2.5)
    result = score({**FEATURES_B, MEAN: 16.0}, CLINICAL_B, model)
    assert result.applicability.violations == (DomainViolation(MEAN, 16.0, 5.0, 15.0, 3.0),)
    assert result.applicability.rule.endswith("and within 2.5 training SDs of the training mean")


# --- the transform ----------------------------------------------------------------


def test_signed_log1p_and_its_inverse():
    for value in (-1e7, -3.5, -0.0, 0.0, 0.25, 1.0, 136.0, 1.19e7):
        transformed = transform_value("signed_log1p", value)
        assert transformed == math.copysign(math.log1p(abs(value)), value)
        assert inverse_transform_value("signed_log1p", transformed) == pytest.approx(value, rel=1e-12)
    assert inverse_transform_value("signed_log1p", 800.0) == math.inf
    with pytest.raises(ValueError, match="'log' is not one of none, signed_log1p"):
        transform_value("log", 1.0)


def test_transformed_feature_is_z_scored_after_the_transform_and_judged_in_raw_units():
    # Sphericity stands in for a size-scaled feature: transform signed_log1p, model mean/sd on the log scale.
    def log_feature(content):
        feature = content["radiomics"]["features"][3]
        feature.update(transform="signed_log1p", mean=math.log1p(1000.0), sd=1.0)
        content["applicability_domain"]["features"][SPHERICITY] = {
            "min": 100.0,
            "max": 10000.0,
            "mean": 2000.0,
            "sd": 1500.0,
            "quantiles": {"p01": 110.0, "p05": 200.0, "p50": 1000.0, "p95": 8000.0, "p99": 9500.0},
        }

    model = v2_model(log_feature)
    term = model.radiomics_terms[3]
    assert term.transform == "signed_log1p"
    assert term.standardise(1000.0) == 0.0
    assert term.standardise(1.19e7) == pytest.approx(math.log1p(1.19e7) - math.log1p(1000.0))
    low_t, high_t = math.log1p(100.0), math.log1p(10000.0)
    margin = 0.125 * (high_t - low_t)
    expected_low, expected_high = math.expm1(low_t - margin), math.expm1(high_t + margin)
    inside = score({**FEATURES_B, SPHERICITY: 1000.0}, CLINICAL_B, model)
    assert inside.applicability.status is DomainStatus.IN_DOMAIN
    outside = score({**FEATURES_B, SPHERICITY: 1.19e7}, CLINICAL_B, model)
    sphericity = [v for v in outside.applicability.violations if v.name == SPHERICITY]
    assert len(sphericity) == 1
    assert sphericity[0].value == 1.19e7
    assert sphericity[0].low == pytest.approx(expected_low) and sphericity[0].high == pytest.approx(expected_high)
    assert sphericity[0].z == pytest.approx(math.log1p(1.19e7) - math.log1p(1000.0))


# --- training side -------------------------------------------------------------------


def test_domain_from_training_records_numpy_statistics():
    values = [float(v) for v in range(1, 101)]
    domain = domain_from_training({"f": values}, values, [2 * v for v in values], DomainRule(margin_fraction=0.1))
    f = domain.features["f"]
    assert (f.minimum, f.maximum, f.mean) == (1.0, 100.0, 50.5)
    assert f.sd == pytest.approx(29.011491975882016)
    assert dict(f.quantiles) == {"p01": 1.99, "p05": 5.95, "p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert domain.training_n == 100 and domain.risk_score.maximum == 200.0
    assert domain.feature_interval(FeatureScale("f", "none", 50.5, f.sd)) == pytest.approx((1.0 - 9.9, 100.0 + 9.9))
    assert ApplicabilityDomain.from_mapping(domain.to_mapping()) == domain
    with pytest.raises(ValueError, match="differ in length"):
        domain_from_training({"f": values}, values[:-1], values)
    with pytest.raises(ValueError, match="at least two finite values"):
        TrainingDistribution.of([1.0, math.nan])


def test_model_format_doc_example_domain_verdicts():
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "model-format.md").read_text(encoding="utf-8")
    model = FrozenModel.from_json(re.findall(r"```json\n(.*?)```", doc, re.S)[-1])
    assert model.schema_version == 2
    clinical = {"patient_id": "X", "t_stage": "T2", "n_stage": "N1", "m_stage": "M1b", "ecog": 1, "lipi": 1}
    features = {"ring.wavelet-LLH_glcm_Correlation": 0.53, "tumour.original_firstorder_Skewness": 0.35}
    assert score(features, clinical, model).applicability.status is DomainStatus.IN_DOMAIN
    out = score({**features, "ring.wavelet-LLH_glcm_Correlation": 0.95}, clinical, model).applicability
    assert [v.name for v in out.violations] == ["ring.wavelet-LLH_glcm_Correlation", "radiomics_score"]
    correlation, radiomics = out.violations
    assert (correlation.low, correlation.high, correlation.z) == pytest.approx((0.011, 0.839, 4.5))
    assert (radiomics.value, radiomics.low, radiomics.high) == pytest.approx((1.215, -0.257, 0.307))
