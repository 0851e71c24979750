"""read_tumour_segment on real SEG files built with highdicom over real CT files."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.dicom_io.synthetic import (
    SyntheticPatient,
    build_tumour_seg,
    ct_datasets_from_image,
    synthetic_chest_phantom,
    tumour_segment_description,
    write_datasets,
)
from sclc_risk_node.scoring.errors import MaskError

PATIENT = SyntheticPatient()


@dataclass(frozen=True)
class Study:
    ct: CtSeries
    datasets: list[Dataset]
    mask: np.ndarray  # z, y, x on the CT grid
    image: sitk.Image


def write_and_read_study(folder: Path, direction: tuple[float, ...] | None = None) -> Study:
    image, mask = synthetic_chest_phantom(
        size=(48, 40, 12), spacing_mm=(0.8, 0.7, 2.5), tumour_radii_mm=(9.0, 8.0, 8.0)
    )
    if direction is not None:
        image.SetDirection(direction)
    datasets = ct_datasets_from_image(image, PATIENT)
    write_datasets(datasets, folder)
    return Study(read_ct_series(folder), datasets, sitk.GetArrayFromImage(mask), image)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    return write_and_read_study(tmp_path_factory.mktemp("ct"))


def save(seg: Dataset, folder: Path, name: str = "seg.dcm") -> Path:
    path = folder / name
    seg.save_as(path, enforce_file_format=True)
    return path


def without_source_references(seg: Dataset) -> Dataset:
    """The same SEG tied to the CT only by its FrameOfReferenceUID and frame positions."""
    stripped = copy.deepcopy(seg)
    for frame in stripped.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in frame:
            del frame.DerivationImageSequence
    for keyword in ("SourceImageSequence", "ReferencedSeriesSequence"):
        if keyword in stripped:
            delattr(stripped, keyword)
    return stripped


def segmentation(
    datasets: list[Dataset],
    pixel_array: np.ndarray,
    *,
    segmentation_type: str = "BINARY",
    segment_descriptions: list[hd.seg.SegmentDescription] | None = None,
    omit_empty_frames: bool = True,
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=segment_descriptions or [tumour_segment_description()],
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=omit_empty_frames,
    )


def refusal(seg, ct: CtSeries, error: type[Exception] = DicomInputError, **kwargs) -> str:
    with pytest.raises(error) as caught:
        read_tumour_segment(seg, ct, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for identifier in (PATIENT.patient_name, PATIENT.patient_id, PATIENT.patient_birth_date):
        assert identifier not in message
    return message


def assert_mask_on_ct_grid(segment, ct: CtSeries, expected: np.ndarray) -> None:
    mask = segment.mask
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == ct.image.GetSize()
    assert mask.GetOrigin() == ct.image.GetOrigin()
    assert mask.GetSpacing() == ct.image.GetSpacing()
    assert mask.GetDirection() == ct.image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected.astype(np.uint8))


def fraction_map(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fractions around 0.5 on both sides, and the mask they must threshold to."""
    rng = np.random.default_rng(3)
    fractions = np.where(mask > 0, rng.choice([0.45, 0.55, 0.9], mask.shape), 0.0)
    fractions[0, :5, :5] = 0.3  # below threshold outside the tumour: still background
    return fractions.astype(np.float32), fractions >= 0.5


# --- reading -----------------------------------------------------------------------------


def test_binary_seg_referencing_ct_instances(study, tmp_path):
    path = save(build_tumour_seg(study.datasets, study.mask), tmp_path)

    segment = read_tumour_segment(path, study.ct)

    assert_mask_on_ct_grid(segment, study.ct, study.mask)
    assert (segment.segment_number, segment.segment_label) == (1, "Tumour")
    assert segment.source_path == path
    assert isinstance(segment.segmentation, hd.seg.Segmentation)


def test_seg_given_as_dataset_is_read_without_changing_it(study, tmp_path):
    dataset = pydicom.dcmread(save(build_tumour_seg(study.datasets, study.mask), tmp_path))

    segment = read_tumour_segment(dataset, study.ct)

    assert_mask_on_ct_grid(segment, study.ct, study.mask)
    assert segment.source_path is None
    assert type(dataset) is pydicom.FileDataset


def test_fractional_seg_is_thresholded_at_half_the_maximum(study, tmp_path):
    fractions, expected = fraction_map(study.mask)
    path = save(build_tumour_seg(study.datasets, fractions, fractional=True), tmp_path)

    segment = read_tumour_segment(path, study.ct)

    assert_mask_on_ct_grid(segment, study.ct, expected)
    assert 0 < expected.sum() < study.mask.sum()


@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_seg_sharing_only_the_frame_of_reference_is_placed_by_position(study, fractional, tmp_path):
    fractions, expected = fraction_map(study.mask)
    seg = build_tumour_seg(study.datasets, fractions if fractional else study.mask, fractional=fractional)
    stripped = without_source_references(seg)
    assert "ReferencedSeriesSequence" not in stripped
    assert all("DerivationImageSequence" not in f for f in stripped.PerFrameFunctionalGroupsSequence)

    segment = read_tumour_segment(save(stripped, tmp_path), study.ct)

    assert_mask_on_ct_grid(segment, study.ct, expected if fractional else study.mask)


@pytest.mark.parametrize("references", [True, False], ids=["referenced", "frame-of-reference-only"])
def test_seg_with_empty_frames_omitted(study, references, tmp_path):
    seg = segmentation(study.datasets, study.mask)
    assert seg.NumberOfFrames == int(study.mask.any(axis=(1, 2)).sum()) < 12
    if not references:
        seg = without_source_references(seg)

    assert_mask_on_ct_grid(read_tumour_segment(save(seg, tmp_path), study.ct), study.ct, study.mask)


def test_seg_covering_every_other_slice_by_position(study, tmp_path):
    sparse = study.mask.copy()
    sparse[1::2] = 0
    seg = without_source_references(segmentation(study.datasets, sparse))
    assert seg.NumberOfFrames < int(study.mask.any(axis=(1, 2)).sum())

    assert_mask_on_ct_grid(read_tumour_segment(save(seg, tmp_path), study.ct), study.ct, sparse)


def test_feet_first_ct_with_frame_of_reference_only_seg(tmp_path):
    feet_first = write_and_read_study(tmp_path / "ct", direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1))
    seg = without_source_references(build_tumour_seg(feet_first.datasets, feet_first.mask))

    segment = read_tumour_segment(save(seg, tmp_path), feet_first.ct)

    assert_mask_on_ct_grid(segment, feet_first.ct, feet_first.mask)
    assert feet_first.ct.image.GetDirection() == (-1, 0, 0, 0, 1, 0, 0, 0, -1)


def test_labelmap_seg(study, tmp_path):
    labels = study.mask.astype(np.uint8)
    labels[0, :4, :4] = 2
    descriptions = [
        tumour_segment_description(),
        tumour_segment_description(label="Lung", property_type=codes.SCT.Lung, segment_number=2),
    ]
    seg = segmentation(study.datasets, labels, segmentation_type="LABELMAP", segment_descriptions=descriptions)
    assert seg.SegmentationType == "LABELMAP"

    segment = read_tumour_segment(save(seg, tmp_path), study.ct)

    assert segment.segment_number == 1
    assert_mask_on_ct_grid(segment, study.ct, study.mask)


def two_tumour_segments(study: Study) -> tuple[hd.seg.Segmentation, np.ndarray]:
    labels = study.mask.astype(np.uint8)
    labels[:, :, 24:] *= 2  # the right half of the tumour becomes segment 2
    descriptions = [
        tumour_segment_description(label="Tumour A", segment_number=1),
        tumour_segment_description(label="Tumour B", segment_number=2),
    ]
    return build_tumour_seg(study.datasets, labels, segment_descriptions=descriptions), labels


def test_segment_chosen_by_label(study, tmp_path):
    seg, labels = two_tumour_segments(study)

    segment = read_tumour_segment(save(seg, tmp_path), study.ct, segment_label="Tumour B")

    assert (segment.segment_number, segment.segment_label) == (2, "Tumour B")
    assert_mask_on_ct_grid(segment, study.ct, labels == 2)


def test_neoplasm_chosen_among_other_property_types(study, tmp_path):
    labels = study.mask.astype(np.uint8)
    labels[0, :4, :4] = 2
    descriptions = [
        tumour_segment_description(label="Tumour"),
        tumour_segment_description(label="Lung", property_type=codes.SCT.Lung, segment_number=2),
    ]
    seg = build_tumour_seg(study.datasets, labels, segment_descriptions=descriptions)

    segment = read_tumour_segment(save(seg, tmp_path), study.ct)

    assert segment.segment_number == 1
    assert_mask_on_ct_grid(segment, study.ct, study.mask)
    lung = read_tumour_segment(save(seg, tmp_path), study.ct, property_type=codes.SCT.Lung)
    assert_mask_on_ct_grid(lung, study.ct, labels == 2)


# --- refusals ---------------------------------------------------------------------------


def test_several_neoplasm_segments_need_a_label(study, tmp_path):
    seg, _ = two_tumour_segments(study)
    path = save(seg, tmp_path)

    assert refusal(path, study.ct) == (
        "seg.dcm has 2 segments with property type SCT 108369006 (Neoplasm): "
        "1 'Tumour A' (SCT 108369006 Neoplasm), 2 'Tumour B' (SCT 108369006 Neoplasm); "
        "pass segment_label to choose one"
    )


def test_missing_segment_lists_the_segments(study, tmp_path):
    lung_only = [tumour_segment_description(label="Lung", property_type=codes.SCT.Lung)]
    path = save(build_tumour_seg(study.datasets, study.mask, segment_descriptions=lung_only), tmp_path)

    assert refusal(path, study.ct) == (
        "seg.dcm has no segment with property type SCT 108369006 (Neoplasm); segments: 1 'Lung' (SCT 39607008 Lung)"
    )
    assert refusal(path, study.ct, segment_label="GTV") == (
        "seg.dcm has no segment labelled 'GTV'; segments: 1 'Lung' (SCT 39607008 Lung)"
    )


def test_empty_segment_is_a_mask_error(study, tmp_path):
    path = save(build_tumour_seg(study.datasets, np.zeros_like(study.mask)), tmp_path)

    assert refusal(path, study.ct, MaskError) == (
        f"segment 1 'Tumour' of seg.dcm is empty on CT series {study.ct.series_instance_uid}"
    )


def test_seg_of_another_series_is_refused(study, tmp_path):
    other_series = ct_datasets_from_image(study.image, PATIENT, frame_of_reference_uid=study.ct.frame_of_reference_uid)
    path = save(build_tumour_seg(other_series, study.mask), tmp_path)

    assert refusal(path, study.ct) == (
        f"seg.dcm references series {other_series[0].SeriesInstanceUID}, not CT series {study.ct.series_instance_uid}"
    )


def test_seg_in_another_frame_of_reference_is_refused(study, tmp_path):
    other_frame = ct_datasets_from_image(study.image, PATIENT)
    path = save(build_tumour_seg(other_frame, study.mask), tmp_path)

    assert refusal(path, study.ct) == (
        f"seg.dcm has FrameOfReferenceUID {other_frame[0].FrameOfReferenceUID}, but CT series "
        f"{study.ct.series_instance_uid} has {study.ct.frame_of_reference_uid}"
    )


def shift_frame_positions(seg: Dataset, offset_mm: tuple[float, float, float]) -> Dataset:
    for frame in seg.PerFrameFunctionalGroupsSequence:
        plane = frame.PlanePositionSequence[0]
        plane.ImagePositionPatient = [round(float(v) + d, 6) for v, d in zip(plane.ImagePositionPatient, offset_mm)]
    return seg


def ct_slice_of_frame(seg: Dataset, ct: CtSeries, frame_number: int) -> int:
    """The slice a frame was derived from, by its source reference (highdicom orders frames its own way)."""
    frame = seg.PerFrameFunctionalGroupsSequence[frame_number - 1]
    source = frame.DerivationImageSequence[0].SourceImageSequence[0]
    return ct.sop_instance_uids.index(source.ReferencedSOPInstanceUID)


def test_frames_off_the_ct_grid_are_refused(study, tmp_path):
    seg = segmentation(study.datasets, study.mask)
    first_slice = ct_slice_of_frame(seg, study.ct, 1)
    path = save(shift_frame_positions(without_source_references(seg), (0.35, 0.0, 0.0)), tmp_path)

    message = refusal(path, study.ct)

    assert message.startswith("seg.dcm: frame 1 at ImagePositionPatient [")
    assert message.endswith(
        f"does not land on a slice of CT series {study.ct.series_instance_uid} "
        f"(offset 0.350, 0.000, 0.000 mm along x, y, z from slice {first_slice})"
    )


def test_frames_beyond_the_ct_are_refused(study, tmp_path):
    seg = segmentation(study.datasets, study.mask)
    first_slice = ct_slice_of_frame(seg, study.ct, 1)
    path = save(shift_frame_positions(without_source_references(seg), (0.0, 0.0, 25.0)), tmp_path)

    assert refusal(path, study.ct) == (
        f"seg.dcm: frame 1 lies outside CT series {study.ct.series_instance_uid} "
        f"(slice index {first_slice + 10}, CT has 12)"
    )


def test_frame_whose_position_contradicts_its_reference_is_refused(study, tmp_path):
    seg = build_tumour_seg(study.datasets, study.mask)
    referenced = ct_slice_of_frame(seg, study.ct, 6)
    plane = seg.PerFrameFunctionalGroupsSequence[5].PlanePositionSequence[0]
    x, y, z = (float(v) for v in plane.ImagePositionPatient)
    plane.ImagePositionPatient = [x, y, z + 2.5]

    assert refusal(save(seg, tmp_path), study.ct) == (
        f"seg.dcm: frame 6 references CT slice {referenced} but its ImagePositionPatient lies on slice {referenced + 1}"
    )


def test_ct_instance_given_as_seg_is_refused(study):
    path = study.ct.source_paths[0]

    assert refusal(path, study.ct) == f"{path.name} is not a DICOM SEG (CT Image Storage, modality CT)"


def test_structured_report_given_as_seg_is_refused(study, tmp_path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    report.Modality = "SR"
    path = save(report, tmp_path, "report.dcm")

    assert refusal(path, study.ct) == "report.dcm is not a DICOM SEG (Basic Text SR Storage, modality SR)"


def test_seg_truncated_in_pixel_data_is_refused(study, tmp_path):
    path = save(build_tumour_seg(study.datasets, study.mask), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    expected_bytes = 48 * 40 * 12 // 8  # BINARY frames are bit-packed

    assert refusal(path, study.ct) == (
        f"seg.dcm: corrupt or truncated SEG (pixel data is {expected_bytes - 200} bytes, {expected_bytes} expected)"
    )


@pytest.mark.parametrize("kept_bytes", [200, 2000])
def test_seg_truncated_in_header_is_refused(study, kept_bytes, tmp_path):
    path = save(build_tumour_seg(study.datasets, study.mask), tmp_path)
    path.write_bytes(path.read_bytes()[:kept_bytes])

    assert refusal(path, study.ct).startswith("seg.dcm: corrupt or ")


def test_non_dicom_file_is_refused(study, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("tumour on slice 5")

    assert refusal(path, study.ct).startswith("notes.txt: not a readable DICOM file (InvalidDicomError: ")


def test_missing_seg_file_is_refused(study, tmp_path):
    assert refusal(tmp_path / "absent.dcm", study.ct) == "SEG file absent.dcm does not exist"


@pytest.mark.parametrize(
    ("keyword", "sequence", "value", "expected"),
    [
        (
            "PixelSpacing",
            "PixelMeasuresSequence",
            [0.35, 0.4],
            "has PixelSpacing [0.35, 0.4] mm, CT series {uid} has [0.7, 0.8] mm",
        ),
        (
            "ImageOrientationPatient",
            "PlaneOrientationSequence",
            [-1, 0, 0, 0, 1, 0],
            "has ImageOrientationPatient [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], CT series {uid} has "
            "[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]",
        ),
    ],
)
def test_frame_of_reference_only_seg_on_another_in_plane_grid_is_refused(
    study, keyword, sequence, value, expected, tmp_path
):
    seg = without_source_references(segmentation(study.datasets, study.mask))
    setattr(seg.SharedFunctionalGroupsSequence[0][sequence].value[0], keyword, value)

    assert refusal(save(seg, tmp_path), study.ct) == (
        "seg.dcm: frame 1 " + expected.format(uid=study.ct.series_instance_uid)
    )
