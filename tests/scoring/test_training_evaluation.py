"""Evaluation of a frozen model on one split: hand-checked pieces, then a model fitted on the simulated cohort."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sksurv.nonparametric import kaplan_meier_estimator

from sclc_risk_node.scoring.clinical import ClinicalRecord, Lipi
from sclc_risk_node.scoring.model import FrozenModel
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.training import stats
from sclc_risk_node.scoring.training.evaluation import (
    EvaluationDataError,
    bootstrap_c_index,
    calibration,
    decision_curve,
    evaluate_split,
    kaplan_meier_at,
    time_dependent_auc,
)
from sclc_risk_node.scoring.training.method import fit_integrated_model
from sclc_risk_node.scoring.training.spec import EvaluationSettings, TrainingSpec
from sclc_risk_node.scoring.types import FeatureVector
from tests.scoring.model_fixtures import FIXTURE_FEATURES, sealed_model
from tests.scoring.test_training_method import N_TRAIN, SPEC_TOML, simulate_cohort

SETTINGS = EvaluationSettings(seed=11, bootstrap=200)


@pytest.fixture(scope="module")
def cohort():
    return simulate_cohort()


@pytest.fixture(scope="module")
def model(cohort):
    features, records, time, event = cohort
    fitted = fit_integrated_model(
        features.iloc[:N_TRAIN],
        records[:N_TRAIN],
        time[:N_TRAIN],
        event[:N_TRAIN],
        TrainingSpec.from_toml(SPEC_TOML),
        created="2024-06-01T00:00:00Z",
    )
    return fitted.frozen_model()


def held_out(cohort):
    features, records, time, event = cohort
    return features.iloc[N_TRAIN:], records[N_TRAIN:], time[N_TRAIN:], event[N_TRAIN:]


@pytest.fixture(scope="module")
def evaluation(model, cohort):
    train_time, train_event = cohort[2][:N_TRAIN], cohort[3][:N_TRAIN]
    return evaluate_split(
        model, *held_out(cohort), train_time=train_time, train_event=train_event, settings=SETTINGS, split="held-out"
    )


def scores(model, features, records):
    results = [
        apply_model(model, FeatureVector({name: features.iloc[row][name] for name in model.feature_names}), record)
        for row, record in enumerate(records)
    ]
    return np.array([r.radiomics_score for r in results]), np.array([r.risk_score for r in results])


# --------------------------------------------------------------------------- hand-checked pieces


def test_time_dependent_auc_without_censoring_is_the_fraction_of_ordered_case_control_pairs():
    train_time, train_event = np.arange(1.0, 9.0), np.ones(8, dtype=bool)
    time, event = np.arange(1.0, 7.0), np.ones(6, dtype=bool)
    score = np.array([0.9, 0.2, 0.8, 0.5, 0.1, 0.3])
    # cases (PFS <= 3.5): 0.9, 0.2, 0.8; controls: 0.5, 0.1, 0.3 -> 3 + 1 + 3 of 9 pairs ordered.
    auc, reason = time_dependent_auc(train_time, train_event, time, event, score, 3.5)
    assert reason is None and auc == pytest.approx(7 / 9)


def test_time_dependent_auc_weights_cases_by_the_training_censoring_distribution():
    # Training censoring KM G: 1 before month 2, 3/4 from month 2 (one of 4 at risk censored).
    train_time, train_event = np.array([1.0, 2, 3, 4, 5]), np.array([True, False, True, True, True])
    time, event = np.array([1.0, 3, 4, 5]), np.array([True, True, False, True])
    score = np.array([0.5, 0.9, 0.7, 0.1])
    # case at 1 (weight 1) beats 1 of 2 controls; case at 3 (weight 4/3) beats both.
    expected = (1 * 1 + 4 / 3 * 2) / ((1 + 4 / 3) * 2)
    auc, reason = time_dependent_auc(train_time, train_event, time, event, score, 3.5)
    assert reason is None and auc == pytest.approx(expected) == pytest.approx(11 / 14)


def test_time_dependent_auc_beyond_follow_up_is_none_with_a_reason():
    time, event = np.array([1.0, 3, 4, 5]), np.array([True, True, False, True])
    auc, reason = time_dependent_auc(time, event, time, event, np.array([0.5, 0.9, 0.7, 0.1]), 6.0)
    assert auc is None and "beyond this split's follow-up (longest 5 months)" in reason
    auc, reason = time_dependent_auc(time, event, time, event, np.array([0.5, 0.9, 0.7, 0.1]), 0.5)
    assert auc is None and "before this split's first observation" in reason


def test_decision_curve_without_censoring_is_true_minus_weighted_false_positives():
    # Progression by month 6 for the first five patients; the others are followed past 6 months.
    time = np.array([1.0, 2, 3, 4, 5, 7, 8, 9, 10, 11])
    event = np.array([True] * 5 + [True, False, True, False, True])
    risk = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.7, 0.1, 0.4, 0.35, 0.05])
    curve = decision_curve(time, event, risk, 6.0, thresholds=(0.25, 0.5, 0.95))
    assert curve["prevalence"] == pytest.approx(0.5)
    # pt 0.25: 7 treated, 4 progressed -> 4/10 - 3/10 * (1/3); pt 0.5: 3/10 - 1/10; pt 0.95: nobody treated.
    assert curve["net_benefit_model"] == pytest.approx([0.4 - 0.3 / 3, 0.2, 0.0])
    assert curve["net_benefit_treat_all"] == pytest.approx([0.5 - 0.5 / 3, 0.0, 0.5 - 0.5 * 19])
    assert curve["net_benefit_treat_none"] == [0.0, 0.0, 0.0]


def test_kaplan_meier_at_carries_the_last_value_and_is_one_before_the_first_time():
    time, event = np.array([1.0, 2, 3, 4]), np.array([True, False, True, False])
    assert kaplan_meier_at(time, event, 0.5)[0] == 1.0
    assert kaplan_meier_at(time, event, 3.0)[0] == pytest.approx(0.75 * 0.5)
    assert kaplan_meier_at(time, event, 10.0)[0] == pytest.approx(0.75 * 0.5)


def test_bootstrap_is_percentile_and_reproducible_with_the_seed():
    rng = np.random.default_rng(0)
    time, event = rng.exponential(5, 80), rng.random(80) < 0.7
    score = -time + rng.normal(0, 3, 80)
    first = bootstrap_c_index(time, event, {"s": score}, 300, seed=5)["s"]
    again = bootstrap_c_index(time, event, {"s": score}, 300, seed=5)["s"]
    other = bootstrap_c_index(time, event, {"s": score}, 300, seed=6)["s"]
    assert first == again and first["ci_low"] != other["ci_low"]
    replicates = [value for value in first["replicates"] if value is not None]
    assert (first["ci_low"], first["ci_high"]) == tuple(np.percentile(replicates, [2.5, 97.5]))
    assert first["ci_low"] < first["estimate"] < first["ci_high"]
    assert first["resamples"] == first["resamples_used"] == 300


# --------------------------------------------------------------------------- a fitted model on a held-out split


def test_integrated_model_beats_radiomics_alone_on_held_out_patients(evaluation):
    radiomics, integrated = evaluation.radiomics["c_index"], evaluation.integrated["c_index"]
    assert integrated["estimate"] > radiomics["estimate"] > 0.6
    difference = evaluation.comparison["c_index_integrated_minus_radiomics"]
    assert difference["estimate"] == pytest.approx(integrated["estimate"] - radiomics["estimate"])
    assert difference["ci_low"] < difference["estimate"] < difference["ci_high"]


def test_c_index_matches_harrell_and_its_ci_contains_it(evaluation, model, cohort):
    from sksurv.metrics import concordance_index_censored

    features, records, time, event = held_out(cohort)
    radiomics, risk = scores(model, features, records)
    assert evaluation.radiomics["c_index"]["estimate"] == concordance_index_censored(event, time, radiomics)[0]
    assert evaluation.integrated["c_index"]["estimate"] == concordance_index_censored(event, time, risk)[0]
    for block in (evaluation.radiomics, evaluation.integrated):
        c = block["c_index"]
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"] and c["resamples"] == 200


def test_evaluation_is_reproducible_with_the_seed(evaluation, model, cohort):
    train_time, train_event = cohort[2][:N_TRAIN], cohort[3][:N_TRAIN]
    again = evaluate_split(
        model, *held_out(cohort), train_time=train_time, train_event=train_event, settings=SETTINGS, split="held-out"
    )
    assert again.as_dict() == evaluation.as_dict()
    reseeded = evaluate_split(
        model,
        *held_out(cohort),
        train_time=train_time,
        train_event=train_event,
        settings=EvaluationSettings(seed=12, bootstrap=200),
        split="held-out",
    )
    assert reseeded.integrated["c_index"]["ci_low"] != evaluation.integrated["c_index"]["ci_low"]
    assert reseeded.integrated["c_index"]["estimate"] == evaluation.integrated["c_index"]["estimate"]


def test_time_dependent_auc_at_6_and_12_months(evaluation):
    for block in (evaluation.radiomics, evaluation.integrated):
        assert [row["months"] for row in block["time_dependent_auc"]] == [6.0, 12.0]
        for row in block["time_dependent_auc"]:
            assert row["reason"] is None and 0.5 < row["auc"] <= 1.0


def test_risk_groups_agree_with_scoring_stats(evaluation, model, cohort):
    features, records, time, event = held_out(cohort)
    _, risk = scores(model, features, records)
    high = risk > model.risk_cutoff
    frame = pd.DataFrame(
        {"time": time, "event": event, "group": np.where(high, "high", "low"), "high": high.astype(float)}
    )
    km = stats.kaplan_meier(frame, "time", "event", "group")["groups"]
    groups = evaluation.integrated["risk_groups"]
    for label in ("low", "high"):
        got = groups["groups"][label]
        assert {key: got[key] for key in ("n", "events", "median", "ci_low", "ci_high")} == km[label]
        curve = got["curve"]
        members = frame["group"] == label
        expected_times, expected_survival = kaplan_meier_estimator(event[members], time[members])
        assert curve["time"] == [0.0, *expected_times] and curve["survival"] == [1.0, *expected_survival]
        assert len(curve["censored_time"]) == int((~event[members]).sum())
    assert groups["logrank"]["p"] == stats.logrank(frame, "time", "event", "group")["p"]
    cox = stats.cox_fit(frame, "time", "event", ["high"]).coefficients["high"]
    hr = groups["hazard_ratio_high_vs_low"]
    assert (hr["hr"], hr["ci_low"], hr["ci_high"], hr["p"]) == (cox.hr, cox.ci_low, cox.ci_high, cox.p)
    assert hr["hr"] > 1 and groups["hazard_ratio_low_vs_high"]["hr"] == pytest.approx(1 / hr["hr"])
    assert groups["hazard_ratio_low_vs_high"]["ci_high"] == pytest.approx(1 / hr["ci_low"])


def test_calibration_points_are_probabilities_in_equal_groups(evaluation, model, cohort):
    for block in (evaluation.radiomics, evaluation.integrated):
        for entry in block["calibration"]:
            assert entry["reason"] is None
            groups = entry["groups"]
            assert len(groups) == 4  # quartiles for 100 patients
            assert sum(group["n"] for group in groups) == 100 and {group["n"] for group in groups} == {25}
            predicted = [group["predicted"] for group in groups]
            assert predicted == sorted(predicted)
            for group in groups:
                for key in ("predicted", "observed", "observed_ci_low", "observed_ci_high"):
                    assert group[key] is None or 0.0 <= group[key] <= 1.0
    # Deciles from 200 patients on.
    features, records, time, event = cohort
    _, risk = scores(model, features.iloc[:N_TRAIN], records[:N_TRAIN])
    pfs = np.array([model.baseline_survival.survival_at(6.0, lp) for lp in risk])
    assert len(calibration(time[:N_TRAIN], event[:N_TRAIN], pfs, 6.0)["groups"]) == 10


def test_decision_curve_reference_strategies(evaluation, model, cohort):
    features, records, time, event = held_out(cohort)
    _, risk = scores(model, features, records)
    for months, curve in zip((6.0, 12.0), evaluation.integrated["decision_curve"]):
        km_times, km_survival = kaplan_meier_estimator(event, time)
        prevalence = 1.0 - km_survival[np.searchsorted(km_times, months, side="right") - 1]
        thresholds = np.array(curve["thresholds"])
        assert thresholds[0] == 0.01 and thresholds[-1] == 0.99 and len(thresholds) == 99
        assert curve["prevalence"] == pytest.approx(prevalence)
        assert curve["net_benefit_treat_none"] == [0.0] * 99
        np.testing.assert_allclose(
            curve["net_benefit_treat_all"], prevalence - (1 - prevalence) * thresholds / (1 - thresholds)
        )
        predicted_risk = np.array([1 - model.baseline_survival.survival_at(months, lp) for lp in risk])
        model_nb = np.array(curve["net_benefit_model"])
        below_everyone = thresholds < predicted_risk.min()
        np.testing.assert_allclose(model_nb[below_everyone], np.array(curve["net_benefit_treat_all"])[below_everyone])
        assert np.all(model_nb[thresholds >= predicted_risk.max()] == 0.0)


def test_result_is_clean_json(evaluation):
    data = evaluation.as_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data

    def check(value):
        if isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, list):
            for item in value:
                check(item)
        else:
            assert value is None or type(value) in (str, int, float, bool)
            assert not (isinstance(value, float) and not math.isfinite(value))

    check(data)
    assert data["split"] == "held-out" and data["n"] == 100 and data["model"]["sha256"]


def test_horizon_beyond_follow_up_is_none_with_a_reason(model, cohort):
    train_time, train_event = cohort[2][:N_TRAIN], cohort[3][:N_TRAIN]
    result = evaluate_split(
        model,
        *held_out(cohort),
        train_time=train_time,
        train_event=train_event,
        settings=EvaluationSettings(seed=1, bootstrap=20, horizons_months=(12.0, 30.0)),
    )
    auc = result.integrated["time_dependent_auc"]
    assert auc[0]["auc"] is not None and auc[1]["auc"] is None and "30 months is beyond" in auc[1]["reason"]
    assert result.integrated["calibration"][1]["groups"] is None and result.integrated["calibration"][1]["reason"]
    assert result.integrated["decision_curve"][1]["reason"]


# --------------------------------------------------------------------------- other models, bad input


def test_model_without_radiomics_only_baseline_has_no_radiomics_probabilities():
    model = FrozenModel.from_mapping(sealed_model())
    rng = np.random.default_rng(3)
    n = 60
    features = pd.DataFrame(
        {
            f"{region}.{image_type}_{feature_class}_{feature}": rng.normal(mean, sd, n)
            for region, image_type, feature_class, feature, mean, sd, _ in FIXTURE_FEATURES
        }
    )
    records = [
        ClinicalRecord(
            t_stage=str(rng.choice(["T2", "T4"])),
            n_stage="N2",
            m_stage="M1c",
            ecog=int(rng.choice([0, 1, 2])),
            lipi=Lipi(int(rng.choice([0, 1, 2]))),
            lipi_source="given",
            patient_id=f"F{i}",
        )
        for i in range(n)
    ]
    time, event = rng.uniform(1, 17, n), rng.random(n) < 0.6
    result = evaluate_split(
        model,
        features,
        records,
        time,
        event,
        train_time=time,
        train_event=event,
        settings=EvaluationSettings(seed=1, bootstrap=20),
    )
    for entry in result.radiomics["calibration"] + result.radiomics["decision_curve"]:
        assert "radiomics_only_cox" in entry["reason"]
    assert all(entry["reason"] is None for entry in result.integrated["calibration"])


def test_missing_model_feature_is_named(model, cohort):
    features, records, time, event = held_out(cohort)
    dropped = features.drop(columns=[model.feature_names[0]])
    with pytest.raises(EvaluationDataError, match=f"lacks model feature: {model.feature_names[0]}"):
        evaluate_split(model, dropped, records, time, event, train_time=time, train_event=event, settings=SETTINGS)


def test_bootstrap_survives_resamples_without_events_or_comparable_pairs():
    from sclc_risk_node.scoring.training.evaluation import bootstrap_c_index

    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    event = np.array([True, False, False, False, False, False, False, False, False])
    score = np.linspace(1.0, 0.0, 9)
    result = bootstrap_c_index(time, event, {"risk": score}, resamples=200, seed=3)["risk"]
    assert result["estimate"] == 1.0
    assert None in result["replicates"], "some resamples hold no event"
    assert all(r is None or 0.0 <= r <= 1.0 for r in result["replicates"])
    assert result["resamples_used"] == sum(r is not None for r in result["replicates"])
    assert result["ci_low"] is not None and result["ci_low"] <= result["ci_high"]


def test_scores_given_once_give_the_same_evaluation(evaluation, model, cohort):
    """A caller that scored the patients (score_patients) hands the scores in; nothing is scored twice."""
    from sclc_risk_node.scoring.training.evaluation import score_patients

    train_time, train_event = cohort[2][:N_TRAIN], cohort[3][:N_TRAIN]
    features, records, time, event = held_out(cohort)
    given = score_patients(model, features, records)
    radiomics, risk = scores(model, features, records)
    np.testing.assert_array_equal(given.radiomics, radiomics)
    np.testing.assert_array_equal(given.risk, risk)
    again = evaluate_split(
        model,
        features,
        records,
        time,
        event,
        train_time=train_time,
        train_event=train_event,
        settings=SETTINGS,
        split="held-out",
        scores=given,
    )
    assert again.as_dict() == evaluation.as_dict()
    with pytest.raises(EvaluationDataError, match="patient scores for"):
        evaluate_split(
            model,
            features,
            records,
            time,
            event,
            train_time=train_time,
            train_event=train_event,
            settings=SETTINGS,
            scores=type(given)(radiomics=given.radiomics[1:], risk=given.risk[1:]),
        )
