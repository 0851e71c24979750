"""Crop first changes no value: crop-first scoring against whole-volume extraction.

Real cases (pyradiomics' lung1 and lung2) and synthetic ones (a tumour deep
inside, one cut by the image edge, other preprocessing), for tumour and ring
features of the original, wavelet and LoG images, within 1e-6 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import radiomics
import SimpleITK as sitk

from sclc_risk_node.scoring.crop import interpolator_support_voxels, plan_crop
from sclc_risk_node.scoring.errors import MaskError
from sclc_risk_node.scoring.features import extract_model_features
from sclc_risk_node.scoring.pipeline import model_features
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, RingDefinition
from tests.realdata import pyradiomics_case
from tests.scoring.phantoms import ellipsoid_mask, textured_ct

INSTALLED = radiomics.__version__.lstrip("v")
RELATIVE = 1e-6

MODEL_SETTINGS = ExtractionSettings(  # the demonstration model's, plus LoG
    pyradiomics_version=INSTALLED,
    settings={"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1},
    image_types={"Original": {}, "Wavelet": {}, "LoG": {"sigma": [1.0, 3.0]}},
    ring=RingDefinition(2.0, 2.0),
)

SPECS = [
    FeatureSpec.from_name(name)
    for name in (
        "tumour.original_shape_Sphericity",
        "tumour.original_firstorder_Mean",
        "tumour.original_firstorder_Kurtosis",
        "tumour.original_glcm_Correlation",
        "tumour.wavelet-LLH_glcm_Correlation",
        "tumour.wavelet-HLL_glszm_ZoneEntropy",
        "tumour.wavelet-LLL_firstorder_Mean",
        "tumour.log-sigma-1-0-mm-3D_gldm_DependenceNonUniformity",
        "tumour.log-sigma-3-0-mm-3D_firstorder_Mean",
        "ring.original_shape_VoxelVolume",
        "ring.original_firstorder_Mean",
        "ring.original_glrlm_RunEntropy",
        "ring.wavelet-LHL_gldm_DependenceEntropy",
        "ring.wavelet-HHH_firstorder_Energy",
        "ring.log-sigma-3-0-mm-3D_glszm_ZoneEntropy",
        "ring.log-sigma-1-0-mm-3D_firstorder_Median",
    )
]


def whole_volume(image, tumour, specs, settings):
    """The reference: ring and extraction over the whole volume, no crop anywhere."""
    ring = peritumoral_ring(tumour, settings.ring)
    return extract_model_features(image, {"tumour": tumour, "ring": ring}, specs, settings).values


def assert_same(crop_first, whole):
    assert crop_first.keys() == whole.keys()
    for name, expected in whole.items():
        assert math.isfinite(expected)
        assert abs(crop_first[name] - expected) <= RELATIVE * max(abs(expected), 1e-9), (
            name,
            crop_first[name],
            expected,
        )


@pytest.fixture(scope="module", params=["lung1", "lung2"])
def lung(request):
    image_path, label_path = pyradiomics_case(request.param)
    image = sitk.ReadImage(str(image_path))
    tumour = sitk.Cast(sitk.ReadImage(str(label_path)) == 1, sitk.sitkUInt8)
    return image, tumour


def test_real_lung_cases_give_whole_volume_values(lung):
    image, tumour = lung
    plan = plan_crop(tumour, MODEL_SETTINGS)
    assert plan.extraction_in_crop, plan.reason
    # The crop is a real one in-plane: the point of the exercise.
    assert plan.box.size[0] < image.GetSize()[0] and plan.box.size[1] < image.GetSize()[1]
    assert_same(
        model_features(image, tumour, SPECS, MODEL_SETTINGS).values, whole_volume(image, tumour, SPECS, MODEL_SETTINGS)
    )


def synthetic(size, spacing_mm, semi_axes_mm, centre_mm, seed):
    tumour = ellipsoid_mask(size, spacing_mm, semi_axes_mm, centre_mm=centre_mm, origin_mm=(-31.3, 17.9, -402.5))
    return textured_ct(tumour, seed=seed), tumour


def test_a_small_tumour_deep_in_a_large_volume_gives_whole_volume_values():
    # The benchmark's geometry (0.7 x 0.7 x 1 mm), where 1 mm resampling puts
    # pyradiomics' grid off the CT's by a fraction of a voxel that depends on the crop.
    image, tumour = synthetic(
        (190, 170, 100), (0.7, 0.7, 1.0), (9.0, 7.0, 11.0), (-31.3 + 71.0, 17.9 + 60.0, -402.5 + 50.0), 3
    )
    plan = plan_crop(tumour, MODEL_SETTINGS)
    assert plan.extraction_in_crop and plan.box.voxels < 0.5 * np.prod(image.GetSize())
    assert all(lo > 0 for lo in plan.box.lower)
    assert all(lo + n < size for lo, n, size in zip(plan.box.lower, plan.box.size, image.GetSize()))
    assert_same(
        model_features(image, tumour, SPECS, MODEL_SETTINGS).values, whole_volume(image, tumour, SPECS, MODEL_SETTINGS)
    )


def test_a_tumour_cut_by_the_image_edge_gives_whole_volume_values():
    # The crop meets the image edge there; the ring's edge replication and pyradiomics' clipping must agree.
    image, tumour = synthetic(
        (120, 110, 60), (0.8, 0.8, 2.0), (10.0, 8.0, 12.0), (-31.3 + 4.0, 17.9 + 50.0, -402.5 + 60.0), 5
    )
    plan = plan_crop(tumour, MODEL_SETTINGS)
    assert plan.box.lower[0] == 0
    assert_same(
        model_features(image, tumour, SPECS, MODEL_SETTINGS).values, whole_volume(image, tumour, SPECS, MODEL_SETTINGS)
    )


OTHER_SPECS = [
    FeatureSpec.from_name(name)
    for name in (
        "tumour.original_firstorder_Mean",
        "tumour.log-sigma-1-5-mm-3D_glrlm_GrayLevelNonUniformity",
        "ring.original_firstorder_Energy",
        "ring.original_shape_VoxelVolume",
        "ring.wavelet-HLH_glcm_JointEntropy",
        "ring.wavelet-LLL_gldm_LargeDependenceEmphasis",
    )
]


@pytest.mark.parametrize(
    "settings, in_crop",
    [
        (
            {
                "binWidth": 10,
                "voxelArrayShift": 300,
                "resegmentRange": [-300, 300],
                "resampledPixelSpacing": [1.2, 1.2, 1.2],
                "interpolator": "sitkLinear",
                "padDistance": 6,
                "label": 1,
            },
            True,
        ),
        ({"binWidth": 25, "resampledPixelSpacing": [0.8, 0.8, 0], "interpolator": "sitkBSpline", "label": 1}, True),
        ({"binWidth": 25, "preCrop": True, "label": 1}, True),
        (
            {
                "binWidth": 25,
                "normalize": True,
                "resampledPixelSpacing": [1, 1, 1],
                "interpolator": "sitkBSpline",
                "label": 1,
            },
            False,
        ),
        ({"binWidth": 25, "label": 1}, False),
    ],
    ids=["linear-1.2mm-resegmented", "in-plane-only", "precrop-no-resampling", "normalize", "no-resampling"],
)
def test_other_preprocessing_gives_whole_volume_values(settings, in_crop):
    extraction = ExtractionSettings(
        pyradiomics_version=INSTALLED,
        settings=settings,
        image_types={"Original": {}, "Wavelet": {"wavelet": "haar"}, "LoG": {"sigma": [1.5]}},
        ring=RingDefinition(3.0, 1.0),
    )
    image, tumour = synthetic(
        (110, 100, 40), (0.8, 0.8, 2.5), (9.0, 8.0, 12.0), (-31.3 + 40.0, 17.9 + 45.0, -402.5 + 50.0), 9
    )
    plan = plan_crop(tumour, extraction)
    assert plan.extraction_in_crop is in_crop
    assert plan.box.voxels < np.prod(image.GetSize())
    assert_same(
        model_features(image, tumour, OTHER_SPECS, extraction).values,
        whole_volume(image, tumour, OTHER_SPECS, extraction),
    )


def test_the_ring_on_the_crop_is_the_whole_volume_ring():
    image, tumour = synthetic(
        (100, 100, 50), (0.7, 0.7, 1.0), (8.0, 6.0, 9.0), (-31.3 + 30.0, 17.9 + 40.0, -402.5 + 20.0), 1
    )
    plan = plan_crop(tumour, MODEL_SETTINGS)
    cropped_ring = peritumoral_ring(plan.box.apply(tumour), MODEL_SETTINGS.ring)
    whole_ring = peritumoral_ring(tumour, MODEL_SETTINGS.ring)
    pasted = plan.box.paste(cropped_ring, tumour)
    assert np.array_equal(sitk.GetArrayViewFromImage(pasted), sitk.GetArrayViewFromImage(whole_ring))
    assert pasted.GetOrigin() == whole_ring.GetOrigin()


def test_the_margin_sums_ring_pyradiomics_pad_and_interpolator_support():
    # Cubic B-spline: kernel 2 + prefilter reach ceil(log 1e-12 / log 0.268) = 21 voxels.
    assert interpolator_support_voxels("sitkBSpline") == 23
    assert interpolator_support_voxels(sitk.sitkLinear) == 1
    assert interpolator_support_voxels("sitkGaussian") is None
    tumour = ellipsoid_mask((200, 200, 120), (0.7, 0.7, 1.0), (10.0, 10.0, 10.0))
    plan = plan_crop(tumour, MODEL_SETTINGS)
    first_tumour_voxel = np.argwhere(sitk.GetArrayViewFromImage(tumour) == 1)[:, ::-1].min(axis=0)
    # x: ring pad ceil((2 + 2 |(0.7, 0.7, 1)|) / 0.7) + 2 = 9; pyradiomics ceil(6 x 1 / 0.7) + 1 = 10; support 23.
    # z: ring pad ceil((2 + 2 |(0.7, 0.7, 1)|) / 1) + 2 = 7; pyradiomics 6 + 1 = 7; support 23.
    assert tuple(first_tumour_voxel - np.array(plan.box.lower)) == (42, 42, 37)


def test_settings_that_make_pyradiomics_read_the_whole_image_say_why():
    tumour = ellipsoid_mask((60, 60, 30), (0.8, 0.8, 2.0), (8.0, 8.0, 8.0))
    for settings, reason in [
        ({"normalize": True, "resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkBSpline"}, "normalize is on"),
        ({"binWidth": 25}, "no resampling and no preCrop"),
        ({"resampledPixelSpacing": [1, 1, 1], "interpolator": "sitkGaussian"}, "interpolator 'sitkGaussian'"),
    ]:
        plan = plan_crop(tumour, ExtractionSettings(INSTALLED, settings, {"Original": {}}))
        assert not plan.extraction_in_crop
        assert plan.reason.startswith(reason)


def test_a_2d_mask_is_a_mask_error_not_a_garbled_crop():
    # The crop box is (x, y, z); a 2-D mask used to give a 1-axis box that SimpleITK then rejected.
    tumour = sitk.GetImageFromArray(np.pad(np.ones((3, 3), np.uint8), 4))
    with pytest.raises(MaskError, match="3-D"):
        plan_crop(tumour, MODEL_SETTINGS)
    with pytest.raises(MaskError, match="3-D"):
        model_features(sitk.Cast(tumour, sitk.sitkInt16), tumour, SPECS, MODEL_SETTINGS)
