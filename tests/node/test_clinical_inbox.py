"""The clinical inbox and `clinical import`: real files, a real spool."""

from __future__ import annotations

import json
import os
import time

import pytest

from sclc_risk_node.node.clinical_inbox import ClinicalInbox, file_reference, import_clinical_file
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.scoring.clinical import clinical_record_from_mapping
from sclc_risk_node.scoring.errors import ClinicalRecordError

RECORD = {
    "accession_number": "ACC-77",
    "patient_id": "PAT-SECRET-1",
    "t_stage": "T4",
    "n_stage": "N3",
    "m_stage": "M1c",
    "ecog": 1,
    "anc": 6.0,
    "wbc": 7.0,
    "ldh": 300,
    "ldh_uln": 250,
}


@pytest.fixture
def spool(tmp_path):
    with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
        yield spool


def _age(path, seconds=5):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_valid_json_is_imported_and_moved_to_accepted(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    path = inbox_dir / "record.json"
    path.write_text(json.dumps(RECORD))
    _age(path)
    reports = inbox.scan(now=time.time())
    assert [r.accepted for r in reports] == [True]
    assert not path.exists()
    assert (inbox_dir / "accepted" / "record.json").exists()
    # the stored JSON reads back as the same record (LIPI computed from the labs: dNLR 6 > 3, LDH > ULN -> poor)
    with spool.transaction(write=False) as tx:
        stored = tx.one("clinical_record_by_id", record_id=1)
    record = clinical_record_from_mapping(json.loads(stored["record_json"]))
    assert record == clinical_record_from_mapping(RECORD)
    assert record.lipi.label == "poor"


def test_invalid_file_is_moved_aside_with_every_problem_named(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    bad = dict(RECORD, ecog=7, t_stage="T9")
    path = inbox_dir / "bad.json"
    path.write_text(json.dumps(bad))
    _age(path)
    [report] = inbox.scan(now=time.time())
    assert not report.accepted
    error_text = (inbox_dir / "rejected" / "bad.json.error.txt").read_text()
    assert "- t_stage: is not an AJCC 8th-edition stage (allowed: " in error_text
    assert "- ecog: is out of range (allowed: integer 0-4)" in error_text
    # the note names places and fields, never a value from the file
    assert "T9" not in error_text and "7 " not in error_text and "ACC-77" not in error_text
    assert (inbox_dir / "rejected" / "bad.json").exists()
    with spool.transaction(write=False) as tx:
        assert tx.one("clinical_record_by_id", record_id=1) is None


def test_a_file_still_being_written_waits(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    path = inbox_dir / "fresh.json"
    path.write_text(json.dumps(RECORD))
    assert inbox.scan(now=time.time()) == []
    assert path.exists()
    hidden = inbox_dir / ".partial.json"
    hidden.write_text("{")
    _age(hidden)
    assert inbox.scan(now=time.time() + 10)[0].file_name == "fresh.json"
    assert hidden.exists()


def test_csv_with_one_bad_row_imports_nothing(tmp_path, spool):
    path = tmp_path / "records.csv"
    path.write_text("accession_number,t_stage,n_stage,m_stage,ecog,lipi\nA1,T3,N2,M1c,1,good\nA2,T3,N2,M1c,9,good\n")
    with pytest.raises(ClinicalRecordError) as excinfo:
        import_clinical_file(spool, path, now=time.time())
    assert "ecog" in str(excinfo.value)
    with spool.transaction(write=False) as tx:
        assert tx.one("clinical_record_by_id", record_id=1) is None


def test_logs_name_no_patient_identifier(tmp_path, spool, capsys):
    from sclc_risk_node.node.logs import configure_logging

    configure_logging("INFO")
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    path = inbox_dir / "PAT-SECRET-1.json"
    path.write_text(json.dumps(RECORD))
    _age(path)
    inbox.scan(now=time.time())
    out = capsys.readouterr().out
    assert file_reference("PAT-SECRET-1.json") in out
    assert "PAT-SECRET-1" not in out


def test_a_file_with_an_unmatchable_record_imports_nothing(tmp_path, spool):
    path = tmp_path / "records.json"
    unmatchable = {k: v for k, v in RECORD.items() if k != "accession_number"}  # patient_id alone matches nothing
    path.write_text(json.dumps([dict(RECORD, accession_number="ACC-1"), unmatchable]))
    with pytest.raises(ClinicalRecordError) as excinfo:
        import_clinical_file(spool, path, now=time.time())
    assert "record 2" in str(excinfo.value) and "accession_number" in str(excinfo.value)
    with spool.transaction(write=False) as tx:
        assert tx.one("clinical_record_by_id", record_id=1) is None


# --- links and special files (issue 10, item 6) -------------------------------------------


def test_a_symlink_to_a_file_outside_the_inbox_is_rejected_unread(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    outside = tmp_path / "elsewhere" / "secret.csv"
    outside.parent.mkdir()
    secret = "root-token-4f9a,other-secret\nvalue-one,value-two\n"
    outside.write_text(secret)
    link = inbox_dir / "innocent.csv"
    link.symlink_to(outside)
    old = time.time() - 60
    os.utime(link, (old, old), follow_symlinks=False)

    [report] = inbox.scan(now=time.time())

    assert not report.accepted
    assert report.problems == ("innocent.csv: is a symbolic link; only regular files are read (nothing was read)",)
    moved = inbox_dir / "rejected" / "innocent.csv"
    assert moved.is_symlink() and not link.exists() and not link.is_symlink()
    assert outside.read_text() == secret  # the target is untouched
    note = (inbox_dir / "rejected" / "innocent.csv.error.txt").read_text()
    assert "symbolic link" in note
    for word in ("root-token-4f9a", "other-secret", "value-one", str(outside)):
        assert word not in note
    with spool.transaction(write=False) as tx:
        assert tx.one("clinical_record_by_id", record_id=1) is None


def test_a_regular_files_foreign_content_is_not_quoted_in_the_note(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    path = inbox_dir / "passwd.csv"
    path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    _age(path)
    [report] = inbox.scan(now=time.time())
    assert not report.accepted
    note = (inbox_dir / "rejected" / "passwd.csv.error.txt").read_text()
    assert "- header: unknown field (allowed: " in note
    assert "root" not in note.replace("passwd.csv", "") and "/bin/bash" not in note and "daemon" not in note


def test_a_fifo_is_rejected_without_blocking_the_scan(tmp_path, spool):
    inbox_dir = tmp_path / "inbox"
    inbox = ClinicalInbox(inbox_dir, spool)
    fifo = inbox_dir / "pipe.json"
    os.mkfifo(fifo)
    good = inbox_dir / "record.json"
    good.write_text(json.dumps(RECORD))
    _age(good)
    reports = {r.file_name: r for r in inbox.scan(now=time.time())}
    assert reports["pipe.json"].problems == (
        "pipe.json: is not a regular file (a FIFO, device or socket); nothing was read",
    )
    assert reports["record.json"].accepted
