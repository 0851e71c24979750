"""CT volume + tumour mask + clinical record + frozen model -> RiskResult.  Pure.

Crop first (``scoring.crop``): the ring and pyradiomics see the tumour's
bounding box plus a margin that leaves every value unchanged, so the cost
grows with the tumour, not the scan, and no whole-volume float copy of the
CT is made (the crop is cast by pyradiomics, the whole CT stays as read).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import SimpleITK as sitk

from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.crop import plan_crop
from sclc_risk_node.scoring.features import check_pyradiomics_version, extract_model_features
from sclc_risk_node.scoring.model import FrozenModel
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, FeatureVector, RiskResult


@dataclass(frozen=True, slots=True)
class StageSeconds:
    """Wall time of each scoring stage, seconds: crop + ring, feature extraction, model."""

    ring_s: float
    extract_s: float
    model_s: float


def score_volume(
    ct_image: sitk.Image,
    tumour_mask: sitk.Image,
    clinical: ClinicalRecord,
    model: FrozenModel,
) -> RiskResult:
    """Build the ring the model defines, extract exactly its features, apply it."""
    return score_volume_timed(ct_image, tumour_mask, clinical, model)[0]


def score_volume_timed(
    ct_image: sitk.Image,
    tumour_mask: sitk.Image,
    clinical: ClinicalRecord,
    model: FrozenModel,
) -> tuple[RiskResult, StageSeconds]:
    """``score_volume`` and the time of each stage."""
    check_pyradiomics_version(model.extraction)
    features, ring_s, extract_s = model_features_timed(ct_image, tumour_mask, model.feature_specs, model.extraction)
    started = time.perf_counter()
    result = apply_model(model, features, clinical)
    return result, StageSeconds(ring_s, extract_s, time.perf_counter() - started)


def model_features(
    ct_image: sitk.Image, tumour_mask: sitk.Image, specs: Sequence[FeatureSpec], extraction: ExtractionSettings
) -> FeatureVector:
    """The ring and ``specs``' features, crop first; the values of whole-volume extraction."""
    return model_features_timed(ct_image, tumour_mask, specs, extraction)[0]


def model_features_timed(
    ct_image: sitk.Image, tumour_mask: sitk.Image, specs: Sequence[FeatureSpec], extraction: ExtractionSettings
) -> tuple[FeatureVector, float, float]:
    """``model_features`` and the seconds spent on crop + ring and on extraction."""
    started = time.perf_counter()
    plan = plan_crop(tumour_mask, extraction)
    tumour = plan.box.apply(tumour_mask)
    ring = peritumoral_ring(tumour, extraction.ring)
    ringed = time.perf_counter()
    if plan.extraction_in_crop:
        features = extract_model_features(ct_image, {"tumour": tumour, "ring": ring}, specs, extraction, crop=plan.box)
    else:
        # Settings under which pyradiomics reads the whole image (plan.reason): the ring goes back on its grid.
        regions = {"tumour": tumour_mask, "ring": plan.box.paste(ring, tumour_mask)}
        features = extract_model_features(ct_image, regions, specs, extraction)
    return features, ringed - started, time.perf_counter() - ringed
