"""What `dicom_io` hands the rest of the node after reading a study.

No pixel data is kept in the headers: they exist so the SR writer can cite
the evidence (highdicom needs the datasets) and so the node can index them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class CtSeries:
    """A CT series as one volume in HU.

    ``image`` is a SimpleITK image (LPS, mm): ``sitkInt16`` when the rescale
    is integral, else ``sitkFloat32``; slices sorted along the slice normal.
    ``headers`` are the instances' datasets without Pixel Data, in the same
    slice order as ``image`` (slice k ↔ headers[k]).
    """

    image: sitk.Image
    headers: tuple[Dataset, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    source_paths: tuple[Path, ...]
    #: True when any instance was lossy-compressed (a lossy transfer syntax, or
    #: LossyImageCompression "01").  Such a series is refused unless the
    #: configuration allows lossy input; then the SR and JSON carry this flag.
    lossy_compression: bool = False

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(str(h.SOPInstanceUID) for h in self.headers)


@dataclass(frozen=True)
class TumourSegment:
    """The tumour segment of a DICOM SEG, as a binary mask on exactly the CT grid.

    ``mask`` is ``sitkUInt8`` (1 = tumour) with the CT image's size, origin,
    spacing and direction.  ``segmentation`` is the parsed highdicom object,
    kept for the SR's references.
    """

    mask: sitk.Image
    segmentation: hd.seg.Segmentation
    segment_number: int
    segment_label: str
    source_path: Path | None = None

    @property
    def kind(self) -> str:
        return "SEG"

    @property
    def sop_instance_uid(self) -> str:
        return str(self.segmentation.SOPInstanceUID)


@dataclass(frozen=True)
class TumourStructure:
    """The tumour ROI of an RT Structure Set (RTSTRUCT), as a binary mask on exactly the CT grid.

    ``mask`` is ``sitkUInt8`` (1 = tumour) with the CT image's geometry (see
    dicom_io.rtstruct).  ``dataset`` is the RTSTRUCT, kept for the SR's
    references; ``contours_mm`` are the ROI's CLOSED_PLANAR contours that
    were rasterised, N×3 arrays of patient coordinates (mm) in
    ``frame_of_reference_uid``.  ``segment_label`` / ``segment_number`` name
    the ROI the way a `TumourSegment` names its segment.
    """

    mask: sitk.Image
    dataset: Dataset
    roi_number: int
    roi_name: str
    contours_mm: tuple[np.ndarray, ...]
    frame_of_reference_uid: str
    source_path: Path | None = None

    @property
    def kind(self) -> str:
        return "RTSTRUCT"

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def segment_label(self) -> str:
        return self.roi_name

    @property
    def segment_number(self) -> int:
        return self.roi_number


#: Either tumour source; both carry ``mask``, ``kind``, ``sop_instance_uid``, ``segment_label``, ``segment_number``.
TumourSource = TumourSegment | TumourStructure
