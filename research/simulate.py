"""A simulated training cohort calibrated to Zhao et al. (JITC 2023), with a known truth.

SIMULATED DATA, NOT PATIENTS.  `simulate_cohort` writes, per patient, a
synthetic chest CT phantom (DICOM CT series) and its tumour SEG (DICOM SEG),
a cohort CSV that `research.cohort.load_cohort` reads, and
``simulation_truth.json`` with everything needed to check what a fitted model
recovers.  `simulate_patients` is the pure part (no images, no files), for
checking the calibration on large samples.

Cohort (paper, "Study population" and "Performance of the integrated model
for the control group"): chemoimmunotherapy splits ``train`` 253,
``validation_1`` 51, ``validation_2`` 75, and a chemotherapy-only ``control``
group of 57; ``scale`` shrinks every count (at least 1 each).  Patients are
drawn independently: male 90%, age 62 ± 8.7, stage IV 85%, ECOG < 2 93%,
brain metastases 19%, liver metastases 20% — so the proportions hold in
expectation, not exactly in a small cohort.  Metastases are consistent with M
stage: brain or liver metastases occur only in stage IV and make it M1b
(one site) or M1c; stage III (M0) patients are N2-N3, so every patient is
stage III or IV, as extensive-stage SCLC is.

Images (``phantom="chest-ct"``, the default): a cropped synthetic chest CT
around the tumour (`scoring.training.chest_phantom`): chest wall with fat,
muscle and ribs, mediastinum with heart, great vessels and trachea, lungs
with branching vessels and bronchi, correlated CT noise and partial volume,
and a lobulated heterogeneous tumour, most often hilar-mediastinal; each
patient gets its own in-plane spacing (0.6-1.0 mm) and slice thickness
(1-5 mm).  Three phantom parameters drive the hazard, each uniform in the
population and entering the log-hazard through its population z-score
(``IMAGE_PARAMETERS``): the tumour's texture amplitude (heterogeneity), the
ground-glass peritumoral halo density (the peritumoral signal the paper's
ring captures) and the tumour's equivalent radius (5-30 mm: 0.5-113 ml).
Everything else the phantom draws (location, anatomy, spacing, noise,
lobulation, necrosis, a part-solid rim, the axis ratios) carries no signal:
nuisances the fitting should ignore, as real acquisitions vary.
``phantom="box"`` (the default when ``image_size`` is given) is the former
small lung box (``dicom_io.synthetic.synthetic_chest_phantom``) with the
radius mapped onto 6-12 mm: fast, for tests of the plumbing only.

PFS: proportional hazards with a piecewise-constant baseline hazard
(breaks at 6, 7.1, 9 and 12 months; the 9-12 month hazard continues beyond).
The baseline is solved so that the MARGINAL survival of the chemoimmunotherapy
population hits the paper's Kaplan-Meier figures exactly in expectation:
6/9/12-month PFS 60.7/38.2/28.3% and median 7.1 months; the break at 7.1
exists to pin the median.  The log-hazard adds clinical effects in the
direction the paper reports (T, N and M stage, ECOG, LIPI; ``CLINICAL_EFFECTS``)
and, for chemoimmunotherapy only, the image effects.  The control group has
the same clinical effects, NO image effects (the radiomics signal is a
marker of benefit from chemoimmunotherapy, which the control group does not
get; the paper's integrated model has C-index 0.556 there), and the baseline
scaled so that its median PFS is 5.9 months.

Censoring: administrative, independent, uniform between 2 and 22.2 months
(control: 2-21.6), so the reverse Kaplan-Meier median follow-up is 12.1
(11.8) months.  There is no other loss to follow-up.

OS: progression is followed by death after a post-progression survival time
(Weibull, proportional in ECOG >= 2, liver metastases and LIPI;
``OS_EFFECTS``), with shape and scale solved so that 12- and 18-month OS are
75.0% and 58.5% (paper); the control group's scale is solved for its median
OS of 13.7 months.  Death before progression is not simulated (every PFS
event is a progression), and OS is censored at the same time as PFS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
from scipy.optimize import brentq
from tqdm import tqdm

from sclc_risk_node.dicom_io.synthetic import (
    SyntheticPatient,
    build_tumour_seg,
    synthetic_chest_phantom,
    write_ct_series,
)
from sclc_risk_node.node.errors import NodeError
from sclc_risk_node.node.files import write_atomically
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.training.chest_phantom import (
    IN_PLANE_SPACING_RANGE_MM,
    NOISE_SD_RANGE_HU,
    SLICE_THICKNESSES_MM,
    chest_ct_phantom,
)

_T = TypeVar("_T")

PAPER_SPLIT_SIZES: Mapping[str, int] = MappingProxyType(
    {"train": 253, "validation_1": 51, "validation_2": 75, "control": 57}
)
CHEMOIMMUNOTHERAPY = "chemoimmunotherapy"
CHEMOTHERAPY = "chemotherapy"

#: Published figures the simulation is calibrated to (months, proportions; numbers and month -> proportion tables).
PAPER_TARGETS: Mapping[str, Any] = MappingProxyType(
    {
        "median_pfs_months": 7.1,
        "pfs_at_months": {6: 0.607, 9: 0.382, 12: 0.283},
        "median_follow_up_months": 12.1,
        "os_at_months": {12: 0.75, 18: 0.585},
        "control_median_pfs_months": 5.9,
        "control_median_follow_up_months": 11.8,
        "control_median_os_months": 13.7,
        "male": 0.90,
        "stage_iv": 0.85,
        "ecog_below_2": 0.93,
        "brain_metastases": 0.19,
        "liver_metastases": 0.20,
        "age_mean": 62.0,
        "age_sd": 8.7,
    }
)

# Clinical distributions.  Where the paper gives no figure (T, N, M descriptor,
# LIPI), shares typical of extensive-stage SCLC series.
P_MALE = 0.90
P_STAGE_IV = 0.85
P_BRAIN_GIVEN_STAGE_IV = 0.19 / 0.85
P_LIVER_GIVEN_STAGE_IV = 0.20 / 0.85
P_M1C_GIVEN_ONE_ORGAN_SITE = 0.6
M_STAGE_WITHOUT_BRAIN_OR_LIVER = {"M1a": 0.40, "M1b": 0.20, "M1c": 0.40}
T_STAGE_SHARES = {"T1": 0.12, "T2": 0.23, "T3": 0.25, "T4": 0.40}
N_STAGE_SHARES_STAGE_IV = {"N0": 0.08, "N1": 0.07, "N2": 0.35, "N3": 0.50}
N_STAGE_SHARES_STAGE_III = {"N2": 0.40, "N3": 0.60}
ECOG_SHARES = {0: 0.30, 1: 0.63, 2: 0.06, 3: 0.01}
LIPI_SHARES = {"good": 0.38, "intermediate": 0.44, "poor": 0.18}
AGE_MEAN, AGE_SD, AGE_RANGE = 62.0, 8.7, (30, 90)

#: True log-hazard ratios of the clinical design variables (both arms).
CLINICAL_EFFECTS: Mapping[str, float] = MappingProxyType(
    {
        "t_stage:T3-T4": 0.20,
        "n_stage:N2-N3": 0.25,
        "m_stage:M1c": 0.35,
        "ecog>=2": 0.70,
        "lipi": 0.35,
    }
)
CLINICAL_DESIGN = MappingProxyType(
    {
        "t_stage:T3-T4": "1 if t_stage is T3 or T4",
        "n_stage:N2-N3": "1 if n_stage is N2 or N3",
        "m_stage:M1c": "1 if m_stage is M1c",
        "ecog>=2": "1 if ecog >= 2",
        "lipi": "LIPI factor count: good 0, intermediate 1, poor 2",
    }
)


@dataclass(frozen=True, slots=True)
class ImageParameter:
    """A phantom parameter, uniform on [low, high] in the population, entering the log-hazard as a z-score."""

    low: float
    high: float
    log_hazard_ratio_per_sd: float
    phantom_argument: str
    meaning: str
    expected_features: tuple[str, ...]

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    @property
    def sd(self) -> float:
        return (self.high - self.low) / math.sqrt(12)


IMAGE_PARAMETERS: Mapping[str, ImageParameter] = MappingProxyType(
    {
        "texture_hu": ImageParameter(
            5.0,
            90.0,
            0.40,
            "texture_hu",
            "amplitude (HU, SD) of the tumour's spatially correlated density variation: intratumoral heterogeneity",
            ("tumour.original_firstorder_Variance", "tumour.original_firstorder_InterquartileRange"),
        ),
        "halo_hu": ImageParameter(
            0.0,
            300.0,
            0.35,
            "halo_hu",
            "ground-glass halo added to the lung within 3 mm outside the tumour (HU at the border, fading "
            "linearly): peritumoral infiltration",
            ("ring.original_firstorder_Mean", "ring.original_firstorder_Median"),
        ),
        "radius_mm": ImageParameter(
            5.0,
            30.0,
            0.20,
            "radius_mm",
            "equivalent-sphere radius of the lobulated tumour (mm; 0.5-113 ml, median about 20 ml)",
            ("tumour.original_shape_MeshVolume", "tumour.original_shape_Maximum3DDiameter"),
        ),
    }
)
#: Each semi-axis is the radius times a ratio uniform on this range (normalised to geometric mean 1).
AXIS_RATIO_RANGE = (0.85, 1.15)
HALO_MM = 3.0
#: Phantom kinds: "chest-ct" (scoring.training.chest_phantom: anatomy, clinical spacings, the default) or
#: "box" (the small lung box of dicom_io.synthetic on a fixed grid: fast, for tests of the plumbing).
PHANTOM_KINDS = ("chest-ct", "box")
#: The box phantom maps the radius range onto this one, so its tumours fit a small grid (same z-scores).
BOX_RADIUS_RANGE_MM = (6.0, 12.0)

PFS_BREAKS_MONTHS = (0.0, 6.0, 7.1, 9.0, 12.0)
CENSORING_MONTHS = {CHEMOIMMUNOTHERAPY: (2.0, 22.2), CHEMOTHERAPY: (2.0, 21.6)}

#: True log-hazard ratios of post-progression survival (both arms).
OS_EFFECTS: Mapping[str, float] = MappingProxyType(
    {
        "ecog>=2": 0.50,
        "liver_metastases": 0.45,
        "lipi": 0.30,
    }
)

DEFAULT_IMAGE_SIZE = (64, 64, 32)
DEFAULT_SPACING_MM = (1.0, 1.0, 2.0)
# The ring reaches 2 mm beyond the border and the halo 3 mm; keep a margin of lung around both.
_FIELD_OF_VIEW_MARGIN_MM = 6.0
_REFERENCE_SAMPLE_SIZE = 100_000
_REFERENCE_SEED = 20230706
_TIME_DECIMALS = 2


class SimulationError(NodeError, InputError):
    """The simulated cohort cannot be written as asked."""


@dataclass(frozen=True, slots=True)
class PhantomParameters:
    texture_hu: float
    halo_hu: float
    radius_mm: float
    axis_ratios: tuple[float, float, float]
    seed: int

    @property
    def radii_mm(self) -> tuple[float, float, float]:
        x, y, z = self.axis_ratios
        return self.radius_mm * x, self.radius_mm * y, self.radius_mm * z

    @property
    def box_radii_mm(self) -> tuple[float, float, float]:
        """The semi-axes in the small "box" phantom: the radius mapped linearly onto `BOX_RADIUS_RANGE_MM`."""
        low, high = IMAGE_PARAMETERS["radius_mm"].low, IMAGE_PARAMETERS["radius_mm"].high
        box_low, box_high = BOX_RADIUS_RANGE_MM
        radius = box_low + (self.radius_mm - low) * (box_high - box_low) / (high - low)
        x, y, z = self.axis_ratios
        return radius * x, radius * y, radius * z


@dataclass(frozen=True, slots=True)
class SimulatedPatient:
    """One simulated patient: clinical values as cohort-CSV fields, phantom, true log-hazard and outcomes."""

    id: str
    split: str
    arm: str
    clinical: Mapping[str, ClinicalValue]
    phantom: PhantomParameters
    linear_predictor: float
    pfs_months: float
    pfs_event: bool
    os_months: float
    os_event: bool


@dataclass(frozen=True, slots=True)
class PfsBaseline:
    """Piecewise-constant baseline hazard: ``hazards[k]`` per month on [breaks[k], breaks[k+1]), the last one onwards."""

    breaks: tuple[float, ...]
    hazards: tuple[float, ...]

    def cumulative(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=float)
        total = np.zeros_like(t)
        edges = list(self.breaks) + [math.inf]
        for k, hazard in enumerate(self.hazards):
            total += hazard * np.clip(t - edges[k], 0.0, edges[k + 1] - edges[k])
        return total

    def inverse_cumulative(self, target: np.ndarray) -> np.ndarray:
        """The time at which the cumulative baseline hazard reaches ``target``."""
        target = np.asarray(target, dtype=float)
        result = np.empty_like(target)
        edges = list(self.breaks) + [math.inf]
        start = 0.0
        remaining = np.ones(target.shape, dtype=bool)
        for k, hazard in enumerate(self.hazards):
            width = edges[k + 1] - edges[k]
            end = start + hazard * width
            here = remaining & (target <= end)
            result[here] = edges[k] + (target[here] - start) / hazard
            remaining &= ~here
            start = end
        return result


@dataclass(frozen=True, slots=True)
class OsModel:
    """Post-progression survival: Weibull, ``S(u) = exp(-(u / scale)^shape * exp(OS_EFFECTS · x))``."""

    shape: float
    scale_months: float


def split_sizes(scale: float = 1.0) -> dict[str, int]:
    """The paper's split sizes times ``scale``, rounded, at least 1 each."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise SimulationError(f"scale: {scale!r} is not allowed (allowed: a number > 0)")
    return {split: max(1, round(n * scale)) for split, n in PAPER_SPLIT_SIZES.items()}


def arm_of(split: str) -> str:
    return CHEMOTHERAPY if split == "control" else CHEMOIMMUNOTHERAPY


def simulate_patients(counts: Mapping[str, int], *, seed: int = 2023) -> tuple[SimulatedPatient, ...]:
    """Clinical values, phantom parameters, true log-hazard and outcomes for ``counts`` patients per split.

    Pure and deterministic: the same ``counts`` and ``seed`` give the same
    patients, and each split's patients depend only on the seed and the
    split's position and size (ids run on across splits).
    """
    patients: list[SimulatedPatient] = []
    for index, (split, n) in enumerate(counts.items()):
        if n < 0:
            raise SimulationError(f"counts: {split} has {n} patients (allowed: 0 or more)")
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        arm = arm_of(split)
        draws = _draw_covariates(n, rng)
        lp = _linear_predictor(draws, arm)
        pfs, pfs_event, os_time, os_event = _draw_outcomes(draws, lp, arm, rng)
        seeds = rng.integers(0, 2**31 - 1, size=n)
        for i in range(n):
            patients.append(
                SimulatedPatient(
                    id=f"SIM{len(patients) + 1:04d}",
                    split=split,
                    arm=arm,
                    clinical=MappingProxyType(_clinical_fields(draws, i)),
                    phantom=PhantomParameters(
                        texture_hu=float(draws["texture_hu"][i]),
                        halo_hu=float(draws["halo_hu"][i]),
                        radius_mm=float(draws["radius_mm"][i]),
                        axis_ratios=_triple(float(r) for r in draws["axis_ratios"][i]),
                        seed=int(seeds[i]),
                    ),
                    linear_predictor=float(lp[i]),
                    pfs_months=float(pfs[i]),
                    pfs_event=bool(pfs_event[i]),
                    os_months=float(os_time[i]),
                    os_event=bool(os_event[i]),
                )
            )
    return tuple(patients)


def _choice(rng: np.random.Generator, shares: Mapping, n: int) -> np.ndarray:
    levels = list(shares)
    picked = rng.choice(len(levels), size=n, p=np.array(list(shares.values())) / sum(shares.values()))
    return np.array(levels, dtype=object)[picked]


def _draw_covariates(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    male = rng.random(n) < P_MALE
    age = np.clip(np.rint(rng.normal(AGE_MEAN, AGE_SD, n)), *AGE_RANGE)
    stage_iv = rng.random(n) < P_STAGE_IV
    brain = stage_iv & (rng.random(n) < P_BRAIN_GIVEN_STAGE_IV)
    liver = stage_iv & (rng.random(n) < P_LIVER_GIVEN_STAGE_IV)
    organ_sites = brain.astype(int) + liver.astype(int)
    m_without = _choice(rng, M_STAGE_WITHOUT_BRAIN_OR_LIVER, n)
    m_one_site = np.where(rng.random(n) < P_M1C_GIVEN_ONE_ORGAN_SITE, "M1c", "M1b")
    m_stage = np.where(
        ~stage_iv, "M0", np.where(organ_sites == 2, "M1c", np.where(organ_sites == 1, m_one_site, m_without))
    )
    t_stage = _choice(rng, T_STAGE_SHARES, n)
    n_stage = np.where(stage_iv, _choice(rng, N_STAGE_SHARES_STAGE_IV, n), _choice(rng, N_STAGE_SHARES_STAGE_III, n))
    ecog = _choice(rng, ECOG_SHARES, n).astype(int)
    lipi = _choice(rng, LIPI_SHARES, n)
    image = {name: rng.uniform(parameter.low, parameter.high, n) for name, parameter in IMAGE_PARAMETERS.items()}
    ratios = rng.uniform(*AXIS_RATIO_RANGE, size=(n, 3))
    ratios /= np.prod(ratios, axis=1, keepdims=True) ** (1 / 3)
    return {
        "sex": np.where(male, "M", "F"),
        "age": age,
        "t_stage": t_stage,
        "n_stage": n_stage,
        "m_stage": m_stage.astype(object),
        "ecog": ecog,
        "lipi": lipi,
        "brain_metastases": brain,
        "liver_metastases": liver,
        "axis_ratios": ratios,
        **image,
    }


_LIPI_FACTORS = {"good": 0, "intermediate": 1, "poor": 2}


def clinical_design(draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The clinical design variables of `CLINICAL_EFFECTS` (and liver metastases, for OS) as arrays."""
    return {
        "t_stage:T3-T4": np.isin(draws["t_stage"], ["T3", "T4"]).astype(float),
        "n_stage:N2-N3": np.isin(draws["n_stage"], ["N2", "N3"]).astype(float),
        "m_stage:M1c": (draws["m_stage"] == "M1c").astype(float),
        "ecog>=2": (np.asarray(draws["ecog"]) >= 2).astype(float),
        "lipi": np.array([_LIPI_FACTORS[level] for level in draws["lipi"]], dtype=float),
        "liver_metastases": np.asarray(draws["liver_metastases"], dtype=float),
    }


def image_z_scores(draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (np.asarray(draws[name]) - p.mean) / p.sd for name, p in IMAGE_PARAMETERS.items()}


def _linear_predictor(draws: Mapping[str, np.ndarray], arm: str) -> np.ndarray:
    design = clinical_design(draws)
    n = len(draws["ecog"])
    lp = np.zeros(n)
    for name, beta in CLINICAL_EFFECTS.items():
        lp += beta * design[name]
    if arm == CHEMOIMMUNOTHERAPY:
        for name, z in image_z_scores(draws).items():
            lp += IMAGE_PARAMETERS[name].log_hazard_ratio_per_sd * z
    return lp


def _os_linear_predictor(draws: Mapping[str, np.ndarray]) -> np.ndarray:
    design = clinical_design(draws)
    terms = [beta * design[name] for name, beta in OS_EFFECTS.items()]
    lp = terms[0]
    for term in terms[1:]:  # the same sums, in the same order, as sum(terms)
        lp = lp + term
    return lp


def _draw_outcomes(draws, lp: np.ndarray, arm: str, rng: np.random.Generator):
    n = len(lp)
    baseline = pfs_baseline(arm)
    progression = baseline.inverse_cumulative(rng.exponential(size=n) * np.exp(-lp))
    low, high = CENSORING_MONTHS[arm]
    censoring = rng.uniform(low, high, size=n)
    model = os_model(arm)
    post_progression = _weibull_times(rng.exponential(size=n), _os_linear_predictor(draws), model)
    # Rounded as a registry would record them; never to zero.
    censoring = np.maximum(np.round(censoring, _TIME_DECIMALS), 10.0**-_TIME_DECIMALS)
    progression = np.maximum(np.round(progression, _TIME_DECIMALS), 10.0**-_TIME_DECIMALS)
    death = np.round(progression + post_progression, _TIME_DECIMALS)
    pfs_event = progression <= censoring
    pfs = np.where(pfs_event, progression, censoring)
    os_event = death <= censoring
    os_time = np.where(os_event, death, censoring)
    return pfs, pfs_event, os_time, os_event


def _weibull_times(exponential: np.ndarray, lp: np.ndarray, model: OsModel) -> np.ndarray:
    return model.scale_months * (exponential * np.exp(-lp)) ** (1 / model.shape)


#: A clinical value as the cohort CSV's field: a code, a count (ECOG, age) or a yes/no.
ClinicalValue = str | int | bool


def _clinical_fields(draws: Mapping[str, np.ndarray], i: int) -> dict[str, ClinicalValue]:
    return {
        "t_stage": str(draws["t_stage"][i]),
        "n_stage": str(draws["n_stage"][i]),
        "m_stage": str(draws["m_stage"][i]),
        "ecog": int(draws["ecog"][i]),
        "lipi": str(draws["lipi"][i]),
        "age": int(draws["age"][i]),
        "sex": str(draws["sex"][i]),
        "brain_metastases": bool(draws["brain_metastases"][i]),
        "liver_metastases": bool(draws["liver_metastases"][i]),
    }


# ---------------------------------------------------------------------------
# Calibration: baseline hazards solved on a large fixed reference population.


@functools.cache
def _reference_population(arm: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(_REFERENCE_SEED)
    draws = _draw_covariates(_REFERENCE_SAMPLE_SIZE, rng)
    return draws, _linear_predictor(draws, arm)


@functools.cache
def pfs_baseline(arm: str) -> PfsBaseline:
    """The baseline hazard whose marginal PFS in ``arm``'s population matches the paper (see module doc)."""
    if arm == CHEMOIMMUNOTHERAPY:
        return _calibrated_chemoimmunotherapy_baseline()
    if arm == CHEMOTHERAPY:
        _, lp = _reference_population(CHEMOTHERAPY)
        shape = _calibrated_chemoimmunotherapy_baseline()
        target_time = PAPER_TARGETS["control_median_pfs_months"]
        at_target = float(shape.cumulative(np.array([target_time]))[0])
        # Scale the chemoimmunotherapy shape so that the marginal median lands on target.
        cumulative = _solve_cumulative_hazard(lp, 0.5)
        factor = cumulative / at_target
        return PfsBaseline(shape.breaks, tuple(h * factor for h in shape.hazards))
    raise ValueError(f"unknown arm {arm!r}")


def _calibrated_chemoimmunotherapy_baseline() -> PfsBaseline:
    _, lp = _reference_population(CHEMOIMMUNOTHERAPY)
    pfs_at = PAPER_TARGETS["pfs_at_months"]
    targets = {6.0: pfs_at[6], 7.1: 0.5, 9.0: pfs_at[9], 12.0: pfs_at[12]}
    hazards, previous_time, previous_cumulative = [], 0.0, 0.0
    for time, survival in targets.items():
        cumulative = _solve_cumulative_hazard(lp, survival)
        hazards.append((cumulative - previous_cumulative) / (time - previous_time))
        previous_time, previous_cumulative = time, cumulative
    hazards.append(hazards[-1])
    return PfsBaseline(PFS_BREAKS_MONTHS, tuple(hazards))


def _solve_cumulative_hazard(lp: np.ndarray, survival: float) -> float:
    """The baseline cumulative hazard H with mean(exp(-H e^lp)) = survival."""
    risk = np.exp(lp)
    return brentq(lambda h: float(np.mean(np.exp(-h * risk))) - survival, 1e-9, 100.0, xtol=1e-12)


@functools.cache
def os_model(arm: str) -> OsModel:
    """Post-progression survival solved so the marginal OS matches the paper (see module doc)."""
    draws, lp = _reference_population(arm)
    rng = np.random.default_rng(_REFERENCE_SEED + 1)
    n = len(lp)
    progression = pfs_baseline(arm).inverse_cumulative(rng.exponential(size=n) * np.exp(-lp))
    unit = rng.exponential(size=n) * np.exp(-_os_linear_predictor(draws))

    def survival(at: float, shape: float, scale: float) -> float:
        return float(np.mean(progression + scale * unit ** (1 / shape) > at))

    def scale_for(at: float, target: float, shape: float) -> float:
        return brentq(lambda scale: survival(at, shape, scale) - target, 0.1, 500.0, xtol=1e-6)

    os_at = PAPER_TARGETS["os_at_months"]
    if arm == CHEMOIMMUNOTHERAPY:

        def mismatch_at_18(shape: float) -> float:
            return survival(18.0, shape, scale_for(12.0, os_at[12], shape)) - os_at[18]

        shape = brentq(mismatch_at_18, 0.3, 5.0, xtol=1e-4)
        return OsModel(shape, scale_for(12.0, os_at[12], shape))
    shape = os_model(CHEMOIMMUNOTHERAPY).shape
    return OsModel(shape, scale_for(PAPER_TARGETS["control_median_os_months"], 0.5, shape))


# ---------------------------------------------------------------------------
# Writing the cohort.


def simulate_cohort(
    out_dir: Path,
    *,
    seed: int = 2023,
    scale: float = 1.0,
    phantom: str | None = None,
    image_size: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write a simulated cohort into ``out_dir`` (new or empty); return the cohort CSV's path.

    Layout: ``cohort.csv``, ``simulation_truth.json`` and, per patient,
    ``images/<id>/ct/*.dcm`` (CT series) and ``images/<id>/seg.dcm``.  The
    CSV is written last, so a CSV present means a complete cohort.

    ``phantom`` is "chest-ct" (the default: cropped chest CT with anatomy,
    spacings drawn per patient; `scoring.training.chest_phantom`) or "box" (the
    small lung box of ``image_size`` voxels of ``spacing_mm``; the default
    when ``image_size`` is given).  ``workers`` processes write the
    phantoms (default: the CPU count).
    """
    out_dir = Path(out_dir)
    kind = phantom or ("box" if image_size is not None else "chest-ct")
    if kind not in PHANTOM_KINDS:
        raise SimulationError(f"phantom: {kind!r} is not allowed (allowed: {', '.join(PHANTOM_KINDS)})")
    if kind == "chest-ct" and image_size is not None:
        raise SimulationError(
            "image_size: the chest-ct phantom draws its own grid (allowed: image_size only with phantom='box')"
        )
    image_size = _triple(image_size or DEFAULT_IMAGE_SIZE)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SimulationError(f"{out_dir} exists and is not an empty folder (allowed: a new or empty folder)")
    counts = split_sizes(scale)
    patients = simulate_patients(counts, seed=seed)
    if kind == "box":
        _check_field_of_view(patients, image_size, spacing_mm)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, layouts = [], {}
    # Plain dicts: read-only mapping proxies do not pickle to worker processes.
    jobs = [
        (out_dir, dataclasses.replace(patient, clinical=dict(patient.clinical)), kind, image_size, spacing_mm)
        for patient in patients
    ]
    workers = min(len(jobs), os.cpu_count() or 1) if workers is None else workers
    if not (isinstance(workers, int) and workers >= 1):
        raise SimulationError(f"workers: {workers!r} is not allowed (allowed: an integer >= 1)")
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # Each phantom depends only on its own seed, so the order of work does not change the files.
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_itk_thread
                )
            )
            written = pool.map(_write_patient_job, jobs)
        else:
            written = map(_write_patient_job, jobs)
        for patient, (row, layout) in zip(
            patients,
            tqdm(
                written, total=len(jobs), desc="writing phantoms", unit="patient", file=sys.stderr, disable=not progress
            ),
        ):
            rows.append(row)
            layouts[patient.id] = layout
    write_atomically(
        out_dir / "simulation_truth.json",
        json.dumps(
            _truth(
                patients,
                seed=seed,
                scale=scale,
                counts=counts,
                kind=kind,
                image_size=image_size,
                spacing_mm=spacing_mm,
                layouts=layouts,
            ),
            indent=2,
        )
        + "\n",
    )
    csv_path = out_dir / "cohort.csv"
    write_atomically(csv_path, _cohort_csv(rows))
    return csv_path


def _check_field_of_view(patients, image_size, spacing_mm) -> None:
    for axis, (n, spacing) in enumerate(zip(image_size, spacing_mm)):
        reach = max(p.phantom.box_radii_mm[axis] for p in patients) + HALO_MM + _FIELD_OF_VIEW_MARGIN_MM
        half_field = (n - 1) / 2 * spacing
        if reach > half_field:
            needed = math.ceil(2 * reach / spacing) + 1
            raise SimulationError(
                f"image_size {tuple(image_size)} is too small on axis {'xyz'[axis]}: the largest tumour with its "
                f"halo reaches {reach:.1f} mm from the centre (allowed: at least {needed} voxels of {spacing:g} mm)"
            )


def _triple(values: Iterable[_T]) -> tuple[_T, _T, _T]:
    """(x, y, z) from any iterable of three (a list from JSON, a generator)."""
    x, y, z = values
    return x, y, z


def phantom_images(
    phantom: PhantomParameters,
    kind: str = "chest-ct",
    image_size: tuple[int, int, int] = DEFAULT_IMAGE_SIZE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> tuple[sitk.Image, sitk.Image, dict[str, object]]:
    """One patient's CT (HU) and tumour mask, and what was drawn (for ``simulation_truth.json``)."""
    if kind == "chest-ct":
        image, mask, layout = chest_ct_phantom(
            radius_mm=phantom.radius_mm,
            axis_ratios=phantom.axis_ratios,
            texture_hu=phantom.texture_hu,
            halo_hu=phantom.halo_hu,
            halo_mm=HALO_MM,
            seed=phantom.seed,
        )
        return image, mask, {name: getattr(layout, name) for name in layout.__slots__}
    image, mask = synthetic_chest_phantom(
        size=_triple(image_size),
        spacing_mm=_triple(spacing_mm),
        tumour_radii_mm=phantom.box_radii_mm,
        texture_hu=phantom.texture_hu,
        halo_hu=phantom.halo_hu,
        halo_mm=HALO_MM,
        seed=phantom.seed,
    )
    return image, mask, {"radii_mm": list(phantom.box_radii_mm)}


def _one_itk_thread() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _write_patient_job(job) -> tuple[dict[str, object], dict[str, object]]:
    return _write_patient(*job)


def _write_patient(out_dir: Path, patient: SimulatedPatient, kind, image_size, spacing_mm):
    image, mask, layout = phantom_images(patient.phantom, kind, image_size, spacing_mm)
    number = int(patient.id.removeprefix("SIM"))
    identity = SyntheticPatient(
        patient_id=patient.id,
        patient_name=f"Simulated^{patient.id}",
        patient_birth_date=f"{2026 - int(patient.clinical['age'])}0101",
        patient_sex=str(patient.clinical["sex"]),
        accession_number=f"SIMACC{number:06d}",
    )
    folder = out_dir / "images" / patient.id
    datasets = write_ct_series(image, folder / "ct", identity, series_description="Simulated chest CT (phantom)")
    build_tumour_seg(datasets, mask).save_as(folder / "seg.dcm", enforce_file_format=True)
    clinical = dict(patient.clinical)
    # Fail here, not in the researcher's training run, if the simulator ever drifts from the schema.
    record: dict[object, object] = {name: value for name, value in clinical.items()}
    record["patient_id"] = patient.id
    clinical_record_from_mapping(record)
    return {
        "id": patient.id,
        "split": patient.split,
        "pfs_months": f"{patient.pfs_months:.{_TIME_DECIMALS}f}",
        "pfs_event": int(patient.pfs_event),
        "os_months": f"{patient.os_months:.{_TIME_DECIMALS}f}",
        "os_event": int(patient.os_event),
        **{name: _csv_value(value) for name, value in clinical.items()},
        "ct": f"images/{patient.id}/ct",
        "seg": f"images/{patient.id}/seg.dcm",
    }, layout


def _csv_value(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _cohort_csv(rows: Sequence[dict[str, object]]) -> str:
    from sclc_risk_node.node.csv_export import csv_text  # spreadsheet formula prefixes neutralised

    return csv_text(rows, list(rows[0]))


def _truth(patients, *, seed, scale, counts, kind, image_size, spacing_mm, layouts) -> dict[str, object]:
    arms = (CHEMOIMMUNOTHERAPY, CHEMOTHERAPY)
    return {
        "description": "SIMULATED cohort (research.simulate): synthetic phantoms, simulated clinical data "
        "and outcomes; no real patient.  Model and calibration: see the module docstring.",
        "seed": seed,
        "scale": scale,
        "split_sizes": counts,
        "arm_of_split": {split: arm_of(split) for split in counts},
        "phantom": {"kind": kind, "halo_mm": HALO_MM, "axis_ratio_range": list(AXIS_RATIO_RANGE)}
        | (
            {
                "image_size": list(image_size),
                "spacing_mm": list(spacing_mm),
                "radius_range_mm": list(BOX_RADIUS_RANGE_MM),
            }
            if kind == "box"
            else {
                "generator": "sclc_risk_node.scoring.training.chest_phantom.chest_ct_phantom",
                "slice_thicknesses_mm": list(SLICE_THICKNESSES_MM),
                "in_plane_spacing_range_mm": list(IN_PLANE_SPACING_RANGE_MM),
                "noise_sd_range_hu": list(NOISE_SD_RANGE_HU),
            }
        ),
        "pfs_model": {
            "kind": "proportional hazards, piecewise-constant baseline hazard per month; "
            "log-hazard = sum(coefficient * design variable) + sum(coefficient * image z-score)",
            "time_unit": "months",
            "baseline_hazard": {
                arm: {"breaks": list(pfs_baseline(arm).breaks), "hazards": list(pfs_baseline(arm).hazards)}
                for arm in arms
            },
            "clinical_design": dict(CLINICAL_DESIGN),
            "clinical_log_hazard_ratios": {arm: dict(CLINICAL_EFFECTS) for arm in arms},
            "image_log_hazard_ratios_per_sd": {
                CHEMOIMMUNOTHERAPY: {n: p.log_hazard_ratio_per_sd for n, p in IMAGE_PARAMETERS.items()},
                CHEMOTHERAPY: {n: 0.0 for n in IMAGE_PARAMETERS},
            },
            "censoring": {arm: {"kind": "uniform", "months": list(CENSORING_MONTHS[arm])} for arm in arms},
        },
        "image_parameters": {
            name: {
                "drives_hazard": p.log_hazard_ratio_per_sd != 0,
                "distribution": "uniform",
                "low": p.low,
                "high": p.high,
                "mean": p.mean,
                "sd": p.sd,
                "z_score": f"({name} - {p.mean:g}) / {p.sd:.6g}",
                "log_hazard_ratio_per_unit": p.log_hazard_ratio_per_sd / p.sd,
                "phantom_argument": p.phantom_argument,
                "meaning": p.meaning,
                "expected_features": list(p.expected_features),
            }
            for name, p in IMAGE_PARAMETERS.items()
        }
        | {"axis_ratios": {"drives_hazard": False, "meaning": "tumour elongation: a nuisance with no effect"}},
        "os_model": {
            "kind": "death = progression + post-progression survival (Weibull proportional hazards); "
            "no death before progression; censored with PFS",
            "post_progression_weibull": {
                arm: {"shape": os_model(arm).shape, "scale_months": os_model(arm).scale_months} for arm in arms
            },
            "log_hazard_ratios": dict(OS_EFFECTS),
        },
        "paper_targets": json.loads(json.dumps(dict(PAPER_TARGETS))),
        "realised": {split: _summary([p for p in patients if p.split == split]) for split in counts}
        | {"chemoimmunotherapy (all)": _summary([p for p in patients if p.arm == CHEMOIMMUNOTHERAPY])},
        "patients": [
            {
                "id": p.id,
                "split": p.split,
                "arm": p.arm,
                "texture_hu": p.phantom.texture_hu,
                "halo_hu": p.phantom.halo_hu,
                "radius_mm": p.phantom.radius_mm,
                "radii_mm": list(p.phantom.radii_mm),
                "phantom_seed": p.phantom.seed,
                "linear_predictor": p.linear_predictor,
                "drawn": _plain_layout(layouts.get(p.id, {})),
            }
            for p in patients
        ],
    }


def _plain_layout(layout: Mapping[str, object]) -> dict[str, object]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in layout.items()}


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: the distinct event times and the survival just after each."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    order = np.argsort(time, kind="stable")
    times, first, inverse = np.unique(time[order], return_index=True, return_inverse=True)
    at_risk = len(time) - first
    events = np.bincount(inverse, weights=event[order].astype(float), minlength=len(times))
    observed = events > 0
    return times[observed], np.cumprod(1.0 - events[observed] / at_risk[observed])


def survival_at(times: np.ndarray, survival: np.ndarray, at: float) -> float:
    index = np.searchsorted(times, at, side="right") - 1
    return 1.0 if index < 0 else float(survival[index])


def median_time(times: np.ndarray, survival: np.ndarray) -> float | None:
    below = np.nonzero(survival <= 0.5)[0]
    return float(times[below[0]]) if below.size else None


def _summary(patients: Sequence[SimulatedPatient]) -> dict[str, object]:
    if not patients:
        return {"n": 0}
    time = np.array([p.pfs_months for p in patients])
    event = np.array([p.pfs_event for p in patients])
    t, s = kaplan_meier(time, event)
    rt, rs = kaplan_meier(time, ~event)
    return {
        "n": len(patients),
        "pfs_events": int(event.sum()),
        "median_pfs_months": median_time(t, s),
        "pfs_at_months": {m: round(survival_at(t, s, m), 4) for m in (6, 9, 12)},
        "median_follow_up_months": median_time(rt, rs),
    }
