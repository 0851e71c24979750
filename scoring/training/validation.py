"""Internal validation of a fit on its own training split: what a careful reviewer asks for.

`optimism_corrected` -- Harrell's bootstrap (Harrell, Lee & Mark, Stat Med
1996;15:361-87; ``rms::validate``).  The apparent C-index of the integrated
risk score on the training split flatters the model, because the same
patients chose its features and fitted its coefficients.  On each of
``[validation] bootstrap`` resamples (patients drawn with replacement, numpy
``default_rng(seed)``) the model is refitted and scored twice: on the
resample itself (apparent_b) and on the original training split (test_b).
optimism = mean(apparent_b - test_b); corrected C = apparent C - optimism.
The same gives the optimism-corrected calibration slope: the Cox coefficient
of the refitted linear predictor on the original patients, averaged
(apparent slope is 1 by construction; a corrected slope below 1 says the
predictions are too extreme -- shrink them).

What is refitted (``[validation] refit``):

* ``"fixed-alpha"`` (default): the log transforms and the stability screen as
  chosen on the whole training split; on the resample the candidates are
  z-scored again with the resample's mean and SD, the LASSO-Cox path is refitted
  from the largest alpha down to the alpha chosen on the whole split (so the
  *selection* of features is redone, but the alpha is not cross-validated
  again), the radiomics score is rebuilt and the integrated Cox model of
  that score and the kept clinical variables is refitted.
* ``"full"``: the whole method on the resample (`fit_integrated_model`):
  transforms re-chosen, LASSO cross-validation, clinical screening,
  integrated Cox.  The stability screen is not repeated (it needs images);
  its surviving candidates are the input.  Slow: one full fit per resample.

A resample that cannot be refitted (no event, a Cox model that does not
converge, no feature selected in ``"full"``) is skipped and counted.

`proportional_hazards_test` -- the Grambsch-Therneau test of the integrated
model's proportional-hazards assumption from scaled Schoenfeld residuals
(Grambsch & Therneau, Biometrika 1994;81:515-26), per term, with lifelines'
``proportional_hazard_test`` (time transform "rank", as R's ``cox.zph``
default "km" is close to it; both are reported).  The fit is lifelines'
``CoxPHFitter`` (Efron ties) on the same data; its coefficients are checked
against the model's.

Pure: arrays in, plain values out.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.domain import transform_array
from sclc_risk_node.scoring.model import RADIOMICS_SCORE_TERM
from sclc_risk_node.scoring.training import stats
from sclc_risk_node.scoring.training.spec import TrainingSpec

if TYPE_CHECKING:  # for the annotation only: the full refit imports method where it runs
    from sclc_risk_node.scoring.training.method import FittedIntegratedModel

__all__ = ["optimism_corrected", "proportional_hazards_test"]

_TIME, _EVENT = "_time", "_event"


def _harrell_c(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float | None:
    # A constant score ties every pair: C = 0.5 by definition, also where no pair is comparable.
    if event.any() and np.ptp(score) == 0:
        return 0.5
    return stats.harrell_c(time, event, score)


def _cox_slope(time: np.ndarray, event: np.ndarray, linear_predictor: np.ndarray) -> float | None:
    if np.ptp(linear_predictor) == 0 or not event.any():
        return None
    frame = pd.DataFrame({_TIME: time, _EVENT: event, "lp": linear_predictor})
    try:
        return float(stats.cox_fit(frame, _TIME, _EVENT, ["lp"]).coefficients["lp"].coef)
    except (stats.CoxFitError, stats.SurvivalDataError):
        return None


class _Skip(Exception):
    """This resample cannot be refitted; the reason is counted."""


def _refit_fixed_alpha(
    design: Mapping[str, Any], index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(radiomics score on the resample, on the original, integrated lp on the resample, on the original)."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    x, time, event = design["x"], design["time"], design["event"]
    xb, tb, eb = x[index], time[index], event[index]
    if not eb.any():
        raise _Skip("no event in the resample")
    mean = xb.mean(axis=0)
    sd = xb.std(axis=0, ddof=1)
    varying = sd > 0  # a column constant in the resample cannot enter its LASSO
    zb = (xb[:, varying] - mean[varying]) / sd[varying]
    z = (x[:, varying] - mean[varying]) / sd[varying]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = CoxnetSurvivalAnalysis(
                l1_ratio=1.0, alphas=design["alphas"], normalize=False, fit_baseline_model=False
            ).fit(zb, stats.survival_y(tb, eb))
        except (ArithmeticError, ValueError) as exc:
            raise _Skip(f"LASSO-Cox failed ({exc})") from None
    coef = np.asarray(path.coef_, dtype=float)[:, -1]
    score_b, score = zb @ coef, z @ coef
    terms = list(design["survivors"])
    columns_b = {name: np.asarray(design["clinical"][name])[index] for name in terms}
    if np.ptp(score_b) > 0:
        terms = [RADIOMICS_SCORE_TERM, *terms]
        columns_b[RADIOMICS_SCORE_TERM] = score_b
    if not terms:
        return score_b, score, np.zeros(len(index)), np.zeros(len(time))
    frame = pd.DataFrame({_TIME: tb, _EVENT: eb, **columns_b})
    try:
        fit = stats.cox_fit(frame, _TIME, _EVENT, terms)
    except (stats.CoxFitError, stats.SurvivalDataError) as exc:
        raise _Skip(f"integrated Cox failed ({exc})") from None
    beta = np.array([fit.coefficients[name].coef for name in terms])
    original = {
        RADIOMICS_SCORE_TERM: score,
        **{name: np.asarray(design["clinical"][name]) for name in design["survivors"]},
    }
    lp_b = np.column_stack([columns_b[name] for name in terms]) @ beta
    lp = np.column_stack([original[name] for name in terms]) @ beta
    return score_b, score, lp_b, lp


def _linear_predictors(
    mapping: Mapping[str, Any], raw: pd.DataFrame, clinical: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(radiomics score, risk score) of a fitted model mapping on raw features and encoded clinical columns."""
    score = np.zeros(len(raw))
    for feature in mapping["radiomics"]["features"]:
        name = f"{feature['region']}.{feature['image_type']}_{feature['feature_class']}_{feature['feature']}"
        values = transform_array(feature.get("transform", "none"), raw[name].to_numpy(dtype=float))
        score += feature["coefficient"] * (values - feature["mean"]) / feature["sd"]
    risk = mapping["radiomics_score_coefficient"] * score
    for covariate in mapping["clinical_covariates"]:
        risk = risk + covariate["coefficient"] * np.asarray(clinical[covariate["name"]], dtype=float)
    return score, risk


def _refit_full(
    design: Mapping[str, Any],
    index: np.ndarray,
    spec: TrainingSpec,
    clinical_records: Sequence[ClinicalRecord],
    encoded_all: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sclc_risk_node.scoring.training.method import TrainingDataError, fit_integrated_model

    names = list(design["names"])
    all_names = list(design["feature_names"])
    raw = pd.DataFrame(design["raw"][:, [all_names.index(name) for name in names]], columns=names)
    resample = raw.iloc[index].reset_index(drop=True)
    quiet = dataclasses.replace(spec, stability=dataclasses.replace(spec.stability, enabled=False))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = fit_integrated_model(
                resample,
                [clinical_records[i] for i in index],
                design["time"][index],
                design["event"][index],
                quiet,
                created="1970-01-01T00:00:00Z",
            )
    except TrainingDataError as exc:
        raise _Skip(str(exc).split(";")[0]) from None
    score_b, lp_b = np.array(fitted.radiomics_score), np.array(fitted.risk_score)
    score, lp = _linear_predictors(fitted.model_mapping, raw, encoded_all)
    return score_b, score, lp_b, lp


def optimism_corrected(
    fitted: FittedIntegratedModel, spec: TrainingSpec, clinical_records: Sequence[ClinicalRecord] | None = None
) -> dict[str, Any]:
    """Harrell's optimism-corrected C-index (radiomics score and integrated risk score) and calibration slope.

    ``fitted`` is the `FittedIntegratedModel` of the whole training split
    (its ``design`` holds what is refitted); ``clinical_records`` (the
    training `ClinicalRecord` list) is needed only for ``refit = "full"``.
    """
    settings = spec.validation
    result: dict[str, Any] = {
        "method": "Harrell's bootstrap optimism correction (Harrell, Lee & Mark, Stat Med 1996)",
        "resamples": settings.bootstrap,
        "refit": settings.refit,
        "seed": settings.seed,
        "resamples_used": 0,
        "skipped": {},
        "radiomics": None,
        "integrated": None,
        "calibration_slope": None,
    }
    design = fitted.design
    if settings.bootstrap == 0:
        result["note"] = "switched off (validation.bootstrap = 0)"
        return result
    if design is None:
        result["note"] = "the fit carries no design to refit"
        return result
    if settings.refit == "full" and clinical_records is None:
        raise ValueError("refit = 'full' needs the training clinical records")
    records = clinical_records if clinical_records is not None else ()
    time, event = np.asarray(design["time"], dtype=float), np.asarray(design["event"], dtype=bool)
    apparent = {
        "radiomics": _harrell_c(time, event, np.asarray(fitted.radiomics_score)),
        "integrated": _harrell_c(time, event, np.asarray(fitted.risk_score)),
    }
    encoded_all = design["clinical"]
    rng = np.random.default_rng(settings.seed)
    n = len(time)
    boot: dict[str, list[float]] = {"radiomics": [], "integrated": []}
    test: dict[str, list[float]] = {"radiomics": [], "integrated": []}
    slopes: list[float] = []
    skipped: dict[str, int] = {}
    for _ in range(settings.bootstrap):
        index = rng.integers(0, n, size=n)
        try:
            if settings.refit == "full":
                score_b, score, lp_b, lp = _refit_full(design, index, spec, records, encoded_all)
            else:
                score_b, score, lp_b, lp = _refit_fixed_alpha(design, index)
            pairs = {
                "radiomics": (_harrell_c(time[index], event[index], score_b), _harrell_c(time, event, score)),
                "integrated": (_harrell_c(time[index], event[index], lp_b), _harrell_c(time, event, lp)),
            }
            values = {name: (b, o) for name, (b, o) in pairs.items() if b is not None and o is not None}
            if len(values) < len(pairs):
                raise _Skip("a C-index is undefined (no comparable pair)")
        except _Skip as exc:
            reason = str(exc)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        for name, (on_boot, on_original) in values.items():
            boot[name].append(on_boot)
            test[name].append(on_original)
        slope = _cox_slope(time, event, lp)
        if slope is not None:
            slopes.append(slope)
    used = len(boot["integrated"])
    result["resamples_used"] = used
    result["skipped"] = skipped
    if used == 0:
        result["note"] = "no resample could be refitted"
        return result
    for name in ("radiomics", "integrated"):
        optimism = float(np.mean(np.array(boot[name]) - np.array(test[name])))
        apparent_c = apparent[name]
        result[name] = {
            "apparent": apparent_c,
            "optimism": optimism,
            "corrected": None if apparent_c is None else apparent_c - optimism,
            "mean_bootstrap_apparent": float(np.mean(boot[name])),
            "mean_bootstrap_test": float(np.mean(test[name])),
        }
    if slopes:
        result["calibration_slope"] = {
            "apparent": 1.0,
            "corrected": float(np.mean(slopes)),
            "optimism": 1.0 - float(np.mean(slopes)),
            "resamples_used": len(slopes),
            "meaning": "Cox coefficient of the refitted linear predictor on the original training patients; "
            "below 1 means the predictions are too extreme",
        }
    return result


def proportional_hazards_test(
    time: Sequence[float],
    event: Sequence[bool],
    columns: Mapping[str, Sequence[float]],
    coefficients: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Grambsch-Therneau test per term of a Cox model (lifelines), in the time transforms "rank" and "km".

    ``columns``: the model's terms (the integrated model: radiomics score and
    the kept clinical variables) on the training patients.  With
    ``coefficients`` (the model's), the largest difference from lifelines' fit
    is reported as a check.
    """
    from lifelines import CoxPHFitter
    from lifelines.statistics import proportional_hazard_test

    frame = pd.DataFrame({name: np.asarray(values, dtype=float) for name, values in columns.items()})
    frame[_TIME] = np.asarray(time, dtype=float)
    frame[_EVENT] = np.asarray(event, dtype=bool).astype(int)
    fitter = CoxPHFitter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitter.fit(frame, duration_col=_TIME, event_col=_EVENT)
        tests = {
            transform: proportional_hazard_test(fitter, frame, time_transform=transform) for transform in ("rank", "km")
        }
    terms = []
    for name in columns:
        row: dict[str, Any] = {"name": name}
        for transform, outcome in tests.items():
            summary = outcome.summary
            row[f"statistic_{transform}"] = float(summary.loc[name, "test_statistic"])
            row[f"p_{transform}"] = float(summary.loc[name, "p"])
        terms.append(row)
    result: dict[str, Any] = {
        "method": "Grambsch-Therneau test on scaled Schoenfeld residuals (lifelines proportional_hazard_test), "
        "1 df per term",
        "terms": terms,
        "smallest_p": min(min(row["p_rank"], row["p_km"]) for row in terms) if terms else None,
    }
    if coefficients:
        result["max_abs_coefficient_difference_from_lifelines"] = float(
            max(abs(float(fitter.params_[name]) - float(coefficients[name])) for name in columns)
        )
    return result
