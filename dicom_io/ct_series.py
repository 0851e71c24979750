"""Read a folder of single-frame CT Image Storage files into one HU volume.

The folder is walked recursively (PACS exports and DICOMDIR media nest series
in sub-folders).  Only DICOM Part-10 files (``DICM`` at byte 128) are
considered; anything else (README.txt, .DS_Store, AppleDouble ``._*`` files)
is skipped without a word, as are DICOMDIR files and instances of other
series (a SEG or SR stored next to the CT).  A Part-10 file whose header
cannot be parsed, or that lacks the UIDs every instance carries, is refused
rather than skipped: it might be the slice that would otherwise show up as a
puzzling gap.

Headers are indexed with ``stop_before_pixels``; pixel data is decoded only
for the chosen series, through pydicom's plugins (JPEG lossless, JPEG-LS,
JPEG 2000, RLE, deflate, implicit VR, big endian).

Geometry follows the Image Plane module: slices are sorted by their position
projected on the slice normal (row cosine × column cosine), never by
InstanceNumber or SliceLocation, and the z spacing is the measured distance
between slice positions, never SliceThickness.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.misc import is_dicom
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
    RLELossless,
)

from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries

_MULTI_FRAME_CT_CLASSES = {EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
#: DS values carry ~6 decimals; direction cosines off by more than this are a real difference.
_ORIENTATION_TOLERANCE = 1e-4
_PIXEL_SPACING_RELATIVE_TOLERANCE = 1e-4
_GANTRY_TILT_TOLERANCE_DEG = 1e-3
_DUPLICATE_POSITION_MM = 1e-3


#: Encapsulated transfer syntaxes that are lossless by definition (PS3.5 section 8 and annex A.4).
_LOSSLESS_ENCAPSULATED = frozenset(
    {
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000MCLossless,
        HTJ2KLossless,
        HTJ2KLosslessRPCL,
        RLELossless,
    }
)
#: Transfer syntaxes that allow either lossless or lossy coding; Lossy Image Compression
#: (0028,2110) "00" is then the only statement that this image was coded losslessly.
_LOSSLESS_OR_LOSSY = frozenset({JPEG2000, JPEG2000MC, HTJ2K})


def lossy_compression_reason(header: Dataset) -> str | None:
    """Why an instance counts as lossy-compressed, or None.

    Lossy when Lossy Image Compression (0028,2110) is "01" (the image has been
    lossy-compressed at some time, even if it is stored uncompressed now), or
    when the transfer syntax is an encapsulated one that is not lossless by
    definition: JPEG baseline/extended (1.2.840.10008.1.2.4.50/.51), JPEG-LS
    near-lossless (.81), MPEG/HEVC video, and JPEG 2000 / HTJ2K "lossless or
    lossy" (.91, .93, .203) unless the header says "00".  Lossy coding of a CT
    changes texture features: the abuse run saw 6-month PFS move from 27 % to
    47 % with JPEG baseline quality 60.
    """
    flag = str(header.get("LossyImageCompression", "") or "").strip()
    transfer_syntax = UID(str(getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID", "") or ""))
    if flag == "01":
        return 'Lossy Image Compression (0028,2110) is "01"'
    if not transfer_syntax or not transfer_syntax.is_encapsulated or transfer_syntax in _LOSSLESS_ENCAPSULATED:
        return None
    if transfer_syntax in _LOSSLESS_OR_LOSSY and flag == "00":
        return None
    return f"transfer syntax {transfer_syntax.name} ({transfer_syntax}) is lossy"


@dataclass(frozen=True, slots=True)
class _IndexedFile:
    path: Path
    name: str  # relative to the folder read: messages must not echo absolute paths
    header: Dataset


def read_ct_series(
    folder: Path,
    series_instance_uid: str | None = None,
    *,
    spacing_tolerance: float = 0.01,
    recursive: bool = True,
    allow_lossy: bool = False,
) -> CtSeries:
    """Read the CT series in ``folder`` (or the one with ``series_instance_uid``) as HU.

    ``spacing_tolerance`` is relative: every gap between consecutive slices
    must lie within ``spacing_tolerance`` × the median gap, and the in-plane
    offset between consecutive slices (a sheared stack, as from gantry tilt)
    must not exceed ``spacing_tolerance`` × the gap.

    A lossy-compressed series (`lossy_compression_reason`) is refused, naming
    the file and why, unless ``allow_lossy``; then it is read and the result's
    ``lossy_compression`` is True.  Checked on the headers, before decoding.

    Raises ``DicomInputError`` naming the folder, series UID or file and the
    problem, for every input that cannot give one regular 3D CT volume.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomInputError(f"CT folder {folder} does not exist or is not a folder")
    indexed = _index_folder(folder, recursive=recursive)
    if not indexed:
        raise DicomInputError(f"no DICOM files in {folder}")
    by_series: dict[str, list[_IndexedFile]] = defaultdict(list)
    for item in indexed:
        by_series[str(item.header.SeriesInstanceUID)].append(item)
    chosen_uid = _choose_series(folder, by_series, series_instance_uid)
    slices = _deduplicate_instances(by_series[chosen_uid])
    for item in slices:
        _check_single_frame_ct(item, chosen_uid)
    lossy = [(item.name, reason) for item in slices if (reason := lossy_compression_reason(item.header))]
    if lossy and not allow_lossy:
        name, reason = lossy[0]
        raise DicomInputError(
            f"series {chosen_uid}: lossy-compressed CT is refused ({len(lossy)} of {len(slices)} instances; "
            f"{name}: {reason}); lossy compression changes the radiomics features. "
            "Send the original (uncompressed or lossless) series, or set scoring.allow_lossy_ct = true "
            "to score it with a lossy-compression flag"
        )
    if len(slices) < 2:
        raise DicomInputError(f"series {chosen_uid} has {len(slices)} slice; a CT volume needs at least 2")
    geometry = _SeriesGeometry.from_slices(chosen_uid, slices, spacing_tolerance)
    ordered = [slices[i] for i in geometry.order]
    image = _decode_hu_volume(ordered, geometry)
    first = ordered[0].header
    return CtSeries(
        image=image,
        headers=tuple(item.header for item in ordered),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=chosen_uid,
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        source_paths=tuple(item.path for item in ordered),
        lossy_compression=bool(lossy),
    )


def _index_folder(folder: Path, *, recursive: bool) -> list[_IndexedFile]:
    indexed = []
    for path in _candidate_files(folder, recursive=recursive):
        if not _is_part10_file(path):
            continue
        name = str(path.relative_to(folder))
        header = _read_header(path, name)
        if header is None:
            continue
        indexed.append(_IndexedFile(path, name, header))
    return indexed


def _candidate_files(folder: Path, *, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file())
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / f for f in sorted(files))
    return found


def _is_part10_file(path: Path) -> bool:
    """A DICOM Part 10 file (preamble + "DICM"): anything else in the folder is skipped unread."""
    try:
        return is_dicom(path)
    except OSError:  # a dangling link or an unreadable file is no CT instance either
        return False


def _read_header(path: Path, name: str) -> Dataset | None:
    """The header without pixel data, or None for a DICOMDIR."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise DicomInputError(f"{name}: corrupt DICOM file ({_one_line(exc)})") from exc
    meta = getattr(header, "file_meta", Dataset())
    if meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        return None
    # pydicom returns a partial dataset for a truncated header instead of raising.
    missing = [keyword for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID") if not header.get(keyword)]
    if "TransferSyntaxUID" not in meta:
        missing.insert(0, "TransferSyntaxUID")
    if missing:
        raise DicomInputError(f"{name}: corrupt or truncated DICOM file (no {', '.join(missing)})")
    return header


def _choose_series(folder: Path, by_series: dict[str, list[_IndexedFile]], requested_uid: str | None) -> str:
    def describe(uid: str) -> str:
        return f"{uid} ({_modality_of(by_series[uid])}, {len(by_series[uid])} instances)"

    if requested_uid is not None:
        requested_uid = requested_uid.strip()
        if requested_uid not in by_series:
            present = ", ".join(describe(uid) for uid in by_series)
            raise DicomInputError(f"series {requested_uid} not found in {folder}; series present: {present}")
        modality = _modality_of(by_series[requested_uid])
        if modality != "CT":
            raise DicomInputError(f"series {requested_uid}: modality {modality} is not CT")
        return requested_uid
    ct_uids = [uid for uid, items in by_series.items() if _modality_of(items) == "CT"]
    if not ct_uids:
        others = "; ".join(
            f"modality {_modality_of(items)} is not CT (series {uid}, {len(items)} instances)"
            for uid, items in by_series.items()
        )
        raise DicomInputError(f"no CT series in {folder}: {others}")
    if len(ct_uids) > 1:
        listing = ", ".join(f"{uid} ({len(by_series[uid])} instances)" for uid in ct_uids)
        raise DicomInputError(f"{len(ct_uids)} CT series in {folder}; choose one by series_instance_uid: {listing}")
    return ct_uids[0]


def _modality_of(items: list[_IndexedFile]) -> str:
    modalities = sorted({str(item.header.get("Modality", "") or "unknown") for item in items})
    return "/".join(modalities)


def _deduplicate_instances(items: list[_IndexedFile]) -> list[_IndexedFile]:
    # The same instance stored twice (a re-sent C-STORE, a copied export) is one slice.
    first_by_uid: dict[str, _IndexedFile] = {}
    for item in items:
        first_by_uid.setdefault(str(item.header.SOPInstanceUID), item)
    return list(first_by_uid.values())


def _check_single_frame_ct(item: _IndexedFile, series_uid: str) -> None:
    header = item.header
    sop_class = header.SOPClassUID
    if sop_class in _MULTI_FRAME_CT_CLASSES or int(header.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomInputError(
            f"series {series_uid}: {item.name} is a multi-frame CT ({sop_class.name}); "
            "only single-frame CT Image Storage is supported"
        )
    if sop_class != CTImageStorage:
        raise DicomInputError(f"series {series_uid}: {item.name} has SOP class {sop_class.name}, not CT Image Storage")
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "FrameOfReferenceUID",
    ):
        if header.get(keyword) in (None, ""):
            raise DicomInputError(f"series {series_uid}: {item.name} has no {keyword} (incomplete or truncated header)")
    samples = int(header.get("SamplesPerPixel", 1))
    if samples != 1:
        raise DicomInputError(f"series {series_uid}: {item.name} has {samples} samples per pixel; CT must be greyscale")
    tilt = float(header.get("GantryDetectorTilt", 0) or 0)
    if abs(tilt) > _GANTRY_TILT_TOLERANCE_DEG:
        raise DicomInputError(f"series {series_uid}: gantry tilt of {tilt:g}° in {item.name} is not supported")


@dataclass(frozen=True, slots=True)
class _SeriesGeometry:
    order: tuple[int, ...]  # indices into the input slices, sorted along the normal
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]  # x (between columns), y (between rows), z
    direction: tuple[float, ...]  # row-major 3×3, columns = row cosine, column cosine, normal
    rows: int
    columns: int

    @classmethod
    def from_slices(cls, series_uid: str, slices: list[_IndexedFile], spacing_tolerance: float) -> _SeriesGeometry:
        reference = slices[0]
        row_cosine, column_cosine = _orientation(reference, series_uid)
        pixel_spacing = [float(v) for v in reference.header.PixelSpacing]
        rows, columns = int(reference.header.Rows), int(reference.header.Columns)
        frame_of_reference = str(reference.header.FrameOfReferenceUID)
        for item in slices[1:]:
            _check_consistent(
                series_uid,
                reference,
                item,
                row_cosine,
                column_cosine,
                pixel_spacing,
                rows,
                columns,
                frame_of_reference,
            )
        normal = np.cross(row_cosine, column_cosine)
        positions = np.array([[float(v) for v in item.header.ImagePositionPatient] for item in slices])
        along_normal = positions @ normal
        order = np.argsort(along_normal, kind="stable")
        sorted_positions = positions[order]
        sorted_along = along_normal[order]
        names = [slices[i].name for i in order]
        z_spacing = _check_regular_stack(series_uid, sorted_positions, sorted_along, normal, names, spacing_tolerance)
        direction = np.column_stack([row_cosine, column_cosine, normal])
        return cls(
            order=tuple(int(i) for i in order),
            origin=(float(sorted_positions[0][0]), float(sorted_positions[0][1]), float(sorted_positions[0][2])),
            spacing=(pixel_spacing[1], pixel_spacing[0], z_spacing),
            direction=tuple(float(v) for v in direction.ravel()),
            rows=rows,
            columns=columns,
        )


def _orientation(item: _IndexedFile, series_uid: str) -> tuple[np.ndarray, np.ndarray]:
    values = [float(v) for v in item.header.ImageOrientationPatient]
    if len(values) != 6:
        raise DicomInputError(
            f"series {series_uid}: {item.name} has {len(values)} ImageOrientationPatient values, not 6"
        )
    row_cosine, column_cosine = np.array(values[:3]), np.array(values[3:])
    if (
        abs(np.linalg.norm(row_cosine) - 1) > _ORIENTATION_TOLERANCE
        or abs(np.linalg.norm(column_cosine) - 1) > _ORIENTATION_TOLERANCE
        or abs(row_cosine @ column_cosine) > _ORIENTATION_TOLERANCE
    ):
        raise DicomInputError(
            f"series {series_uid}: ImageOrientationPatient {values} in {item.name} is not two orthogonal unit vectors"
        )
    # Renormalise so the SimpleITK direction is orthonormal despite DS rounding.
    row_cosine /= np.linalg.norm(row_cosine)
    column_cosine -= (column_cosine @ row_cosine) * row_cosine
    column_cosine /= np.linalg.norm(column_cosine)
    return row_cosine, column_cosine


def _check_consistent(
    series_uid: str,
    reference: _IndexedFile,
    item: _IndexedFile,
    row_cosine: np.ndarray,
    column_cosine: np.ndarray,
    pixel_spacing: list[float],
    rows: int,
    columns: int,
    frame_of_reference: str,
) -> None:
    def inconsistent(what: str) -> DicomInputError:
        return DicomInputError(f"series {series_uid}: inconsistent {what} between {reference.name} and {item.name}")

    header = item.header
    orientation = np.array([float(v) for v in header.ImageOrientationPatient])
    if (
        orientation.shape != (6,)
        or np.abs(orientation - np.concatenate([row_cosine, column_cosine])).max() > _ORIENTATION_TOLERANCE
    ):
        raise inconsistent("ImageOrientationPatient")
    spacing = np.array([float(v) for v in header.PixelSpacing])
    if spacing.shape != (2,) or np.abs(spacing / pixel_spacing - 1).max() > _PIXEL_SPACING_RELATIVE_TOLERANCE:
        raise inconsistent("PixelSpacing")
    if (int(header.Rows), int(header.Columns)) != (rows, columns):
        raise inconsistent("Rows/Columns")
    if str(header.FrameOfReferenceUID) != frame_of_reference:
        raise inconsistent("FrameOfReferenceUID")


def _check_regular_stack(
    series_uid: str,
    positions: np.ndarray,
    along_normal: np.ndarray,
    normal: np.ndarray,
    names: list[str],
    spacing_tolerance: float,
) -> float:
    """The measured z spacing of a stack sorted along ``normal``; raises on gaps, duplicates, shear."""
    gaps = np.diff(along_normal)
    nominal = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if gap <= max(spacing_tolerance * nominal, _DUPLICATE_POSITION_MM):
            raise DicomInputError(
                f"series {series_uid}: duplicate slice position {along_normal[k]:.3f} mm "
                f"along the slice normal ({names[k]}, {names[k + 1]})"
            )
    for k, gap in enumerate(gaps):
        if abs(gap - nominal) > spacing_tolerance * nominal:
            raise DicomInputError(
                f"series {series_uid}: missing slice or irregular spacing: gap of {gap:.3f} mm "
                f"between slices at {along_normal[k]:.3f} mm and {along_normal[k + 1]:.3f} mm "
                f"along the slice normal ({names[k]}, {names[k + 1]}); "
                f"expected {nominal:.3f} mm ± {spacing_tolerance:.0%}"
            )
    steps = np.diff(positions, axis=0)
    in_plane_offsets = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    for k, offset in enumerate(in_plane_offsets):
        if offset > spacing_tolerance * gaps[k]:
            raise DicomInputError(
                f"series {series_uid}: slices are not stacked along the slice normal "
                f"(in-plane shift of {offset:.3f} mm between {names[k]} and {names[k + 1]}); "
                "gantry tilt or sheared stacks are not supported"
            )
    return float((along_normal[-1] - along_normal[0]) / (len(along_normal) - 1))


def _decode_hu_volume(ordered: list[_IndexedFile], geometry: _SeriesGeometry) -> sitk.Image:
    """HU volume: int16 when every rescaled value is integral and fits (the usual CT), else float32.

    Slices are rescaled one at a time into one preallocated volume, so the
    whole volume is never held as float64 (512 slices of 512×512 would be
    2 GiB while stacking) and peak memory is two int16 copies, briefly, in
    ``GetImageFromArray``.
    """
    int16 = np.iinfo(np.int16)
    volume = np.empty((len(ordered), geometry.rows, geometry.columns), dtype=np.int16)
    for k, item in enumerate(ordered):
        stored = _decode_pixels(item, geometry)
        slope = float(item.header.get("RescaleSlope", 1) or 1)
        intercept = float(item.header.get("RescaleIntercept", 0) or 0)
        hu = stored.astype(np.float64) * slope + intercept
        if volume.dtype == np.int16 and not (
            slope.is_integer() and intercept.is_integer() and hu.min() >= int16.min and hu.max() <= int16.max
        ):
            # Non-integral rescale, or integral values beyond int16 (rare 16-bit unsigned data).
            volume = volume.astype(np.float32)
        volume[k] = hu
    image = sitk.GetImageFromArray(volume)
    del volume
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    return image


def _decode_pixels(item: _IndexedFile, geometry: _SeriesGeometry) -> np.ndarray:
    try:
        dataset = pydicom.dcmread(item.path)
        transfer_syntax = dataset.file_meta.TransferSyntaxUID
        pixels = dataset.pixel_array
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        raise DicomInputError(f"{item.name}: cannot decode pixel data ({_one_line(exc)})") from exc
    if pixels.shape != (geometry.rows, geometry.columns):
        raise DicomInputError(
            f"{item.name}: pixel data has shape {pixels.shape}, expected "
            f"{geometry.rows}×{geometry.columns} ({transfer_syntax.name})"
        )
    return pixels


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
