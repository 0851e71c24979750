"""Survival statistics that agree with R's ``survival`` package.

The research tooling re-implements the analyses of Zhao et al. (J Immunother
Cancer 2023): Cox proportional-hazards models, Kaplan-Meier curves with median
survival and its confidence interval, and the log-rank test.  Everything here
is pure (numpy / pandas in, plain Python values out; no file I/O) and mirrors
R's defaults so that numbers can be compared one-to-one with ``summary(coxph())``,
``print(survfit())`` and ``survdiff()``:

* :func:`cox_fit` -- ``coxph(Surv(time, event) ~ a + b, ties="efron")``.
  Coefficients come from scikit-survival's ``CoxPHSurvivalAnalysis`` (Newton-
  Raphson on the Efron/Breslow partial likelihood).  scikit-survival gives no
  standard errors, so :func:`cox_information` computes the observed information
  matrix of the same partial likelihood at the fitted coefficients; its inverse
  is the covariance matrix R reports (``fit$var``).  One extra Newton step with
  that information and the score brings the estimate to R's precision, and R's
  own test for an infinite coefficient (a Newton step that does not vanish at
  convergence) turns a monotone likelihood into an error instead of a hazard
  ratio of 1e10.  Wald z and two-sided p use
  scipy's normal distribution; 95% limits are ``exp(coef +/- qnorm(0.975) * se)``
  (1.959964, as R, rather than a rounded 1.96).  The concordance is Harrell's C
  of the linear predictor (scikit-survival's ``concordance_index_censored``),
  which is what ``summary(coxph)`` prints since survival 3.0: pairs tied on the
  risk score count 1/2, pairs tied on time are not comparable unless exactly
  one of them is censored, the censored one then counting as the longer.
* :func:`kaplan_meier` -- ``survfit(Surv(time, event) ~ group)`` as printed:
  the curve is scikit-survival's ``kaplan_meier_estimator``; scikit-survival
  only offers "log-log" intervals, so the Greenwood standard error of the
  cumulative hazard and R's default ``conf.type="log"`` limits
  (``S * exp(+/- z * se)``, upper capped at 1, undefined where S = 0) are
  computed here, and the median and its limits use the rule of
  ``print.survfit`` (R function ``survmean``/``minmin``): the first time the
  curve (or the lower / upper limit curve) is <= 0.5; if it sits exactly at
  0.5 (within sqrt(machine eps)) and drops later, the midpoint of that time
  and the next drop.  ``quantile.survfit`` uses a slightly different rule in
  two edge cases (a flat at 0.5 that lasts to the end of the curve, and an
  upper limit curve that rises again); this module follows the printed table.
* :func:`logrank` -- ``survdiff(Surv(time, event) ~ group)`` (rho = 0) via
  scikit-survival's ``compare_survival``.

Input conventions (decided here, documented for users):

* Rows with a missing value in any column an analysis uses are dropped, as R's
  default ``na.action = na.omit`` does; the count is returned as ``n_dropped``.
* Event indicators: 0/1 (integer or float), booleans, or the strings
  "0"/"1"/"true"/"false"/"yes"/"no" (any case).  Anything else -- including
  R's alternative 1/2 coding of the ``lung`` data -- is refused with an error
  naming the column and the value, because silently guessing a coding turns
  censored patients into deaths.
* Times must be finite numbers >= 0.  Covariates must be numeric (booleans
  count as 0/1); categorical covariates must be dummy-coded by the caller.
* Only right-censored data without strata, weights or start/stop times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

from sclc_risk_node.scoring.errors import InputError

__all__ = [
    "CoxCoefficient",
    "CoxFitError",
    "CoxResult",
    "SurvivalDataError",
    "cox_fit",
    "cox_information",
    "harrell_c",
    "kaplan_meier",
    "logrank",
    "survival_y",
]

#: Two-sided 95% normal quantile, R's qnorm(0.975).
Z_95 = float(sps.norm.ppf(0.975))
#: R's all.equal() tolerance, used by print.survfit to spot a curve sitting at 0.5.
_R_TOLERANCE = math.sqrt(np.finfo(float).eps)

_TRUE_STRINGS = frozenset({"1", "1.0", "true", "yes"})
_FALSE_STRINGS = frozenset({"0", "0.0", "false", "no"})


class SurvivalDataError(InputError):
    """A survival data set is unusable (missing column, bad event code, no events...)."""


class CoxFitError(InputError):
    """The Cox model cannot be estimated from this data (collinear covariates, no convergence...)."""


# --------------------------------------------------------------------------- input checking


def _require_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    if not isinstance(df, pd.DataFrame):
        raise SurvivalDataError(f"expected a pandas DataFrame, got {type(df).__name__}")
    available = [str(c) for c in df.columns]
    for column in columns:
        if column not in df.columns:
            shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise SurvivalDataError(f"column {column!r} not found in the data (columns: {shown})")


def _complete_rows(df: pd.DataFrame, columns: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """R's na.omit over the columns an analysis uses; blank strings count as missing."""
    sub = df.loc[:, list(dict.fromkeys(columns))]
    blank = sub.apply(lambda s: s.map(lambda v: isinstance(v, str) and not v.strip()))
    missing = sub.isna() | blank
    keep = ~missing.any(axis=1)
    complete = sub.loc[keep].reset_index(drop=True)
    n_dropped = int((~keep).sum())
    if complete.empty:
        raise SurvivalDataError(
            f"no complete rows: every one of the {len(df)} rows has a missing value in "
            + ", ".join(repr(c) for c in dict.fromkeys(columns))
        )
    return complete, n_dropped


def _event_indicator(values: pd.Series, column: str) -> NDArray[np.bool_]:
    """0/1, booleans or true/false/yes/no strings -> bool array; anything else is refused."""
    if pd.api.types.is_bool_dtype(values):
        as_bool: NDArray[np.bool_] = values.to_numpy(dtype=bool)
        return as_bool
    out = np.empty(len(values), dtype=bool)
    for i, value in enumerate(values.tolist()):
        if isinstance(value, (bool, np.bool_)):
            out[i] = bool(value)
            continue
        if isinstance(value, (int, float, np.integer, np.floating)):
            if value == 1:
                out[i] = True
                continue
            if value == 0:
                out[i] = False
                continue
        elif isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE_STRINGS:
                out[i] = True
                continue
            if text in _FALSE_STRINGS:
                out[i] = False
                continue
        hint = " (R's 1/2 coding must be recoded to 0/1)" if _is_number(value) and float(value) == 2 else ""
        raise SurvivalDataError(
            f"event column {column!r}: value {_show(value)} is not an event indicator "
            f"(use 0/1, true/false or yes/no){hint}"
        )
    return out


def _numeric_column(values: pd.Series, column: str, role: str) -> NDArray[np.float64]:
    array: NDArray[np.float64]
    if pd.api.types.is_bool_dtype(values):
        array = values.to_numpy(dtype=float)
        return array
    if pd.api.types.is_numeric_dtype(values):
        array = values.to_numpy(dtype=float)
    else:
        array = np.empty(len(values), dtype=float)
        for i, value in enumerate(values.tolist()):
            if isinstance(value, (bool, np.bool_)):
                array[i] = float(value)
                continue
            try:
                array[i] = float(value.strip() if isinstance(value, str) else value)
            except (TypeError, ValueError):
                extra = " (dummy-code categories as 0/1 columns)" if role == "covariate" else ""
                raise SurvivalDataError(
                    f"{role} column {column!r}: value {_show(value)} is not a number{extra}"
                ) from None
    bad = ~np.isfinite(array)
    if bad.any():
        raise SurvivalDataError(f"{role} column {column!r}: value {_show(array[bad][0])} is not a finite number")
    return array


def _time_column(values: pd.Series, column: str) -> NDArray[np.float64]:
    times = _numeric_column(values, column, "time")
    if (times < 0).any():
        raise SurvivalDataError(f"time column {column!r}: value {_show(times[times < 0][0])} is negative")
    return times


def _is_number(value: Any) -> bool:  # any cell of a CSV column: probed, not trusted
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (bool, np.bool_))


def _show(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, str):
        return repr(value[:40])
    return repr(value) if not isinstance(value, (int, float, np.number)) else str(value)


def _group_label(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value).strip() if isinstance(value, str) else str(value)


def _survival_arrays(
    df: pd.DataFrame, time: str, event: str, others: Sequence[str]
) -> tuple[pd.DataFrame, NDArray[np.float64], NDArray[np.bool_], int]:
    _require_columns(df, [time, event, *others])
    complete, n_dropped = _complete_rows(df, [time, event, *others])
    times = _time_column(complete[time], time)
    events = _event_indicator(complete[event], event)
    return complete, times, events, n_dropped


# --------------------------------------------------------------------------- Cox model


@dataclass(frozen=True)
class CoxCoefficient:
    """One row of ``summary(coxph)``: log hazard ratio, hazard ratio, 95% CI, Wald test."""

    name: str
    coef: float
    hr: float
    ci_low: float
    ci_high: float
    se: float
    z: float
    p: float

    def as_dict(self) -> dict[str, float]:
        """The row's numbers as JSON (every field but the name)."""
        return {
            "coef": self.coef,
            "hr": self.hr,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "se": self.se,
            "z": self.z,
            "p": self.p,
        }


@dataclass(frozen=True)
class CoxResult:
    """A fitted Cox model, in the terms R's ``summary(coxph(...))`` prints."""

    coefficients: dict[str, CoxCoefficient]
    concordance: float
    n: int
    events: int
    n_dropped: int
    ties: str
    covariance: tuple[tuple[float, ...], ...]

    def table(self) -> list[dict[str, Any]]:
        """One JSON row per coefficient, named (the training report's tables)."""
        return [{"name": name, **c.as_dict()} for name, c in self.coefficients.items()]

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of ``sclc-node stats cox``."""
        return {
            "coefficients": {name: c.as_dict() for name, c in self.coefficients.items()},
            "concordance": self.concordance,
            "n": self.n,
            "events": self.events,
            "n_dropped": self.n_dropped,
            "ties": self.ties,
        }


def cox_information(
    x: ArrayLike, time: ArrayLike, event: ArrayLike, beta: ArrayLike, ties: str = "efron"
) -> NDArray[np.float64]:
    """Observed information matrix (minus the Hessian) of the Cox log partial likelihood.

    scikit-survival estimates the coefficients but exposes no variance, so this
    small function supplies it: at the fitted ``beta`` its inverse is the
    model-based covariance matrix R reports as ``coxph(...)$var``.

    With risk-set sums ``S0 = sum w``, ``S1 = sum w x``, ``S2 = sum w x x'``
    (``w = exp(x beta)``) over subjects with time >= t, and the same sums
    ``D0, D1, D2`` over the ``d`` subjects with an event at t, each event time
    contributes ``sum_{l=0}^{d-1} [A2/A0 - (A1/A0)(A1/A0)']`` with
    ``Ak = Sk - (l/d) Dk`` for Efron's approximation, or ``d [S2/S0 - (S1/S0)(S1/S0)']``
    for Breslow's.
    """
    return _cox_score_information(x, time, event, beta, ties)[1]


def _cox_score_information(
    x: ArrayLike, time: ArrayLike, event: ArrayLike, beta: ArrayLike, ties: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Score vector and observed information of the log partial likelihood (see cox_information)."""
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', not {ties!r}")
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    beta = np.asarray(beta, dtype=float).reshape(-1)
    n, p = x.shape

    order = np.argsort(time, kind="mergesort")
    x, time, event = x[order], time[order], event[order]
    eta = x @ beta
    w = np.exp(eta - eta.max())  # a common factor cancels in every ratio
    starts = np.flatnonzero(np.r_[True, time[1:] != time[:-1]])

    wx = w[:, None] * x
    wxx = wx[:, :, None] * x[:, None, :]
    ew = np.where(event, w, 0.0)

    def per_time(a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(a, starts, axis=0)

    def at_risk(a: np.ndarray) -> np.ndarray:  # sums over time >= t
        return np.flip(np.cumsum(np.flip(a, axis=0), axis=0), axis=0)

    r0, r1, r2 = at_risk(per_time(w)), at_risk(per_time(wx)), at_risk(per_time(wxx))
    d = per_time(event.astype(float)).astype(int)
    k = np.flatnonzero(d > 0)
    if ties == "breslow":
        a0, a1, a2, mult = r0[k], r1[k], r2[k], d[k].astype(float)
    else:
        d0 = per_time(ew)
        d1 = per_time(ew[:, None] * x)
        d2 = per_time(ew[:, None, None] * x[:, :, None] * x[:, None, :])
        kk = np.repeat(k, d[k])
        lag = np.arange(kk.size) - np.repeat(np.cumsum(d[k]) - d[k], d[k])
        frac = lag / d[kk]
        a0 = r0[kk] - frac * d0[kk]
        a1 = r1[kk] - frac[:, None] * d1[kk]
        a2 = r2[kk] - frac[:, None, None] * d2[kk]
        mult = np.ones(kk.size)
    mean = a1 / a0[:, None]
    terms = a2 / a0[:, None, None] - mean[:, :, None] * mean[:, None, :]
    score = x[event].sum(axis=0) - np.einsum("k,ki->i", mult, mean)
    return score, np.einsum("k,kij->ij", mult, terms)


def _score_and_covariance(
    x: ArrayLike, time: ArrayLike, event: ArrayLike, beta: ArrayLike, ties: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    score, info = _cox_score_information(x, time, event, beta, ties)
    try:
        return score, np.asarray(np.linalg.inv(info), dtype=np.float64)
    except np.linalg.LinAlgError:
        raise CoxFitError("the information matrix is singular: the coefficients are not identifiable") from None


def survival_y(time: NDArray[np.float64], event: NDArray[np.bool_]) -> NDArray[np.void]:
    """scikit-survival's structured outcome (fields ``event``, ``time``): the ``y`` of its estimators and metrics."""
    from sksurv.util import Surv

    y: NDArray[np.void] = Surv.from_arrays(event=event, time=time)
    return y


def harrell_c(time: NDArray[np.float64], event: NDArray[np.bool_], score: NDArray[np.float64]) -> float | None:
    """Harrell's C of a risk score (higher = earlier event): scikit-survival's ``concordance_index_censored``.

    None where C is undefined: every patient censored (a small bootstrap resample, a fold), no
    comparable pair, or a non-finite value.
    """
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    if not np.any(event):
        return None
    try:
        value = float(concordance_index_censored(event, time, score)[0])
    except NoComparablePairException:
        return None
    return value if math.isfinite(value) else None


def cox_fit(df: pd.DataFrame, time: str, event: str, covariates: Sequence[str], ties: str = "efron") -> CoxResult:
    """Fit ``coxph(Surv(time, event) ~ covariates, ties=ties)`` and summarise it like R.

    Rows with a missing value in time, event or any covariate are dropped (R's
    na.omit); ``n`` and ``events`` count the rows actually used.  Raises
    :class:`SurvivalDataError` for unusable data and :class:`CoxFitError` when
    the model cannot be estimated (constant or collinear covariates, no
    convergence -- e.g. a covariate that separates events perfectly).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored
    from sksurv.util import Surv

    if ties not in ("efron", "breslow"):
        raise SurvivalDataError(f"ties must be 'efron' or 'breslow', not {ties!r}")
    if isinstance(covariates, str):
        covariates = [covariates]
    covariates = [str(c) for c in covariates]
    if not covariates:
        raise SurvivalDataError("a Cox model needs at least one covariate")
    duplicated = sorted({c for c in covariates if covariates.count(c) > 1})
    if duplicated:
        raise SurvivalDataError(f"covariate {duplicated[0]!r} is listed more than once")
    for c in covariates:
        if c in (time, event):
            raise SurvivalDataError(f"covariate {c!r} is also the time or event column")

    complete, times, events, n_dropped = _survival_arrays(df, time, event, covariates)
    n = len(times)
    n_events = int(events.sum())
    if n_events == 0:
        raise SurvivalDataError(f"event column {event!r} has no events among the {n} complete rows")
    x = np.column_stack([_numeric_column(complete[c], c, "covariate") for c in covariates])
    for j, c in enumerate(covariates):
        if np.ptp(x[:, j]) == 0:
            raise CoxFitError(f"covariate {c!r} is constant ({_show(x[0, j])}) in all {n} complete rows")
    centered = x - x.mean(axis=0)  # coefficients are shift-invariant; centring keeps exp() tame
    if np.linalg.matrix_rank(centered) < len(covariates):
        raise CoxFitError(
            "covariates are collinear: "
            + ", ".join(repr(c) for c in covariates)
            + " (one is a linear combination of the others)"
        )

    model = CoxPHSurvivalAnalysis(alpha=0.0, ties=ties, n_iter=100, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            model.fit(centered, Surv.from_arrays(event=events, time=times))
        except (ConvergenceWarning, ValueError, np.linalg.LinAlgError) as exc:
            raise CoxFitError(
                f"the Cox model did not converge ({str(exc).splitlines()[0]}); "
                "a covariate may separate events perfectly (infinite hazard ratio)"
            ) from None
    beta = np.asarray(model.coef_, dtype=float)

    # scikit-survival stops when the relative change of the log partial
    # likelihood is < 1e-9, leaving steps of ~1e-9; one more Newton step with
    # the same likelihood's score and information reaches R's precision, so the
    # infinite-coefficient check below cannot misfire on a coefficient near 0.
    score, covariance = _score_and_covariance(centered, times, events, beta, ties)
    beta = beta + covariance @ score
    score, covariance = _score_and_covariance(centered, times, events, beta, ties)
    se = np.sqrt(np.diag(covariance))
    # R's coxph.fit check for a monotone likelihood: the Newton step still left at
    # the converged estimate (|score %*% var|) is not negligible.
    remaining = np.abs(score @ covariance)
    infinite = (remaining > 1e-9) & (remaining > math.sqrt(1e-9) * np.abs(beta))
    with np.errstate(over="ignore"):
        limits_finite = np.all(np.isfinite(np.exp(np.abs(beta) + Z_95 * se)))
    if infinite.any() or not (np.all(np.isfinite(beta)) and np.all(np.isfinite(se)) and limits_finite):
        suspect = infinite if infinite.any() else ~np.isfinite(np.exp(np.abs(beta) + Z_95 * se))
        name = covariates[int(np.argmax(suspect))]
        raise CoxFitError(
            f"covariate {name!r}: the coefficient may be infinite (monotone likelihood, "
            "e.g. the covariate separates events from non-events)"
        )
    z = beta / se
    p = 2.0 * sps.norm.sf(np.abs(z))

    concordance = float(concordance_index_censored(events, times, centered @ beta)[0])
    rows = {}
    for j, name in enumerate(covariates):
        rows[name] = CoxCoefficient(
            name=name,
            coef=float(beta[j]),
            hr=float(np.exp(beta[j])),
            ci_low=float(np.exp(beta[j] - Z_95 * se[j])),
            ci_high=float(np.exp(beta[j] + Z_95 * se[j])),
            se=float(se[j]),
            z=float(z[j]),
            p=float(p[j]),
        )
    return CoxResult(
        coefficients=rows,
        concordance=concordance,
        n=n,
        events=n_events,
        n_dropped=n_dropped,
        ties=ties,
        covariance=tuple(tuple(float(v) for v in row) for row in covariance),
    )


# --------------------------------------------------------------------------- Kaplan-Meier


def _print_survfit_median(curve: np.ndarray, times: np.ndarray) -> float | None:
    """R print.survfit's ``minmin``: first time the curve is <= 0.5, midpoint rule at an exact 0.5."""
    keep = ~np.isnan(curve) & (curve < 0.5 + _R_TOLERANCE)
    if not keep.any():
        return None
    y, x = curve[keep], times[keep]
    if abs(y[0] - 0.5) < _R_TOLERANCE and (y < y[0]).any():
        return float((x[0] + x[np.flatnonzero(y < y[0])[0]]) / 2.0)
    return float(x[0])


def _km_summary(times: NDArray[np.float64], events: NDArray[np.bool_]) -> dict[str, Any]:
    from sksurv.nonparametric import kaplan_meier_estimator

    unique_times, surv = kaplan_meier_estimator(events, times)
    sorted_times = np.sort(times)
    n_risk = len(times) - np.searchsorted(sorted_times, unique_times, side="left")
    event_times = np.sort(times[events])
    n_event = np.searchsorted(event_times, unique_times, side="right") - np.searchsorted(
        event_times, unique_times, side="left"
    )
    # Greenwood variance of the cumulative hazard, R's survfit std.err for the KM.
    with np.errstate(divide="ignore", invalid="ignore"):
        increment = np.where(n_event > 0, n_event / (n_risk * (n_risk - n_event)), 0.0)
        se = np.sqrt(np.cumsum(increment))
        positive = surv > 0
        lower = np.where(positive, surv * np.exp(-Z_95 * se), np.nan)
        upper = np.where(positive, np.minimum(1.0, surv * np.exp(Z_95 * se)), np.nan)
    return {
        "n": int(len(times)),
        "events": int(events.sum()),
        "median": _print_survfit_median(surv, unique_times),
        "ci_low": _print_survfit_median(lower, unique_times),
        "ci_high": _print_survfit_median(upper, unique_times),
    }


def kaplan_meier(df: pd.DataFrame, time: str, event: str, group: str | None = None) -> dict[str, Any]:
    """Kaplan-Meier median survival with its 95% CI per group, like ``print(survfit(...))``.

    Returns ``{"groups": {label: {"n", "events", "median", "ci_low", "ci_high"}},
    "n_dropped": k}``; without ``group`` the single group is ``"all"``.  A median
    (or limit) that the curve never reaches is ``None`` (R prints NA).  Groups are
    ordered by value, as R orders factor levels; numeric labels print without a
    trailing ``.0``.
    """
    others = [group] if group is not None else []
    complete, times, events, n_dropped = _survival_arrays(df, time, event, others)
    groups: dict[str, dict[str, Any]] = {}
    if group is None:
        groups["all"] = _km_summary(times, events)
    else:
        for label, index in _group_indices(complete[group]):
            groups[label] = _km_summary(times[index], events[index])
    return {"groups": groups, "n_dropped": n_dropped}


def _group_indices(values: pd.Series) -> list[tuple[str, np.ndarray]]:
    try:
        levels = sorted(pd.unique(values))
    except TypeError:  # mixed types: order by their text
        levels = sorted(pd.unique(values), key=_group_label)
    out: list[tuple[str, np.ndarray]] = []
    seen: dict[str, object] = {}
    array = values.to_numpy(dtype=object)
    for level in levels:
        label = _group_label(level)
        if label in seen:
            raise SurvivalDataError(f"group values {seen[label]!r} and {level!r} have the same label {label!r}")
        seen[label] = level
        out.append((label, np.flatnonzero(array == level)))
    return out


# --------------------------------------------------------------------------- log-rank


def logrank(df: pd.DataFrame, time: str, event: str, group: str) -> dict[str, Any]:
    """The log-rank test of ``survdiff(Surv(time, event) ~ group)`` (rho = 0).

    Returns ``{"chi2", "df", "p", "groups": {label: {"n", "observed", "expected"}},
    "n_dropped"}``; ``df`` is the number of groups minus one.
    """
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    complete, times, events, n_dropped = _survival_arrays(df, time, event, [group])
    if not events.any():
        raise SurvivalDataError(f"event column {event!r} has no events among the {len(times)} complete rows")
    indices = _group_indices(complete[group])
    if len(indices) < 2:
        only = indices[0][0]
        raise SurvivalDataError(
            f"group column {group!r} has a single group ({only!r}); the log-rank test needs two or more"
        )
    codes = np.empty(len(times), dtype=int)
    for code, (_, index) in enumerate(indices):
        codes[index] = code
    try:
        chi2, p, table, _ = compare_survival(Surv.from_arrays(event=events, time=times), codes, return_stats=True)
    except np.linalg.LinAlgError:
        raise SurvivalDataError(
            f"group column {group!r}: a group has no subjects at risk at any event time, the test is undefined"
        ) from None
    per_group = {}
    for code, (label, _) in enumerate(indices):
        row = table.loc[code]
        per_group[label] = {
            "n": int(row["counts"]),
            "observed": int(row["observed"]),
            "expected": float(row["expected"]),
        }
    return {"chi2": float(chi2), "df": len(indices) - 1, "p": float(p), "groups": per_group, "n_dropped": n_dropped}
