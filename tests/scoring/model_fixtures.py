"""A small, valid frozen model built in code (no committed model file).

Every coefficient, mean and sd is a dyadic fraction (k / 2^n), so the linear
predictors in the tests are exact in binary floating point and a risk score
can equal the cut-off exactly.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from sclc_risk_node.scoring.model import seal

# (region, image_type, feature_class, feature, mean, sd, coefficient)
FIXTURE_FEATURES = (
    ("ring", "original", "firstorder", "Mean", 10.0, 2.0, 0.5),
    ("tumour", "wavelet-LLH", "glcm", "Correlation", 0.5, 0.25, -1.0),
    ("ring", "log-sigma-2-0-mm-3D", "glszm", "ZoneEntropy", 4.0, 0.5, 0.25),
    ("tumour", "original", "shape", "Sphericity", 0.625, 0.125, 0.25),
)

BASELINE_TIMES = [1.0, 2.0, 3.0, 4.5, 6.0, 7.5, 9.0, 12.0, 15.0]
BASELINE_SURVIVAL = [0.98, 0.95, 0.9, 0.82, 0.7, 0.6, 0.5, 0.35, 0.3]


def model_content() -> dict[str, Any]:
    """The unsealed content of the fixture model (a fresh dict each call)."""
    return {
        "schema_version": 1,
        "name": "test-fixture-integrated",
        "version": "0.0.1",
        "intended_use": "Unit tests only. Synthetic numbers; not for any patient.",
        "demonstration": True,
        "created": "2024-01-02T03:04:05Z",
        "extraction": {
            "pyradiomics_version": "3.1.4",
            "settings": {
                "binWidth": 25,
                "resampledPixelSpacing": [1, 1, 1],
                "interpolator": "sitkBSpline",
                "label": 1,
            },
            "image_types": {"Original": {}, "Wavelet": {}, "LoG": {"sigma": [2.0]}},
            "ring": {"outward_mm": 2.0, "inward_mm": 2.0, "method": "signed-distance-mm"},
        },
        "radiomics": {
            "features": [
                {
                    "region": region,
                    "image_type": image_type,
                    "feature_class": feature_class,
                    "feature": feature,
                    "mean": mean,
                    "sd": sd,
                    "coefficient": coefficient,
                }
                for region, image_type, feature_class, feature, mean, sd, coefficient in FIXTURE_FEATURES
            ],
            "cutoff": 0.125,
        },
        "clinical_covariates": [
            {
                "name": "overall_stage:IV",
                "field": "overall_stage",
                "encoding": {"kind": "indicator", "levels": ["IV"]},
                "coefficient": 0.5,
            },
            {"name": "ecog>=2", "field": "ecog", "encoding": {"kind": "threshold", "at_least": 2}, "coefficient": 0.75},
            {
                "name": "lipi",
                "field": "lipi",
                "encoding": {"kind": "ordinal", "map": {"good": 0, "intermediate": 1, "poor": 2}},
                "coefficient": 0.25,
            },
            {
                "name": "t_stage:T3-T4",
                "field": "t_stage",
                "encoding": {"kind": "indicator", "levels": ["T3", "T4"]},
                "coefficient": 0.25,
            },
            {
                "name": "n_stage",
                "field": "n_stage",
                "encoding": {"kind": "ordinal", "map": {"N0": 0, "N1": 1, "N2": 2, "N3": 3}},
                "coefficient": 0.125,
            },
            {
                "name": "m_stage:M1c",
                "field": "m_stage",
                "encoding": {"kind": "indicator", "levels": ["M1c"]},
                "coefficient": 0.125,
            },
        ],
        "radiomics_score_coefficient": 0.75,
        "risk_cutoff": 2.5,
        "baseline_survival": {
            "time_unit": "months",
            "times": list(BASELINE_TIMES),
            "survival": list(BASELINE_SURVIVAL),
            "valid_until": 18.0,
            "linear_predictor_centre": 2.5,
        },
        "training_summary": {
            "cohort": "none: synthetic numbers for unit tests",
            "n": 0,
            "events": 0,
        },
    }


def sealed_model(content: dict[str, Any] | None = None) -> dict[str, Any]:
    """``content`` (default: the fixture) with its sha256 added."""
    return seal(copy.deepcopy(content if content is not None else model_content()))


def sealed_model_json(content: dict[str, Any] | None = None) -> str:
    return json.dumps(sealed_model(content), indent=2, ensure_ascii=False)


# Training distributions of the fixture's features (name -> min, max, mean, sd), in
# each feature's own units; dyadic like the rest, so accepted bounds are exact.
FIXTURE_DOMAIN_FEATURES = {
    "ring.original_firstorder_Mean": (4.0, 16.0, 10.0, 2.0),
    "tumour.wavelet-LLH_glcm_Correlation": (0.0, 1.0, 0.5, 0.25),
    "ring.log-sigma-2-0-mm-3D_glszm_ZoneEntropy": (3.0, 5.0, 4.0, 0.5),
    "tumour.original_shape_Sphericity": (0.25, 1.0, 0.625, 0.125),
}


def distribution(minimum: float, maximum: float, mean: float, sd: float) -> dict[str, Any]:
    """A plausible training distribution: quantiles spread evenly between min and max."""
    width = maximum - minimum
    quantiles = {
        key: minimum + width * q
        for key, q in (
            ("p01", 0.03125),
            ("p05", 0.0625),
            ("p50", (mean - minimum) / width),
            ("p95", 0.9375),
            ("p99", 0.96875),
        )
    }
    return {"min": minimum, "max": maximum, "mean": mean, "sd": sd, "quantiles": quantiles}


def model_content_v2(margin_fraction: float = 0.125, max_abs_z: float | None = None) -> dict[str, Any]:
    """The fixture as schema v2: the same model plus an applicability domain.

    Accepted (margin 1/8 of the range): ring Mean [2.5, 17.5] (training 4..16),
    radiomics score [-5, 5] (training -4..4), risk score [-3.125, 8.125] (training -2..7).
    """
    content = model_content()
    content["schema_version"] = 2
    content["applicability_domain"] = {
        "rule": {"kind": "widened-training-range", "margin_fraction": margin_fraction, "max_abs_z": max_abs_z},
        "training_n": 64,
        "features": {name: distribution(*numbers) for name, numbers in FIXTURE_DOMAIN_FEATURES.items()},
        "radiomics_score": distribution(-4.0, 4.0, 0.0, 1.5),
        "risk_score": distribution(-2.0, 7.0, 2.5, 1.75),
    }
    return content
