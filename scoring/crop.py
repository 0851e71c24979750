"""Crop first: the part of the CT that the ring and pyradiomics can see.

Scoring reads the tumour's bounding box plus a margin, never the whole scan,
so its cost grows with the tumour.  The margin (per axis, in voxels of the
CT) is the sum of

1. the ring's pad (``scoring.ring.ring_pad_voxels``): the ring reads the
   tumour's bounding box plus this pad, and lies inside it;
2. pyradiomics' own crop: with resampling (or ``preCrop``) pyradiomics keeps
   only the region's bounding box plus ``padDistance`` voxels (at the
   resampled spacing, plus one for rounding the grid) and runs every filter
   (wavelet, LoG, ...) on that crop alone, so the filters' support ends at
   its edge;
3. the interpolator's support in CT voxels: 1 for nearest neighbour and
   linear; for B-splines the kernel (order/2 + 1) plus the reach of the
   recursive prefilter ITK runs over the whole input, whose influence decays
   as ``|pole| ** distance`` (cubic: 0.268): far enough for 1e-12.

Extraction on such a crop gives the values of extraction on the whole
volume when pyradiomics crops before filtering (the pyradiomics grid is
computed in the whole volume's index space, ``scoring.features``).  It does
not when pyradiomics filters the whole image (no resampling and no
``preCrop``, where LoG's recursive Gaussian and the wavelet's periodic
padding reach the image edge) or normalises it (``normalize``: whole-image
mean and deviation), or for an interpolator without a known support; then
only the ring is computed on the crop and extraction sees the whole volume
(``CropPlan.extraction_in_crop`` is False and ``reason`` says why).

``tests/scoring/test_crop_equality.py`` checks crop-first against
whole-volume extraction on real and synthetic cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import SupportsIndex, SupportsInt, TypeVar

import numpy as np
import SimpleITK as sitk

from sclc_risk_node.scoring.errors import MaskError
from sclc_risk_node.scoring.ring import ring_pad_voxels
from sclc_risk_node.scoring.types import ExtractionSettings

# B-spline prefilter poles (Unser 1999) by spline order; the slowest decay decides the reach.
_BSPLINE_SLOWEST_POLE = {2: 0.171572875, 3: 0.267949192, 4: 0.361341226, 5: 0.430575347}
# Relative influence of the image beyond the crop on an interpolated value.
_PREFILTER_TOLERANCE = 1e-12
# sitk name -> B-spline order; sitkBSpline is the cubic.
_BSPLINE_ORDERS = {"sitkBSpline": 3, "sitkBSpline2": 2, "sitkBSpline3": 3, "sitkBSpline4": 4, "sitkBSpline5": 5}
_SHORT_SUPPORT = {"sitkNearestNeighbor": 1, "sitkLinear": 1, "sitkBSpline1": 1, "sitkLabelLinear": 1}

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class VolumeGrid:
    """The geometry of the uncropped volume, SimpleITK order (x, y, z), mm."""

    size: tuple[int, int, int]
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> VolumeGrid:
        """The grid of a 3-D ``image``; ``MaskError`` for any other dimension."""
        dimension: int = image.GetDimension()
        if dimension != 3:
            raise MaskError(f"tumour mask must be 3-D, got {dimension}-D")
        size: tuple[int, ...] = image.GetSize()
        origin_mm: tuple[float, ...] = image.GetOrigin()
        spacing_mm: tuple[float, ...] = image.GetSpacing()
        direction: tuple[float, ...] = image.GetDirection()
        return cls(
            _xyz(int(n) for n in size),
            _xyz(float(v) for v in origin_mm),
            _xyz(float(v) for v in spacing_mm),
            tuple(float(v) for v in direction),
        )

    def reference_image(self) -> sitk.Image:
        """A one-voxel image on this grid: its index <-> mm arithmetic is the whole volume's, bit for bit."""
        image: sitk.Image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        image.SetOrigin(self.origin_mm)
        image.SetSpacing(self.spacing_mm)
        image.SetDirection(self.direction)
        return image


@dataclass(frozen=True, slots=True)
class CropBox:
    """A box of ``grid`` in index space: voxels ``lower`` to ``lower + size - 1`` (x, y, z)."""

    lower: tuple[int, int, int]
    size: tuple[int, int, int]
    grid: VolumeGrid

    def apply(self, image: sitk.Image) -> sitk.Image:
        """The box cut from ``image`` (on ``grid``); the physical geometry is kept."""
        if tuple(image.GetSize()) != self.grid.size:
            raise MaskError(f"image of size {image.GetSize()} is not on the {self.grid.size} grid of the crop")
        cropped: sitk.Image = sitk.RegionOfInterest(image, list(self.size), list(self.lower))
        return cropped

    def paste(self, cropped: sitk.Image, reference: sitk.Image) -> sitk.Image:
        """``cropped`` put back on ``reference``'s whole grid, zero elsewhere."""
        whole: sitk.Image = sitk.Image(reference.GetSize(), cropped.GetPixelID())
        whole.CopyInformation(reference)
        pasted: sitk.Image = sitk.Paste(whole, cropped, cropped.GetSize(), [0, 0, 0], list(self.lower))
        return pasted

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))


@dataclass(frozen=True, slots=True)
class CropPlan:
    """Where to crop, and whether pyradiomics may run on the crop (else ``reason`` says why not)."""

    box: CropBox
    extraction_in_crop: bool
    reason: str = ""


def interpolator_support_voxels(interpolator: object) -> int | None:
    """CT voxels beyond the resampled grid that an interpolated value depends on; None if unknown."""
    name = _interpolator_name(interpolator)
    if name in _SHORT_SUPPORT:
        return _SHORT_SUPPORT[name]
    if name in _BSPLINE_ORDERS:
        order = _BSPLINE_ORDERS[name]
        prefilter = math.ceil(math.log(_PREFILTER_TOLERANCE) / math.log(_BSPLINE_SLOWEST_POLE[order]))
        return order // 2 + 1 + prefilter
    return None


def has_prefilter(interpolator: object) -> bool:
    """True for B-splines of order 2 and more: ITK prefilters the whole input image before interpolating."""
    return _interpolator_name(interpolator) in _BSPLINE_ORDERS


def plan_crop(tumour_mask: sitk.Image, settings: ExtractionSettings) -> CropPlan:
    """The crop for scoring ``tumour_mask`` (label 1) with ``settings``; see the module text for the margin."""
    grid = VolumeGrid.of(tumour_mask)
    lower_xyz, upper_xyz = _label_bounding_box(tumour_mask)
    ring_pad = ring_pad_voxels(grid.spacing_mm, settings.ring)
    reason = why_not_in_crop(settings.settings)
    if reason:
        margin = ring_pad
    else:
        extra = _pyradiomics_margin_voxels(grid.spacing_mm, settings.settings)
        margin = tuple(r + e for r, e in zip(ring_pad, extra))
    lower = _xyz(max(lo - m, 0) for lo, m in zip(lower_xyz, margin))
    upper = _xyz(min(hi + m, n - 1) for hi, m, n in zip(upper_xyz, margin, grid.size))
    size = _xyz(hi - lo + 1 for lo, hi in zip(lower, upper))
    return CropPlan(CropBox(lower, size, grid), not reason, reason)


def why_not_in_crop(settings: Mapping[str, object]) -> str:
    """Why pyradiomics, with these settings, needs the whole image; empty when a crop gives its values."""
    if settings.get("normalize", False):
        return "normalize is on: pyradiomics normalises with the whole image's mean and deviation"
    resampling = settings.get("interpolator") is not None and settings.get("resampledPixelSpacing") is not None
    if not resampling and not settings.get("preCrop", False):
        return "no resampling and no preCrop: pyradiomics filters the whole image"
    if resampling and interpolator_support_voxels(settings["interpolator"]) is None:
        return f"interpolator {settings['interpolator']!r} has no known support"
    return ""


def _pyradiomics_margin_voxels(spacing_mm: tuple[float, ...], settings: Mapping[str, object]) -> tuple[int, ...]:
    pad = _int_setting(settings, "padDistance", 5)
    resampled = settings.get("resampledPixelSpacing")
    if settings.get("interpolator") is None or resampled is None:
        return tuple(pad for _ in spacing_mm)
    if not isinstance(resampled, Iterable):
        raise TypeError(f"pyradiomics setting resampledPixelSpacing must be a list, got {resampled!r}")
    support = interpolator_support_voxels(settings["interpolator"])
    if support is None:
        # why_not_in_crop keeps such settings off the crop; plan_crop asks it first.
        raise ValueError(f"interpolator {settings['interpolator']!r} has no known support")
    margin = []
    for s, r in zip(spacing_mm, resampled):
        r_mm = float(r) or s  # 0 keeps the original spacing in pyradiomics
        # pad + 1 resampled voxels for the rounding of the grid, +1 CT voxel for the half-voxel shift.
        margin.append(int(math.ceil((pad + 1) * max(r_mm, s) / s)) + 1 + support)
    return tuple(margin)


def _int_setting(settings: Mapping[str, object], key: str, default: int) -> int:
    """``int(settings[key])`` as pyradiomics reads it; a value ``int()`` cannot take is a TypeError, as in ``int()``."""
    value = settings.get(key, default)
    if not isinstance(value, (str, bytes, SupportsInt, SupportsIndex)):
        raise TypeError(f"pyradiomics setting {key} must be an integer, got {value!r}")
    return int(value)


def _label_bounding_box(mask: sitk.Image) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Lowest and highest index (x, y, z) holding label 1."""
    if mask.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64):
        mask = sitk.Cast(mask == 1, sitk.sitkUInt8)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.ComputePerimeterOff()
    statistics.Execute(mask)  # in C++, without a whole-volume numpy temporary
    if 1 not in statistics.GetLabels():
        raise MaskError("tumour mask is empty: no voxel is labelled 1")
    box: tuple[int, ...] = statistics.GetBoundingBox(1)  # x, y, z lower, then sizes
    lower = _xyz(int(v) for v in box[:3])
    return lower, _xyz(lo + int(n) - 1 for lo, n in zip(lower, box[3:]))


def _xyz(values: Iterable[_T]) -> tuple[_T, _T, _T]:
    """The three (x, y, z) values of a 3-D grid quantity."""
    x, y, z = values
    return x, y, z


def _interpolator_name(interpolator: object) -> str:
    if isinstance(interpolator, str):
        return interpolator
    for name in list(_SHORT_SUPPORT) + list(_BSPLINE_ORDERS):
        if getattr(sitk, name, None) == interpolator:
            return name
    return str(interpolator)
