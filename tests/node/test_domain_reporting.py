"""Reporting the applicability domain: JSON (withheld by default), CLI summary, model verify, logs,
metrics, status and the config key.  Real scoring of the bundled demo study; no mocks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.node.clinical_files import load_clinical_file
from sclc_risk_node.node.config import ConfigError, default_config_text, load_config
from sclc_risk_node.node.demo_study import DEMO_PATIENT, write_demo_study
from sclc_risk_node.node.metrics import NodeMetrics
from sclc_risk_node.node.scoring_job import load_model_file, result_as_json, score_files
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine, applicability_from_reason, scored_reason
from sclc_risk_node.scoring.risk import apply_model
from sclc_risk_node.scoring.types import DOMAIN_UNKNOWN
from tests.domain_models import DEMO_MODEL_FILENAME as V1_MODEL_FILENAME
from tests.domain_models import demo_model_v2, demo_model_v2_json, expected_outside_bounds
from tests.node.test_spool import ct_instance
from tests.node.test_study_machine import T0, drive_to

# The demonstration model's heaviest-tailed feature (issue 7: 136 SDs out on a real CT).
LAHGLE = "ring.wavelet-HHL_glszm_LargeAreaHighGrayLevelEmphasis"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # The lung-box phantom the v1 (2.0.0) model was fitted on: its PFS stays strictly inside (0, 1) there.
    return write_demo_study(tmp_path_factory.mktemp("demo"), phantom="box")


@pytest.fixture(scope="module")
def base(demo):
    """The demo study scored with the shipped schema-v1 model (2.0.0, kept as the v1 example)."""
    return score_files(
        demo.ct_dir,
        demo.seg_path,
        load_clinical_file(demo.clinical_path),
        load_model_file(shipped_model_path(V1_MODEL_FILENAME)),
    )


def rescored(base, demo, model, *, report_out_of_domain=False):
    """The same study and features under another model (apply_model is the scoring step of score_files)."""
    [clinical] = load_clinical_file(demo.clinical_path)
    result = apply_model(model, base.result.features, clinical)
    return dataclasses.replace(base, result=result, report_out_of_domain=report_out_of_domain)


def v2(base, **kwargs):
    r = base.result
    return demo_model_v2(r.features.values, r.radiomics_score, r.risk_score, **kwargs)


def lahgle_sd(model) -> float:
    return next(term.sd for term in model.radiomics_terms if term.name == LAHGLE)


# --- JSON ------------------------------------------------------------------------------


def test_v1_model_gives_domain_unknown_and_reports(base):
    as_json = result_as_json(base)
    assert as_json["applicability"] == {
        "status": "unknown",
        "in_domain": None,
        "rule": DOMAIN_UNKNOWN.rule,
        "violations": [],
    }
    assert as_json["withheld"] is False
    assert as_json["risk_group"] in ("low", "high") and 0 < as_json["pfs_probability"]["6"] < 1


def test_in_domain_json(base, demo):
    as_json = result_as_json(rescored(base, demo, v2(base)))
    assert as_json["applicability"]["status"] == "in_domain" and as_json["applicability"]["in_domain"] is True
    assert as_json["applicability"]["violations"] == []
    assert as_json["applicability"]["rule"].startswith("widened-training-range: every model feature")
    assert as_json["withheld"] is False
    # Same coefficients as the shipped model: the same numbers.
    assert as_json["risk_group"] == base.result.risk_group.value
    assert as_json["pfs_probability"] == result_as_json(base)["pfs_probability"]


def test_out_of_domain_json_withholds_group_and_pfs_by_default(base, demo):
    model = v2(base, outside=[LAHGLE])
    scored = rescored(base, demo, model)
    as_json = json.loads(json.dumps(result_as_json(scored), allow_nan=False))  # strict JSON
    value = base.result.features[LAHGLE]
    low, high = expected_outside_bounds(value, lahgle_sd(model))
    assert as_json["applicability"]["status"] == "out_of_domain" and as_json["applicability"]["in_domain"] is False
    [violation] = as_json["applicability"]["violations"]
    assert violation["name"] == LAHGLE and violation["value"] == value
    assert violation["low"] == pytest.approx(low) and violation["high"] == pytest.approx(high)
    assert value < violation["low"]
    expected_z = next(t.value for t in base.result.radiomics_terms if t.name == LAHGLE)
    assert violation["z"] == pytest.approx(expected_z)
    assert as_json["withheld"] is True
    assert as_json["risk_group"] is None and as_json["radiomics_group"] is None
    assert as_json["pfs_probability"] == {"6": None, "12": None}
    # The scores and features stay, so the flag can be investigated.
    assert as_json["risk_score"] == base.result.risk_score and as_json["features"][LAHGLE] == value


def test_out_of_domain_json_reports_with_the_config_key(base, demo):
    scored = rescored(base, demo, v2(base, outside=[LAHGLE]), report_out_of_domain=True)
    as_json = result_as_json(scored)
    assert as_json["applicability"]["status"] == "out_of_domain"
    assert as_json["withheld"] is False
    assert as_json["risk_group"] == base.result.risk_group.value
    assert as_json["pfs_probability"] == result_as_json(base)["pfs_probability"]


# --- the CLI -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_model_file(base, tmp_path_factory):
    r = base.result
    path = tmp_path_factory.mktemp("model") / "narrow.json"
    path.write_text(demo_model_v2_json(r.features.values, r.radiomics_score, r.risk_score, outside=[LAHGLE]))
    return path


def test_score_cli_summary_says_outside_and_withholds(base, demo, narrow_model_file, tmp_path):
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--seg",
        demo.seg_path,
        "--clinical",
        demo.clinical_path,
        "--model",
        narrow_model_file,
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "r.json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "*** OUTSIDE THE MODEL'S APPLICABILITY DOMAIN ***" in proc.stdout
    assert "Progression risk: WITHHELD" in proc.stdout
    assert "PFS at  6 months: withheld" in proc.stdout and "PFS at 12 months: withheld" in proc.stdout
    [line] = [line for line in proc.stdout.splitlines() if LAHGLE in line and "accepted" in line]
    z = next(t.value for t in base.result.radiomics_terms if t.name == LAHGLE)
    assert line.split()[1:] == [
        f"{base.result.features[LAHGLE]:.4g}",
        "accepted",
        line.split()[3],
        "..",
        line.split()[5],
        "z",
        f"{z:+.1f}",
    ]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["withheld"] is True and result["risk_group"] is None
    # One structured warning, without patient identity.
    [event] = [json.loads(line) for line in proc.stderr.splitlines() if "study_out_of_domain" in line]
    assert event["applicability"] == "out_of_domain" and event["violations"] == [LAHGLE]
    assert event["withheld"] is True and event["level"] == "warning"
    assert DEMO_PATIENT.patient_id not in proc.stderr and "Demo^Phantom" not in proc.stderr
    assert (tmp_path / "sr.dcm").is_file()


def test_score_cli_report_out_of_domain_option(demo, narrow_model_file, tmp_path):
    proc = run_cli(
        "score",
        "--ct",
        demo.ct_dir,
        "--seg",
        demo.seg_path,
        "--clinical",
        demo.clinical_path,
        "--model",
        narrow_model_file,
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "r.json",
        "--report-out-of-domain",
    )
    assert proc.returncode == 0, proc.stderr
    assert "*** OUTSIDE THE MODEL'S APPLICABILITY DOMAIN ***" in proc.stdout
    assert "reported with this flag" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["withheld"] is False and result["risk_group"] in ("low", "high")
    assert f"Progression risk: {result['risk_group'].upper()}" in proc.stdout
    assert "PFS at  6 months: withheld" not in proc.stdout


def test_model_verify_prints_the_domain_or_domain_unknown(narrow_model_file):
    proc = run_cli("model", "verify", narrow_model_file)
    assert proc.returncode == 0, proc.stderr
    assert "schema version: 2" in proc.stdout
    assert "applicability domain: widened-training-range" in proc.stdout and "training n=253" in proc.stdout
    assert f"  {LAHGLE}: training " in proc.stdout and "  risk_score: training " in proc.stdout
    v1 = run_cli("model", "verify", shipped_model_path(V1_MODEL_FILENAME))
    assert v1.returncode == 0 and "schema version: 1" in v1.stdout
    assert "applicability domain: domain unknown" in v1.stdout
    shipped = run_cli("model", "verify")  # the default: the 3.0.0 demonstration model, schema v2
    assert shipped.returncode == 0 and "demo-integrated-cox 3.0.0" in shipped.stdout
    assert "schema version: 2" in shipped.stdout and "applicability domain: widened-training-range" in shipped.stdout


def test_tampered_domain_is_refused_by_the_cli(narrow_model_file, tmp_path):
    content = json.loads(narrow_model_file.read_text())
    content["applicability_domain"]["features"][LAHGLE]["min"] = -1e12  # widen it after sealing
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(content))
    proc = run_cli("model", "verify", tampered)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: tampered.json: model file sha256 mismatch")
    assert "(file was modified after it was frozen)" in proc.stderr


# --- metrics, status, config -----------------------------------------------------------


def test_metric_counts_scored_studies_by_applicability():
    metrics = NodeMetrics(studies_by_state=dict, outbox_depth=lambda: 0, process_metrics=False)
    sample = metrics.registry.get_sample_value
    for status in ("in_domain", "out_of_domain", "unknown"):
        assert sample("sclc_scored_studies_total", {"applicability": status, "withheld": "false"}) == 0
    metrics.study_scored("out_of_domain", withheld=True)
    metrics.study_scored("out_of_domain", withheld=True)
    metrics.study_scored("in_domain", withheld=False)
    assert sample("sclc_scored_studies_total", {"applicability": "out_of_domain", "withheld": "true"}) == 2
    assert sample("sclc_scored_studies_total", {"applicability": "in_domain", "withheld": "false"}) == 1
    assert sample("sclc_scored_studies_total", {"applicability": "unknown", "withheld": "false"}) == 0
    with pytest.raises(ValueError, match="'maybe' is not one of"):
        metrics.study_scored("maybe", withheld=False)


def test_scored_reason_round_trip():
    reason = scored_reason("1.2.3", "out_of_domain", True)
    assert reason == "SR 1.2.3; applicability out_of_domain; risk group and PFS withheld"
    assert applicability_from_reason(reason) == ("out_of_domain", True)
    assert applicability_from_reason(scored_reason("1.2.3", "in_domain", False)) == ("in_domain", False)
    assert applicability_from_reason("SR 1.2.3") == (None, False)  # scored before this release


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(
        f'[spool]\ndirectory = "{tmp_path}/spool"\ndatabase = "{tmp_path}/node.sqlite3"\n'
        f'[clinical]\ninbox_directory = "{tmp_path}/inbox"\n'
    )
    return path


def test_status_shows_the_study_out_of_domain(config_path):
    config = load_config(config_path)
    config.prepare_directories()
    with Spool.open(config.spool.directory, database=config.spool.database, min_free_bytes=0) as spool:
        studies = []
        for applicability, withheld in (("out_of_domain", True), ("in_domain", False)):
            study = drive_to(spool, StudyState.SCORING)
            uid = study.study_uid
            sr_bytes, _ = ct_instance(uid, f"{uid}.3", f"{uid}.3.1")  # any Part-10 file stands in for the SR
            StudyMachine(spool).record_scored(
                uid,
                worker_id="w1",
                sr_sop_instance_uid=f"{uid}.3.1",
                sr_bytes=sr_bytes,
                destinations=["pacs"],
                now=T0 + 4,
                applicability=applicability,
                withheld=withheld,
            )
            studies.append(study)
        study, inside = studies
    proc = run_cli("status", "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split(study.study_uid, 1)[1].split(inside.study_uid, 1)[0]
    assert "applicability: OUTSIDE THE MODEL'S APPLICABILITY DOMAIN (risk group and PFS withheld)" in block
    assert "applicability: inside the model's applicability domain" in proc.stdout
    rows = {
        row["study_instance_uid"]: row
        for row in json.loads(run_cli("status", "--json", "--config", config_path).stdout)["studies"]
    }
    assert (rows[study.study_uid]["applicability"], rows[study.study_uid]["withheld"]) == ("out_of_domain", True)
    assert (rows[inside.study_uid]["applicability"], rows[inside.study_uid]["withheld"]) == ("in_domain", False)


def test_config_key_defaults_to_withholding(tmp_path):
    assert load_config().scoring.report_out_of_domain is False
    assert "\nreport_out_of_domain = false\n" in default_config_text()
    on = tmp_path / "on.toml"
    on.write_text("[scoring]\nreport_out_of_domain = true\n")
    assert load_config(on).scoring.report_out_of_domain is True
    bad = tmp_path / "bad.toml"
    bad.write_text('[scoring]\nreport_out_of_domain = "yes"\n')
    with pytest.raises(ConfigError, match="scoring.report_out_of_domain: expected a boolean"):
        load_config(bad)


# --- the worker: the config value reaches the scoring run --------------------------------


@pytest.mark.parametrize("report_out_of_domain", [False, True])
def test_worker_task_carries_the_config_value(base, demo, narrow_model_file, report_out_of_domain):
    from sclc_risk_node.node.demo_study import DEMO_CLINICAL
    from sclc_risk_node.node.worker import ScoringTask, run_scoring_task

    task = ScoringTask(
        study_instance_uid=base.ct.study_instance_uid,
        ct_series_dir=demo.ct_dir,
        ct_series_instance_uid=base.ct.series_instance_uid,
        seg_path=demo.seg_path,
        clinical_json=json.dumps(DEMO_CLINICAL),
        model_path=narrow_model_file,
        segment_label=None,
        report_out_of_domain=report_out_of_domain,
    )
    outcome = run_scoring_task(task)
    assert outcome.error is None
    result = json.loads(outcome.result_json)
    assert result["applicability"]["status"] == "out_of_domain"
    assert result["withheld"] is (not report_out_of_domain)
    assert (result["risk_group"] is None) is (not report_out_of_domain)
    assert outcome.sr_bytes[128:132] == b"DICM"
