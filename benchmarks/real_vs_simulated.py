"""Where real lung CT falls in the simulated training cohort's feature distribution.

Extracts the candidate features of a training spec (default: the demonstration
model's) on real CT — pyradiomics' ``lung1`` and ``lung2`` cases
(``tests/realdata.py``) — and on a sample of simulated patients (the phantoms
of ``research.simulate``, generated in memory, not written as DICOM), and
prints per feature where each real value falls: its percentile among the
simulated values and its z-score (training mean and SD), then a summary: the
share of features inside the simulated [min, max] and inside [1 %, 99 %].

    python benchmarks/real_vs_simulated.py [--n 40] [--workers 2] [--spec SPEC] [--features-out sim.csv]
    python benchmarks/real_vs_simulated.py --score-model models/demo-integrated-cox-3.0.0.json

``--score-model`` instead scores lung1 and lung2 (as DICOM CT + SEG, through
the node's own path) with a model and prints the applicability verdict, the
PFS probabilities and each term's share of the largest |contribution|.

Real features are cached in ``$SCLC_TEST_CACHE`` (``~/.cache/sclc-risk-node-tests``)
per settings hash; simulated ones are recomputed unless ``--simulated-csv``
gives a previous ``--features-out``.  SIMULATED DATA, NOT PATIENTS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sclc_risk_node.research.simulate import phantom_images, simulate_patients, split_sizes  # noqa: E402
from sclc_risk_node.scoring.features import extract_all_features, settings_hash  # noqa: E402
from sclc_risk_node.scoring.ring import peritumoral_ring  # noqa: E402
from sclc_risk_node.scoring.training.spec import TrainingSpec  # noqa: E402
from tests.realdata import cache_dir, pyradiomics_case  # noqa: E402

DEFAULT_SPEC = REPO / "models" / "training" / "demo-integrated-cox.spec.toml"
REAL_CASES = ("lung1", "lung2")


def region_features(image: sitk.Image, mask: sitk.Image, spec: TrainingSpec) -> dict[str, float]:
    settings = spec.extraction_settings
    masks = {"tumour": mask, "ring": peritumoral_ring(mask, settings.ring)}
    out: dict[str, float] = {}
    for region in spec.extraction.regions:
        values = extract_all_features(image, masks[region], settings, list(spec.extraction.feature_classes))
        out.update((f"{region}.{key}", value) for key, value in values.items())
    return out


def real_features(case: str, spec: TrainingSpec) -> dict[str, float]:
    key = settings_hash(spec.extraction_settings) + "-" + "-".join(spec.extraction.feature_classes)
    path = cache_dir() / "real-features" / f"{case}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["features"]
    image_path, label_path = pyradiomics_case(case)
    image = sitk.ReadImage(str(image_path))
    label = sitk.Cast(sitk.ReadImage(str(label_path)) == 1, sitk.sitkUInt8)
    features = region_features(image, label, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "features": features}))
    return features


def _simulated_one(job: tuple[str, object, str, str]) -> tuple[str, dict[str, float], dict]:
    patient_id, phantom, spec_text, kind = job
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    spec = TrainingSpec.from_toml(spec_text)
    image, mask, layout = phantom_images(phantom, kind)
    return patient_id, region_features(image, mask, spec), layout


def simulated_features(
    n: int, seed: int, spec_text: str, workers: int, kind: str = "chest-ct"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    patients = [p for p in simulate_patients(split_sizes(1.0), seed=seed) if p.split == "train"][:n]
    jobs = [(p.id, p.phantom, spec_text, kind) for p in patients]
    rows, layouts = {}, {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for patient_id, features, layout in pool.map(_simulated_one, jobs):
            rows[patient_id] = features
            layouts[patient_id] = layout
            print(f"  {patient_id}: {layout}", file=sys.stderr, flush=True)
    frame = pd.DataFrame.from_records([rows[p.id] for p in patients], index=[p.id for p in patients])
    return frame, pd.DataFrame.from_records([layouts[p.id] for p in patients], index=[p.id for p in patients])


def cohort_features(csv_path: Path, cache: Path, spec: TrainingSpec, workers: int) -> pd.DataFrame:
    """The training split's features of a written cohort, from (or into) the training feature cache."""
    import dataclasses

    from sclc_risk_node.research.cohort import load_cohort
    from sclc_risk_node.research.extraction import extract_cohort_features

    cohort = load_cohort(csv_path)
    train = dataclasses.replace(cohort, patients=cohort.in_split("train"))
    result = extract_cohort_features(
        train,
        spec.extraction_settings,
        feature_classes=spec.extraction.feature_classes,
        regions=spec.extraction.regions,
        cache_dir=cache,
        workers=workers,
    )
    return result.features


def compare(real: dict[str, float], simulated: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in simulated.columns:
        values = simulated[name].dropna().to_numpy(dtype=float)
        value = real.get(name, np.nan)
        if values.size < 2 or not np.isfinite(value):
            continue
        sd = values.std(ddof=1)
        rows.append(
            {
                "feature": name,
                "real": value,
                "sim_min": values.min(),
                "sim_max": values.max(),
                "percentile": 100.0 * float(np.mean(values < value) + 0.5 * np.mean(values == value)),
                "z": (value - values.mean()) / sd if sd > 0 else (0.0 if value == values.mean() else np.inf),
                "in_range": bool(values.min() <= value <= values.max()),
                "in_1_99": bool(np.percentile(values, 1) <= value <= np.percentile(values, 99)),
            }
        )
    return pd.DataFrame(rows).set_index("feature")


#: The clinical record the real cases are scored with (the cases come without one).
CLINICAL = {"t_stage": "T3", "n_stage": "N2", "m_stage": "M1c", "ecog": 1, "lipi": "good"}


def largest_share(contributions: list[float]) -> float:
    """The largest |contribution| as a share of the sum of |contributions| (1.0: one term is everything)."""
    total = sum(abs(c) for c in contributions)
    return max(abs(c) for c in contributions) / total if total else 0.0


def score_real_cases(model_path: Path) -> int:
    from sclc_risk_node.node.scoring_job import load_model_file, score_files
    from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
    from tests.realdata import pyradiomics_case_as_dicom

    model = load_model_file(model_path)
    for case in REAL_CASES:
        ct_dir, seg_path, _, _ = pyradiomics_case_as_dicom(case)
        record = clinical_record_from_mapping({**CLINICAL, "patient_id": f"PYRAD-{case}"})
        result = score_files(ct_dir, seg_path, [record], model).result
        radiomics = [t.contribution for t in result.radiomics_terms]
        integrated = [t.contribution for t in result.integrated_terms]
        print(
            f"{case}: {result.applicability.status.value}; radiomics score {result.radiomics_score:.3f} "
            f"(cut-off {result.radiomics_cutoff:.3f}), risk score {result.risk_score:.3f} "
            f"(cut-off {result.risk_cutoff:.3f}), group {result.risk_group.value}, "
            f"PFS 6 m {result.pfs_probability[6]:.3f}, 12 m {result.pfs_probability[12]:.3f}; largest share of "
            f"|contribution|: radiomics terms {largest_share(radiomics):.2f}, integrated terms "
            f"{largest_share(integrated):.2f}"
        )
        for violation in result.applicability.violations:
            print(
                f"  outside: {violation.name} = {violation.value:.6g} (allowed {violation.low:.6g} to "
                f"{violation.high:.6g}, z {violation.z:.2f})"
            )
        for term in result.radiomics_terms:
            print(f"  {term.name}: z {term.value:+.2f}, contribution {term.contribution:+.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--n", type=int, default=40, help="simulated training patients (default 40)")
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--phantom",
        choices=("chest-ct", "box"),
        default="chest-ct",
        help="phantom kind (box: the former small lung box, for comparison)",
    )
    parser.add_argument("--features-out", type=Path, help="write the simulated features (CSV)")
    parser.add_argument("--simulated-csv", type=Path, help="reuse simulated features written by --features-out")
    parser.add_argument("--show", type=int, default=15, help="worst features printed per case")
    parser.add_argument("--only", nargs="*", help="features to print in full (e.g. the model's)")
    parser.add_argument("--cohort", type=Path, help="compare with this cohort's training split (cohort CSV) ...")
    parser.add_argument("--cache", type=Path, help="... and its feature cache (as `sclc-node train --cache`)")
    parser.add_argument("--score-model", type=Path, help="score lung1 and lung2 with this model file instead")
    args = parser.parse_args(argv)
    if args.score_model:
        return score_real_cases(args.score_model)

    spec_text = args.spec.read_text(encoding="utf-8")
    spec = TrainingSpec.from_toml(spec_text)
    if args.cohort:
        simulated = cohort_features(args.cohort, args.cache, spec, args.workers)
    elif args.simulated_csv:
        simulated = pd.read_csv(args.simulated_csv, index_col=0)
    else:
        simulated, layouts = simulated_features(args.n, args.seed, spec_text, args.workers, args.phantom)
        if args.features_out:
            simulated.to_csv(args.features_out)
            layouts.to_csv(args.features_out.with_suffix(".layout.csv"))
    print(f"simulated: {len(simulated)} patients, {simulated.shape[1]} features (spec {args.spec.name})")
    for case in REAL_CASES:
        table = compare(real_features(case, spec), simulated)
        outside = table[~table["in_range"]]
        print(
            f"\n{case}: {int(table['in_range'].sum())}/{len(table)} features inside the simulated range "
            f"({100 * table['in_range'].mean():.1f} %), {int(table['in_1_99'].sum())} inside [1 %, 99 %]; "
            f"median |z| {table['z'].abs().median():.2f}, max |z| {table['z'].abs().max():.1f}"
        )
        by_region = table.groupby(table.index.str.split(".").str[0])["in_range"].mean()
        print("  inside range by region: " + ", ".join(f"{r} {100 * v:.1f} %" for r, v in by_region.items()))
        image_type = table.index.str.split(".").str[1].str.split("_").str[0]
        by_type = table.groupby(image_type)["in_range"].mean()
        print("  by image type: " + ", ".join(f"{t} {100 * v:.0f} %" for t, v in by_type.items()))
        cls = table.index.str.split("_").str[1]
        by_class = table.groupby(cls)["in_range"].mean()
        print("  by class: " + ", ".join(f"{t} {100 * v:.0f} %" for t, v in by_class.items()))
        worst = outside.reindex(outside["z"].abs().sort_values(ascending=False).index).head(args.show)
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(worst[["real", "sim_min", "sim_max", "percentile", "z"]].to_string(float_format="%.4g"))
            if args.only:
                print(
                    table.reindex(args.only)[["real", "sim_min", "sim_max", "percentile", "z"]].to_string(
                        float_format="%.4g"
                    )
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
