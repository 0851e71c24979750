"""The peritumoral ring against analytic shapes, at isotropic and 5 mm slice spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from sclc_risk_node.scoring.errors import MaskError
from sclc_risk_node.scoring.ring import describe_ring, peritumoral_ring
from sclc_risk_node.scoring.types import RingDefinition
from tests.scoring.phantoms import (
    ellipsoid_distance_mm,
    ellipsoid_mask,
    image_centre_mm,
    mask_from_array,
    shell_volume_mm3,
    sphere_distance_mm,
    sphere_mask,
    voxel_centres_mm,
)

ISOTROPIC_1MM = ((56, 56, 56), (1.0, 1.0, 1.0))
ISOTROPIC_07MM = ((72, 72, 72), (0.7, 0.7, 0.7))
SLICES_5MM = ((72, 72, 14), (0.7, 0.7, 5.0))

# Sphere centres off the voxel grid; the z offsets (fractions of a slice)
# span the slice, since at 5 mm where a sphere sits between slices matters.
Z_PHASES = (-0.375, -0.125, 0.125, 0.375)


def sphere_case(grid, radius_mm, z_phase):
    size, spacing = grid
    centre = np.array(image_centre_mm(size, spacing)) + np.array([0.37, -0.23, z_phase]) * np.array(spacing)
    mask = sphere_mask(size, spacing, radius_mm, centre)
    return mask, sphere_distance_mm(size, spacing, radius_mm, centre)


def ring_of(mask, outward_mm=2.0, inward_mm=2.0):
    return sitk.GetArrayFromImage(peritumoral_ring(mask, RingDefinition(outward_mm, inward_mm))).astype(bool)


def volume_mm3(array, spacing):
    return float(array.sum()) * math.prod(spacing)


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("grid", [ISOTROPIC_1MM, ISOTROPIC_07MM], ids=["1mm", "0.7mm"])
@pytest.mark.parametrize("radius_mm", [8, 12, 20])
def test_ring_volume_matches_the_analytic_shell_on_isotropic_grids(grid, radius_mm):
    for z_phase in Z_PHASES[1:3]:
        mask, _ = sphere_case(grid, radius_mm, z_phase)
        error = volume_mm3(ring_of(mask), grid[1]) / shell_volume_mm3(radius_mm, 2, 2) - 1
        assert abs(error) <= 0.05, f"z phase {z_phase}: ring volume off by {error:+.1%}"


@pytest.mark.parametrize("radius_mm", [8, 12, 20])
def test_ring_volume_matches_the_analytic_shell_with_5mm_slices(radius_mm):
    # A 2 mm morphological radius is 0 voxels in z here; the ring must still be a 4 mm shell.
    for z_phase in Z_PHASES:
        mask, _ = sphere_case(SLICES_5MM, radius_mm, z_phase)
        error = volume_mm3(ring_of(mask), SLICES_5MM[1]) / shell_volume_mm3(radius_mm, 2, 2) - 1
        assert abs(error) <= 0.05, f"z phase {z_phase}: ring volume off by {error:+.1%}"


@pytest.mark.parametrize("grid", [ISOTROPIC_1MM, SLICES_5MM], ids=["1mm", "5mm-slices"])
@pytest.mark.parametrize("outward_mm, inward_mm", [(3.0, 1.0), (1.0, 3.0)])
def test_asymmetric_ring_volume_matches_the_analytic_shell(grid, outward_mm, inward_mm):
    for z_phase in Z_PHASES[::3]:
        mask, _ = sphere_case(grid, 12, z_phase)
        ring = ring_of(mask, outward_mm, inward_mm)
        error = volume_mm3(ring, grid[1]) / shell_volume_mm3(12, outward_mm, inward_mm) - 1
        assert abs(error) <= 0.05, f"z phase {z_phase}: ring volume off by {error:+.1%}"


@pytest.mark.parametrize("grid", [ISOTROPIC_07MM, SLICES_5MM], ids=["0.7mm", "5mm-slices"])
def test_ring_voxels_are_those_at_the_right_true_distance(grid):
    for z_phase in Z_PHASES[::3]:
        mask, distance = sphere_case(grid, 12, z_phase)
        ring = ring_of(mask, 3.0, 1.0)
        exact = (distance > -1.0) & (distance <= 3.0)
        assert dice(ring, exact) >= 0.95
        # Misclassified voxels sit at the shell's edges, not deep inside or far out.
        assert distance[ring].min() > -1.0 - 0.4
        assert distance[ring].max() <= 3.0 + 0.4


@pytest.mark.parametrize("grid", [ISOTROPIC_1MM, SLICES_5MM], ids=["1mm", "5mm-slices"])
@pytest.mark.parametrize("semi_axes_mm", [(14, 9, 11), (8, 12, 16)])
def test_ring_around_an_ellipsoid_matches_the_exact_distance_ring(grid, semi_axes_mm):
    size, spacing = grid
    size = (48, 48, 48) if spacing[2] == 1.0 else (72, 72, 12)
    centre = np.array(image_centre_mm(size, spacing)) + np.array([0.2, -0.1, -0.3]) * np.array(spacing)
    mask = ellipsoid_mask(size, spacing, semi_axes_mm, centre)
    distance = ellipsoid_distance_mm(size, spacing, semi_axes_mm, centre)
    ring = ring_of(mask)
    exact = (distance > -2.0) & (distance <= 2.0)
    assert dice(ring, exact) >= 0.95
    assert abs(ring.sum() / exact.sum() - 1) <= 0.05


@pytest.mark.parametrize("grid", [ISOTROPIC_1MM, SLICES_5MM], ids=["1mm", "5mm-slices"])
@pytest.mark.parametrize("outward_mm, inward_mm", [(2.0, 2.0), (3.0, 1.0)])
def test_ring_never_reaches_farther_than_outward_plus_a_voxel_diagonal(grid, outward_mm, inward_mm):
    size, spacing = grid
    mask = ellipsoid_mask(size, spacing, (13, 9, 15), np.array(image_centre_mm(size, spacing)) + 0.3)
    ring = ring_of(mask, outward_mm, inward_mm)
    tumour = sitk.GetArrayFromImage(mask).astype(bool)
    centres = np.stack([c.ravel() for c in voxel_centres_mm(size, spacing)], axis=1)
    to_tumour, _ = cKDTree(centres[tumour.ravel()]).query(centres[ring.ravel()])
    assert to_tumour.max() <= outward_mm + math.hypot(*spacing) + 1e-9


def test_one_sided_rings_stay_on_their_side_of_the_border():
    mask, _ = sphere_case(ISOTROPIC_1MM, 12, 0.125)
    tumour = sitk.GetArrayFromImage(mask).astype(bool)
    outside_only = ring_of(mask, 2.0, 0.0)
    inside_only = ring_of(mask, 0.0, 2.0)
    assert outside_only.any() and not (outside_only & tumour).any()
    assert inside_only.any() and not (inside_only & ~tumour).any()
    both = ring_of(mask, 2.0, 2.0)
    assert dice(both, outside_only | inside_only) >= 0.99


@pytest.mark.parametrize("gap_mm, reaches", [(1.0, True), (3.0, False)])
def test_with_5mm_slices_the_ring_enters_the_next_slice_only_if_the_tumour_ends_within_2mm_of_it(gap_mm, reaches):
    size, spacing = (60, 60, 12), (0.7, 0.7, 5.0)
    next_slice = 8
    centre = (
        image_centre_mm(size, spacing)[0] + 0.2,
        image_centre_mm(size, spacing)[1] - 0.1,
        next_slice * spacing[2] - gap_mm - 12.0,
    )
    mask = sphere_mask(size, spacing, 12.0, centre)
    assert not sitk.GetArrayViewFromImage(mask)[next_slice].any()
    ring = ring_of(mask)
    exact = np.abs(sphere_distance_mm(size, spacing, 12.0, centre)) <= 2.0
    if reaches:
        assert ring[next_slice].sum() == pytest.approx(exact[next_slice].sum(), rel=0.25)
    else:
        assert not ring[next_slice].any()
    assert not ring[next_slice + 1].any()


def test_tumour_cut_by_the_image_edge_gets_no_ring_along_the_cut():
    size, spacing = (40, 56, 56), (1.0, 1.0, 1.0)
    centre = (0.0, 27.7, 27.2)  # the sphere's centre lies on the first x plane
    mask = sphere_mask(size, spacing, 12.0, centre)
    ring = ring_of(mask)
    distance = sphere_distance_mm(size, spacing, 12.0, centre)
    cut_face = ring[:, :, 0]
    assert not cut_face[distance[:, :, 0] < -3.0].any()
    assert dice(ring, np.abs(distance) <= 2.0) >= 0.95


def test_output_is_a_uint8_mask_on_the_tumour_grid_whatever_its_orientation():
    size, spacing = (48, 48, 20), (0.8, 0.8, 2.5)
    plain = ellipsoid_mask(size, spacing, (12, 9, 14))
    oblique = sitk.Image(plain)
    angle = math.radians(30)
    oblique.SetDirection((math.cos(angle), -math.sin(angle), 0, math.sin(angle), math.cos(angle), 0, 0, 0, 1))
    oblique.SetOrigin((-120.5, 33.25, -410.0))
    ring = peritumoral_ring(oblique, RingDefinition())
    assert ring.GetPixelID() == sitk.sitkUInt8
    assert ring.GetSize() == oblique.GetSize()
    assert ring.GetSpacing() == oblique.GetSpacing()
    assert ring.GetOrigin() == oblique.GetOrigin()
    assert ring.GetDirection() == oblique.GetDirection()
    values = sitk.GetArrayFromImage(ring)
    assert set(np.unique(values).tolist()) == {0, 1}
    # Distances are physical, and a rotation does not change them.
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(peritumoral_ring(plain, RingDefinition())))


def test_tumour_of_a_single_voxel_still_gets_a_ring():
    tumour = np.zeros((20, 20, 20), dtype=bool)
    tumour[10, 10, 10] = True
    ring = ring_of(mask_from_array(tumour, (1.0, 1.0, 1.0)))
    assert ring[10, 10, 10]
    assert 30 <= ring.sum() <= 125  # a 2 mm shell around a 1 mm cube


def test_empty_tumour_mask_is_rejected():
    with pytest.raises(MaskError, match="empty"):
        peritumoral_ring(mask_from_array(np.zeros((10, 10, 10), dtype=bool), (1, 1, 1)), RingDefinition())


def test_tumour_filling_the_whole_image_has_no_border_and_so_no_ring():
    with pytest.raises(MaskError, match="ring is empty"):
        peritumoral_ring(mask_from_array(np.ones((8, 10, 10), dtype=bool), (1, 1, 1)), RingDefinition())


@pytest.mark.parametrize(
    "image, message",
    [
        (sitk.Image(10, 10, 10, sitk.sitkFloat32), "integer pixel type"),
        (sitk.Image(10, 10, sitk.sitkUInt8), "3-D"),
        (sitk.Image([10, 10, 10], sitk.sitkVectorUInt8, 2), "scalar"),
    ],
    ids=["float", "2d", "vector"],
)
def test_unusable_mask_images_are_rejected(image, message):
    with pytest.raises(MaskError, match=message):
        peritumoral_ring(image, RingDefinition())


def test_mask_with_other_labels_than_0_and_1_is_rejected():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[4:6, 4:6, 4:6] = 2
    image = sitk.GetImageFromArray(labels)
    with pytest.raises(MaskError, match="only 0 and 1"):
        peritumoral_ring(image, RingDefinition())


def test_unknown_ring_method_is_rejected():
    mask, _ = sphere_case(ISOTROPIC_1MM, 8, 0.0)
    with pytest.raises(MaskError, match="unknown ring method 'dilate-voxels'"):
        peritumoral_ring(mask, RingDefinition(2.0, 2.0, method="dilate-voxels"))


def test_describe_ring():
    assert describe_ring(RingDefinition(2.0, 2.0)) == (
        "2 mm outside to 2 mm inside the tumour border (signed-distance-mm)"
    )
    assert describe_ring(RingDefinition(3.5, 0.0)).startswith("3.5 mm outside to 0 mm inside")
