"""Evaluate a frozen model on one split: the paper's Table 3 and Figures 4-6 as data.

`evaluate_split` scores every patient of a split (training, a validation set,
the chemotherapy-only control group ...) with the frozen model, exactly as the
node does (`scoring.risk.apply_model`), and reports the radiomics model
(radiomics score, its cut-off) and the integrated model (risk score, risk
cut-off) side by side:

* **Harrell's C** (scikit-survival ``concordance_index_censored``) with a
  percentile bootstrap 95% CI: ``bootstrap`` resamples of the patients with
  replacement (numpy ``default_rng(seed)``), the 2.5th and 97.5th percentiles
  (numpy's default linear interpolation).  Both models are scored on the same
  resamples, which also gives a paired CI for the difference in C.  Resamples
  without a comparable pair are skipped and counted.
* **Time-dependent AUC** at each horizon: cumulative/dynamic AUC with inverse
  probability of censoring weights (Uno et al. 2007; scikit-survival
  ``cumulative_dynamic_auc``), the censoring distribution estimated on the
  *training* split (``train_time``/``train_event``).  None with a reason when
  the horizon is beyond the split's follow-up, when there is no case or no
  control, or when the training censoring distribution does not reach a case.
* **Kaplan-Meier by risk group** (HIGH if score > cut-off, as the node):
  step curves for plotting, median PFS with 95% CI (`scoring.training.stats.kaplan_meier`,
  R's ``print(survfit)``), the log-rank p (`scoring.training.stats.logrank`) and the Cox
  hazard ratio of HIGH vs LOW with 95% CI and Wald p (`scoring.training.stats.cox_fit`);
  the paper quotes LOW vs HIGH, which is given too (the reciprocal).
* **Calibration** at each horizon: patients are ranked by predicted PFS
  probability S(t | x) and cut into equal-sized groups (deciles when n >= 200,
  else quartiles); each group gives its mean predicted S(t) and the observed
  Kaplan-Meier S(t) with a 95% log-log CI.
* **Decision curve** at each horizon (Vickers, Cronin, Elkin & Gönen, BMC Med
  Inform Decis Mak 2008;8:53, survival extension): "treat" a patient if the
  predicted risk of progression by t, 1 - S(t | x), is above the threshold pt
  (strictly, as their ``stdca``), for pt = 0.01, 0.02, ..., 0.99.  With
  pi = fraction treated and S+(t) the Kaplan-Meier PFS at t among the treated::

      net benefit(pt) = pi * (1 - S+(t)) - pi * S+(t) * pt / (1 - pt)
      treat all:        (1 - S(t)) - S(t) * pt / (1 - pt)     (S = KM of the whole split)
      treat none:       0

  i.e. true positives minus false positives weighted by the odds at the
  threshold, both counted with the Kaplan-Meier estimate so that censored
  patients are handled.

* **Calibration slope and intercept** (`calibration_summary`): the slope is
  the Cox coefficient of the model's linear predictor refitted in the split
  (van Houwelingen; 1 = ideal, < 1 = predictions too extreme); the intercept
  is calibration-in-the-large, log(O/E) with O the observed events and E the
  expected ones, sum of H0(min(t_i, horizon)) * exp(lp_i - centre) with
  H0 = -log S0 the model's baseline cumulative hazard and t_i each patient's
  follow-up truncated at the last horizon (Crowson, Atkinson & Therneau,
  Stat Methods Med Res 2016;25:1692; 0 = ideal, > 0 = more events than
  predicted).  At each horizon also the mean predicted S(t) and the
  Kaplan-Meier S(t) of the whole split.
* **Integrated Brier score** (`integrated_brier_score`): scikit-survival's
  ``integrated_brier_score`` (IPCW from the training split) of the predicted
  PFS curve over 50 equally spaced times from the split's first observation
  to the last horizon (or the split's last follow-up, if earlier), beside the
  same score of the training Kaplan-Meier curve given to everyone (the
  no-covariate reference; a useful model has the lower score).
* **Predictive analysis** (`predictive_analysis`, the paper's Figure 7), for
  a ``control`` split treated otherwise: within each risk group, Kaplan-Meier
  PFS of treated vs control patients, the HR treated vs control (Cox, Wald)
  and the log-rank p; and the Cox model ``high + treated + high:treated`` on
  all of them, whose interaction term tests whether the treatment effect
  differs between the risk groups.

Kaplan-Meier values at t (calibration, decision curve) carry the last value
forward past a group's last observation (R's ``summary(survfit, extend=TRUE)``);
horizons beyond the whole split's follow-up are None with a reason.

Predicted probabilities need a baseline survival.  The integrated model has its
Breslow baseline in the model file; the radiomics model has one only when the
model was fitted by `scoring.training.method` (``training_summary.radiomics_only_cox``),
otherwise its calibration and decision curve are None with a reason.

The result (`SplitEvaluation.as_dict`) is plain JSON data: no numpy types, and
None wherever a number is undefined (never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError
from sclc_risk_node.scoring.model import BaselineSurvival, FrozenModel
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.training import stats
from sclc_risk_node.scoring.training.spec import EvaluationSettings
from sclc_risk_node.scoring.types import FeatureVector

__all__ = [
    "DCA_THRESHOLDS",
    "EvaluationDataError",
    "SplitEvaluation",
    "bootstrap_c_index",
    "calibration",
    "calibration_summary",
    "integrated_brier_score",
    "predictive_analysis",
    "calibration_group_count",
    "decision_curve",
    "evaluate_split",
    "kaplan_meier_at",
    "PatientScores",
    "risk_group_survival",
    "score_patients",
    "time_dependent_auc",
]

#: Threshold probabilities of the decision curve.
DCA_THRESHOLDS = tuple(round(k / 100, 2) for k in range(1, 100))


class EvaluationDataError(InputError):
    """A split cannot be evaluated as given; the message says why."""


# --------------------------------------------------------------------------- plain JSON


def plain_json(value: Any) -> Any:
    """Nested data with numpy scalars made Python, tuples made lists and non-finite floats made None."""
    if isinstance(value, Mapping):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_json(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------- survival helpers


def kaplan_meier_at(time: np.ndarray, event: np.ndarray, months: float) -> tuple[float, float | None, float | None]:
    """Kaplan-Meier PFS at ``months`` with its 95% log-log CI (None where undefined).

    The curve's last value is carried forward past the last observation.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    if len(time) == 0:
        raise ValueError("no patients")
    times, survival, interval = kaplan_meier_estimator(event, time, conf_type="log-log")
    steps = int(np.searchsorted(times, months, side="right"))
    if steps == 0:
        return 1.0, None, None
    low, high = float(interval[0, steps - 1]), float(interval[1, steps - 1])
    return float(survival[steps - 1]), (low if math.isfinite(low) else None), (high if math.isfinite(high) else None)


def _baseline_cumulative_hazard(baseline: BaselineSurvival, months: np.ndarray) -> np.ndarray:
    """H0(t) = -log S0(t) at each time (S0 a right-continuous step function, 1 before its first step)."""
    times = np.asarray(baseline.times, dtype=float)
    survival = np.asarray(baseline.survival, dtype=float)
    steps = np.searchsorted(times, months, side="right")
    with np.errstate(divide="ignore"):
        return np.where(steps == 0, 0.0, -np.log(survival[np.maximum(steps - 1, 0)]))


def calibration_summary(
    time: np.ndarray,
    event: np.ndarray,
    linear_predictor: np.ndarray,
    baseline: BaselineSurvival,
    horizons: Sequence[float],
) -> dict[str, Any]:
    """Calibration slope (Cox coefficient of the lp) and intercept (log O/E), module docstring."""
    result: dict[str, Any] = {
        "slope": None,
        "slope_ci_low": None,
        "slope_ci_high": None,
        "slope_p_vs_1": None,
        "intercept_log_o_e": None,
        "observed_events": None,
        "expected_events": None,
        "truncated_at_months": None,
        "horizons": [],
        "reason": None,
    }
    horizon = min(max(horizons), baseline.valid_until)
    follow = np.minimum(time, horizon)
    observed = int(np.sum(event & (time <= horizon)))
    expected = float(np.sum(_baseline_cumulative_hazard(baseline, follow) * np.exp(linear_predictor - baseline.centre)))
    result.update(observed_events=observed, expected_events=expected, truncated_at_months=horizon)
    if observed > 0 and expected > 0:
        result["intercept_log_o_e"] = math.log(observed / expected)
    for months in horizons:
        if months > baseline.valid_until or months > time.max():
            continue
        predicted = _predicted_pfs(baseline, linear_predictor, months)
        km, low, high = kaplan_meier_at(time, event, months)
        result["horizons"].append(
            {
                "months": months,
                "mean_predicted": float(predicted.mean()),
                "observed": km,
                "observed_ci_low": low,
                "observed_ci_high": high,
            }
        )
    if np.ptp(linear_predictor) == 0 or not event.any():
        result["reason"] = "the linear predictor is constant or there is no event"
        return result
    frame = pd.DataFrame({"time": time, "event": event, "lp": linear_predictor})
    try:
        fit = stats.cox_fit(frame, "time", "event", ["lp"]).coefficients["lp"]
    except stats.CoxFitError as exc:
        result["reason"] = f"slope not estimable: {exc}"
        return result
    from scipy.stats import norm

    result.update(
        slope=fit.coef,
        slope_ci_low=fit.coef - 1.959963984540054 * fit.se,
        slope_ci_high=fit.coef + 1.959963984540054 * fit.se,
        slope_p_vs_1=float(2 * norm.sf(abs(fit.coef - 1.0) / fit.se)),
    )
    return result


def integrated_brier_score(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    baseline: BaselineSurvival,
    linear_predictor: np.ndarray,
    horizons: Sequence[float],
) -> dict[str, Any]:
    """IBS of the model's PFS curves and of the training Kaplan-Meier curve (module docstring)."""
    from sksurv.metrics import integrated_brier_score as sksurv_ibs
    from sksurv.nonparametric import kaplan_meier_estimator

    start = float(time.min())
    end = min(
        float(max(horizons)), baseline.valid_until, float(time.max()) * (1 - 1e-9), float(train_time.max()) * (1 - 1e-9)
    )
    result: dict[str, Any] = {
        "model": None,
        "kaplan_meier": None,
        "from_months": start,
        "to_months": end,
        "times": 50,
        "reason": None,
    }
    if end <= start:
        result["reason"] = f"no time window: the split's observations span {start:g}-{time.max():g} months"
        return result
    grid = np.linspace(start, end, 50)
    predicted = np.array([[baseline.survival_at(t, lp) for t in grid] for lp in linear_predictor])
    km_times, km_survival = kaplan_meier_estimator(train_event, train_time)
    steps = np.searchsorted(km_times, grid, side="right")
    reference = np.where(steps == 0, 1.0, km_survival[np.maximum(steps - 1, 0)])
    try:
        result["model"] = float(
            sksurv_ibs(stats.survival_y(train_time, train_event), stats.survival_y(time, event), predicted, grid)
        )
        result["kaplan_meier"] = float(
            sksurv_ibs(
                stats.survival_y(train_time, train_event),
                stats.survival_y(time, event),
                np.tile(reference, (len(time), 1)),
                grid,
            )
        )
    except ValueError as exc:
        result["reason"] = f"not computable here ({exc})"
    return result


def _arm_comparison(time: np.ndarray, event: np.ndarray, treated: np.ndarray) -> dict[str, Any]:
    """HR treated vs control (Cox, Wald) and log-rank p among the given patients."""
    entry: dict[str, Any] = {
        "n_treated": int(treated.sum()),
        "n_control": int((~treated).sum()),
        "hazard_ratio_treated_vs_control": None,
        "logrank": None,
        "reason": None,
    }
    if not treated.any() or treated.all():
        entry["reason"] = "no treated or no control patient"
        return entry
    if not event.any():
        entry["reason"] = "no events"
        return entry
    frame = pd.DataFrame(
        {"time": time, "event": event, "treated": treated.astype(float), "arm": np.where(treated, "treated", "control")}
    )
    test = stats.logrank(frame, "time", "event", "arm")
    entry["logrank"] = {"chi2": test["chi2"], "df": test["df"], "p": test["p"]}
    try:
        cox = stats.cox_fit(frame, "time", "event", ["treated"]).coefficients["treated"]
    except stats.CoxFitError as exc:
        entry["reason"] = f"hazard ratio not estimable: {exc}"
        return entry
    entry["hazard_ratio_treated_vs_control"] = {"hr": cox.hr, "ci_low": cox.ci_low, "ci_high": cox.ci_high, "p": cox.p}
    return entry


def _km_block(time: np.ndarray, event: np.ndarray) -> dict[str, Any] | None:
    if not len(time):
        return None
    km = stats.kaplan_meier(pd.DataFrame({"t": time, "e": event}), "t", "e")["groups"]["all"]
    return {**km, "curve": _km_curve(time, event)}


def predictive_analysis(
    treated_time: np.ndarray,
    treated_event: np.ndarray,
    treated_high: np.ndarray,
    control_time: np.ndarray,
    control_event: np.ndarray,
    control_high: np.ndarray,
) -> dict[str, Any]:
    """Treated risk groups vs control, and the risk-group x treatment interaction (module docstring).

    ``groups[high|low]``: Kaplan-Meier of the treated patients of that risk
    group; ``vs_control`` compares them with the whole control group (the
    paper's Figure 7: three curves, high-risk treated, low-risk treated,
    control); ``vs_control_same_risk`` with the control patients the model
    puts in the same risk group (the comparison the interaction test makes).
    """
    time = np.concatenate([treated_time, control_time]).astype(float)
    event = np.concatenate([treated_event, control_event]).astype(bool)
    high = np.concatenate([treated_high, control_high]).astype(bool)
    treated = np.concatenate([np.ones(len(treated_time), bool), np.zeros(len(control_time), bool)])
    result: dict[str, Any] = {
        "n_treated": int(len(treated_time)),
        "n_control": int(len(control_time)),
        "control": _km_block(time[~treated], event[~treated]),
        "groups": {},
        "interaction": None,
        "reason": None,
    }
    for label, members in (("high", high), ("low", ~high)):
        in_group_treated = members & treated
        versus_all = in_group_treated | ~treated
        result["groups"][label] = {
            "treated": _km_block(time[in_group_treated], event[in_group_treated]),
            "control_same_risk": _km_block(time[members & ~treated], event[members & ~treated]),
            "vs_control": _arm_comparison(time[versus_all], event[versus_all], treated[versus_all]),
            "vs_control_same_risk": _arm_comparison(time[members], event[members], treated[members]),
        }
    frame = pd.DataFrame(
        {
            "time": time,
            "event": event,
            "high_risk": high.astype(float),
            "treated": treated.astype(float),
            "high_risk:treated": (high & treated).astype(float),
        }
    )
    try:
        fit = stats.cox_fit(frame, "time", "event", ["high_risk", "treated", "high_risk:treated"])
    except (stats.CoxFitError, stats.SurvivalDataError) as exc:
        result["reason"] = f"interaction model not estimable: {exc}"
        return result
    table = fit.table()
    term = fit.coefficients["high_risk:treated"]
    result["interaction"] = {
        "model": "Cox (Efron ties): high_risk + treated + high_risk:treated",
        "table": table,
        "coef": term.coef,
        "hr": term.hr,
        "ci_low": term.ci_low,
        "ci_high": term.ci_high,
        "p": term.p,
        "n": fit.n,
        "events": fit.events,
    }
    return result


def bootstrap_c_index(
    time: np.ndarray, event: np.ndarray, scores: Mapping[str, np.ndarray], resamples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Harrell's C of each score with a percentile bootstrap 95% CI, on shared resamples.

    Returns ``{name: {"estimate", "ci_low", "ci_high", "resamples", "resamples_used", "replicates"}}``;
    ``replicates`` holds each resample's C (None without a comparable pair), in resample order.
    """
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(time), size=(resamples, len(time)))
    result = {}
    for name, score in scores.items():
        estimate = stats.harrell_c(time, event, score)
        replicates = [stats.harrell_c(time[index], event[index], score[index]) for index in indices]
        used = np.array([value for value in replicates if value is not None], dtype=float)
        low, high = np.percentile(used, [2.5, 97.5]) if used.size else (None, None)
        result[name] = {
            "estimate": estimate,
            "ci_low": low,
            "ci_high": high,
            "resamples": resamples,
            "resamples_used": int(used.size),
            "replicates": replicates,
        }
    return result


def time_dependent_auc(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    score: np.ndarray,
    months: float,
) -> tuple[float | None, str | None]:
    """Cumulative/dynamic AUC at ``months`` (IPCW from the training split); (None, reason) if undefined."""
    from sksurv.metrics import cumulative_dynamic_auc

    if months >= time.max():
        return None, f"horizon {months:g} months is beyond this split's follow-up (longest {time.max():g} months)"
    if months < time.min():
        return None, f"horizon {months:g} months is before this split's first observation ({time.min():g} months)"
    cases = int(np.sum(event & (time <= months)))
    controls = int(np.sum(time > months))
    if cases == 0 or controls == 0:
        return None, f"{cases} cases (progressed by {months:g} months) and {controls} controls; need at least one each"
    # Only cases carry weights; dropping the event flag of patients still
    # progression-free at the horizon leaves the AUC unchanged and spares them
    # a censoring weight the training follow-up may not reach.
    masked_event = event & (time <= months)
    try:
        auc, _ = cumulative_dynamic_auc(
            stats.survival_y(train_time, train_event), stats.survival_y(time, masked_event), score, [months]
        )
    except ValueError as exc:
        return None, f"censoring weights from the training split are undefined here ({exc})"
    value = float(auc[0])
    return (value, None) if math.isfinite(value) else (None, "AUC is undefined (no weighted cases)")


def _km_curve(time: np.ndarray, event: np.ndarray) -> dict[str, list[float]]:
    from sksurv.nonparametric import kaplan_meier_estimator

    times, survival = kaplan_meier_estimator(event, time)
    censored = np.sort(time[~event])
    at_censored = survival[np.searchsorted(times, censored, side="right") - 1] if censored.size else []
    return {
        "time": [0.0, *times],
        "survival": [1.0, *survival],
        "censored_time": list(censored),
        "censored_survival": list(at_censored),
    }


def risk_group_survival(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> dict[str, Any]:
    """Kaplan-Meier curves, medians, log-rank and HR of HIGH vs LOW for a risk grouping."""
    frame = pd.DataFrame(
        {"time": time, "event": event, "group": np.where(high, "high", "low"), "high_risk": high.astype(float)}
    )
    km = stats.kaplan_meier(frame, "time", "event", "group")["groups"]
    groups: dict[str, dict[str, Any]] = {}
    for label in ("low", "high"):
        members = frame["group"].to_numpy() == label
        if not members.any():
            groups[label] = {"n": 0, "events": 0, "median": None, "ci_low": None, "ci_high": None, "curve": None}
            continue
        groups[label] = {**km[label], "curve": _km_curve(time[members], event[members])}
    result: dict[str, Any] = {
        "groups": groups,
        "logrank": None,
        "hazard_ratio_high_vs_low": None,
        "hazard_ratio_low_vs_high": None,
        "reason": None,
    }
    if not (high.any() and (~high).any()):
        result["reason"] = "every patient is in one risk group"
        return result
    if not event.any():
        result["reason"] = "no events"
        return result
    test = stats.logrank(frame, "time", "event", "group")
    result["logrank"] = {"chi2": test["chi2"], "df": test["df"], "p": test["p"]}
    try:
        cox = stats.cox_fit(frame, "time", "event", ["high_risk"]).coefficients["high_risk"]
    except stats.CoxFitError as exc:
        result["reason"] = f"hazard ratio not estimable: {exc}"
        return result
    result["hazard_ratio_high_vs_low"] = {"hr": cox.hr, "ci_low": cox.ci_low, "ci_high": cox.ci_high, "p": cox.p}
    result["hazard_ratio_low_vs_high"] = {
        "hr": 1.0 / cox.hr,
        "ci_low": 1.0 / cox.ci_high,
        "ci_high": 1.0 / cox.ci_low,
        "p": cox.p,
    }
    return result


def calibration_group_count(n: int) -> int:
    """Deciles when every group can hold about 20 patients (n >= 200), else quartiles."""
    return 10 if n >= 200 else 4


def calibration(
    time: np.ndarray, event: np.ndarray, predicted_pfs: np.ndarray, months: float, groups: int | None = None
) -> dict[str, Any]:
    """Mean predicted S(t) vs observed Kaplan-Meier S(t) in groups of equal size ranked by prediction."""
    groups = groups or calibration_group_count(len(time))
    if len(time) < 2 * groups:
        return {"months": months, "groups": None, "reason": f"{len(time)} patients are too few for {groups} groups"}
    order = np.argsort(predicted_pfs, kind="mergesort")
    points = []
    for members in np.array_split(order, groups):
        observed, low, high = kaplan_meier_at(time[members], event[members], months)
        points.append(
            {
                "n": int(members.size),
                "events": int(event[members].sum()),
                "predicted": float(predicted_pfs[members].mean()),
                "predicted_min": float(predicted_pfs[members].min()),
                "predicted_max": float(predicted_pfs[members].max()),
                "observed": observed,
                "observed_ci_low": low,
                "observed_ci_high": high,
            }
        )
    return {"months": months, "groups": points, "reason": None}


def decision_curve(
    time: np.ndarray,
    event: np.ndarray,
    predicted_risk: np.ndarray,
    months: float,
    thresholds: Sequence[float] = DCA_THRESHOLDS,
) -> dict[str, Any]:
    """Net benefit of the model, treat-all and treat-none at ``months`` (module docstring formula)."""
    overall, _, _ = kaplan_meier_at(time, event, months)
    prevalence = 1.0 - overall
    n = len(time)
    model, treat_all = [], []
    for threshold in thresholds:
        odds = threshold / (1.0 - threshold)
        treated = predicted_risk > threshold
        fraction = treated.sum() / n
        if fraction == 0:
            model.append(0.0)
        else:
            survival_treated, _, _ = kaplan_meier_at(time[treated], event[treated], months)
            model.append(fraction * (1.0 - survival_treated) - fraction * survival_treated * odds)
        treat_all.append(prevalence - (1.0 - prevalence) * odds)
    return {
        "months": months,
        "prevalence": prevalence,
        "thresholds": list(thresholds),
        "net_benefit_model": model,
        "net_benefit_treat_all": treat_all,
        "net_benefit_treat_none": [0.0] * len(thresholds),
        "reason": None,
    }


# --------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class SplitEvaluation:
    """One split's evaluation; `as_dict` is its JSON form (see the module docstring for the contents)."""

    split: str
    n: int
    events: int
    median_follow_up_months: float | None
    horizons_months: tuple[float, ...]
    model: Mapping[str, Any]
    settings: Mapping[str, Any]
    radiomics: Mapping[str, Any]
    integrated: Mapping[str, Any]
    comparison: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        as_plain: dict[str, Any] = plain_json(
            {
                "split": self.split,
                "n": self.n,
                "events": self.events,
                "median_follow_up_months": self.median_follow_up_months,
                "horizons_months": list(self.horizons_months),
                "model": self.model,
                "settings": self.settings,
                "radiomics": self.radiomics,
                "integrated": self.integrated,
                "comparison": self.comparison,
            }
        )
        return as_plain


def _check_survival(
    time: ArrayLike, event: ArrayLike, n: int, what: str
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    time = np.asarray(time, dtype=float).reshape(-1)
    raw_event = np.asarray(event).reshape(-1)
    if len(time) != n or len(raw_event) != n:
        raise EvaluationDataError(f"{what}: time ({len(time)}) and event ({len(raw_event)}) must have {n} values")
    if not np.isfinite(time).all() or (time < 0).any():
        raise EvaluationDataError(f"{what}: time must be finite months >= 0")
    if raw_event.dtype != bool and not np.isin(raw_event, (0, 1)).all():
        raise EvaluationDataError(f"{what}: event must be booleans or 0/1")
    return time, raw_event.astype(bool)


@dataclass(frozen=True)
class PatientScores:
    """The patients' radiomics scores and integrated risk scores (`scoring.risk.apply_model`), in row order."""

    radiomics: NDArray[np.float64]
    risk: NDArray[np.float64]


def score_patients(model: FrozenModel, features: pd.DataFrame, clinical: Sequence[ClinicalRecord]) -> PatientScores:
    """Score each patient (a row of ``features`` with the clinical record at the same position) as the node does.

    A caller that needs the scores beyond `evaluate_split` (at-risk tables, the treatment comparison)
    scores once here and hands them to `evaluate_split` (``scores=``).
    """
    missing = [name for name in model.feature_names if name not in features.columns]
    if missing:
        raise EvaluationDataError(
            f"features table lacks model feature{'s' if len(missing) > 1 else ''}: " + ", ".join(missing)
        )
    values = features.loc[:, list(model.feature_names)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        column = model.feature_names[int(np.argmax(bad.any(axis=0)))]
        raise EvaluationDataError(f"feature {column} is missing or not finite in {int(bad.any(axis=1).sum())} rows")
    radiomics, risk = np.empty(len(values)), np.empty(len(values))
    for row, (vector, record) in enumerate(zip(values, clinical)):
        try:
            result = apply_model(model, FeatureVector(dict(zip(model.feature_names, vector))), record)
        except ClinicalRecordError as exc:
            raise EvaluationDataError(f"clinical record at row {row}: {exc}") from None
        radiomics[row], risk[row] = result.radiomics_score, result.risk_score
    return PatientScores(radiomics=radiomics, risk=risk)


def _radiomics_only_baseline(model: FrozenModel) -> tuple[float, BaselineSurvival] | None:
    stored = model.training_summary.get("radiomics_only_cox")
    if not isinstance(stored, Mapping):
        return None
    return float(stored["coefficient"]), BaselineSurvival(
        times=tuple(float(t) for t in stored["times"]),
        survival=tuple(float(s) for s in stored["survival"]),
        valid_until=float(stored["valid_until"]),
        centre=float(stored["linear_predictor_centre"]),
    )


def _predicted_pfs(baseline: BaselineSurvival, linear_predictor: np.ndarray, months: float) -> np.ndarray:
    return np.array([baseline.survival_at(months, lp) for lp in linear_predictor])


def _probability_curves(
    time: NDArray[np.float64],
    event: NDArray[np.bool_],
    baseline: BaselineSurvival | None,
    linear_predictor: NDArray[np.float64] | None,
    horizons: Sequence[float],
    unavailable: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    calibrations: list[dict[str, Any]] = []
    decisions: list[dict[str, Any]] = []
    for months in horizons:
        reason = None
        if baseline is None:
            reason = unavailable
        elif months > baseline.valid_until:
            reason = f"the model's baseline survival ends at {baseline.valid_until:g} months"
        elif months > time.max():
            reason = f"horizon {months:g} months is beyond this split's follow-up (longest {time.max():g} months)"
        # (baseline and linear predictor are None together, with the reason ``unavailable``)
        if reason or baseline is None or linear_predictor is None:
            calibrations.append({"months": months, "groups": None, "reason": reason})
            decisions.append({"months": months, "reason": reason})
            continue
        pfs = _predicted_pfs(baseline, linear_predictor, months)
        calibrations.append(calibration(time, event, pfs, months))
        decisions.append(decision_curve(time, event, 1.0 - pfs, months))
    return calibrations, decisions


def evaluate_split(
    model: FrozenModel,
    features: pd.DataFrame,
    clinical: Sequence[ClinicalRecord],
    time: Sequence[float] | NDArray[np.float64],
    event: Sequence[bool] | NDArray[np.bool_],
    *,
    train_time: Sequence[float] | NDArray[np.float64],
    train_event: Sequence[bool] | NDArray[np.bool_],
    settings: EvaluationSettings,
    split: str = "split",
    scores: PatientScores | None = None,
) -> SplitEvaluation:
    """Evaluate ``model`` on one split (rows of ``features``, ``clinical``, ``time``, ``event`` match by position).

    ``train_time``/``train_event`` are the training split's PFS data (for the
    censoring weights of the time-dependent AUC); pass the split's own data
    when evaluating the training split.  ``scores``: `score_patients` of the same
    rows when the caller has them already (the patients are not scored again).
    """
    if not isinstance(features, pd.DataFrame):
        raise EvaluationDataError(f"features must be a pandas DataFrame, got {type(features).__name__}")
    n = len(features)
    if len(clinical) != n:
        raise EvaluationDataError(f"{len(clinical)} clinical records for {n} feature rows (need one per patient)")
    if n < 2:
        raise EvaluationDataError(f"a split needs at least 2 patients, got {n}")
    time, event = _check_survival(time, event, n, split)
    train_time, train_event = _check_survival(train_time, train_event, len(np.asarray(train_time)), "training split")
    if scores is None:
        scores = score_patients(model, features, clinical)
    elif len(scores.radiomics) != n or len(scores.risk) != n:
        raise EvaluationDataError(f"{len(scores.risk)} patient scores for {n} feature rows (need one per patient)")
    radiomics_score, risk_score = scores.radiomics, scores.risk
    horizons = tuple(float(h) for h in settings.horizons_months)

    c_index = bootstrap_c_index(
        time, event, {"radiomics": radiomics_score, "integrated": risk_score}, settings.bootstrap, settings.seed
    )
    paired = [
        b - a
        for a, b in zip(c_index["radiomics"].pop("replicates"), c_index["integrated"].pop("replicates"))
        if a is not None and b is not None
    ]
    estimates = (c_index["radiomics"]["estimate"], c_index["integrated"]["estimate"])
    difference = {
        "estimate": None if None in estimates else estimates[1] - estimates[0],
        "ci_low": float(np.percentile(paired, 2.5)) if paired else None,
        "ci_high": float(np.percentile(paired, 97.5)) if paired else None,
        "resamples_used": len(paired),
    }

    stored = _radiomics_only_baseline(model)
    blocks = {}
    for name, score, cutoff, baseline, linear_predictor in (
        (
            "radiomics",
            radiomics_score,
            model.radiomics_cutoff,
            None if stored is None else stored[1],
            None if stored is None else stored[0] * radiomics_score,
        ),
        ("integrated", risk_score, model.risk_cutoff, model.baseline_survival, risk_score),
    ):
        auc = []
        for months in horizons:
            value, reason = time_dependent_auc(train_time, train_event, time, event, score, months)
            auc.append({"months": months, "auc": value, "reason": reason})
        calibrations, decisions = _probability_curves(
            time,
            event,
            baseline,
            linear_predictor,
            horizons,
            "the model file has no radiomics-only baseline survival (training_summary.radiomics_only_cox)",
        )
        if baseline is None or linear_predictor is None:  # None together: no radiomics-only baseline
            reason = "the model file has no radiomics-only baseline survival"
            summary_block = {"reason": reason}
            brier = {"model": None, "kaplan_meier": None, "reason": reason}
        else:
            summary_block = calibration_summary(time, event, linear_predictor, baseline, horizons)
            brier = integrated_brier_score(train_time, train_event, time, event, baseline, linear_predictor, horizons)
        blocks[name] = {
            "calibration_summary": summary_block,
            "integrated_brier_score": brier,
            "score": "radiomics_score" if name == "radiomics" else "risk_score",
            "cutoff": cutoff,
            "c_index": c_index[name],
            "time_dependent_auc": auc,
            "risk_groups": risk_group_survival(time, event, score > cutoff),
            "calibration": calibrations,
            "decision_curve": decisions,
        }

    follow_up = stats.kaplan_meier(pd.DataFrame({"time": time, "censored": ~event}), "time", "censored")
    identity = model.identity
    return SplitEvaluation(
        split=split,
        n=n,
        events=int(event.sum()),
        median_follow_up_months=follow_up["groups"]["all"]["median"],
        horizons_months=horizons,
        model={"name": identity.name, "version": identity.version, "sha256": identity.sha256},
        settings={
            "bootstrap": settings.bootstrap,
            "seed": settings.seed,
            "calibration_groups": calibration_group_count(n),
            "dca_thresholds": "0.01-0.99 by 0.01",
        },
        radiomics=plain_json(blocks["radiomics"]),
        integrated=plain_json(blocks["integrated"]),
        comparison=plain_json({"c_index_integrated_minus_radiomics": difference}),
    )
