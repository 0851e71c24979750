#!/usr/bin/env python3
"""Fit and freeze the shipped DEMONSTRATION model on a simulated cohort.

    python scripts/make_demo_model.py [--n 240] [--seed 20231124] [--out models/demo-integrated-cox-1.0.0.json]

The cohort is simulated, not real, and the model is NOT for clinical use:

* Images: for each patient, a synthetic chest CT phantom (lung-like background,
  one textured ellipsoidal tumour; ``dicom_io.synthetic.synthetic_chest_phantom``)
  whose tumour size, texture amplitude and ground-glass peritumoral halo vary
  between patients.
* Clinical fields: T, N, M stage, ECOG and LIPI drawn with frequencies in the
  range the paper reports for ES-SCLC (stage IV ~85%, ECOG < 2 ~93%).
* Outcome: PFS in months from a Weibull proportional-hazards model whose
  log-hazard rises with texture amplitude, tumour size, halo density,
  ECOG >= 2, LIPI, N2-3 and M1c; scaled so the cohort's median PFS is about 7 months, with
  administrative censoring giving a median follow-up of about 12 months.

Fitting follows the paper's outline in a reduced form (the training-pipeline
issue replaces this with the full method): z-scored candidate features ->
LASSO-Cox (scikit-survival ``CoxnetSurvivalAnalysis``, l1_ratio 1) with
10-fold cross-validated alpha -> radiomics score from the non-zero
coefficients (median cut-off) -> multivariate Cox (Efron) of the radiomics score
with the clinical covariates -> median risk cut-off and the Breslow baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import radiomics
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold
from sksurv.linear_model import CoxnetSurvivalAnalysis, CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_io.synthetic import synthetic_chest_phantom  # noqa: E402
from scoring.clinical import clinical_record_from_mapping  # noqa: E402
from scoring.features import extract_model_features  # noqa: E402
from scoring.model import FrozenModel, seal  # noqa: E402
from scoring.ring import peritumoral_ring  # noqa: E402
from scoring.types import ExtractionSettings, FeatureSpec, RingDefinition  # noqa: E402

MODEL_NAME = "demo-integrated-cox"
MODEL_VERSION = "1.0.0"
INTENDED_USE = (
    "Demonstration model — not for clinical use. Fitted on a simulated cohort of synthetic CT "
    "phantoms and simulated clinical data to exercise sclc-risk-node end to end. Its scores carry "
    "no information about real patients."
)

PYRADIOMICS_SETTINGS = {
    "binWidth": 25,
    "resampledPixelSpacing": [1.0, 1.0, 1.0],
    "interpolator": "sitkBSpline",
    "label": 1,
}
IMAGE_TYPES = {"Original": {}, "Wavelet": {}}
RING = RingDefinition(outward_mm=2.0, inward_mm=2.0)

CANDIDATE_FEATURES = [
    "tumour.original_shape_MeshVolume",
    "tumour.original_shape_Sphericity",
    "tumour.original_firstorder_Variance",
    "tumour.original_firstorder_Entropy",
    "tumour.original_glcm_Correlation",
    "tumour.original_glszm_ZoneEntropy",
    "tumour.wavelet-LLL_firstorder_Kurtosis",
    "tumour.wavelet-HLL_glcm_JointEnergy",
    "tumour.wavelet-LLH_glrlm_RunLengthNonUniformityNormalized",
    "ring.original_firstorder_Mean",
    "ring.original_firstorder_InterquartileRange",
    "ring.original_gldm_DependenceNonUniformityNormalized",
    "ring.wavelet-LLH_glrlm_RunEntropy",
    "ring.wavelet-HHH_firstorder_Energy",
]

# Simulation truth (log-hazard ratios per unit of each driver).
TRUE_EFFECTS = {
    "texture_z": 0.5,
    "size_z": 0.3,
    "halo_z": 0.45,
    "ecog>=2": 0.7,
    "lipi": 0.35,
    "n_stage:N2-N3": 0.3,
    "m_stage:M1c": 0.35,
}
WEIBULL_SHAPE = 1.3
TARGET_MEDIAN_PFS_MONTHS = 7.1


def simulate_cohort(n: int, rng: np.random.Generator) -> list[dict]:
    patients = []
    for i in range(n):
        texture_hu = rng.uniform(20.0, 110.0)
        halo_hu = rng.uniform(0.0, 350.0)
        radius_mm = rng.uniform(9.0, 20.0)
        radii = tuple(radius_mm * rng.uniform(0.8, 1.15, size=3))
        stage_iv = rng.random() < 0.85
        clinical = {
            "patient_id": f"SIM-{i:04d}",
            "t_stage": rng.choice(["T1", "T2", "T3", "T4"], p=[0.1, 0.25, 0.3, 0.35]),
            "n_stage": rng.choice(["N0", "N1", "N2", "N3"], p=[0.08, 0.12, 0.4, 0.4]),
            "m_stage": rng.choice(["M1a", "M1b", "M1c"], p=[0.25, 0.25, 0.5]) if stage_iv else "M0",
            "ecog": int(rng.choice([0, 1, 2, 3], p=[0.3, 0.63, 0.05, 0.02])),
            "lipi": str(rng.choice(["good", "intermediate", "poor"], p=[0.45, 0.4, 0.15])),
        }
        if not stage_iv:
            # Extensive stage without distant metastases: T3-T4 disease.
            clinical["t_stage"] = rng.choice(["T3", "T4"])
        patients.append({"texture_hu": texture_hu, "halo_hu": halo_hu, "radii_mm": radii, "clinical": clinical, "seed": i})
    return patients


def clinical_design(record) -> dict[str, float]:
    return {
        "t_stage:T3-T4": float(record.t_stage in ("T3", "T4")),
        "n_stage:N2-N3": float(record.n_stage in ("N2", "N3")),
        "m_stage:M1c": float(record.m_stage == "M1c"),
        "ecog>=2": float(record.ecog >= 2),
        "lipi": float(int(record.lipi)),
    }


def simulate_pfs(patients, records, rng):
    texture = np.array([p["texture_hu"] for p in patients])
    size = np.array([np.prod(p["radii_mm"]) ** (1 / 3) for p in patients])
    zt = (texture - texture.mean()) / texture.std()
    zs = (size - size.mean()) / size.std()
    halo = np.array([p["halo_hu"] for p in patients])
    zh = (halo - halo.mean()) / halo.std()
    design = [clinical_design(r) for r in records]
    log_hazard = TRUE_EFFECTS["texture_z"] * zt + TRUE_EFFECTS["size_z"] * zs + TRUE_EFFECTS["halo_z"] * zh
    for name in ("ecog>=2", "lipi", "n_stage:N2-N3", "m_stage:M1c"):
        log_hazard += TRUE_EFFECTS[name] * np.array([d[name] for d in design])
    # Weibull PH: S(t|x) = exp(-(t/scale)^k * exp(lp)); scale chosen so the cohort median is on target.
    u = rng.uniform(size=len(patients))
    unit_times = (-np.log(u) / np.exp(log_hazard)) ** (1 / WEIBULL_SHAPE)
    scale = TARGET_MEDIAN_PFS_MONTHS / np.median(unit_times)
    event_times = unit_times * scale
    follow_up = rng.uniform(6.0, 24.0, size=len(patients))
    time = np.minimum(event_times, follow_up)
    event = event_times <= follow_up
    return np.round(time, 3).clip(min=0.05), event


def extract(patients, settings, specs):
    rows = []
    for k, patient in enumerate(patients):
        image, mask = synthetic_chest_phantom(
            tumour_radii_mm=patient["radii_mm"],
            texture_hu=patient["texture_hu"],
            halo_hu=patient["halo_hu"],
            seed=patient["seed"],
        )
        ring = peritumoral_ring(mask, settings.ring)
        vector = extract_model_features(image, {"tumour": mask, "ring": ring}, specs, settings)
        rows.append([vector[s.name] for s in specs])
        if (k + 1) % 20 == 0:
            print(f"  features: {k + 1}/{len(patients)}", file=sys.stderr)
    return np.array(rows)


def fit_lasso_cox(z: np.ndarray, y, seed: int) -> np.ndarray:
    warnings.simplefilter("ignore", ConvergenceWarning)
    # Folds whose alpha zeroes every coefficient are expected at the top of the path.
    warnings.filterwarnings("ignore", message="all coefficients are zero")
    path = CoxnetSurvivalAnalysis(l1_ratio=1.0, alpha_min_ratio=0.001, n_alphas=50).fit(z, y)
    search = GridSearchCV(
        CoxnetSurvivalAnalysis(l1_ratio=1.0),
        param_grid={"alphas": [[a] for a in path.alphas_]},
        cv=KFold(n_splits=10, shuffle=True, random_state=seed),
        error_score=0.5,
    ).fit(z, y)
    best_alpha = search.best_params_["alphas"][0]
    final = CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=[best_alpha]).fit(z, y)
    return final.coef_[:, 0], best_alpha


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=240, help="simulated patients (default 240)")
    parser.add_argument("--seed", type=int, default=20231124)
    parser.add_argument("--out", type=Path, default=REPO / "models" / f"{MODEL_NAME}-{MODEL_VERSION}.json")
    parser.add_argument("--card", type=Path, help="model card (default: docs/model-card-demo.md for the shipped "
                        "model, else beside --out)")
    args = parser.parse_args(argv)
    if args.card is None:
        shipped = args.out.resolve() == (REPO / "models" / f"{MODEL_NAME}-{MODEL_VERSION}.json").resolve()
        args.card = REPO / "docs" / "model-card-demo.md" if shipped else args.out.with_suffix(".md")

    rng = np.random.default_rng(args.seed)
    settings = ExtractionSettings(
        pyradiomics_version=radiomics.__version__.lstrip("v"),
        settings=PYRADIOMICS_SETTINGS,
        image_types=IMAGE_TYPES,
        ring=RING,
    )
    specs = [FeatureSpec.from_name(name) for name in CANDIDATE_FEATURES]
    patients = simulate_cohort(args.n, rng)
    records = [clinical_record_from_mapping(p["clinical"]) for p in patients]
    time, event = simulate_pfs(patients, records, rng)
    y = Surv.from_arrays(event=event, time=time)

    print(f"extracting {len(specs)} candidate features for {args.n} phantoms", file=sys.stderr)
    features = extract(patients, settings, specs)
    mean = features.mean(axis=0)
    sd = features.std(axis=0, ddof=1)
    z = (features - mean) / sd

    lasso_coef, best_alpha = fit_lasso_cox(z, y, args.seed)
    selected = np.flatnonzero(lasso_coef)
    if selected.size == 0:
        raise SystemExit("LASSO selected no feature; change --seed or --n")
    radiomics_score = z[:, selected] @ lasso_coef[selected]
    radiomics_cutoff = float(np.median(radiomics_score))

    covariate_names = list(clinical_design(records[0]))
    clinical_matrix = np.array([[clinical_design(r)[c] for c in covariate_names] for r in records])
    integrated_x = np.column_stack([radiomics_score, clinical_matrix])
    cox = CoxPHSurvivalAnalysis(ties="efron").fit(integrated_x, y)
    linear_predictor = integrated_x @ cox.coef_
    risk_cutoff = float(np.median(linear_predictor))
    breslow = BreslowEstimator().fit(linear_predictor, event, time)
    baseline = breslow.baseline_survival_
    valid_until = float(np.floor(time.max()))
    keep = baseline.x <= valid_until

    c_radiomics = concordance_index_censored(event, time, radiomics_score)[0]
    c_integrated = concordance_index_censored(event, time, linear_predictor)[0]
    km_t, km_s = kaplan_meier_estimator(event, time)
    median_pfs = float(km_t[np.argmax(km_s <= 0.5)])
    reverse_t, reverse_s = kaplan_meier_estimator(~event, time)
    median_follow_up = float(reverse_t[np.argmax(reverse_s <= 0.5)])

    encodings = {
        "t_stage:T3-T4": ("t_stage", {"kind": "indicator", "levels": ["T3", "T4"]}),
        "n_stage:N2-N3": ("n_stage", {"kind": "indicator", "levels": ["N2", "N3"]}),
        "m_stage:M1c": ("m_stage", {"kind": "indicator", "levels": ["M1c"]}),
        "ecog>=2": ("ecog", {"kind": "threshold", "at_least": 2}),
        "lipi": ("lipi", {"kind": "ordinal", "map": {"good": 0, "intermediate": 1, "poor": 2}}),
    }
    content = {
        "schema_version": 1,
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "intended_use": INTENDED_USE,
        "demonstration": True,
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "extraction": {
            "pyradiomics_version": settings.pyradiomics_version,
            "settings": PYRADIOMICS_SETTINGS,
            "image_types": IMAGE_TYPES,
            "ring": {"outward_mm": RING.outward_mm, "inward_mm": RING.inward_mm, "method": RING.method},
        },
        "radiomics": {
            "features": [
                {
                    "region": specs[i].region,
                    "image_type": specs[i].image_type,
                    "feature_class": specs[i].feature_class,
                    "feature": specs[i].feature,
                    "mean": float(mean[i]),
                    "sd": float(sd[i]),
                    "coefficient": float(lasso_coef[i]),
                }
                for i in selected
            ],
            "cutoff": radiomics_cutoff,
        },
        "clinical_covariates": [
            {"name": name, "field": encodings[name][0], "encoding": encodings[name][1],
             "coefficient": float(coef)}
            for name, coef in zip(covariate_names, cox.coef_[1:])
        ],
        "radiomics_score_coefficient": float(cox.coef_[0]),
        "risk_cutoff": risk_cutoff,
        "baseline_survival": {
            "time_unit": "months",
            "times": [float(t) for t in baseline.x[keep]],
            "survival": [float(s) for s in baseline.y[keep]],
            "valid_until": valid_until,
            "linear_predictor_centre": 0.0,
        },
        "training_summary": {
            "cohort": "SIMULATED: synthetic CT phantoms + simulated clinical data and PFS "
                      "(scripts/make_demo_model.py); no real patient",
            "generator": f"scripts/make_demo_model.py --n {args.n} --seed {args.seed}",
            "n": int(args.n),
            "events": int(event.sum()),
            "median_pfs_months": round(median_pfs, 2),
            "median_follow_up_months": round(median_follow_up, 2),
            "candidate_features": len(specs),
            "selected_features": int(selected.size),
            "lasso_alpha": float(best_alpha),
            "lasso_cv": "10-fold, Harrell's C",
            "standardisation": "training mean and sample SD (ddof=1)",
            "c_index_train_radiomics": round(float(c_radiomics), 4),
            "c_index_train_integrated": round(float(c_integrated), 4),
            "simulation_true_log_hazard_ratios": TRUE_EFFECTS,
            "method_note": "reduced fit for the demonstration model: clinical covariates are entered "
                           "without univariate screening",
        },
    }
    sealed = seal(content)
    model = FrozenModel.from_mapping(sealed)  # refuse to write anything the node would refuse to load
    args.out.write_text(json.dumps(sealed, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    args.card.write_text(model_card(sealed), encoding="utf-8")
    print(f"wrote {args.out} (sha256 {model.identity.sha256}) and {args.card}", file=sys.stderr)
    return 0


def model_card(model: dict) -> str:
    summary = model["training_summary"]
    lines = [
        f"# Model card: {model['name']} {model['version']}",
        "",
        "> **Demonstration model — not for clinical use.** Generated by "
        f"`{summary['generator']}` (see that script's docstring for the simulation).",
        "",
        f"* sha256: `{model['sha256']}`",
        f"* created: {model['created']}",
        f"* intended use: {model['intended_use']}",
        f"* pyradiomics {model['extraction']['pyradiomics_version']}, settings "
        f"`{json.dumps(model['extraction']['settings'])}`, image types "
        f"`{json.dumps(model['extraction']['image_types'])}`",
        f"* ring: tumour border +{model['extraction']['ring']['outward_mm']} mm / "
        f"−{model['extraction']['ring']['inward_mm']} mm ({model['extraction']['ring']['method']})",
        "",
        "## Training cohort (simulated)",
        "",
        f"* n = {summary['n']}, events = {summary['events']}, median PFS {summary['median_pfs_months']} months, "
        f"median follow-up {summary['median_follow_up_months']} months",
        f"* LASSO-Cox selected {summary['selected_features']} of {summary['candidate_features']} candidate "
        f"features (alpha {summary['lasso_alpha']:.4g}, {summary['lasso_cv']})",
        f"* training C-index: radiomics {summary['c_index_train_radiomics']}, "
        f"integrated {summary['c_index_train_integrated']}",
        "",
        "## Radiomics score (z-scored features)",
        "",
        "| feature | mean | sd | coefficient |",
        "|---|---|---|---|",
    ]
    for f in model["radiomics"]["features"]:
        name = f"{f['region']}.{f['image_type']}_{f['feature_class']}_{f['feature']}"
        lines.append(f"| `{name}` | {f['mean']:.6g} | {f['sd']:.6g} | {f['coefficient']:.4f} |")
    lines += [
        "",
        f"Radiomics-score cut-off (training median): {model['radiomics']['cutoff']:.4f}",
        "",
        "## Integrated Cox model",
        "",
        "| term | encoding | coefficient | HR |",
        "|---|---|---|---|",
        f"| radiomics score | score | {model['radiomics_score_coefficient']:.4f} | "
        f"{np.exp(model['radiomics_score_coefficient']):.3f} |",
    ]
    for c in model["clinical_covariates"]:
        lines.append(f"| {c['name']} | `{json.dumps(c['encoding'])}` | {c['coefficient']:.4f} | "
                     f"{np.exp(c['coefficient']):.3f} |")
    lines += [
        "",
        f"Risk cut-off (training median of the risk score): {model['risk_cutoff']:.4f}. "
        "Risk score above the cut-off = high progression risk.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
