"""Model features equal a full pyradiomics run; errors name what is wrong."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
import radiomics
import SimpleITK as sitk
from radiomics.featureextractor import RadiomicsFeatureExtractor

from sclc_risk_node.scoring.errors import FeatureExtractionError, MaskError
from sclc_risk_node.scoring.features import (
    check_pyradiomics_version,
    extract_all_features,
    extract_model_features,
    settings_hash,
)
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, RingDefinition
from tests.scoring.phantoms import ellipsoid_mask, sphere_mask, textured_ct

INSTALLED = radiomics.__version__.lstrip("v")

SETTINGS = ExtractionSettings(
    pyradiomics_version=INSTALLED,
    settings={"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1},
    image_types={"Original": {}, "Wavelet": {}, "LoG": {"sigma": [1.0, 2.0]}},
)

# Different preprocessing everywhere, including per-image-type settings, so a
# setting that is dropped on the way to pyradiomics changes some value.
OTHER_SETTINGS = ExtractionSettings(
    pyradiomics_version=INSTALLED,
    settings={
        "binWidth": 10,
        "normalize": True,
        "normalizeScale": 100,
        "voxelArrayShift": 300,
        "resegmentRange": [-300, 300],
        "resampledPixelSpacing": [1.2, 1.2, 1.2],
        "interpolator": "sitkLinear",
        "padDistance": 6,
        "label": 1,
    },
    image_types={"Original": {}, "Wavelet": {"wavelet": "haar"}, "LoG": {"sigma": [1.5], "binWidth": 5}},
)

SPECS = [
    FeatureSpec.from_name(name)
    for name in (
        "tumour.original_shape_Sphericity",
        "tumour.original_shape_Maximum3DDiameter",
        "tumour.original_firstorder_Mean",
        "tumour.original_glcm_Correlation",
        "tumour.wavelet-HLL_glszm_ZoneEntropy",
        "tumour.wavelet-LLH_firstorder_Skewness",
        "tumour.wavelet-LLL_ngtdm_Busyness",
        "tumour.log-sigma-1-0-mm-3D_gldm_DependenceNonUniformity",
        "ring.original_shape_MeshVolume",
        "ring.original_firstorder_Median",
        "ring.original_glrlm_RunEntropy",
        "ring.original_ngtdm_Coarseness",
        "ring.wavelet-LHL_gldm_DependenceEntropy",
        "ring.wavelet-HHH_glcm_Idmn",
        "ring.log-sigma-2-0-mm-3D_glszm_SizeZoneNonUniformityNormalized",
        "ring.log-sigma-1-0-mm-3D_firstorder_Entropy",
    )
]

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


def full_pyradiomics_run(image, mask, settings):
    extractor = RadiomicsFeatureExtractor(**dict(settings.settings))
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**{name: dict(custom) for name, custom in settings.image_types.items()})
    return extractor.execute(image, mask)


@pytest.fixture(scope="module")
def phantom():
    tumour = ellipsoid_mask((64, 64, 32), (0.8, 0.8, 2.5), (11.0, 9.0, 14.0))
    image = textured_ct(tumour, seed=7)
    return image, {"tumour": tumour, "ring": peritumoral_ring(tumour, RingDefinition(2.0, 2.0))}


@pytest.fixture(scope="module")
def reference(phantom):
    image, regions = phantom
    started = time.perf_counter()
    values = {region: full_pyradiomics_run(image, mask, SETTINGS) for region, mask in regions.items()}
    return values, time.perf_counter() - started


def assert_equal_to_reference(ours, specs, reference):
    for spec in specs:
        expected = float(reference[spec.region][spec.pyradiomics_key])
        assert math.isfinite(expected)
        assert abs(ours[spec.name] - expected) <= 1e-9 * max(abs(expected), 1e-3), spec.name


def test_model_features_equal_a_full_pyradiomics_run(phantom, reference):
    image, regions = phantom
    ours = extract_model_features(image, regions, SPECS, SETTINGS)
    assert list(ours.values) == [spec.name for spec in SPECS]
    assert_equal_to_reference(ours, SPECS, reference[0])


def test_every_setting_reaches_pyradiomics(phantom):
    image, regions = phantom
    expected = {region: full_pyradiomics_run(image, mask, OTHER_SETTINGS) for region, mask in regions.items()}
    ours = extract_model_features(image, regions, OTHER_SPECS, OTHER_SETTINGS)
    assert_equal_to_reference(ours, OTHER_SPECS, expected)
    plain = extract_model_features(image, regions, OTHER_SPECS[:1], SETTINGS)
    assert plain[OTHER_SPECS[0].name] != pytest.approx(ours[OTHER_SPECS[0].name], rel=1e-3)


def test_extract_all_features_is_the_full_run_without_diagnostics(phantom, reference):
    image, regions = phantom
    everything = extract_all_features(image, regions["tumour"], SETTINGS)
    expected = {k: float(v) for k, v in reference[0]["tumour"].items() if not k.startswith("diagnostics_")}
    assert everything == expected
    assert {key.split("_")[0] for key in everything} == {
        "original",
        "log-sigma-1-0-mm-3D",
        "log-sigma-2-0-mm-3D",
        *(f"wavelet-{band}" for band in ("LLL", "LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH")),
    }


def test_extract_all_features_can_be_limited_to_feature_classes(phantom):
    image, regions = phantom
    settings = ExtractionSettings(INSTALLED, SETTINGS.settings, {"Original": {}})
    firstorder = extract_all_features(image, regions["ring"], settings, feature_classes=["firstorder", "shape"])
    assert {key.split("_")[1] for key in firstorder} == {"firstorder", "shape"}
    with pytest.raises(FeatureExtractionError, match="'glcmm'"):
        extract_all_features(image, regions["ring"], settings, feature_classes=["glcmm"])


@pytest.mark.parametrize(
    "name, message",
    [
        ("tumour.original_glcmm_Correlation", "unknown pyradiomics feature class 'glcmm'"),
        ("tumour.original_glcm_Correlashun", "no feature 'Correlashun'"),
        ("tumour.original_glcm_SumVariance", "deprecated"),
        ("tumour.sobel_glcm_Correlation", "unknown pyradiomics image type 'sobel'"),
        ("tumour.square_glcm_Correlation", "Square filter, which the settings do not enable"),
        ("tumour.log-sigma-3-0-mm-3D_glcm_Correlation", "log-sigma-3-0-mm-3D"),
        ("tumour.wavelet-LLH_shape_Sphericity", "shape features exist only for the original image"),
        ("tumour.wavelet-XYZ_glcm_Correlation", "wavelet-XYZ"),
    ],
)
def test_a_feature_pyradiomics_cannot_provide_is_named(phantom, name, message):
    image, regions = phantom
    with pytest.raises(FeatureExtractionError, match=message):
        extract_model_features(image, regions, [FeatureSpec.from_name(name)], SETTINGS)


def test_unknown_image_type_in_the_settings_is_named(phantom):
    image, regions = phantom
    settings = ExtractionSettings(INSTALLED, SETTINGS.settings, {"Original": {}, "Sobel": {}})
    with pytest.raises(FeatureExtractionError, match="'Sobel'"):
        extract_model_features(image, regions, SPECS[:1], settings)


def test_missing_empty_and_single_voxel_regions_are_mask_errors(phantom):
    image, regions = phantom
    ring_spec = [FeatureSpec.from_name("ring.original_firstorder_Mean")]
    with pytest.raises(MaskError, match="no mask given for the ring region"):
        extract_model_features(image, {"tumour": regions["tumour"]}, ring_spec, SETTINGS)

    empty = sitk.Image(regions["ring"].GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(regions["ring"])
    with pytest.raises(MaskError, match="ring region is empty"):
        extract_model_features(image, {"ring": empty}, ring_spec, SETTINGS)

    single = sitk.Image(empty)
    single[32, 32, 16] = 1
    with pytest.raises(MaskError, match="ring region unusable for pyradiomics: .*1 segmented voxel"):
        extract_model_features(image, {"ring": single}, ring_spec, SETTINGS)


def test_a_value_pyradiomics_cannot_compute_is_named():
    # A voxel at 1e308 HU overflows pyradiomics' moments: skewness becomes inf/inf = NaN.
    tumour = sphere_mask((30, 30, 20), (1.0, 1.0, 2.0), 6.0)
    values = sitk.GetArrayFromImage(textured_ct(tumour, seed=1)).astype(np.float64)
    values[tuple(np.argwhere(sitk.GetArrayFromImage(tumour))[0])] = 1e308
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(tumour)
    settings = ExtractionSettings(INSTALLED, {"binCount": 16, "label": 1}, {"Original": {}})
    spec = FeatureSpec.from_name("tumour.original_firstorder_Skewness")
    with (
        np.errstate(all="ignore"),
        pytest.raises(FeatureExtractionError, match=r"tumour.original_firstorder_Skewness is not finite \(nan\)"),
    ):
        extract_model_features(image, {"tumour": tumour}, [spec], settings)


def test_settings_with_another_label_are_rejected(phantom):
    image, regions = phantom
    settings = ExtractionSettings(INSTALLED, {**SETTINGS.settings, "label": 2}, SETTINGS.image_types)
    with pytest.raises(FeatureExtractionError, match="label 2"):
        extract_model_features(image, regions, SPECS[:1], settings)


def test_pinned_pyradiomics_version_must_be_installed(phantom):
    check_pyradiomics_version(SETTINGS)
    check_pyradiomics_version(ExtractionSettings("v" + INSTALLED, {}, {"Original": {}}))
    other = ExtractionSettings("3.0.1", SETTINGS.settings, SETTINGS.image_types)
    with pytest.raises(FeatureExtractionError, match=rf"pin pyradiomics 3\.0\.1 but pyradiomics {INSTALLED}"):
        check_pyradiomics_version(other)
    image, regions = phantom
    with pytest.raises(FeatureExtractionError, match="3.0.1"):
        extract_model_features(image, regions, SPECS[:1], other)


def test_settings_hash_is_stable_and_covers_everything():
    # A fixed value: caches keyed by it survive refactoring of the canonical form only on purpose.
    assert (
        settings_hash(
            ExtractionSettings(
                "3.1.4",
                {"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1},
                {"Original": {}, "Wavelet": {}, "LoG": {"sigma": [1.0, 2.0]}},
            )
        )
        == "821803a24d2ed52cc717bc6bdcececd38fbc511c2a51746a3f373fb81a7683ae"
    )

    base = settings_hash(SETTINGS)
    reordered = ExtractionSettings(
        "v" + INSTALLED,
        dict(reversed(list(SETTINGS.settings.items()))) | {"resampledPixelSpacing": (1.0, 1.0, 1.0)},
        dict(reversed(list(SETTINGS.image_types.items()))),
    )
    assert settings_hash(reordered) == base
    variants = [
        ExtractionSettings("3.0.1", SETTINGS.settings, SETTINGS.image_types),
        ExtractionSettings(INSTALLED, {**SETTINGS.settings, "binWidth": 20}, SETTINGS.image_types),
        ExtractionSettings(INSTALLED, SETTINGS.settings, {**SETTINGS.image_types, "LoG": {"sigma": [1.0]}}),
        ExtractionSettings(INSTALLED, SETTINGS.settings, SETTINGS.image_types, RingDefinition(3.0, 1.0)),
    ]
    hashes = {settings_hash(variant) for variant in variants}
    assert len(hashes) == len(variants) and base not in hashes


def test_settings_that_cannot_be_hashed_are_named():
    with pytest.raises(FeatureExtractionError, match="settings.binWidth"):
        settings_hash(ExtractionSettings(INSTALLED, {"binWidth": float("nan")}, {"Original": {}}))
    with pytest.raises(FeatureExtractionError, match="settings.weights"):
        settings_hash(ExtractionSettings(INSTALLED, {"weights": {1, 2}}, {"Original": {}}))


def test_pyradiomics_logs_only_warnings():
    assert logging.getLogger("radiomics").getEffectiveLevel() >= logging.WARNING


def test_model_features_on_a_single_region_need_no_ring(phantom, reference):
    image, regions = phantom
    tumour_specs = [spec for spec in SPECS if spec.region == "tumour"]
    ours = extract_model_features(image, {"tumour": regions["tumour"]}, tumour_specs, SETTINGS)
    assert_equal_to_reference(ours, tumour_specs, reference[0])
