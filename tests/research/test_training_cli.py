"""`sclc-node train` and `sclc-node simulate-cohort` as a researcher runs them: real subprocesses, real files.

One small simulated cohort (scale 0.16: 40 training patients, validation
sets of 8 and 12, a control group of 9; 48 x 48 x 24 phantoms) is trained on
once with a light spec (Original image, first-order and shape features,
100 bootstrap resamples; the stability screen on 8 patients with an ICC
threshold of 0.5, because a one-voxel dilation of these 6-12 mm phantom
tumours moves every size feature to an ICC near 0.6, and 20 internal-validation
refits).  One validation patient's SEG is swapped for
another patient's, so its extraction fails and the run must go on.  The
frozen model then scores one simulated study through `sclc-node score`.

The commands run as ``python -m sclc_risk_node.node.cli`` (`sclc-node`), which hands them to
research/cli.py (``python -m sclc_risk_node.research.cli``: same parsers, same exit statuses).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sclc_risk_node.research.report import FIGURE_KINDS, REPORT_KEYS, SPLIT_KEYS
from sclc_risk_node.research.simulate import simulate_cohort
from sclc_risk_node.research.training_cli import add_training_parsers
from sclc_risk_node.scoring.model import FrozenModel, canonical_sha256

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = """
[model]
name = "test-integrated-cox"
version = "0.1.0"
intended_use = "Test fixture: fitted on a simulated cohort. Not for clinical use."
demonstration = true

[extraction]
feature_classes = ["firstorder", "shape"]
regions = ["tumour", "ring"]

[extraction.settings]
binWidth = 25
resampledPixelSpacing = [1.0, 1.0, 1.0]
interpolator = "sitkBSpline"
label = 1

[extraction.image_types]
Original = {}

[lasso]
cv_folds = 10
seed = 20231124

[clinical]
univariate_p = 0.05
multivariate_p = 0.05

[[clinical.candidates]]
name = "t_stage:T3-T4"
field = "t_stage"
encoding = { kind = "indicator", levels = ["T3", "T4"] }

[[clinical.candidates]]
name = "ecog>=2"
field = "ecog"
encoding = { kind = "threshold", at_least = 2 }

[[clinical.candidates]]
name = "lipi"
field = "lipi"
encoding = { kind = "ordinal", map = { good = 0, intermediate = 1, poor = 2 } }

[evaluation]
horizons_months = [6, 12]
bootstrap = 100
seed = 20231124

[stability]
patients = 8
icc_threshold = 0.5

[validation]
bootstrap = 20
"""
EVALUATION_KEYS = {
    "split",
    "n",
    "events",
    "median_follow_up_months",
    "horizons_months",
    "model",
    "settings",
    "radiomics",
    "integrated",
    "comparison",
}
MODEL_BLOCK_KEYS = {"score", "cutoff", "c_index", "time_dependent_auc", "risk_groups", "calibration", "decision_curve"}


def _registered_in_sclc_node() -> bool:
    from sclc_risk_node.node.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "train" in commands.choices


ENTRY = "sclc_risk_node.node.cli" if _registered_in_sclc_node() else "sclc_risk_node.research.cli"


def sclc_node(*args, module: str = ENTRY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("train") / "sim"
    simulate_cohort(folder, seed=2023, scale=0.16, image_size=(48, 48, 24), progress=False)
    with open(folder / "cohort.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    broken = next(row for row in rows if row["split"] == "validation_2")
    donor = next(row for row in rows if row["split"] == "train")
    broken["seg"] = donor["seg"]  # a SEG of another patient's CT: extraction fails, the run goes on
    edited = folder / "cohort-edited.csv"
    with open(edited, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    spec = folder.parent / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    truth = json.loads((folder / "simulation_truth.json").read_text())
    return {
        "folder": folder,
        "csv": edited,
        "rows": rows,
        "spec": spec,
        "truth": truth,
        "broken_line": rows.index(broken) + 2,
    }


@pytest.fixture(scope="module")
def trained(cohort) -> dict:
    out = cohort["folder"].parent / "run1"
    proc = sclc_node(
        "train",
        "--cohort",
        cohort["csv"],
        "--spec",
        cohort["spec"],
        "--out",
        out / "model.json",
        "--report",
        out / "report",
        "--workers",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    return {"proc": proc, "out": out, "model_path": out / "model.json", "report_dir": out / "report", "report": report}


# --------------------------------------------------------------------------- the model file


def test_the_model_file_loads_and_its_seal_verifies(trained):
    text = trained["model_path"].read_text(encoding="utf-8")
    model = FrozenModel.from_json(text)
    mapping = json.loads(text)
    assert canonical_sha256(mapping) == mapping["sha256"] == model.identity.sha256
    assert model.identity.name == "test-integrated-cox" and model.identity.demonstration is True
    assert trained["report"]["model"]["sha256"] == model.identity.sha256
    verify = sclc_node("model", "verify", trained["model_path"], module="sclc_risk_node.node.cli")
    assert verify.returncode == 0, verify.stderr
    assert model.identity.sha256 in verify.stdout


SIZE_MEASURES = ("Volume", "Diameter", "AxisLength", "SurfaceArea")


def test_lasso_selects_a_feature_that_carries_the_simulated_signal(trained, cohort):
    expected = {
        name
        for parameter in cohort["truth"]["image_parameters"].values()
        for name in parameter.get("expected_features", ())
    }
    selected = {f["name"]: f["coefficient"] for f in trained["report"]["training"]["selected_features"]}
    # The tumour radius drives the simulated hazard, so every size measure of the tumour or of the ring
    # around it carries that signal, with a positive coefficient (bigger = shorter PFS); with the stability
    # screen the most stable of them (often a ring axis length) may stand in for the two listed ones.
    size = {name for name in selected if "_shape_" in name and any(m in name for m in SIZE_MEASURES)}
    assert set(selected) & (expected | size), f"selected {sorted(selected)}, signal features {sorted(expected)}"
    assert all(selected[name] > 0 for name in size), selected
    model = FrozenModel.from_json(trained["model_path"].read_text())
    assert set(model.feature_names) == set(selected)


def test_the_integrated_model_discriminates_at_least_as_well_as_radiomics_alone_in_training(trained):
    train = trained["report"]["splits"]["train"]["evaluation"]
    assert train["integrated"]["c_index"]["estimate"] >= train["radiomics"]["c_index"]["estimate"] > 0.5


def test_the_summary_names_splits_features_c_indices_and_files(trained):
    stdout = trained["proc"].stdout
    for text in (
        "train 40",
        "validation_1 8",
        "validation_2 12",
        "control 9",
        "failed 1",
        "C-index",
        str(trained["model_path"]),
        "report.html",
    ):
        assert text in stdout, text
    for feature in trained["report"]["training"]["selected_features"]:
        assert feature["name"] in stdout


# --------------------------------------------------------------------------- report.json


def test_report_json_has_every_split_with_the_documented_keys(trained, cohort):
    report = trained["report"]
    assert set(REPORT_KEYS) <= report.keys()
    assert list(report["splits"]) == ["train", "validation_1", "validation_2", "control"]
    for name, entry in report["splits"].items():
        assert set(SPLIT_KEYS) <= entry.keys(), name
        assert entry["error"] is None, (name, entry["error"])
        evaluation = entry["evaluation"]
        assert EVALUATION_KEYS <= evaluation.keys()
        assert evaluation["split"] == name and evaluation["n"] == entry["n_used"]
        for model in ("radiomics", "integrated"):
            assert MODEL_BLOCK_KEYS <= evaluation[model].keys()
            assert [a["months"] for a in evaluation[model]["time_dependent_auc"]] == [6.0, 12.0]
        assert set(entry["at_risk"]) == {"radiomics", "integrated"}
        assert entry["overall_survival"] is not None  # the simulated CSV has OS
    assert report["splits"]["train"]["n_used"] == 40


def test_an_extraction_failure_is_reported_by_csv_line_and_the_run_goes_on(trained, cohort):
    report = trained["report"]
    failures = report["extraction"]["failures"]
    assert [(f["row"], f["split"]) for f in failures] == [(cohort["broken_line"], "validation_2")]
    assert failures[0]["reason"]
    validation = report["splits"]["validation_2"]
    assert (validation["n"], validation["n_used"]) == (12, 11)
    assert validation["excluded"][0]["row"] == cohort["broken_line"]
    assert report["extraction"]["counts"] == {
        "computed": len(cohort["rows"]) - 1,
        "cached": 0,
        "precomputed": 0,
        "failed": 1,
    }
    ids = {row["id"] for row in cohort["rows"]}
    text = (trained["report_dir"] / "report.json").read_text() + (trained["report_dir"] / "report.html").read_text()
    assert not any(patient_id in text for patient_id in ids), "patient ids must not appear in the report"


def test_the_lasso_diagnostics_and_coefficient_path_agree_with_the_model(trained):
    lasso = trained["report"]["training"]["lasso"]
    assert len(lasso["curve"]) == lasso["cv"]["n_alphas"]
    assert lasso["coefficient_path"] is not None, "the fit records the LASSO path"
    path = lasso["coefficient_path"]
    chosen = min(range(len(path["alphas"])), key=lambda k: abs(path["alphas"][k] - lasso["alpha"]))
    for feature in trained["report"]["training"]["selected_features"]:
        assert path["features"][feature["name"]][chosen] == pytest.approx(feature["coefficient"], rel=1e-5)


# --------------------------------------------------------------------------- figures, HTML, model card


def test_every_figure_is_a_real_png(trained):
    figures = trained["report"]["figures"]
    kinds = {(f["kind"], f["split"]) for f in figures}
    for split in trained["report"]["splits"]:
        for kind in ("km", "discrimination", "calibration", "decision-curve", "km-os"):
            assert (kind, split) in kinds
    for kind in ("lasso-cv", "lasso-path", "forest-univariate", "forest-integrated", "c-index"):
        assert (kind, None) in kinds
    assert {f["kind"] for f in figures} <= set(FIGURE_KINDS)
    for figure in figures:
        data = (trained["report_dir"] / figure["file"]).read_bytes()
        assert data[:8] == PNG_MAGIC, figure["file"]
        assert len(data) > 10_000, figure["file"]


def test_report_html_is_self_contained(trained):
    page = (trained["report_dir"] / "report.html").read_text(encoding="utf-8")
    for text in (
        "train",
        "validation_1",
        "validation_2",
        "control",
        "Validation set 2",
        "Control group",
        "C-index (95% CI)",
        "AUC 6 m",
        "AUC 12 m",
        "HR low vs high",
        "log-rank p",
        "VIF",
        "Spearman",
        "Univariate",
        "CSV line",
    ):
        assert text in page, text
    assert page.count('src="data:image/png;base64,') == len(trained["report"]["figures"])
    for external in ("http://", "https://", "<link", "<script", 'src="figures', "url("):
        assert external not in page, external


def test_the_model_card_describes_the_frozen_model(trained):
    card = (trained["report_dir"] / "model-card.md").read_text(encoding="utf-8")
    model = json.loads(trained["model_path"].read_text())
    assert card.startswith("# Model card: test-integrated-cox 0.1.0")
    assert model["sha256"] in card and "Demonstration model" in card
    for feature in trained["report"]["training"]["selected_features"]:
        assert feature["name"] in card
    assert "validation 2" in card and "control group" in card


# --------------------------------------------------------------------------- robust features, internal validation, Fig 7


def test_the_stability_screen_ran_on_the_subsample_and_is_recorded_in_model_and_report(trained):
    model = json.loads(trained["model_path"].read_text())
    stability = model["training_summary"]["stability"]
    assert stability["ran"] is True and stability["patients_screened"] == 8
    assert stability["icc"] == "ICC(1,1)" and stability["icc_threshold"] == 0.5
    assert 0 < stability["features_kept"] <= stability["features_screened"]
    assert stability["features_kept"] + stability["features_dropped"] == stability["features_screened"]
    report = trained["report"]
    extraction = report["extraction"]["stability"]
    assert extraction["patients"] == 8 and len(extraction["rows"]) == 8
    assert set(extraction["counts"]) == {"dilation", "erosion", "noise", "shift"}
    assert all(c["computed"] + c["cached"] == 8 for c in extraction["counts"].values())
    rows = {row["name"]: row for row in report["training"]["stability"]["features"]}
    # Every selected feature passed the screen; the volume-type shape features move under dilation.
    for feature in report["training"]["selected_features"]:
        assert rows[feature["name"]]["kept"] and rows[feature["name"]]["icc"] >= 0.5
    dropped = set(report["training"]["dropped_features"]["unstable"])
    assert dropped == {name for name, row in rows.items() if not row["kept"]}
    assert all(entry["transform"] in ("none", "signed_log1p") for entry in model["radiomics"]["features"])
    assert "Stability: ICC(1,1) >= 0.5 over 4 perturbations of 8 training patients" in trained["proc"].stdout


def test_internal_validation_is_in_the_model_and_the_report(trained):
    model = json.loads(trained["model_path"].read_text())
    internal = model["training_summary"]["internal_validation"]
    boot = internal["bootstrap"]
    assert boot["resamples"] == 20 and boot["refit"] == "fixed-alpha" and boot["resamples_used"] >= 15
    integrated = boot["integrated"]
    assert integrated["corrected"] == pytest.approx(integrated["apparent"] - integrated["optimism"])
    assert integrated["apparent"] == pytest.approx(model["training_summary"]["c_index"])
    assert [t["name"] for t in internal["proportional_hazards"]["terms"]][0] == "radiomics_score"
    for split, entry in trained["report"]["splits"].items():
        block = entry["evaluation"]["integrated"]
        assert block["calibration_summary"]["observed_events"] is not None, split
        assert "model" in block["integrated_brier_score"], split
    train = trained["report"]["splits"]["train"]["evaluation"]["integrated"]
    # In its own training split the Cox linear predictor has slope 1 exactly.
    assert train["calibration_summary"]["slope"] == pytest.approx(1.0, abs=1e-6)
    assert "optimism-corrected C-index" in trained["proc"].stdout


def test_the_treatment_comparison_with_the_control_split(trained):
    predictive = trained["report"]["predictive"]
    assert predictive["treated_splits"] == ["train", "validation_1", "validation_2"]
    pfs = predictive["pfs"]
    assert pfs["n_control"] == 9 and pfs["n_treated"] == 40 + 8 + 11  # one validation_2 extraction failed
    assert set(pfs["groups"]) == {"high", "low"}
    assert predictive["os"] is not None
    kinds = {f["kind"] for f in trained["report"]["figures"]}
    assert {"stability-icc", "km-predictive"} <= kinds
    page = (trained["report_dir"] / "report.html").read_text(encoding="utf-8")
    for anchor in ('id="robust"', 'id="internal"', 'id="predictive"', "Risk group × treatment interaction"):
        assert anchor in page, anchor
    card = (trained["report_dir"] / "model-card.md").read_text(encoding="utf-8")
    for heading in ("## Internal validation", "## Treatment comparison", "stability screen", "| transform |"):
        assert heading in card, heading


def test_the_model_card_renders_the_shipped_demo_model():
    from sclc_risk_node.node.scoring_job import default_model_path

    proc = sclc_node(default_model_path(), module="sclc_risk_node.research.model_card")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(Path(default_model_path()).read_text())
    assert proc.stdout.startswith(f"# Model card: {model['name']} {model['version']}")
    assert model["sha256"] in proc.stdout and "Demonstration model" in proc.stdout


# --------------------------------------------------------------------------- reruns and bad input


def test_a_second_run_with_the_same_cache_recomputes_nothing(trained, cohort):
    out = cohort["folder"].parent / "run2"
    proc = sclc_node(
        "train",
        "--cohort",
        cohort["csv"],
        "--spec",
        cohort["spec"],
        "--out",
        out / "model.json",
        "--report",
        out / "report",
        "--cache",
        trained["report_dir"] / "feature-cache",
        "--workers",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    # Failures are not cached: the broken patient is tried again (and fails again).
    assert report["extraction"]["counts"] == {
        "computed": 0,
        "cached": len(cohort["rows"]) - 1,
        "precomputed": 0,
        "failed": 1,
    }
    first, second = (json.loads(p.read_text()) for p in (trained["model_path"], out / "model.json"))
    assert second["radiomics"] == first["radiomics"]
    assert second["clinical_covariates"] == first["clinical_covariates"]


def test_an_existing_model_file_is_not_replaced_without_force(trained, cohort):
    before = trained["model_path"].read_bytes()
    proc = sclc_node(
        "train",
        "--cohort",
        cohort["csv"],
        "--spec",
        cohort["spec"],
        "--out",
        trained["model_path"],
        "--report",
        cohort["folder"].parent / "run3",
        "--no-progress",
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --out:") and "--force" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert trained["model_path"].read_bytes() == before


def test_a_misspelt_spec_key_stops_the_run_with_one_line_naming_it(cohort, tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(SPEC.replace("cv_folds = 10", "cv_fold = 10"), encoding="utf-8")
    proc = sclc_node(
        "train",
        "--cohort",
        cohort["csv"],
        "--spec",
        spec,
        "--out",
        tmp_path / "m.json",
        "--report",
        tmp_path / "report",
        "--no-progress",
    )
    assert proc.returncode == 2
    assert "lasso.cv_fold" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "report").exists()


def test_a_missing_cohort_file_is_one_line_and_exit_2(cohort, tmp_path):
    proc = sclc_node(
        "train",
        "--cohort",
        tmp_path / "nope.csv",
        "--spec",
        cohort["spec"],
        "--out",
        tmp_path / "m.json",
        "--report",
        tmp_path / "report",
        "--no-progress",
    )
    assert proc.returncode == 2
    assert "nope.csv" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- serving the model


def test_the_trained_model_scores_a_study_through_sclc_node_score(trained, cohort, tmp_path):
    row = next(r for r in cohort["rows"] if r["split"] == "validation_1")
    clinical = {
        name: row[name]
        for name in (
            "t_stage",
            "n_stage",
            "m_stage",
            "ecog",
            "lipi",
            "age",
            "sex",
            "brain_metastases",
            "liver_metastases",
        )
    }
    clinical["patient_id"] = row["id"]
    (tmp_path / "clinical.json").write_text(json.dumps(clinical), encoding="utf-8")
    folder = cohort["folder"]
    proc = sclc_node(
        "score",
        "--ct",
        folder / row["ct"],
        "--seg",
        folder / row["seg"],
        "--clinical",
        tmp_path / "clinical.json",
        "--model",
        trained["model_path"],
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "result.json",
        module="sclc_risk_node.node.cli",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"]["name"] == "test-integrated-cox"
    assert result["model"]["sha256"] == trained["report"]["model"]["sha256"]
    assert result["risk_group"] in ("low", "high")
    assert set(result["features"]) == {f["name"] for f in trained["report"]["training"]["selected_features"]}


# --------------------------------------------------------------------------- simulate-cohort and the parsers


def test_simulate_cohort_prints_the_csv_path_and_refuses_a_used_folder(tmp_path):
    out = tmp_path / "tiny"
    proc = sclc_node("simulate-cohort", out, "--scale", "0.02", "--seed", "5", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == out / "cohort.csv"
    assert (out / "cohort.csv").is_file() and (out / "simulation_truth.json").is_file()
    again = sclc_node("simulate-cohort", out, "--scale", "0.02", "--no-progress")
    assert again.returncode == 2 and "not an empty folder" in again.stderr


def test_add_training_parsers_registers_both_commands_on_any_parser():
    parser = argparse.ArgumentParser(prog="sclc-node")
    add_training_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "train",
            "--cohort",
            "c.csv",
            "--spec",
            "s.toml",
            "--out",
            "m.json",
            "--report",
            "r",
            "--workers",
            "3",
            "--scheduler",
            "tcp://127.0.0.1:8786",
        ]
    )
    assert (args.cohort, args.workers, args.scheduler, args.cache, args.force) == (
        Path("c.csv"),
        3,
        "tcp://127.0.0.1:8786",
        None,
        False,
    )
    assert callable(args.handler)
    args = parser.parse_args(["simulate-cohort", "out", "--scale", "0.5"])
    assert (args.out_dir, args.scale, args.seed) == (Path("out"), 0.5, 2023)
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["train", "--cohort", "c.csv", "--spec", "s.toml", "--out", "m.json", "--report", "r", "--workers", "0"]
        )


@pytest.mark.skipif(
    not _registered_in_sclc_node(),
    reason="node/cli.py does not call add_training_parsers yet (the lead adds that line)",
)
def test_sclc_node_itself_offers_train_and_simulate_cohort():
    proc = sclc_node("--help", module="sclc_risk_node.node.cli")
    assert "train" in proc.stdout and "simulate-cohort" in proc.stdout
