"""Internal validation (Harrell's optimism, calibration slope/intercept, IBS, PH test) and the predictive analysis.

The predictive analysis is checked against lifelines' CoxPHFitter on the
simulated cohort of `research.simulate` (its clinical and outcome part,
no images): risk groups from the simulation's true log-hazard (clinical +
image terms, computed for both arms, cut at the treated median), treatment =
chemoimmunotherapy vs the chemotherapy-only control group.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sclc_risk_node.research import simulate as sim
from sclc_risk_node.scoring.model import BaselineSurvival
from sclc_risk_node.scoring.training.evaluation import calibration_summary, integrated_brier_score, predictive_analysis
from sclc_risk_node.scoring.training.method import fit_integrated_model
from sclc_risk_node.scoring.training.spec import TrainingSpec
from sclc_risk_node.scoring.training.validation import optimism_corrected, proportional_hazards_test
from tests.scoring.test_training_method import SPEC_TOML, simulate_cohort, training_split

# --------------------------------------------------------------------------- predictive analysis (Fig 7)


def _true_risk(patient: sim.SimulatedPatient) -> float:
    draws = {
        key: np.array([value], dtype=object if key == "m_stage" else None) for key, value in patient.clinical.items()
    }
    design = sim.clinical_design(draws)
    lp = sum(beta * design[name][0] for name, beta in sim.CLINICAL_EFFECTS.items())
    for name, parameter in sim.IMAGE_PARAMETERS.items():
        lp += parameter.log_hazard_ratio_per_sd * (getattr(patient.phantom, name) - parameter.mean) / parameter.sd
    return float(lp)


@pytest.fixture(scope="module")
def simulated():
    patients = sim.simulate_patients(sim.split_sizes(1.0), seed=2023)
    risk = np.array([_true_risk(p) for p in patients])
    treated = np.array([p.arm == sim.CHEMOIMMUNOTHERAPY for p in patients])
    high = risk > np.median(risk[treated])
    time = np.array([p.pfs_months for p in patients])
    event = np.array([p.pfs_event for p in patients])
    analysis = predictive_analysis(
        time[treated], event[treated], high[treated], time[~treated], event[~treated], high[~treated]
    )
    return {"time": time, "event": event, "high": high, "treated": treated, "analysis": analysis}


def test_interaction_test_agrees_with_lifelines(simulated):
    from lifelines import CoxPHFitter

    frame = pd.DataFrame(
        {
            "time": simulated["time"],
            "event": simulated["event"].astype(int),
            "high_risk": simulated["high"].astype(float),
            "treated": simulated["treated"].astype(float),
        }
    )
    frame["high_risk:treated"] = frame["high_risk"] * frame["treated"]
    fitter = CoxPHFitter().fit(frame, "time", "event", fit_options={"precision": 1e-12, "max_steps": 200})
    interaction = simulated["analysis"]["interaction"]
    assert interaction["n"] == 436 and interaction["events"] == int(frame["event"].sum())
    for row in interaction["table"]:
        name = row["name"]
        assert row["coef"] == pytest.approx(fitter.params_[name], abs=1e-6), name
        assert row["se"] == pytest.approx(fitter.standard_errors_[name], abs=1e-6), name
        assert row["p"] == pytest.approx(fitter.summary.loc[name, "p"], abs=1e-6), name
    assert interaction["p"] == pytest.approx(fitter.summary.loc["high_risk:treated", "p"], abs=1e-6)


def test_the_simulated_cohort_shows_the_papers_pattern(simulated):
    analysis = simulated["analysis"]
    assert analysis["n_control"] == 57 and analysis["n_treated"] == 379
    # The paper: control mPFS 5.9 months; high-risk treated like control (HR 0.90, p 0.55).
    assert 4.5 < analysis["control"]["median"] < 7.5
    high = analysis["groups"]["high"]["vs_control"]["hazard_ratio_treated_vs_control"]
    low = analysis["groups"]["low"]["vs_control"]["hazard_ratio_treated_vs_control"]
    assert high["ci_low"] < 1.0 < high["ci_high"]
    assert low["hr"] < 0.6 and low["p"] < 0.01
    assert analysis["groups"]["low"]["treated"]["median"] > analysis["groups"]["high"]["treated"]["median"] + 3
    # The treatment helps the low-risk group more: the interaction term's HR is > 1 (harm of high risk x treated).
    assert analysis["interaction"]["hr"] > 1.5 and analysis["interaction"]["p"] < 0.01


def test_predictive_analysis_says_why_a_comparison_is_missing():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    event = np.array([1, 1, 0, 1, 1, 0], dtype=bool)
    result = predictive_analysis(
        time[:3], event[:3], np.array([True, True, True]), time[3:], event[3:], np.array([True, True, True])
    )
    assert result["groups"]["low"]["vs_control"]["reason"] == "no treated or no control patient"
    assert result["groups"]["low"]["treated"] is None
    assert result["interaction"] is None and "not estimable" in result["reason"]


# --------------------------------------------------------------------------- calibration and Brier score


def _exponential_cohort(n: int, seed: int, rate: float = 0.1):
    rng = np.random.default_rng(seed)
    lp = rng.normal(0.0, 0.8, n)
    time = rng.exponential(1.0 / (rate * np.exp(lp)))
    censor = rng.uniform(6.0, 24.0, n)
    return np.minimum(time, censor), time <= censor, lp


def _exponential_baseline(rate: float = 0.1) -> BaselineSurvival:
    times = tuple(np.linspace(0.1, 24.0, 240))
    return BaselineSurvival(times=times, survival=tuple(np.exp(-rate * np.array(times))), valid_until=24.0, centre=0.0)


def test_calibration_of_the_true_model_has_slope_one_and_intercept_zero():
    time, event, lp = _exponential_cohort(3000, 1)
    summary = calibration_summary(time, event, lp, _exponential_baseline(), (6.0, 12.0))
    assert summary["slope"] == pytest.approx(1.0, abs=0.08)
    assert summary["slope_ci_low"] < 1.0 < summary["slope_ci_high"]
    assert summary["intercept_log_o_e"] == pytest.approx(0.0, abs=0.06)
    assert summary["truncated_at_months"] == 12.0
    # Predictions twice as extreme: slope about 0.5; a doubled baseline hazard: log O/E about -log 2.
    assert calibration_summary(time, event, 2 * lp, _exponential_baseline(), (6.0, 12.0))["slope"] == pytest.approx(
        0.5, abs=0.05
    )
    assert calibration_summary(time, event, lp, _exponential_baseline(0.2), (6.0, 12.0))[
        "intercept_log_o_e"
    ] == pytest.approx(-math.log(2), abs=0.08)


def test_integrated_brier_score_of_an_informative_model_beats_kaplan_meier():
    from sksurv.metrics import integrated_brier_score as sksurv_ibs
    from sksurv.util import Surv

    train_time, train_event, _ = _exponential_cohort(800, 2)
    time, event, lp = _exponential_cohort(600, 3)
    baseline = _exponential_baseline()
    result = integrated_brier_score(train_time, train_event, time, event, baseline, lp, (6.0, 12.0))
    assert result["model"] < result["kaplan_meier"] < 0.25
    grid = np.linspace(result["from_months"], result["to_months"], 50)
    direct = sksurv_ibs(
        Surv.from_arrays(train_event, train_time),
        Surv.from_arrays(event, time),
        np.exp(-0.1 * grid[None, :] * np.exp(lp)[:, None]),
        grid,
    )
    assert result["model"] == pytest.approx(direct, abs=2e-3)  # the baseline is a 0.1-month step function


# --------------------------------------------------------------------------- optimism and PH


@pytest.fixture(scope="module")
def fitted_and_spec():
    spec = TrainingSpec.from_toml(SPEC_TOML + "\n[validation]\nbootstrap = 12\nseed = 3\n")
    train = training_split(simulate_cohort())
    return fit_integrated_model(*train, spec, created="2024-06-01T00:00:00Z"), spec, train


def test_optimism_corrected_c_index_is_below_the_apparent_one_and_reproducible(fitted_and_spec):
    fitted, spec, _ = fitted_and_spec
    result = optimism_corrected(fitted, spec)
    assert result["refit"] == "fixed-alpha" and result["resamples_used"] == 12
    integrated = result["integrated"]
    assert integrated["apparent"] == pytest.approx(fitted.model_mapping["training_summary"]["c_index"])
    assert 0 < integrated["optimism"] < 0.1
    assert integrated["corrected"] == pytest.approx(integrated["apparent"] - integrated["optimism"])
    assert integrated["optimism"] == pytest.approx(
        integrated["mean_bootstrap_apparent"] - integrated["mean_bootstrap_test"]
    )
    assert 0.6 < result["calibration_slope"]["corrected"] < 1.0
    assert optimism_corrected(fitted, spec) == result


@pytest.mark.slow
def test_full_refit_repeats_the_whole_method(fitted_and_spec):
    fitted, spec, train = fitted_and_spec
    full = TrainingSpec.from_toml(SPEC_TOML + "\n[validation]\nbootstrap = 10\nrefit = 'full'\n")
    result = optimism_corrected(fitted, full, train[1])
    assert result["resamples_used"] == 10 and result["integrated"]["optimism"] > 0


def test_proportional_hazards_test_flags_a_time_varying_effect_only():
    rng = np.random.default_rng(4)
    n = 600
    steady, varying = rng.normal(size=n), rng.binomial(1, 0.5, n).astype(float)
    # 'varying' quadruples the hazard in the first 3 months and halves it after: not proportional.
    first = rng.exponential(1.0 / (0.2 * np.exp(0.5 * steady + np.log(4.0) * varying)))
    later = 3.0 + rng.exponential(1.0 / (0.2 * np.exp(0.5 * steady + np.log(0.5) * varying)))
    time = np.where(first < 3.0, first, later)
    censor = rng.uniform(5.0, 20.0, n)
    result = proportional_hazards_test(np.minimum(time, censor), time <= censor, {"steady": steady, "varying": varying})
    rows = {row["name"]: row for row in result["terms"]}
    assert rows["varying"]["p_rank"] < 0.001 and rows["varying"]["p_km"] < 0.001
    assert rows["steady"]["p_rank"] > 0.01
    assert result["smallest_p"] == min(rows["varying"]["p_rank"], rows["varying"]["p_km"])
