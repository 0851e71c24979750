"""The simulated chest CT phantom: anatomy where expected, tumour volume as asked, clinical spacings, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from sclc_risk_node.scoring.training.chest_phantom import (
    IN_PLANE_SPACING_RANGE_MM,
    SLICE_THICKNESSES_MM,
    chest_ct_phantom,
)


def arrays(image: sitk.Image, mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    return sitk.GetArrayFromImage(image).astype(float), sitk.GetArrayFromImage(mask).astype(bool)


@pytest.fixture(scope="module")
def central():
    # Seed 3 draws a hilar-mediastinal tumour (checked below); radius 20 mm = 33.5 ml.
    return chest_ct_phantom(radius_mm=20.0, texture_hu=30.0, halo_hu=0.0, seed=3)


def test_tissue_classes_of_a_chest_ct_are_present_in_their_hu_ranges(central):
    image, mask, layout = central
    hu, tumour = arrays(image, mask)
    assert layout.location == "central"
    outside = hu[~tumour]
    share = lambda low, high: float(np.mean((outside >= low) & (outside < high)))  # noqa: E731
    assert share(-950, -700) > 0.15, "lung parenchyma"
    assert share(-1024, -950) > 0.002, "air (airways, or outside the body)"
    assert share(-150, -50) > 0.02, "fat (mediastinal, subcutaneous)"
    assert share(10, 80) > 0.05, "soft tissue and blood (muscle, vessels, heart, mediastinum)"
    assert share(200, 1200) > 0.002, "bone (ribs, vertebra)"
    lung = outside[(outside > -950) & (outside < -700)]
    assert -880 < np.median(lung) < -800


def test_lung_holds_branching_vessels_and_the_noise_is_correlated(central):
    image, mask, _ = central
    hu, tumour = arrays(image, mask)
    from scipy import ndimage

    vessel_like = (hu > -300) & (hu < 150) & ~tumour
    labelled, count = ndimage.label(vessel_like)
    assert count > 20  # many separate soft-tissue structures, not one blob
    # Correlated noise: neighbouring voxels of a flat region are far from independent.
    flat = hu[hu.shape[0] // 2]
    diff = np.diff(flat, axis=1)
    region = (np.abs(flat[:, :-1] - 40) < 80) & (np.abs(diff) < 200)
    if region.sum() > 500:
        a, b = flat[:, :-1][region], flat[:, 1:][region]
        assert np.corrcoef(a, b)[0, 1] > 0.2


@pytest.mark.parametrize("radius_mm", [6.0, 14.0, 28.0])
def test_tumour_volume_matches_the_requested_equivalent_radius(radius_mm):
    image, mask, layout = chest_ct_phantom(radius_mm=radius_mm, texture_hu=40.0, seed=int(radius_mm))
    _, tumour = arrays(image, mask)
    spacing = image.GetSpacing()
    volume_ml = tumour.sum() * np.prod(spacing) / 1000.0
    requested_ml = 4 / 3 * math.pi * radius_mm**3 / 1000.0
    assert volume_ml == pytest.approx(requested_ml, rel=0.15 if radius_mm > 10 else 0.3)
    assert layout.tumour_volume_ml == pytest.approx(volume_ml)
    hu, tumour = arrays(image, mask)
    # A solid core of soft tissue; the border may be part-solid and partial-volumed with lung.
    assert -50 < np.percentile(hu[tumour], 90) < 200 and hu[tumour].mean() > -300
    # Lobulated, not an ellipsoid: a 1-voxel-shell of the mask is irregular.
    assert tumour.any(axis=(1, 2)).sum() >= 2


def test_spacings_are_a_mix_of_clinical_reconstructions():
    drawn = [chest_ct_phantom(radius_mm=6.0, seed=seed)[2] for seed in range(12)]
    thicknesses = {layout.slice_thickness_mm for layout in drawn}
    assert thicknesses <= set(SLICE_THICKNESSES_MM) and len(thicknesses) >= 3
    assert all(IN_PLANE_SPACING_RANGE_MM[0] <= d.in_plane_spacing_mm <= IN_PLANE_SPACING_RANGE_MM[1] for d in drawn)
    assert len({d.location for d in drawn}) >= 2


def test_the_same_seed_gives_the_same_phantom_and_another_seed_another():
    first = chest_ct_phantom(radius_mm=9.0, texture_hu=50.0, halo_hu=100.0, seed=42)
    again = chest_ct_phantom(radius_mm=9.0, texture_hu=50.0, halo_hu=100.0, seed=42)
    other = chest_ct_phantom(radius_mm=9.0, texture_hu=50.0, halo_hu=100.0, seed=43)
    np.testing.assert_array_equal(*(sitk.GetArrayFromImage(x[0]) for x in (first, again)))
    np.testing.assert_array_equal(*(sitk.GetArrayFromImage(x[1]) for x in (first, again)))
    assert first[0].GetSpacing() == again[0].GetSpacing() and first[0].GetOrigin() == again[0].GetOrigin()
    assert first[2] == again[2] and first[2] != other[2]


def test_the_halo_raises_the_lung_next_to_the_tumour_only():
    plain = chest_ct_phantom(radius_mm=10.0, texture_hu=20.0, halo_hu=0.0, seed=8)
    halo = chest_ct_phantom(radius_mm=10.0, texture_hu=20.0, halo_hu=300.0, seed=8)
    difference = sitk.GetArrayFromImage(halo[0]).astype(float) - sitk.GetArrayFromImage(plain[0])
    tumour = sitk.GetArrayFromImage(plain[1]).astype(bool)
    from scipy import ndimage

    # The point-spread function carries the halo a little into the border voxels; the core is untouched.
    core = ndimage.binary_erosion(tumour, structure=np.ones((3, 7, 7)))
    assert core.sum() > 20 and np.abs(difference[core]).max() < 1.0
    assert difference.max() > 100

    far = ~ndimage.binary_dilation(tumour, iterations=8)
    assert np.abs(difference[far]).max() < 1.0


def test_bad_arguments_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="radius_mm"):
        chest_ct_phantom(radius_mm=0.0)
