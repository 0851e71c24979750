"""The key slice of a study: the CT image with the largest tumour cross-section, and the outline there.

The outline is what viewers draw: the SR's planar ROI (SCOORD POLYLINE), the
summary page and the secondary capture.  Contours come from contourpy (the
marching-squares library matplotlib itself uses), traced at the 0.5
iso-level of the binary mask, so the line runs midway between tumour and
background pixel centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import contourpy
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from sclc_risk_node.dicom_io.inputs import CtSeries


@dataclass(frozen=True)
class KeySlice:
    """Slice ``index`` of the CT (``ct.headers[index]`` is its image) and the tumour outline on it.

    ``outlines_px`` are closed polylines (first point == last) in DICOM
    SCOORD pixel coordinates: (column, row), with (0, 0) the top-left corner
    of the top-left pixel, so pixel (c, r) has its centre at (c + 0.5, r + 0.5)
    (PS3.3 C.18.6.1.1).  The largest outline comes first.  ``area_mm2`` is
    the tumour's pixel count on the slice times the pixel area.
    """

    index: int
    header: Dataset
    outlines_px: tuple[np.ndarray, ...]
    area_mm2: float

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


def mask_outlines_px(mask_slice: np.ndarray) -> tuple[np.ndarray, ...]:
    """Closed outlines of a 2-D binary mask (rows × columns), largest enclosed area first."""
    # One pixel of background around the slice closes outlines that touch the image edge.
    padded = np.pad((np.asarray(mask_slice) > 0).astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    outlines = []
    for line in generator.lines(0.5):
        points = np.asarray(line, dtype=np.float64) - 1.0 + 0.5  # undo the pad; index -> SCOORD (centre +0.5)
        if not np.array_equal(points[0], points[-1]):
            points = np.vstack([points, points[:1]])
        if len(points) >= 4:
            outlines.append(points)
    return tuple(sorted(outlines, key=lambda p: -abs(_shoelace_area(p))))


def _shoelace_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def find_key_slice(ct: CtSeries, mask: sitk.Image) -> KeySlice:
    """The slice with the most tumour pixels (the first such slice on a tie).

    ``mask`` is the tumour mask on the CT grid (``TumourSegment.mask``).
    Raises ``ValueError`` for an empty mask or one not on the CT grid.
    """
    if mask.GetSize() != ct.image.GetSize():
        raise ValueError(f"tumour mask size {mask.GetSize()} is not the CT's {ct.image.GetSize()}")
    array = sitk.GetArrayViewFromImage(mask)  # (slices, rows, columns)
    pixels_per_slice = (array > 0).reshape(array.shape[0], -1).sum(axis=1)
    if not pixels_per_slice.any():
        raise ValueError("the tumour mask is empty; there is no key slice")
    index = int(np.argmax(pixels_per_slice))
    spacing_x_mm, spacing_y_mm = mask.GetSpacing()[:2]
    return KeySlice(
        index=index,
        header=ct.headers[index],
        outlines_px=mask_outlines_px(array[index]),
        area_mm2=float(pixels_per_slice[index]) * spacing_x_mm * spacing_y_mm,
    )
