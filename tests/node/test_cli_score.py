"""`sclc-node score` and `sclc-node demo` as a user runs them: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study

REQUIRED_JSON_KEYS = {
    "risk_group",
    "risk_score",
    "radiomics_score",
    "pfs_probability",
    "features",
    "model",
    "sr_sop_instance_uid",
}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    return write_demo_study(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def scored_demo(demo_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        demo_study.seg_path,
        "--clinical",
        demo_study.clinical_path,
        "--out",
        out / "sr.dcm",
        "--json",
        out / "result.json",
    )
    return proc, out


def test_score_writes_sr_and_json(scored_demo):
    proc, out = scored_demo
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert REQUIRED_JSON_KEYS <= result.keys()
    assert result["risk_group"] in ("low", "high")
    assert set(result["pfs_probability"]) == {"6", "12"}
    assert 0 < result["pfs_probability"]["12"] <= result["pfs_probability"]["6"] < 1
    assert result["model"]["demonstration"] is True
    assert result["lossy_compression"] is False
    assert len(result["model"]["sha256"]) == 64
    assert result["features"] and all(isinstance(v, float) for v in result["features"].values())
    # the group follows from the score and the model's cut-off
    expected_group = "high" if result["risk_score"] > result["risk_cutoff"] else "low"
    assert result["risk_group"] == expected_group
    sr = pydicom.dcmread(out / "sr.dcm")
    assert sr.Modality == "SR"
    assert sr.SOPInstanceUID == result["sr_sop_instance_uid"]
    assert sr.StudyInstanceUID == DEMO_CLINICAL["study_instance_uid"]
    # the summary names the demonstration status and the group
    assert "DEMONSTRATION MODEL" in proc.stdout
    assert f"Progression risk: {result['risk_group'].upper()}" in proc.stdout


def test_rescoring_gives_the_same_sr_uid(demo_study, scored_demo, tmp_path):
    _, out = scored_demo
    first = json.loads((out / "result.json").read_text())
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        demo_study.seg_path,
        "--clinical",
        demo_study.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
        "--json",
        tmp_path / "r.json",
    )
    assert proc.returncode == 0, proc.stderr
    second = json.loads((tmp_path / "r.json").read_text())
    assert second["sr_sop_instance_uid"] == first["sr_sop_instance_uid"]
    assert second["risk_score"] == first["risk_score"]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_clinical_value_exits_2_naming_the_field(demo_study, tmp_path):
    record = dict(DEMO_CLINICAL, ecog=7)
    clinical = tmp_path / "bad.json"
    clinical.write_text(json.dumps(record))
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        demo_study.seg_path,
        "--clinical",
        clinical,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "ecog" in line and "7" in line
    assert not (tmp_path / "sr.dcm").exists()


def test_clinical_record_for_another_study_is_refused(demo_study, tmp_path):
    record = dict(DEMO_CLINICAL, study_instance_uid="1.2.3.4.5")
    clinical = tmp_path / "other.json"
    clinical.write_text(json.dumps(record))
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        demo_study.seg_path,
        "--clinical",
        clinical,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    assert "1.2.3.4.5" in _one_error_line(proc)


def test_tampered_model_is_refused(demo_study, tmp_path):
    from sclc_risk_node.node.scoring_job import default_model_path

    model = json.loads(default_model_path().read_text())
    model["risk_cutoff"] = model["risk_cutoff"] + 1.0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(model))
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        demo_study.seg_path,
        "--clinical",
        demo_study.clinical_path,
        "--model",
        tampered,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    assert "sha256" in _one_error_line(proc)


def test_seg_is_not_a_seg(demo_study, tmp_path):
    ct_file = sorted(demo_study.ct_dir.iterdir())[0]
    proc = run_cli(
        "score",
        "--ct",
        demo_study.ct_dir,
        "--seg",
        ct_file,
        "--clinical",
        demo_study.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    assert "SEG" in _one_error_line(proc) or "Segmentation" in _one_error_line(proc)


def test_missing_ct_folder(demo_study, tmp_path):
    proc = run_cli(
        "score",
        "--ct",
        tmp_path / "nope",
        "--seg",
        demo_study.seg_path,
        "--clinical",
        demo_study.clinical_path,
        "--out",
        tmp_path / "sr.dcm",
    )
    assert proc.returncode == 2
    assert "nope" in _one_error_line(proc)


def test_demo_command_scores_the_bundled_study(tmp_path):
    proc = run_cli("demo", "--workdir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DEMONSTRATION MODEL" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"]["demonstration"] is True
    assert (tmp_path / "sr.dcm").is_file()


def test_model_verify_prints_identity():
    proc = run_cli("model", "verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: ")
    assert "demonstration: True" in proc.stdout


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("score", "demo", "model"):
        assert command in proc.stdout
