"""The risk SR when the tumour came as an RT Structure Set: the RTSTRUCT is the cited source, its contours the ROI."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest

from sclc_risk_node.dicom_io.rtstruct import read_tumour_rtstruct
from sclc_risk_node.dicom_io.sr_writer import build_key_slice_roi_sr, build_risk_sr, derive_sr_uids
from tests.dicom_io.test_sr_writer import (
    DCIODVFY,
    PIXELMED_ITEMS_NOT_IN_TEMPLATE,
    WHEN,
    _require,
    _run,
    make_clinical,
    make_result,
    run_pixelmed_sr_validator,
    study,  # noqa: F401 (fixture)
    write,
)
from tests.rtstruct_builder import build_rtstruct, contours_from_mask

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


@pytest.fixture(scope="module")
def structure(study):  # noqa: F811
    ct, segment = study
    # The fixture's CT headers have no pixel data; the builder needs only their UIDs and geometry.
    rtstruct = build_rtstruct(list(ct.headers), contours_from_mask(segment.mask), roi_name="GTV_primary")
    return ct, read_tumour_rtstruct(rtstruct, ct)


@pytest.fixture(scope="module")
def rtstruct_sr_path(structure, tmp_path_factory):
    ct, tumour = structure
    sr = build_risk_sr(ct, tumour, make_clinical(), make_result(), content_datetime=WHEN)
    return write(sr, tmp_path_factory.mktemp("sr") / "SR.dcm")


def test_the_sr_cites_the_rtstruct_and_carries_its_contours(structure, rtstruct_sr_path):
    ct, tumour = structure
    sr = hd.sr.srread(rtstruct_sr_path)
    evidence = {
        str(ref.ReferencedSOPInstanceUID): str(ref.ReferencedSOPClassUID)
        for study_ref in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_ref.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence[tumour.sop_instance_uid] == RT_STRUCTURE_SET_STORAGE
    assert len(evidence) == len(ct.headers) + 1
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is None
    surface = group.roi
    assert surface is not None and surface.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
    polygons = surface.graphic_data
    assert len(polygons) == len(tumour.contours_mm)
    first = np.asarray(polygons[0])
    assert np.allclose(first[0], first[-1]) and np.allclose(first[:-1], tumour.contours_mm[0], atol=1e-3)
    assert surface.frame_of_reference_uid == ct.frame_of_reference_uid
    contour_slices = {
        int(round(ct.image.TransformPhysicalPointToContinuousIndex(tuple(c[0]))[2])) for c in tumour.contours_mm
    }
    assert {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in surface.source_images_for_segmentation
    } == {str(ct.headers[k].SOPInstanceUID) for k in contour_slices}
    assert group.tracking_identifier == "GTV_primary: progression risk (DEMO)"
    # The SR UIDs follow the RTSTRUCT instance as they follow a SEG.
    series_uid, sop_uid = derive_sr_uids(ct.series_instance_uid, tumour.sop_instance_uid, make_result().model.sha256)
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (series_uid, sop_uid)


def test_the_key_slice_roi_sr_is_built_for_an_rtstruct_too(structure):
    from sclc_risk_node.dicom_io.key_slice import find_key_slice

    ct, tumour = structure
    roi_sr = build_key_slice_roi_sr(ct, tumour, make_result(), find_key_slice(ct, tumour.mask), content_datetime=WHEN)
    assert roi_sr.SOPInstanceUID != derive_sr_uids(ct.series_instance_uid, tumour.sop_instance_uid, "3f" * 32)[1]


@pytest.mark.external
def test_dciodvfy_reports_no_errors(rtstruct_sr_path):
    _require(DCIODVFY)
    run = _run([DCIODVFY, "-new", rtstruct_sr_path])
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []


@pytest.mark.external
def test_pixelmed_finds_no_template_errors(rtstruct_sr_path):
    lines = run_pixelmed_sr_validator(rtstruct_sr_path)
    assert "IOD validation complete" in lines
    assert [line for line in lines if line.startswith("Error")] == [], "\n".join(lines[-40:])
    assert not [
        line
        for line in lines
        if "Content Item not in template" in line and not any(item in line for item in PIXELMED_ITEMS_NOT_IN_TEMPLATE)
    ]
    # Unlike the SEG's SR, not even the "Source Series for Segmentation" code-meaning warning.
    assert [line for line in lines if line.startswith("Warning") and "not in template" not in line] == []
