"""Radiomics features for a whole cohort: in parallel, resumable, one failure at a time.

For each patient with images, `extract_patient_features` loads the CT (DICOM
folder or NRRD/NIfTI/MetaImage file) and the tumour mask (DICOM SEG, or a
label image whose label 1 is the tumour, on the CT's grid), builds the
peritumoral ring and runs pyradiomics' full extraction
(``scoring.features.extract_all_features``) on each region.  Columns are
``region.<pyradiomics key>`` (``ring.wavelet-LLH_glcm_Correlation``).  Rows
that carry precomputed features in the cohort CSV are taken as they are.

Parallelism: local worker processes (spawned, one SimpleITK thread each, so
N workers use N cores), or a Dask distributed cluster when ``scheduler`` is
its address; Dask workers must see the image files at the same paths.

Cache: one small JSON file per patient, written atomically by the main
process as each result arrives, so an interrupted run (Ctrl-C, SIGKILL,
reboot) resumes with the patients not yet done.  Layout::

    <cache_dir>/<config id>/config.json          what the config id stands for
    <cache_dir>/<config id>/<sha256(id)[:32]>.json   one per patient

The config id is the sha256 (first 16 hex digits) of the cache format,
``settings_hash(settings)`` (pyradiomics version, settings, image types,
ring), the feature classes and the regions.  A patient's file also records
its id and a fingerprint of its input files — relative name, size and
mtime_ns of every file of the CT folder or image file and of the SEG — and is
used only when all of these match: editing, replacing or touching an input
recomputes that patient.  Copies keep the cache valid only when they keep
mtimes (``cp -p``, ``rsync -a``); a content hash was not used because it
would read every CT in full on every run, which costs more than it saves.
File names hash the id because ids may be hospital identifiers.

Failures are not cached: a failing patient is tried again on the next run
(after its files are fixed, or when the failure was transient).

Perturbed extractions (the stability screen of `scoring.training.stability`):
``extract_cohort_features(..., perturbation=Perturbation(...))`` runs the
same extraction on a perturbed copy of each patient's input
(`perturb_inputs`): the tumour mask grown (``dilation``) or shrunk
(``erosion``) by one voxel with a ball structuring element (the ring is
then rebuilt from that mask, as the node would build it from such a
segmentation); Gaussian noise of ``noise_sd_hu`` HU added to the CT
(``noise``; seeded per patient, so a rerun reproduces it); or the CT and the
mask resampled on the same grid translated by ``shift_voxels`` of a voxel
along every axis (``shift``: linear interpolation of the CT, the mask
interpolated linearly and kept where >= 0.5, as IBSI does).  Each
perturbation has its own cache folder (its parameters are part of the
config id), so perturbed runs resume and are reused like the others.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from radiomics import getFeatureClasses
from tqdm import tqdm

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.node.errors import NodeError
from sclc_risk_node.node.files import write_atomically
from sclc_risk_node.research.cohort import Cohort, ImageInputs
from sclc_risk_node.scoring.errors import InputError, MaskError
from sclc_risk_node.scoring.features import check_pyradiomics_version, extract_all_features, settings_hash
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.types import REGIONS, ExtractionSettings, RingDefinition

CACHE_FORMAT = 1
DEFAULT_REGIONS = ("tumour", "ring")
# Label images must sit on the CT grid; these match what dicom_io accepts for SEG frames.
_ORIGIN_TOLERANCE_VOXELS = 0.01
_SPACING_RELATIVE_TOLERANCE = 1e-3
_DIRECTION_TOLERANCE = 1e-4
# A temp file this old is left over from a killed run, not being written by a live one.
_STALE_TEMP_SECONDS = 3600
_WORKER_DIED = "the worker process died (killed, or out of memory?); rerun to retry"


class ExtractionError(NodeError, InputError):
    """The extraction run cannot start as asked (regions, feature classes, workers, scheduler)."""


class LabelImageError(InputError):
    """A label-image mask cannot be used with its CT (unreadable, wrong grid, no label 1)."""


PERTURBATION_KINDS = ("dilation", "erosion", "noise", "shift")


@dataclass(frozen=True, slots=True)
class Perturbation:
    """One perturbation of a patient's input (module docstring); ``seed`` seeds the noise."""

    kind: str
    noise_sd_hu: float = 0.0
    shift_voxels: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ExtractionError(
                f"perturbation: {self.kind!r} is not allowed (allowed: {', '.join(PERTURBATION_KINDS)})"
            )

    def as_mapping(self) -> dict[str, object]:
        if self.kind == "noise":
            return {"kind": self.kind, "noise_sd_hu": self.noise_sd_hu, "seed": self.seed}
        if self.kind == "shift":
            return {"kind": self.kind, "shift_voxels": self.shift_voxels}
        return {"kind": self.kind, "radius_voxels": 1, "structuring_element": "ball"}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Perturbation:  # JSON values
        return cls(
            kind=str(mapping["kind"]),
            noise_sd_hu=float(mapping.get("noise_sd_hu", 0.0)),
            shift_voxels=float(mapping.get("shift_voxels", 0.0)),
            seed=int(mapping.get("seed", 0)),
        )


def perturb_inputs(
    image: sitk.Image, tumour: sitk.Image, perturbation: Perturbation, patient_id: str
) -> tuple[sitk.Image, sitk.Image]:
    """The CT and tumour mask under ``perturbation`` (module docstring); ``MaskError`` if no tumour is left."""
    kind = perturbation.kind
    if kind in ("dilation", "erosion"):
        operation = sitk.BinaryDilate if kind == "dilation" else sitk.BinaryErode
        mask = operation(tumour, [1, 1, 1], sitk.sitkBall, 0.0, 1.0)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise MaskError(f"{kind} by one voxel leaves no tumour voxel")
        return image, mask
    if kind == "noise":
        digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
        rng = np.random.default_rng([perturbation.seed, int.from_bytes(digest[:8], "little")])
        values = sitk.GetArrayFromImage(image).astype(np.float32)
        noisy = sitk.GetImageFromArray(
            values + rng.normal(0.0, perturbation.noise_sd_hu, values.shape).astype(np.float32)
        )
        noisy.CopyInformation(image)
        return noisy, tumour
    # shift: sample both on the grid moved by a fraction of a voxel along every axis (physical space)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    offset = direction @ (np.array(image.GetSpacing()) * perturbation.shift_voxels)
    reference = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(np.array(image.GetOrigin()) + offset))
    air = float(sitk.GetArrayViewFromImage(image).min())
    shifted = sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, air, sitk.sitkFloat32
    )
    fraction = sitk.Resample(
        sitk.Cast(tumour, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    mask = sitk.Cast(sitk.BinaryThreshold(fraction, 0.5, 1e9, 1, 0), sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(mask).any():
        raise MaskError("the shifted mask has no tumour voxel")
    # Same size, spacing and direction; the origin moved: the two stay on one grid.
    return shifted, mask


@dataclass(frozen=True, slots=True)
class ExtractionFailure:
    patient_id: str
    reason: str


@dataclass(frozen=True, eq=False)
class ExtractionResult:
    """Features per patient (index ``id``, cohort order, failed patients left out) and what happened.

    ``features`` columns are ``region.<pyradiomics key>``; NaN where
    pyradiomics could not compute a value, and in rows with precomputed
    features for the columns the CSV did not give.  ``computed``, ``cached``
    and ``precomputed`` name the patients extracted in this run, read from
    the cache, and taken from the CSV.
    """

    features: pd.DataFrame
    failures: tuple[ExtractionFailure, ...] = ()
    computed: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()
    precomputed: tuple[str, ...] = ()


def extract_cohort_features(
    cohort: Cohort,
    settings: ExtractionSettings,
    *,
    feature_classes: Sequence[str] | None = None,
    regions: Sequence[str] = DEFAULT_REGIONS,
    cache_dir: Path,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    perturbation: Perturbation | None = None,
) -> ExtractionResult:
    """Features for every patient of ``cohort`` (any iterable of cohort patients); see the module docstring.

    With ``perturbation``, each patient's input is perturbed first
    (`perturb_inputs`), rows with precomputed features are skipped (there is
    nothing to perturb), and results go to that perturbation's cache folder.

    ``scheduler`` None runs ``workers`` local processes (default: the CPU
    count); an address (``tcp://host:8786``) runs on that Dask cluster and
    ``workers`` is ignored.  A patient that fails is listed in ``failures``
    with a one-line reason and the run goes on.
    """
    return _extract(
        cohort,
        settings,
        [perturbation],
        feature_classes=feature_classes,
        regions=regions,
        cache_dir=cache_dir,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )[0]


def extract_perturbed_features(
    patients: Iterable,
    settings: ExtractionSettings,
    perturbations: Sequence[Perturbation],
    *,
    feature_classes: Sequence[str] | None = None,
    regions: Sequence[str] = DEFAULT_REGIONS,
    cache_dir: Path,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, ExtractionResult]:
    """``{perturbation kind: result}``: every patient under every perturbation, in one pool of workers.

    The same as one `extract_cohort_features` call per perturbation, but all
    ``len(patients) x len(perturbations)`` extractions share one set of
    worker processes (or one Dask submission), so none waits for a pool to
    start or for the slowest patient of another perturbation.
    """
    kinds = [p.kind for p in perturbations]
    if len(set(kinds)) != len(kinds):
        raise ExtractionError(f"perturbations: {kinds!r} repeats a kind (allowed: each kind once)")
    results = _extract(
        patients,
        settings,
        list(perturbations),
        feature_classes=feature_classes,
        regions=regions,
        cache_dir=cache_dir,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    return dict(zip(kinds, results))


def _extract(
    cohort,
    settings: ExtractionSettings,
    perturbations: list[Perturbation | None],
    *,
    feature_classes,
    regions,
    cache_dir: Path,
    scheduler: str | None,
    workers: int | None,
    progress: bool,
) -> list[ExtractionResult]:
    check_pyradiomics_version(settings)
    regions = _canonical_regions(regions)
    classes = _canonical_feature_classes(feature_classes)
    workers = _worker_count(workers)
    cohort = list(cohort)
    plain_settings = _plain_settings(settings)

    @dataclass
    class _Run:
        cache: _Cache
        found: dict
        failures: dict
        precomputed: list
        cached: list
        computed: list

    runs = [
        _Run(_Cache(Path(cache_dir), settings, classes, regions, perturbation), {}, {}, [], [], [])
        for perturbation in perturbations
    ]
    tasks = []
    for number, (perturbation, run) in enumerate(zip(perturbations, runs)):
        plain_perturbation = perturbation.as_mapping() if perturbation is not None else None
        for patient in cohort:
            if patient.features is not None:
                if perturbation is None:
                    run.found[patient.id] = dict(patient.features)
                    run.precomputed.append(patient.id)
                continue
            try:
                fingerprint = input_fingerprint(patient.images)
            except OSError as exc:
                run.failures[patient.id] = f"cannot read the input files: {exc.strerror or exc} ({exc.filename})"
                continue
            hit = run.cache.load(patient.id, fingerprint)
            if hit is not None:
                run.found[patient.id] = hit
                run.cached.append(patient.id)
            else:
                tasks.append(
                    _Task(
                        patient.id,
                        patient.images,
                        fingerprint,
                        plain_settings,
                        classes,
                        regions,
                        plain_perturbation,
                        number,
                    )
                )

    named = [p.kind for p in perturbations if p is not None]
    description = "extracting features" + (f" ({', '.join(named)})" if named else "")
    cached_total = sum(len(run.cached) for run in runs)
    with tqdm(
        total=len(tasks) + cached_total,
        initial=cached_total,
        desc=description,
        unit="extraction" if named else "patient",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        stream = _run_on_dask(tasks, scheduler) if scheduler else _run_locally(tasks, workers)
        failed = 0
        for outcome in stream:
            run = runs[outcome.run]
            if outcome.features is not None:
                run.cache.store(outcome, outcome.features)
                run.found[outcome.patient_id] = outcome.features
                run.computed.append(outcome.patient_id)
            else:
                run.failures[outcome.patient_id] = outcome.reason
                failed += 1
                bar.set_postfix(failed=failed)
            bar.update(1)

    order = [p.id for p in cohort]
    results = []
    for run in runs:
        computed_ids = set(run.computed)
        kept = [pid for pid in order if pid in run.found]
        # Not DataFrame.from_dict: with rows of different columns it puts rows out of order.
        frame = pd.DataFrame([run.found[pid] for pid in kept], index=pd.Index(kept, name="id"), dtype=float)
        results.append(
            ExtractionResult(
                features=frame,
                failures=tuple(ExtractionFailure(pid, run.failures[pid]) for pid in order if pid in run.failures),
                computed=tuple(pid for pid in order if pid in computed_ids),
                cached=tuple(run.cached),
                precomputed=tuple(run.precomputed),
            )
        )
    return results


def extract_patient_features(
    images: ImageInputs,
    settings: ExtractionSettings,
    *,
    feature_classes: Sequence[str] | None = None,
    regions: Sequence[str] = DEFAULT_REGIONS,
    perturbation: Perturbation | None = None,
    patient_id: str = "",
) -> dict[str, float]:
    """One patient's features as ``{"region.<pyradiomics key>": value}``; raises ``InputError`` when unusable.

    ``perturbation`` perturbs the CT and mask first (`perturb_inputs`; ``patient_id`` seeds its noise).
    """
    regions = _canonical_regions(regions)
    classes = _canonical_feature_classes(feature_classes)
    image, tumour = load_ct_and_mask(images)
    if perturbation is not None:
        image, tumour = perturb_inputs(image, tumour, perturbation, patient_id)
    masks = {"tumour": tumour}
    if "ring" in regions:
        masks["ring"] = peritumoral_ring(tumour, settings.ring)
    features: dict[str, float] = {}
    for region in regions:
        values = extract_all_features(image, masks[region], settings, list(classes) if classes else None)
        features.update((f"{region}.{key}", value) for key, value in values.items())
    return features


def load_ct_and_mask(images: ImageInputs) -> tuple[sitk.Image, sitk.Image]:
    """The CT in HU and the tumour mask (``sitkUInt8``, 1 = tumour) on exactly its grid."""
    if images.ct_is_dicom:
        ct = read_ct_series(images.ct)
        image = ct.image
    else:
        ct = None
        image = _read_image_file(images.ct, "CT")
    if images.seg_is_dicom:
        if ct is None:
            raise LabelImageError(f"{images.seg.name}: a DICOM SEG needs a DICOM CT, but the CT is {images.ct.name}")
        return image, read_tumour_segment(images.seg, ct).mask
    return image, label_image_mask(images.seg, image)


def label_image_mask(path: Path, ct_image: sitk.Image) -> sitk.Image:
    """Label 1 of the label image at ``path`` as a 0/1 mask with ``ct_image``'s geometry (checked, then copied)."""
    labels = _read_image_file(path, "label image")
    _check_same_grid(path.name, labels, ct_image)
    values = sitk.GetArrayViewFromImage(labels)
    if not np.array_equal(values, np.round(values)):
        raise LabelImageError(f"{path.name}: label image holds non-integer values (allowed: integer labels)")
    tumour = values == 1
    if not tumour.any():
        present = ", ".join(str(v) for v in np.unique(values)[:10])
        raise MaskError(f"{path.name}: no voxel has label 1 (the tumour); labels present: {present}")
    mask = sitk.GetImageFromArray(tumour.astype(np.uint8))
    mask.CopyInformation(ct_image)
    return mask


def _read_image_file(path: Path, what: str) -> sitk.Image:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LabelImageError(f"{path.name}: {what} not readable by SimpleITK ({reason})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LabelImageError(
            f"{path.name}: {what} must be a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    return image


def _check_same_grid(name: str, labels: sitk.Image, ct: sitk.Image) -> None:
    problems = []
    if labels.GetSize() != ct.GetSize():
        problems.append(f"size {labels.GetSize()} vs the CT's {ct.GetSize()}")
    spacing, ct_spacing = np.array(labels.GetSpacing()), np.array(ct.GetSpacing())
    if np.abs(spacing / ct_spacing - 1).max() > _SPACING_RELATIVE_TOLERANCE:
        problems.append(f"spacing {_mm(spacing)} vs {_mm(ct_spacing)} mm")
    origin, ct_origin = np.array(labels.GetOrigin()), np.array(ct.GetOrigin())
    if (np.abs(origin - ct_origin) > _ORIGIN_TOLERANCE_VOXELS * ct_spacing).any():
        problems.append(f"origin {_mm(origin)} vs {_mm(ct_origin)} mm")
    if np.abs(np.array(labels.GetDirection()) - np.array(ct.GetDirection())).max() > _DIRECTION_TOLERANCE:
        problems.append("direction cosines differ")
    if problems:
        raise LabelImageError(f"{name}: label image is not on the CT's grid: {'; '.join(problems)}")


def _mm(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def input_fingerprint(images: ImageInputs) -> dict[str, list]:
    """Relative name, size and mtime_ns of each input file; raises ``OSError`` when one cannot be read."""
    return {"ct": _path_fingerprint(images.ct), "seg": _path_fingerprint(images.seg)}


def _path_fingerprint(path: Path) -> list[list]:
    if path.is_dir():
        entries = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = Path(root) / name
                entries.append(_file_entry(file, file.relative_to(path).as_posix()))
        return entries
    paths = [path]
    if path.name.lower().endswith((".mhd", ".nhdr")):
        # Detached headers: the voxels live in a sibling data file of the same stem.
        stem = path.name[: path.name.rfind(".")]
        paths += sorted(p for p in path.parent.iterdir() if p != path and p.name.startswith(stem + "."))
    return [_file_entry(file, file.name) for file in paths]


def _file_entry(path: Path, name: str) -> list:
    stat = path.stat()
    return [name, stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------------------
# Validation of the run's parameters.


def _canonical_regions(regions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(regions, str):
        regions = (regions,)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown or not regions:
        raise ExtractionError(
            f"regions: {list(regions)!r} is not allowed (allowed: one or more of {', '.join(REGIONS)})"
        )
    return tuple(r for r in REGIONS if r in regions)


def _canonical_feature_classes(feature_classes: Sequence[str] | None) -> tuple[str, ...] | None:
    if feature_classes is None:
        return None
    if isinstance(feature_classes, str):
        feature_classes = (feature_classes,)
    known = getFeatureClasses()
    unknown = sorted(set(feature_classes) - set(known))
    if unknown or not feature_classes:
        raise ExtractionError(
            f"feature_classes: {unknown or list(feature_classes)!r} not allowed "
            f"(allowed: one or more of {', '.join(sorted(known))}, or None for all)"
        )
    return tuple(sorted(set(feature_classes)))


def _worker_count(workers: int | None) -> int:
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ExtractionError(
            f"workers: {workers!r} is not allowed (allowed: an integer >= 1, or None for the CPU count)"
        )
    return workers


# ---------------------------------------------------------------------------
# The cache.


class _Cache:
    def __init__(
        self, root: Path, settings: ExtractionSettings, classes, regions, perturbation: Perturbation | None = None
    ) -> None:
        self.config = {
            "format": CACHE_FORMAT,
            "settings_sha256": settings_hash(settings),
            "feature_classes": list(classes) if classes is not None else None,
            "regions": list(regions),
        }
        if perturbation is not None:  # unperturbed runs keep their config id (and existing caches)
            self.config["perturbation"] = perturbation.as_mapping()
        config_id = hashlib.sha256(_canonical_json(self.config).encode("ascii")).hexdigest()[:16]
        self.folder = root / config_id
        self.folder.mkdir(parents=True, exist_ok=True)
        description = self.folder / "config.json"
        if not description.exists():
            write_atomically(description, json.dumps({**self.config, "settings": _plain_settings(settings)}, indent=2))
        self._remove_stale_temp_files()

    def path(self, patient_id: str) -> Path:
        return self.folder / f"{hashlib.sha256(patient_id.encode('utf-8')).hexdigest()[:32]}.json"

    def load(self, patient_id: str, fingerprint: Mapping[str, list]) -> dict[str, float] | None:
        try:
            document = json.loads(self.path(patient_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (
            isinstance(document, dict)
            and document.get("patient_id") == patient_id
            and document.get("config") == self.config
            and document.get("inputs") == json.loads(json.dumps(fingerprint))
            and isinstance(document.get("features"), dict)
        ):
            return None
        return {name: math.nan if value is None else float(value) for name, value in document["features"].items()}

    def store(self, outcome: _Outcome, features: Mapping[str, float]) -> None:
        """Cache an extracted patient's ``features`` (``outcome.features``; failures are not cached)."""
        document = {
            "format": CACHE_FORMAT,
            "patient_id": outcome.patient_id,
            "config": self.config,
            "inputs": outcome.fingerprint,
            "seconds": round(outcome.seconds, 3),
            "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            # JSON has no NaN; null stands for "pyradiomics could not compute it".
            "features": {k: (None if math.isnan(v) else v) for k, v in features.items()},
        }
        write_atomically(self.path(outcome.patient_id), json.dumps(document, allow_nan=False))

    def _remove_stale_temp_files(self) -> None:
        now = time.time()
        for temp in self.folder.glob(".*.tmp"):
            try:
                if now - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                    temp.unlink()
            except OSError:
                pass


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# ---------------------------------------------------------------------------
# Running the tasks.


@dataclass(frozen=True)
class _Task:
    """What a worker needs: plain, picklable values only (ExtractionSettings holds mappingproxies)."""

    patient_id: str
    images: ImageInputs
    fingerprint: Mapping[str, list]
    settings: Mapping[str, object]
    feature_classes: tuple[str, ...] | None
    regions: tuple[str, ...]
    perturbation: Mapping[str, object] | None = None
    #: Which of the call's runs (one per perturbation) the task belongs to.
    run: int = 0


@dataclass(frozen=True)
class _Outcome:
    patient_id: str
    fingerprint: Mapping[str, list]
    features: dict[str, float] | None = None
    reason: str | None = None
    seconds: float = 0.0
    run: int = 0


def _plain_settings(settings: ExtractionSettings) -> dict[str, object]:
    return {
        "pyradiomics_version": settings.pyradiomics_version,
        "settings": dict(settings.settings),
        "image_types": {name: dict(custom) for name, custom in settings.image_types.items()},
        "ring": {
            "outward_mm": settings.ring.outward_mm,
            "inward_mm": settings.ring.inward_mm,
            "method": settings.ring.method,
        },
    }


def _settings_from_plain(plain: Mapping[str, Any]) -> ExtractionSettings:  # JSON values
    return ExtractionSettings(
        pyradiomics_version=plain["pyradiomics_version"],
        settings=plain["settings"],
        image_types=plain["image_types"],
        ring=RingDefinition(**plain["ring"]),
    )


def _extract_task(task: _Task) -> _Outcome:
    """Runs in a worker: never raises, so one patient cannot stop the run."""
    _quiet_glcm_notice()
    start = time.perf_counter()
    try:
        features = extract_patient_features(
            task.images,
            _settings_from_plain(task.settings),
            feature_classes=task.feature_classes,
            regions=task.regions,
            perturbation=Perturbation.from_mapping(task.perturbation) if task.perturbation else None,
            patient_id=task.patient_id,
        )
    except InputError as exc:
        return _Outcome(task.patient_id, task.fingerprint, reason=_one_line(str(exc)), run=task.run)
    except Exception as exc:  # a bug or a resource problem must not end the cohort's run either
        return _Outcome(
            task.patient_id, task.fingerprint, reason=_one_line(f"{type(exc).__name__}: {exc}"), run=task.run
        )
    return _Outcome(
        task.patient_id, task.fingerprint, features=features, seconds=time.perf_counter() - start, run=task.run
    )


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no reason given"


class _DropGlcmSymmetryNotice(logging.Filter):
    # Emitted for every image type of every region: noise, not a problem.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("GLCM is symmetrical")


def _quiet_glcm_notice() -> None:
    glcm_logger = logging.getLogger("radiomics.glcm")
    if not any(isinstance(f, _DropGlcmSymmetryNotice) for f in glcm_logger.filters):
        glcm_logger.addFilter(_DropGlcmSymmetryNotice())


def _initialise_local_worker() -> None:
    # Each worker is one of N processes on N cores; ITK's own threads would oversubscribe them.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _quiet_glcm_notice()


def _run_locally(tasks: list[_Task], workers: int) -> Iterator[_Outcome]:
    if not tasks:
        return
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_initialise_local_worker,
    )
    try:
        futures = {pool.submit(_extract_task, task): task for task in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                yield future.result()
            except BrokenProcessPool:
                yield _Outcome(task.patient_id, task.fingerprint, reason=_WORKER_DIED, run=task.run)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_on_dask(tasks: list[_Task], scheduler: str) -> Iterator[_Outcome]:
    if not tasks:
        return
    _check_reachable(scheduler)
    import distributed  # only needed for cluster runs, and slow to import

    try:
        client = distributed.Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise ExtractionError(f"scheduler: cannot connect to the Dask scheduler at {scheduler!r} ({exc})") from None
    try:
        futures = {}
        for task in tasks:
            key = (
                f"sclc-extract-{hashlib.sha256(task.patient_id.encode('utf-8')).hexdigest()[:16]}-{os.urandom(4).hex()}"
            )
            futures[client.submit(_extract_task, task, key=key, pure=False)] = task
        for future in distributed.as_completed(list(futures)):
            task = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # KilledWorker, a lost worker, a scheduler gone away
                yield _Outcome(
                    task.patient_id,
                    task.fingerprint,
                    reason=_one_line(f"Dask task failed: {type(exc).__name__}: {exc}"),
                    run=task.run,
                )
            finally:
                future.release()
    finally:
        client.close()


def _check_reachable(scheduler: str) -> None:
    # distributed.Client retries a refused connection until its timeout; a plain
    # TCP connect says at once that nothing listens there.
    if not scheduler.startswith("tcp://"):
        return
    host, _, port = scheduler.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except ValueError:
        raise ExtractionError(f"scheduler: {scheduler!r} is not an address (allowed: tcp://host:port)") from None
    except OSError as exc:
        raise ExtractionError(
            f"scheduler: cannot connect to the Dask scheduler at {scheduler!r} ({exc.strerror or exc})"
        ) from None
