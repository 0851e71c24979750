"""The simulated cohort: calibration to the paper on large samples, the known signal, and the files written."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from lifelines import CoxPHFitter, KaplanMeierFitter

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.research.cohort import load_cohort
from sclc_risk_node.research.simulate import (
    CHEMOIMMUNOTHERAPY,
    CHEMOTHERAPY,
    CLINICAL_EFFECTS,
    IMAGE_PARAMETERS,
    PAPER_SPLIT_SIZES,
    SimulationError,
    clinical_design,
    image_z_scores,
    simulate_cohort,
    simulate_patients,
    split_sizes,
)
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping

LARGE = 40_000


@pytest.fixture(scope="module")
def large_sample():
    patients = simulate_patients({"train": LARGE, "control": LARGE}, seed=11)
    return {arm: [p for p in patients if p.arm == arm] for arm in (CHEMOIMMUNOTHERAPY, CHEMOTHERAPY)}


def km(times, events) -> KaplanMeierFitter:
    return KaplanMeierFitter().fit(np.asarray(times), np.asarray(events))


def pfs_fit(patients) -> KaplanMeierFitter:
    return km([p.pfs_months for p in patients], [p.pfs_event for p in patients])


def reverse_km_median(patients) -> float:
    return km([p.pfs_months for p in patients], [not p.pfs_event for p in patients]).median_survival_time_


def test_chemoimmunotherapy_pfs_matches_the_papers_kaplan_meier_figures(large_sample):
    patients = large_sample[CHEMOIMMUNOTHERAPY]
    fit = pfs_fit(patients)
    assert fit.median_survival_time_ == pytest.approx(7.1, abs=0.25)
    for month, published in ((6, 0.607), (9, 0.382), (12, 0.283)):
        assert float(fit.predict(month)) == pytest.approx(published, abs=0.02), month
    assert reverse_km_median(patients) == pytest.approx(12.1, abs=1.0)
    # Paper: 225 of 341 progressed (66%), 87 died (26%), 12/18-month OS 75.0/58.5%.
    assert np.mean([p.pfs_event for p in patients]) == pytest.approx(0.66, abs=0.04)
    os_fit = km([p.os_months for p in patients], [p.os_event for p in patients])
    assert float(os_fit.predict(12)) == pytest.approx(0.75, abs=0.02)
    assert float(os_fit.predict(18)) == pytest.approx(0.585, abs=0.02)
    assert all(p.os_months >= p.pfs_months for p in patients)


def test_the_control_group_has_a_shorter_pfs_and_follow_up_as_published(large_sample):
    patients = large_sample[CHEMOTHERAPY]
    assert pfs_fit(patients).median_survival_time_ == pytest.approx(5.9, abs=0.25)
    assert reverse_km_median(patients) == pytest.approx(11.8, abs=1.0)
    os_fit = km([p.os_months for p in patients], [p.os_event for p in patients])
    assert os_fit.median_survival_time_ == pytest.approx(13.7, abs=0.6)


@pytest.mark.parametrize("arm", [CHEMOIMMUNOTHERAPY, CHEMOTHERAPY])
def test_baseline_characteristics_match_the_paper(large_sample, arm):
    clinical = pd.DataFrame([dict(p.clinical) for p in large_sample[arm]])
    assert (clinical["sex"] == "M").mean() == pytest.approx(0.90, abs=0.01)
    assert (clinical["m_stage"] != "M0").mean() == pytest.approx(0.85, abs=0.01)
    assert (clinical["ecog"] < 2).mean() == pytest.approx(0.93, abs=0.01)
    assert clinical["brain_metastases"].mean() == pytest.approx(0.19, abs=0.01)
    assert clinical["liver_metastases"].mean() == pytest.approx(0.20, abs=0.01)
    assert clinical["age"].mean() == pytest.approx(62, abs=0.5)
    assert clinical["age"].std() == pytest.approx(8.7, abs=0.5)
    organ_metastases = clinical["brain_metastases"] | clinical["liver_metastases"]
    assert set(clinical.loc[organ_metastases, "m_stage"]) == {"M1b", "M1c"}
    assert set(clinical.loc[clinical["brain_metastases"] & clinical["liver_metastases"], "m_stage"]) == {"M1c"}
    # Extensive stage: without distant metastases, nodal disease makes it stage III.
    assert set(clinical.loc[clinical["m_stage"] == "M0", "n_stage"]) == {"N2", "N3"}
    for fields in clinical.sample(500, random_state=0).to_dict("records"):
        record = clinical_record_from_mapping({**fields, "patient_id": "x"})
        assert record.overall_stage in ("III", "IV")


@pytest.mark.parametrize("arm", [CHEMOIMMUNOTHERAPY, CHEMOTHERAPY])
def test_a_cox_fit_recovers_the_true_log_hazard_ratios(large_sample, arm):
    patients = large_sample[arm][:20_000]
    draws = {
        name: np.array([p.clinical[name] for p in patients], dtype=object)
        for name in ("t_stage", "n_stage", "m_stage", "ecog", "lipi", "liver_metastases")
    }
    draws |= {name: np.array([getattr(p.phantom, name) for p in patients]) for name in IMAGE_PARAMETERS}
    design = {name: clinical_design(draws)[name] for name in CLINICAL_EFFECTS}
    z = image_z_scores(draws)
    frame = pd.DataFrame(
        {
            **design,
            **{f"z:{n}": v for n, v in z.items()},
            "time": [p.pfs_months for p in patients],
            "event": [p.pfs_event for p in patients],
        }
    )
    fitted = CoxPHFitter().fit(frame, "time", "event").params_
    for name, beta in CLINICAL_EFFECTS.items():
        assert fitted[name] == pytest.approx(beta, abs=0.08), name
    for name, parameter in IMAGE_PARAMETERS.items():
        expected = parameter.log_hazard_ratio_per_sd if arm == CHEMOIMMUNOTHERAPY else 0.0
        assert fitted[f"z:{name}"] == pytest.approx(expected, abs=0.04), name


def test_the_true_linear_predictor_is_the_documented_sum(large_sample):
    patient = large_sample[CHEMOIMMUNOTHERAPY][0]
    draws = {k: np.array([v], dtype=object) for k, v in patient.clinical.items()}
    design = clinical_design(draws)
    expected = sum(beta * design[name][0] for name, beta in CLINICAL_EFFECTS.items())
    expected += sum(
        p.log_hazard_ratio_per_sd * (getattr(patient.phantom, name) - p.mean) / p.sd
        for name, p in IMAGE_PARAMETERS.items()
    )
    assert patient.linear_predictor == pytest.approx(expected, abs=1e-12)


def test_simulation_is_deterministic_per_seed():
    counts = {"train": 5, "validation_1": 2, "control": 2}
    assert simulate_patients(counts, seed=3) == simulate_patients(counts, seed=3)
    assert simulate_patients(counts, seed=3) != simulate_patients(counts, seed=4)
    # A split's patients do not depend on the size of the splits before it.
    bigger = simulate_patients({"train": 9, "validation_1": 2, "control": 2}, seed=3)
    assert [p.pfs_months for p in bigger if p.split == "control"] == [
        p.pfs_months for p in simulate_patients(counts, seed=3) if p.split == "control"
    ]


def test_split_sizes_follow_the_paper_and_scale():
    assert (
        split_sizes()
        == dict(PAPER_SPLIT_SIZES)
        == {"train": 253, "validation_1": 51, "validation_2": 75, "control": 57}
    )
    assert sum(split_sizes().values()) == 436
    assert split_sizes(0.25) == {"train": 63, "validation_1": 13, "validation_2": 19, "control": 14}
    assert split_sizes(0.001) == {"train": 1, "validation_1": 1, "validation_2": 1, "control": 1}
    for bad in (0, -1, math.nan, "1"):
        with pytest.raises(SimulationError):
            split_sizes(bad)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulated") / "cohort"
    csv_path = simulate_cohort(out, seed=5, scale=0.012, image_size=(48, 48, 24), progress=False)
    return out, csv_path


def test_the_written_cohort_loads_and_matches_the_truth(written):
    out, csv_path = written
    assert csv_path == out / "cohort.csv"
    cohort = load_cohort(csv_path)
    truth = json.loads((out / "simulation_truth.json").read_text())
    assert cohort.splits == ("train", "validation_1", "validation_2", "control")
    assert {s: len(cohort.in_split(s)) for s in cohort.splits} == truth["split_sizes"] == split_sizes(0.012)
    assert [p["id"] for p in truth["patients"]] == list(cohort.ids)
    expected = simulate_patients(split_sizes(0.012), seed=5)
    for patient, simulated in zip(cohort, expected):
        assert patient.pfs_months == pytest.approx(simulated.pfs_months, abs=0.005)
        assert patient.pfs_event == simulated.pfs_event and patient.os_event == simulated.os_event
        assert patient.clinical.t_stage == simulated.clinical["t_stage"]
        assert patient.clinical.liver_metastases == simulated.clinical["liver_metastases"]
    model = truth["pfs_model"]
    assert model["clinical_log_hazard_ratios"][CHEMOIMMUNOTHERAPY] == dict(CLINICAL_EFFECTS)
    assert model["image_log_hazard_ratios_per_sd"][CHEMOTHERAPY] == {name: 0.0 for name in IMAGE_PARAMETERS}
    assert model["image_log_hazard_ratios_per_sd"][CHEMOIMMUNOTHERAPY]["halo_hu"] == 0.35
    assert truth["image_parameters"]["halo_hu"]["drives_hazard"] is True
    assert truth["image_parameters"]["axis_ratios"]["drives_hazard"] is False
    assert truth["arm_of_split"]["control"] == CHEMOTHERAPY
    with open(csv_path, newline="") as stream:
        header = next(csv.reader(stream))
    assert header[:6] == ["id", "split", "pfs_months", "pfs_event", "os_months", "os_event"]
    assert header[-2:] == ["ct", "seg"]


def test_the_written_images_read_back_as_ct_and_tumour_segment(written):
    out, csv_path = written
    truth = {p["id"]: p for p in json.loads((out / "simulation_truth.json").read_text())["patients"]}
    for patient in load_cohort(csv_path):
        ct = read_ct_series(patient.images.ct)
        assert ct.image.GetSize() == (48, 48, 24)
        assert ct.image.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))
        assert str(ct.headers[0].PatientID) == patient.id
        mask = read_tumour_segment(patient.images.seg, ct).mask
        voxels = int(sitk.GetArrayViewFromImage(mask).sum())
        # The box phantom maps the radius onto its small grid (recorded as drawn).
        a, b, c = truth[patient.id]["drawn"]["radii_mm"]
        assert voxels * 2.0 == pytest.approx(4 / 3 * math.pi * a * b * c, rel=0.15)
        hu = sitk.GetArrayViewFromImage(ct.image)
        inside = sitk.GetArrayViewFromImage(mask).astype(bool)
        assert abs(hu[inside].mean() - 40) < 30 and hu[~inside].mean() < -600
        seg = pydicom.dcmread(patient.images.seg, stop_before_pixels=True)
        assert seg.Modality == "SEG" and seg.PatientID == patient.id


def test_simulate_cohort_refuses_a_used_folder_and_a_field_of_view_too_small(written, tmp_path):
    out, _ = written
    with pytest.raises(SimulationError, match="is not an empty folder"):
        simulate_cohort(out, scale=0.01, progress=False)
    with pytest.raises(SimulationError, match="image_size .* is too small on axis"):
        simulate_cohort(tmp_path / "small", scale=0.01, image_size=(32, 32, 16), progress=False)
    assert not (tmp_path / "small").exists()


@pytest.fixture(scope="module")
def written_chest_ct(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulated-chest") / "cohort"
    csv_path = simulate_cohort(out, seed=7, scale=0.009, progress=False)
    return out, csv_path


def test_the_default_phantom_is_a_chest_ct_written_as_dicom_with_its_drawn_geometry(written_chest_ct):
    out, csv_path = written_chest_ct
    truth = json.loads((out / "simulation_truth.json").read_text())
    assert truth["phantom"]["kind"] == "chest-ct"
    drawn = {p["id"]: p for p in truth["patients"]}
    spacings = set()
    for patient in load_cohort(csv_path):
        ct = read_ct_series(patient.images.ct)
        layout = drawn[patient.id]["drawn"]
        assert ct.image.GetSize() == tuple(layout["size"])
        assert ct.image.GetSpacing() == pytest.approx(
            (layout["in_plane_spacing_mm"], layout["in_plane_spacing_mm"], layout["slice_thickness_mm"]), abs=1e-4
        )
        spacings.add(ct.image.GetSpacing()[2])
        mask = sitk.GetArrayFromImage(read_tumour_segment(patient.images.seg, ct).mask).astype(bool)
        volume_ml = mask.sum() * np.prod(ct.image.GetSpacing()) / 1000
        assert volume_ml == pytest.approx(layout["tumour_volume_ml"], rel=1e-3)
        radius = drawn[patient.id]["radius_mm"]
        assert volume_ml == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.3)
        hu = sitk.GetArrayViewFromImage(ct.image)
        assert (hu[~mask] < -950).any() and (hu[~mask] > 200).any() or layout["location"] == "central"
        assert np.median(hu[~mask][hu[~mask] < -500]) == pytest.approx(-850, abs=40)  # lung
        assert (
            pydicom.dcmread(next(patient.images.ct.iterdir()), stop_before_pixels=True).SeriesDescription
            == "Simulated chest CT (phantom)"
        )
    assert len(spacings) >= 2  # several slice thicknesses among four patients


def test_simulate_cohort_refuses_an_unknown_phantom_kind_and_a_grid_for_the_chest_ct(tmp_path):
    with pytest.raises(SimulationError, match="phantom: 'mri' is not allowed"):
        simulate_cohort(tmp_path / "a", scale=0.01, phantom="mri", progress=False)
    with pytest.raises(SimulationError, match="image_size: the chest-ct phantom draws its own grid"):
        simulate_cohort(tmp_path / "b", scale=0.01, phantom="chest-ct", image_size=(48, 48, 24), progress=False)
