"""The peritumoral ring: a shell straddling the tumour border, defined in millimetres.

Method ``signed-distance-mm``: a voxel belongs to the ring when its centre's
signed Euclidean distance to the tumour surface, in mm, lies in
``(-inward_mm, +outward_mm]`` (negative inside the tumour).  Because the
distance is physical, the ring is the same at 0.7 mm and at 5 mm slices,
where a 2 mm morphological radius would be 0 voxels in z.

The surface is not the voxel staircase: distances between voxel centres
are off by up to half a voxel, direction-dependently on anisotropic grids,
which on a 4 mm shell means ring volumes 10-35 % too small.  So a smooth
surface is reconstructed from the mask and distances are measured to it:

1. Per slice (along the coarsest axis), the 2-D signed distance to the tumour
   outline, which runs half-way between tumour and background voxel centres.
   A light Gaussian smoothing removes the voxel staircase (not across thick
   slices, which carry no staircase worth smoothing).
2. Between two tumour slices, the blend of their distance maps (shape-based
   interpolation), shifted so that the cross-section area follows a cubic
   through the neighbouring slices' areas; a plain blend cuts straight
   chords through a curved surface, which at 5 mm slices costs several %.
3. Beyond the last tumour slice, the outline shrinks until the extrapolated
   area reaches zero (``_closing_area``), so a sphere's cap ends near where
   the sphere does, not flat at the voxel face.
4. Points on the surface are sampled on a ~0.35 mm grid; a voxel's distance
   is the distance to the tangent plane at the nearest surface point.

Measured on analytic sphere shells (``tests/scoring/test_ring.py``) the ring
volume is within 2 % on 0.7 and 1 mm isotropic grids.  With 5 mm slices the
ring is sampled once per 5 mm in z, so even exact distances give volumes that
depend on where the sphere sits between slices (-5 % to +3 % for r = 8 mm);
the ring follows those exact-distance volumes to within ~2 %.

A tumour touching the image edge is assumed to continue beyond the field of
view (the mask is extended by edge replication), so no ring is drawn along
the cut face; the ring is clipped to the image grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from sclc_risk_node.scoring.errors import MaskError
from sclc_risk_node.scoring.types import RingDefinition

SIGNED_DISTANCE_MM = "signed-distance-mm"
RING_METHODS = (SIGNED_DISTANCE_MM,)

# Surface sampling step: small against a 2 mm margin, large enough to stay fast.
_SURFACE_STEP_MM = 0.35
# Upper bound on the supersampled working grid (float32: 64 MB); beyond it the
# step grows, which costs far less accuracy than it saves memory.
_MAX_SURFACE_GRID_VOXELS = 16_000_000
# Gaussian sigma, in voxels, that removes the voxel staircase without visibly
# shrinking convex shapes (tuned on spheres of 8-20 mm at 0.7-1 mm voxels).
_STAIRCASE_SIGMA_VOXELS = 0.75
# An axis is "thick" (no smoothing across it) when its spacing exceeds the
# in-plane spacing by this factor.
_THICK_SLICE_RATIO = 1.5
# Stand-in for "no tumour in this slice" in the per-slice distance maps (mm).
_FAR_MM = 1.0e4


def describe_ring(ring: RingDefinition) -> str:
    """One line for reports, e.g. ``2 mm outside to 2 mm inside the tumour border (signed-distance-mm)``."""
    return (
        f"{_format_mm(ring.outward_mm)} mm outside to {_format_mm(ring.inward_mm)} mm inside "
        f"the tumour border ({ring.method})"
    )


def peritumoral_ring(tumour_mask: sitk.Image, ring: RingDefinition) -> sitk.Image:
    """The ring around ``tumour_mask`` as a ``sitkUInt8`` 0/1 mask on exactly the same grid.

    Raises ``MaskError`` for an empty or unusable tumour mask, an unknown
    method, or a ring that comes out empty.
    """
    if ring.method != SIGNED_DISTANCE_MM:
        raise MaskError(f"unknown ring method {ring.method!r}; supported: {', '.join(RING_METHODS)}")
    tumour = _tumour_array(tumour_mask)
    spacing_xyz_mm: tuple[float, float, float] = tumour_mask.GetSpacing()
    spacing_mm = np.array(spacing_xyz_mm[::-1], dtype=np.float64)  # array (z, y, x) order

    ring_array = _signed_distance_ring(tumour, spacing_mm, ring.outward_mm, ring.inward_mm)
    if not ring_array.any():
        raise MaskError(
            f"peritumoral ring is empty ({describe_ring(ring)}): no voxel centre of the "
            f"{_format_spacing(spacing_xyz_mm)} mm grid lies in it (ring too thin for the grid, "
            "or no tumour border inside the image)"
        )
    result: sitk.Image = sitk.GetImageFromArray(ring_array.astype(np.uint8))
    result.CopyInformation(tumour_mask)
    return result


def _tumour_array(tumour_mask: sitk.Image) -> NDArray[np.bool_]:
    if not isinstance(tumour_mask, sitk.Image):
        raise MaskError(f"tumour mask must be a SimpleITK image, got {type(tumour_mask).__name__}")
    if tumour_mask.GetDimension() != 3:
        raise MaskError(f"tumour mask must be 3-D, got {tumour_mask.GetDimension()}-D")
    if tumour_mask.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError("tumour mask must have scalar pixels, got a vector image")
    pixel_type: int = tumour_mask.GetPixelIDValue()
    if pixel_type not in _INTEGER_PIXEL_TYPES:
        raise MaskError(f"tumour mask must have an integer pixel type, got {tumour_mask.GetPixelIDTypeAsString()}")
    spacing: tuple[float, float, float] = tumour_mask.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MaskError(f"tumour mask spacing must be finite and positive, got {spacing}")
    direction_cosines: tuple[float, ...] = tumour_mask.GetDirection()
    direction = np.array(direction_cosines, dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise MaskError("tumour mask direction cosines are not orthonormal")

    values: NDArray[np.integer] = sitk.GetArrayViewFromImage(tumour_mask)
    if values.min() < 0 or values.max() > 1:
        labels = np.unique(values).tolist()
        raise MaskError(f"tumour mask must hold only 0 and 1, found labels {labels[:10]}")
    tumour: NDArray[np.bool_] = values == 1
    if not tumour.any():
        raise MaskError("tumour mask is empty: no voxel is labelled 1")
    return tumour


_INTEGER_PIXEL_TYPES = {
    sitk.sitkUInt8,
    sitk.sitkInt8,
    sitk.sitkUInt16,
    sitk.sitkInt16,
    sitk.sitkUInt32,
    sitk.sitkInt32,
    sitk.sitkUInt64,
    sitk.sitkInt64,
}


def _signed_distance_ring(
    tumour: NDArray[np.bool_], spacing_mm: NDArray[np.float64], outward_mm: float, inward_mm: float
) -> NDArray[np.bool_]:
    # Put the coarsest axis first: it is the one slices are interpolated across.
    slice_axis = int(np.argmax(spacing_mm))
    order = [slice_axis] + [a for a in range(3) if a != slice_axis]
    tumour_sl = np.transpose(tumour, order)
    spacing_sl = spacing_mm[order]

    lower, upper = _padded_box(tumour_sl, _pad_voxels(spacing_sl, outward_mm, inward_mm))
    work = _crop_with_edge_replication(tumour_sl, lower, upper)

    level, areas_mm2, caps = _surface_function(work, spacing_sl)
    points_mm, normals = _surface_points_mm(level, areas_mm2, caps, spacing_sl)

    ring_work = np.zeros(work.shape, dtype=bool)
    if len(points_mm):
        # The surface passes within a voxel diagonal of a tumour voxel centre
        # (plus a little for the smoothing), so ring voxels lie within this reach.
        reach_mm = max(outward_mm, inward_mm) + float(np.linalg.norm(spacing_sl) + spacing_sl[1:].max())
        near = _near_border(work, spacing_sl, reach_mm)
        index = np.nonzero(near)
        centres_mm = np.stack(index, axis=1) * spacing_sl
        distance_mm = _distance_to_surface_mm(
            centres_mm, points_mm, normals, max(outward_mm, inward_mm) + float(spacing_sl.max())
        )
        # The mask decides the side, so the ring is exactly "grown minus shrunk" as sets.
        signed_mm = np.where(work[index], -distance_mm, distance_mm)
        ring_work[index] = (signed_mm > -inward_mm) & (signed_mm <= outward_mm)

    ring_sl = np.zeros(tumour_sl.shape, dtype=bool)
    inside = tuple(slice(max(lo, 0), min(hi, n)) for lo, hi, n in zip(lower, upper, tumour_sl.shape))
    from_work = tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(inside, lower))
    ring_sl[inside] = ring_work[from_work]
    return np.transpose(ring_sl, np.argsort(order))


def _distance_to_surface_mm(
    centres_mm: NDArray[np.float64], points_mm: NDArray[np.float64], normals: NDArray[np.float64], up_to_mm: float
) -> NDArray[np.float64]:
    """Distance from each centre to the surface: to the tangent plane at the nearest surface point.

    The plane, rather than the point, removes the bias of a sampled surface:
    the nearest sample is usually a little to the side of the foot of the
    perpendicular, which would make every distance slightly too long.
    """
    distance_mm: NDArray[np.float64]
    nearest: NDArray[np.intp]
    distance_mm, nearest = cKDTree(points_mm).query(centres_mm, distance_upper_bound=up_to_mm)
    far = ~np.isfinite(distance_mm)
    nearest[far] = 0  # farther than any ring reaches; the value below is discarded
    normal = normals[nearest]
    length = np.linalg.norm(normal, axis=1)
    usable = length > 1e-9
    along_normal = np.abs(np.einsum("ij,ij->i", centres_mm - points_mm[nearest], normal))
    return np.where(far, np.inf, np.where(usable, along_normal / np.where(usable, length, 1.0), distance_mm))


def ring_pad_voxels(spacing_mm: tuple[float, ...], ring: RingDefinition) -> tuple[int, ...]:
    """Voxels, per axis of ``spacing_mm``, beyond the tumour's bounding box that the ring reads or writes.

    The ring is computed on the tumour's bounding box plus this pad (edge
    replicated beyond the image), so any crop of the mask that holds that
    box, or reaches the image edge where the box does not fit, gives the
    same ring.
    """
    return _pad_voxels(np.array(spacing_mm, dtype=np.float64), ring.outward_mm, ring.inward_mm)


def _pad_voxels(spacing_mm: NDArray[np.float64], outward_mm: float, inward_mm: float) -> tuple[int, ...]:
    margin_mm = max(outward_mm, inward_mm) + 2 * float(np.linalg.norm(spacing_mm))
    return tuple(int(math.ceil(margin_mm / s)) + 2 for s in spacing_mm)


def _padded_box(tumour: NDArray[np.bool_], pad_voxels: tuple[int, ...]) -> tuple[list[int], list[int]]:
    lower: list[int] = []
    upper: list[int] = []
    for axis in range(3):
        present = np.nonzero(tumour.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        pad = pad_voxels[axis]
        lower.append(int(present[0]) - pad)
        upper.append(int(present[-1]) + 1 + pad)
    return lower, upper


def _crop_with_edge_replication(array: NDArray[np.bool_], lower: list[int], upper: list[int]) -> NDArray[np.bool_]:
    # Replicating the edge means a tumour cut by the field of view continues
    # beyond it, so its cut face is not mistaken for a border.
    inside = tuple(slice(max(lo, 0), min(hi, n)) for lo, hi, n in zip(lower, upper, array.shape))
    pads = [(max(-lo, 0), max(hi - n, 0)) for lo, hi, n in zip(lower, upper, array.shape)]
    return np.pad(array[inside], pads, mode="edge")


@dataclass(frozen=True)
class _Cap:
    """How the tumour closes beyond the last slice (``end``) of a run of tumour slices, going ``step``.

    The cross-section area is extrapolated by ``area_at`` (a polynomial in
    slices beyond ``end``) until it reaches zero ``length_mm`` beyond.
    """

    end: int
    step: int
    length_mm: float
    area_polynomial: tuple[float, float, float]  # a + b t + c t^2, t in slices
    slice_mm: float

    def area_mm2(self, beyond_slices: float) -> float:
        a, b, c = self.area_polynomial
        return a + b * beyond_slices + c * beyond_slices**2

    def level(self, end_level: NDArray[np.float64], beyond_mm: float, floor_mm: float) -> NDArray[np.float64]:
        # The end slice's outline, shrunk uniformly until its area is the extrapolated one.
        end_radius = _equivalent_radius_mm(self.area_mm2(0.0))
        if beyond_mm < self.length_mm:
            radius = _equivalent_radius_mm(self.area_mm2(beyond_mm / self.slice_mm))
            return end_level + (end_radius - radius)
        return np.maximum(end_level + end_radius, floor_mm) + (beyond_mm - self.length_mm)


def _equivalent_radius_mm(area_mm2: float) -> float:
    return math.sqrt(max(area_mm2, 0.0) / math.pi)


def _surface_function(
    tumour: NDArray[np.bool_], spacing_mm: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[_Cap]]:
    """The per-slice signed distance (smoothed; empty slices filled from the caps), slice areas and caps."""
    level = _per_slice_signed_distance_mm(tumour, spacing_mm)
    areas_mm2 = tumour.sum(axis=(1, 2)) * float(spacing_mm[1] * spacing_mm[2])
    caps = _caps(areas_mm2, float(spacing_mm[0]))
    occupied = areas_mm2 > 0
    floor_mm = _floor_mm(spacing_mm)
    _fill_empty_slices(level, occupied, caps, float(spacing_mm[0]), floor_mm)

    in_plane_mm = float(spacing_mm[1:].max())
    sigmas = [_STAIRCASE_SIGMA_VOXELS * s for s in spacing_mm]
    if spacing_mm[0] > _THICK_SLICE_RATIO * in_plane_mm:
        sigmas[0] = 0.0
    image = sitk.GetImageFromArray(level.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing_mm[::-1]])
    smoothed: NDArray[np.float64] = sitk.GetArrayFromImage(
        sitk.DiscreteGaussian(
            image,
            variance=[s * s for s in sigmas[::-1]],
            maximumKernelWidth=64,
            maximumError=0.001,
            useImageSpacing=True,
        )
    ).astype(np.float64)
    if not (smoothed[occupied] < 0).any():
        # A tumour of a voxel or two has no staircase to smooth, and smoothing would erase it.
        smoothed = level
    # The caps follow the smoothed end slices; smoothing must not pull the
    # surface into a slice that holds no tumour.
    _fill_empty_slices(smoothed, occupied, caps, float(spacing_mm[0]), floor_mm)
    return smoothed, areas_mm2, caps


def _floor_mm(spacing_mm: NDArray[np.float64]) -> float:
    # The smallest value an empty slice may take: the border is at least half an in-plane voxel away.
    return 0.5 * float(spacing_mm[1:].min())


def _per_slice_signed_distance_mm(tumour: NDArray[np.bool_], spacing_mm: NDArray[np.float64]) -> NDArray[np.float64]:
    # A huge slice spacing turns ITK's 3-D Maurer transform into independent 2-D ones.
    spacing = (float(spacing_mm[2]), float(spacing_mm[1]), _FAR_MM)
    to_tumour = _distance_to_nearest_mm(tumour, spacing)
    to_background = _distance_to_nearest_mm(~tumour, spacing)
    # These are distances between voxel centres; the border lies half-way
    # between an inside and an outside centre, so half a voxel closer.
    half_voxel_mm = 0.5 * float(spacing_mm[1:].min())
    signed = np.where(tumour, half_voxel_mm - to_background, to_tumour - half_voxel_mm)
    return np.clip(signed, -_FAR_MM, _FAR_MM)


def _distance_to_nearest_mm(targets: NDArray[np.bool_], spacing_xyz: tuple[float, float, float]) -> NDArray[np.float64]:
    """Distance from each voxel centre to the nearest ``targets`` centre (0 on targets)."""
    if not targets.any():
        return np.full(targets.shape, _FAR_MM)
    image = sitk.GetImageFromArray(targets.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    distance_mm: NDArray[np.float64] = sitk.GetArrayFromImage(distance).astype(np.float64)
    return np.maximum(distance_mm, 0.0)


def _caps(areas_mm2: NDArray[np.float64], slice_mm: float) -> list[_Cap]:
    occupied = areas_mm2 > 0
    caps: list[_Cap] = []
    for step in (+1, -1):
        for end in _block_ends(occupied, step):
            run = [end]
            while len(run) < 3 and 0 <= run[-1] - step < len(occupied) and occupied[run[-1] - step]:
                run.append(run[-1] - step)
            polynomial, fraction = _closing_area([float(areas_mm2[i]) for i in run])
            caps.append(_Cap(end, step, fraction * slice_mm, polynomial, slice_mm))
    return caps


def _closing_area(areas: list[float]) -> tuple[tuple[float, float, float], float]:
    """Area model beyond the end slice (``areas`` end slice first) and where the tumour ends, in slices.

    Near a smooth top the cross-section area shrinks linearly with height,
    over a sphere or an ellipsoid exactly quadratically: so a parabola
    through three areas, else a line through two.  Where the model reaches
    zero within the slice gap, the tumour ends there.  Where it does not,
    the next slice still shows the tumour ended abruptly in between: half a
    slice beyond (where the voxels end) when the area is not shrinking,
    moving towards the next slice as the model's area there approaches zero.
    """
    a0 = areas[0]
    if len(areas) == 1 or a0 <= 0:
        return (a0, -2 * a0, 0.0), 0.5
    if len(areas) == 3:
        c = (a0 - 2 * areas[1] + areas[2]) / 2
        b = a0 - areas[1] + c
    else:
        c, b = 0.0, a0 - areas[1]
    root = _smallest_root_in_unit_interval(c, b, a0)
    if root is not None:
        return (a0, b, c), root
    left_at_next_slice = min(max((a0 + b + c) / a0, 0.0), 1.0)
    return (a0, b, c), 1.0 - 0.5 * left_at_next_slice


def _smallest_root_in_unit_interval(c: float, b: float, a: float) -> float | None:
    """Smallest t in (0, 1] with a + b t + c t^2 = 0, if any."""
    if abs(c) < 1e-12:
        roots = [-a / b] if abs(b) > 1e-12 else []
    else:
        discriminant = b * b - 4 * c * a
        if discriminant < 0:
            return None
        sq = math.sqrt(discriminant)
        roots = [(-b - sq) / (2 * c), (-b + sq) / (2 * c)]
    inside = [t for t in roots if 0 < t <= 1]
    return min(inside) if inside else None


def _fill_empty_slices(
    level: NDArray[np.float64], occupied: NDArray[np.bool_], caps: list[_Cap], slice_mm: float, floor_mm: float
) -> None:
    """Give each slice without tumour the value of the nearest caps (the lowest, where two runs meet)."""
    empty_values: dict[int, NDArray[np.float64]] = {}
    for cap in caps:
        for n, target in enumerate(_slices_beyond(cap, occupied), start=1):
            value = cap.level(level[cap.end], n * slice_mm, floor_mm)
            empty_values[target] = value if target not in empty_values else np.minimum(empty_values[target], value)
    for target, value in empty_values.items():
        level[target] = value


def _slices_beyond(cap: _Cap, occupied: NDArray[np.bool_]) -> list[int]:
    """The empty slices after ``cap.end`` up to the next tumour slice or the end of the stack."""
    beyond: list[int] = []
    target = cap.end + cap.step
    while 0 <= target < len(occupied) and not occupied[target]:
        beyond.append(target)
        target += cap.step
    return beyond


def _block_ends(occupied: NDArray[np.bool_], step: int) -> list[int]:
    """Last slice of each run of tumour slices, seen in direction ``step``."""
    ends: list[int] = []
    for i, here in enumerate(occupied):
        neighbour = i + step
        if here and (neighbour < 0 or neighbour >= len(occupied) or not occupied[neighbour]):
            ends.append(i)
    return ends


def _surface_points_mm(
    level: NDArray[np.float64], areas_mm2: NDArray[np.float64], caps: list[_Cap], spacing_mm: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Points where the interpolated ``level`` crosses zero, in mm from voxel centre (0, 0, 0), and the normals there."""
    extent_mm = np.array(level.shape) * spacing_mm
    step_mm = max(_SURFACE_STEP_MM, float((np.prod(extent_mm) / _MAX_SURFACE_GRID_VOXELS) ** (1 / 3)))
    factors = np.maximum(1, np.ceil(spacing_mm / step_mm - 1e-9)).astype(int)
    fine_spacing = spacing_mm / factors
    # Fine voxels subdivide native ones, so the fine grid starts half a native voxel early.
    fine_origin = -0.5 * spacing_mm + 0.5 * fine_spacing

    across = _across_slices(level, areas_mm2, caps, int(factors[0]), float(spacing_mm[0]), _floor_mm(spacing_mm))
    stack = sitk.GetImageFromArray(across)
    stack.SetSpacing((float(spacing_mm[2]), float(spacing_mm[1]), float(fine_spacing[0])))
    stack.SetOrigin((0.0, 0.0, float(fine_origin[0])))
    reference = sitk.Image([int(n * f) for n, f in zip(level.shape[::-1], factors[::-1])], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in fine_spacing[::-1]])
    reference.SetOrigin([float(o) for o in fine_origin[::-1]])
    fine: NDArray[np.float32] = sitk.GetArrayFromImage(
        sitk.Resample(stack, reference, sitk.Transform(), sitk.sitkLinear, float(_FAR_MM), sitk.sitkFloat32)
    )

    points: list[NDArray[np.float64]] = []
    normals: list[NDArray[np.float64]] = []
    for axis in range(3):
        before = np.moveaxis(fine, axis, 0)[:-1]
        after = np.moveaxis(fine, axis, 0)[1:]
        crossing = np.nonzero((before < 0) != (after < 0))
        a, b = before[crossing], after[crossing]
        fraction = a / (a - b)
        # moveaxis put `axis` first and kept the others in order.
        other = [x for x in range(3) if x != axis]
        low_by_axis = {axis: crossing[0], other[0]: crossing[1], other[1]: crossing[2]}
        low = [low_by_axis[a] for a in range(3)]
        high = list(low)
        high[axis] = low[axis] + 1
        position = np.stack(low, axis=1).astype(np.float64)
        position[:, axis] += fraction
        points.append(position * fine_spacing + fine_origin)
        normals.append(_gradient_at(fine, low, fine_spacing) + _gradient_at(fine, high, fine_spacing))
    return np.concatenate(points), np.concatenate(normals)


def _gradient_at(
    values: NDArray[np.float32], index: list[NDArray[np.intp]], spacing_mm: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Central-difference gradient of ``values`` at the voxels ``index`` (one array per axis)."""
    gradient = np.empty((len(index[0]), 3))
    for axis in range(3):
        forward, backward = list(index), list(index)
        forward[axis] = np.minimum(index[axis] + 1, values.shape[axis] - 1)
        backward[axis] = np.maximum(index[axis] - 1, 0)
        gradient[:, axis] = (values[tuple(forward)] - values[tuple(backward)]) / (
            (forward[axis] - backward[axis]) * spacing_mm[axis]
        )
    return gradient


def _across_slices(
    level: NDArray[np.float64],
    areas_mm2: NDArray[np.float64],
    caps: list[_Cap],
    factor: int,
    slice_mm: float,
    floor_mm: float,
) -> NDArray[np.float32]:
    """``level`` at ``factor`` sub-slices per slice.

    Between two tumour slices: the linear blend of their distance maps
    (shape-based interpolation), shifted so that the cross-section's
    equivalent radius follows a cubic through the neighbouring slices' areas;
    a plain blend would cut straight chords through a curved surface.
    Beyond the last tumour slice: the cap.
    """
    n_slices = len(level)
    occupied = areas_mm2 > 0
    position = (np.arange(n_slices * factor) + 0.5) / factor - 0.5  # in slices
    lower = np.clip(np.floor(position).astype(int), 0, n_slices - 1)
    across: NDArray[np.float64] = level[lower].copy()  # the margins beyond the first/last slice centre

    capped: dict[int, NDArray[np.float64]] = {}
    for cap in caps:
        reach = len(_slices_beyond(cap, occupied)) + 1
        beyond = (position - cap.end) * cap.step
        for j in map(int, np.nonzero((beyond > 0) & (beyond < reach))[0]):
            value = cap.level(level[cap.end], beyond[j] * slice_mm, floor_mm)
            capped[j] = value if j not in capped else np.minimum(capped[j], value)

    # One slice beyond a run of tumour slices, its cap's area model stands in
    # for the missing neighbour, so the cubic below sees where the tumour ends.
    virtual_area = {(cap.end, cap.step): cap.area_mm2(1.0) for cap in caps}
    radius = [_equivalent_radius_mm(area) for area in areas_mm2]
    for j, z in enumerate(position):
        if j in capped:
            across[j] = capped[j]
            continue
        a = int(math.floor(z))
        if a < 0 or a + 1 >= n_slices or not (occupied[a] and occupied[a + 1]):
            continue
        s = z - a
        before = areas_mm2[a - 1] if a >= 1 and occupied[a - 1] else virtual_area[(a, -1)]
        after = areas_mm2[a + 2] if a + 2 < n_slices and occupied[a + 2] else virtual_area[(a + 1, +1)]
        area = _catmull_rom(before, areas_mm2[a], areas_mm2[a + 1], after, s)
        blended_radius = (1 - s) * radius[a] + s * radius[a + 1]
        across[j] = (1 - s) * level[a] + s * level[a + 1] + (blended_radius - _equivalent_radius_mm(area))
    return across.astype(np.float32)


def _catmull_rom(p0: float, p1: float, p2: float, p3: float, t: float) -> float:
    """Cubic through p1 (t=0) and p2 (t=1) with tangents from the neighbours; exact for quadratics."""
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)


def _near_border(tumour: NDArray[np.bool_], spacing_mm: NDArray[np.float64], reach_mm: float) -> NDArray[np.bool_]:
    """Voxels within ``reach_mm`` of a voxel centre on the other side of the border: a superset of the ring."""
    spacing = (float(spacing_mm[2]), float(spacing_mm[1]), float(spacing_mm[0]))
    to_tumour = _distance_to_nearest_mm(tumour, spacing)
    to_background = _distance_to_nearest_mm(~tumour, spacing)
    return np.where(tumour, to_background, to_tumour) <= reach_mm


def _format_mm(value: float) -> str:
    return f"{value:g}"


def _format_spacing(spacing: tuple[float, ...]) -> str:
    return "x".join(f"{s:g}" for s in spacing)
