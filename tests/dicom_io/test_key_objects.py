"""The key slice, its ROI in the SR (TID 1410), and the Key Object Selection document."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import KeyObjectSelectionDocumentStorage

from sclc_risk_node.dicom_io.key_objects import build_key_object_selection
from sclc_risk_node.dicom_io.key_slice import find_key_slice, mask_outlines_px
from sclc_risk_node.dicom_io.sr_writer import (
    DEMONSTRATION_NOTICE,
    build_key_slice_roi_sr,
    build_risk_sr,
    derive_object_uids,
    derive_sr_uids,
    read_risk_sr,
)
from tests.dicom_io.test_sr_writer import (  # noqa: F401 - the module-scoped study fixture
    DCIODVFY,
    OUT_OF_DOMAIN,
    WHEN,
    _require,
    _run,
    make_clinical,
    make_result,
    study,
    write,
)


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def test_outline_of_a_square_runs_between_pixel_centres_in_scoord_coordinates():
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:6, 3:8] = 1  # rows 2..5, columns 3..7
    [outline] = mask_outlines_px(mask)
    assert np.array_equal(outline[0], outline[-1])  # closed
    # Pixel (c, r) has its centre at (c + .5, r + .5); the 0.5 iso-line runs midway between the centres
    # of tumour and background pixels, i.e. on the pixel edges: columns 3..7 -> x from 3 to 8.
    assert outline[:, 0].min() == pytest.approx(3.0) and outline[:, 0].max() == pytest.approx(8.0)
    assert outline[:, 1].min() == pytest.approx(2.0) and outline[:, 1].max() == pytest.approx(6.0)


def test_two_islands_give_two_outlines_largest_first():
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[1:3, 1:3] = 1
    mask[8:16, 8:16] = 1
    outlines = mask_outlines_px(mask)
    assert len(outlines) == 2
    assert _polygon_area(outlines[0]) > _polygon_area(outlines[1])


def test_key_slice_is_the_largest_cross_section(study):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    array = sitk.GetArrayFromImage(segment.mask)
    areas = array.reshape(array.shape[0], -1).sum(axis=1)
    assert areas[key.index] == areas.max() > 0
    assert key.header.SOPInstanceUID == ct.headers[key.index].SOPInstanceUID
    spacing = segment.mask.GetSpacing()
    assert key.area_mm2 == pytest.approx(areas.max() * spacing[0] * spacing[1])
    # The outline encloses about the tumour's pixel area (marching squares cuts the corners).
    assert _polygon_area(key.outlines_px[0]) == pytest.approx(areas.max(), rel=0.15)


def test_empty_mask_has_no_key_slice(study):
    ct, segment = study
    empty = sitk.Image(segment.mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(segment.mask)
    with pytest.raises(ValueError, match="mask is empty"):
        find_key_slice(ct, empty)


@pytest.fixture(scope="module")
def sr_path(study, tmp_path_factory):
    ct, segment = study
    return write(
        build_risk_sr(ct, segment, make_clinical(), make_result(), content_datetime=WHEN),
        tmp_path_factory.mktemp("sr") / "SR.dcm",
    )


@pytest.fixture(scope="module")
def roi_sr_path(study, tmp_path_factory):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    return write(
        build_key_slice_roi_sr(ct, segment, make_result(), key, content_datetime=WHEN),
        tmp_path_factory.mktemp("sr") / "ROI.dcm",
    )


def test_roi_sr_draws_the_outline_on_the_key_slice_and_labels_it(study, roi_sr_path, sr_path):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    roi = pydicom.dcmread(roi_sr_path)
    series_uid, sr_uid = derive_sr_uids(
        ct.series_instance_uid, segment.segmentation.SOPInstanceUID, make_result().model.sha256
    )
    assert roi.SeriesInstanceUID == series_uid and roi.SOPInstanceUID != sr_uid and roi.InstanceNumber == 2
    assert roi.ConceptNameCodeSequence[0].CodeValue == "126000"  # OHIF loads TID 1500 only
    sr = hd.sr.srread(roi_sr_path)
    [planar] = sr.content.get_planar_roi_measurement_groups()
    region = planar.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(region.value, key.outlines_px[0], atol=1e-4)  # FL
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key.sop_instance_uid
    assert planar.tracking_identifier == "Tumour: High risk (DEMO)"  # OHIF's label
    assert planar.tracking_uid  # OHIF needs it
    labels = {m.name.meaning: (m.value, m.unit.value) for m in planar.get_measurements()}
    assert labels["Progression-free survival at 6 months"] == (61.8, "%")
    assert labels["Progression-free survival at 12 months"] == (27.2, "%")
    assert labels["Area"][1] == "mm2"
    # OHIF shows NUM names, never the CODE risk group: the group and DEMO are in the score's name.
    assert labels["High progression risk (DEMO model), risk score"] == (round(make_result().risk_score, 3), "1")
    assert [site.value.value for site in planar.finding_sites] == ["39607008"]
    # Both SRs' Image Library hold exactly the key slice (not one entry per CT slice).
    for path in (roi_sr_path, sr_path):
        library = [
            i for i in pydicom.dcmread(path).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"
        ]
        refs = [
            image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for group in library[0].ContentSequence
            for image in group.ContentSequence
        ]
        assert refs == [key.sop_instance_uid]
    assert read_risk_sr(pydicom.dcmread(sr_path)).key_slice_sop_instance_uid is None  # the ROI is its own SR


def test_out_of_domain_roi_carries_no_estimates(study, tmp_path):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    path = write(
        build_key_slice_roi_sr(ct, segment, make_result(applicability=OUT_OF_DOMAIN), key), tmp_path / "ROI.dcm"
    )
    [planar] = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert planar.tracking_identifier == "Tumour: outside applicability domain (DEMO)"
    # No risk score, group or PFS; OHIF's label says why instead.
    labels = {m.name.meaning: m.value for m in planar.get_measurements()}
    assert labels.keys() == {"Outside applicability domain: features out of range", "Area"}
    assert labels["Outside applicability domain: features out of range"] == len(OUT_OF_DOMAIN.violations)


@pytest.fixture(scope="module")
def kos_path(study, tmp_path_factory):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    kos = build_key_object_selection(ct, segment, make_result(), key)
    return write(kos, tmp_path_factory.mktemp("kos") / "KOS.dcm")


def test_kos_flags_the_key_slice_with_the_result(study, kos_path):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    kos = pydicom.dcmread(kos_path)
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert (kos.StudyInstanceUID, kos.PatientID) == (ct.study_instance_uid, ct.headers[0].PatientID)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = [
        ref.ReferencedSOPInstanceUID
        for study_item in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert referenced == [key.sop_instance_uid]
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [key.sop_instance_uid]
    [description] = [
        str(i.TextValue) for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert description.startswith(f"Key slice {key.index + 1} of {len(ct.headers)} (largest tumour cross-section")
    assert "High risk" in description and DEMONSTRATION_NOTICE in description
    series_uid, sop_uid = derive_object_uids(
        "kos", ct.series_instance_uid, segment.segmentation.SOPInstanceUID, make_result().model.sha256
    )
    assert (kos.SeriesInstanceUID, kos.SOPInstanceUID) == (series_uid, sop_uid)
    assert sop_uid not in derive_object_uids(
        "sr", ct.series_instance_uid, segment.segmentation.SOPInstanceUID, make_result().model.sha256
    )


@pytest.mark.external
@pytest.mark.parametrize("which", ["roi_sr_path", "kos_path"])
def test_dciodvfy_reports_no_errors_on_roi_sr_and_kos(which, request):
    _require(DCIODVFY)
    path = request.getfixturevalue(which)
    run = _run([DCIODVFY, "-new", path])
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    assert all("99SCLCRN" in line for line in lines if line.startswith("Warning"))


@pytest.mark.external
@pytest.mark.slow
def test_pixelmed_finds_no_template_errors_in_the_roi_sr(roi_sr_path):
    from tests.dicom_io.test_sr_writer import run_pixelmed_sr_validator

    lines = run_pixelmed_sr_validator(roi_sr_path)
    assert "IOD validation complete" in lines
    assert "Found Root Template TID_1500 (MeasurementReport)" in lines
    assert [line for line in lines if line.startswith("Error")] == []
