"""`sclc-node status`, `retry`, `clinical import` and `config` on a real spool, as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sclc_risk_node.node.config import load_config
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
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
    return subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_status_names_what_an_incomplete_study_waits_for(config_path, spool):
    study = StudyBuilder(501, ct_count=3)
    StudyMachine(spool).store_instance(*study.ct(0), now=1000.0)  # one CT slice, no SEG, no clinical record
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
    drive_to(spool, StudyState.FAILED)
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


def test_retry_acts_on_a_study_left_in_scoring_by_a_crash(config_path, spool):
    study = drive_to(spool, StudyState.SCORING)  # claimed by a service that is gone; no service runs now
    proc = run("retry", study.study_uid, "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert "scoring -> receiving (retry)" in proc.stdout
    assert spool.get_study(study.study_uid).state is StudyState.RECEIVING


def test_retry_leaves_a_running_services_live_claim_alone(config_path, spool):
    import time

    from sclc_risk_node.node.study_machine import StudyMachine

    study = drive_to(spool, StudyState.READY)
    StudyMachine(spool).claim(study.study_uid, worker_id="host:9:live", now=time.time(), lease_s=900)
    spool.lock_service("host:9:live")  # as `serve` does
    try:
        proc = run("retry", study.study_uid, "--config", config_path)
    finally:
        spool.unlock_service()
    assert proc.returncode == 2
    assert "being scored by host:9:live" in proc.stderr
    assert spool.get_study(study.study_uid).state is StudyState.SCORING


def test_clinical_import_matches_a_received_study(config_path, spool, tmp_path):
    study = drive_to(spool, StudyState.WAITING_FOR_CLINICAL)
    record = tmp_path / "r.json"
    record.write_text(
        json.dumps(
            {
                "accession_number": study.accession,
                "t_stage": "T3",
                "n_stage": "N2",
                "m_stage": "M1c",
                "ecog": 1,
                "lipi": "good",
            }
        )
    )
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


# --- honest messages (issue 10, item 7) ---------------------------------------------------


def test_clinical_import_does_not_claim_a_study_its_record_does_not_name(config_path, spool, tmp_path):
    study = drive_to(spool, StudyState.WAITING_FOR_CLINICAL)
    other_study_uid = "1.2.826.0.1.3680043.8.498.999999"
    record = tmp_path / "r.json"
    record.write_text(
        json.dumps(
            {
                "accession_number": study.accession,
                "study_instance_uid": other_study_uid,
                "t_stage": "T3",
                "n_stage": "N2",
                "m_stage": "M1c",
                "ecog": 1,
                "lipi": "good",
            }
        )
    )
    proc = run("clinical", "import", record, "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert "attached to 0 study(ies) already received" in proc.stdout
    assert "record 1: no study received so far matches it" in proc.stdout
    assert study.study_uid not in proc.stdout
    record_after = spool.get_study(study.study_uid)
    assert record_after.state is StudyState.WAITING_FOR_CLINICAL and record_after.clinical_record_id is None


def test_config_check_prints_the_real_paths_and_model(config_path, tmp_path):
    proc = run("config", "check", "--config", config_path)
    assert proc.returncode == 0, proc.stderr
    assert f"database           {tmp_path}/node.sqlite3" in proc.stdout
    assert f"spool              {tmp_path}/spool" in proc.stdout
    assert f"clinical inbox     {tmp_path}/inbox" in proc.stdout
    assert "demo-integrated-cox" in proc.stdout and "DEMONSTRATION" in proc.stdout
    assert not (tmp_path / "spool").exists()  # checking writes nothing lasting


def test_config_check_finds_what_serve_would_refuse(tmp_path):
    import socket

    from sclc_risk_node.node.scoring_job import default_model_path

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tampered = tmp_path / "tampered-model.json"
    model = json.loads(default_model_path().read_text())
    model_text = default_model_path().read_text()
    tampered.write_text(model_text.replace('"demonstration": true', '"demonstration": false', 1))
    assert tampered.read_text() != model_text
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(f"""
[scp]
bind_address = "192.0.2.7"
[spool]
directory = "{blocker}/spool"
database = "{tmp_path}/db/node.sqlite3"
[clinical]
inbox_directory = "{tmp_path}/inbox"
[scoring]
model_file = "{tampered}"
[http]
port = {busy_port}
""")
        proc = run("config", "check", "--config", config)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: spool.directory: '{blocker}/spool' cannot be created: '{blocker}' is not a directory" in errors
    assert "error: scp.bind_address: 192.0.2.7 is not an address of this machine" in errors
    assert f"error: http.port: 127.0.0.1:{busy_port} is already in use (by another program)" in errors
    assert any(line.startswith("error: scoring.model_file: ") and "sha256" in line for line in errors), errors
    assert "NOT OK" in proc.stderr and "would refuse" in proc.stderr
    assert model  # the shipped file itself is untouched


def test_database_and_its_wal_and_shm_are_0600_whatever_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0)
    try:
        with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
            drive_to(spool, StudyState.RECEIVING)  # a write: the -wal and -shm exist now
            database = spool.database
            companions = [
                database,
                database.with_name(database.name + "-wal"),
                database.with_name(database.name + "-shm"),
            ]
            modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in companions}
    finally:
        os.umask(old)
    assert modes == {"node.sqlite3": "0o600", "node.sqlite3-wal": "0o600", "node.sqlite3-shm": "0o600"}
