"""Synthetic CT phantoms for the scoring tests: spheres, ellipsoids and textured HU volumes.

Sizes are ``(x, y, z)`` voxels and spacings ``(x, y, z)`` mm, as SimpleITK
reports them.  Images have the given origin and identity direction, so a
voxel's physical centre is ``origin + index * spacing``.  A voxel belongs to
a shape when its centre lies inside (or on) the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

Triple = Sequence[float]


def voxel_centres_mm(size: Sequence[int], spacing_mm: Triple, origin_mm: Triple = (0.0, 0.0, 0.0)):
    """Physical ``(x, y, z)`` coordinate arrays of every voxel centre, each shaped like the image array (z, y, x)."""
    axes = [o + np.arange(n) * s for n, s, o in zip(size, spacing_mm, origin_mm)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return x, y, z


def image_centre_mm(size: Sequence[int], spacing_mm: Triple, origin_mm: Triple = (0.0, 0.0, 0.0)) -> tuple:
    return tuple(o + (n - 1) * s / 2 for n, s, o in zip(size, spacing_mm, origin_mm))


def sphere_distance_mm(size, spacing_mm, radius_mm, centre_mm=None, origin_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Exact signed distance (mm, negative inside) from each voxel centre to the sphere's surface; array (z, y, x)."""
    centre = image_centre_mm(size, spacing_mm, origin_mm) if centre_mm is None else centre_mm
    x, y, z = voxel_centres_mm(size, spacing_mm, origin_mm)
    return np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - radius_mm


def sphere_mask(size, spacing_mm, radius_mm, centre_mm=None, origin_mm=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A ``sitkUInt8`` 0/1 sphere mask."""
    inside = sphere_distance_mm(size, spacing_mm, radius_mm, centre_mm, origin_mm) <= 0
    return mask_from_array(inside, spacing_mm, origin_mm)


def ellipsoid_mask(size, spacing_mm, semi_axes_mm: Triple, centre_mm=None, origin_mm=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A ``sitkUInt8`` 0/1 axis-aligned ellipsoid mask with semi-axes ``(a_x, a_y, a_z)`` mm."""
    centre = image_centre_mm(size, spacing_mm, origin_mm) if centre_mm is None else centre_mm
    x, y, z = voxel_centres_mm(size, spacing_mm, origin_mm)
    a, b, c = semi_axes_mm
    inside = ((x - centre[0]) / a) ** 2 + ((y - centre[1]) / b) ** 2 + ((z - centre[2]) / c) ** 2 <= 1
    return mask_from_array(inside, spacing_mm, origin_mm)


def ellipsoid_distance_mm(
    size, spacing_mm, semi_axes_mm: Triple, centre_mm=None, origin_mm=(0.0, 0.0, 0.0), band_mm: float = 6.0
) -> np.ndarray:
    """Signed distance (mm, negative inside) from voxel centres to an axis-aligned ellipsoid; array (z, y, x).

    Measured to a dense sampling of the surface (~0.1 mm apart), so accurate
    to about 0.01 mm, for voxels within ``band_mm`` of the surface; the others
    get ``-inf`` (inside) or ``+inf`` (outside).
    """
    from scipy.spatial import cKDTree

    centre = image_centre_mm(size, spacing_mm, origin_mm) if centre_mm is None else centre_mm
    a, b, c = semi_axes_mm
    n_theta = int(math.ceil(math.pi * max(semi_axes_mm) / 0.1))
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 2 * n_theta), np.linspace(0, np.pi, n_theta))
    surface = np.stack(
        [a * np.cos(u) * np.sin(v) + centre[0], b * np.sin(u) * np.sin(v) + centre[1], c * np.cos(v) + centre[2]],
        axis=-1,
    ).reshape(-1, 3)
    x, y, z = voxel_centres_mm(size, spacing_mm, origin_mm)
    scaled = np.sqrt(((x - centre[0]) / a) ** 2 + ((y - centre[1]) / b) ** 2 + ((z - centre[2]) / c) ** 2)
    # |scaled - 1| * min axis bounds the distance from below, so this keeps every voxel within band_mm.
    near = np.abs(scaled - 1) * min(semi_axes_mm) <= band_mm
    distance = np.where(scaled <= 1, -np.inf, np.inf)
    found, _ = cKDTree(surface).query(np.stack([x[near], y[near], z[near]], axis=1))
    distance[near] = np.where(scaled[near] <= 1, -found, found)
    return distance


def mask_from_array(inside: np.ndarray, spacing_mm: Triple, origin_mm: Triple = (0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(inside).astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing_mm])
    image.SetOrigin([float(o) for o in origin_mm])
    return image


def shell_volume_mm3(radius_mm: float, outward_mm: float, inward_mm: float) -> float:
    """Volume of the spherical shell from ``radius - inward`` to ``radius + outward``."""
    inner = max(radius_mm - inward_mm, 0.0)
    return 4.0 / 3.0 * math.pi * ((radius_mm + outward_mm) ** 3 - inner**3)


def textured_ct(
    mask: sitk.Image,
    seed: int,
    tumour_hu: float = 40.0,
    background_hu: float = -750.0,
    noise_hu: float = 60.0,
    grain_mm: float = 1.5,
) -> sitk.Image:
    """An int16 CT in HU on ``mask``'s grid: soft tissue with correlated texture inside, lung-like outside.

    The texture is Gaussian noise smoothed over ``grain_mm`` (so GLCM/GLSZM see
    structure, not white noise) plus a gentle gradient, so first-order and
    texture features differ between the tumour and the ring around it.
    """
    rng = np.random.default_rng(seed)
    inside = sitk.GetArrayFromImage(mask).astype(bool)
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, inside.shape).astype(np.float32))
    noise.CopyInformation(mask)
    grain = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, grain_mm))
    grain *= noise_hu / max(float(grain.std()), 1e-6)
    z = np.linspace(-1.0, 1.0, inside.shape[0])[:, None, None]
    hu = np.where(inside, tumour_hu + 1.5 * grain + 25.0 * z, background_hu + grain)
    image = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    image.CopyInformation(mask)
    return image
