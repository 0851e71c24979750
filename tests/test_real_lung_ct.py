"""A real lung CT (pyradiomics-bhklab's lung1 case), converted to a DICOM CT series + SEG.

The features computed through the node's DICOM path (CT reader, SEG reader, ring,
model-feature extraction) must equal pyradiomics run directly on the NRRD files
with the same settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.scoring.features import extract_model_features
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, RingDefinition
from tests.realdata import pyradiomics_case_as_dicom

pytestmark = pytest.mark.slow

SETTINGS = ExtractionSettings(
    pyradiomics_version=radiomics.__version__.lstrip("v"),
    settings={
        "binWidth": 25,
        "resampledPixelSpacing": [1.0, 1.0, 1.0],
        "interpolator": "sitkBSpline",
        "label": 1,
    },
    image_types={"Original": {}, "Wavelet": {}},
    ring=RingDefinition(2.0, 2.0),
)

SPECS = [
    FeatureSpec.from_name(name)
    for name in (
        "tumour.original_shape_Sphericity",
        "tumour.original_firstorder_Mean",
        "tumour.original_glcm_Correlation",
        "tumour.wavelet-HLL_glszm_ZoneEntropy",
        "tumour.wavelet-LLH_firstorder_Skewness",
        "ring.original_firstorder_Median",
        "ring.original_glrlm_RunEntropy",
        "ring.wavelet-LHL_gldm_DependenceEntropy",
        "ring.wavelet-LLL_ngtdm_Coarseness",
    )
]


@pytest.fixture(scope="module")
def lung1():
    return pyradiomics_case_as_dicom("lung1")


@pytest.fixture(scope="module")
def dicom_path(lung1):
    ct_dir, seg_path, _, _ = lung1
    ct = read_ct_series(ct_dir)
    segment = read_tumour_segment(seg_path, ct)
    return ct, segment


def test_dicom_geometry_and_voxels_equal_the_nrrd(lung1, dicom_path):
    _, _, image_path, label_path = lung1
    ct, segment = dicom_path
    nrrd_image = sitk.ReadImage(str(image_path))
    nrrd_label = sitk.ReadImage(str(label_path))
    assert ct.image.GetSize() == nrrd_image.GetSize() == (512, 512, 48)
    np.testing.assert_allclose(ct.image.GetSpacing(), nrrd_image.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ct.image.GetOrigin(), nrrd_image.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ct.image.GetDirection(), nrrd_image.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ct.image), sitk.GetArrayViewFromImage(nrrd_image))
    mask = sitk.GetArrayFromImage(segment.mask)
    assert mask.sum() == 837
    np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(nrrd_label))


def test_features_through_dicom_equal_pyradiomics_on_the_nrrd(lung1, dicom_path):
    _, _, image_path, label_path = lung1
    ct, segment = dicom_path
    ring = peritumoral_ring(segment.mask, SETTINGS.ring)
    ours = extract_model_features(ct.image, {"tumour": segment.mask, "ring": ring}, SPECS, SETTINGS)

    nrrd_label = sitk.ReadImage(str(label_path))
    nrrd_ring = peritumoral_ring(sitk.Cast(nrrd_label, sitk.sitkUInt8), SETTINGS.ring)
    extractor = RadiomicsFeatureExtractor(**dict(SETTINGS.settings))
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(Original={}, Wavelet={})
    extractor.enableAllFeatures()
    reference = {
        "tumour": extractor.execute(str(image_path), str(label_path)),
        "ring": extractor.execute(sitk.ReadImage(str(image_path)), nrrd_ring),
    }
    for spec in SPECS:
        expected = float(reference[spec.region][spec.pyradiomics_key])
        assert ours[spec.name] == pytest.approx(expected, rel=1e-6, abs=1e-12), spec.name
