"""The service's own jobs, in process: retention clean-up, disk guard, health, sd_notify, start/stop."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from sclc_risk_node.node.config import load_config
from sclc_risk_node.node.service import NodeService, sd_notify
from sclc_risk_node.node.states import StudyState
from tests.node.dicom_tools import echoscu
from tests.node.test_spool import T0, ct_instance
from tests.node.test_study_machine import drive_to

S = StudyState


def make_service(tmp_path, *, destinations: bool = True, min_free_bytes: int = 0) -> NodeService:
    destination = (
        """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 1
"""
        if destinations
        else ""
    )
    config_path = tmp_path / "node.toml"
    config_path.write_text(f"""
[scp]
port = 0
[spool]
directory = "{tmp_path}/spool"
database = "{tmp_path}/node.sqlite3"
min_free_bytes = {min_free_bytes}
retention_after_delivery_s = 0
retention_failed_s = 0
[clinical]
inbox_directory = "{tmp_path}/inbox"
[http]
port = 0
{destination}
""")
    return NodeService(load_config(config_path))


def files_of(service: NodeService, study) -> list:
    return [i.path for i in service.spool.study_instances(study.study_uid, include_purged=True) if i.path.exists()]


def test_retention_removes_files_of_finished_studies_only(tmp_path):
    service = make_service(tmp_path)
    try:
        studies = {state: drive_to(service.spool, state) for state in (S.DELIVERED, S.FAILED, S.SCORED, S.RECEIVING)}
        assert all(files_of(service, study) for study in studies.values())
        service.clean_up()
        assert files_of(service, studies[S.DELIVERED]) == []
        assert files_of(service, studies[S.FAILED]) == []
        assert files_of(service, studies[S.SCORED]), "a scored study still waits for its delivery"
        assert files_of(service, studies[S.RECEIVING])
        for state, study in studies.items():
            record = service.spool.get_study(study.study_uid)
            assert record.state is state, "clean-up keeps the study's history"
        assert service.spool.get_study(studies[S.DELIVERED].study_uid).purged_at is not None
    finally:
        service.spool.close()


def test_without_destinations_scored_is_final_and_cleaned(tmp_path):
    service = make_service(tmp_path, destinations=False)
    try:
        scored = drive_to(service.spool, S.READY)
        uid = scored.study_uid
        service.machine.claim(uid, worker_id="w1", now=T0 + 3, lease_s=60)
        sr_bytes, _ = ct_instance(uid, f"{uid}.3", f"{uid}.3.1")
        service.machine.record_scored(
            uid, worker_id="w1", sr_sop_instance_uid=f"{uid}.3.1", sr_bytes=sr_bytes, destinations=[], now=T0 + 4
        )
        assert service.spool.get_study(uid).state is S.SCORED
        service.clean_up()
        assert files_of(service, scored) == []
    finally:
        service.spool.close()


def test_disk_guard_reports_unhealthy_below_the_threshold(tmp_path):
    service = make_service(tmp_path, min_free_bytes=2**62)
    try:
        service.guard_disk()
        report = service.health()
        assert report.checks["disk"] is False and report.healthy is False
    finally:
        service.spool.close()


def test_sd_notify_sends_a_datagram(tmp_path, monkeypatch):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert sd_notify("READY=1") is True
        assert listener.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sd_notify("READY=1") is False


def test_started_service_answers_echo_and_healthz_then_stops(tmp_path):
    service = make_service(tmp_path)
    service.start()
    try:
        assert echoscu("127.0.0.1", service.receiver.port, called_ae="SCLC_NODE").ok
        with urllib.request.urlopen(service.http.url + "/healthz", timeout=5) as response:
            assert response.status == 200
            body = json.loads(response.read())
        assert body["status"] == "ok"
        with urllib.request.urlopen(service.http.url + "/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'sclc_studies{state="receiving"} 0.0' in metrics
    finally:
        service.stop()
    assert not service.receiver.running
    assert not service.scheduler.running


def test_retention_removes_old_clinical_files_but_not_new_ones(tmp_path):
    import os
    import time

    service = make_service(tmp_path)
    try:
        accepted = tmp_path / "inbox" / "accepted"
        rejected = tmp_path / "inbox" / "rejected"
        old = [accepted / "old.json", rejected / "old.csv", rejected / "old.csv.error.txt"]
        for path in old:
            path.write_text("{}")
            past = time.time() - 10
            os.utime(path, (past, past))
        time.sleep(0.01)
        service.clean_up()
        assert not any(path.exists() for path in old)

        (tmp_path / "second").mkdir()
        fresh_config = make_service(tmp_path / "second")
        fresh = tmp_path / "second" / "inbox" / "accepted" / "fresh.json"
        fresh.write_text("{}")
        future = time.time() + 3600
        os.utime(fresh, (future, future))
        fresh_config.clean_up()
        assert fresh.exists()
        fresh_config.spool.close()
    finally:
        service.spool.close()


def test_start_up_makes_an_sr_send_of_the_previous_instance_due_at_once(tmp_path):
    import time

    service = make_service(tmp_path)
    study = drive_to(service.spool, S.SCORED)
    [item] = service.spool.study_deliveries(study.study_uid)
    now = time.time()
    service.spool.start_delivery(item.item_id, now=now, hold_s=3600)  # the instance that is gone was sending it
    assert service.spool.due_deliveries(now=now + 1) == []
    service.resume_previous_instance_work()
    assert [d.item_id for d in service.spool.due_deliveries(now=time.time())] == [item.item_id]
    service.spool.close()


# --- privacy retention (issue 10, item 8) -------------------------------------------------


def _database_text(service) -> str:
    """Every value in the database's tables, as one string, to search for identifiers."""
    import sqlite3

    with sqlite3.connect(service.spool.database) as connection:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for table in tables for row in connection.execute(f"SELECT * FROM {table}"))


def test_retention_forgets_the_patient_data_of_a_purged_study(tmp_path):
    service = make_service(tmp_path)
    try:
        purged = drive_to(service.spool, S.DELIVERED)
        purged.clinical(service.spool, now=T0 + 1.5, patient_id="PAT-1")  # a superseded correction too
        kept = drive_to(service.spool, S.SCORED)  # still waiting for delivery: keeps everything
        before = _database_text(service)
        assert purged.accession in before and kept.accession in before
        service.clean_up()
        after = _database_text(service)
        assert purged.accession not in after, "the purged study's accession number must go"
        record = service.spool.get_study(purged.study_uid)
        assert record.state is S.DELIVERED and record.purged_at is not None  # state and history stay
        assert record.accession_number is None and record.patient_id is None and record.clinical_record_id is None
        assert kept.accession in after and service.spool.clinical_record_for(kept.study_uid) is not None
        assert '"t_stage": "T2"' in after  # only the kept study's record remains
        assert after.count('"t_stage": "T2"') == 1
    finally:
        service.spool.close()


def test_unmatched_clinical_records_expire_after_the_configured_time(tmp_path):
    import json
    import time

    service = make_service(tmp_path)
    try:
        now = time.time()
        retention_s = service.config.clinical.unmatched_record_retention_s
        assert retention_s == 2592000  # the documented default, 30 days
        old = service.machine.add_clinical_record(
            json.dumps({"ecog": 2}),
            accession_number="ACC-NEVER-CAME",
            patient_id="PAT-OLD",
            study_instance_uid=None,
            now=now - retention_s - 1,
        )
        young = service.machine.add_clinical_record(
            json.dumps({"ecog": 0}),
            accession_number="ACC-STILL-WAITING",
            patient_id=None,
            study_instance_uid=None,
            now=now - 60,
        )
        linked = drive_to(service.spool, S.READY)  # its record is old (T0) but in use
        service.clean_up()
        text = _database_text(service)
        assert "ACC-NEVER-CAME" not in text and "PAT-OLD" not in text
        assert "ACC-STILL-WAITING" in text
        assert service.spool.clinical_record_for(linked.study_uid) is not None
        assert old.record_id != young.record_id
    finally:
        service.spool.close()
