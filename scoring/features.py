"""Radiomics features through pyradiomics, computing only what a model needs.

``extract_model_features`` reproduces ``RadiomicsFeatureExtractor.execute``
step by step (load and resample, check the mask, resegment, shape, filters,
crop, feature classes) but enables only the feature classes and features the
model names, and keeps only the filtered images it uses.  Each step is
pyradiomics' own function with the settings pyradiomics would pass, so the
values are those of a full run.

``extract_all_features`` is the full run itself (for training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, SupportsFloat, TypeAlias

import numpy as np
import radiomics
import SimpleITK as sitk
from numpy.typing import NDArray
from radiomics import getFeatureClasses, getImageTypes, imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

from sclc_risk_node.scoring.crop import CropBox, has_prefilter, why_not_in_crop
from sclc_risk_node.scoring.errors import FeatureExtractionError, MaskError
from sclc_risk_node.scoring.types import ExtractionSettings, FeatureSpec, FeatureVector


def _quiet_pyradiomics() -> None:
    # pyradiomics logs every step at INFO; our JSON logs want its warnings only.
    logging.getLogger("radiomics").setLevel(logging.WARNING)
    radiomics.setVerbosity(logging.WARNING)


_quiet_pyradiomics()

#: A JSON value, as ``settings_hash`` hashes it.
_Json: TypeAlias = "None | bool | int | float | str | list[_Json] | dict[str, _Json]"
#: One image a pyradiomics filter yields: the image, its image type, the settings it was made with.
_FilteredImage: TypeAlias = tuple[sitk.Image, str, Mapping[str, Any]]

# pyradiomics' filter (the ``imageType`` key) that produces each image-type prefix.
_SINGLE_IMAGE_FILTERS = {
    "original": "Original",
    "square": "Square",
    "squareroot": "SquareRoot",
    "logarithm": "Logarithm",
    "exponential": "Exponential",
    "gradient": "Gradient",
    "lbp-2D": "LBP2D",
}


def installed_pyradiomics_version() -> str:
    return _normalise_version(radiomics.__version__)


def check_pyradiomics_version(settings: ExtractionSettings) -> None:
    """Raise ``FeatureExtractionError`` unless the installed pyradiomics is the pinned one."""
    pinned = _normalise_version(settings.pyradiomics_version)
    installed = installed_pyradiomics_version()
    if pinned != installed:
        raise FeatureExtractionError(
            f"the settings pin pyradiomics {pinned} but pyradiomics {installed} is installed; "
            "feature values are only reproducible with the pinned version"
        )


def settings_hash(settings: ExtractionSettings) -> str:
    """sha256 (hex) of the canonical JSON of pyradiomics version, settings, image types and ring."""
    document = {
        "pyradiomics_version": _normalise_version(settings.pyradiomics_version),
        "settings": _canonical(settings.settings, "settings"),
        "image_types": _canonical(settings.image_types, "image_types"),
        "ring": {
            "outward_mm": _canonical(settings.ring.outward_mm, "ring.outward_mm"),
            "inward_mm": _canonical(settings.ring.inward_mm, "ring.inward_mm"),
            "method": settings.ring.method,
        },
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def extract_all_features(
    image: sitk.Image,
    mask: sitk.Image,
    settings: ExtractionSettings,
    feature_classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """A full pyradiomics run: every feature of ``feature_classes`` (default: all but shape2D) on every image type.

    Keys are pyradiomics' (``wavelet-LLH_glcm_Correlation``), without the
    ``diagnostics_*`` entries.  A feature pyradiomics could not compute is NaN
    here (training decides what to do with it).
    """
    check_pyradiomics_version(settings)
    _check_image_types(settings)
    extractor = RadiomicsFeatureExtractor(**dict(settings.settings))
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(**{name: dict(custom) for name, custom in settings.image_types.items()})
    if feature_classes is not None:
        known = getFeatureClasses()
        extractor.disableAllFeatures()
        for feature_class in feature_classes:
            if feature_class not in known:
                raise FeatureExtractionError(
                    f"unknown pyradiomics feature class {feature_class!r} (known: {', '.join(sorted(known))})"
                )
            extractor.enableFeatureClassByName(feature_class)
    _check_mask_labels(mask, "mask", extractor.settings.get("label", 1))
    try:
        result: Mapping[str, object] = extractor.execute(image, mask)
    except ValueError as error:
        # execute raises ValueError for unusable masks (single voxel, geometry, resegmentation).
        raise MaskError(f"mask unusable for pyradiomics: {error}") from error
    except Exception as error:
        raise FeatureExtractionError(f"pyradiomics failed: {type(error).__name__}: {error}") from error
    # Every non-diagnostics entry is a feature value (a numpy scalar or 0-d array).
    return {key: float(value) for key, value in result.items() if not key.startswith("diagnostics_")}  # type: ignore[arg-type]


def extract_model_features(
    image: sitk.Image,
    regions: Mapping[str, sitk.Image],
    specs: Sequence[FeatureSpec],
    settings: ExtractionSettings,
    *,
    crop: CropBox | None = None,
) -> FeatureVector:
    """The features named by ``specs``, equal to those of a full pyradiomics run with ``settings``.

    ``regions`` maps region names (``tumour``, ``ring``) to 0/1 masks on the
    image's grid.  With ``crop`` (``scoring.crop.plan_crop``) the masks are
    that box of ``image``, and pyradiomics sees only the box: its resampling
    grid is laid out in the whole volume's index space, as a run on the
    whole volume would lay it out, so the values are that run's.  Raises ``FeatureExtractionError`` for a feature class,
    feature or image type pyradiomics does not have or the settings do not
    enable, and for a NaN or infinite value; ``MaskError`` for a missing, empty or
    too-small region.
    """
    check_pyradiomics_version(settings)
    plans = _plan(specs, settings)
    label = settings.settings.get("label", 1)
    if label != 1:
        raise FeatureExtractionError(f"region masks carry label 1, but the settings ask for label {label!r}")
    for region in plans:
        if region not in regions:
            raise MaskError(f"no mask given for the {region} region (given: {', '.join(sorted(regions)) or 'none'})")
        _check_mask_labels(regions[region], f"{region} region", label)

    source = None
    if crop is not None:
        reason = why_not_in_crop(settings.settings)
        if reason:
            raise FeatureExtractionError(f"these settings cannot be extracted on a crop: {reason}")
        source = _CroppedSource(image, crop, crop.apply(image))
        image = source.cropped
    values: dict[str, float] = {}
    for region, plan in plans.items():
        computed = _extract_region(image, regions[region], region, plan, settings, source)
        for key, value in computed.items():
            values[f"{region}.{key}"] = value

    ordered = {}
    for spec in specs:
        if spec.name not in values:
            raise FeatureExtractionError(f"pyradiomics did not return feature {spec.name}")
        value = values[spec.name]
        if not math.isfinite(value):
            raise FeatureExtractionError(
                f"feature {spec.name} is not finite ({value}): pyradiomics could not compute it"
            )
        ordered[spec.name] = value
    return FeatureVector(ordered)


@dataclass(frozen=True)
class _CroppedSource:
    """The whole CT, the crop box and the CT cut to it."""

    whole: sitk.Image
    box: CropBox
    cropped: sitk.Image


@dataclass
class _RegionPlan:
    """What to compute for one region: ``{image_type: {feature_class: [feature, ...]}}`` and the filters needed."""

    by_image_type: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def add(self, spec: FeatureSpec) -> None:
        features = self.by_image_type.setdefault(spec.image_type, {}).setdefault(spec.feature_class, [])
        if spec.feature not in features:
            features.append(spec.feature)

    def shape_features(self) -> dict[str, list[str]]:
        original = self.by_image_type.get("original", {})
        return {cls: names for cls, names in original.items() if _is_shape_class(cls)}

    def texture_features(self, image_type: str) -> dict[str, list[str]]:
        return {cls: names for cls, names in self.by_image_type.get(image_type, {}).items() if not _is_shape_class(cls)}

    def image_types_for(self, filter_name: str) -> set[str]:
        return {
            image_type
            for image_type in self.by_image_type
            if _filter_for(image_type) == filter_name and self.texture_features(image_type)
        }


def _plan(specs: Sequence[FeatureSpec], settings: ExtractionSettings) -> dict[str, _RegionPlan]:
    """Validate every spec against pyradiomics and the settings before computing anything."""
    _check_image_types(settings)
    classes = getFeatureClasses()
    plans: dict[str, _RegionPlan] = {}
    for spec in specs:
        if spec.feature_class not in classes:
            raise FeatureExtractionError(
                f"{spec.name}: unknown pyradiomics feature class {spec.feature_class!r} "
                f"(known: {', '.join(sorted(classes))})"
            )
        names = classes[spec.feature_class].getFeatureNames()
        if spec.feature not in names:
            raise FeatureExtractionError(
                f"{spec.name}: pyradiomics class {spec.feature_class} has no feature {spec.feature!r}"
            )
        if names[spec.feature]:
            raise FeatureExtractionError(
                f"{spec.name}: feature {spec.feature_class}_{spec.feature} is deprecated in pyradiomics "
                "and not computed by a full run"
            )
        if _is_shape_class(spec.feature_class) and spec.image_type != "original":
            raise FeatureExtractionError(
                f"{spec.name}: shape features exist only for the original image, not {spec.image_type!r}"
            )
        filter_name = _filter_for(spec.image_type)
        if filter_name not in settings.image_types:
            raise FeatureExtractionError(
                f"{spec.name}: image type {spec.image_type!r} needs pyradiomics' {filter_name} filter, "
                f"which the settings do not enable (enabled: {', '.join(settings.image_types) or 'none'})"
            )
        if filter_name == "LoG":
            sigmas = settings.image_types["LoG"].get("sigma", settings.settings.get("sigma", []))
            if not isinstance(sigmas, Iterable):
                raise TypeError(f"LoG sigma must be a list of numbers, got {sigmas!r}")
            if spec.image_type not in {_log_image_type(sigma) for sigma in sigmas}:
                raise FeatureExtractionError(
                    f"{spec.name}: image type {spec.image_type!r} is not one of the configured "
                    f"LoG sigmas {list(sigmas)}"
                )
        plans.setdefault(spec.region, _RegionPlan()).add(spec)
    return plans


def _extract_region(
    image: sitk.Image,
    mask: sitk.Image,
    region: str,
    plan: _RegionPlan,
    settings: ExtractionSettings,
    source: _CroppedSource | None,
) -> dict[str, float]:
    """``RadiomicsFeatureExtractor.execute`` for one mask, restricted to ``plan``."""
    extractor = RadiomicsFeatureExtractor(**dict(settings.settings))
    run_settings: dict[str, Any] = extractor.settings.copy()

    try:
        image, mask = _load_image(extractor, image, mask, source, run_settings)
        bounding_box, corrected = imageoperations.checkMask(image, mask, **run_settings)
        if corrected is not None:
            mask = corrected
        resegmented = None
        if run_settings.get("resegmentRange") is not None:
            resegmented = imageoperations.resegmentMask(image, mask, **run_settings)
            bounding_box, _ = imageoperations.checkMask(image, resegmented, **run_settings)
    except ValueError as error:
        raise MaskError(f"{region} region unusable for pyradiomics: {error}") from error

    results: dict[str, SupportsFloat] = {}
    resegment_shape = run_settings.get("resegmentShape", False)
    if resegment_shape and resegmented is not None:
        mask = resegmented
    shape = plan.shape_features()
    if shape:
        extractor.enabledFeatures = shape
        results.update(_guarded(lambda: extractor.computeShape(image, mask, bounding_box, **run_settings), region))
    if not resegment_shape and resegmented is not None:
        mask = resegmented

    for filter_name, custom in settings.image_types.items():
        wanted = plan.image_types_for(filter_name)
        if not wanted:
            continue
        arguments = run_settings.copy()
        arguments.update(custom)
        if filter_name == "LoG":
            # Each sigma is filtered separately, so only the needed ones are run.
            arguments["sigma"] = [s for s in arguments.get("sigma", []) if _log_image_type(s) in wanted]
        produced = set()
        generator: Iterator[_FilteredImage] = getattr(imageoperations, f"get{filter_name}Image")(
            image, mask, **arguments
        )
        for filtered, image_type, filter_arguments in _wanted_images(generator, wanted, region):
            produced.add(image_type)
            extractor.enabledFeatures = plan.texture_features(image_type)
            cropped_image, cropped_mask = imageoperations.cropToTumorMask(filtered, mask, bounding_box, padDistance=0)
            results.update(
                _guarded(
                    lambda: extractor.computeFeatures(cropped_image, cropped_mask, image_type, **filter_arguments),  # noqa: B023 - called at once
                    region,
                )
            )
        missing = wanted - produced
        if missing:
            raise FeatureExtractionError(
                f"pyradiomics' {filter_name} filter did not produce {', '.join(sorted(missing))} for the "
                f"{region} region (image too small for the filter, or settings that name other images)"
            )
    return {key: float(value) for key, value in results.items()}


def _load_image(
    extractor: RadiomicsFeatureExtractor,
    image: sitk.Image,
    mask: sitk.Image,
    source: _CroppedSource | None,
    run_settings: Mapping[str, Any],
) -> tuple[sitk.Image, sitk.Image]:
    """``extractor.loadImage``; on a crop, with the resampling grid of the whole volume.

    ``run_settings`` are the extractor's settings, as pyradiomics validated them.
    """
    resampling = run_settings.get("interpolator") is not None and run_settings.get("resampledPixelSpacing") is not None
    if source is None or not resampling:
        # Without resampling, loadImage's only crop (preCrop: bounding box + padDistance,
        # clipped to the image) is the same box on the crop as on the whole volume.
        loaded: tuple[sitk.Image, sitk.Image] = extractor.loadImage(image, mask, None, **run_settings)
        return loaded
    checked: sitk.Image = imageoperations.getMask(mask, **run_settings)  # pyradiomics' label checks and UInt32 cast
    return _resample_in_whole_volume(image, checked, _anchored_at_origin(mask, source.box), source, **run_settings)


def _anchored_at_origin(mask: sitk.Image, crop: CropBox) -> sitk.Image:
    """``mask`` (on the crop) pasted into an image that starts at the whole volume's voxel (0, 0, 0).

    Nearest-neighbour resampling at 0.7 -> 1 mm puts sample points exactly
    half-way between voxel centres; there the last bit of the physical-to-index
    arithmetic decides, and it differs between a crop's origin and the whole
    volume's.  With the whole volume's origin, spacing and direction the
    arithmetic is bit for bit that of the whole volume.  Only the mask needs
    this: the image's interpolators are continuous.
    """
    anchored: sitk.Image = sitk.Image([lo + n for lo, n in zip(crop.lower, mask.GetSize())], mask.GetPixelID())
    anchored.SetOrigin(crop.grid.origin_mm)
    anchored.SetSpacing(crop.grid.spacing_mm)
    anchored.SetDirection(crop.grid.direction)
    pasted: sitk.Image = sitk.Paste(anchored, mask, mask.GetSize(), [0, 0, 0], list(crop.lower))
    return pasted


def _resample_in_whole_volume(
    image: sitk.Image, mask: sitk.Image, anchored_mask: sitk.Image, source: _CroppedSource, **kwargs: Any
) -> tuple[sitk.Image, sitk.Image]:
    """``imageoperations.resampleImage`` (pyradiomics 3.1.4) for ``image`` and ``mask``, the crop of ``source``.

    pyradiomics aligns its grid to the index space of the mask it is given:
    the lower bound is ``floor((bb - 0.5) * ratio - padDistance)`` in that
    space, so on a crop the grid would shift by a fraction of a voxel.  This
    is the same computation with the bounding box moved into the whole
    volume's index space, the clipping at the whole volume's edges, and the
    origin computed from the whole volume's geometry; then the same
    ``ResampleImageFilter`` runs.  A B-spline reads the crop: ITK prefilters
    its whole input (the cost crop-first avoids), and the crop's margin holds
    the prefilter's reach.  Other interpolators read the whole CT in place:
    they touch only the voxels they need, and on an int16 CT the truncation
    of a value that is an integer up to rounding (a sample on a voxel centre,
    as at 0.8 -> 1.2 mm) then follows the whole volume's arithmetic exactly.

    ``kwargs`` are the extractor's settings, as pyradiomics validated them.
    """
    resampled_spacing: NDArray[np.float64] = np.array(kwargs["resampledPixelSpacing"], dtype=np.float64)
    interpolator: str | int = kwargs.get("interpolator", sitk.sitkBSpline)
    pad_distance: int = kwargs.get("padDistance", 5)
    mask_spacing_mm: tuple[float, ...] = mask.GetSpacing()
    image_spacing_mm: tuple[float, ...] = image.GetSpacing()
    mask_spacing = np.array(mask_spacing_mm)
    image_spacing = np.array(image_spacing_mm)
    resampled_spacing = np.where(resampled_spacing == 0, mask_spacing, resampled_spacing)
    # lower bounds then sizes, crop index space
    bb: NDArray[np.int64] = imageoperations._checkROI(image, mask, **kwargs)
    nd: int = mask.GetDimension()
    resampled_spacing = np.where(bb[nd:] != 1, resampled_spacing, mask_spacing)
    if np.allclose(image_spacing, resampled_spacing):
        # No interpolation: pyradiomics crops the bounding box + padDistance, clipped to the image,
        # which is the same box on the crop (it holds that box, or reaches the edge with it).
        resampled: tuple[sitk.Image, sitk.Image] = imageoperations.resampleImage(image, mask, **kwargs)
        return resampled

    spacing_ratio = mask_spacing / resampled_spacing
    grid = source.box.grid
    lower = bb[:nd] + np.array(source.box.lower)
    new_lower = np.floor((lower - 0.5) * spacing_ratio - pad_distance)
    new_upper = np.ceil((lower + bb[nd:] - 0.5) * spacing_ratio + pad_distance)
    max_upper = np.ceil(np.array(grid.size) * spacing_ratio) - 1
    new_lower = np.where(new_lower < 0, 0, new_lower)
    new_upper = np.where(new_upper > max_upper, max_upper, new_upper)
    new_size = np.array(new_upper - new_lower + 1, dtype="int").tolist()
    new_origin_index = np.array(0.5 * (resampled_spacing - mask_spacing) / mask_spacing) + new_lower / spacing_ratio
    new_origin: tuple[float, ...] = grid.reference_image().TransformContinuousIndexToPhysicalPoint(new_origin_index)

    if isinstance(interpolator, str):
        interpolator = getattr(sitk, interpolator)
    resample = sitk.ResampleImageFilter()
    resample.SetOutputSpacing(resampled_spacing)
    resample.SetOutputDirection(np.array(mask.GetDirection()))
    resample.SetSize(new_size)
    resample.SetOutputOrigin(new_origin)
    resample.SetOutputPixelType(image.GetPixelID())
    resample.SetInterpolator(interpolator)
    resampled_image: sitk.Image = resample.Execute(image if has_prefilter(interpolator) else source.whole)
    resample.SetOutputPixelType(mask.GetPixelID())
    resample.SetInterpolator(sitk.sitkNearestNeighbor)
    resampled_mask: sitk.Image = resample.Execute(anchored_mask)
    return resampled_image, resampled_mask


def _wanted_images(generator: Iterator[_FilteredImage], wanted: set[str], region: str) -> Iterator[_FilteredImage]:
    """The filter's images that are wanted; the others are dropped as soon as they are made."""
    while True:
        try:
            filtered, image_type, arguments = next(generator)
        except StopIteration:
            return
        except Exception as error:
            raise FeatureExtractionError(
                f"pyradiomics filter failed on the {region} region: {type(error).__name__}: {error}"
            ) from error
        if image_type in wanted:
            yield filtered, image_type, arguments


def _guarded(compute: Callable[[], Mapping[str, SupportsFloat]], region: str) -> Mapping[str, SupportsFloat]:
    try:
        return compute()
    except (FeatureExtractionError, MaskError):
        raise
    except Exception as error:
        raise FeatureExtractionError(
            f"pyradiomics failed on the {region} region: {type(error).__name__}: {error}"
        ) from error


def _filter_for(image_type: str) -> str:
    if image_type in _SINGLE_IMAGE_FILTERS:
        return _SINGLE_IMAGE_FILTERS[image_type]
    if image_type.startswith("wavelet"):
        return "Wavelet"
    if image_type.startswith("log-sigma-") and image_type.endswith("-mm-3D"):
        return "LoG"
    if image_type.startswith("lbp-3D-"):
        return "LBP3D"
    raise FeatureExtractionError(f"unknown pyradiomics image type {image_type!r}")


def _log_image_type(sigma: object) -> str:
    # pyradiomics' own naming: sigma 2.0 -> "log-sigma-2-0-mm-3D", sigma 2 -> "log-sigma-2-mm-3D".
    return "log-sigma-{}-mm-3D".format(str(sigma).replace(".", "-"))


def _is_shape_class(feature_class: str) -> bool:
    return feature_class.startswith("shape")


def _check_image_types(settings: ExtractionSettings) -> None:
    known = getImageTypes()
    for name in settings.image_types:
        if name not in known:
            raise FeatureExtractionError(
                f"unknown pyradiomics image type {name!r} in the settings (known: {', '.join(sorted(known))})"
            )


def _check_mask_labels(mask: sitk.Image, what: str, label: object) -> None:
    if not isinstance(mask, sitk.Image):
        raise MaskError(f"{what} must be a SimpleITK image, got {type(mask).__name__}")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(f"{what} must have scalar pixels, got a vector image")
    if not np.any(sitk.GetArrayViewFromImage(mask) == label):
        raise MaskError(f"{what} is empty: no voxel is labelled {label}")


def _normalise_version(version: str) -> str:
    version = str(version).strip()
    return version[1:] if version[:1] in ("v", "V") else version


def _canonical(value: object, where: str) -> _Json:
    if isinstance(value, Mapping):
        return {str(key): _canonical(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FeatureExtractionError(f"{where} is {value}; settings must be finite numbers")
        return value
    raise FeatureExtractionError(f"{where} has a value of type {type(value).__name__} that cannot be hashed as JSON")
