"""The audit trail (issue 10, item 9): a real SCP, inbox, outbox path and CLI write events; none carries PHI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from sclc_risk_node.node.audit import AuditEventType, local_user
from sclc_risk_node.node.clinical_inbox import ClinicalInbox, file_reference
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from tests.node.dicom_tools import LOOPBACK, requires_dcmtk, storescu
from tests.node.test_scp import NODE_AE, PACS_AE, Node, Phantom, scp_config
from tests.node.test_study_machine import drive_to

PHI = ("SYNTH-0001", "Synthetic^Phantom", "Synthetic", "19600101", "SYNACC0001", "PAT-AUDIT-7")


def all_audit_text(database) -> str:
    with sqlite3.connect(database) as connection:
        return "\n".join(repr(row) for row in connection.execute("SELECT * FROM audit_events"))


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path / "node", scp_config())
    yield node
    node.stop()


@pytest.mark.external
@requires_dcmtk
def test_received_imported_sent_and_retried_are_audited_without_phi(node, tmp_path):
    phantom = Phantom(tmp_path / "phantom")
    study_uid = str(phantom.seg.StudyInstanceUID)
    sent = storescu(LOOPBACK, node.port, [phantom.ct_dir, phantom.seg_dir], called_ae=NODE_AE, calling_ae=PACS_AE)
    assert sent.ok, sent.output

    received = node.spool.audit_events(study_uid=study_uid)
    assert [e.event for e in received] == [AuditEventType.INSTANCES_RECEIVED] * 9  # 8 CT + 1 SEG
    assert {e.who for e in received} == {f'AE "{PACS_AE}" at 127.0.0.1'}
    assert {(e.atna_event_id, e.action, int(e.outcome)) for e in received} == {("DCM 110104", "C", 0)}
    assert sum(e.counts["instances"] for e in received) == 9

    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, node.spool)
    record = {
        "accession_number": "SYNACC0001",
        "patient_id": "PAT-AUDIT-7",
        "t_stage": "T3",
        "n_stage": "N2",
        "m_stage": "M1c",
        "ecog": 1,
        "lipi": "good",
    }
    path = inbox_dir / "SYNTH-0001.json"  # senders name files after patients
    path.write_text(json.dumps(record))
    past = time.time() - 5
    os.utime(path, (past, past))
    [report] = inbox.scan(now=time.time())
    assert report.accepted and report.matched_studies == (study_uid,)
    [imported] = [e for e in node.spool.audit_events(study_uid=study_uid) if e.event is AuditEventType.RECORD_IMPORTED]
    assert imported.who == f"clinical inbox (file {file_reference('SYNTH-0001.json')})"
    assert imported.counts == {"records": 1, "studies_attached": 1}
    assert imported.atna_event_id == "DCM 110107"

    delivered = drive_to(node.spool, StudyState.DELIVERED)  # scored, then accepted by destination "pacs"
    [sr_sent] = [e for e in node.spool.audit_events(study_uid=delivered.study_uid) if e.event is AuditEventType.SR_SENT]
    assert (sr_sent.destination, sr_sent.counts, sr_sent.action) == ("pacs", {"sr": 1}, "R")

    StudyMachine(node.spool).retry(delivered.study_uid, now=time.time(), who=local_user())
    [retry] = [e for e in node.spool.audit_events(study_uid=delivered.study_uid) if e.event is AuditEventType.RETRY]
    assert retry.who == local_user() and retry.who.startswith("local user ") and retry.counts == {"resend": 1}

    failed = drive_to(node.spool, StudyState.FAILED)  # the delivery gave up
    [gave_up] = [
        e for e in node.spool.audit_events(study_uid=failed.study_uid) if e.event is AuditEventType.SR_SEND_GAVE_UP
    ]
    assert int(gave_up.outcome) == 8 and gave_up.destination == "pacs"

    text = all_audit_text(node.spool.database)
    for identifier in PHI:
        assert identifier not in text, identifier


def test_the_audit_table_is_append_only(tmp_path):
    from tests.node.test_spool import open_spool

    with open_spool(tmp_path / "spool") as spool:
        drive_to(spool, StudyState.RECEIVING)
        assert spool.audit_events()
        database = spool.database
    with sqlite3.connect(database) as connection:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("UPDATE audit_events SET who = 'someone else'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute("DELETE FROM audit_events")


def test_sclc_node_audit_prints_json_lines_and_retry_names_the_local_user(tmp_path):
    from sclc_risk_node.node.config import load_config
    from sclc_risk_node.node.spool import Spool

    config_path = tmp_path / "node.toml"
    config_path.write_text(f"""
[spool]
directory = "{tmp_path}/spool"
database = "{tmp_path}/node.sqlite3"
[clinical]
inbox_directory = "{tmp_path}/inbox"
""")
    config = load_config(config_path)
    config.prepare_directories()
    with Spool.open(config.spool.directory, database=config.spool.database, min_free_bytes=0) as spool:
        study = drive_to(spool, StudyState.EXPIRED)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "sclc_risk_node.node.cli", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert run("retry", study.study_uid).returncode == 0
    proc = run("audit", "--study", study.study_uid)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["instances_received"] * 4 + ["retry"]
    assert events[-1]["who"] == local_user() and events[-1]["atna_event_id"] == "DCM 110103"
    assert set(events[0]) == {
        "at",
        "event",
        "atna_event_id",
        "action",
        "outcome",
        "who",
        "destination",
        "study_instance_uid",
        "counts",
    }
