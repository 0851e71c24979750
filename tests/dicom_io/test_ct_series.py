"""read_ct_series on real DICOM files written by dicom_io.synthetic (and DCMTK)."""

from __future__ import annotations

import copy
import io
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.synthetic import (
    RESCALE_INTERCEPT_HU,
    SyntheticPatient,
    build_tumour_seg,
    ct_datasets_from_image,
    synthetic_chest_phantom,
    write_ct_series,
    write_datasets,
)

DCMCJPEG = Path("/usr/bin/dcmcjpeg")
DCMCONV = Path("/usr/bin/dcmconv")
PATIENT = SyntheticPatient()
#: Rows ≠ columns and row spacing ≠ column spacing, so a swapped axis cannot pass.
SIZE_XYZ = (48, 40, 12)
SPACING_XYZ = (0.8, 0.7, 2.5)


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image]:
    return synthetic_chest_phantom(size=SIZE_XYZ, spacing_mm=SPACING_XYZ, tumour_radii_mm=(9.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def image(phantom) -> sitk.Image:
    return storable(phantom[0])


def storable(hu_image: sitk.Image) -> sitk.Image:
    """The HU the synthetic writer can store: it clips below RESCALE_INTERCEPT_HU (-1024)."""
    clipped = sitk.GetImageFromArray(
        np.maximum(sitk.GetArrayFromImage(hu_image), RESCALE_INTERCEPT_HU).astype(np.int16)
    )
    clipped.CopyInformation(hu_image)
    return clipped


@pytest.fixture
def datasets(image) -> list[Dataset]:
    return ct_datasets_from_image(image, PATIENT)


def assert_same_geometry(actual: sitk.Image, expected: sitk.Image) -> None:
    assert actual.GetSize() == expected.GetSize()
    np.testing.assert_allclose(actual.GetOrigin(), expected.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(actual.GetSpacing(), expected.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(actual.GetDirection(), expected.GetDirection(), rtol=0, atol=1e-12)


def assert_same_image(actual: sitk.Image, expected: sitk.Image) -> None:
    assert_same_geometry(actual, expected)
    assert actual.GetPixelID() == expected.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(actual), sitk.GetArrayFromImage(expected))


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(DicomInputError) as caught:
        read_ct_series(folder, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for identifier in (PATIENT.patient_name, PATIENT.patient_id, PATIENT.patient_birth_date):
        assert identifier not in message
    return message


def file_of(datasets: list[Dataset], k: int) -> str:
    return f"{datasets[k].SOPInstanceUID}.dcm"


# --- reading -----------------------------------------------------------------------------


def test_reads_hu_volume_with_source_geometry(image, datasets, tmp_path):
    write_datasets(datasets, tmp_path)

    ct = read_ct_series(tmp_path)

    assert_same_image(ct.image, image)
    assert ct.image.GetPixelID() == sitk.sitkInt16
    assert ct.image.GetSpacing()[:2] == (0.8, 0.7)  # PixelSpacing is [row (y), column (x)]
    assert ct.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in datasets)
    assert [p.name for p in ct.source_paths] == [file_of(datasets, k) for k in range(12)]
    assert all("PixelData" not in h for h in ct.headers)
    assert ct.series_instance_uid == datasets[0].SeriesInstanceUID
    assert ct.study_instance_uid == datasets[0].StudyInstanceUID
    assert ct.frame_of_reference_uid == datasets[0].FrameOfReferenceUID


def test_shuffled_nested_files_with_junk_and_other_objects_give_same_image(phantom, image, datasets, tmp_path):
    # Scrambled InstanceNumber and SliceLocation: only the positions may decide the order.
    rng = random.Random(7)
    for ds, number in zip(datasets, rng.sample(range(1, 13), 12)):
        ds.InstanceNumber = number
        ds.SliceLocation = str(rng.uniform(-500, 500))[:12]
    shuffled = rng.sample(datasets, len(datasets))
    write_datasets(shuffled[:5], tmp_path)
    write_datasets(shuffled[5:9], tmp_path / "sub")
    write_datasets(shuffled[9:], tmp_path / "sub" / "deeper")
    (tmp_path / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / ".DS_Store").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "sub" / "._IM0001").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 200)
    write_dicomdir(tmp_path / "DICOMDIR")
    build_tumour_seg(datasets, phantom[1]).save_as(tmp_path / "seg.dcm")
    write_text_sr(tmp_path / "sub" / "report.dcm", datasets[0])

    ct = read_ct_series(tmp_path)

    assert_same_image(ct.image, image)
    assert [h.InstanceNumber for h in ct.headers] == [ds.InstanceNumber for ds in datasets]


def part10_bytes(dataset: Dataset) -> bytes:
    stream = io.BytesIO()
    dataset.save_as(stream, enforce_file_format=True)
    return stream.getvalue()


def files_around_the_part10_rule(folder: Path, other_series: Dataset) -> dict[str, bool]:
    """Files on both sides of the Part 10 rule, each with whether the folder reader must open it."""
    encoded = part10_bytes(other_series)
    assert encoded[128:132] == b"DICM"
    files = {
        "preamble-without-DICM.dcm": (encoded[:128] + b"DICN" + encoded[132:], False),
        "dataset-without-preamble.dcm": (encoded[132:], False),
        "DICM-at-the-start.dcm": (b"DICM" + encoded[132:], False),
        "too-short.dcm": (b"\0" * 130, False),
        "notes.txt": (b"tumour on slice 5\n", False),
        "empty.dcm": (b"", False),
        "magic-then-garbage.dcm": (b"\0" * 128 + b"DICM" + b"\xff" * 64, True),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    (folder / "dangling-link.dcm").symlink_to(folder / "absent.dcm")
    return {name: opened for name, (_, opened) in files.items()} | {"dangling-link.dcm": False}


def test_part10_rule_accepts_and_refuses_the_same_files_as_the_former_byte_check(datasets, tmp_path):
    from sclc_risk_node.dicom_io.ct_series import _is_part10_file

    expected = files_around_the_part10_rule(tmp_path, datasets[0])

    def former_rule(path: Path) -> bool:  # the hand-written check pydicom.misc.is_dicom replaced
        try:
            return path.read_bytes()[128:132] == b"DICM"
        except OSError:
            return False

    for name, opened in expected.items():
        assert _is_part10_file(tmp_path / name) is opened is former_rule(tmp_path / name), name


def test_files_without_part10_magic_are_skipped_unread(image, datasets, tmp_path):
    other_series = ct_datasets_from_image(image, PATIENT)[0]  # read, it would make two series
    write_datasets(datasets, tmp_path)
    expected = files_around_the_part10_rule(tmp_path, other_series)
    (tmp_path / "magic-then-garbage.dcm").unlink()
    assert not any(expected[p.name] for p in tmp_path.iterdir() if p.name in expected)

    assert_same_image(read_ct_series(tmp_path).image, image)


def test_file_with_part10_magic_but_garbage_is_refused_by_name(datasets, tmp_path):
    write_datasets(datasets, tmp_path)
    (tmp_path / "magic-then-garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)

    assert refusal(tmp_path).startswith("magic-then-garbage.dcm: corrupt or truncated DICOM file (")


def test_flat_reading_ignores_subfolders(datasets, tmp_path):
    write_datasets(datasets[:6], tmp_path)
    write_datasets(datasets[6:], tmp_path / "sub")

    assert read_ct_series(tmp_path, recursive=False).image.GetSize()[2] == 6


def test_same_instance_stored_twice_is_one_slice(image, datasets, tmp_path):
    paths = write_datasets(datasets, tmp_path)
    shutil.copy(paths[4], tmp_path / "copy-of-slice-5.dcm")

    assert_same_image(read_ct_series(tmp_path).image, image)


def test_z_spacing_is_measured_between_positions_not_slice_thickness(phantom, tmp_path):
    five_mm = storable(synthetic_chest_phantom(size=(32, 32, 6), spacing_mm=(0.75, 0.75, 5.0))[0])
    datasets = ct_datasets_from_image(five_mm, PATIENT)
    for ds in datasets:
        ds.SliceThickness = "1.25"
    write_datasets(datasets, tmp_path)

    ct = read_ct_series(tmp_path)

    assert ct.image.GetSpacing()[2] == pytest.approx(5.0, abs=1e-9)
    assert_same_image(ct.image, five_mm)


@pytest.mark.parametrize(
    "direction",
    [
        pytest.param((-1, 0, 0, 0, 1, 0, 0, 0, -1), id="feet-first"),
        pytest.param((1, 0, 0, 0, 0, 1, 0, -1, 0), id="coronal"),
        pytest.param((0, 0, 1, 1, 0, 0, 0, 1, 0), id="sagittal"),
    ],
)
def test_non_identity_direction_is_reproduced(image, direction, tmp_path):
    rotated = sitk.Image(image)
    rotated.SetDirection(direction)
    rotated.SetOrigin((12.5, -40.25, 101.0))
    write_ct_series(rotated, tmp_path, PATIENT)

    assert_same_image(read_ct_series(tmp_path).image, rotated)


def test_left_handed_source_is_returned_sorted_along_the_slice_normal(image, tmp_path):
    # Flipping z makes the source direction left-handed; the files hold the same slices,
    # and the reader stacks them along row × column, so z comes back reversed.
    flipped = sitk.Flip(image, [False, False, True])
    write_ct_series(flipped, tmp_path, PATIENT)

    ct = read_ct_series(tmp_path)

    assert_same_image(ct.image, image)
    assert ct.image.TransformIndexToPhysicalPoint((0, 0, 0)) == pytest.approx(
        flipped.TransformIndexToPhysicalPoint((0, 0, 11)), abs=1e-9
    )


def test_non_integral_rescale_gives_float32_hu(image, datasets, tmp_path):
    for ds in datasets:
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-1000.25"
    write_datasets(datasets, tmp_path)

    ct = read_ct_series(tmp_path)

    assert ct.image.GetPixelID() == sitk.sitkFloat32
    stored = np.stack([ds.pixel_array for ds in datasets]).astype(np.float64)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct.image), stored * 0.5 - 1000.25)


def test_one_late_slice_beyond_int16_turns_the_whole_volume_float32(image, datasets, tmp_path):
    # Slices are written into an int16 volume as they are decoded; the switch
    # to float32 must keep the slices already written.
    last = max(range(len(datasets)), key=lambda k: float(datasets[k].ImagePositionPatient[2]))
    datasets[last].RescaleIntercept = "40000"
    write_datasets(datasets, tmp_path)

    ct = read_ct_series(tmp_path)

    assert ct.image.GetPixelID() == sitk.sitkFloat32
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in by_z]).astype(
        np.float32
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct.image), expected)


def test_spacing_jitter_within_tolerance_is_accepted(image, datasets, tmp_path):
    position = [float(v) for v in datasets[5].ImagePositionPatient]
    datasets[5].ImagePositionPatient = [position[0], position[1], position[2] + 0.01]
    write_datasets(datasets, tmp_path)

    ct = read_ct_series(tmp_path)

    assert ct.image.GetSpacing()[2] == pytest.approx(2.5, abs=1e-9)


# --- transfer syntaxes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        JPEGLSLossless,
        JPEG2000Lossless,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ],
    ids=lambda uid: uid.name,
)
def test_encoded_series_decodes_to_the_same_hu(image, datasets, transfer_syntax, tmp_path):
    paths = write_datasets(datasets, tmp_path, transfer_syntax_uid=transfer_syntax)
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in paths} == {transfer_syntax}

    assert_same_image(read_ct_series(tmp_path).image, image)


@pytest.mark.external
@pytest.mark.skipif(not DCMCJPEG.exists(), reason="DCMTK dcmcjpeg is not installed at /usr/bin")
def test_jpeg_lossless_sv1_from_dcmtk_decodes_to_the_same_hu(image, datasets, tmp_path):
    assert_dcmtk_conversion_keeps_hu(image, datasets, tmp_path, [str(DCMCJPEG), "+e1"], JPEGLosslessSV1)


@pytest.mark.external
@pytest.mark.skipif(not DCMCONV.exists(), reason="DCMTK dcmconv is not installed at /usr/bin")
def test_explicit_big_endian_from_dcmtk_decodes_to_the_same_hu(image, datasets, tmp_path):
    assert_dcmtk_conversion_keeps_hu(image, datasets, tmp_path, [str(DCMCONV), "+tb"], ExplicitVRBigEndian)


# --- lossy compression (issue 10, item 3) -----------------------------------------------

DCMDJPEG = Path("/usr/bin/dcmdjpeg")
DCMODIFY = Path("/usr/bin/dcmodify")
requires_dcmtk_jpeg = pytest.mark.skipif(
    not (DCMCJPEG.exists() and DCMDJPEG.exists() and DCMODIFY.exists()),
    reason="DCMTK dcmcjpeg/dcmdjpeg/dcmodify missing",
)


def jpeg_baseline_series(datasets, tmp_path) -> Path:
    """The synthetic series compressed by DCMTK to JPEG baseline, quality 60, SOP Instance UIDs kept."""
    plain = write_datasets(datasets, tmp_path / "plain")
    lossy = tmp_path / "jpeg-baseline"
    lossy.mkdir()
    for path in plain:
        subprocess.run(
            [str(DCMCJPEG), "+eb", "+q", "60", "+un", str(path), str(lossy / path.name)],
            check=True,
            capture_output=True,
        )
    return lossy


@pytest.mark.external
@requires_dcmtk_jpeg
def test_jpeg_baseline_ct_is_refused_naming_the_compression(datasets, tmp_path):
    lossy = jpeg_baseline_series(datasets, tmp_path)
    header = pydicom.dcmread(next(lossy.iterdir()), stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and header.LossyImageCompression == "01"

    message = refusal(lossy)

    assert message.startswith(
        f"series {datasets[0].SeriesInstanceUID}: lossy-compressed CT is refused (12 of 12 instances; "
    )
    assert 'Lossy Image Compression (0028,2110) is "01"' in message
    assert "scoring.allow_lossy_ct = true" in message


@pytest.mark.external
@requires_dcmtk_jpeg
def test_jpeg_baseline_without_the_lossy_flag_is_refused_by_its_transfer_syntax(datasets, tmp_path):
    lossy = jpeg_baseline_series(datasets, tmp_path)
    for path in lossy.iterdir():  # a sender that dropped (0028,2110)
        subprocess.run([str(DCMODIFY), "-nb", "-ea", "(0028,2110)", str(path)], check=True, capture_output=True)
        assert "LossyImageCompression" not in pydicom.dcmread(path, stop_before_pixels=True)

    assert "transfer syntax JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50) is lossy" in refusal(lossy)


@pytest.mark.external
@requires_dcmtk_jpeg
def test_decompressed_jpeg_keeps_counting_as_lossy(datasets, tmp_path):
    lossy = jpeg_baseline_series(datasets, tmp_path)
    decompressed = tmp_path / "decompressed"
    decompressed.mkdir()
    for path in lossy.iterdir():
        subprocess.run([str(DCMDJPEG), str(path), str(decompressed / path.name)], check=True, capture_output=True)

    assert 'Lossy Image Compression (0028,2110) is "01"' in refusal(decompressed)


@pytest.mark.external
@requires_dcmtk_jpeg
def test_lossy_ct_allowed_is_read_and_flagged(datasets, image, tmp_path):
    ct = read_ct_series(jpeg_baseline_series(datasets, tmp_path), allow_lossy=True)

    assert ct.lossy_compression is True
    assert ct.image.GetSize() == image.GetSize()


def test_lossless_and_uncompressed_series_are_not_flagged(datasets, tmp_path):
    write_datasets(datasets, tmp_path / "plain")
    write_datasets(datasets, tmp_path / "rle", transfer_syntax_uid=RLELossless)
    assert read_ct_series(tmp_path / "plain").lossy_compression is False
    assert read_ct_series(tmp_path / "rle").lossy_compression is False


def test_jpeg2000_is_lossy_unless_the_header_says_lossless():
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSNearLossless

    from sclc_risk_node.dicom_io.ct_series import lossy_compression_reason

    def header(transfer_syntax, flag=None):
        ds = Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        if flag is not None:
            ds.LossyImageCompression = flag
        return ds

    assert (
        lossy_compression_reason(header(JPEG2000))
        == "transfer syntax JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91) is lossy"
    )
    assert lossy_compression_reason(header(JPEG2000, "00")) is None
    assert lossy_compression_reason(header(JPEG2000Lossless)) is None
    assert (
        lossy_compression_reason(header(JPEGLSNearLossless, "00")) is not None
    )  # near-lossless is lossy by definition
    assert (
        lossy_compression_reason(header(ExplicitVRLittleEndian, "01")) == 'Lossy Image Compression (0028,2110) is "01"'
    )


def assert_dcmtk_conversion_keeps_hu(image, datasets, tmp_path, command, transfer_syntax):
    plain = write_datasets(datasets, tmp_path / "plain")
    converted = tmp_path / "converted"
    converted.mkdir()
    for path in plain:
        subprocess.run([*command, str(path), str(converted / path.name)], check=True, capture_output=True)
        assert pydicom.dcmread(converted / path.name).file_meta.TransferSyntaxUID == transfer_syntax

    assert_same_image(read_ct_series(converted).image, image)


# --- refusals ---------------------------------------------------------------------------


def test_empty_folder_is_refused(tmp_path):
    assert refusal(tmp_path) == f"no DICOM files in {tmp_path}"


def test_folder_of_junk_only_is_refused(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here")
    write_dicomdir(tmp_path / "DICOMDIR")

    assert refusal(tmp_path) == f"no DICOM files in {tmp_path}"


def test_missing_folder_is_refused(tmp_path):
    assert "does not exist" in refusal(tmp_path / "nowhere")


def test_mr_series_only_is_refused(datasets, tmp_path):
    write_datasets(as_mr(datasets), tmp_path)

    message = refusal(tmp_path)

    assert message == (
        f"no CT series in {tmp_path}: modality MR is not CT (series {datasets[0].SeriesInstanceUID}, 12 instances)"
    )


def test_requested_series_of_another_modality_is_refused(datasets, tmp_path):
    write_datasets(as_mr(datasets), tmp_path)
    uid = datasets[0].SeriesInstanceUID

    assert refusal(tmp_path, series_instance_uid=uid) == f"series {uid}: modality MR is not CT"


def test_two_ct_series_need_a_choice(image, datasets, tmp_path):
    write_datasets(datasets, tmp_path)
    other = ct_datasets_from_image(image, PATIENT)[:6]
    write_datasets(other, tmp_path)
    first, second = datasets[0].SeriesInstanceUID, other[0].SeriesInstanceUID

    message = refusal(tmp_path)

    assert message.startswith(f"2 CT series in {tmp_path}; choose one by series_instance_uid: ")
    assert f"{first} (12 instances)" in message
    assert f"{second} (6 instances)" in message
    ct = read_ct_series(tmp_path, series_instance_uid=first)
    assert_same_image(ct.image, image)


def test_requested_series_absent_is_refused(datasets, tmp_path):
    write_datasets(datasets, tmp_path)
    absent = generate_uid()

    message = refusal(tmp_path, series_instance_uid=absent)

    assert message == (
        f"series {absent} not found in {tmp_path}; series present: {datasets[0].SeriesInstanceUID} (CT, 12 instances)"
    )


def test_missing_slice_is_refused_with_the_gap(datasets, tmp_path):
    write_datasets(datasets[:6] + datasets[7:], tmp_path)
    uid = datasets[0].SeriesInstanceUID

    message = refusal(tmp_path)

    z5, z7 = (float(datasets[k].ImagePositionPatient[2]) for k in (5, 7))
    assert message == (
        f"series {uid}: missing slice or irregular spacing: gap of 5.000 mm between slices at "
        f"{z5:.3f} mm and {z7:.3f} mm along the slice normal "
        f"({file_of(datasets, 5)}, {file_of(datasets, 7)}); expected 2.500 mm ± 1%"
    )


def test_irregular_spacing_beyond_tolerance_is_refused(datasets, tmp_path):
    position = [float(v) for v in datasets[5].ImagePositionPatient]
    datasets[5].ImagePositionPatient = [position[0], position[1], position[2] + 0.5]
    write_datasets(datasets, tmp_path)

    message = refusal(tmp_path)

    assert "missing slice or irregular spacing: gap of 3.000 mm" in message
    assert file_of(datasets, 4) in message and file_of(datasets, 5) in message
    # The same stack passes with a looser tolerance (25 %).
    assert read_ct_series(tmp_path, spacing_tolerance=0.25).image.GetSize()[2] == 12


def test_duplicate_position_is_refused(datasets, tmp_path):
    twin = copy.deepcopy(datasets[3])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_datasets([*datasets, twin], tmp_path)
    z3 = float(datasets[3].ImagePositionPatient[2])

    message = refusal(tmp_path)

    assert message.startswith(
        f"series {datasets[0].SeriesInstanceUID}: duplicate slice position {z3:.3f} mm along the slice normal ("
    )
    assert file_of(datasets, 3) in message and f"{twin.SOPInstanceUID}.dcm" in message


def test_gantry_tilt_is_refused(datasets, tmp_path):
    for ds in datasets:
        ds.GantryDetectorTilt = "15"
    write_datasets(datasets, tmp_path)

    assert "gantry tilt of 15° in" in refusal(tmp_path)


def test_sheared_stack_is_refused(datasets, tmp_path):
    for k, ds in enumerate(datasets):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]  # what a tilted gantry produces
    write_datasets(datasets, tmp_path)

    message = refusal(tmp_path)

    assert "slices are not stacked along the slice normal (in-plane shift of 0.500 mm between" in message
    assert "gantry tilt or sheared stacks are not supported" in message


def test_non_orthogonal_orientation_is_refused(datasets, tmp_path):
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0.2, 0.98, 0]
    write_datasets(datasets, tmp_path)

    assert "is not two orthogonal unit vectors" in refusal(tmp_path)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("ImageOrientationPatient", [0, 1, 0, -1, 0, 0]),
        ("PixelSpacing", [0.7, 0.9]),
        ("Rows", 32),
        ("FrameOfReferenceUID", "1.2.3.4"),
    ],
)
def test_inconsistent_slice_attribute_is_refused(datasets, keyword, value, tmp_path):
    setattr(datasets[7], keyword, value)
    write_datasets(datasets, tmp_path)

    message = refusal(tmp_path)

    expected_what = "Rows/Columns" if keyword == "Rows" else keyword
    assert message.startswith(f"series {datasets[0].SeriesInstanceUID}: inconsistent {expected_what} between ")
    assert file_of(datasets, 7) in message  # and whichever slice it was compared with


def test_single_slice_is_refused(datasets, tmp_path):
    write_datasets(datasets[:1], tmp_path)

    assert refusal(tmp_path) == (f"series {datasets[0].SeriesInstanceUID} has 1 slice; a CT volume needs at least 2")


def test_slice_truncated_in_pixel_data_is_refused_by_name(datasets, tmp_path):
    paths = write_datasets(datasets, tmp_path)
    data = paths[6].read_bytes()
    paths[6].write_bytes(data[: len(data) - 1000])

    message = refusal(tmp_path)

    assert message.startswith(f"{paths[6].name}: cannot decode pixel data (")


def test_file_truncated_in_header_is_refused_by_name(datasets, tmp_path):
    paths = write_datasets(datasets, tmp_path)
    paths[2].write_bytes(paths[2].read_bytes()[:600])

    message = refusal(tmp_path)

    assert message.startswith(f"{paths[2].name}: corrupt or truncated DICOM file (no ")


# --- helpers ------------------------------------------------------------------------------


def as_mr(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return datasets


def write_dicomdir(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = Dataset()
    dicomdir.file_meta = meta
    dicomdir.FileSetID = "EXPORT"
    dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = []
    dicomdir.save_as(path, enforce_file_format=True)


def write_text_sr(path: Path, ct_dataset: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    report.Modality = "SR"
    report.StudyInstanceUID = ct_dataset.StudyInstanceUID
    report.SeriesInstanceUID = generate_uid()
    report.ValueType = "CONTAINER"
    report.save_as(path, enforce_file_format=True)
