"""A cropped synthetic chest CT around a tumour, resembling clinical CT (SIMULATED, not a patient).

`chest_ct_phantom` renders, on a box of about 12-20 cm around the tumour
(not a whole 512 x 512 x N chest: memory and time stay bounded, and the
peritumoral ring and pyradiomics' filters, which crop to the mask plus a few
voxels, still see realistic surroundings):

* body outline (air -1000 HU outside), subcutaneous fat (~-100 HU), chest-wall
  muscle (~45 HU) and ribs (cortex ~700 HU, marrow ~250 HU) with intercostal
  muscle between them;
* mediastinum: fat (~-90 HU) holding the heart, the aorta, the superior vena
  cava and the pulmonary trunk (blood ~40 HU), the trachea (air, 2 mm wall)
  and the vertebral body (~300 HU);
* lungs: parenchyma ~-850 HU, denser posteriorly (gravity), with branching
  pulmonary vessels (~40 HU tubes, radius 7 mm at the hilum tapering by 0.72
  per generation) and the bronchi beside them (air lumen, soft-tissue wall);
* the tumour: a lobulated solid (a smoothed random field added to an
  ellipsoid, thresholded to the exact requested volume), ~40 HU with
  spatially correlated heterogeneity of ``texture_hu`` and, when large, a
  lower-density necrotic core; an optional ground-glass halo over the
  adjacent lung.  Most tumours sit centrally (hilar-mediastinal, abutting the
  mediastinum, as extensive-stage SCLC primaries usually do); small ones are
  more often peripheral (mid-lung, or against the chest wall);
* acquisition: in-plane spacing 0.6-1.0 mm and slice thickness 1-5 mm drawn
  per patient; rendered on a fine grid (<= 1 mm in z), blurred by a
  Gaussian point-spread function (partial volume), averaged over the slice
  thickness, and given correlated noise (white noise band-passed in-plane, as
  a reconstruction kernel shapes it; 10-30 HU SD in soft tissue, lower for
  thick slices).

Coordinates are patient LPS millimetres: x to the patient's left, y
posterior, z superior; the body's axis is x = y = 0.  Everything drawn at
random comes from ``numpy.random.default_rng(seed)``, so a seed gives the
same image and mask bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

#: Plausible clinical reconstructions (slice thickness, mm) and their relative frequency.
SLICE_THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
SLICE_THICKNESS_WEIGHTS = (0.14, 0.10, 0.06, 0.10, 0.10, 0.10, 0.40)
IN_PLANE_SPACING_RANGE_MM = (0.6, 1.0)
NOISE_SD_RANGE_HU = (10.0, 30.0)

BODY_SEMI_AXES_MM = (165.0, 115.0)
MEDIASTINUM_HALF_WIDTH_MM = 38.0
HILUM_X_MM = 52.0
_AIR_HU, _FAT_HU, _MUSCLE_HU, _BLOOD_HU = -1000.0, -100.0, 45.0, 40.0
_LUNG_HU = -855.0
_CORTEX_HU, _MARROW_HU, _VERTEBRA_HU = 700.0, 250.0, 300.0
_TUMOUR_HU = 40.0
_PSF_SIGMA_MM = 0.45
_MIN_FIELD_MM = 110.0
_SMALL_VESSELS_PER_CM3 = 0.5
#: Sub-resolution structure of the parenchyma (small vessels, interstitium): SD (HU) and correlation (mm).
_PARENCHYMA_TEXTURE_HU = (25.0, 55.0)
_PARENCHYMA_TEXTURE_MM = 0.9
_MARGIN_MM = 30.0


@dataclass(frozen=True, slots=True)
class ChestPhantomLayout:
    """What was drawn for one phantom (recorded in ``simulation_truth.json``)."""

    location: str  # "central" (hilar-mediastinal), "peripheral" (mid-lung) or "chest-wall"
    side: str  # "right" or "left" lung
    centre_mm: tuple[float, float, float]
    in_plane_spacing_mm: float
    slice_thickness_mm: float
    noise_sd_hu: float
    necrosis_hu: float
    part_solid_rim_hu: float  # density drop at the tumour's border (0: solid throughout)
    tumour_volume_ml: float
    size: tuple[int, int, int]  # x, y, z voxels


def chest_ct_phantom(
    *,
    radius_mm: float,
    axis_ratios: tuple[float, float, float] = (1.0, 1.0, 1.0),
    texture_hu: float = 40.0,
    halo_hu: float = 0.0,
    halo_mm: float = 3.0,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image, ChestPhantomLayout]:
    """The CT (HU, int16), the tumour mask (uint8, same grid) and the layout drawn.

    ``radius_mm`` is the tumour's equivalent-sphere radius: the mask holds
    4/3 pi radius^3 of volume on the fine grid (within a voxel's worth after
    the slice averaging).  ``axis_ratios`` elongate it before lobulation.
    """
    if not (radius_mm > 0 and texture_hu >= 0 and halo_hu >= 0 and halo_mm > 0):
        raise ValueError(
            f"chest_ct_phantom: radius_mm {radius_mm}, texture_hu {texture_hu}, halo_hu {halo_hu}, "
            f"halo_mm {halo_mm} (allowed: radius, halo_mm > 0; texture, halo >= 0)"
        )
    rng = np.random.default_rng(seed)
    spacing_xy = float(np.round(rng.uniform(*IN_PLANE_SPACING_RANGE_MM), 4))
    thickness = float(
        rng.choice(SLICE_THICKNESSES_MM, p=np.array(SLICE_THICKNESS_WEIGHTS) / sum(SLICE_THICKNESS_WEIGHTS))
    )
    # Thicker slices average more photons: less noise at the same dose and kernel.
    noise_sd = float(np.clip(rng.uniform(16.0, 36.0) * math.sqrt(2.0 / thickness), *NOISE_SD_RANGE_HU))
    fat_mm = rng.uniform(6.0, 22.0)
    # Tumours are often flattened or elongated along z (volume kept: the product of the factors is 1).
    flat = rng.uniform(0.65, 1.2)
    radii = np.array(axis_ratios, dtype=float) * radius_mm * np.array([flat**-0.5, flat**-0.5, flat])
    location, side, centre = _tumour_centre(rng, radius_mm, radii, fat_mm)

    # Fine grid: the output's in-plane spacing, slices subdivided to <= 1 mm.
    sub = max(1, math.ceil(thickness / 1.0 - 1e-9))
    fine_z = thickness / sub
    half_xy = max(_MIN_FIELD_MM / 2, float(radii[:2].max()) * 1.35 + _MARGIN_MM)
    half_z = float(radii[2]) * 1.35 + _MARGIN_MM * 0.7
    nx = int(math.ceil(2 * half_xy / spacing_xy))
    n_slices = int(math.ceil(2 * half_z / thickness))
    nz_fine = n_slices * sub
    origin = (
        centre[0] - (nx - 1) / 2 * spacing_xy,
        centre[1] - (nx - 1) / 2 * spacing_xy,
        centre[2] - n_slices * thickness / 2 + fine_z / 2,
    )
    axes = [
        origin[0] + np.arange(nx) * spacing_xy,
        origin[1] + np.arange(nx) * spacing_xy,
        origin[2] + np.arange(nz_fine) * fine_z,
    ]
    grid = _Grid(axes, (spacing_xy, spacing_xy, fine_z))

    hu, lung = _anatomy(grid, rng, fat_mm)
    _vessels_and_airways(grid, hu, lung, rng)
    tumour, necrosis_hu, rim_hu = _tumour(grid, hu, lung, rng, centre, radii, radius_mm, texture_hu, halo_hu, halo_mm)

    # Partial volume: the scanner's point-spread function, then the slice profile.
    sigma = (_PSF_SIGMA_MM / fine_z, _PSF_SIGMA_MM / spacing_xy, _PSF_SIGMA_MM / spacing_xy)
    hu = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    hu = hu.reshape(n_slices, sub, nx, nx).mean(axis=1)
    mask = tumour.reshape(n_slices, sub, nx, nx).mean(axis=1) >= 0.5
    hu += _ct_noise(rng, hu.shape, noise_sd, thickness, spacing_xy)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    image = sitk.GetImageFromArray(hu)
    # SimpleITK's methods carry no annotations.
    image.SetSpacing((spacing_xy, spacing_xy, thickness))
    image.SetOrigin((origin[0], origin[1], centre[2] - n_slices * thickness / 2 + thickness / 2))
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(image)
    volume_ml = float(mask.sum()) * spacing_xy * spacing_xy * thickness / 1000.0
    layout = ChestPhantomLayout(
        location=location,
        side=side,
        centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        in_plane_spacing_mm=spacing_xy,
        slice_thickness_mm=thickness,
        noise_sd_hu=noise_sd,
        necrosis_hu=necrosis_hu,
        part_solid_rim_hu=rim_hu,
        tumour_volume_ml=volume_ml,
        size=(nx, nx, n_slices),
    )
    return image, mask_image, layout


@dataclass(frozen=True, slots=True)
class _Grid:
    axes: list[np.ndarray]  # x, y, z voxel centres (mm)
    spacing: tuple[float, float, float]  # x, y, z

    @property
    def shape(self) -> tuple[int, int, int]:  # array order z, y, x
        return (len(self.axes[2]), len(self.axes[1]), len(self.axes[0]))

    def box(self, low_mm: NDArray[np.float64], high_mm: NDArray[np.float64]) -> tuple[slice, slice, slice] | None:
        """Array slices (z, y, x) of the voxels inside [low, high] (x, y, z mm), or None if empty."""
        out = []
        for axis in (2, 1, 0):
            a = self.axes[axis]
            lo = int(np.searchsorted(a, low_mm[axis], side="left"))
            hi = int(np.searchsorted(a, high_mm[axis], side="right"))
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return out[0], out[1], out[2]

    def coordinates(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z, y, x coordinate arrays (mm) of ``box``."""
        z = self.axes[2][box[0]][:, None, None]
        y = self.axes[1][box[1]][None, :, None]
        x = self.axes[0][box[2]][None, None, :]
        return z, y, x


def _tumour_centre(
    rng: np.random.Generator, radius_mm: float, radii: NDArray[np.float64], fat_mm: float
) -> tuple[str, str, NDArray[np.float64]]:
    side_sign = 1.0 if rng.random() < 0.45 else -1.0  # x > 0 is the patient's left
    side = "left" if side_sign > 0 else "right"
    # Small primaries are more often peripheral; large ES-SCLC masses are hilar-mediastinal.
    p_central = float(np.clip(0.35 + 0.025 * (radius_mm - 6.0), 0.35, 0.85))
    draw = rng.random()
    z = rng.uniform(-40.0, 50.0)
    if draw < p_central:
        location = "central"
        x = side_sign * (MEDIASTINUM_HALF_WIDTH_MM + radii[0] * rng.uniform(0.25, 0.7))
        y = rng.uniform(-35.0, 35.0)
    else:
        wall_mm = fat_mm + 10.0 + 9.0
        angle = rng.uniform(-1.1, 1.1)  # lateral half of the hemithorax
        direction = np.array([side_sign * math.cos(angle), math.sin(angle)])
        to_skin = 1.0 / math.hypot(direction[0] / BODY_SEMI_AXES_MM[0], direction[1] / BODY_SEMI_AXES_MM[1])
        if rng.random() < 0.5:
            location = "chest-wall"
            depth = wall_mm + radii[:2].max() * rng.uniform(0.6, 0.95)
        else:
            location = "peripheral"
            depth = wall_mm + radii[:2].max() + rng.uniform(8.0, 30.0)
        x, y = direction * (to_skin - depth)
        if abs(x) < MEDIASTINUM_HALF_WIDTH_MM + radii[0]:
            x = side_sign * (MEDIASTINUM_HALF_WIDTH_MM + radii[0] + 10.0)
    return location, side, np.array([x, y, z])


def _anatomy(grid: _Grid, rng: np.random.Generator, fat_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Body wall, mediastinum, spine and lung background (HU, float32) and the lung mask."""
    box = (slice(None),) * 3
    z, y, x = grid.coordinates(box)
    ax, ay = BODY_SEMI_AXES_MM
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    # Depth below the skin, approximated along the ray from the body axis (exact on the axes).
    depth = (1.0 - rho) * np.sqrt(x**2 + y**2) / np.maximum(rho, 1e-6)
    depth = np.broadcast_to(depth, grid.shape)
    hu = np.full(grid.shape, _AIR_HU, dtype=np.float32)
    muscle_mm, rib_mm = 10.0, 9.0
    hu[depth >= 0] = _FAT_HU
    hu[depth >= fat_mm] = _MUSCLE_HU
    # Ribs: oblique bands (~11 mm wide, ~25 mm apart along z, sloping down anteriorly).
    rib_phase = np.mod(z + 12.0 * (y / ay) + rng.uniform(0, 25.0), 25.0)
    in_rib_layer = (depth >= fat_mm + muscle_mm) & (depth < fat_mm + muscle_mm + rib_mm)
    rib = in_rib_layer & (np.broadcast_to(rib_phase, grid.shape) < 11.0)
    rib_core = (
        rib
        & (np.broadcast_to(rib_phase, grid.shape) > 2.0)
        & (np.broadcast_to(rib_phase, grid.shape) < 9.0)
        & (depth > fat_mm + muscle_mm + 2.0)
        & (depth < fat_mm + muscle_mm + rib_mm - 2.0)
    )
    hu[rib] = _CORTEX_HU
    hu[rib_core] = _MARROW_HU
    cavity = depth >= fat_mm + muscle_mm + rib_mm
    # Mediastinum: a central column, widest anteriorly where the heart and great vessels are.
    half_width = MEDIASTINUM_HALF_WIDTH_MM + 10.0 * np.clip(-y / 60.0, 0, 1)
    mediastinum = cavity & np.broadcast_to((np.abs(x) < half_width) & (y < 70.0), grid.shape)
    spine = np.broadcast_to((x**2 + (y - 82.0) ** 2) < 22.0**2, grid.shape)
    paravertebral = cavity & np.broadcast_to((np.abs(x) < 32.0) & (y >= 60.0), grid.shape)
    lung = cavity & ~mediastinum & ~spine & ~paravertebral
    gravity = 35.0 * np.clip(y / 90.0, -1, 1)  # posterior (dependent) lung is denser
    spacing_zyx = np.array(grid.spacing[::-1])
    parenchyma = _smooth_field(rng, grid.shape, _PARENCHYMA_TEXTURE_MM / spacing_zyx) * rng.uniform(
        *_PARENCHYMA_TEXTURE_HU
    )
    hu[lung] = (_LUNG_HU + np.broadcast_to(gravity, grid.shape) + parenchyma)[lung]
    hu[mediastinum | paravertebral] = -90.0
    hu[spine & cavity] = _VERTEBRA_HU
    # Mediastinal contents (vertical cylinders and the heart below the carina), blood ~40 HU.
    vessels = [  # (x, y, radius, z from, z to)
        (12.0, -20.0, 15.0, -40.0, 200.0),  # ascending aorta
        (18.0, 45.0, 12.0, -200.0, 200.0),  # descending aorta
        (-22.0, -12.0, 10.0, -10.0, 200.0),  # superior vena cava
        (10.0, 8.0, 13.0, -30.0, 10.0),  # pulmonary trunk
    ]
    for vx, vy, vr, z0, z1 in vessels:
        tube = ((x - vx) ** 2 + (y - vy) ** 2 < vr**2) & (z > z0) & (z < z1)
        hu[np.broadcast_to(tube, grid.shape) & cavity] = _BLOOD_HU
    heart = (((x - 15.0) / 55.0) ** 2 + ((y + 25.0) / 40.0) ** 2 + ((z + 70.0) / 45.0) ** 2) < 1.0
    hu[np.broadcast_to(heart, grid.shape) & cavity & ~spine] = _BLOOD_HU
    trachea_r = (x - 0.0) ** 2 + (y - 20.0) ** 2
    above_carina = z > 20.0
    hu[np.broadcast_to((trachea_r < 10.0**2) & above_carina, grid.shape) & cavity] = 20.0
    hu[np.broadcast_to((trachea_r < 8.0**2) & above_carina, grid.shape) & cavity] = _AIR_HU
    lung &= hu < -500
    return hu, lung


def _vessels_and_airways(grid: _Grid, hu: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> None:
    """Pulmonary vessel trees from both hila, with bronchi beside the larger branches, drawn into the lung."""
    segments: list[_Segment] = []
    for side in (-1.0, 1.0):
        for root_z, dz in ((15.0, 0.6), (0.0, 0.0), (-15.0, -0.6)):
            start = np.array([side * HILUM_X_MM, 5.0 + rng.uniform(-8, 8), root_z])
            direction = np.array([side, rng.uniform(-0.4, 0.4), dz + rng.uniform(-0.2, 0.2)])
            _grow(segments, start, direction / np.linalg.norm(direction), 6.5, 32.0, 0, rng)
    high = np.array([a[-1] for a in grid.axes])
    low = np.array([a[0] for a in grid.axes])
    # The trees' tips are sparse at this depth; small peripheral vessels (0.5-1.6 mm radius, pointing away from
    # the hilum) fill the lung as on clinical CT.
    volume_cm3 = float(np.prod(high - low)) / 1000.0
    for _ in range(int(rng.poisson(_SMALL_VESSELS_PER_CM3 * volume_cm3))):
        start = low + rng.random(3) * (high - low)
        hilum = np.array([math.copysign(HILUM_X_MM, start[0]), 5.0, 0.0])
        direction = start - hilum + rng.normal(0.0, 25.0, 3)
        direction /= np.linalg.norm(direction) or 1.0
        segments.append((start, start + direction * rng.uniform(6.0, 20.0), rng.uniform(0.5, 1.6), 9))
    for start, end, radius, generation in segments:
        reach = radius + 3.0
        lo = np.minimum(start, end) - reach
        hi = np.maximum(start, end) + reach
        if np.any(hi < low) or np.any(lo > high):
            continue
        box = grid.box(lo, hi)
        if box is None:
            continue
        z, y, x = grid.coordinates(box)
        distance = _distance_to_segment(x, y, z, start, end)
        region_lung = lung[box]
        region = hu[box]
        if generation <= 4:
            # The bronchus runs beside the artery: offset perpendicular to the branch.
            axis = (end - start) / max(float(np.linalg.norm(end - start)), 1e-6)
            perpendicular = np.cross(axis, [0.0, 0.0, 1.0])
            if np.linalg.norm(perpendicular) < 1e-3:
                perpendicular = np.array([1.0, 0.0, 0.0])
            perpendicular /= np.linalg.norm(perpendicular)
            offset = perpendicular * (radius * 1.9 + 0.8)
            b_distance = _distance_to_segment(x, y, z, start + offset, end + offset)
            wall = max(0.6, 0.18 * radius)
            bronchus_wall = (b_distance < radius * 0.85 + wall) & region_lung
            region[bronchus_wall] = 10.0
            region[(b_distance < radius * 0.85) & region_lung] = _AIR_HU
        region[(distance < radius) & region_lung] = _BLOOD_HU


#: A vessel segment: start and end (x, y, z mm), radius (mm), generation (0 at the hilum).
_Segment = tuple[NDArray[np.float64], NDArray[np.float64], float, int]


def _grow(
    segments: list[_Segment],
    start: NDArray[np.float64],
    direction: NDArray[np.float64],
    radius: float,
    length: float,
    generation: int,
    rng: np.random.Generator,
) -> None:
    if generation > 8 or radius < 0.45:
        return
    end = start + direction * length * rng.uniform(0.75, 1.2)
    segments.append((start, end, radius, generation))
    for _ in range(2):
        turn = rng.normal(0.0, 0.55, 3)
        child = direction + turn
        child /= np.linalg.norm(child)
        _grow(segments, end, child, radius * rng.uniform(0.66, 0.78), length * 0.78, generation + 1, rng)


def _distance_to_segment(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, a: NDArray[np.float64], b: NDArray[np.float64]
) -> np.ndarray:
    ab = b - a
    denominator = float(ab @ ab) or 1e-12
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denominator
    t = np.clip(t, 0.0, 1.0)
    distance: np.ndarray = np.sqrt(
        (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    )
    return distance


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: NDArray[np.float64]
) -> NDArray[np.float32]:
    field: NDArray[np.float32] = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), sigma_voxels, mode="wrap"
    )
    return field / (field.std() or 1.0)


def _tumour(
    grid: _Grid,
    hu: np.ndarray,
    lung: np.ndarray,
    rng: np.random.Generator,
    centre: NDArray[np.float64],
    radii: NDArray[np.float64],
    radius_mm: float,
    texture_hu: float,
    halo_hu: float,
    halo_mm: float,
) -> tuple[NDArray[np.float32], float, float]:
    """Draw the tumour into ``hu`` (and its halo into the lung); return its fine-grid mask and necrosis drop."""
    fine_spacing = np.array(grid.spacing[::-1])  # z, y, x
    reach = radii.max() * 1.45 + halo_mm + 2.0
    box = grid.box(centre - reach, centre + reach)
    if box is None:  # the grid is built around the tumour: cannot happen
        raise ValueError("chest_ct_phantom: the tumour lies outside the phantom's grid")
    z, y, x = grid.coordinates(box)
    shape = hu[box].shape
    # Random orientation of the ellipsoid about z.
    angle = rng.uniform(0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    u, v = c * dx + s * dy, -s * dx + c * dy
    rho = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    # Lobulation: a smooth random field (correlation ~ radius / 3) bends the surface.
    lobes = _smooth_field(rng, shape, np.maximum(radius_mm / 3.0 / fine_spacing, 0.8))
    level = rho + rng.uniform(0.08, 0.22) * lobes
    target_voxels = 4.0 / 3.0 * math.pi * radius_mm**3 / float(np.prod(fine_spacing))
    k = int(min(max(round(target_voxels), 1), level.size - 1))
    threshold = np.partition(level.ravel(), k - 1)[k - 1]
    inside = level <= threshold
    inside = ndimage.binary_fill_holes(inside)

    texture = _smooth_field(rng, shape, np.maximum(1.6 / fine_spacing, 0.7))
    tumour_hu = _TUMOUR_HU + rng.normal(0.0, 6.0) + texture_hu * texture
    necrosis = 0.0
    if radius_mm > 15.0 and rng.random() < 0.6:
        necrosis = float(rng.uniform(20.0, 45.0))
        depth_in = ndimage.distance_transform_edt(inside, sampling=fine_spacing)
        core = np.clip((depth_in - 0.35 * radius_mm) / (0.25 * radius_mm), 0.0, 1.0)
        tumour_hu = tumour_hu - necrosis * core
    # Some tumours have a part-solid rim (lower density towards the border), as small peripheral ones often do.
    rim_hu = float(rng.uniform(50.0, 350.0)) if rng.random() < (0.6 if radius_mm < 12.0 else 0.25) else 0.0
    if rim_hu:
        depth_in = ndimage.distance_transform_edt(inside, sampling=fine_spacing)
        rim_mm = max(2.0, 0.35 * radius_mm)
        tumour_hu = tumour_hu - rim_hu * np.clip(1.0 - depth_in / rim_mm, 0.0, 1.0)
    region = hu[box]
    if halo_hu:
        outside_mm = ndimage.distance_transform_edt(~inside, sampling=fine_spacing)
        fade = np.clip(1.0 - outside_mm / halo_mm, 0.0, 1.0)
        region += np.where(lung[box] & ~inside, halo_hu * fade, 0.0).astype(np.float32)
    region[inside] = tumour_hu[inside]
    mask = np.zeros(grid.shape, dtype=np.float32)
    mask[box] = inside
    return mask, necrosis, rim_hu


def _ct_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sd_hu: float, thickness_mm: float, spacing_mm: float
) -> NDArray[np.float32]:
    """Correlated CT noise: white noise band-passed in-plane (a ramp-like kernel's mottle, grain ~1-2 mm)."""
    white = rng.standard_normal(shape).astype(np.float32)
    z_sigma = 0.5 if thickness_mm <= 1.5 else 0.0  # thin overlapping slices share some noise
    fine = ndimage.gaussian_filter(white, (z_sigma, 0.75 / spacing_mm, 0.75 / spacing_mm))
    coarse = ndimage.gaussian_filter(white, (z_sigma, 2.2 / spacing_mm, 2.2 / spacing_mm))
    noise: NDArray[np.float32] = fine - 0.5 * coarse
    return noise * np.float32(sd_hu / (noise.std() or 1.0))
