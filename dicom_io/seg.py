"""Read the tumour segment of a DICOM SEG as a binary mask on the CT grid.

highdicom parses the SEG, decodes its frames (bit-packed BINARY, FRACTIONAL,
LABELMAP, any transfer syntax) and stacks the chosen segment: with
``get_pixels_by_source_instance`` over the CT's instances when every frame
names its source slice, else with ``get_volume``, whose affine lays the
volume's slices on the CT.  ``Volume.match_geometry`` is not used: in
highdicom 0.28 it silently crops away frames that fall outside the target (a
SEG shifted by five slices loses those voxels without a word) and subsamples
grids whose spacing is an integer multiple of the target's.  So every frame
is checked first, and the checks below are errors that name the frame.

Each frame of the chosen segment must land on one CT slice:

* by reference, when the frame's DerivationImageSequence/SourceImageSequence
  names a CT instance (with spatial locations preserved);
* otherwise by position: its ImagePositionPatient (PlanePositionSequence) must
  coincide with the position of a CT slice within ``position_tolerance`` ×
  the CT voxel spacing on every axis, and its orientation and pixel spacing
  must equal the CT's.  Nothing is resampled.

A frame that has both must not contradict itself (its position on another
slice than its reference).  CT slices no frame lands on are empty, so SEGs
written with empty frames omitted work.

Fractional segments: a voxel is tumour when its value is at least half of
MaximumFractionalValue (fraction ≥ 0.5), for PROBABILITY and OCCUPANCY alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from sclc_risk_node.dicom_io.ct_reference import check_drawn_on_ct
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment
from sclc_risk_node.scoring.errors import MaskError

SEGMENTATION_SOP_CLASSES = {
    UID("1.2.840.10008.5.1.4.1.1.66.4"),  # Segmentation Storage
    UID("1.2.840.10008.5.1.4.1.1.66.7"),  # Label Map Segmentation Storage
}
FRACTIONAL_THRESHOLD = 0.5
_ORIENTATION_TOLERANCE = 1e-4
_PIXEL_SPACING_RELATIVE_TOLERANCE = 1e-3


def read_tumour_segment(
    seg: Path | Dataset,
    ct: CtSeries,
    *,
    segment_label: str | None = None,
    property_type: Code | hd.sr.CodedConcept = codes.SCT.Neoplasm,
    position_tolerance: float = 0.01,
) -> TumourSegment:
    """The tumour segment of ``seg`` as a ``sitkUInt8`` mask on exactly ``ct.image``'s grid.

    The segment is the one labelled ``segment_label`` when given, else the one
    whose segmented property type is ``property_type`` (SCT 108369006
    Neoplasm by default); several matches are an error.  Frames placed by
    position must lie within ``position_tolerance`` × the CT voxel spacing of
    a CT slice's ImagePositionPatient on each axis.

    Raises ``DicomInputError`` when the SEG cannot be read or does not belong
    to ``ct``, and ``MaskError`` when the chosen segment is empty.
    """
    source_path = None if isinstance(seg, Dataset) else Path(seg)
    dataset = seg if isinstance(seg, Dataset) else _read_dataset(Path(seg))
    name = source_path.name if source_path is not None else f"SEG {dataset.get('SOPInstanceUID', '?')}"
    # A caller's Dataset is copied: from_dataset(copy=False) would change its class in place.
    segmentation = _parse_segmentation(dataset, name, copy=source_path is None)
    frame_of_reference = segmentation.get("FrameOfReferenceUID")
    check_drawn_on_ct(
        ct,
        name,
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
        referenced_series_uids=_referenced_series_uids(segmentation),
    )
    segment_number = _choose_segment(segmentation, name, segment_label, property_type)
    description = segmentation.get_segment_description(segment_number)
    label = str(description.segment_label)
    mask_array = _segment_mask(segmentation, ct, name, segment_number, position_tolerance)
    if not mask_array.any():
        raise MaskError(f"segment {segment_number} '{label}' of {name} is empty on CT series {ct.series_instance_uid}")
    mask = sitk.GetImageFromArray(mask_array)
    mask.CopyInformation(ct.image)
    return TumourSegment(
        mask=mask,
        segmentation=segmentation,
        segment_number=segment_number,
        segment_label=label,
        source_path=source_path,
    )


def _read_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise DicomInputError(f"SEG file {path.name} does not exist") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise DicomInputError(f"{path.name}: not a readable DICOM file ({_one_line(exc)})") from exc


def _parse_segmentation(dataset: Dataset, name: str, *, copy: bool) -> hd.seg.Segmentation:
    sop_class = dataset.get("SOPClassUID")
    if not sop_class:
        # pydicom returns a partial dataset for a truncated header instead of raising.
        raise DicomInputError(f"{name}: corrupt or truncated DICOM file (no SOPClassUID)")
    if sop_class not in SEGMENTATION_SOP_CLASSES:
        modality = dataset.get("Modality", "unknown")
        raise DicomInputError(f"{name} is not a DICOM SEG ({UID(sop_class).name}, modality {modality})")
    try:
        segmentation = hd.seg.Segmentation.from_dataset(dataset, copy=copy)
    except Exception as exc:  # highdicom validates many attributes, each with its own error type
        raise DicomInputError(f"{name}: corrupt or invalid SEG ({_one_line(exc)})") from exc
    _check_native_pixel_data_length(segmentation, name)
    return segmentation


def _check_native_pixel_data_length(segmentation: hd.seg.Segmentation, name: str) -> None:
    """Catch truncated files up front; pydicom reads a short Pixel Data without complaint."""
    transfer_syntax = getattr(segmentation, "file_meta", Dataset()).get("TransferSyntaxUID")
    if transfer_syntax is None or UID(transfer_syntax).is_compressed or "PixelData" not in segmentation:
        return
    bits = (
        int(segmentation.Rows)
        * int(segmentation.Columns)
        * int(segmentation.get("NumberOfFrames", 1))
        * int(segmentation.BitsAllocated)
    )
    expected_bytes = (bits + 7) // 8
    actual_bytes = len(segmentation.PixelData)
    if actual_bytes < expected_bytes:
        raise DicomInputError(
            f"{name}: corrupt or truncated SEG (pixel data is {actual_bytes} bytes, {expected_bytes} expected)"
        )


def _referenced_series_uids(segmentation: hd.seg.Segmentation) -> list[str]:
    return [
        str(item.SeriesInstanceUID)
        for item in segmentation.get("ReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in item
    ]


def _choose_segment(
    segmentation: hd.seg.Segmentation,
    name: str,
    segment_label: str | None,
    property_type: Code | hd.sr.CodedConcept,
) -> int:
    if segment_label is not None:
        matches = segmentation.get_segment_numbers(segment_label=segment_label)
        wanted = f"labelled '{segment_label}'"
    else:
        matches = segmentation.get_segment_numbers(segmented_property_type=property_type)
        wanted = f"with property type {property_type.scheme_designator} {property_type.value} ({property_type.meaning})"
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DicomInputError(f"{name} has no segment {wanted}; segments: {_describe_segments(segmentation)}")
    listing = _describe_segments(segmentation, only=matches)
    advice = "" if segment_label is not None else "; pass segment_label to choose one"
    raise DicomInputError(f"{name} has {len(matches)} segments {wanted}: {listing}{advice}")


def _describe_segments(segmentation: hd.seg.Segmentation, only: list[int] | None = None) -> str:
    parts = []
    for item in segmentation.SegmentSequence:
        number = int(item.SegmentNumber)
        if only is not None and number not in only:
            continue
        property_item = item.SegmentedPropertyTypeCodeSequence[0]
        parts.append(
            f"{number} '{item.get('SegmentLabel', '')}' "
            f"({property_item.CodingSchemeDesignator} {property_item.CodeValue} "
            f"{property_item.get('CodeMeaning', '')})"
        )
    return ", ".join(parts) or "none"


@dataclass(frozen=True)
class _FrameSlices:
    """Which CT slice each frame of one segment lands on, and whether all were placed by reference."""

    slice_of_frame: dict[int, int]
    all_by_reference: bool


def _segment_mask(
    segmentation: hd.seg.Segmentation, ct: CtSeries, name: str, segment_number: int, position_tolerance: float
) -> NDArray[np.uint8]:
    """The segment as a z-y-x uint8 mask on the CT grid.

    The frames are checked first (see the module docstring); highdicom then decodes the
    segment and stacks it, by CT instance when every frame names its source slice, else
    as a volume laid on the CT by its affine.
    """
    frames = _FrameChecker(segmentation, ct, name, position_tolerance).frame_slices(segment_number)
    nx, ny, nz = ct.image.GetSize()
    mask = np.zeros((nz, ny, nx), dtype=np.uint8)
    if not frames.slice_of_frame:
        return mask
    # Frames placed by position have an ImagePositionPatient, and so do frames placed by reference
    # in a SEG with a frame of reference (highdicom's from_dataset requires it): the volume path
    # stacks any mix of the two.
    try:
        if frames.all_by_reference:
            # Spatial locations were checked per frame (a "NO" reference places nothing), and an
            # absent SpatialLocationsPreserved means YES here as before; highdicom would refuse it.
            stored = segmentation.get_pixels_by_source_instance(
                ct.sop_instance_uids,
                segment_numbers=[segment_number],
                ignore_spatial_locations=True,
                assert_missing_frames_are_empty=True,
                rescale_fractional=False,
                skip_overlap_checks=True,
            )[..., 0]
            slices = np.arange(nz)
        else:
            volume = segmentation.get_volume(
                segment_numbers=[segment_number], rescale_fractional=False, skip_overlap_checks=True
            )
            stored = volume.array[..., 0]
            slices = np.array([_ct_slice_of_point(ct, volume.affine @ (j, 0.0, 0.0, 1.0)) for j in range(len(stored))])
    except Exception as exc:  # decoders and highdicom's indexing raise anything on corrupt input
        raise DicomInputError(
            f"{name}: cannot decode the frames of segment {segment_number} ({_one_line(exc)})"
        ) from exc
    mask[slices] = _threshold(segmentation, stored, segment_number)
    stray = sorted(set(np.flatnonzero(mask.any(axis=(1, 2))).tolist()) - set(frames.slice_of_frame.values()))
    if stray:  # highdicom's stacking must agree with the frame-by-frame check above
        raise DicomInputError(
            f"{name}: segment {segment_number} fills CT slices {stray} that none of its frames lands on"
        )
    return mask


def _ct_slice_of_point(ct: CtSeries, point: NDArray[np.float64]) -> int:
    xyz = (float(point[0]), float(point[1]), float(point[2]))
    return int(np.rint(ct.image.TransformPhysicalPointToContinuousIndex(xyz)[2]))


def _threshold(segmentation: hd.seg.Segmentation, stored: NDArray[Any], segment_number: int) -> NDArray[np.uint8]:
    """Stored values → tumour (1) or not (0): fractions at least half the maximum, labels equal to the segment."""
    if segmentation.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP:
        # highdicom already maps a single requested segment of a label map to 0/1.
        return (stored > 0).astype(np.uint8)
    if segmentation.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        maximum = float(segmentation.MaximumFractionalValue)
        return (stored >= FRACTIONAL_THRESHOLD * maximum).astype(np.uint8)
    return (stored > 0).astype(np.uint8)


class _FrameChecker:
    """Finds the CT slice of every frame of a segment, refusing frames that do not land on one."""

    def __init__(
        self,
        segmentation: hd.seg.Segmentation,
        ct: CtSeries,
        name: str,
        position_tolerance: float,
    ):
        self._seg = segmentation
        self._ct = ct
        self._name = name
        self._position_tolerance = position_tolerance
        self._slice_of_instance = {uid: k for k, uid in enumerate(ct.sop_instance_uids)}
        self._size_xyz = ct.image.GetSize()
        direction = np.array(ct.image.GetDirection()).reshape(3, 3)
        self._ct_orientation = np.concatenate([direction[:, 0], direction[:, 1]])
        self._ct_pixel_spacing = np.array(ct.image.GetSpacing()[1::-1])  # rows, columns
        self._shared = segmentation.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        self._per_frame = segmentation.get("PerFrameFunctionalGroupsSequence", [])
        self._labelmap = segmentation.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP

    def frame_slices(self, segment_number: int) -> _FrameSlices:
        rows, columns = int(self._seg.Rows), int(self._seg.Columns)
        nx, ny, _ = self._size_xyz
        if (rows, columns) != (ny, nx):
            raise DicomInputError(
                f"{self._name} frames are {rows}×{columns}, CT series "
                f"{self._ct.series_instance_uid} slices are {ny}×{nx}"
            )
        slice_of_frame: dict[int, int] = {}
        frame_of_slice: dict[int, int] = {}
        all_by_reference = True
        for frame_number in range(1, int(self._seg.get("NumberOfFrames", 1)) + 1):
            if not self._frame_holds(frame_number, segment_number):
                continue
            k, by_reference = self._slice_index(frame_number)
            if k in frame_of_slice:
                raise DicomInputError(
                    f"{self._name}: frames {frame_of_slice[k]} and {frame_number} of segment "
                    f"{segment_number} both land on CT slice {k}"
                )
            frame_of_slice[k] = frame_number
            slice_of_frame[frame_number] = k
            all_by_reference = all_by_reference and by_reference
        return _FrameSlices(slice_of_frame, all_by_reference)

    def _functional_group(self, frame_number: int, keyword: str) -> Dataset | None:
        per_frame = self._per_frame[frame_number - 1] if self._per_frame else Dataset()
        for groups in (per_frame, self._shared):
            if keyword in groups and len(groups[keyword].value) > 0:
                item: Dataset = groups[keyword].value[0]
                return item
        return None

    def _frame_holds(self, frame_number: int, segment_number: int) -> bool:
        if self._labelmap:
            return True
        identification = self._functional_group(frame_number, "SegmentIdentificationSequence")
        if identification is None:
            raise DicomInputError(f"{self._name}: frame {frame_number} has no SegmentIdentificationSequence")
        return int(identification.ReferencedSegmentNumber) == segment_number

    def _slice_index(self, frame_number: int) -> tuple[int, bool]:
        """The frame's CT slice, and whether it was found by the frame's source reference."""
        by_reference = self._slice_by_reference(frame_number)
        position = self._functional_group(frame_number, "PlanePositionSequence")
        if position is None or "ImagePositionPatient" not in position:
            if by_reference is None:
                raise DicomInputError(
                    f"{self._name}: frame {frame_number} references no instance of CT series "
                    f"{self._ct.series_instance_uid} and has no ImagePositionPatient"
                )
            return by_reference, True
        if by_reference is not None:
            k = self._nearest_slice(position.ImagePositionPatient)
            if k != by_reference:
                raise DicomInputError(
                    f"{self._name}: frame {frame_number} references CT slice {by_reference} "
                    f"but its ImagePositionPatient lies on slice {k}"
                )
            return by_reference, True
        self._check_in_plane_geometry(frame_number)
        return self._slice_by_position(frame_number, position.ImagePositionPatient), False

    def _slice_by_reference(self, frame_number: int) -> int | None:
        derivation = self._functional_group(frame_number, "DerivationImageSequence")
        if derivation is None:
            return None
        slices = set()
        for source in derivation.get("SourceImageSequence", []):
            if source.get("SpatialLocationsPreserved", "YES") == "NO":
                continue
            k = self._slice_of_instance.get(str(source.get("ReferencedSOPInstanceUID", "")))
            if k is not None:
                slices.add(k)
        if len(slices) > 1:
            raise DicomInputError(f"{self._name}: frame {frame_number} references {len(slices)} CT slices")
        return slices.pop() if slices else None

    def _continuous_index(self, image_position: Sequence[float]) -> NDArray[np.float64]:
        point = tuple(float(v) for v in image_position)
        return np.array(self._ct.image.TransformPhysicalPointToContinuousIndex(point))

    def _nearest_slice(self, image_position: Sequence[float]) -> int:
        return int(np.rint(self._continuous_index(image_position)[2]))

    def _slice_by_position(self, frame_number: int, image_position: Sequence[float]) -> int:
        index = self._continuous_index(image_position)
        nearest = np.rint(index)
        off_grid = np.abs(index - nearest)
        on_corner = nearest[:2] == 0
        if off_grid.max() > self._position_tolerance or not on_corner.all():
            spacing = np.array(self._ct.image.GetSpacing())
            offset_mm = (index - np.array([0.0, 0.0, nearest[2]])) * spacing
            raise DicomInputError(
                f"{self._name}: frame {frame_number} at ImagePositionPatient "
                f"{[round(float(v), 3) for v in image_position]} does not land on a slice of CT "
                f"series {self._ct.series_instance_uid} (offset "
                f"{', '.join(f'{v:.3f}' for v in offset_mm)} mm along x, y, z from slice "
                f"{int(nearest[2])})"
            )
        k = int(nearest[2])
        if not 0 <= k < self._size_xyz[2]:
            raise DicomInputError(
                f"{self._name}: frame {frame_number} lies outside CT series "
                f"{self._ct.series_instance_uid} (slice index {k}, CT has {self._size_xyz[2]})"
            )
        return k

    def _check_in_plane_geometry(self, frame_number: int) -> None:
        orientation = self._functional_group(frame_number, "PlaneOrientationSequence")
        if orientation is not None and "ImageOrientationPatient" in orientation:
            values = np.array([float(v) for v in orientation.ImageOrientationPatient])
            if values.shape != (6,) or np.abs(values - self._ct_orientation).max() > _ORIENTATION_TOLERANCE:
                raise DicomInputError(
                    f"{self._name}: frame {frame_number} has ImageOrientationPatient "
                    f"{values.round(6).tolist()}, CT series {self._ct.series_instance_uid} has "
                    f"{self._ct_orientation.round(6).tolist()}"
                )
        measures = self._functional_group(frame_number, "PixelMeasuresSequence")
        if measures is not None and "PixelSpacing" in measures:
            spacing = np.array([float(v) for v in measures.PixelSpacing])
            if (
                spacing.shape != (2,)
                or np.abs(spacing / self._ct_pixel_spacing - 1).max() > _PIXEL_SPACING_RELATIVE_TOLERANCE
            ):
                raise DicomInputError(
                    f"{self._name}: frame {frame_number} has PixelSpacing {spacing.tolist()} mm, "
                    f"CT series {self._ct.series_instance_uid} has "
                    f"{self._ct_pixel_spacing.tolist()} mm"
                )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
