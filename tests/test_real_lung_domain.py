"""A real lung CT (pyradiomics' lung1, as DICOM CT + SEG) through `score_files` with schema-v2 models.

The models are the shipped demonstration model (sealed) with an applicability
domain placed around lung1's features as pyradiomics computes them directly on
the NRRD files, an independent path: a domain that contains them, and one that
leaves out ring LAHGLE (the feature issue 7 found 136 SDs out on lung2).  The
node's DICOM path must reach the verdict those reference values imply.
"""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from sclc_risk_node.node.scoring_job import result_as_json, score_files
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.types import DomainStatus, FeatureSpec
from tests.domain_models import demo_content, demo_model_v2, expected_outside_bounds
from tests.realdata import pyradiomics_case_as_dicom

pytestmark = pytest.mark.slow

LAHGLE = "ring.wavelet-HHL_glszm_LargeAreaHighGrayLevelEmphasis"
CLINICAL = {"patient_id": "PYRAD-lung1", "t_stage": "T3", "n_stage": "N2", "m_stage": "M1c", "ecog": 1, "lipi": "good"}


@pytest.fixture(scope="module")
def lung1():
    return pyradiomics_case_as_dicom("lung1")


@pytest.fixture(scope="module")
def reference(lung1):
    """The demo model's features by pyradiomics on the NRRD files, with the model's settings."""
    _, _, image_path, label_path = lung1
    content = demo_content()
    extraction = content["extraction"]
    extractor = RadiomicsFeatureExtractor(**extraction["settings"])
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**extraction["image_types"])
    extractor.disableAllFeatures()
    specs = [
        FeatureSpec(f["region"], f["image_type"], f["feature_class"], f["feature"])
        for f in content["radiomics"]["features"]
    ]
    extractor.enableFeaturesByName(**{spec.feature_class: [] for spec in specs})
    image, label = sitk.ReadImage(str(image_path)), sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt8)
    ring = peritumoral_ring(label, _ring(extraction))
    computed = {"tumour": extractor.execute(image, label), "ring": extractor.execute(image, ring)}
    return {spec.name: float(computed[spec.region][spec.pyradiomics_key]) for spec in specs}


def _ring(extraction):
    from sclc_risk_node.scoring.types import RingDefinition

    ring = extraction["ring"]
    return RingDefinition(ring["outward_mm"], ring["inward_mm"], ring["method"])


@pytest.fixture(scope="module")
def reference_scores(reference):
    """Radiomics and risk score from the reference features (the v1 model's arithmetic)."""
    from sclc_risk_node.models import shipped_model_path
    from sclc_risk_node.scoring.model import FrozenModel
    from sclc_risk_node.scoring.types import FeatureVector

    shipped = FrozenModel.from_json(shipped_model_path("demo-integrated-cox-2.0.0.json").read_text())
    result = apply_model(shipped, FeatureVector(reference), clinical_record_from_mapping(CLINICAL))
    return result.radiomics_score, result.risk_score


@pytest.fixture(scope="module")
def scored_narrow(lung1, reference, reference_scores):
    ct_dir, seg_path, _, _ = lung1
    model = demo_model_v2(reference, *reference_scores, outside=[LAHGLE])
    return model, score_files(ct_dir, seg_path, [clinical_record_from_mapping(CLINICAL)], model)


def test_lung1_out_of_domain_on_the_feature_placed_outside(scored_narrow, reference):
    model, scored = scored_narrow
    applicability = scored.result.applicability
    assert applicability.status is DomainStatus.OUT_OF_DOMAIN
    [violation] = applicability.violations
    assert violation.name == LAHGLE
    assert violation.value == pytest.approx(reference[LAHGLE], rel=1e-6)
    sd = next(term.sd for term in model.radiomics_terms if term.name == LAHGLE)
    low, high = expected_outside_bounds(reference[LAHGLE], sd)
    assert (violation.low, violation.high) == pytest.approx((low, high), rel=1e-6)
    mean = next(term.mean for term in model.radiomics_terms if term.name == LAHGLE)
    assert violation.z == pytest.approx((reference[LAHGLE] - mean) / sd, rel=1e-6)
    as_json = result_as_json(scored)
    assert as_json["withheld"] is True and as_json["risk_group"] is None
    assert as_json["pfs_probability"] == {"6": None, "12": None}


def test_lung1_in_domain_when_the_domain_contains_it(scored_narrow, reference, reference_scores, lung1):
    _, scored = scored_narrow
    wide = demo_model_v2(reference, *reference_scores)
    result = apply_model(wide, scored.result.features, clinical_record_from_mapping(CLINICAL))
    assert result.applicability.status is DomainStatus.IN_DOMAIN and result.applicability.violations == ()
    assert 0 < result.pfs_probability[12] <= result.pfs_probability[6] < 1
