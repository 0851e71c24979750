"""The summary page (PDF + secondary capture) and the set of result objects."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pypdf
import pytest
import SimpleITK as sitk
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from sclc_risk_node.dicom_io.key_slice import find_key_slice
from sclc_risk_node.dicom_io.result_objects import OBJECT_KINDS, build_result_objects, check_kinds
from sclc_risk_node.dicom_io.sr_writer import DEMONSTRATION_NOTICE, derive_object_uids
from sclc_risk_node.dicom_io.summary import render_summary
from tests.dicom_io.test_sr_writer import (  # noqa: F401 - the module-scoped study fixture
    DCIODVFY,
    OUT_OF_DOMAIN,
    WHEN,
    _require,
    _run,
    make_clinical,
    make_model,
    make_result,
    study,
    write,
)


@pytest.fixture(scope="module")
def objects(study):
    ct, segment = study
    return build_result_objects(ct, segment, make_clinical(), make_result(), content_datetime=WHEN)


@pytest.fixture(scope="module")
def paths(objects, tmp_path_factory):
    folder = tmp_path_factory.mktemp("objects")
    return {kind: write(ds, folder / f"{kind}.dcm") for kind, ds in objects.items()}


def _pdf_text(pdf_bytes: bytes) -> tuple[int, str]:
    reader = pypdf.PdfReader(io.BytesIO(pdf_bytes))
    return len(reader.pages), " ".join(page.extract_text() for page in reader.pages)


def test_the_page_states_the_result_and_the_model(paths):
    pdf = pydicom.dcmread(paths["pdf"])
    document = bytes(pdf.EncapsulatedDocument)[: pdf.EncapsulatedDocumentLength]
    assert document.startswith(b"%PDF-")
    pages, text = _pdf_text(document)
    assert pages == 1
    for expected in (
        DEMONSTRATION_NOTICE.upper(),
        "HIGH RISK",
        "PFS 6 months: 61.8 %",
        "PFS 12 months: 27.2 %",
        "Applicability domain unknown",
        "Key slice",
        "largest tumour cross-section",
        "peritumoral ring",
        "risk score: radiomics_score  +0.621",
        "risk score: ecog  +0.222",
        "Model: zhao-integrated-cox 1.2.0",
        "ID SYNTH-0001",
    ):
        assert expected in text, expected


def test_out_of_domain_page_withholds_the_estimates(study):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    rendered = render_summary(ct, segment, make_result(applicability=OUT_OF_DOMAIN), key)
    _, text = _pdf_text(rendered.pdf)
    assert "NO RISK ESTIMATE" in text and "Outside the model's applicability domain" in text
    assert "PFS 6 months" not in text and "HIGH RISK" not in text
    assert "ring.wavelet-LLH_glcm_Correlation" in text  # the offending feature is named


def test_the_page_is_rendered_deterministically(study):
    ct, segment = study
    key = find_key_slice(ct, segment.mask)
    first = render_summary(ct, segment, make_result(), key)
    second = render_summary(ct, segment, make_result(), key)
    assert first.pdf == second.pdf  # no creation date: the same study gives the same PDF
    assert np.array_equal(first.rgb, second.rgb)


def test_secondary_capture_is_the_same_page_as_rgb(paths, objects, study):
    ct, segment = study
    sc = pydicom.dcmread(paths["sc"])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert (sc.Rows, sc.Columns) == (1169, 827)  # A4 at 100 dpi
    pixels = sc.pixel_array
    banner = pixels[5:60, 5:30].reshape(-1, 3)
    assert (banner == [0xD6, 0x27, 0x28]).all()  # the DEMO banner's red
    assert sc.BurnedInAnnotation == "YES"
    assert sc.PatientID == ct.headers[0].PatientID and sc.StudyInstanceUID == ct.study_instance_uid
    key = find_key_slice(ct, segment.mask)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == key.sop_instance_uid


def test_pdf_header_and_uids(paths, study):
    ct, segment = study
    pdf = pydicom.dcmread(paths["pdf"])
    assert pdf.SOPClassUID == EncapsulatedPDFStorage
    assert (pdf.Modality, pdf.MIMETypeOfEncapsulatedDocument, pdf.BurnedInAnnotation) == (
        "DOC",
        "application/pdf",
        "YES",
    )
    assert pdf.DocumentTitle == "SCLC progression risk summary (DEMO)"
    assert pdf.StudyInstanceUID == ct.study_instance_uid
    uids = {
        kind: derive_object_uids(kind, ct.series_instance_uid, segment.segmentation.SOPInstanceUID, make_model().sha256)
        for kind in (*OBJECT_KINDS, "sr-roi")
    }
    assert (pdf.SeriesInstanceUID, pdf.SOPInstanceUID) == uids["pdf"]
    # Distinct UIDs per object; the ROI SR's instance lives in the risk SR's series.
    assert len({uids[kind][1] for kind in uids}) == len(uids)
    assert len({uids[kind][0] for kind in OBJECT_KINDS}) == len(OBJECT_KINDS)


def test_objects_can_be_chosen(study):
    ct, segment = study
    only = build_result_objects(ct, segment, make_clinical(), make_result(), kinds=["kos", "sr"])
    assert list(only) == ["sr", "sr-roi", "kos"]
    with pytest.raises(ValueError, match="unknown object kind.*html"):
        check_kinds(["sr", "html"])


@pytest.mark.external
@pytest.mark.parametrize("kind", ["pdf", "sc"])
def test_dciodvfy_reports_no_errors_on_pdf_and_sc(paths, kind):
    _require(DCIODVFY)
    run = _run([DCIODVFY, "-new", paths[kind]])
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    assert [line for line in lines if line.startswith("Warning")] == []


def test_a_slice_of_a_temporary_image_outlives_the_image():
    """The page draws the ring from a temporary image: its slice must not be a view of freed memory.

    A view of a freed SimpleITK image read garbage, or crashed the scoring worker with SIGSEGV once
    the image was large enough for its buffer to be unmapped.
    """
    from sclc_risk_node.dicom_io.summary import _slice_array

    ring_slice = _slice_array(sitk.Image([512, 512, 40], sitk.sitkUInt8) + 1, 20)
    assert ring_slice.flags.owndata
    _reuse_the_freed_memory = [np.zeros(10**6) + 2 for _ in range(20)]
    assert ring_slice.shape == (512, 512) and int(ring_slice.min()) == int(ring_slice.max()) == 1
