"""Only the study machine writes ``studies.state``, watched at run time.

A SQLite authorizer on every spool connection records the Python call stack
of each statement that inserts a study row or updates its ``state`` column.
The node then runs for real, in this process: DCMTK ``storescu`` sends the
demonstration study to the SCP, a clinical record arrives through the inbox,
a worker scores it and the outbox delivers the SR to a DCMTK ``storescp``.
Every recorded write must have been issued by node/study_machine.py.

The authorizer runs when SQLite prepares a statement, so the connections are
opened without a statement cache: every execution is prepared, and seen.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sclc_risk_node.node.config import load_config
from sclc_risk_node.node.demo_study import DEMO_PATIENT, write_demo_study
from sclc_risk_node.node.service import NodeService
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyEvent, StudyState
from tests.node.dicom_tools import storescu
from tests.node.peers import peers, requires_storescp  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
NODE = REPO / "node"
DATABASE = NODE / "database.py"
#: `Transaction` runs every statement for its callers; the writer is whoever called it.
TRANSACTION_METHODS = {"_run", "execute", "insert", "one", "row", "all"}


@dataclass(frozen=True)
class StateWrite:
    statement: str  # "insert" or "update"
    writer: str  # repository-relative file of the innermost project frame that is not `Transaction`
    function: str


def _writer(stack: traceback.StackSummary) -> tuple[str, str]:
    for frame in reversed(stack):
        path = Path(frame.filename).resolve()
        if (path == DATABASE and frame.name in TRANSACTION_METHODS) or REPO not in path.parents:
            continue
        return path.relative_to(REPO).as_posix(), frame.name
    return "<no project frame>", ""


@pytest.fixture
def state_writes(monkeypatch) -> Iterator[list[StateWrite]]:
    """Every INSERT INTO studies / UPDATE studies SET state made on a connection opened from now on."""
    writes: list[StateWrite] = []
    real_connect = sqlite3.connect

    def authorizer(action: int, table: str | None, column: str | None, database: str | None, trigger: str | None):
        if table == "studies" and (
            action == sqlite3.SQLITE_INSERT or (action == sqlite3.SQLITE_UPDATE and column == "state")
        ):
            writer, function = _writer(traceback.extract_stack()[:-1])  # without this function's own frame
            writes.append(StateWrite("insert" if action == sqlite3.SQLITE_INSERT else "update", writer, function))
        return sqlite3.SQLITE_OK

    def connect(*args, **kwargs):
        kwargs["cached_statements"] = 0
        connection = real_connect(*args, **kwargs)
        connection.set_authorizer(authorizer)
        return connection

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield writes


def test_the_recorder_names_a_writer_that_is_not_the_machine(tmp_path, state_writes):
    """The watch can fail: an UPDATE of the state issued from here is attributed to this file."""
    with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
        with spool.transaction() as tx:
            tx._connection.execute("UPDATE studies SET state = state WHERE 0")
    assert [(w.statement, w.writer, w.function) for w in state_writes] == [
        ("update", "tests/node/test_state_writers.py", "test_the_recorder_names_a_writer_that_is_not_the_machine")
    ]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@requires_storescp
def test_receive_score_deliver_writes_state_only_through_the_study_machine(tmp_path, peers, state_writes):  # noqa: F811
    demo = write_demo_study(tmp_path / "demo")
    pacs = peers.storescp(tmp_path / "pacs", ae_title="PACS")
    inbox = tmp_path / "inbox"
    config_path = tmp_path / "node.toml"
    config_path.write_text(f"""
[scp]
ae_title = "SCLC_NODE"
bind_address = "127.0.0.1"
port = 0
[spool]
directory = "{tmp_path}/spool"
database = "{tmp_path}/node.sqlite3"
min_free_bytes = 0
[completion]
grace_s = 1
study_expiry_s = 600
[clinical]
inbox_directory = "{inbox}"
poll_interval_s = 0.5
[scoring]
workers = 1
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.port}
[outbox]
initial_backoff_s = 1
max_backoff_s = 2
[http]
enabled = false
""")
    service = NodeService(load_config(config_path))
    service.start()
    try:
        sent = storescu("127.0.0.1", service.receiver.port, [demo.ct_dir, demo.seg_path], called_ae="SCLC_NODE")
        assert sent.ok, sent.output
        shutil.copy(demo.clinical_path, inbox / "record.json")
        uid = DEMO_PATIENT.study_instance_uid
        wait_for(
            lambda: (study := service.spool.get_study(uid)) is not None and study.state is StudyState.DELIVERED,
            300,
            "the study to be delivered",
        )
        events = [t.event for t in service.spool.study_events(uid)]
    finally:
        service.stop()

    assert pacs.received_files(), "the SR reached the PACS"
    for event in (StudyEvent.IMAGES_COMPLETE, StudyEvent.CLAIMED, StudyEvent.SCORED, StudyEvent.DELIVERED):
        assert event in events
    # The flow wrote the state many times (creation, completion, clinical, claim, scored, delivered) ...
    assert sum(w.statement == "insert" for w in state_writes) >= 1
    assert sum(w.statement == "update" for w in state_writes) >= 5
    # ... and every write was the machine's.
    outside = sorted({(w.writer, w.function) for w in state_writes if w.writer != "node/study_machine.py"})
    assert outside == [], f"studies.state written from outside the study machine: {outside}"
