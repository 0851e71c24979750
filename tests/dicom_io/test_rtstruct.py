"""read_tumour_rtstruct on real RTSTRUCT files over real CT files, checked against highdicom SEGs of the same shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.rtstruct import read_tumour_rtstruct
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.dicom_io.synthetic import (
    SyntheticPatient,
    build_tumour_seg,
    ct_datasets_from_image,
    synthetic_chest_phantom,
    write_datasets,
)
from sclc_risk_node.scoring.errors import MaskError
from tests.rtstruct_builder import build_rtstruct, contours_from_mask, save

#: RTSTRUCT and SEG of one shape agree at least this well (the stated tolerance, docs/conformance-statement.md).
MIN_DICE = 0.98


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def make_study(folder: Path, direction=None):
    image, mask = synthetic_chest_phantom(
        size=(48, 40, 12), spacing_mm=(0.8, 0.7, 2.5), tumour_radii_mm=(9.0, 8.0, 8.0)
    )
    if direction is not None:
        image.SetDirection(direction)
        mask.SetDirection(direction)
    datasets = ct_datasets_from_image(image, SyntheticPatient())
    write_datasets(datasets, folder)
    return read_ct_series(folder), datasets, mask


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("ct"))


def seg_mask(ct, datasets, mask_array, folder: Path) -> np.ndarray:
    path = folder / "seg.dcm"
    build_tumour_seg(datasets, mask_array).save_as(path, enforce_file_format=True)
    return sitk.GetArrayFromImage(read_tumour_segment(path, ct).mask)


def test_contours_traced_from_a_mask_rasterise_like_its_seg(study, tmp_path):
    ct, datasets, mask = study
    path = save(build_rtstruct(datasets, contours_from_mask(mask)), tmp_path / "rs.dcm")
    structure = read_tumour_rtstruct(path, ct)
    result = sitk.GetArrayFromImage(structure.mask)
    assert structure.roi_name == "GTV" and structure.roi_number == 1 and structure.source_path == path
    assert structure.mask.GetSize() == ct.image.GetSize() and structure.mask.GetOrigin() == ct.image.GetOrigin()
    reference = seg_mask(ct, datasets, sitk.GetArrayFromImage(mask), tmp_path)
    assert reference.sum() > 100
    assert dice(result, reference) >= MIN_DICE


def test_an_analytic_sphere_as_polygons_matches_the_voxelised_sphere_seg(study, tmp_path):
    ct, datasets, _ = study
    image = ct.image
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((23.3, 19.6, 5.2)))
    radius_mm = 9.0
    # The SEG: voxel centres within the sphere.
    nx, ny, nz = image.GetSize()
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    points = np.array(
        [
            image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
            for i, j, k in zip(ii.ravel(), jj.ravel(), kk.ravel())
        ]
    )
    voxelised = (np.linalg.norm(points - centre, axis=1) <= radius_mm).reshape(nz, ny, nx).astype(np.uint8)
    # The RTSTRUCT: each slice's circle as a 90-gon.
    contours = {}
    for k in range(nz):
        z = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        r2 = radius_mm**2 - (z - centre[2]) ** 2
        if r2 <= 0:
            continue
        angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        circle = np.column_stack(
            [
                centre[0] + np.sqrt(r2) * np.cos(angles),
                centre[1] + np.sqrt(r2) * np.sin(angles),
                np.full(angles.shape, z),
            ]
        )
        contours[k] = [circle]
    structure = read_tumour_rtstruct(save(build_rtstruct(datasets, contours), tmp_path / "rs.dcm"), ct)
    reference = seg_mask(ct, datasets, voxelised, tmp_path)
    assert dice(sitk.GetArrayFromImage(structure.mask), reference) >= MIN_DICE


def test_oblique_ct_grid(tmp_path):
    angle = np.deg2rad(20)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    ct, datasets, mask = make_study(tmp_path / "ct", direction)
    structure = read_tumour_rtstruct(save(build_rtstruct(datasets, contours_from_mask(mask)), tmp_path / "rs.dcm"), ct)
    assert dice(sitk.GetArrayFromImage(structure.mask), sitk.GetArrayFromImage(mask)) >= MIN_DICE


def test_the_tumour_roi_is_chosen_by_name_then_by_interpreted_type(study, tmp_path):
    ct, datasets, mask = study
    contours = contours_from_mask(mask)
    one_slice = {k: v for k, v in contours.items() if k == min(contours)}
    others = [("GTVn", "GTV", one_slice), ("Lung_L", "ORGAN", contours), ("PTV", "PTV", contours)]
    structure = read_tumour_rtstruct(build_rtstruct(datasets, contours, roi_name="GTVp", extra_rois=others), ct)
    assert structure.roi_name == "GTVp"
    # No GTV-like name: the single ROI of interpreted type TUMOR.
    structure = read_tumour_rtstruct(
        build_rtstruct(
            datasets,
            contours,
            roi_name="Primary lesion",
            interpreted_type="TUMOR",
            extra_rois=[("Lung_L", "ORGAN", contours)],
        ),
        ct,
    )
    assert structure.roi_name == "Primary lesion"
    # Two GTV-like names: refused, listing them; a name (or a pattern) settles it.
    ambiguous = build_rtstruct(datasets, contours, roi_name="GTV", extra_rois=[("GTV_primary", "GTV", one_slice)])
    with pytest.raises(
        DicomInputError,
        match=r"has 2 ROIs whose name matches the tumour pattern: 1 'GTV' \(GTV\), 2 'GTV_primary' \(GTV\); choose one by name",
    ):
        read_tumour_rtstruct(ambiguous, ct)
    assert read_tumour_rtstruct(ambiguous, ct, roi_name="gtv_primary").roi_number == 2
    assert read_tumour_rtstruct(ambiguous, ct, roi_name_pattern=r"primary").roi_number == 2
    with pytest.raises(DicomInputError, match=r"has no ROI named like .* ROIs: 1 'Lung_L' \(ORGAN\)"):
        read_tumour_rtstruct(build_rtstruct(datasets, contours, roi_name="Lung_L", interpreted_type="ORGAN"), ct)


def test_an_inner_contour_is_a_hole(study):
    ct, datasets, _ = study
    image = ct.image

    def square(k, half_mm):
        centre = np.array(image.TransformContinuousIndexToPhysicalPoint((24.0, 20.0, float(k))))
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return np.array([centre + [dx * half_mm, dy * half_mm, 0] for dx, dy in corners])

    structure = read_tumour_rtstruct(build_rtstruct(datasets, {6: [square(6, 8.0), square(6, 3.0)]}), ct)
    array = sitk.GetArrayFromImage(structure.mask)
    assert array[6, 20, 24] == 0  # the hole's centre
    assert array[6, 20, 24 + 8] == 1  # between the squares (8 columns × 0.8 mm = 6.4 mm from the centre)
    assert array[:6].sum() == 0 and array[7:].sum() == 0


def test_an_rtstruct_of_another_frame_of_reference_or_off_slice_contours_are_refused(study):
    ct, datasets, mask = study
    contours = contours_from_mask(mask)
    other = build_rtstruct(datasets, contours)
    other.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(DicomInputError, match=r"ROI 1 'GTV' is in frame of reference 1\.2\.3\.4, but CT series"):
        read_tumour_rtstruct(other, ct)
    shifted = {k: [loop + [0, 0, 1.0] for loop in loops] for k, loops in contours.items()}  # 1 mm off a 2.5 mm grid
    with pytest.raises(DicomInputError, match=r"contour 1 does not lie in a CT slice plane"):
        read_tumour_rtstruct(build_rtstruct(datasets, shifted), ct)


def test_a_seg_given_as_rtstruct_and_an_empty_roi(study, tmp_path):
    ct, datasets, mask = study
    seg_path = tmp_path / "seg.dcm"
    build_tumour_seg(datasets, sitk.GetArrayFromImage(mask)).save_as(seg_path, enforce_file_format=True)
    with pytest.raises(
        DicomInputError, match=r"seg.dcm is not an RT Structure Set \(Segmentation Storage, modality SEG\)"
    ):
        read_tumour_rtstruct(seg_path, ct)
    tiny = build_rtstruct(datasets, {})
    with pytest.raises(DicomInputError, match="has no contours"):
        read_tumour_rtstruct(tiny, ct)
    image = ct.image
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint((24.0, 20.0, 6.0)))
    between_centres = [centre + d for d in ([0.1, 0.1, 0], [0.3, 0.1, 0], [0.3, 0.3, 0])]
    with pytest.raises(MaskError, match="fills no voxel"):
        read_tumour_rtstruct(build_rtstruct(datasets, {6: [np.array(between_centres)]}), ct)
