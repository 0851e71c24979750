"""CT volume + tumour mask + clinical record + frozen model -> RiskResult.  Pure."""

from __future__ import annotations

import SimpleITK as sitk

from scoring.clinical import ClinicalRecord
from scoring.features import check_pyradiomics_version, extract_model_features
from scoring.model import FrozenModel
from scoring.ring import peritumoral_ring
from scoring.risk import apply_model
from scoring.types import RiskResult


def score_volume(
    ct_image: sitk.Image,
    tumour_mask: sitk.Image,
    clinical: ClinicalRecord,
    model: FrozenModel,
) -> RiskResult:
    """Build the ring the model defines, extract exactly its features, apply it."""
    check_pyradiomics_version(model.extraction)
    ring_mask = peritumoral_ring(tumour_mask, model.extraction.ring)
    features = extract_model_features(
        ct_image,
        {"tumour": tumour_mask, "ring": ring_mask},
        model.feature_specs,
        model.extraction,
    )
    return apply_model(model, features, clinical)
