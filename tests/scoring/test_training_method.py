"""The training method on a simulated cohort with a known truth, and the training spec.

The cohort: 300 patients; 3 signal features (on different scales) and 40
noise features; PFS from an exponential proportional-hazards model whose
log-hazard rises with the signal features, ECOG >= 2 and LIPI, and does not
depend on T stage; uniform censoring between 8 and 24 months.  The first 200
patients are the training split, the other 100 a held-out split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.util import Surv

from sclc_risk_node.scoring.clinical import ClinicalRecord, Lipi
from sclc_risk_node.scoring.model import FrozenModel, seal
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.training.method import (
    LassoCoxSelector,
    NoFeatureSelectedError,
    TrainingDataError,
    fit_integrated_model,
    variance_inflation_factors,
)
from sclc_risk_node.scoring.training.spec import TrainingSpec, TrainingSpecError
from sclc_risk_node.scoring.types import FeatureVector

SIGNAL_FEATURES = (
    "ring.wavelet-LLH_glcm_Correlation",
    "tumour.original_firstorder_Skewness",
    "ring.original_glszm_ZoneEntropy",
)
NOISE_FEATURES = tuple(f"{'tumour' if k % 2 else 'ring'}.original_firstorder_Noise{k:02d}" for k in range(40))
CONSTANT_FEATURE = "tumour.original_shape_Sphericity"
BROKEN_FEATURE = "ring.wavelet-HHH_ngtdm_Busyness"
N_TRAIN = 200

SPEC_TOML = """
[model]
name = "simulated-integrated-cox"
version = "0.1.0"
intended_use = "Unit tests on a simulated cohort; not for any patient."
demonstration = true

[extraction.settings]
binWidth = 25
resampledPixelSpacing = [1.0, 1.0, 1.0]

[extraction.image_types]
Original = {}
Wavelet = {}

[lasso]
seed = 7

[clinical]

[[clinical.candidates]]
name = "ecog>=2"
field = "ecog"
encoding = { kind = "threshold", at_least = 2 }

[[clinical.candidates]]
name = "lipi"
field = "lipi"
encoding = { kind = "ordinal", map = { good = 0, intermediate = 1, poor = 2 } }

[[clinical.candidates]]
name = "t_stage:T3-T4"
field = "t_stage"
encoding = { kind = "indicator", levels = ["T3", "T4"] }

[evaluation]
seed = 11
bootstrap = 200
"""


def simulate_cohort(n: int = 300, seed: int = 2):
    """(features, records, time, event) with the truth described in the module docstring."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 3))
    noise = rng.normal(size=(n, len(NOISE_FEATURES)))
    columns = {name: 10.0 * (j + 1) + (j + 1) * signal[:, j] for j, name in enumerate(SIGNAL_FEATURES)}
    columns.update({name: 100.0 + 5.0 * noise[:, k] for k, name in enumerate(NOISE_FEATURES)})
    columns[CONSTANT_FEATURE] = np.full(n, 0.75)
    columns[BROKEN_FEATURE] = np.where(np.arange(n) == 5, np.nan, rng.normal(size=n))
    features = pd.DataFrame(columns)
    ecog = rng.choice([0, 1, 2, 3], p=[0.3, 0.45, 0.2, 0.05], size=n)
    lipi = rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2], size=n)
    t_stage = rng.choice(["T1", "T2", "T3", "T4"], size=n)
    records = [
        ClinicalRecord(
            t_stage=str(t_stage[i]),
            n_stage="N2",
            m_stage="M1c",
            ecog=int(ecog[i]),
            lipi=Lipi(int(lipi[i])),
            lipi_source="given",
            patient_id=f"SIM{i:04d}",
        )
        for i in range(n)
    ]
    log_hazard = 0.7 * signal[:, 0] - 0.6 * signal[:, 1] + 0.5 * signal[:, 2] + 1.0 * (ecog >= 2) + 0.6 * lipi
    pfs = rng.exponential(16.0 * np.exp(-log_hazard))
    follow_up = rng.uniform(8.0, 24.0, size=n)
    time = np.round(np.minimum(pfs, follow_up), 3).clip(min=0.01)
    return features, records, time, pfs <= follow_up


def training_split(cohort):
    features, records, time, event = cohort
    return features.iloc[:N_TRAIN], records[:N_TRAIN], time[:N_TRAIN], event[:N_TRAIN]


@pytest.fixture(scope="module")
def spec():
    return TrainingSpec.from_toml(SPEC_TOML)


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort()


@pytest.fixture(scope="module")
def fitted(spec, cohort):
    return fit_integrated_model(*training_split(cohort), spec, cohort="simulated", created="2024-06-01T00:00:00Z")


# --------------------------------------------------------------------------- the method


def test_lasso_selects_all_signal_features_and_few_noise(fitted):
    selected = [feature["name"] for feature in fitted.diagnostics["lasso"]["selected_features"]]
    assert set(SIGNAL_FEATURES) <= set(selected)
    assert len(set(selected) - set(SIGNAL_FEATURES)) <= 3
    coefficients = {f["name"]: f["coefficient"] for f in fitted.diagnostics["lasso"]["selected_features"]}
    # Signs of the true log-hazard ratios.
    assert coefficients[SIGNAL_FEATURES[0]] > 0 > coefficients[SIGNAL_FEATURES[1]]
    assert coefficients[SIGNAL_FEATURES[2]] > 0


def test_chosen_alpha_has_the_best_cross_validated_c_index(fitted):
    lasso = fitted.diagnostics["lasso"]
    full = [row for row in lasso["curve"] if row["folds_scored"] == 10]
    best = max(full, key=lambda row: row["mean_c_index"])
    assert lasso["alpha"] == best["alpha"] == lasso["cv"]["alpha_best"]
    assert lasso["cv"]["alpha_1se"] >= lasso["alpha"]


def test_one_se_rule_picks_a_sparser_model_within_one_standard_error(spec, cohort):
    features, _, time, event = training_split(cohort)
    usable = features.drop(columns=[CONSTANT_FEATURE, BROKEN_FEATURE])
    y = Surv.from_arrays(event=event, time=time)
    by_min = LassoCoxSelector(seed=7, selection="min").fit(usable, y)
    by_1se = LassoCoxSelector(seed=7, selection="1se").fit(usable, y)
    assert by_1se.alpha_ >= by_min.alpha_
    assert len(by_1se.selected_features_) <= len(by_min.selected_features_)
    best = by_min.alpha_index_
    assert by_1se.cv_mean_c_index_[by_1se.alpha_index_] >= (by_min.cv_mean_c_index_[best] - by_min.cv_se_c_index_[best])
    # sklearn contract: parameters round-trip, predict gives sum(coef * z).
    assert by_1se.get_params()["selection"] == "1se"
    z = (usable.to_numpy() - usable.mean().to_numpy()) / usable.std().to_numpy()
    np.testing.assert_allclose(by_min.predict(usable), z @ by_min.coef_)


def test_features_with_non_finite_values_or_zero_variance_are_dropped_and_reported(fitted):
    dropped = fitted.diagnostics["dropped_features"]
    assert dropped == {"non_finite": [BROKEN_FEATURE], "zero_variance": [CONSTANT_FEATURE], "unstable": []}
    names = {
        f"{f['region']}.{f['image_type']}_{f['feature_class']}_{f['feature']}"
        for f in fitted.model_mapping["radiomics"]["features"]
    }
    assert not names & {BROKEN_FEATURE, CONSTANT_FEATURE}


def test_standardisation_uses_training_mean_and_sample_sd(fitted, cohort):
    features = training_split(cohort)[0]
    for feature in fitted.model_mapping["radiomics"]["features"]:
        name = f"{feature['region']}.{feature['image_type']}_{feature['feature_class']}_{feature['feature']}"
        assert feature["mean"] == pytest.approx(features[name].mean(), rel=1e-12)
        assert feature["sd"] == pytest.approx(features[name].std(ddof=1), rel=1e-12)


def test_univariate_screen_keeps_ecog_and_lipi_and_drops_t_stage(fitted):
    clinical = fitted.diagnostics["clinical"]
    kept = {row["name"]: row["kept"] for row in clinical["univariate"]}
    assert kept == {"ecog>=2": True, "lipi": True, "t_stage:T3-T4": False}
    for row in clinical["univariate"]:
        assert row["kept"] == (row["p"] < 0.05)
    assert clinical["multivariate"][0]["terms"] == ["ecog>=2", "lipi"]
    assert clinical["selected"] == ["ecog>=2", "lipi"]
    assert [c["name"] for c in fitted.model_mapping["clinical_covariates"]] == ["ecog>=2", "lipi"]


def test_backward_elimination_refits_until_every_p_is_below_the_threshold(cohort):
    # A lenient univariate threshold lets T stage into the multivariate model.
    lenient = SPEC_TOML.replace(
        "[clinical]\n", '[clinical]\nunivariate_p = 1.0\nmultivariate_elimination = "backward"\n'
    )
    fitted = fit_integrated_model(*training_split(cohort), TrainingSpec.from_toml(lenient))
    steps = fitted.diagnostics["clinical"]["multivariate"]
    assert steps[0]["terms"] == ["ecog>=2", "lipi", "t_stage:T3-T4"]
    assert steps[-1]["terms"] == ["ecog>=2", "lipi"]
    assert all(row["p"] < 0.05 for row in steps[-1]["table"])
    assert fitted.diagnostics["clinical"]["selected"] == ["ecog>=2", "lipi"]


def test_frozen_mapping_loads_and_apply_model_reproduces_the_fitted_scores(fitted, cohort):
    model = FrozenModel.from_mapping(seal(fitted.model_mapping))
    features, records, _, _ = training_split(cohort)
    for row in (0, 17, 123, 199):
        vector = FeatureVector({name: features.iloc[row][name] for name in model.feature_names})
        result = apply_model(model, vector, records[row])
        assert result.radiomics_score == pytest.approx(fitted.radiomics_score[row], abs=1e-10)
        assert result.risk_score == pytest.approx(fitted.risk_score[row], abs=1e-10)


def test_cutoffs_are_training_medians(fitted):
    assert fitted.radiomics_cutoff == np.median(fitted.radiomics_score)
    assert fitted.risk_cutoff == np.median(fitted.risk_score)
    assert fitted.model_mapping["radiomics"]["cutoff"] == fitted.radiomics_cutoff


def test_integrated_model_and_baseline_agree_with_scikit_survival(fitted, cohort):
    """Coefficients = CoxPHSurvivalAnalysis (Efron); S(t|lp) = sksurv's Breslow prediction, whatever the centre."""
    _, records, time, event = training_split(cohort)
    design = np.column_stack(
        [
            fitted.radiomics_score,
            [float(r.ecog >= 2) for r in records],
            [float(int(r.lipi)) for r in records],
        ]
    )
    reference = CoxPHSurvivalAnalysis(ties="efron", n_iter=200, tol=1e-12).fit(
        design, Surv.from_arrays(event=event, time=time)
    )
    mapping = fitted.model_mapping
    coefficients = [mapping["radiomics_score_coefficient"], *(c["coefficient"] for c in mapping["clinical_covariates"])]
    np.testing.assert_allclose(coefficients, reference.coef_, rtol=1e-6)

    model = fitted.frozen_model()
    lp = np.asarray(fitted.risk_score)
    breslow = BreslowEstimator().fit(lp, event, time)  # baseline at lp = 0
    assert model.baseline_survival.centre == pytest.approx(lp.mean())
    for months in (3.0, 6.0, 12.0):
        for row in (0, 50, 150):
            expected = breslow.baseline_survival_(months) ** math.exp(lp[row])
            assert model.baseline_survival.survival_at(months, lp[row]) == pytest.approx(expected, rel=1e-9)
    assert model.baseline_survival.valid_until == time.max()


def test_training_summary_reports_the_method(fitted, cohort):
    summary = fitted.frozen_model().training_summary
    _, _, time, event = training_split(cohort)
    assert summary["n"] == N_TRAIN and summary["events"] == int(event.sum())
    assert 8.0 < summary["median_follow_up_months"] < 24.0
    assert summary["c_index"] > summary["c_index_radiomics"] > 0.6
    assert set(summary["vif"]) == {"radiomics_score", "ecog>=2", "lipi"}
    assert [row["name"] for row in summary["spearman_radiomics_score"]] == ["ecog>=2", "lipi", "t_stage:T3-T4"]
    assert summary["lasso"]["cv"]["folds"] == 10
    assert summary["spec"]["lasso"]["seed"] == 7
    json.dumps(fitted.model_mapping, allow_nan=False)


def test_spearman_and_vif_match_independent_computations(fitted, cohort):
    _, records, _, _ = training_split(cohort)
    lipi = np.array([float(int(r.lipi)) for r in records])
    ecog = np.array([float(r.ecog >= 2) for r in records])
    score = np.asarray(fitted.radiomics_score)
    row = next(r for r in fitted.diagnostics["spearman_radiomics_score"] if r["name"] == "lipi")
    expected = sps.spearmanr(score, lipi)
    assert row["rho"] == pytest.approx(expected.statistic) and row["p"] == pytest.approx(expected.pvalue)
    # VIF of lipi from the OLS R² of lipi on the other two terms.
    design = np.column_stack([np.ones_like(score), score, ecog])
    residual = lipi - design @ np.linalg.lstsq(design, lipi, rcond=None)[0]
    r_squared = 1 - residual @ residual / np.sum((lipi - lipi.mean()) ** 2)
    assert fitted.diagnostics["vif"]["lipi"] == pytest.approx(1 / (1 - r_squared))


def test_variance_inflation_factors_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    b = 0.6 * a + 0.8 * rng.normal(size=500)
    r = np.corrcoef(a, b)[0, 1]
    vif = variance_inflation_factors({"a": a, "b": b})
    assert vif["a"] == pytest.approx(1 / (1 - r**2)) and vif["b"] == pytest.approx(vif["a"])
    assert variance_inflation_factors({"a": a}) == {"a": 1.0}
    assert variance_inflation_factors({"a": a, "b": b, "c": a + b})["c"] == math.inf
    with pytest.raises(ValueError, match="'k' is constant"):
        variance_inflation_factors({"a": a, "k": np.ones(500)})


# --------------------------------------------------------------------------- errors


def test_no_selected_feature_is_a_clear_error():
    # Pure noise; with the 1se rule the all-zero end of the path is within one
    # SE of the best cross-validated C (for this fixed seed), so nothing is kept.
    rng = np.random.default_rng(9)
    n = 150
    features = pd.DataFrame({name: rng.normal(size=n) for name in NOISE_FEATURES[:10]})
    time = rng.exponential(8.0, size=n) + 0.1
    event = rng.random(n) < 0.7
    time[np.argmax(time)] = max(time.max(), 13.0)  # follow-up reaches the required 12 months
    records = [
        ClinicalRecord(
            t_stage="T2", n_stage="N2", m_stage="M1c", ecog=1, lipi=Lipi.GOOD, lipi_source="given", patient_id=f"N{i}"
        )
        for i in range(n)
    ]
    sparse = TrainingSpec.from_toml(SPEC_TOML.replace("seed = 7", 'seed = 7\nselection = "1se"'))
    with pytest.raises(NoFeatureSelectedError, match="LASSO-Cox selected no feature: at the chosen alpha"):
        fit_integrated_model(features, records, time, event, sparse)


def test_missing_clinical_field_is_named(cohort):
    with_age = (
        SPEC_TOML
        + """
[[clinical.candidates]]
name = "age>=65"
field = "age"
encoding = { kind = "threshold", at_least = 65 }
"""
    )
    with pytest.raises(TrainingDataError, match=r"clinical field 'age' \(candidate age>=65\) is missing for 200"):
        fit_integrated_model(*training_split(cohort), TrainingSpec.from_toml(with_age))


def test_feature_the_extraction_does_not_produce_is_named(spec, cohort):
    features, records, time, event = training_split(cohort)
    renamed = features.rename(columns={NOISE_FEATURES[0]: "ring.log-sigma-2-0-mm-3D_firstorder_Mean"})
    with pytest.raises(TrainingDataError, match="'ring.log-sigma-2-0-mm-3D_firstorder_Mean': image type"):
        fit_integrated_model(renamed, records, time, event, spec)
    bad = features.rename(columns={NOISE_FEATURES[0]: "Mean"})
    with pytest.raises(TrainingDataError, match="feature column 'Mean'"):
        fit_integrated_model(bad, records, time, event, spec)


def test_mismatched_lengths_are_refused(spec, cohort):
    features, records, time, event = training_split(cohort)
    with pytest.raises(TrainingDataError, match="199 clinical records for 200 feature rows"):
        fit_integrated_model(features, records[:-1], time, event, spec)


# --------------------------------------------------------------------------- the spec


def test_spec_defaults(spec):
    assert spec.lasso.cv_folds == 10 and spec.lasso.selection == "min" and spec.lasso.alpha_min_ratio == "auto"
    assert spec.extraction.feature_classes == ("firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
    assert spec.extraction.regions == ("tumour", "ring")
    assert (spec.extraction.ring.outward_mm, spec.extraction.ring.inward_mm) == (2.0, 2.0)
    assert spec.clinical.univariate_p == spec.clinical.multivariate_p == 0.05
    assert spec.evaluation.horizons_months == (6.0, 12.0)
    assert spec.extraction_settings.pyradiomics_version  # the installed version


def test_module_docstring_example_is_a_valid_spec():
    from sclc_risk_node.scoring.training import spec as spec_module

    doc = spec_module.__doc__
    example = doc[doc.index("A complete example::") + len("A complete example::") :]
    text = "\n".join(line[4:] for line in example.splitlines())
    parsed = TrainingSpec.from_toml(text)
    assert [c.name for c in parsed.clinical.candidates] == ["overall_stage:IV", "ecog>=2", "lipi", "t_stage:T3-T4"]
    assert TrainingSpec.from_mapping(parsed.to_mapping()) == parsed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("seed = 7", "seed = 7\ncv_fold = 5"), "unknown key 'lasso.cv_fold'"),
        (("bootstrap = 200", "bootstrap = 200\nhorizon = 6"), "unknown key 'evaluation.horizon'"),
        (("seed = 7", ""), "missing required key 'lasso.seed'"),
        (("seed = 7", 'seed = 7\nselection = "best"'), "'lasso.selection' is 'best'"),
        (("[clinical]\n", "[clinical]\nunivariate_p = 1.5\n"), "'clinical.univariate_p' is 1.5"),
        (('levels = ["T3", "T4"]', 'levels = ["T5"]'), "'clinical.candidates[2].encoding': levels"),
        (
            ('kind = "threshold", at_least = 2', 'kind = "threshold"'),
            "missing required key 'clinical.candidates[0].encoding.at_least'",
        ),
        (('field = "ecog"', 'field = "ecg"'), "'clinical.candidates[0].field' is 'ecg'"),
        (('name = "lipi"', 'name = "ecog>=2"'), "'clinical.candidates[1].name' repeats 'ecog>=2'"),
        (("Wavelet = {}", "Wavelets = {}"), "unknown key 'extraction.image_types.Wavelets'"),
        (('version = "0.1.0"', 'version = "0 1"'), "'model.version' is '0 1'"),
        (("demonstration = true", "demonstration = 1"), "'model.demonstration' must be true or false"),
        (("[lasso]", "[lasso]\nn_alphas = 1"), "'lasso.n_alphas' is 1"),
    ],
)
def test_spec_errors_name_the_key(edit, message):
    old, new = edit
    assert old in SPEC_TOML
    with pytest.raises(TrainingSpecError, match=re_escape(message)):
        TrainingSpec.from_toml(SPEC_TOML.replace(old, new, 1))


def test_spec_that_is_not_toml_is_refused():
    with pytest.raises(TrainingSpecError, match="not valid TOML"):
        TrainingSpec.from_toml("[model\nname = 1")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_the_fit_records_the_lasso_path_it_chose_from(fitted):
    """The report draws this path (research/report.py), so it must be the fitted one: at the chosen alpha
    exactly the model's coefficients, and per alpha exactly the curve's count of non-zero coefficients."""
    lasso = fitted.diagnostics["lasso"]
    path = lasso["coefficient_path"]
    assert path["alphas"] == [row["alpha"] for row in lasso["curve"]]
    assert path["chosen_alpha"] == lasso["alpha"]
    chosen = path["alphas"].index(lasso["alpha"])
    coefficients = {
        f"{f['region']}.{f['image_type']}_{f['feature_class']}_{f['feature']}": f["coefficient"]
        for f in fitted.model_mapping["radiomics"]["features"]
    }
    assert {name: values[chosen] for name, values in path["features"].items() if values[chosen] != 0.0} == coefficients
    for k, row in enumerate(lasso["curve"]):
        assert sum(values[k] != 0.0 for values in path["features"].values()) == row["n_nonzero"]
