"""`sclc-node train` and `sclc-node simulate-cohort`: fit, freeze and report a model on a researcher's cohort.

    sclc-node train --cohort COHORT.csv --spec SPEC.toml --out MODEL.json --report DIR
                    [--cache DIR] [--scheduler tcp://HOST:8786] [--workers N] [--no-progress] [--force]
    sclc-node simulate-cohort OUT_DIR [--seed N] [--scale F] [--no-progress]

Wiring only: the cohort CSV is `research.cohort`, the features
`research.extraction`, the method `scoring.training.method`, the
evaluation `scoring.training.evaluation`, the report `research.report`
and the model card `research.model_card` (docs/training.md walks
through all of it).  `run_training` is the whole ``train`` command without
argparse.  `research/cli.py` registers both commands with
``add_training_parsers(sub)`` and runs them with ``sclc-node``'s exit statuses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sclc_risk_node.node.files import write_atomically
from sclc_risk_node.scoring.training.evaluation import plain_json

EXIT_OK = 0
DEFAULT_CACHE_FOLDER = "feature-cache"


@dataclass(frozen=True)
class TrainingRun:
    """What `run_training` produced: the model file (loaded back), the report data and its files."""

    model_path: Path
    model: Any  # scoring.model.FrozenModel
    report: dict[str, Any]
    files: Any  # research.report.ReportFiles


# --------------------------------------------------------------------------- helpers


def _read_bytes(path: Path, what: str) -> bytes:
    from sclc_risk_node.scoring.errors import InputError

    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what}: {path} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sclc-risk-node")
    except PackageNotFoundError:
        return "0+unknown"


def _withhold(text: str, patient_id: str) -> str:
    """``text`` without the patient's id (a failure reason may quote a path named after it)."""
    return text.replace(patient_id, "(id withheld)") if len(patient_id) >= 3 else text


def _warning_text(record: warnings.WarningMessage) -> str:
    return f"{record.category.__name__}: {record.message} ({Path(record.filename).name}:{record.lineno})"


class _Stages:
    """Times each step and, with progress on, says on stderr what is running."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def run(self, name: str, message: str, function, *args, **kwargs):
        if self.progress:
            print(f"{message} …", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


# --------------------------------------------------------------------------- the run


def _check_outputs(model_path: Path, report_dir: Path, force: bool) -> None:
    from sclc_risk_node.scoring.errors import InputError

    if model_path.is_dir():
        raise InputError(f"--out: {model_path} is a folder (allowed: the path of the model file to write)")
    if model_path.exists() and not force:
        raise InputError(
            f"--out: {model_path} exists; a frozen model file is never replaced silently "
            "(give a new file name and model version, or pass --force)"
        )
    if report_dir.exists() and not report_dir.is_dir():
        raise InputError(f"--report: {report_dir} is a file (allowed: a folder, created if missing)")


class _ScoreOnce:
    """Each patient scored once (`score_patients`), reused by the split's evaluation, its at-risk tables and
    overall survival, and the treatment comparison (Figure 7)."""

    def __init__(self, model: Any, features: Any) -> None:
        self._model, self._features = model, features
        self._by_id: dict[str, tuple[float, float]] = {}

    def of(self, patients: Sequence[Any]) -> Any:  # scoring.training.evaluation.PatientScores
        import numpy as np

        from sclc_risk_node.scoring.training.evaluation import PatientScores, score_patients

        new = list({p.id: p for p in patients if p.id not in self._by_id}.values())
        if new:
            scored = score_patients(self._model, self._features.loc[[p.id for p in new]], [p.clinical for p in new])
            self._by_id.update(zip((p.id for p in new), zip(scored.radiomics.tolist(), scored.risk.tolist())))
        return PatientScores(
            radiomics=np.array([self._by_id[p.id][0] for p in patients], dtype=float),
            risk=np.array([self._by_id[p.id][1] for p in patients], dtype=float),
        )


def _usable(patients, features, failed, model) -> tuple[list, list[dict[str, Any]]]:
    """(patients with every model feature, [{row, reason}] of the others)."""
    used, excluded = [], []
    for patient in patients:
        if patient.id in failed:
            excluded.append(
                {
                    "row": patient.row,
                    "reason": f"feature extraction failed: {_withhold(failed[patient.id], patient.id)}",
                }
            )
            continue
        missing = [
            name
            for name in model.feature_names
            if name not in features.columns or not math.isfinite(features.at[patient.id, name])
        ]
        if missing:
            excluded.append(
                {
                    "row": patient.row,
                    "reason": f"model feature{'s' if len(missing) > 1 else ''} not computed: " + ", ".join(missing),
                }
            )
            continue
        used.append(patient)
    return used, excluded


def _evaluate_split(split, cohort, features, failed, model, spec, train_time, train_event, notes, scores: _ScoreOnce):
    import numpy as np

    from sclc_risk_node.research.report import at_risk_table, time_ticks
    from sclc_risk_node.scoring.errors import InputError
    from sclc_risk_node.scoring.training.evaluation import evaluate_split, risk_group_survival

    patients = cohort.in_split(split)
    used, excluded = _usable(patients, features, failed, model)
    time_ = np.array([p.pfs_months for p in used], dtype=float)
    event = np.array([p.pfs_event for p in used], dtype=bool)
    entry: dict[str, Any] = {
        "split": split,
        "n": len(patients),
        "n_used": len(used),
        "events": int(event.sum()) if used else None,
        "excluded": excluded,
        "evaluation": None,
        "error": None,
        "at_risk": None,
        "overall_survival": None,
    }
    if len(used) < 2:
        entry["error"] = f"{len(used)} patient{'s' if len(used) != 1 else ''} with the model's features (need 2)"
        return entry
    ids = [p.id for p in used]
    try:
        patient_scores = scores.of(used)
        evaluation = evaluate_split(
            model,
            features.loc[ids],
            [p.clinical for p in used],
            time_,
            event,
            train_time=train_time,
            train_event=train_event,
            settings=spec.evaluation,
            split=split,
            scores=patient_scores,
        )
    except InputError as exc:
        entry["error"] = str(exc)
        return entry
    except ValueError as exc:  # raised by a library for data it cannot score (e.g. an all-censored resample)
        entry["error"] = f"evaluation failed: {type(exc).__name__}: {exc}"
        notes.append(f"split {split}: evaluation failed ({exc}); see docs/training.md, 'Small splits'")
        return entry
    entry["evaluation"] = evaluation.as_dict()
    radiomics, risk = patient_scores.radiomics, patient_scores.risk
    ticks = time_ticks(float(time_.max()))
    entry["at_risk"] = {
        "radiomics": at_risk_table(time_, np.array(radiomics) > model.radiomics_cutoff, ticks),
        "integrated": at_risk_table(time_, np.array(risk) > model.risk_cutoff, ticks),
    }
    if all(p.os_months is not None for p in used):
        os_time = np.array([p.os_months for p in used], dtype=float)
        os_event = np.array([bool(p.os_event) for p in used], dtype=bool)
        high = np.array(risk) > model.risk_cutoff
        try:
            groups = risk_group_survival(os_time, os_event, high)
        except InputError as exc:
            notes.append(f"split {split}: overall survival by risk group not computed ({exc})")
        else:
            entry["overall_survival"] = {
                "n": len(used),
                "events": int(os_event.sum()),
                "risk_groups": plain_json(groups),
                "at_risk": at_risk_table(os_time, high, time_ticks(float(os_time.max()))),
            }
    return entry


def stability_subsample(train, failed: Mapping[str, str], spec) -> list:
    """The training patients re-extracted for the stability screen: with images, extracted, drawn with the seed."""
    import numpy as np

    eligible = [p for p in train if p.features is None and p.id not in failed]
    if len(eligible) <= spec.stability.patients:
        return eligible
    rng = np.random.default_rng(spec.stability.seed)
    chosen = set(rng.choice(len(eligible), size=spec.stability.patients, replace=False).tolist())
    return [p for index, p in enumerate(eligible) if index in chosen]


def _perturbed_extractions(cohort, train, failed, spec, stages, *, cache_dir, scheduler, workers, progress):
    """(perturbation name -> features of the subsample, report entry) for the stability screen."""
    from sclc_risk_node.research.extraction import Perturbation, extract_perturbed_features

    stability = spec.stability
    entry: dict[str, Any] = {
        "enabled": stability.enabled,
        "patients": 0,
        "rows": [],
        "seconds": 0.0,
        "counts": {},
        "failures": [],
    }
    if not stability.enabled:
        return None, entry
    subsample = stability_subsample(train, failed, spec)
    entry["patients"] = len(subsample)
    entry["rows"] = [p.row for p in subsample]
    if len(subsample) < 3:
        return None, entry
    perturbations = [
        Perturbation(
            kind,
            noise_sd_hu=stability.noise_sd_hu if kind == "noise" else 0.0,
            shift_voxels=stability.shift_voxels if kind == "shift" else 0.0,
            seed=stability.seed,
        )
        for kind in stability.perturbations
    ]
    start = time.perf_counter()
    results = stages.run(
        "stability_extraction",
        f"re-extracting {len(subsample)} training patients under {', '.join(stability.perturbations)}",
        extract_perturbed_features,
        subsample,
        spec.extraction_settings,
        perturbations,
        feature_classes=spec.extraction.feature_classes,
        regions=spec.extraction.regions,
        cache_dir=cache_dir,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    tables = {}
    for kind, result in results.items():
        tables[kind] = result.features
        entry["counts"][kind] = {
            "computed": len(result.computed),
            "cached": len(result.cached),
            "failed": len(result.failures),
        }
        entry["failures"] += [
            {"perturbation": kind, "row": cohort.patient(f.patient_id).row, "reason": _withhold(f.reason, f.patient_id)}
            for f in result.failures
        ]
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return tables, entry


CONTROL_SPLIT = "control"


def _predictive(cohort, features, failed, model, spec, notes, scores: _ScoreOnce) -> dict[str, Any] | None:
    """The paper's Figure 7: treated risk groups vs the control split, and the interaction test (PFS; OS too)."""
    import numpy as np

    from sclc_risk_node.scoring.training.evaluation import predictive_analysis

    if CONTROL_SPLIT not in cohort.splits:
        return None
    treated_splits = [
        split
        for split in cohort.splits
        if split != CONTROL_SPLIT and (spec.evaluation.treated_splits == "all" or split.startswith("validation"))
    ]
    entry: dict[str, Any] = {
        "treated_splits": treated_splits,
        "treated_rule": spec.evaluation.treated_splits,
        "control_split": CONTROL_SPLIT,
        "risk_groups": "integrated risk score > risk cut-off",
        "pfs": None,
        "os": None,
        "reason": None,
    }
    treated, _ = _usable([p for split in treated_splits for p in cohort.in_split(split)], features, failed, model)
    control, _ = _usable(cohort.in_split(CONTROL_SPLIT), features, failed, model)
    if len(treated) < 2 or len(control) < 2:
        entry["reason"] = f"{len(treated)} treated and {len(control)} control patients with features (need 2 each)"
        return entry
    high_t = scores.of(treated).risk > model.risk_cutoff
    high_c = scores.of(control).risk > model.risk_cutoff
    for endpoint, time_of, event_of in (("pfs", "pfs_months", "pfs_event"), ("os", "os_months", "os_event")):
        if any(getattr(p, time_of) is None for p in treated + control):
            continue
        arrays = [
            (
                np.array([getattr(p, time_of) for p in group], dtype=float),
                np.array([bool(getattr(p, event_of)) for p in group], dtype=bool),
            )
            for group in (treated, control)
        ]
        try:
            entry[endpoint] = plain_json(
                predictive_analysis(arrays[0][0], arrays[0][1], high_t, arrays[1][0], arrays[1][1], high_c)
            )
        except (ValueError, ArithmeticError) as exc:
            notes.append(f"predictive analysis ({endpoint}) failed: {type(exc).__name__}: {exc}")
    return entry


def _internal_validation(fitted, spec, train, train_time, train_event, notes) -> dict[str, Any]:
    """Harrell's bootstrap and the PH test of the integrated model; a failure is noted, never fatal."""
    from sclc_risk_node.scoring.model import RADIOMICS_SCORE_TERM
    from sclc_risk_node.scoring.training.validation import optimism_corrected, proportional_hazards_test

    result: dict[str, Any] = {"bootstrap": None, "proportional_hazards": None}
    try:
        result["bootstrap"] = optimism_corrected(fitted, spec, [p.clinical for p in train])
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the model stands without it
        notes.append(f"internal validation (bootstrap) failed: {type(exc).__name__}: {exc}")
    design = fitted.design
    columns = {
        RADIOMICS_SCORE_TERM: list(fitted.radiomics_score),
        **{name: list(design["clinical"][name]) for name in design["survivors"]},
    }
    coefficients = {row["name"]: row["coef"] for row in fitted.diagnostics["integrated_cox"]["table"]}
    try:
        result["proportional_hazards"] = proportional_hazards_test(train_time, train_event, columns, coefficients)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"proportional-hazards test failed: {type(exc).__name__}: {exc}")
    return plain_json(result)


def run_training(
    cohort_path: Path,
    spec_path: Path,
    model_path: Path,
    report_dir: Path,
    *,
    cache_dir: Path | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> TrainingRun:
    """Load, extract, fit on ``train``, freeze to ``model_path``, evaluate every split, write the report.

    Raises an `InputError` (spec, cohort, extraction set-up, training data)
    with a one-line message; extraction failures of single patients are
    reported, not raised.
    """
    import numpy as np

    from sclc_risk_node.research.cohort import TRAIN_SPLIT, load_cohort
    from sclc_risk_node.research.extraction import extract_cohort_features
    from sclc_risk_node.research.report import REPORT_FORMAT, write_report
    from sclc_risk_node.scoring.model import FrozenModel
    from sclc_risk_node.scoring.training.method import TrainingDataError, fit_integrated_model
    from sclc_risk_node.scoring.training.spec import TrainingSpec

    started = time.perf_counter()
    stages = _Stages(progress)
    cohort_path, spec_path, model_path, report_dir = map(Path, (cohort_path, spec_path, model_path, report_dir))

    # 1. inputs, checked before any long step
    spec_bytes = _read_bytes(spec_path, "--spec")
    spec = TrainingSpec.from_toml(spec_bytes)
    cohort_bytes = _read_bytes(cohort_path, "--cohort")
    cohort = stages.run("load_cohort", "reading the cohort", load_cohort, cohort_path)
    _check_outputs(model_path, report_dir, force)
    report_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else report_dir / DEFAULT_CACHE_FOLDER
    notes: list[str] = []

    # 2. features
    extraction = stages.run(
        "extraction",
        f"extracting features of {len(cohort)} patients",
        extract_cohort_features,
        cohort,
        spec.extraction_settings,
        feature_classes=spec.extraction.feature_classes,
        regions=spec.extraction.regions,
        cache_dir=cache_dir,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    features = extraction.features
    failed = {failure.patient_id: failure.reason for failure in extraction.failures}

    # 3. fit on the training split
    train = [p for p in cohort.in_split(TRAIN_SPLIT) if p.id not in failed]
    if len(train) < 2:
        raise TrainingDataError(
            f"{len(train)} training patients have features ({len(failed)} extraction failures); nothing to fit"
        )
    train_time = np.array([p.pfs_months for p in train], dtype=float)
    train_event = np.array([p.pfs_event for p in train], dtype=bool)
    train_features = features.loc[[p.id for p in train]]
    perturbed, stability_entry = _perturbed_extractions(
        cohort,
        train,
        failed,
        spec,
        stages,
        cache_dir=cache_dir,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = stages.run(
            "fit",
            f"fitting on {len(train)} training patients",
            fit_integrated_model,
            train_features,
            [p.clinical for p in train],
            train_time,
            train_event,
            spec,
            cohort=f"{cohort_path.name}, split '{TRAIN_SPLIT}': {len(train)} patients with features",
            perturbed=perturbed,
        )

    # 3b. internal validation, recorded in the model's training summary (so the model card has it)
    with warnings.catch_warnings(record=True) as caught_internal:
        warnings.simplefilter("always")
        internal = stages.run(
            "internal_validation",
            f"internal validation ({spec.validation.bootstrap} bootstrap refits, {spec.validation.refit})",
            _internal_validation,
            fitted,
            spec,
            train,
            train_time,
            train_event,
            notes,
        )
    if caught_internal:
        # Overflow in a resample's Cox fit is expected now and then (a resample can nearly separate the
        # events); the resample is skipped or its fit still converges, so one line says it, not hundreds.
        distinct = list(dict.fromkeys(_warning_text(w) for w in caught_internal))
        notes.append(f"internal validation: {len(caught_internal)} warnings from bootstrap refits, e.g. {distinct[0]}")

    # 4. freeze: write, then load the file back exactly as the node will
    from sclc_risk_node.scoring.model import seal

    sealed = seal(
        {
            **fitted.model_mapping,
            "training_summary": {**fitted.model_mapping["training_summary"], "internal_validation": internal},
        }
    )
    write_atomically(model_path, json.dumps(sealed, indent=2, ensure_ascii=False) + "\n")
    model = FrozenModel.from_json(model_path.read_text(encoding="utf-8"))
    if model.identity.sha256 != sealed["sha256"]:
        raise RuntimeError(f"{model_path} reads back with sha256 {model.identity.sha256}, written {sealed['sha256']}")

    # 5. every split
    splits: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught_evaluation:
        warnings.simplefilter("always")
        start = time.perf_counter()
        scores = _ScoreOnce(model, features)
        for split in cohort.splits:
            if progress:
                print(f"evaluating {split} …", file=sys.stderr, flush=True)
            splits[split] = _evaluate_split(
                split, cohort, features, failed, model, spec, train_time, train_event, notes, scores
            )
        predictive = _predictive(cohort, features, failed, model, spec, notes, scores)
        stages.seconds["evaluation"] = round(time.perf_counter() - start, 3)
    warning_texts = list(dict.fromkeys(_warning_text(w) for w in [*caught, *caught_evaluation]))

    # 6. report
    summary = sealed["training_summary"]
    diagnostics = plain_json(fitted.diagnostics)
    import matplotlib

    report: dict[str, Any] = {
        "report_format": REPORT_FORMAT,
        "created": _now(),
        "software": {
            "sclc-risk-node": _version(),
            "python": sys.version.split()[0],
            "pyradiomics": sealed["extraction"]["pyradiomics_version"],
            **summary.get("software", {}),
            "matplotlib": matplotlib.__version__,
        },
        "inputs": {
            "cohort": str(cohort_path),
            "cohort_sha256": hashlib.sha256(cohort_bytes).hexdigest(),
            "spec": str(spec_path),
            "spec_sha256": hashlib.sha256(spec_bytes).hexdigest(),
        },
        "model": {
            "file": str(model_path),
            "name": sealed["name"],
            "version": sealed["version"],
            "sha256": sealed["sha256"],
            "demonstration": sealed["demonstration"],
            "intended_use": sealed["intended_use"],
            "created": sealed["created"],
        },
        "spec": spec.to_mapping(),
        "cohort": {
            "file": str(cohort_path),
            "n": len(cohort),
            "splits": {split: len(cohort.in_split(split)) for split in cohort.splits},
            "os_available": all(p.os_months is not None for p in cohort),
        },
        "extraction": {
            "cache_dir": str(cache_dir),
            "scheduler": scheduler,
            "workers": workers,
            "seconds": stages.seconds["extraction"],
            "feature_columns": int(features.shape[1]),
            "counts": {
                "computed": len(extraction.computed),
                "cached": len(extraction.cached),
                "precomputed": len(extraction.precomputed),
                "failed": len(extraction.failures),
            },
            "failures": [
                {
                    "row": cohort.patient(f.patient_id).row,
                    "split": cohort.patient(f.patient_id).split,
                    "reason": _withhold(f.reason, f.patient_id),
                }
                for f in extraction.failures
            ],
            "stability": stability_entry,
        },
        "training": {
            **diagnostics,
            "candidate_features": summary["candidate_features"],
            "selected_features": [
                {
                    "name": f"{f['region']}.{f['image_type']}_{f['feature_class']}_{f['feature']}",
                    "coefficient": f["coefficient"],
                    "mean": f["mean"],
                    "sd": f["sd"],
                }
                for f in sealed["radiomics"]["features"]
            ],
            "radiomics_score_coefficient": sealed["radiomics_score_coefficient"],
            "clinical_covariates": sealed["clinical_covariates"],
            "internal_validation": internal,
        },
        "splits": splits,
        "predictive": predictive,
        "warnings": notes + warning_texts,
        "timings_seconds": stages.seconds,
    }
    report = plain_json(report)
    start = time.perf_counter()
    if progress:
        print("writing the report …", file=sys.stderr, flush=True)
    files = write_report(
        report_dir,
        report,
        model_mapping=sealed,
        timings_update=lambda: {
            "report": round(time.perf_counter() - start, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    )
    return TrainingRun(model_path=model_path, model=model, report=report, files=files)


# --------------------------------------------------------------------------- printing


def _c_text(block: Mapping[str, Any]) -> str:
    c = block["c_index"]
    if c["estimate"] is None:
        return "NA"
    if c["ci_low"] is None:
        return f"{c['estimate']:.3f} (CI NA)"
    return f"{c['estimate']:.3f} ({c['ci_low']:.3f}–{c['ci_high']:.3f})"


def format_training_summary(run: TrainingRun) -> str:
    report = run.report
    extraction = report["extraction"]
    counts = extraction["counts"]
    training = report["training"]
    lasso = training["lasso"]
    lines = []
    if report["model"]["demonstration"]:
        lines.append("*** DEMONSTRATION MODEL (demonstration: true) — NOT FOR CLINICAL USE ***")
    splits = ", ".join(f"{split} {n}" for split, n in report["cohort"]["splits"].items())
    lines.append(f"Cohort:    {Path(report['cohort']['file']).name}: {report['cohort']['n']} patients ({splits})")
    lines.append(
        f"Features:  {extraction['feature_columns']} columns; computed {counts['computed']}, "
        f"from cache {counts['cached']}, precomputed {counts['precomputed']}, failed {counts['failed']} "
        f"({extraction['seconds']:.1f} s)"
    )
    for failure in extraction["failures"][:5]:
        lines.append(f"  failed: CSV line {failure['row']} ({failure['split']}): {failure['reason']}")
    if len(extraction["failures"]) > 5:
        lines.append(f"  … {len(extraction['failures']) - 5} more failures in the report")
    lines.append(
        f"LASSO-Cox: {lasso['selection']} rule, alpha {lasso['alpha']:.4g}: "
        f"{len(training['selected_features'])} of {training['candidate_features']} features"
    )
    width = max(len(f["name"]) for f in training["selected_features"])
    for feature in training["selected_features"]:
        lines.append(f"  {feature['name']:<{width}}  {feature['coefficient']:+.4f}")
    stability = training.get("stability") or {}
    if stability.get("ran"):
        lines.append(
            f"Stability: {stability['icc']} >= {stability['icc_threshold']:g} over "
            f"{len(stability['extractions']) - 1} perturbations of {stability['patients_screened']} "
            f"training patients: kept {stability['features_kept']} of {stability['features_screened']} "
            "features"
        )
    elif stability:
        lines.append(f"Stability: not run ({stability.get('note')})")
    log = training.get("log_transform") or {}
    if log:
        lines.append(
            f"Log:       {log['setting'] if isinstance(log['setting'], str) else 'listed'}: "
            f"signed_log1p on {log['transformed_candidates']} candidates, "
            f"{len(log['transformed_selected'])} of them selected"
        )
    lines.append(
        f"Clinical:  {', '.join(training['clinical']['selected']) or 'no candidate kept'} "
        f"(univariate p < {training['clinical']['univariate_p']:g}, "
        f"multivariate p < {training['clinical']['multivariate_p']:g})"
    )
    lines.append(f"C-index (95% CI)        {'radiomics':<22}integrated")
    for split, entry in report["splits"].items():
        label = f"  {split} (n={entry['n_used']})"
        if entry["evaluation"]:
            lines.append(
                f"{label:<24}{_c_text(entry['evaluation']['radiomics']):<22}"
                f"{_c_text(entry['evaluation']['integrated'])}"
            )
        else:
            lines.append(f"{label:<24}not evaluated: {entry['error']}")
    internal = (training.get("internal_validation") or {}).get("bootstrap") or {}
    if internal.get("integrated"):
        block = internal["integrated"]
        slope = internal.get("calibration_slope") or {}
        lines.append(
            f"Internal:  optimism-corrected C-index {block['corrected']:.3f} (apparent {block['apparent']:.3f}, "
            f"optimism {block['optimism']:.3f}; {internal['resamples_used']} bootstrap refits, "
            f"{internal['refit']})" + (f"; calibration slope {slope['corrected']:.2f}" if slope else "")
        )
    ph = (training.get("internal_validation") or {}).get("proportional_hazards") or {}
    if ph.get("terms"):
        lines.append(
            f"PH test:   smallest Grambsch-Therneau p {ph['smallest_p']:.3f} "
            "(" + ", ".join(f"{t['name']} p={t['p_km']:.3f}" for t in ph["terms"]) + ")"
        )
    predictive = (report.get("predictive") or {}).get("pfs")
    if predictive:
        parts = []
        for label in ("high", "low"):
            hr = predictive["groups"][label]["vs_control"]["hazard_ratio_treated_vs_control"]
            parts.append(
                f"{label}-risk treated vs control HR {hr['hr']:.2f} ({hr['ci_low']:.2f}–{hr['ci_high']:.2f})"
                if hr
                else f"{label}-risk treated vs control HR NA"
            )
        interaction = predictive.get("interaction")
        parts.append(f"interaction p {interaction['p']:.3g}" if interaction else "interaction NA")
        lines.append("Fig 7:     " + "; ".join(parts))
    model = report["model"]
    lines.append(f"Model:     {model['name']} {model['version']} sha256 {model['sha256'][:12]}… -> {run.model_path}")
    lines.append(
        f"Report:    {run.files.html} (+ report.json, model-card.md, {len(run.files.figures)} figures in "
        f"{run.files.html.parent / 'figures'})"
    )
    if report["warnings"]:
        lines.append(f"Warnings:  {len(report['warnings'])} (listed in the report)")
    lines.append(f"Time:      {report['timings_seconds'].get('total', 0):.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- handlers and parsers


def cmd_train(args: argparse.Namespace) -> int:
    run = run_training(
        args.cohort,
        args.spec,
        args.out,
        args.report,
        cache_dir=args.cache,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    print(format_training_summary(run))
    return EXIT_OK


def cmd_simulate_cohort(args: argparse.Namespace) -> int:
    from sclc_risk_node.research.simulate import simulate_cohort

    csv_path = simulate_cohort(args.out_dir, seed=args.seed, scale=args.scale, progress=not args.no_progress)
    print(csv_path)
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def add_training_parsers(subparsers) -> None:
    """Register ``train`` and ``simulate-cohort`` on an argparse sub-parser set (``node/cli.py``'s ``sub``)."""
    train = subparsers.add_parser(
        "train",
        help="fit, freeze and evaluate an integrated model on your cohort (writes MODEL.json and a report)",
        description=(
            "Fit the integrated clinical + peritumoral-radiomics Cox model of Zhao et al. (JITC 2023) on the "
            "cohort's train split (after a log transform of heavy-tailed features and a perturbation stability "
            "screen), freeze it to a sealed model file, validate it internally (bootstrap optimism, calibration, "
            "Brier score, proportional hazards), evaluate it on every split, compare treated risk groups with a "
            "control split, and write a report (report.html, report.json, figures, model-card.md). "
            "See docs/training.md."
        ),
    )
    train.add_argument(
        "--cohort", type=Path, required=True, metavar="COHORT.csv", help="cohort CSV (columns: docs/training.md)"
    )
    train.add_argument("--spec", type=Path, required=True, metavar="SPEC.toml", help="training specification")
    train.add_argument("--out", type=Path, required=True, metavar="MODEL.json", help="model file to write")
    train.add_argument("--report", type=Path, required=True, metavar="DIR", help="report folder (created)")
    train.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help=f"feature cache, reused by later runs (default: DIR/{DEFAULT_CACHE_FOLDER})",
    )
    train.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="extract on this Dask cluster (tcp://HOST:8786) instead of local processes",
    )
    train.add_argument(
        "--workers", type=_positive_int, metavar="N", help="local extraction processes (default: the CPU count)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar or step messages on stderr")
    train.add_argument("--force", action="store_true", help="replace MODEL.json if it exists")
    train.set_defaults(handler=cmd_train)

    simulate = subparsers.add_parser(
        "simulate-cohort",
        help="write a SIMULATED cohort (phantom CTs, SEGs, cohort.csv) to try `train` on",
        description=(
            "Write a simulated cohort calibrated to Zhao et al. (JITC 2023): synthetic CT phantoms with tumour "
            "SEGs, a cohort CSV and simulation_truth.json. Simulated data, not patients."
        ),
    )
    simulate.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="new or empty folder")
    simulate.add_argument("--seed", type=int, default=2023, help="random seed (default 2023)")
    simulate.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the paper's split sizes 253/51/75/57 (default 1.0)"
    )
    simulate.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    simulate.set_defaults(handler=cmd_simulate_cohort)
