"""Cohort feature extraction: exact values, failures, the cache, an interrupted run resumed, Dask.

One tiny simulated cohort (scale 0.05: 23 patients, 48 x 48 x 24 phantoms) is
extracted once with local processes; the other runs are compared with it.
Rows are edited so the cohort also holds an NRRD CT with a label image, a
DICOM CT with a label image, a precomputed-features row and three broken
patients (a SEG of another patient's series, an empty label image and a
label image off the CT's grid).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import radiomics
import SimpleITK as sitk

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.research.cohort import load_cohort
from sclc_risk_node.research.extraction import ExtractionError, extract_cohort_features, extract_patient_features
from sclc_risk_node.research.simulate import simulate_cohort
from sclc_risk_node.scoring.errors import FeatureExtractionError
from sclc_risk_node.scoring.features import extract_all_features
from sclc_risk_node.scoring.ring import peritumoral_ring
from sclc_risk_node.scoring.types import ExtractionSettings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = ExtractionSettings(
    pyradiomics_version=radiomics.__version__.lstrip("v"),
    settings={"binWidth": 25, "resampledPixelSpacing": [1.0, 1.0, 1.0], "interpolator": "sitkBSpline", "label": 1},
    image_types={"Original": {}, "Wavelet": {}},
)
# Wavelet and texture are exercised; the costliest classes (GLCM on the ring) are left to the slow tests.
CLASSES = ("firstorder", "shape", "glszm")
PRECOMPUTED_COLUMNS = ("tumour.original_firstorder_Mean", "ring.original_firstorder_Mean")


class Cohort:
    def __init__(self, folder: Path, csv_path: Path, roles: dict[str, str]):
        self.folder, self.csv, self.roles = folder, csv_path, roles

    def id_of(self, role: str) -> str:
        return self.roles[role]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    folder = tmp_path_factory.mktemp("extraction") / "sim"
    simulate_cohort(folder, scale=0.05, image_size=(48, 48, 24), progress=False)
    with open(folder / "cohort.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    roles = {
        "dicom": rows[0]["id"],
        "nrrd": rows[1]["id"],
        "other_series_seg": rows[2]["id"],
        "empty_label": rows[3]["id"],
        "off_grid_label": rows[4]["id"],
        "precomputed": rows[5]["id"],
        "dicom_ct_label_image": rows[6]["id"],
    }
    by_id = {row["id"]: row for row in rows}

    def loaded(row):
        ct = read_ct_series(folder / row["ct"])
        return ct, read_tumour_segment(folder / row["seg"], ct).mask

    ct, mask = loaded(by_id[roles["nrrd"]])
    sitk.WriteImage(ct.image, str(folder / "nrrd-ct.nrrd"))
    labels = sitk.GetArrayFromImage(mask).astype(np.uint8)
    labels[:2] = 2  # another label elsewhere, which must be ignored
    sitk.WriteImage(_like(labels, ct.image), str(folder / "nrrd-labels.nrrd"))
    by_id[roles["nrrd"]].update(ct="nrrd-ct.nrrd", seg="nrrd-labels.nrrd")

    by_id[roles["other_series_seg"]]["seg"] = by_id[roles["dicom"]]["seg"]

    ct, mask = loaded(by_id[roles["empty_label"]])
    sitk.WriteImage(_like(np.zeros_like(sitk.GetArrayFromImage(mask)), ct.image), str(folder / "empty.nii.gz"))
    by_id[roles["empty_label"]]["seg"] = "empty.nii.gz"

    ct, mask = loaded(by_id[roles["off_grid_label"]])
    shifted = sitk.Image(mask)
    shifted.SetOrigin(tuple(o + 5.0 for o in mask.GetOrigin()))
    sitk.WriteImage(shifted, str(folder / "shifted.nrrd"))
    by_id[roles["off_grid_label"]]["seg"] = "shifted.nrrd"

    ct, mask = loaded(by_id[roles["dicom_ct_label_image"]])
    sitk.WriteImage(mask, str(folder / "dicom-ct-labels.nii.gz"))
    by_id[roles["dicom_ct_label_image"]]["seg"] = "dicom-ct-labels.nii.gz"

    by_id[roles["precomputed"]].update(ct="", seg="", **{PRECOMPUTED_COLUMNS[0]: "12.5", PRECOMPUTED_COLUMNS[1]: "nan"})
    csv_path = folder / "cohort-edited.csv"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) + list(PRECOMPUTED_COLUMNS), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return Cohort(folder, csv_path, roles)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def run(cohort: Cohort, cache: Path, **kwargs):
    return extract_cohort_features(
        load_cohort(cohort.csv), SETTINGS, feature_classes=CLASSES, cache_dir=cache, progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def baseline(cohort, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache-local")
    return run(cohort, cache, workers=2), cache


BROKEN = ("other_series_seg", "empty_label", "off_grid_label")


def direct(ct_image: sitk.Image, tumour: sitk.Image) -> dict[str, float]:
    ring = peritumoral_ring(tumour, SETTINGS.ring)
    values = {}
    for region, mask in (("tumour", tumour), ("ring", ring)):
        values.update(
            {f"{region}.{k}": v for k, v in extract_all_features(ct_image, mask, SETTINGS, list(CLASSES)).items()}
        )
    return values


def assert_same_values(row: pd.Series, expected: dict[str, float]) -> None:
    assert list(row.index) == list(expected)
    for name, value in expected.items():
        assert row[name] == value or (math.isnan(row[name]) and math.isnan(value)), name


def test_features_equal_a_direct_pyradiomics_run_for_dicom_and_nrrd_inputs(cohort, baseline):
    result, _ = baseline
    with open(cohort.csv, newline="") as stream:
        row = next(r for r in csv.DictReader(stream) if r["id"] == cohort.id_of("dicom"))
    ct = read_ct_series(cohort.folder / row["ct"])
    expected = direct(ct.image, read_tumour_segment(cohort.folder / row["seg"], ct).mask)
    assert any(name.startswith("ring.wavelet-HLH_glszm_") for name in expected)
    assert_same_values(result.features.loc[cohort.id_of("dicom")], expected)

    image = sitk.ReadImage(str(cohort.folder / "nrrd-ct.nrrd"))
    labels = sitk.ReadImage(str(cohort.folder / "nrrd-labels.nrrd"))
    tumour = sitk.Cast(labels == 1, sitk.sitkUInt8)
    expected_nrrd = direct(image, tumour)
    assert_same_values(result.features.loc[cohort.id_of("nrrd"), list(expected_nrrd)], expected_nrrd)


def test_the_result_lists_every_patient_once_in_cohort_order(cohort, baseline):
    result, _ = baseline
    ids = load_cohort(cohort.csv).ids
    broken = {cohort.id_of(role) for role in BROKEN}
    assert tuple(result.features.index) == tuple(i for i in ids if i not in broken)
    assert result.features.index.name == "id"
    assert result.precomputed == (cohort.id_of("precomputed"),)
    assert set(result.computed) == set(ids) - broken - {cohort.id_of("precomputed")}
    assert result.cached == ()
    assert all(c.startswith(("tumour.", "ring.")) for c in result.features.columns)
    assert len(result.features.columns) > 400
    precomputed = result.features.loc[cohort.id_of("precomputed")]
    assert precomputed[PRECOMPUTED_COLUMNS[0]] == 12.5 and math.isnan(precomputed[PRECOMPUTED_COLUMNS[1]])
    assert precomputed.drop(list(PRECOMPUTED_COLUMNS)).isna().all()
    extracted = result.features.drop(index=cohort.id_of("precomputed"))
    assert not extracted[list(PRECOMPUTED_COLUMNS)].isna().any().any()


def test_broken_patients_are_listed_with_a_one_line_reason_and_the_others_succeed(cohort, baseline):
    result, _ = baseline
    reasons = {failure.patient_id: failure.reason for failure in result.failures}
    assert set(reasons) == {cohort.id_of(role) for role in BROKEN}
    assert all("\n" not in reason for reason in reasons.values())
    assert (
        "not CT series" in reasons[cohort.id_of("other_series_seg")]
        or "FrameOfReferenceUID" in reasons[cohort.id_of("other_series_seg")]
    )
    assert "no voxel has label 1" in reasons[cohort.id_of("empty_label")]
    assert "not on the CT's grid: origin" in reasons[cohort.id_of("off_grid_label")]


def test_a_label_image_on_a_dicom_ct_gives_the_same_features_as_its_seg(cohort, baseline):
    result, _ = baseline
    patient = load_cohort(cohort.csv).patient(cohort.id_of("dicom_ct_label_image"))
    ct = read_ct_series(patient.images.ct)
    seg_mask = read_tumour_segment(patient.images.ct.parent / "seg.dcm", ct).mask
    assert_same_values(result.features.loc[patient.id, list(direct(ct.image, seg_mask))], direct(ct.image, seg_mask))


def test_a_second_run_reads_everything_from_the_cache_and_retries_failures(cohort, baseline):
    first, cache = baseline
    second = run(cohort, cache, workers=2)
    assert second.computed == ()
    assert set(second.cached) == set(first.computed)
    assert [f.patient_id for f in second.failures] == [f.patient_id for f in first.failures]
    pd.testing.assert_frame_equal(second.features, first.features, check_exact=True)


def test_a_changed_input_or_a_damaged_cache_file_is_recomputed(cohort, baseline, tmp_path):
    first, cache = baseline
    copy = tmp_path / "cache"
    subprocess.run(["cp", "-a", str(cache), str(copy)], check=True)
    touched, damaged = first.computed[1], first.computed[2]
    seg = load_cohort(cohort.csv).patient(touched).images.seg
    stat = seg.stat()
    os.utime(seg, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    (damaged_file,) = [p for p in copy.glob("*/*.json") if p.name != "config.json" and damaged in p.read_text()]
    damaged_file.write_text(damaged_file.read_text()[:100])
    again = run(cohort, copy, workers=2)
    assert set(again.computed) == {touched, damaged}
    pd.testing.assert_frame_equal(again.features, first.features, check_exact=True)


def test_a_killed_run_resumes_with_the_patients_not_yet_done(cohort, baseline, tmp_path):
    first, _ = baseline
    cache = tmp_path / "cache"
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from sclc_risk_node.research.cohort import load_cohort\n"
        "from sclc_risk_node.research.extraction import extract_cohort_features\n"
        "from sclc_risk_node.scoring.types import ExtractionSettings\n"
        "settings = ExtractionSettings(**json.loads(sys.argv[1]))\n"
        "extract_cohort_features(load_cohort(Path(sys.argv[2])), settings, feature_classes=json.loads(sys.argv[3]),\n"
        "                        cache_dir=Path(sys.argv[4]), workers=1, progress=False)\n"
    )
    plain = {
        "pyradiomics_version": SETTINGS.pyradiomics_version,
        "settings": dict(SETTINGS.settings),
        "image_types": {k: dict(v) for k, v in SETTINGS.image_types.items()},
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(plain), str(cohort.csv), json.dumps(CLASSES), str(cache)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not _patient_files(cache) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()
    finally:
        # The run and its worker process share the new session's process group.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = len(_patient_files(cache))
    assert 1 <= done_before < len(first.computed)

    resumed = run(cohort, cache, workers=2)
    assert len(resumed.cached) == done_before
    assert len(resumed.computed) == len(first.computed) - done_before
    assert set(resumed.cached) | set(resumed.computed) == set(first.computed)
    pd.testing.assert_frame_equal(resumed.features, first.features, check_exact=True)
    assert [f.patient_id for f in resumed.failures] == [f.patient_id for f in first.failures]


def _patient_files(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*/*.json") if p.name != "config.json"]


def test_a_dask_cluster_gives_the_same_features_as_local_processes(cohort, baseline, tmp_path):
    distributed = pytest.importorskip("distributed")
    first, _ = baseline
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster:
        on_dask = run(cohort, tmp_path / "cache", scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(on_dask.features, first.features, check_exact=True)
    assert on_dask.failures == first.failures
    assert set(on_dask.computed) == set(first.computed)


def test_an_unreachable_scheduler_is_a_clear_error(cohort, tmp_path):
    with pytest.raises(ExtractionError, match="cannot connect to the Dask scheduler at 'tcp://127.0.0.1:9'"):
        run(cohort, tmp_path / "cache", scheduler="tcp://127.0.0.1:9")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"regions": ("lung",)}, "regions: "),
        ({"regions": ()}, "regions: "),
        ({"feature_classes": ("glcm", "texture")}, "feature_classes: ['texture'] not allowed"),
        ({"workers": 0}, "workers: 0 is not allowed"),
    ],
)
def test_bad_run_parameters_are_refused_before_any_work(cohort, tmp_path, kwargs, fragment):
    arguments = {"feature_classes": CLASSES, "cache_dir": tmp_path / "cache", "progress": False, **kwargs}
    with pytest.raises(ExtractionError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        extract_cohort_features(load_cohort(cohort.csv), SETTINGS, **arguments)
    assert not (tmp_path / "cache").exists()


def test_a_different_pyradiomics_pin_is_refused(cohort, tmp_path):
    pinned = ExtractionSettings("0.0.1", SETTINGS.settings, SETTINGS.image_types)
    with pytest.raises(FeatureExtractionError, match="pin pyradiomics 0.0.1"):
        extract_cohort_features(load_cohort(cohort.csv), pinned, cache_dir=tmp_path, progress=False)


def test_one_region_only(cohort):
    patient = load_cohort(cohort.csv).patient(cohort.id_of("dicom"))
    tumour_only = extract_patient_features(patient.images, SETTINGS, feature_classes=["firstorder"], regions=["tumour"])
    assert tumour_only and all(
        name.startswith("tumour.original_firstorder_") or name.startswith("tumour.wavelet-") for name in tumour_only
    )


# --------------------------------------------------------------------------- perturbed extractions (stability screen)


@pytest.fixture(scope="module")
def perturbed(cohort, baseline, tmp_path_factory):
    from sclc_risk_node.research.extraction import Perturbation

    patients = [
        p
        for p in load_cohort(cohort.csv)
        if p.id in {cohort.id_of("dicom"), cohort.id_of("nrrd"), cohort.id_of("precomputed")}
    ]
    cache = tmp_path_factory.mktemp("cache-perturbed")
    perturbations = {
        "dilation": Perturbation("dilation"),
        "erosion": Perturbation("erosion"),
        "noise": Perturbation("noise", noise_sd_hu=20.0, seed=3),
        "shift": Perturbation("shift", shift_voxels=0.5),
    }
    from sclc_risk_node.research.extraction import extract_perturbed_features

    # All four perturbations in one pool of workers.
    results = extract_perturbed_features(
        patients,
        SETTINGS,
        list(perturbations.values()),
        feature_classes=CLASSES,
        cache_dir=cache,
        progress=False,
        workers=2,
    )
    assert list(results) == list(perturbations)
    return results, perturbations, patients, cache


def test_perturbed_extractions_move_the_features_they_should(cohort, baseline, perturbed):
    results, _, _, _ = perturbed
    original = baseline[0].features
    volume = "tumour.original_shape_VoxelVolume"
    for name, result in results.items():
        # The precomputed row has nothing to perturb; the two image patients are extracted.
        assert list(result.features.index) == [cohort.id_of("dicom"), cohort.id_of("nrrd")], name
        assert not result.failures
    for pid in (cohort.id_of("dicom"), cohort.id_of("nrrd")):
        before = original.loc[pid]
        assert results["dilation"].features.at[pid, volume] > 1.15 * before[volume]
        assert results["erosion"].features.at[pid, volume] < 0.85 * before[volume]
        # The ring is rebuilt from the perturbed tumour mask.
        assert (
            results["dilation"].features.at[pid, "ring.original_shape_VoxelVolume"]
            != before["ring.original_shape_VoxelVolume"]
        )
        # Noise leaves the mask alone and widens the intensity distribution.
        noisy = results["noise"].features.loc[pid]
        assert noisy[volume] == before[volume]
        assert noisy["tumour.original_firstorder_Variance"] > before["tumour.original_firstorder_Variance"]
        # Half a voxel of shift resamples the mask: about the same volume, not the same values.
        shifted = results["shift"].features.loc[pid]
        assert 0.8 * before[volume] < shifted[volume] < 1.2 * before[volume]
        assert shifted["tumour.original_firstorder_Mean"] != before["tumour.original_firstorder_Mean"]


def test_each_perturbation_has_its_own_cache_and_a_rerun_reads_it(cohort, perturbed):
    results, perturbations, patients, cache = perturbed
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 4
    kinds = sorted(json.loads((f / "config.json").read_text())["perturbation"]["kind"] for f in folders)
    assert kinds == ["dilation", "erosion", "noise", "shift"]
    # A single-perturbation run finds the same cache folder.
    again = extract_cohort_features(
        patients,
        SETTINGS,
        feature_classes=CLASSES,
        cache_dir=cache,
        progress=False,
        workers=1,
        perturbation=perturbations["noise"],
    )
    assert again.computed == () and len(again.cached) == 2
    pd.testing.assert_frame_equal(again.features, results["noise"].features)


def test_noise_is_reproducible_per_patient_and_erosion_of_a_tiny_mask_is_a_clear_error():
    from sclc_risk_node.research.extraction import Perturbation, perturb_inputs
    from sclc_risk_node.scoring.errors import MaskError

    image = sitk.GetImageFromArray(np.full((10, 10, 10), -800, dtype=np.int16))
    mask = sitk.GetImageFromArray(np.zeros((10, 10, 10), dtype=np.uint8))
    mask[5, 5, 5] = 1
    noise = Perturbation("noise", noise_sd_hu=10.0, seed=1)
    first = sitk.GetArrayFromImage(perturb_inputs(image, mask, noise, "A")[0])
    assert np.array_equal(first, sitk.GetArrayFromImage(perturb_inputs(image, mask, noise, "A")[0]))
    assert not np.array_equal(first, sitk.GetArrayFromImage(perturb_inputs(image, mask, noise, "B")[0]))
    assert abs(first.std() - 10.0) < 0.5
    with pytest.raises(MaskError, match="erosion by one voxel leaves no tumour voxel"):
        perturb_inputs(image, mask, Perturbation("erosion"), "A")
    with pytest.raises(ExtractionError, match="perturbation: 'rotation' is not allowed"):
        Perturbation("rotation")
