"""`sclc-node status`, `retry`, `clinical import` and `config` on a real spool, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.config import load_config
from node.spool import Spool
from node.states import StudyState
from tests.node.test_spool import StudyBuilder
from tests.node.test_study_machine import drive_to


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f"""
[spool]
directory = "{tmp_path}/spool"
database = "{tmp_path}/node.sqlite3"
[clinical]
inbox_directory = "{tmp_path}/inbox"
""")
    return path


@pytest.fixture
def spool(config_path):
    config = load_config(config_path)
    config.prepare_directories()
    with Spool.open(config.spool.directory, database=config.spool.database, min_free_bytes=0) as spool:
        yield spool


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_status_names_what_an_incomplete_study_waits_for(config_path, spool):
    study = StudyBuilder(501, ct_count=3)
    spool.store_instance(*study.ct(0), now=1000.0)  # one CT slice, no SEG, no clinical record
    proc = run("status", "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert study.study_uid in proc.stdout
    assert "waiting for: no SEG or RTSTRUCT received" in proc.stdout
    assert "waiting for: no clinical record" in proc.stdout
    as_json = json.loads(run("status", "--json", "--config", config_path).stdout)
    [row] = as_json["studies"]
    assert row["state"] == "receiving" and row["instances"] == 1
    assert row["waiting_for"] == ["no SEG or RTSTRUCT received", "no clinical record"]


def test_status_shows_failure_reason_and_delivery_errors(config_path, spool):
    failed = drive_to(spool, StudyState.FAILED)
    proc = run("status", "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed" in proc.stdout and "refused" in proc.stdout


def test_retry_resends_a_failed_delivery(config_path, spool):
    failed = drive_to(spool, StudyState.FAILED)
    proc = run("retry", failed.study_uid, "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert "failed -> scored" in proc.stdout
    assert spool.get_study(failed.study_uid).state is StudyState.SCORED


def test_retry_of_an_unknown_study_is_one_line_exit_2(config_path, spool):
    proc = run("retry", "1.2.3.999", "--config", config_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: no study 1.2.3.999 in the spool"]


def test_retry_of_a_study_still_receiving_is_refused(config_path, spool):
    study = drive_to(spool, StudyState.RECEIVING)
    proc = run("retry", study.study_uid, "--config", config_path)
    assert proc.returncode == 2
    assert "receiving" in proc.stderr


def test_clinical_import_matches_a_received_study(config_path, spool, tmp_path):
    study = drive_to(spool, StudyState.WAITING_FOR_CLINICAL)
    record = tmp_path / "r.json"
    record.write_text(json.dumps({"accession_number": study.accession, "t_stage": "T3", "n_stage": "N2",
                                  "m_stage": "M1c", "ecog": 1, "lipi": "good"}))
    proc = run("clinical", "import", record, "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert study.study_uid in proc.stdout
    assert spool.get_study(study.study_uid).state is StudyState.READY


def test_config_check_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[scp]\nae_title = "THIS_IS_WAY_TOO_LONG_AE"\n')
    proc = run("config", "check", "--config", bad)
    assert proc.returncode == 2
    assert "scp.ae_title" in proc.stderr
    assert run("config", "check").returncode == 0
