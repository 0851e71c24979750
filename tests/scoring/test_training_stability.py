"""The perturbation stability screen (ICC) and the log transform of the training method.

The cohort is `test_training_method.simulate_cohort` (3 signal features, 40
noise features).  "Perturbed extractions" of 40 training patients are made by
hand: every feature moves a little (a stable feature), except the first
signal feature, which a perturbation replaces by noise -- the deliberately
unstable feature the screen must drop, although it carries PFS signal.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from sclc_risk_node.scoring.model import FrozenModel
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.training.method import TrainingDataError, choose_log_transforms, fit_integrated_model
from sclc_risk_node.scoring.training.spec import PreprocessingSpec, TrainingSpec, TrainingSpecError
from sclc_risk_node.scoring.training.stability import icc, icc_per_feature, stability_screen
from sclc_risk_node.scoring.types import FeatureVector
from tests.scoring.test_training_method import SIGNAL_FEATURES, SPEC_TOML, simulate_cohort, training_split

UNSTABLE = SIGNAL_FEATURES[0]
SIZE_FEATURE = "tumour.original_shape_MeshVolume"

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_icc_reproduces_shrout_and_fleiss_worked_example():
    # Their Table 4: ICC(1,1) = .17, ICC(3,1) = .71; the exact values from their mean squares
    # (BMS 11.24, WMS 6.26, EMS 1.02, k 4) are 0.1657 and 0.7148.
    assert icc(SHROUT_FLEISS, "ICC(1,1)") == pytest.approx(
        (11.241667 - 6.263889) / (11.241667 + 3 * 6.263889), abs=1e-6
    )
    assert round(icc(SHROUT_FLEISS, "ICC(1,1)"), 2) == 0.17
    assert round(icc(SHROUT_FLEISS, "ICC(3,1)"), 2) == 0.71


def test_icc_1_1_counts_a_systematic_shift_and_icc_3_1_does_not():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=50)
    shifted = np.column_stack([truth, truth + 2.0])  # one "rater" adds 2 SD to everyone
    assert icc(shifted, "ICC(3,1)") == pytest.approx(1.0)
    assert icc(shifted, "ICC(1,1)") < 0.3


def test_icc_per_feature_matches_the_scalar_formula_and_skips_incomplete_patients():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(12, 3, 4)) + rng.normal(size=(12, 1, 4)) * 3
    values[0, 2, 1] = np.nan  # a perturbation that could not compute feature 1 for patient 0
    result, used = icc_per_feature(values, "ICC(1,1)")
    assert used.tolist() == [12, 11, 12, 12]
    assert result[0] == pytest.approx(icc(values[:, :, 0]))
    assert result[1] == pytest.approx(icc(values[1:, :, 1]))
    with pytest.raises(ValueError, match="ICC kind"):
        icc(SHROUT_FLEISS, "ICC(2,1)")


def perturbed_tables(features: pd.DataFrame, patients: int = 40, seed: int = 5) -> dict[str, pd.DataFrame]:
    """Small relative changes of every feature; the UNSTABLE feature is replaced by noise under 'dilation'."""
    rng = np.random.default_rng(seed)
    subset = features.iloc[:patients]
    tables = {}
    for name in ("dilation", "erosion", "noise", "shift"):
        table = subset * (1.0 + 0.002 * rng.normal(size=subset.shape))
        if name == "dilation":
            column = subset[UNSTABLE]
            table[UNSTABLE] = rng.normal(column.mean(), column.std(), size=len(column))
        tables[name] = table
    return tables


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort()


@pytest.fixture(scope="module")
def screened(cohort):
    spec = TrainingSpec.from_toml(SPEC_TOML)
    train = training_split(cohort)
    return fit_integrated_model(*train, spec, created="2024-06-01T00:00:00Z", perturbed=perturbed_tables(train[0]))


def test_stability_screen_drops_a_feature_replaced_by_noise_under_perturbation(cohort):
    features = training_split(cohort)[0]
    tables = perturbed_tables(features)
    screen = stability_screen(features.iloc[:40, :10], {k: v.iloc[:, :10] for k, v in tables.items()}, threshold=0.75)
    assert screen.patients == 40
    assert screen.extractions == ("original", "dilation", "erosion", "noise", "shift")
    assert UNSTABLE in screen.dropped
    assert screen.icc[UNSTABLE] < 0.75
    assert all(screen.icc[name] > 0.99 for name in screen.kept)
    assert len(screen.kept) == 9


def test_the_fit_drops_the_unstable_signal_feature_before_lasso_and_records_the_screen(screened):
    summary = screened.model_mapping["training_summary"]
    assert screened.diagnostics["dropped_features"]["unstable"] == [UNSTABLE]
    selected = [f["name"] for f in screened.diagnostics["lasso"]["selected_features"]]
    assert UNSTABLE not in selected
    assert set(SIGNAL_FEATURES[1:]) <= set(selected)
    stability = summary["stability"]
    assert stability["ran"] is True
    assert stability["icc"] == "ICC(1,1)" and stability["icc_threshold"] == 0.75
    assert stability["patients_screened"] == 40
    assert stability["features_kept"] == stability["features_screened"] - 1
    # The report gets every feature's ICC.
    rows = {row["name"]: row for row in screened.diagnostics["stability"]["features"]}
    assert rows[UNSTABLE]["kept"] is False and rows[UNSTABLE]["icc"] < 0.75


def test_the_screen_is_recorded_as_not_run_without_perturbed_extractions(cohort):
    spec = TrainingSpec.from_toml(SPEC_TOML)
    fitted = fit_integrated_model(*training_split(cohort), spec, created="2024-06-01T00:00:00Z")
    stability = fitted.model_mapping["training_summary"]["stability"]
    assert stability["ran"] is False and "no perturbed extraction" in stability["note"]


def test_a_screen_that_keeps_nothing_is_a_clear_error(cohort):
    spec = TrainingSpec.from_toml(SPEC_TOML + "\n[stability]\nicc_threshold = 1.0\n")
    train = training_split(cohort)
    with pytest.raises(TrainingDataError, match=r"stability screen kept none .*ICC\(1,1\) >= 1"):
        fit_integrated_model(*train, spec, perturbed=perturbed_tables(train[0]))


# --------------------------------------------------------------------------- log transform


def test_auto_log_transform_picks_heavy_tailed_non_negative_features_only():
    rng = np.random.default_rng(3)
    raw = np.column_stack(
        [rng.lognormal(8, 1.2, 500), rng.normal(50, 5, 500), -rng.lognormal(0, 1, 500), rng.exponential(1.0, 500) - 0.5]
    )
    names = [
        "a.original_shape_MeshVolume",
        "b.original_firstorder_Mean",
        "c.original_firstorder_Minimum",
        "d.original_firstorder_Skewness",
    ]
    chosen = choose_log_transforms(raw, names, PreprocessingSpec("auto", 1.0))
    assert sps.skew(raw[:, 0], bias=False) > 1 and sps.skew(raw[:, 3], bias=False) > 1
    assert chosen == {names[0]: "signed_log1p", names[1]: "none", names[2]: "none", names[3]: "none"}
    assert choose_log_transforms(raw, names, PreprocessingSpec("none"))[names[0]] == "none"
    assert choose_log_transforms(raw, names, PreprocessingSpec((names[1],)))[names[1]] == "signed_log1p"
    with pytest.raises(TrainingDataError, match="log_transform names x.original_shape_Nope"):
        choose_log_transforms(raw, names, PreprocessingSpec(("x.original_shape_Nope",)))


@pytest.fixture(scope="module")
def size_cohort(cohort):
    """The method cohort plus a heavy-tailed tumour volume that carries signal on the log scale."""
    features, records, time, event = cohort
    rng = np.random.default_rng(9)
    log_volume = rng.normal(9.0, 1.0, len(time))
    features = features.assign(**{SIZE_FEATURE: np.exp(log_volume)})
    # Longer PFS for small tumours: multiply time by a factor falling with log volume.
    time = np.round(time * np.exp(-0.5 * (log_volume - 9.0)), 3).clip(min=0.01)
    return features, records, time, event


def test_the_transform_is_applied_before_z_scoring_and_written_into_the_model(size_cohort):
    spec = TrainingSpec.from_toml(
        SPEC_TOML.replace(
            "[extraction.image_types]",
            'feature_classes = ["firstorder", "shape", "glcm", "glszm", "ngtdm"]\n\n[extraction.image_types]',
        )
    )
    train = tuple(part[:200] for part in size_cohort)
    fitted = fit_integrated_model(*train, spec, created="2024-06-01T00:00:00Z")
    features = {
        f"{f['region']}.{f['image_type']}_{f['feature_class']}_{f['feature']}": f
        for f in fitted.model_mapping["radiomics"]["features"]
    }
    assert SIZE_FEATURE in features
    entry = features[SIZE_FEATURE]
    assert entry["transform"] == "signed_log1p"
    logged = np.log1p(train[0][SIZE_FEATURE].to_numpy())
    assert entry["mean"] == pytest.approx(logged.mean()) and entry["sd"] == pytest.approx(logged.std(ddof=1))
    assert all(f["transform"] == "none" for name, f in features.items() if name != SIZE_FEATURE)
    assert fitted.model_mapping["training_summary"]["log_transform"]["transformed_selected"] == [SIZE_FEATURE]
    # The node (scoring.risk) reproduces the training scores from raw feature values.
    model = FrozenModel.from_mapping(fitted.sealed_mapping())
    for row in (0, 7, 123):
        values = {name: float(train[0].iloc[row][name]) for name in model.feature_names}
        result = apply_model(model, FeatureVector(values), train[1][row])
        assert result.radiomics_score == pytest.approx(fitted.radiomics_score[row], abs=1e-9)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("[preprocessing]\nlog_transform = 'some'\n", "key 'preprocessing.log_transform' is 'some'"),
        ("[preprocessing]\nlog_transform = ['nonsense']\n", "key 'preprocessing.log_transform' has 'nonsense'"),
        ("[stability]\nicc = 'ICC(2,1)'\n", "key 'stability.icc' is 'ICC(2,1)' (allowed: ICC(1,1), ICC(3,1))"),
        ("[stability]\nperturbations = ['rotation']\n", "key 'stability.perturbations' has 'rotation'"),
        ("[stability]\npatients = 2\n", "key 'stability.patients' is 2 (must be >= 3)"),
        ("[validation]\nrefit = 'quick'\n", "key 'validation.refit' is 'quick'"),
        ("[validation]\nbootstrap = 5\n", "key 'validation.bootstrap' is 5 (must be 0 to switch it off, or >= 10)"),
    ],
)
def test_new_spec_keys_are_checked(edit, message):
    with pytest.raises(TrainingSpecError, match=__import__("re").escape(message)):
        TrainingSpec.from_toml(SPEC_TOML + "\n" + edit)


def test_new_spec_defaults_are_on_record():
    mapping = TrainingSpec.from_toml(SPEC_TOML).to_mapping()
    assert mapping["preprocessing"] == {"log_transform": "auto", "log_skewness": 1.0}
    assert mapping["stability"] == {
        "enabled": True,
        "patients": 30,
        "seed": 7,
        "perturbations": ["dilation", "erosion", "noise", "shift"],
        "noise_sd_hu": 10.0,
        "shift_voxels": 0.5,
        "icc": "ICC(1,1)",
        "icc_threshold": 0.75,
    }
    assert mapping["validation"] == {"bootstrap": 200, "refit": "fixed-alpha", "seed": 11}
    assert math.isclose(mapping["evaluation"]["bootstrap"], 200)
