"""The perturbation stability screen: keep the features that survive small, plausible changes of the input.

After Zwanenburg et al., "Assessing robustness of radiomic features by image
perturbation", Sci Rep 2019;9:614.  A subsample of training patients is
re-extracted under each perturbation (the mask grown and shrunk by one voxel,
added Gaussian noise, a sub-voxel shift of the sampling grid;
`research.extraction.Perturbation`).  For every candidate feature, the
original and the perturbed values of those patients form a patients x
extractions table, and its intraclass correlation coefficient decides: a
feature with ICC >= the spec's ``icc_threshold`` (default 0.75) goes on to
LASSO, the others are dropped and reported.

Which ICC.  Shrout & Fleiss (Psychol Bull 1979;86:420-8) define them from the
one- and two-way ANOVA mean squares of an n targets x k raters table:

* ICC(1,1) = (MSR - MSW) / (MSR + (k-1) MSW)  -- one-way random effects,
  absolute agreement, single measurement;
* ICC(3,1) = (MSR - MSE) / (MSR + (k-1) MSE)  -- two-way mixed effects,
  consistency, single measurement;

with MSR the between-patients mean square, MSW the within-patient mean
square and MSE the residual mean square once the raters' (perturbations')
means are removed.  The default is ICC(1,1), as Zwanenburg et al. used: the
frozen model applies the *training* mean and SD to one extraction of a new
scan, so a perturbation that shifts a feature for every patient alike (a
one-voxel dilation adds volume to all) is as harmful as one that reorders
patients, and only an absolute-agreement ICC counts it.  ICC(3,1) ignores
such systematic shifts; it is offered for comparison with studies that used it.

No maintained ICC implementation (pingouin, R's ``psych::ICC``) is a
dependency of the node, so the two formulas are implemented here and checked
against Shrout & Fleiss' worked example (their Table 2: ICC(1,1) = 0.17,
ICC(3,1) = 0.71) in ``tests/scoring/test_training_stability.py``.

Pure: tables in, plain values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ICC_FORMULAS", "StabilityScreen", "icc", "icc_per_feature", "stability_screen"]

ICC_FORMULAS = {
    "ICC(1,1)": "(MSR - MSW) / (MSR + (k-1) MSW); one-way random effects, absolute agreement, single measurement",
    "ICC(3,1)": "(MSR - MSE) / (MSR + (k-1) MSE); two-way mixed effects, consistency, single measurement",
}
#: Fewer complete patients than this give no ICC for a feature.
MIN_PATIENTS = 3


def _mean_squares(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(MSR, MSW, MSE) of an (n patients, k extractions, p features) array, one value per feature."""
    n, k = values.shape[0], values.shape[1]
    grand = values.mean(axis=(0, 1))
    patient_means = values.mean(axis=1)
    rater_means = values.mean(axis=0)
    ss_rows = k * np.sum((patient_means - grand) ** 2, axis=0)
    ss_within = np.sum((values - patient_means[:, None, :]) ** 2, axis=(0, 1))
    ss_raters = n * np.sum((rater_means - grand) ** 2, axis=0)
    ss_error = ss_within - ss_raters
    msr = ss_rows / (n - 1)
    msw = ss_within / (n * (k - 1))
    mse = ss_error / ((n - 1) * (k - 1))
    return msr, msw, mse


def icc(table: np.ndarray | Sequence[Sequence[float]], kind: str = "ICC(1,1)") -> float | None:
    """ICC of an n targets x k raters table (module docstring); None when undefined (no variance at all)."""
    values = np.asarray(table, dtype=float)
    if values.ndim != 2 or values.shape[0] < 2 or values.shape[1] < 2:
        raise ValueError(f"ICC needs a table of at least 2 targets x 2 raters, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("ICC table has non-finite values")
    result = _icc_from_squares(*_mean_squares(values[:, :, None]), values.shape[1], kind)[0]
    return None if not math.isfinite(result) else float(result)


def _icc_from_squares(msr: np.ndarray, msw: np.ndarray, mse: np.ndarray, k: int, kind: str) -> np.ndarray:
    if kind not in ICC_FORMULAS:
        raise ValueError(f"ICC kind {kind!r} is not one of {', '.join(ICC_FORMULAS)}")
    error = msw if kind == "ICC(1,1)" else mse
    denominator = msr + (k - 1) * error
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (msr - error) / np.where(denominator > 0, denominator, 1.0), np.nan)


def icc_per_feature(values: np.ndarray, kind: str = "ICC(1,1)") -> tuple[np.ndarray, np.ndarray]:
    """ICC of every feature of an (n, k, p) array and the number of patients it used.

    Per feature, only patients with a finite value in every extraction count
    (a perturbation can make a feature incomputable for one patient); fewer
    than `MIN_PATIENTS` such patients, or no variance at all, give NaN.
    """
    n, k, p = values.shape
    complete = np.isfinite(values).all(axis=1)  # (n, p)
    result = np.full(p, np.nan)
    used = complete.sum(axis=0)
    # Features sharing the same set of complete patients are computed together.
    patterns: dict[bytes, list[int]] = {}
    for j in range(p):
        patterns.setdefault(complete[:, j].tobytes(), []).append(j)
    for key, columns in patterns.items():
        rows = np.frombuffer(key, dtype=bool)
        if rows.sum() < MIN_PATIENTS:
            continue
        block = values[rows][:, :, columns]
        result[columns] = _icc_from_squares(*_mean_squares(block), k, kind)
    return result, used


@dataclass(frozen=True)
class StabilityScreen:
    """The screen's outcome: which features pass, their ICCs, and the settings (`as_dict` is JSON data)."""

    settings: Mapping[str, Any]
    patients: int
    extractions: tuple[str, ...]
    icc: Mapping[str, float | None]
    patients_used: Mapping[str, int]
    kept: tuple[str, ...]
    dropped: tuple[str, ...]
    note: str | None = None
    formula: str = field(default="")

    def summary(self) -> dict[str, Any]:
        """What the model file records (no per-feature values)."""
        return {
            **dict(self.settings),
            "ran": True,
            "patients_screened": self.patients,
            "extractions": list(self.extractions),
            "icc_formula": self.formula,
            "features_screened": len(self.icc),
            "features_kept": len(self.kept),
            "features_dropped": len(self.dropped),
            "note": self.note,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "features": [
                {"name": name, "icc": value, "patients": int(self.patients_used[name]), "kept": name in set(self.kept)}
                for name, value in self.icc.items()
            ],
        }


def stability_screen(
    original: pd.DataFrame,
    perturbed: Mapping[str, pd.DataFrame],
    *,
    threshold: float,
    kind: str = "ICC(1,1)",
    settings: Mapping[str, Any] | None = None,
) -> StabilityScreen:
    """Screen every column of ``original`` by its ICC over the original and the ``perturbed`` extractions.

    ``original``: rows = the screened patients (index = their ids), columns =
    candidate features, values on the scale the model will see (after any log
    transform).  ``perturbed``: perturbation name -> a table with the same
    index labels (rows may be missing: a patient whose perturbed extraction
    failed is left out of the screen) and the same columns (missing columns
    count as not computable).  A feature is kept when its ICC >= ``threshold``;
    a feature with no ICC (too few complete patients, or constant) is dropped.
    """
    if not perturbed:
        raise ValueError("stability screen needs at least one perturbed extraction")
    names = [str(c) for c in original.columns]
    ids = [pid for pid in original.index if all(pid in table.index for table in perturbed.values())]
    extractions = ("original", *perturbed)
    stack = [original.loc[ids, names].to_numpy(dtype=float)]
    for table in perturbed.values():
        stack.append(table.reindex(index=ids, columns=names).to_numpy(dtype=float))
    values = np.stack(stack, axis=1) if ids else np.empty((0, len(extractions), len(names)))
    if len(ids) < MIN_PATIENTS:
        coefficients, used = np.full(len(names), np.nan), np.zeros(len(names), dtype=int)
    else:
        coefficients, used = icc_per_feature(values, kind)
    keep = np.isfinite(coefficients) & (coefficients >= threshold)
    return StabilityScreen(
        settings=dict(settings or {}),
        patients=len(ids),
        extractions=extractions,
        icc={name: (float(c) if math.isfinite(c) else None) for name, c in zip(names, coefficients)},
        patients_used={name: int(u) for name, u in zip(names, used)},
        kept=tuple(name for name, k in zip(names, keep) if k),
        dropped=tuple(name for name, k in zip(names, keep) if not k),
        formula=f"{kind} = {ICC_FORMULAS[kind]} (Shrout & Fleiss 1979)",
    )
