"""Write synthetic CT series and tumour SEGs as real DICOM files.

Used by the demonstration study (`sclc-node demo`), by the tests and by the
simulated training cohort.  The CT files are ordinary CT Image Storage
instances built with pydicom; the SEG is built with highdicom, so both are
what a PACS would send us.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: Stored value = HU - RESCALE_INTERCEPT, so air (-1000 HU) stays non-negative.
RESCALE_INTERCEPT_HU = -1024.0


@dataclass(frozen=True, slots=True)
class SyntheticPatient:
    """Identifiers written into synthetic files.  Deliberately fake."""

    patient_id: str = "SYNTH-0001"
    patient_name: str = "Synthetic^Phantom"
    patient_birth_date: str = "19600101"
    patient_sex: str = "M"
    accession_number: str = "SYNACC0001"
    study_instance_uid: str = ""
    study_id: str = "1"

    def with_study_uid(self) -> SyntheticPatient:
        if self.study_instance_uid:
            return self
        return SyntheticPatient(
            self.patient_id,
            self.patient_name,
            self.patient_birth_date,
            self.patient_sex,
            self.accession_number,
            generate_uid(),
            self.study_id,
        )


def _orientation_and_normal(image: sitk.Image) -> tuple[list[float], np.ndarray]:
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    row_cosine = direction[:, 0]
    column_cosine = direction[:, 1]
    return [*map(float, row_cosine), *map(float, column_cosine)], direction[:, 2]


def _ds_decimal(value: float) -> str:
    """The shortest decimal string (DS allows 16 characters) that reads back as ``value``, or the closest that fits."""
    value = float(value)
    if value == 0:
        return "0"
    best = f"{value:.1g}"
    for digits in range(1, 17):
        text = f"{value:.{digits}g}"
        if len(text) > 16:
            break
        best = text
        if float(text) == value:
            break
    return best


class CtSeriesOptions(TypedDict, total=False):
    """The series attributes ``write_ct_series`` passes on to ``ct_datasets_from_image``."""

    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    series_number: int
    series_description: str


def ct_datasets_from_image(
    image: sitk.Image,
    patient: SyntheticPatient,
    *,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic chest CT",
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of ``image`` (HU, any pixel type).

    Slice k of the SimpleITK image (index order x, y, z) becomes instance k+1,
    positioned with ``TransformIndexToPhysicalPoint`` so the files reproduce
    the image geometry exactly.
    """
    patient = patient.with_study_uid()
    series_instance_uid = series_instance_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    orientation, _ = _orientation_and_normal(image)
    spacing_x, spacing_y, spacing_z = image.GetSpacing()
    hu = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT_HU), 0, 65535).astype(np.uint16)
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    datasets = []
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = patient.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "sclc-risk-node synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest CT (phantom)"
        ds.SeriesDescription = series_description
        ds.PatientName = patient.patient_name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.patient_birth_date
        ds.PatientSex = patient.patient_sex
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds_decimal(spacing_z)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = patient.study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.StudyID = patient.study_id
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        ds.ImagePositionPatient = [_ds_decimal(v) for v in position]
        ds.ImageOrientationPatient = [_ds_decimal(v) for v in orientation]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_decimal(position[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelSpacing = [_ds_decimal(spacing_y), _ds_decimal(spacing_x)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = _ds_decimal(RESCALE_INTERCEPT_HU)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def write_datasets(datasets: Sequence[Dataset], out_dir: Path, *, transfer_syntax_uid: str | None = None) -> list[Path]:
    """Write datasets as ``<SOPInstanceUID>.dcm``, optionally re-encoded to ``transfer_syntax_uid``.

    Compression uses pydicom's encoders (RLE natively, JPEG-LS via pyjpegls,
    JPEG 2000 via pylibjpeg-openjpeg); deflate is a plain transfer syntax.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        if transfer_syntax_uid and transfer_syntax_uid != ds.file_meta.TransferSyntaxUID:
            ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(ds)))
            if pydicom.uid.UID(transfer_syntax_uid).is_compressed:
                ds.compress(transfer_syntax_uid)
            else:
                ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax_uid)
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _to_bytes(ds: Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_ct_series(
    image: sitk.Image,
    out_dir: Path,
    patient: SyntheticPatient | None = None,
    *,
    transfer_syntax_uid: str | None = None,
    **kwargs: Unpack[CtSeriesOptions],
) -> list[Dataset]:
    """Write ``image`` as a CT series into ``out_dir``; return the datasets written."""
    datasets = ct_datasets_from_image(image, patient or SyntheticPatient(), **kwargs)
    write_datasets(datasets, out_dir, transfer_syntax_uid=transfer_syntax_uid)
    return datasets


def tumour_segment_description(
    *,
    label: str = "Tumour",
    property_type: hd.sr.CodedConcept | Code = codes.SCT.Neoplasm,
    segment_number: int = 1,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=segment_number,
        segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def build_tumour_seg(
    ct_datasets: Sequence[Dataset],
    mask: sitk.Image | np.ndarray,
    *,
    fractional: bool = False,
    segment_descriptions: Sequence[hd.seg.SegmentDescription] | None = None,
    series_number: int = 100,
) -> hd.seg.Segmentation:
    """A DICOM SEG of ``mask`` (on the CT grid, z-y-x when a numpy array) over ``ct_datasets``.

    With several segment descriptions, ``mask`` holds label values 1..n.
    Fractional masks are floats in [0, 1].
    """
    array = sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    descriptions = list(segment_descriptions or [tumour_segment_description()])
    if fractional:
        pixel_array = array.astype(np.float32)
        segmentation_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    elif len(descriptions) > 1:
        pixel_array = array.astype(np.uint8)
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
    else:
        pixel_array = (array > 0).astype(np.uint8)
        segmentation_type = hd.seg.SegmentationTypeValues.BINARY
    ordered = sorted(ct_datasets, key=lambda ds: int(ds.InstanceNumber))
    return hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="sclc-risk-node synthetic phantom",
        manufacturer_model_name="synthetic",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=False,
    )


def synthetic_chest_phantom(
    *,
    size: tuple[int, int, int] = (96, 96, 40),
    spacing_mm: tuple[float, float, float] = (0.8, 0.8, 2.5),
    tumour_radii_mm: tuple[float, float, float] = (14.0, 11.0, 12.0),
    texture_hu: float = 60.0,
    halo_hu: float = 0.0,
    halo_mm: float = 3.0,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image]:
    """A lung-like CT volume (HU) with one textured ellipsoidal tumour, and its mask.

    ``size`` and ``spacing_mm`` are in SimpleITK (x, y, z) order.  The lung
    parenchyma is about -850 HU with noise; the tumour is soft tissue
    (~40 HU) with smoothed Gaussian texture of ``texture_hu`` amplitude.
    ``halo_hu`` adds a ground-glass halo of that many HU over the lung within
    ``halo_mm`` outside the tumour, fading linearly (peritumoral infiltration).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    sx, sy, sz = spacing_mm
    z, y, x = np.meshgrid(
        (np.arange(nz) - (nz - 1) / 2) * sz,
        (np.arange(ny) - (ny - 1) / 2) * sy,
        (np.arange(nx) - (nx - 1) / 2) * sx,
        indexing="ij",
    )
    rx, ry, rz = tumour_radii_mm
    inside = (x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2 <= 1.0
    lung = -850.0 + rng.normal(0.0, 40.0, size=inside.shape)
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, size=inside.shape))
    noise.SetSpacing(spacing_mm)
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 1.5))
    texture = texture / (texture.std() or 1.0)
    tumour = 40.0 + texture_hu * texture
    hu = np.where(inside, tumour, lung)
    if halo_hu:
        # Distance outside the ellipsoid, approximated by scaling the normalised radius (exact on a sphere).
        radius = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
        outside_mm = (radius - 1.0) * (rx * ry * rz) ** (1 / 3)
        fade = np.clip(1.0 - outside_mm / halo_mm, 0.0, 1.0)
        hu = np.where(inside, hu, hu + halo_hu * fade)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing_mm)
    image.SetOrigin((-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask
