"""IBSI 1 compliance check of the project's pyradiomics extraction (``sclc-node ibsi``).

The Image Biomarker Standardisation Initiative (Zwanenburg et al., Radiology
2020; reference manual arXiv:1612.07003) publishes consensus values, with
tolerances, for a digital phantom and for one lung CT (``PAT1``) processed with
five configurations A-E.  This module

- names each configuration as data (:data:`CONFIGURATIONS`) and as the
  pyradiomics settings override a user would write (:meth:`IbsiConfiguration.pyradiomics_settings`);
- maps pyradiomics feature names to IBSI names (:data:`FEATURE_MAP`);
- computes the features two ways:

  ``stock``: the project's own :func:`scoring.features.extract_all_features`
  with the settings override, i.e. exactly what the node would compute;

  ``ibsi``: the same pyradiomics feature classes after IBSI image processing
  that pyradiomics does not offer: a resampling grid centred on the original
  grid (pyradiomics aligns it to the origin corner), trilinear interpolation of
  the mask with a 0.5 partial-volume threshold (pyradiomics: nearest neighbour),
  rounding of interpolated intensities, range *and* 3-sigma re-segmentation
  together (pyradiomics: one or the other), and fixed-bin-size edges counted
  from the re-segmentation lower bound (pyradiomics: from a multiple of the
  bin width below the ROI minimum).  These adjustments exist only here; the
  node's extraction for models is untouched;

- compares values with the reference (:func:`compare`).

Pure functions over SimpleITK images; reading files is the caller's job.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np
import radiomics
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import getFeatureClasses, imageoperations
from radiomics.base import RadiomicsFeaturesBase

from sclc_risk_node.scoring.errors import InputError, MaskError
from sclc_risk_node.scoring.features import extract_all_features, installed_pyradiomics_version
from sclc_risk_node.scoring.types import ExtractionSettings

DIGITAL_PHANTOM = "digital_phantom"
CT_PHANTOM = "ct_phantom"

#: The feature classes compared; shape2D has no IBSI counterpart.
FEATURE_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm", "ngtdm", "gldm")

#: An interpolation grid, SimpleITK order (x, y, z): size, spacing (mm), origin (mm).
Grid: TypeAlias = tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]


class Method(str, enum.Enum):
    """How features are computed: pyradiomics as the node runs it, or with IBSI image processing."""

    STOCK = "stock"
    IBSI = "ibsi"


class Outcome(str, enum.Enum):
    MATCHED = "matched"
    OUT_OF_TOLERANCE = "out-of-tolerance"
    NOT_COMPUTED = "not-computed"


@dataclass(frozen=True, slots=True)
class IbsiConfiguration:
    """One IBSI 1 image processing configuration (reference manual, "Reference data sets").

    ``spacing_mm`` is the resampled voxel spacing (x, y, z); ``None`` means no
    interpolation and a ``None`` z (2D configurations) keeps the slice spacing.
    ``resegment_range`` is in the image's units (HU for CT); ``outlier_sigma``
    removes voxels farther than that many standard deviations from the ROI
    mean.  Exactly one of ``bin_width`` (fixed bin size) and ``bin_count``
    (fixed bin number) is set.
    """

    name: str
    data_set: str
    description: str
    slice_wise: bool = False
    spacing_mm: tuple[float, float, float | None] | None = None
    interpolator: str = "linear"
    resegment_range: tuple[float, float] | None = None
    outlier_sigma: float | None = None
    bin_width: float | None = None
    bin_count: int | None = None

    def __post_init__(self) -> None:
        if (self.bin_width is None) == (self.bin_count is None):
            raise ValueError(f"configuration {self.name}: set exactly one of bin_width and bin_count")
        if self.interpolator not in _SITK_INTERPOLATORS:
            raise ValueError(f"configuration {self.name}: interpolator must be one of {sorted(_SITK_INTERPOLATORS)}")

    @property
    def texture_suffix(self) -> str:
        """IBSI aggregation of pyradiomics' texture values.

        pyradiomics averages per-direction matrices (GLCM, GLRLM) that span the
        whole volume; with ``force2D`` the directions are in-plane but the
        matrices still merge all slices, which IBSI calls 2.5D.
        """
        return "2_5D" if self.slice_wise else "3D"

    def pyradiomics_settings(self) -> dict[str, object]:
        """The configuration as pyradiomics' ``setting`` section (what a user would write)."""
        settings: dict[str, object] = {
            "label": 1,
            # IBSI energy and RMS are of the intensities themselves; pyradiomics shifts by 2000 by default.
            "voxelArrayShift": 0,
            # GLCM, NGTDM and NGLDM at Chebyshev distance 1; NGLDM coarseness alpha = 0.
            "distances": [1],
            "gldm_a": 0,
            "symmetricalGLCM": True,
            # The reference values are of the intensities as given (HU), never normalised.
            "normalize": False,
        }
        if self.bin_width is not None:
            settings["binWidth"] = self.bin_width
        else:
            settings["binCount"] = self.bin_count
        if self.slice_wise:
            settings["force2D"] = True
            settings["force2Ddimension"] = 0
        if self.spacing_mm is not None:
            # pyradiomics keeps the original spacing along an axis given as 0.
            settings["resampledPixelSpacing"] = [0 if s is None else float(s) for s in self.spacing_mm]
            settings["interpolator"] = _PYRADIOMICS_INTERPOLATORS[self.interpolator]
        if self.outlier_sigma is not None and self.resegment_range is None:
            settings["resegmentMode"] = "sigma"
            settings["resegmentRange"] = [-self.outlier_sigma, self.outlier_sigma]
        elif self.resegment_range is not None:
            # pyradiomics offers range or sigma re-segmentation, not both (configuration E): range is kept.
            settings["resegmentRange"] = list(self.resegment_range)
        return settings


_SITK_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
_PYRADIOMICS_INTERPOLATORS = {"linear": "sitkLinear", "bspline": "sitkBSpline"}

#: The configurations of the IBSI 1 reference manual, chapter "Reference data sets".
CONFIGURATIONS: Mapping[str, IbsiConfiguration] = {
    c.name: c
    for c in (
        IbsiConfiguration(
            name="digital",
            data_set=DIGITAL_PHANTOM,
            description="digital phantom: 3D, no processing, fixed bin size 1",
            bin_width=1,
        ),
        IbsiConfiguration(
            name="A",
            data_set=CT_PHANTOM,
            description="2D, no interpolation, range [-500, 400] HU, fixed bin size 25 HU",
            slice_wise=True,
            resegment_range=(-500, 400),
            bin_width=25,
        ),
        IbsiConfiguration(
            name="B",
            data_set=CT_PHANTOM,
            description="2D, bilinear to 2x2 mm in-plane, range [-500, 400] HU, fixed bin number 32",
            slice_wise=True,
            spacing_mm=(2.0, 2.0, None),
            resegment_range=(-500, 400),
            bin_count=32,
        ),
        IbsiConfiguration(
            name="C",
            data_set=CT_PHANTOM,
            description="3D, trilinear to 2 mm isotropic, range [-1000, 400] HU, fixed bin size 25 HU",
            spacing_mm=(2.0, 2.0, 2.0),
            resegment_range=(-1000, 400),
            bin_width=25,
        ),
        IbsiConfiguration(
            name="D",
            data_set=CT_PHANTOM,
            description="3D, trilinear to 2 mm isotropic, 3-sigma outlier filtering, fixed bin number 32",
            spacing_mm=(2.0, 2.0, 2.0),
            outlier_sigma=3.0,
            bin_count=32,
        ),
        IbsiConfiguration(
            name="E",
            data_set=CT_PHANTOM,
            description="3D, tricubic spline to 2 mm isotropic, range [-1000, 400] HU and 3-sigma, fixed bin number 32",
            spacing_mm=(2.0, 2.0, 2.0),
            interpolator="bspline",
            resegment_range=(-1000, 400),
            outlier_sigma=3.0,
            bin_count=32,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class FeatureMapping:
    """pyradiomics ``class_Feature`` -> IBSI feature.

    ``ibsi_stem`` is the IBSI tag without its aggregation suffix (``cm_joint_avg``);
    texture tags get ``_3D_avg``/``_2_5D_avg`` (GLCM, GLRLM) or ``_3D``/``_2_5D``
    appended.  ``offset`` is added to pyradiomics' value (its kurtosis is not
    the excess kurtosis IBSI uses).
    """

    pyradiomics: str
    ibsi_stem: str
    ibsi_name: str
    offset: float = 0.0

    @property
    def feature_class(self) -> str:
        return self.pyradiomics.split("_", 1)[0]

    def ibsi_tag(self, configuration: IbsiConfiguration) -> str:
        suffix = _AGGREGATION.get(self.feature_class)
        if suffix is None:
            return self.ibsi_stem
        return f"{self.ibsi_stem}_{configuration.texture_suffix}{suffix}"


# GLCM and GLRLM: per-direction features averaged ("avg"); the other texture classes have no directions.
_AGGREGATION = {"glcm": "_avg", "glrlm": "_avg", "glszm": "", "ngtdm": "", "gldm": ""}


def _m(pyradiomics: str, stem: str, name: str, offset: float = 0.0) -> FeatureMapping:
    return FeatureMapping(pyradiomics, stem, name, offset)


#: Every pyradiomics feature with an IBSI counterpart (pyradiomics docs, "Radiomic Features", and
#: the IBSI manual's feature tables).  pyradiomics features absent here have none
#: (e.g. shape Compactness1/2 are deprecated in pyradiomics, glcm MCC is not in IBSI).
FEATURE_MAP: tuple[FeatureMapping, ...] = (
    # Morphology (mesh- and voxel-based; always 3D, on the morphological mask)
    _m("shape_MeshVolume", "morph_volume", "Volume (mesh)"),
    _m("shape_VoxelVolume", "morph_vol_approx", "Volume (voxel counting)"),
    _m("shape_SurfaceArea", "morph_area_mesh", "Surface area (mesh)"),
    _m("shape_SurfaceVolumeRatio", "morph_av", "Surface to volume ratio"),
    _m("shape_Sphericity", "morph_sphericity", "Sphericity"),
    _m("shape_Maximum3DDiameter", "morph_diam", "Maximum 3D diameter"),
    _m("shape_MajorAxisLength", "morph_pca_maj_axis", "Major axis length"),
    _m("shape_MinorAxisLength", "morph_pca_min_axis", "Minor axis length"),
    _m("shape_LeastAxisLength", "morph_pca_least_axis", "Least axis length"),
    _m("shape_Elongation", "morph_pca_elongation", "Elongation"),
    _m("shape_Flatness", "morph_pca_flatness", "Flatness"),
    # Intensity-based statistics (undiscretised intensities)
    _m("firstorder_Mean", "stat_mean", "Mean"),
    _m("firstorder_Variance", "stat_var", "Variance"),
    _m("firstorder_Skewness", "stat_skew", "Skewness"),
    _m("firstorder_Kurtosis", "stat_kurt", "(Excess) kurtosis", offset=-3.0),
    _m("firstorder_Median", "stat_median", "Median"),
    _m("firstorder_Minimum", "stat_min", "Minimum"),
    _m("firstorder_10Percentile", "stat_p10", "10th percentile"),
    _m("firstorder_90Percentile", "stat_p90", "90th percentile"),
    _m("firstorder_Maximum", "stat_max", "Maximum"),
    _m("firstorder_InterquartileRange", "stat_iqr", "Interquartile range"),
    _m("firstorder_Range", "stat_range", "Range"),
    _m("firstorder_MeanAbsoluteDeviation", "stat_mad", "Mean absolute deviation"),
    _m("firstorder_RobustMeanAbsoluteDeviation", "stat_rmad", "Robust mean absolute deviation"),
    _m("firstorder_Energy", "stat_energy", "Energy"),
    _m("firstorder_RootMeanSquared", "stat_rms", "Root mean square"),
    # Intensity histogram (discretised intensities)
    _m("firstorder_Entropy", "ih_entropy", "Intensity histogram entropy"),
    _m("firstorder_Uniformity", "ih_uniformity", "Intensity histogram uniformity"),
    # Grey level co-occurrence matrix
    _m("glcm_MaximumProbability", "cm_joint_max", "GLCM joint maximum"),
    _m("glcm_JointAverage", "cm_joint_avg", "GLCM joint average"),
    _m("glcm_SumSquares", "cm_joint_var", "GLCM joint variance"),
    _m("glcm_JointEntropy", "cm_joint_entr", "GLCM joint entropy"),
    _m("glcm_DifferenceAverage", "cm_diff_avg", "GLCM difference average"),
    _m("glcm_DifferenceVariance", "cm_diff_var", "GLCM difference variance"),
    _m("glcm_DifferenceEntropy", "cm_diff_entr", "GLCM difference entropy"),
    _m("glcm_SumAverage", "cm_sum_avg", "GLCM sum average"),
    _m("glcm_SumEntropy", "cm_sum_entr", "GLCM sum entropy"),
    _m("glcm_JointEnergy", "cm_energy", "GLCM angular second moment"),
    _m("glcm_Contrast", "cm_contrast", "GLCM contrast"),
    _m("glcm_Id", "cm_inv_diff", "GLCM inverse difference"),
    _m("glcm_Idn", "cm_inv_diff_norm", "GLCM normalised inverse difference"),
    _m("glcm_Idm", "cm_inv_diff_mom", "GLCM inverse difference moment"),
    _m("glcm_Idmn", "cm_inv_diff_mom_norm", "GLCM normalised inverse difference moment"),
    _m("glcm_InverseVariance", "cm_inv_var", "GLCM inverse variance"),
    _m("glcm_Correlation", "cm_corr", "GLCM correlation"),
    _m("glcm_Autocorrelation", "cm_auto_corr", "GLCM autocorrelation"),
    _m("glcm_ClusterTendency", "cm_clust_tend", "GLCM cluster tendency"),
    _m("glcm_ClusterShade", "cm_clust_shade", "GLCM cluster shade"),
    _m("glcm_ClusterProminence", "cm_clust_prom", "GLCM cluster prominence"),
    _m("glcm_Imc1", "cm_info_corr1", "GLCM information correlation 1"),
    _m("glcm_Imc2", "cm_info_corr2", "GLCM information correlation 2"),
    # Grey level run length matrix
    _m("glrlm_ShortRunEmphasis", "rlm_sre", "GLRLM short runs emphasis"),
    _m("glrlm_LongRunEmphasis", "rlm_lre", "GLRLM long runs emphasis"),
    _m("glrlm_LowGrayLevelRunEmphasis", "rlm_lgre", "GLRLM low grey level run emphasis"),
    _m("glrlm_HighGrayLevelRunEmphasis", "rlm_hgre", "GLRLM high grey level run emphasis"),
    _m("glrlm_ShortRunLowGrayLevelEmphasis", "rlm_srlge", "GLRLM short run low grey level emphasis"),
    _m("glrlm_ShortRunHighGrayLevelEmphasis", "rlm_srhge", "GLRLM short run high grey level emphasis"),
    _m("glrlm_LongRunLowGrayLevelEmphasis", "rlm_lrlge", "GLRLM long run low grey level emphasis"),
    _m("glrlm_LongRunHighGrayLevelEmphasis", "rlm_lrhge", "GLRLM long run high grey level emphasis"),
    _m("glrlm_GrayLevelNonUniformity", "rlm_glnu", "GLRLM grey level non-uniformity"),
    _m("glrlm_GrayLevelNonUniformityNormalized", "rlm_glnu_norm", "GLRLM normalised grey level non-uniformity"),
    _m("glrlm_RunLengthNonUniformity", "rlm_rlnu", "GLRLM run length non-uniformity"),
    _m("glrlm_RunLengthNonUniformityNormalized", "rlm_rlnu_norm", "GLRLM normalised run length non-uniformity"),
    _m("glrlm_RunPercentage", "rlm_r_perc", "GLRLM run percentage"),
    _m("glrlm_GrayLevelVariance", "rlm_gl_var", "GLRLM grey level variance"),
    _m("glrlm_RunVariance", "rlm_rl_var", "GLRLM run length variance"),
    _m("glrlm_RunEntropy", "rlm_rl_entr", "GLRLM run entropy"),
    # Grey level size zone matrix
    _m("glszm_SmallAreaEmphasis", "szm_sze", "GLSZM small zone emphasis"),
    _m("glszm_LargeAreaEmphasis", "szm_lze", "GLSZM large zone emphasis"),
    _m("glszm_LowGrayLevelZoneEmphasis", "szm_lgze", "GLSZM low grey level zone emphasis"),
    _m("glszm_HighGrayLevelZoneEmphasis", "szm_hgze", "GLSZM high grey level zone emphasis"),
    _m("glszm_SmallAreaLowGrayLevelEmphasis", "szm_szlge", "GLSZM small zone low grey level emphasis"),
    _m("glszm_SmallAreaHighGrayLevelEmphasis", "szm_szhge", "GLSZM small zone high grey level emphasis"),
    _m("glszm_LargeAreaLowGrayLevelEmphasis", "szm_lzlge", "GLSZM large zone low grey level emphasis"),
    _m("glszm_LargeAreaHighGrayLevelEmphasis", "szm_lzhge", "GLSZM large zone high grey level emphasis"),
    _m("glszm_GrayLevelNonUniformity", "szm_glnu", "GLSZM grey level non-uniformity"),
    _m("glszm_GrayLevelNonUniformityNormalized", "szm_glnu_norm", "GLSZM normalised grey level non-uniformity"),
    _m("glszm_SizeZoneNonUniformity", "szm_zsnu", "GLSZM zone size non-uniformity"),
    _m("glszm_SizeZoneNonUniformityNormalized", "szm_zsnu_norm", "GLSZM normalised zone size non-uniformity"),
    _m("glszm_ZonePercentage", "szm_z_perc", "GLSZM zone percentage"),
    _m("glszm_GrayLevelVariance", "szm_gl_var", "GLSZM grey level variance"),
    _m("glszm_ZoneVariance", "szm_zs_var", "GLSZM zone size variance"),
    _m("glszm_ZoneEntropy", "szm_zs_entr", "GLSZM zone size entropy"),
    # Neighbourhood grey tone difference matrix
    _m("ngtdm_Coarseness", "ngt_coarseness", "NGTDM coarseness"),
    _m("ngtdm_Contrast", "ngt_contrast", "NGTDM contrast"),
    _m("ngtdm_Busyness", "ngt_busyness", "NGTDM busyness"),
    _m("ngtdm_Complexity", "ngt_complexity", "NGTDM complexity"),
    _m("ngtdm_Strength", "ngt_strength", "NGTDM strength"),
    # Neighbouring grey level dependence matrix (pyradiomics GLDM with gldm_a = 0)
    _m("gldm_SmallDependenceEmphasis", "ngl_lde", "NGLDM low dependence emphasis"),
    _m("gldm_LargeDependenceEmphasis", "ngl_hde", "NGLDM high dependence emphasis"),
    _m("gldm_LowGrayLevelEmphasis", "ngl_lgce", "NGLDM low grey level count emphasis"),
    _m("gldm_HighGrayLevelEmphasis", "ngl_hgce", "NGLDM high grey level count emphasis"),
    _m("gldm_SmallDependenceLowGrayLevelEmphasis", "ngl_ldlge", "NGLDM low dependence low grey level emphasis"),
    _m("gldm_SmallDependenceHighGrayLevelEmphasis", "ngl_ldhge", "NGLDM low dependence high grey level emphasis"),
    _m("gldm_LargeDependenceLowGrayLevelEmphasis", "ngl_hdlge", "NGLDM high dependence low grey level emphasis"),
    _m("gldm_LargeDependenceHighGrayLevelEmphasis", "ngl_hdhge", "NGLDM high dependence high grey level emphasis"),
    _m("gldm_GrayLevelNonUniformity", "ngl_glnu", "NGLDM grey level non-uniformity"),
    _m("gldm_DependenceNonUniformity", "ngl_dcnu", "NGLDM dependence count non-uniformity"),
    _m("gldm_DependenceNonUniformityNormalized", "ngl_dcnu_norm", "NGLDM normalised dependence count non-uniformity"),
    _m("gldm_GrayLevelVariance", "ngl_gl_var", "NGLDM grey level variance"),
    _m("gldm_DependenceVariance", "ngl_dc_var", "NGLDM dependence count variance"),
    _m("gldm_DependenceEntropy", "ngl_dc_entr", "NGLDM dependence count entropy"),
)


# ---------------------------------------------------------------------------------------------
# Reference values


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """One IBSI consensus value: ``data_set`` is ``digital`` or a configuration letter."""

    configuration: str
    ibsi_tag: str
    value: float
    tolerance: float


def parse_reference_csv(text: str) -> dict[tuple[str, str], ReferenceValue]:
    """Reference values keyed by ``(configuration, ibsi_tag)`` from the CSV shipped with the node.

    Lines starting with ``#`` are comments (source and licence notes).
    Columns: ``configuration,ibsi_tag,value,tolerance``.
    """
    rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(rows)))
    expected = {"configuration", "ibsi_tag", "value", "tolerance"}
    if reader.fieldnames is None or not expected <= set(reader.fieldnames):
        raise InputError(f"IBSI reference CSV must have the columns {sorted(expected)}, got {reader.fieldnames}")
    references: dict[tuple[str, str], ReferenceValue] = {}
    for number, row in enumerate(reader, start=2):
        try:
            value, tolerance = float(row["value"]), float(row["tolerance"])
        except ValueError:
            raise InputError(f"IBSI reference CSV row {number}: value and tolerance must be numbers") from None
        key = (row["configuration"], row["ibsi_tag"])
        if key in references:
            raise InputError(f"IBSI reference CSV row {number}: {key} appears twice")
        references[key] = ReferenceValue(row["configuration"], row["ibsi_tag"], value, tolerance)
    return references


# ---------------------------------------------------------------------------------------------
# Image processing (IBSI method)


def prepare_phantom(image: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The phantom as IBSI asks: intensities as 32-bit floats rounded to integers, mask as 0/1 ``UInt8``."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("the phantom image must be a 3D scalar image")
    mask_size: tuple[int, ...] = mask.GetSize()
    image_size: tuple[int, ...] = image.GetSize()
    mask_spacing_mm: tuple[float, ...] = mask.GetSpacing()
    image_spacing_mm: tuple[float, ...] = image.GetSpacing()
    if mask_size != image_size or not np.allclose(mask_spacing_mm, image_spacing_mm, atol=1e-4):
        raise MaskError(
            f"the phantom mask grid (size {mask_size}, spacing {mask_spacing_mm}) differs from the "
            f"image grid (size {image_size}, spacing {image_spacing_mm})"
        )
    rounded: sitk.Image = sitk.Round(sitk.Cast(image, sitk.sitkFloat32))
    binary: sitk.Image = sitk.Cast(sitk.Round(sitk.Cast(mask, sitk.sitkFloat32)) > 0, sitk.sitkUInt8)
    binary.CopyInformation(rounded)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise MaskError("the phantom mask is empty")
    return rounded, binary


def centred_grid(image: sitk.Image, spacing_mm: Sequence[float | None], centred: bool = True) -> Grid:
    """(size, spacing, origin) of the IBSI interpolation grid.

    The grid size is the fractional size rounded up, and the centre of the new
    grid is the centre of the original one (IBSI manual, "Notes on
    interpolation"); ``None`` keeps an axis' spacing.  ``centred=False``
    keeps the original origin instead (pyradiomics' choice).
    """
    size: tuple[int, ...] = image.GetSize()
    spacing: tuple[float, ...] = image.GetSpacing()
    direction_cosines: tuple[float, ...] = image.GetDirection()
    origin_mm: tuple[float, ...] = image.GetOrigin()
    old_size = np.array(size, dtype=np.float64)
    old_spacing = np.array(spacing, dtype=np.float64)
    new_spacing = np.array([old if new is None else float(new) for old, new in zip(old_spacing, spacing_mm)])
    new_size = np.ceil(old_size * old_spacing / new_spacing).astype(int)
    direction = np.array(direction_cosines, dtype=np.float64).reshape(3, 3)
    old_centre = np.array(origin_mm) + direction @ ((old_size - 1) / 2 * old_spacing)
    new_origin = old_centre - direction @ ((new_size - 1) / 2 * new_spacing)
    if not centred:
        new_origin = np.array(origin_mm, dtype=np.float64)
    return tuple(int(s) for s in new_size), tuple(float(s) for s in new_spacing), tuple(float(o) for o in new_origin)


def _resample(image: sitk.Image, grid: Grid, interpolator: int) -> sitk.Image:
    size, spacing, origin = grid
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(interpolator)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    # The grid is larger than the image: IBSI extrapolates with the nearest boundary intensity.
    resampler.SetUseNearestNeighborExtrapolator(True)
    resampled: sitk.Image = resampler.Execute(image)
    return resampled


@dataclass(frozen=True, slots=True)
class IbsiAdjustments:
    """The IBSI steps the ``ibsi`` method adds to pyradiomics; each can be switched off to measure its effect.

    - ``centred_grid``: the interpolation grid is centred on the original grid (off: anchored at the
      original origin, as pyradiomics does);
    - ``interpolated_mask``: the mask is interpolated trilinearly and thresholded at 0.5 (off: nearest neighbour);
    - ``round_intensities``: interpolated intensities are rounded to integers;
    - ``combined_resegmentation``: range and 3-sigma re-segmentation together (off: the range only, as
      pyradiomics' single ``resegmentRange`` does);
    - ``bins_from_bound``: fixed bin size edges start at the re-segmentation lower bound (off: pyradiomics' edges);
    - ``sample_covariance_axes``: axis lengths from the sample covariance, as the consensus values.
    """

    centred_grid: bool = True
    interpolated_mask: bool = True
    round_intensities: bool = True
    combined_resegmentation: bool = True
    bins_from_bound: bool = True
    sample_covariance_axes: bool = True

    def without(self, name: str) -> IbsiAdjustments:
        if name not in self.__dataclass_fields__:
            raise ValueError(f"unknown IBSI adjustment {name!r} (known: {', '.join(self.__dataclass_fields__)})")
        return dataclasses.replace(self, **{name: False})


ALL_ADJUSTMENTS = IbsiAdjustments()


@dataclass(frozen=True)
class ProcessedRoi:
    """The image and the two IBSI masks: morphological (shape) and intensity (everything else)."""

    image: sitk.Image
    morphological_mask: sitk.Image
    intensity_mask: sitk.Image
    bin_lower_bound: float | None


def ibsi_process(
    image: sitk.Image,
    mask: sitk.Image,
    configuration: IbsiConfiguration,
    adjustments: IbsiAdjustments = ALL_ADJUSTMENTS,
) -> ProcessedRoi:
    """Interpolation and re-segmentation as the IBSI reference manual defines them."""
    image, mask = prepare_phantom(image, mask)
    if configuration.spacing_mm is not None:
        grid = centred_grid(image, configuration.spacing_mm, adjustments.centred_grid)
        image = _resample(image, grid, _SITK_INTERPOLATORS[configuration.interpolator])
        if adjustments.round_intensities:
            image = sitk.Round(image)
        if adjustments.interpolated_mask:
            # The mask is interpolated like an image (trilinear) and kept where at least half a voxel is ROI.
            partial = _resample(sitk.Cast(mask, sitk.sitkFloat32), grid, sitk.sitkLinear)
            mask = sitk.Cast(partial >= 0.5, sitk.sitkUInt8)
        else:
            mask = sitk.Cast(_resample(mask, grid, sitk.sitkNearestNeighbor), sitk.sitkUInt8)
        mask.CopyInformation(image)
    values: NDArray[np.float32] = sitk.GetArrayFromImage(image)
    morphological: NDArray[np.bool_] = sitk.GetArrayFromImage(mask).astype(bool)
    if not morphological.any():
        raise MaskError(f"configuration {configuration.name}: the interpolated mask is empty")
    keep = morphological.copy()
    if configuration.resegment_range is not None:
        low, high = configuration.resegment_range
        keep &= (values >= low) & (values <= high)
    if configuration.outlier_sigma is not None and (
        adjustments.combined_resegmentation or configuration.resegment_range is None
    ):
        # Mean and SD of the interpolated ROI, before the range is applied; the result is the intersection.
        roi = values[morphological].astype(float)
        centre, spread = roi.mean(), roi.std()
        keep &= np.abs(values - centre) <= configuration.outlier_sigma * spread
    if not keep.any():
        raise MaskError(f"configuration {configuration.name}: re-segmentation removed every voxel")
    intensity: sitk.Image = sitk.GetImageFromArray(keep.astype(np.uint8))
    intensity.CopyInformation(image)
    lower = None
    if configuration.bin_width is not None and adjustments.bins_from_bound:
        # IBSI fixed bin size counts bins from the re-segmentation lower bound, else from the ROI minimum.
        lower = (
            float(configuration.resegment_range[0])
            if configuration.resegment_range is not None
            else float(values[keep].min())
        )
    return ProcessedRoi(image, mask, intensity, lower)


def _ibsi_binning_class(base: type, lower_bound: float | None) -> type:
    """``base`` (a pyradiomics feature class) with IBSI fixed-bin-size edges.

    A subclass rather than a patch of ``radiomics.imageoperations``, so the
    node's own extraction in the same process keeps pyradiomics' binning.
    """
    if lower_bound is None:
        return base

    def _applyBinning(self: RadiomicsFeaturesBase, matrix: NDArray[np.float64]) -> NDArray[np.int_]:
        width = float(self.settings["binWidth"])
        roi = matrix[self.maskArray]
        edges = np.arange(lower_bound, roi.max() + 2 * width, width)
        binned = np.zeros(matrix.shape, dtype="int")
        binned[self.maskArray] = np.digitize(roi, edges)
        self.coefficients["grayLevels"] = np.unique(binned[self.maskArray])
        self.coefficients["Ng"] = int(np.max(self.coefficients["grayLevels"]))
        return binned

    # pyradiomics names each class' logger after its module; keep it under "radiomics".
    return type(f"Ibsi{base.__name__}", (base,), {"_applyBinning": _applyBinning, "__module__": base.__module__})


def extract_ibsi(
    roi: ProcessedRoi, configuration: IbsiConfiguration, adjustments: IbsiAdjustments = ALL_ADJUSTMENTS
) -> dict[str, float]:
    """pyradiomics' feature classes on an IBSI-processed ROI: ``{"glcm_JointAverage": value, ...}``.

    Shape uses the morphological mask, every other class the intensity mask
    (pyradiomics does the same with ``resegmentShape: false``).
    """
    settings = configuration.pyradiomics_settings()
    # Processing is done: pyradiomics must neither resample nor re-segment again.
    for key in ("resampledPixelSpacing", "interpolator", "resegmentRange", "resegmentMode"):
        settings.pop(key, None)
    classes = getFeatureClasses()
    results: dict[str, float] = {}
    for name in FEATURE_CLASSES:
        mask = roi.morphological_mask if name == "shape" else roi.intensity_mask
        bounding_box, _ = imageoperations.checkMask(roi.image, mask, **settings)
        if bounding_box is None:
            raise MaskError(f"configuration {configuration.name}: pyradiomics rejects the {name} mask")
        image, cropped = imageoperations.cropToTumorMask(roi.image, mask, bounding_box, padDistance=1)
        feature_class = _ibsi_binning_class(classes[name], roi.bin_lower_bound)(image, cropped, **settings)
        feature_class.enableAllFeatures()
        for feature, value in feature_class.execute().items():
            results[f"{name}_{feature}"] = float(value)
    # The IBSI consensus axis lengths use the sample covariance of the voxel centres (N - 1), pyradiomics the
    # population covariance (N): 4 sqrt(lambda) differs by sqrt(N / (N - 1)), 0.7 % for the 74-voxel
    # digital phantom and 0.001 % for the CT phantom.  Elongation and flatness are ratios and unaffected.
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(roi.morphological_mask)))
    if voxels > 1 and adjustments.sample_covariance_axes:
        for axis in ("shape_MajorAxisLength", "shape_MinorAxisLength", "shape_LeastAxisLength"):
            results[axis] *= math.sqrt(voxels / (voxels - 1))
    return results


def extract_stock(image: sitk.Image, mask: sitk.Image, configuration: IbsiConfiguration) -> dict[str, float]:
    """The node's own extraction (``extract_all_features``) with the configuration's settings override."""
    image, mask = prepare_phantom(image, mask)
    settings = ExtractionSettings(
        pyradiomics_version=installed_pyradiomics_version(),
        settings=configuration.pyradiomics_settings(),
        image_types={"Original": {}},
    )
    values = extract_all_features(image, mask, settings, feature_classes=list(FEATURE_CLASSES))
    return {key.removeprefix("original_"): value for key, value in values.items()}


def extract(
    image: sitk.Image,
    mask: sitk.Image,
    configuration: IbsiConfiguration,
    method: Method,
    adjustments: IbsiAdjustments = ALL_ADJUSTMENTS,
) -> dict[str, float]:
    """Feature values keyed ``class_Feature`` (pyradiomics names) for one configuration."""
    if method is Method.STOCK:
        return extract_stock(image, mask, configuration)
    return extract_ibsi(ibsi_process(image, mask, configuration, adjustments), configuration, adjustments)


# ---------------------------------------------------------------------------------------------
# Comparison


@dataclass(frozen=True, slots=True)
class FeatureComparison:
    pyradiomics: str
    ibsi_tag: str
    ibsi_name: str
    value: float | None
    reference: float
    tolerance: float
    outcome: Outcome


@dataclass(frozen=True)
class ConfigurationReport:
    configuration: IbsiConfiguration
    method: Method
    comparisons: tuple[FeatureComparison, ...]
    pyradiomics_version: str = field(default_factory=lambda: radiomics.__version__)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for c in self.comparisons if c.outcome is outcome)


def round_significant(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits, as the IBSI reference values are."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def matches(value: float, reference: float, tolerance: float) -> bool:
    """IBSI agreement: the value, rounded to 3 significant digits, lies within ``tolerance`` of the reference."""
    if not math.isfinite(value):
        return False
    # The slack absorbs binary floating point in values like 0.1 + 0.2, nothing more.
    slack = 1e-9 * max(abs(reference), 1e-12)
    return abs(round_significant(value) - reference) <= tolerance + slack


def compare(
    values: Mapping[str, float],
    references: Mapping[tuple[str, str], ReferenceValue],
    configuration: IbsiConfiguration,
    method: Method,
    mappings: Iterable[FeatureMapping] = FEATURE_MAP,
) -> ConfigurationReport:
    """One row per mapped feature that has a reference value for ``configuration``."""
    rows = []
    for mapping in mappings:
        tag = mapping.ibsi_tag(configuration)
        reference = references.get((configuration.name, tag))
        if reference is None:
            continue
        raw = values.get(mapping.pyradiomics)
        if raw is None or not math.isfinite(raw):
            rows.append(
                FeatureComparison(
                    mapping.pyradiomics,
                    tag,
                    mapping.ibsi_name,
                    None,
                    reference.value,
                    reference.tolerance,
                    Outcome.NOT_COMPUTED,
                )
            )
            continue
        value = raw + mapping.offset
        outcome = Outcome.MATCHED if matches(value, reference.value, reference.tolerance) else Outcome.OUT_OF_TOLERANCE
        rows.append(
            FeatureComparison(
                mapping.pyradiomics, tag, mapping.ibsi_name, value, reference.value, reference.tolerance, outcome
            )
        )
    return ConfigurationReport(configuration, method, tuple(rows))
