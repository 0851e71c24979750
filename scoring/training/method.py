"""Fit the integrated clinical + radiomics Cox model on a training split, as Zhao et al. (JITC 2023) did.

The steps, in order (`fit_integrated_model`):

1. **Candidate features.**  Every column of the features table is named
   ``REGION.IMAGETYPE_CLASS_FEATURE`` (`scoring.types.FeatureSpec`) and must be
   something the spec's extraction produces.  Columns with any non-finite value
   in training, then columns with zero variance, are dropped and reported.
   **Log transform** (``[preprocessing] log_transform``): ``"auto"`` gives
   ``signed_log1p`` (sign(x)·log1p(|x|), `scoring.domain.transform_array`) to
   every candidate whose training values are all >= 0 and whose sample
   skewness (``scipy.stats.skew(bias=False)``, the adjusted Fisher-Pearson
   G1) exceeds ``log_skewness`` (default 1.0): the heavy-tailed, size-like
   features (volumes, non-uniformities, zone emphases) whose raw z-scores
   let one large tumour dominate the score.  A list names the features
   instead; ``"none"`` transforms nothing.  The transform is applied before
   everything that follows, and written per feature into the model file.
   **Stability screen** (``[stability]``, `scoring.training.stability`): with
   the perturbed re-extractions of a training subsample, the ICC of every
   candidate over the original and perturbed extractions (on the transformed
   scale) is computed; features below ``icc_threshold`` are dropped and
   reported.  The rest are z-scored with the training mean and the *sample*
   SD (ddof=1, as R's ``scale()``) of the (transformed) values; those two
   numbers go into the model file.
2. **LASSO-Cox** (`LassoCoxSelector`): scikit-survival's
   ``CoxnetSurvivalAnalysis(l1_ratio=1)`` fitted on all training patients gives
   the alpha path; the same path is refitted in each of ``cv_folds`` folds
   (``StratifiedKFold`` on the event indicator, shuffled with the spec seed, so
   every fold has events) and each held-out fold is scored with Harrell's C.
   The folds reuse the training z-scores: standardisation does not look at the
   outcome, so nothing leaks.  ``selection = "min"`` takes the alpha with the
   best mean C (on a tie the larger alpha, i.e. the sparser model);
   ``"1se"`` the largest alpha whose mean C is at least the best minus its
   standard error (SD over folds / sqrt(folds)).  The coefficients are those of
   the full-data path at that alpha (as ``coef(cv.glmnet, s=...)``), not a
   refit at a single alpha, which coordinate descent does less reliably.
   The non-zero coefficients define the radiomics score = sum(coef * z); its
   cut-off is the training median.  No non-zero coefficient is an error.
3. **Clinical screening.**  Each spec candidate is encoded exactly as the
   frozen model will encode it.  A univariate Cox model (`scoring.training.stats.cox_fit`,
   Efron ties, Wald p) per candidate; those with p < ``univariate_p`` enter a
   multivariate Cox model; those with p < ``multivariate_p`` there survive.
   ``multivariate_elimination = "single-pass"`` (the paper) judges all of them
   in one multivariate model; ``"backward"`` drops the largest p and refits
   until every p is below the threshold.  A candidate that is constant in
   training, or whose Cox model cannot be estimated, is reported and skipped.
4. **Correlation and collinearity** (reported, never acted on, as in the
   paper): Spearman's rho (with p) of the radiomics score with every encoded
   candidate, and the variance inflation factor of the radiomics score and the
   surviving clinical variables (`variance_inflation_factors`).
5. **Integrated model**: Cox (Efron) of the radiomics score plus the surviving
   clinical variables (`scoring.training.stats.cox_fit`, i.e. scikit-survival's
   ``CoxPHSurvivalAnalysis`` with one Newton polish step, so its coefficients
   and Wald table agree with R's ``coxph``).  Risk score = its linear predictor;
   cut-off = training median; Breslow baseline survival (scikit-survival
   ``BreslowEstimator``) estimated at ``linear_predictor_centre`` = the mean
   training risk score (R's ``survfit`` convention), so
   S(t | lp) = S0(t) ** exp(lp - centre).
6. A radiomics-only Cox model (score alone, with its own Breslow baseline) is
   stored in ``training_summary["radiomics_only_cox"]`` so that evaluation can
   draw calibration and decision curves for the radiomics model beside the
   integrated one (the paper's Figure 5E-F).  Scoring never reads it.
7. **Applicability domain** (model file schema v2, `scoring.domain`): the
   training min, max, mean, SD and 1/5/50/95/99 % quantiles of every model
   feature (in its own units) and of both scores, with the rule
   ``DOMAIN_RULE`` (training range widened by 10 % of its width on each side).

Rows of the features table, the clinical records, ``time`` (months) and
``event`` are matched by position.  Nothing here reads or writes files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedKFold

from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.domain import DomainRule, domain_from_training, transform_array
from sclc_risk_node.scoring.errors import ClinicalRecordError, InputError
from sclc_risk_node.scoring.model import (
    RADIOMICS_SCORE_TERM,
    REQUIRED_HORIZON_MONTHS,
    SCHEMA_VERSION,
    FrozenModel,
    seal,
)

# The model file's rule for which image types an extraction produces; reused so
# training refuses a feature the frozen model could never be given.
from sclc_risk_node.scoring.model import _produced_image_type_problem as model_image_type_problem
from sclc_risk_node.scoring.training import stats
from sclc_risk_node.scoring.training.spec import ClinicalCandidate, LassoSpec, PreprocessingSpec, TrainingSpec
from sclc_risk_node.scoring.training.stability import StabilityScreen, stability_screen
from sclc_risk_node.scoring.types import FeatureSpec

__all__ = [
    "FittedIntegratedModel",
    "LassoCoxSelector",
    "NoFeatureSelectedError",
    "TrainingDataError",
    "fit_integrated_model",
    "variance_inflation_factors",
]

# Outcome columns of the internal analysis frame; a leading underscore cannot
# clash with a candidate name (model-file names start with a letter or digit).
TIME, EVENT = "_time", "_event"
STANDARDISATION = "z = (T(x) - training mean) / training sample SD (ddof=1), T = the feature's transform"
LOG_TRANSFORM = "signed_log1p"
AUTO_LOG_RULE = (
    "signed_log1p when every training value is >= 0 and the sample skewness "
    "(scipy.stats.skew, bias=False) exceeds {threshold:g}"
)
#: The applicability-domain rule written into every model (docs/model-format.md says why).
DOMAIN_RULE = DomainRule(margin_fraction=0.1, max_abs_z=None)


class TrainingDataError(InputError):
    """The training data cannot be used with this spec; the message says why."""


class NoFeatureSelectedError(TrainingDataError):
    """LASSO-Cox kept no feature at the chosen alpha, so there is no radiomics score."""


# --------------------------------------------------------------------------- small pieces


def variance_inflation_factors(columns: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """VIF_j = 1 / (1 - R²_j), R²_j from the OLS fit (with intercept) of column j on all the others.

    A lone column has VIF 1.  Perfect collinearity gives ``math.inf``.  A
    constant column has no VIF and is refused (``ValueError``).
    """
    names = list(columns)
    matrix = np.column_stack([np.asarray(columns[name], dtype=float) for name in names]) if names else None
    if matrix is None or matrix.shape[0] < 2:
        raise ValueError("VIF needs at least one column and two rows")
    result: dict[str, float] = {}
    for j, name in enumerate(names):
        target = matrix[:, j]
        centred = target - target.mean()
        total = float(centred @ centred)
        if total == 0.0:
            raise ValueError(f"column {name!r} is constant; its VIF is undefined")
        others = np.delete(matrix, j, axis=1)
        design = np.column_stack([np.ones(len(target)), others])
        fitted_coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = target - design @ fitted_coef
        r_squared = 1.0 - float(residual @ residual) / total
        result[name] = math.inf if r_squared >= 1.0 - 1e-12 else 1.0 / (1.0 - r_squared)
    return result


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def choose_log_transforms(raw: np.ndarray, names: Sequence[str], spec: PreprocessingSpec) -> dict[str, str]:
    """``{name: "none" | "signed_log1p"}`` for every column of ``raw`` (finite, training rows), by the spec's rule."""
    if spec.log_transform == "none":
        return {name: "none" for name in names}
    if spec.log_transform == "auto":
        chosen = {}
        for j, name in enumerate(names):
            column = raw[:, j]
            skewness = float(sps.skew(column, bias=False)) if np.ptp(column) > 0 else 0.0
            heavy = bool(column.min() >= 0 and math.isfinite(skewness) and skewness > spec.log_skewness)
            chosen[name] = LOG_TRANSFORM if heavy else "none"
        return chosen
    unknown = [name for name in spec.log_transform if name not in set(names)]
    if unknown:
        raise TrainingDataError(
            f"preprocessing.log_transform names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'}"
            " not a usable candidate feature (not extracted, or dropped as non-finite or constant)"
        )
    wanted = set(spec.log_transform)
    return {name: LOG_TRANSFORM if name in wanted else "none" for name in names}


def apply_transforms(raw: np.ndarray, transforms: Sequence[str]) -> np.ndarray:
    """Each column of ``raw`` through its transform (`scoring.domain.transform_array`)."""
    out = np.array(raw, dtype=float, copy=True)
    for j, kind in enumerate(transforms):
        if kind != "none":
            out[..., j] = transform_array(kind, out[..., j])
    return out


def _transformed_frame(table: pd.DataFrame, names: Sequence[str], transforms: Mapping[str, str]) -> pd.DataFrame:
    values = table.reindex(columns=list(names)).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    return pd.DataFrame(
        apply_transforms(values, [transforms[name] for name in names]), index=table.index, columns=list(names)
    )


# --------------------------------------------------------------------------- LASSO-Cox


class LassoCoxSelector(BaseEstimator):  # type: ignore[misc]  # scikit-learn ships no type information
    """LASSO-Cox with a cross-validated alpha; ``predict`` gives the radiomics score.

    ``fit(X, y)`` takes the raw candidate features (DataFrame or array; rows =
    patients) and a scikit-survival structured ``y`` (``Surv.from_arrays``).
    It z-scores X with the training mean and sample SD, fits the alpha path,
    cross-validates it (see the module docstring) and sets:

    ``feature_names_in_``, ``mean_``, ``scale_`` (per input column);
    ``alphas_`` (the path, descending), ``cv_c_index_`` (folds x alphas, NaN
    where a fold could not be scored), ``cv_folds_scored_``, ``cv_mean_c_index_``, ``cv_se_c_index_``
    (mean over the folds that scored it and its SE; only alphas scored in every
    fold are eligible),
    ``n_nonzero_`` (per alpha); ``alpha_min_``, ``alpha_1se_``, ``alpha_``
    (chosen by ``selection``), ``alpha_index_``; ``coef_`` (per input column, at
    ``alpha_``); ``coef_path_`` (input columns x alphas: the whole path, which the
    report draws); ``selected_features_`` (names with non-zero coefficient, in
    input order); ``fit_warnings_`` (distinct warning texts from the fits).
    """

    def __init__(
        self,
        cv_folds: int = 10,
        seed: int = 0,
        n_alphas: int = 100,
        alpha_min_ratio: float | str = "auto",
        selection: str = "min",
    ):
        self.cv_folds = cv_folds
        self.seed = seed
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.selection = selection

    @classmethod
    def from_spec(cls, spec: LassoSpec) -> LassoCoxSelector:
        return cls(
            cv_folds=spec.cv_folds,
            seed=spec.seed,
            n_alphas=spec.n_alphas,
            alpha_min_ratio=spec.alpha_min_ratio,
            selection=spec.selection,
        )

    def fit(self, X: pd.DataFrame | ArrayLike, y: NDArray[np.void]) -> LassoCoxSelector:
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        if self.selection not in ("min", "1se"):
            raise ValueError(f"selection must be 'min' or '1se', not {self.selection!r}")
        names = [str(c) for c in X.columns] if isinstance(X, pd.DataFrame) else [f"x{j}" for j in range(np.shape(X)[1])]
        x = np.asarray(X, dtype=float)
        fields = y.dtype.names
        if fields is None or len(fields) != 2:
            raise ValueError("y must be scikit-survival's structured (event, time) array (Surv.from_arrays)")
        event, time = y[fields[0]].astype(bool), y[fields[1]].astype(float)
        if not np.isfinite(x).all():
            raise TrainingDataError("LASSO-Cox input has non-finite values; screen the features first")
        mean = x.mean(axis=0)
        scale = x.std(axis=0, ddof=1)
        if (scale == 0).any():
            raise TrainingDataError(f"feature {names[int(np.argmax(scale == 0))]!r} is constant in training")
        z = (x - mean) / scale

        caught: list[str] = []
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            path = self._coxnet(CoxnetSurvivalAnalysis, alphas=None).fit(z, y)
            alphas = np.asarray(path.alphas_, dtype=float)
            folds = StratifiedKFold(n_splits=self.cv_folds, shuffle=True, random_state=self.seed)
            fold_c = np.full((self.cv_folds, len(alphas)), np.nan)
            for k, (train_index, test_index) in enumerate(folds.split(z, event)):
                fold = self._coxnet(CoxnetSurvivalAnalysis, alphas=alphas).fit(z[train_index], y[train_index])
                # Coxnet may stop the path early; alphas it did not reach stay unscored.
                reached = len(fold.alphas_)
                scores = z[test_index] @ fold.coef_
                for a in range(reached):
                    fold_c[k, a] = self._fold_c_index(time[test_index], event[test_index], scores[:, a])
        caught = sorted({str(record.message) for record in records})

        scored = np.sum(np.isfinite(fold_c), axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are handled below
            mean_c = np.nanmean(fold_c, axis=0)
            se_c = np.nanstd(fold_c, axis=0, ddof=1) / np.sqrt(np.maximum(scored, 1))
        # An alpha scored in only some folds (a fold's path stopped early, or a
        # fold had no comparable pair) has a mean over different patients and
        # is not comparable with the others, so only fully scored alphas compete.
        eligible = scored == self.cv_folds
        if not eligible.any():
            raise TrainingDataError("cross-validation could not score any alpha in every fold")
        competing = np.where(eligible, mean_c, -np.inf)
        best = int(np.argmax(competing))  # first maximum = largest alpha = sparsest model
        threshold = mean_c[best] - (se_c[best] if np.isfinite(se_c[best]) else 0.0)
        one_se = int(np.flatnonzero(competing >= threshold)[0])
        chosen = best if self.selection == "min" else one_se

        self.feature_names_in_ = np.asarray(names, dtype=object)
        self.n_features_in_ = len(names)
        self.mean_, self.scale_ = mean, scale
        self.alphas_ = alphas
        self.cv_c_index_ = fold_c
        self.cv_mean_c_index_, self.cv_se_c_index_ = mean_c, se_c
        self.cv_folds_scored_ = scored
        self.n_nonzero_ = np.count_nonzero(path.coef_, axis=0)
        self.alpha_min_, self.alpha_1se_ = float(alphas[best]), float(alphas[one_se])
        self.alpha_index_ = chosen
        self.alpha_ = float(alphas[chosen])
        self.coef_path_ = np.asarray(path.coef_, dtype=float)
        self.coef_ = self.coef_path_[:, chosen]
        self.selected_features_ = [name for name, coef in zip(names, self.coef_) if coef != 0.0]
        self.fit_warnings_ = caught
        return self

    def _coxnet(self, estimator_class: type[Any], alphas: NDArray[np.float64] | None) -> Any:
        return estimator_class(
            l1_ratio=1.0,
            n_alphas=self.n_alphas,
            alphas=alphas,
            alpha_min_ratio=self.alpha_min_ratio,
            normalize=False,
            fit_baseline_model=False,
        )

    @staticmethod
    def _fold_c_index(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float:
        c = stats.harrell_c(time, event, score)
        return math.nan if c is None else c

    def standardise(self, X: pd.DataFrame | ArrayLike) -> NDArray[np.float64]:
        z: NDArray[np.float64] = (np.asarray(X, dtype=float) - self.mean_) / self.scale_
        return z

    def predict(self, X: pd.DataFrame | ArrayLike) -> NDArray[np.float64]:
        """The radiomics score sum(coef * z) of each row (X has the columns seen in ``fit``)."""
        if isinstance(X, pd.DataFrame):
            X = X.loc[:, list(self.feature_names_in_)]
        score: NDArray[np.float64] = self.standardise(X) @ self.coef_
        return score


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class FittedIntegratedModel:
    """The outcome of `fit_integrated_model`.

    ``model_mapping`` is the unsealed model-file content (seal it with
    `scoring.model.seal`; `sealed_mapping` does).  ``radiomics_score`` and
    ``risk_score`` are the training patients' scores in input order;
    ``diagnostics`` is plain JSON-ready data for the training report (also the
    full LASSO CV curve, which the model file only summarises).
    """

    model_mapping: Mapping[str, Any]
    radiomics_score: tuple[float, ...]
    risk_score: tuple[float, ...]
    diagnostics: Mapping[str, Any]
    #: What internal validation refits on each bootstrap resample (`scoring.training.validation`):
    #: ``x`` (training rows x LASSO candidates, transformed), ``names``, ``alphas`` (the path down to
    #: the chosen alpha), ``clinical`` (encoded candidates), ``survivors`` (kept clinical terms).
    design: Mapping[str, Any] | None = None

    @property
    def radiomics_cutoff(self) -> float:
        cutoff: float = self.model_mapping["radiomics"]["cutoff"]
        return cutoff

    @property
    def risk_cutoff(self) -> float:
        cutoff: float = self.model_mapping["risk_cutoff"]
        return cutoff

    def sealed_mapping(self) -> dict[str, Any]:
        return seal(self.model_mapping)

    def frozen_model(self) -> FrozenModel:
        return FrozenModel.from_mapping(self.sealed_mapping())


# --------------------------------------------------------------------------- input checks


def _training_c(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float:
    c = stats.harrell_c(time, event, score)
    if c is None:
        raise TrainingDataError("Harrell's C is undefined on the training split: no comparable pair of patients")
    return c


def _check_survival(time: ArrayLike, event: ArrayLike, n: int) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    time = np.asarray(time, dtype=float).reshape(-1)
    raw_event = np.asarray(event).reshape(-1)
    if len(time) != n or len(raw_event) != n:
        raise TrainingDataError(
            f"time ({len(time)}) and event ({len(raw_event)}) must have one value per patient ({n})"
        )
    if not np.isfinite(time).all() or (time <= 0).any():
        bad = int(np.sum(~np.isfinite(time) | (time <= 0)))
        raise TrainingDataError(f"time must be finite months > 0; {bad} value{'s are' if bad > 1 else ' is'} not")
    if raw_event.dtype != bool:
        if not np.isin(raw_event, (0, 1)).all():
            raise TrainingDataError("event must be booleans or 0/1")
    return time, raw_event.astype(bool)


def _candidate_feature_specs(features: pd.DataFrame, spec: TrainingSpec) -> list[FeatureSpec]:
    extraction = spec.extraction
    extraction_mapping = {"image_types": dict(extraction.image_types), "settings": dict(extraction.settings)}
    specs = []
    for column in features.columns:
        try:
            feature = FeatureSpec.from_name(str(column))
        except ValueError as exc:
            raise TrainingDataError(f"feature column {column!r}: {exc}") from None
        if feature.region not in extraction.regions:
            raise TrainingDataError(
                f"feature column {column!r}: region {feature.region} is not in extraction.regions"
                f" ({', '.join(extraction.regions)})"
            )
        if feature.feature_class not in extraction.feature_classes:
            raise TrainingDataError(
                f"feature column {column!r}: class {feature.feature_class} is not in extraction.feature_classes"
                f" ({', '.join(extraction.feature_classes)})"
            )
        problem = model_image_type_problem(feature.image_type, extraction_mapping)
        if problem:
            raise TrainingDataError(f"feature column {column!r}: image type {feature.image_type} {problem}")
        specs.append(feature)
    return specs


def _numeric_features(features: pd.DataFrame) -> np.ndarray:
    columns = []
    for column in features.columns:
        try:
            columns.append(pd.to_numeric(features[column], errors="raise").to_numpy(dtype=float))
        except (TypeError, ValueError):
            raise TrainingDataError(f"feature column {column!r} is not numeric") from None
    return np.column_stack(columns) if columns else np.empty((len(features), 0))


def _encode_candidates(
    candidates: Sequence[ClinicalCandidate], records: Sequence[ClinicalRecord]
) -> dict[str, np.ndarray]:
    encoded = {}
    for candidate in candidates:
        values, missing = np.empty(len(records)), []
        for row, record in enumerate(records):
            try:
                values[row] = candidate.encode(record)
            except ClinicalRecordError:
                missing.append(row)
        if missing:
            shown = ", ".join(str(row) for row in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise TrainingDataError(
                f"clinical field {candidate.field!r} (candidate {candidate.name}) is missing for"
                f" {len(missing)} patient{'s' if len(missing) > 1 else ''} (rows {shown})"
            )
        encoded[candidate.name] = values
    return encoded


# --------------------------------------------------------------------------- clinical screening


def _univariate_screen(
    frame: pd.DataFrame, candidates: Sequence[ClinicalCandidate], threshold: float
) -> tuple[list[dict[str, Any]], list[str]]:
    table, kept = [], []
    for candidate in candidates:
        row: dict[str, Any] = {"name": candidate.name, "field": candidate.field}
        try:
            result = stats.cox_fit(frame, TIME, EVENT, [candidate.name])
        except stats.CoxFitError as exc:
            row.update(kept=False, note=str(exc))
        else:
            row.update(result.table()[0], kept=result.coefficients[candidate.name].p < threshold)
            row["name"] = candidate.name
        table.append(row)
        if row["kept"]:
            kept.append(candidate.name)
    return table, kept


def _multivariate_screen(
    frame: pd.DataFrame, names: list[str], threshold: float, elimination: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """(steps, survivors): each step is one multivariate Cox table."""
    steps: list[dict[str, Any]] = []
    remaining = list(names)
    while remaining:
        try:
            result = stats.cox_fit(frame, TIME, EVENT, remaining)
        except stats.CoxFitError as exc:
            raise TrainingDataError(
                f"multivariate Cox of {', '.join(remaining)} cannot be estimated: {exc}"
                " (remove or merge the collinear candidates in [clinical])"
            ) from None
        p = {name: result.coefficients[name].p for name in remaining}
        steps.append({"terms": list(remaining), "table": result.table()})
        failing = [name for name in remaining if p[name] >= threshold]
        if not failing:
            return steps, remaining
        if elimination == "single-pass":
            return steps, [name for name in remaining if p[name] < threshold]
        remaining.remove(max(failing, key=lambda name: p[name]))
    return steps, []


def _spearman(radiomics_score: np.ndarray, encoded: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, values in encoded.items():
        if np.ptp(values) == 0 or np.ptp(radiomics_score) == 0:
            rows.append({"name": name, "rho": None, "p": None, "note": "constant in training"})
            continue
        result = sps.spearmanr(radiomics_score, values)
        rows.append(
            {"name": name, "rho": _finite_or_none(float(result.statistic)), "p": _finite_or_none(float(result.pvalue))}
        )
    return rows


# --------------------------------------------------------------------------- the fit


def _breslow(linear_predictor: np.ndarray, centre: float, time: np.ndarray, event: np.ndarray) -> dict[str, Any]:
    from sksurv.linear_model.coxph import BreslowEstimator

    baseline = BreslowEstimator().fit(linear_predictor - centre, event, time).baseline_survival_
    valid_until = float(time.max())
    keep = baseline.x <= valid_until
    return {
        "time_unit": "months",
        "times": [float(t) for t in baseline.x[keep]],
        "survival": [float(s) for s in baseline.y[keep]],
        "valid_until": valid_until,
        "linear_predictor_centre": float(centre),
    }


def _stability(
    features: pd.DataFrame,
    names: list[str],
    transforms: Mapping[str, str],
    transformed: np.ndarray,
    spec: TrainingSpec,
    perturbed: Mapping[str, pd.DataFrame] | None,
) -> tuple[StabilityScreen | None, dict[str, Any]]:
    """The screen over the usable candidates (transformed scale), and what the model file records of it."""
    settings = spec.stability.as_mapping()
    if not spec.stability.enabled:
        return None, {**settings, "ran": False, "note": "switched off (stability.enabled = false)"}
    if not perturbed:
        return None, {
            **settings,
            "ran": False,
            "note": "no perturbed extraction was given (e.g. every training patient has precomputed "
            "features), so no feature was screened",
        }
    original = pd.DataFrame(transformed, index=features.index, columns=names)
    screened = [label for label in original.index if all(label in table.index for table in perturbed.values())]
    tables = {name: _transformed_frame(table, names, transforms) for name, table in perturbed.items()}
    screen = stability_screen(
        original.loc[screened],
        tables,
        threshold=spec.stability.icc_threshold,
        kind=spec.stability.icc,
        settings=settings,
    )
    if screen.patients < 3:
        note = (
            f"only {screen.patients} training patients have every perturbed extraction (need 3);"
            " no feature was screened"
        )
        return None, {**settings, "ran": False, "note": note}
    return screen, screen.summary()


def _software_versions() -> dict[str, str]:
    import sklearn
    import sksurv

    return {
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scipy": __import__("scipy").__version__,
        "scikit-learn": sklearn.__version__,
        "scikit-survival": sksurv.__version__,
    }


def _applicability_domain(
    features: pd.DataFrame, mapping: Mapping[str, Any], radiomics_score: np.ndarray, risk_score: np.ndarray
) -> dict[str, Any]:
    """The model file's ``applicability_domain``: training distributions of each model feature and both scores.

    Feature values are read from the input table, i.e. in their own units before
    any ``transform`` (the domain states ranges as pyradiomics reports them; the
    rule applies the margin on the model's scale, `scoring.domain`).
    """
    columns = {str(column): position for position, column in enumerate(features.columns)}
    model_features = [
        FeatureSpec(f["region"], f["image_type"], f["feature_class"], f["feature"]).name
        for f in mapping["radiomics"]["features"]
    ]
    training = {name: pd.to_numeric(features.iloc[:, columns[name]]).to_numpy(dtype=float) for name in model_features}
    return domain_from_training(training, radiomics_score.tolist(), risk_score.tolist(), DOMAIN_RULE).to_mapping()


def fit_integrated_model(
    features: pd.DataFrame,
    clinical: Sequence[ClinicalRecord],
    time: Sequence[float] | NDArray[np.float64],
    event: Sequence[bool] | NDArray[np.bool_],
    spec: TrainingSpec,
    *,
    cohort: str | None = None,
    created: str | None = None,
    perturbed: Mapping[str, pd.DataFrame] | None = None,
) -> FittedIntegratedModel:
    """Run the paper's method on one training split (module docstring) and return the unfrozen model.

    ``features``: rows = patients, columns = candidate feature names;
    ``clinical``: one `ClinicalRecord` per row; ``time`` in months (> 0);
    ``event`` True for progression.  ``cohort`` describes the training data in
    ``training_summary``; ``created`` (ISO 8601) defaults to now (UTC).
    ``perturbed``: perturbation name -> raw features of the stability
    subsample, indexed by labels of ``features.index`` (see
    `research.extraction.extract_perturbed_features`); with
    ``[stability] enabled`` and no ``perturbed`` the screen is recorded as not run.
    Raises `TrainingDataError` (or `NoFeatureSelectedError`) with the reason.
    """
    if not isinstance(features, pd.DataFrame):
        raise TrainingDataError(f"features must be a pandas DataFrame, got {type(features).__name__}")
    n = len(features)
    if len(clinical) != n:
        raise TrainingDataError(f"{len(clinical)} clinical records for {n} feature rows (need one per patient)")
    for row, record in enumerate(clinical):
        if not isinstance(record, ClinicalRecord):
            raise TrainingDataError(f"clinical record at row {row} is a {type(record).__name__}, not a ClinicalRecord")
    time, event = _check_survival(time, event, n)
    n_events = int(event.sum())
    folds = spec.lasso.cv_folds
    if n_events < folds:
        raise TrainingDataError(f"{n_events} events for {folds}-fold cross-validation (need at least one per fold)")
    if time.max() < REQUIRED_HORIZON_MONTHS:
        raise TrainingDataError(
            f"longest training follow-up is {time.max():g} months; the model must predict PFS at"
            f" {REQUIRED_HORIZON_MONTHS:g} months"
        )
    if features.columns.duplicated().any():
        raise TrainingDataError(f"feature column {features.columns[features.columns.duplicated()][0]!r} appears twice")
    feature_specs = _candidate_feature_specs(features, spec)
    raw = _numeric_features(features)
    encoded = _encode_candidates(spec.clinical.candidates, clinical)

    # 1. screening
    non_finite = ~np.isfinite(raw).all(axis=0)
    with np.errstate(invalid="ignore"):
        sd = np.where(non_finite, np.nan, np.std(np.where(np.isfinite(raw), raw, 0.0), axis=0, ddof=1))
    zero_variance = ~non_finite & (sd == 0)
    usable = ~non_finite & ~zero_variance
    names = [str(c) for c in features.columns]
    if not usable.any():
        raise TrainingDataError(f"none of the {len(names)} candidate features is finite and non-constant in training")
    finite_names = [name for name, keep in zip(names, usable) if keep]
    transforms = choose_log_transforms(raw[:, usable], finite_names, spec.preprocessing)
    transformed = apply_transforms(raw[:, usable], [transforms[name] for name in finite_names])
    screen, stability_summary = _stability(features, finite_names, transforms, transformed, spec, perturbed)
    unstable = set(screen.dropped) if screen is not None else set()
    stable = np.array([name not in unstable for name in finite_names], dtype=bool)
    if not stable.any():
        raise TrainingDataError(
            f"the stability screen kept none of the {len(finite_names)} candidate features"
            f" ({spec.stability.icc} >= {spec.stability.icc_threshold:g}); lower stability.icc_threshold or check"
            " the perturbed extractions"
        )
    x_lasso = transformed[:, stable]

    # 2. LASSO-Cox
    y = stats.survival_y(time, event)
    usable_names = [name for name, keep in zip(finite_names, stable) if keep]
    try:
        selector = LassoCoxSelector.from_spec(spec.lasso).fit(pd.DataFrame(x_lasso, columns=usable_names), y)
    except ArithmeticError as exc:
        raise TrainingDataError(
            f"LASSO-Cox failed numerically ({exc}); raise lasso.alpha_min_ratio or check the features"
        ) from None
    if not selector.selected_features_:
        raise NoFeatureSelectedError(
            f"LASSO-Cox selected no feature: at the chosen alpha {selector.alpha_:.4g} ({spec.lasso.selection} rule,"
            f" mean CV C-index there {selector.cv_mean_c_index_[selector.alpha_index_]:.3f}) every coefficient is zero,"
            " so there is no radiomics score"
            + ("; the 'min' rule keeps more features" if spec.lasso.selection == "1se" else "")
            + "; the candidate features may carry no detectable PFS signal in this cohort"
        )
    radiomics_score = selector.predict(pd.DataFrame(x_lasso, columns=usable_names))
    radiomics_cutoff = float(np.median(radiomics_score))
    selected = [
        (
            feature_specs[names.index(name)],
            float(selector.mean_[j]),
            float(selector.scale_[j]),
            float(selector.coef_[j]),
        )
        for j, name in enumerate(usable_names)
        if selector.coef_[j] != 0.0
    ]

    # 3. clinical screening
    frame = pd.DataFrame({TIME: time, EVENT: event, RADIOMICS_SCORE_TERM: radiomics_score, **encoded})
    univariate, kept = _univariate_screen(frame, spec.clinical.candidates, spec.clinical.univariate_p)
    if kept:
        multivariate, survivors = _multivariate_screen(
            frame, kept, spec.clinical.multivariate_p, spec.clinical.multivariate_elimination
        )
    else:
        multivariate, survivors = [], []

    # 4.-5. correlation, collinearity, integrated model
    spearman = _spearman(radiomics_score, encoded)
    integrated_terms = [RADIOMICS_SCORE_TERM, *survivors]
    try:
        integrated = stats.cox_fit(frame, TIME, EVENT, integrated_terms)
    except stats.CoxFitError as exc:
        raise TrainingDataError(f"integrated Cox model cannot be estimated: {exc}") from None
    vif = variance_inflation_factors({name: frame[name].to_numpy() for name in integrated_terms})
    beta = np.array([integrated.coefficients[name].coef for name in integrated_terms])
    risk_score = frame[integrated_terms].to_numpy(dtype=float) @ beta
    risk_cutoff = float(np.median(risk_score))
    baseline = _breslow(risk_score, float(risk_score.mean()), time, event)

    # 6. radiomics-only Cox for evaluation of the radiomics model alone
    radiomics_cox = stats.cox_fit(frame, TIME, EVENT, [RADIOMICS_SCORE_TERM])
    radiomics_coef = radiomics_cox.coefficients[RADIOMICS_SCORE_TERM].coef
    radiomics_lp = radiomics_coef * radiomics_score
    radiomics_only = {
        "coefficient": radiomics_coef,
        **_breslow(radiomics_lp, float(radiomics_lp.mean()), time, event),
        "table": radiomics_cox.table(),
    }

    km = stats.kaplan_meier(pd.DataFrame({"time": time, "event": event}), "time", "event")["groups"]["all"]
    reverse = stats.kaplan_meier(pd.DataFrame({"time": time, "censored": ~event}), "time", "censored")
    c_radiomics = _training_c(time, event, radiomics_score)
    c_integrated = _training_c(time, event, risk_score)
    candidates_by_name = {candidate.name: candidate for candidate in spec.clinical.candidates}
    best = int(np.argmax(np.where(selector.cv_folds_scored_ == folds, selector.cv_mean_c_index_, -np.inf)))
    cv_summary = {
        "folds": folds,
        "scheme": "StratifiedKFold on the event indicator, shuffled",
        "seed": spec.lasso.seed,
        "score": "Harrell's C on the held-out fold",
        "n_alphas": int(len(selector.alphas_)),
        "alpha_max": float(selector.alphas_[0]),
        "alpha_min_path": float(selector.alphas_[-1]),
        "alpha_best": selector.alpha_min_,
        "alpha_1se": selector.alpha_1se_,
        "best_mean_c_index": float(selector.cv_mean_c_index_[best]),
        "best_se_c_index": _finite_or_none(float(selector.cv_se_c_index_[best])),
        "chosen_mean_c_index": float(selector.cv_mean_c_index_[selector.alpha_index_]),
    }
    clinical_summary = {
        "univariate_p": spec.clinical.univariate_p,
        "multivariate_p": spec.clinical.multivariate_p,
        "multivariate_elimination": spec.clinical.multivariate_elimination,
        "univariate": univariate,
        "multivariate": multivariate,
        "selected": list(survivors),
    }
    spec_mapping = spec.to_mapping()
    summary: dict[str, Any] = {
        **({"cohort": cohort} if cohort else {}),
        "n": n,
        "events": n_events,
        "median_follow_up_months": reverse["groups"]["all"]["median"],
        "median_follow_up_method": "reverse Kaplan-Meier",
        "median_pfs_months": {"median": km["median"], "ci_low": km["ci_low"], "ci_high": km["ci_high"]},
        "c_index": c_integrated,
        "c_index_radiomics": c_radiomics,
        "candidate_features": len(names),
        "dropped_features": {
            "non_finite": [name for name, bad in zip(names, non_finite) if bad],
            "zero_variance": [name for name, bad in zip(names, zero_variance) if bad],
            "unstable": [name for name in finite_names if name in unstable],
        },
        "log_transform": {
            "setting": (
                spec.preprocessing.log_transform
                if isinstance(spec.preprocessing.log_transform, str)
                else list(spec.preprocessing.log_transform)
            ),
            "rule": (
                AUTO_LOG_RULE.format(threshold=spec.preprocessing.log_skewness)
                if spec.preprocessing.log_transform == "auto"
                else None
            ),
            "transformed_candidates": sum(1 for kind in transforms.values() if kind != "none"),
            "transformed_selected": [s.name for s, _, _, _ in selected if transforms[s.name] != "none"],
        },
        "stability": stability_summary,
        "standardisation": STANDARDISATION,
        "lasso": {
            "selection": spec.lasso.selection,
            "alpha": selector.alpha_,
            "cv": cv_summary,
            "selected_features": [{"name": s.name, "coefficient": coef} for s, _, _, coef in selected],
        },
        "radiomics_cutoff_rule": "training median",
        "clinical": clinical_summary,
        "spearman_radiomics_score": spearman,
        "vif": {name: _finite_or_none(value) for name, value in vif.items()},
        "integrated_cox": {"ties": integrated.ties, "table": integrated.table()},
        "risk_cutoff_rule": "training median",
        "radiomics_only_cox": radiomics_only,
        "spec": spec_mapping,
        "software": _software_versions(),
    }
    extraction = spec.extraction_settings
    mapping: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.model.name,
        "version": spec.model.version,
        "intended_use": spec.model.intended_use,
        "demonstration": spec.model.demonstration,
        "created": created or datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "extraction": {
            "pyradiomics_version": extraction.pyradiomics_version,
            "settings": spec_mapping["extraction"]["settings"],
            "image_types": spec_mapping["extraction"]["image_types"],
            "ring": {
                "outward_mm": extraction.ring.outward_mm,
                "inward_mm": extraction.ring.inward_mm,
                "method": extraction.ring.method,
            },
        },
        "radiomics": {
            "features": [
                {
                    "region": s.region,
                    "image_type": s.image_type,
                    "feature_class": s.feature_class,
                    "feature": s.feature,
                    "transform": transforms[s.name],
                    "mean": mean,
                    "sd": sd_value,
                    "coefficient": coef,
                }
                for s, mean, sd_value, coef in selected
            ],
            "cutoff": radiomics_cutoff,
        },
        "clinical_covariates": [
            candidates_by_name[name].as_model_covariate(integrated.coefficients[name].coef) for name in survivors
        ],
        "radiomics_score_coefficient": integrated.coefficients[RADIOMICS_SCORE_TERM].coef,
        "risk_cutoff": risk_cutoff,
        "baseline_survival": baseline,
        "training_summary": summary,
    }
    # 7. Applicability domain (schema v2, scoring.domain)
    mapping["applicability_domain"] = _applicability_domain(features, mapping, radiomics_score, risk_score)
    diagnostics = {
        **{
            key: summary[key]
            for key in (
                "n",
                "events",
                "median_follow_up_months",
                "median_pfs_months",
                "dropped_features",
                "clinical",
                "spearman_radiomics_score",
                "vif",
                "integrated_cox",
                "log_transform",
            )
        },
        "transforms": {name: kind for name, kind in transforms.items() if kind != "none"},
        "stability": screen.as_dict() if screen is not None else stability_summary,
        "c_index_training": {"radiomics": c_radiomics, "integrated": c_integrated},
        "lasso": {
            **summary["lasso"],
            "curve": [
                {
                    "alpha": float(alpha),
                    "mean_c_index": _finite_or_none(float(mean_c)),
                    "se_c_index": _finite_or_none(float(se_c)),
                    "folds_scored": int(scored),
                    "n_nonzero": int(nonzero),
                }
                for alpha, mean_c, se_c, scored, nonzero in zip(
                    selector.alphas_,
                    selector.cv_mean_c_index_,
                    selector.cv_se_c_index_,
                    selector.cv_folds_scored_,
                    selector.n_nonzero_,
                )
            ],
            "fit_warnings": selector.fit_warnings_,
            # The path as fitted (not refitted for the figure): the features non-zero somewhere on it.
            "coefficient_path": {
                "alphas": [float(alpha) for alpha in selector.alphas_],
                "chosen_alpha": selector.alpha_,
                "features": {
                    name: [float(v) for v in selector.coef_path_[j]]
                    for j, name in enumerate(usable_names)
                    if np.any(selector.coef_path_[j] != 0.0)
                },
            },
        },
        "radiomics_cutoff": radiomics_cutoff,
        "risk_cutoff": risk_cutoff,
        "radiomics_only_cox": radiomics_only["table"],
    }
    fitted = FittedIntegratedModel(
        model_mapping=mapping,
        radiomics_score=tuple(float(v) for v in radiomics_score),
        risk_score=tuple(float(v) for v in risk_score),
        diagnostics=diagnostics,
        design={
            "x": x_lasso,
            "names": usable_names,
            "alphas": selector.alphas_[: selector.alpha_index_ + 1],
            "clinical": encoded,
            "survivors": list(survivors),
            "time": time,
            "event": event,
            "feature_names": names,
            "raw": raw,
        },
    )
    fitted.frozen_model()  # refuse to hand back anything the node would refuse to load
    return fitted
