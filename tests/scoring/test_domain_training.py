"""The training side of the applicability domain: `fit_integrated_model` writes schema v2 with the domain."""

from __future__ import annotations

import numpy as np
import pytest

from sclc_risk_node.scoring.model import FrozenModel, seal
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.types import DomainStatus, FeatureVector
from tests.scoring.test_training_method import N_TRAIN, cohort, fitted, spec, training_split  # noqa: F401 - fixtures


def test_fitted_model_is_schema_v2_with_the_training_distributions(fitted, cohort):
    mapping = fitted.model_mapping
    assert mapping["schema_version"] == 2
    domain = mapping["applicability_domain"]
    assert domain["rule"] == {"kind": "widened-training-range", "margin_fraction": 0.1, "max_abs_z": None}
    assert domain["training_n"] == N_TRAIN
    model = FrozenModel.from_mapping(seal(mapping))
    assert list(domain["features"]) == list(model.feature_names)
    features = training_split(cohort)[0]
    for name, recorded in domain["features"].items():
        column = features[name].to_numpy(dtype=float)
        assert (recorded["min"], recorded["max"]) == (column.min(), column.max())
        assert recorded["mean"] == pytest.approx(column.mean(), rel=1e-12)
        assert recorded["sd"] == pytest.approx(column.std(ddof=1), rel=1e-12)
        assert recorded["quantiles"]["p05"] == pytest.approx(np.quantile(column, 0.05), rel=1e-12)
        assert recorded["quantiles"]["p99"] == pytest.approx(np.quantile(column, 0.99), rel=1e-12)
    for key, scores in (("radiomics_score", fitted.radiomics_score), ("risk_score", fitted.risk_score)):
        assert (domain[key]["min"], domain[key]["max"]) == (min(scores), max(scores))
        assert domain[key]["quantiles"]["p50"] == pytest.approx(float(np.median(scores)), rel=1e-12)


def test_every_training_patient_is_in_domain_and_an_extreme_one_is_not(fitted, cohort):
    model = FrozenModel.from_mapping(seal(fitted.model_mapping))
    features, records, _, _ = training_split(cohort)
    for row in range(N_TRAIN):
        vector = FeatureVector({name: features.iloc[row][name] for name in model.feature_names})
        assert apply_model(model, vector, records[row]).applicability.status is DomainStatus.IN_DOMAIN, row
    name = model.feature_names[0]
    recorded = fitted.model_mapping["applicability_domain"]["features"][name]
    extreme = recorded["max"] + 5 * (recorded["max"] - recorded["min"])
    vector = FeatureVector({**{n: features.iloc[0][n] for n in model.feature_names}, name: extreme})
    result = apply_model(model, vector, records[0])
    assert result.applicability.status is DomainStatus.OUT_OF_DOMAIN
    violation = result.applicability.violations[0]
    assert violation.name == name and violation.value == extreme
    assert violation.high == pytest.approx(recorded["max"] + 0.1 * (recorded["max"] - recorded["min"]))
