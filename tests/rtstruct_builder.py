"""Write RT Structure Sets for tests, as a planning system would: pydicom, PS3.3 A.19 RT Structure Set IOD.

Contours are CLOSED_PLANAR polygons in patient coordinates (mm), one or more
per CT slice, each citing the CT instance it was drawn on.  `contours_from_mask`
traces a binary mask with contourpy (matplotlib's contouring engine) at level
0.5, i.e. along the edges between tumour and background voxel centres.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def contours_from_mask(mask: sitk.Image) -> dict[int, list[np.ndarray]]:
    """Slice index -> closed polygons (N×3, mm) around the mask's voxel centres, traced at level 0.5."""
    import contourpy

    array = sitk.GetArrayFromImage(mask).astype(float)  # (z, y, x)
    contours: dict[int, list[np.ndarray]] = {}
    for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)):
        padded = np.pad(array[k], 1)  # closes loops that touch the border
        generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
        loops = []
        for line in generator.lines(0.5):
            ij = line - 1.0  # undo the padding; columns are x = i, rows are y = j
            points = [mask.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k))) for i, j in ij[:-1]]
            loops.append(np.asarray(points))
        contours[int(k)] = loops
    return contours


def build_rtstruct(
    ct_datasets: Sequence[Dataset],
    contours_by_slice: dict[int, list[np.ndarray]],
    *,
    roi_name: str = "GTV",
    interpreted_type: str = "GTV",
    extra_rois: Sequence[tuple[str, str, dict[int, list[np.ndarray]]]] = (),
) -> Dataset:
    """An RTSTRUCT over ``ct_datasets`` (sorted like the CT volume: slice k = ct_datasets[k])."""
    first = ct_datasets[0]
    now = _dt.datetime(2026, 1, 1, 13, 0, 0)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    ):
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 90
    ds.SeriesDescription = "Tumour contours"
    ds.Manufacturer = "sclc-risk-node tests"
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "TUMOUR"
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.StructureSetDate
    ds.InstanceCreationTime = ds.StructureSetTime

    contour_images = DicomSequence()
    for ct in ct_datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ct.SOPClassUID
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = contour_images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired), as PS3.3 requires
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    rois = [(roi_name, interpreted_type, contours_by_slice), *extra_rois]
    for number, (name, kind, by_slice) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [255, 0, 0]
        roi_contour.ContourSequence = DicomSequence()
        for k in sorted(by_slice):
            for loop in by_slice[k]:
                contour = Dataset()
                image = Dataset()
                image.ReferencedSOPClassUID = ct_datasets[k].SOPClassUID
                image.ReferencedSOPInstanceUID = ct_datasets[k].SOPInstanceUID
                contour.ContourImageSequence = [image]
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(loop)
                contour.ContourData = [f"{v:.4f}" for v in np.asarray(loop).ravel()]
                roi_contour.ContourSequence.append(contour)
        ds.ROIContourSequence.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = kind
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
