"""Schema-v2 models built from the shipped (v1) demonstration model, with a domain placed around known values.

The coefficients, baseline and extraction stay the demonstration model's, so
a study scores exactly as it does with the shipped file; only the recorded
applicability domain differs.  A domain is "wide" (every given value well
inside) or "narrow" for chosen features (their values below the accepted
range), so a test knows the verdict and the reported bounds beforehand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.scoring.model import FrozenModel, seal

DEMO_MODEL_FILENAME = "demo-integrated-cox-2.0.0.json"
MARGIN_FRACTION = 0.1


def demo_content() -> dict[str, Any]:
    return json.loads(shipped_model_path(DEMO_MODEL_FILENAME).read_text(encoding="utf-8"))


def _distribution(minimum: float, maximum: float) -> dict[str, Any]:
    width = maximum - minimum
    return {
        "min": minimum,
        "max": maximum,
        "mean": minimum + width / 2,
        "sd": width / 4,
        "quantiles": {
            key: minimum + width * q
            for key, q in (("p01", 0.01), ("p05", 0.05), ("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
    }


def demo_model_v2_content(
    features: Mapping[str, float],
    radiomics_score: float,
    risk_score: float,
    *,
    outside: Iterable[str] = (),
    name: str = "demo-integrated-cox-domain-test",
) -> dict[str, Any]:
    """Unsealed v2 content.  Each feature's training range is value +/- 3 model SDs, except
    for the features in ``outside``: their range is [value + 3 SD, value + 5 SD], so the
    value lies 3 - 0.2 = 2.8 SDs below the accepted low bound (margin 10 % of 2 SD)."""
    content = demo_content()
    outside = set(outside)
    domain_features = {}
    for feature in content["radiomics"]["features"]:
        full_name = f"{feature['region']}.{feature['image_type']}_{feature['feature_class']}_{feature['feature']}"
        value, sd = features[full_name], feature["sd"]
        domain_features[full_name] = (
            _distribution(value + 3 * sd, value + 5 * sd)
            if full_name in outside
            else _distribution(value - 3 * sd, value + 3 * sd)
        )
    unknown = outside - set(domain_features)
    if unknown:
        raise ValueError(f"not model features: {sorted(unknown)}")
    content.update(
        schema_version=2,
        name=name,
        version="2.0.0-domain",
        applicability_domain={
            "rule": {"kind": "widened-training-range", "margin_fraction": MARGIN_FRACTION, "max_abs_z": None},
            "training_n": 253,
            "features": domain_features,
            "radiomics_score": _distribution(radiomics_score - 10.0, radiomics_score + 10.0),
            "risk_score": _distribution(risk_score - 20.0, risk_score + 20.0),
        },
    )
    return content


def demo_model_v2(features, radiomics_score, risk_score, **kwargs) -> FrozenModel:
    return FrozenModel.from_mapping(seal(demo_model_v2_content(features, radiomics_score, risk_score, **kwargs)))


def demo_model_v2_json(features, radiomics_score, risk_score, **kwargs) -> str:
    return json.dumps(seal(demo_model_v2_content(features, radiomics_score, risk_score, **kwargs)), indent=2)


def expected_outside_bounds(value: float, sd: float) -> tuple[float, float]:
    """Accepted (low, high) of a feature put ``outside`` by `demo_model_v2_content`."""
    low, high = value + 3 * sd, value + 5 * sd
    margin = MARGIN_FRACTION * (high - low)
    return low - margin, high + margin
