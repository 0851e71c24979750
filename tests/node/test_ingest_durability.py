"""Ingest without a third fsync: the received instance's index commit is synchronous=NORMAL, every other
commit stays FULL, and a row lost with the WAL tail is rebuilt by recover() from the fsynced file."""

from __future__ import annotations

from sclc_risk_node.node.records import StoreOutcome
from sclc_risk_node.node.study_machine import StudyMachine
from tests.node.test_spool import T0, StudyBuilder, open_spool


def test_only_the_instance_index_commit_skips_the_wal_fsync(tmp_path):
    with open_spool(tmp_path / "spool") as spool:
        statements: list[str] = []
        connection = spool._connection()
        connection.set_trace_callback(statements.append)
        study = StudyBuilder(1)
        assert StudyMachine(spool).store_instance(*study.ct(0), now=T0) is StoreOutcome.STORED

        upper = [s.strip().upper() for s in statements]
        normal, full = upper.index("PRAGMA SYNCHRONOUS = NORMAL"), upper.index("PRAGMA SYNCHRONOUS = FULL")
        # The write transaction (BEGIN IMMEDIATE ... COMMIT) runs between the two, and only it.
        assert [s for s in upper[normal + 1 : full] if s.startswith(("BEGIN", "COMMIT"))] == [
            "BEGIN IMMEDIATE",
            "COMMIT",
        ]
        assert upper.count("PRAGMA SYNCHRONOUS = NORMAL") == 1
        # Back to FULL for every other transaction on this connection (state changes, outbox, SRs).
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2
        statements.clear()
        with spool.transaction() as tx:
            tx.one("study_by_uid", study_uid=study.study_uid)
        assert not any("SYNCHRONOUS" in s.upper() for s in statements)
        connection.set_trace_callback(None)


def test_an_instance_row_lost_with_the_wal_tail_is_rebuilt_from_its_file(tmp_path):
    """What a power loss can do to a synchronous=NORMAL commit: the file is there, the row is not."""
    with open_spool(tmp_path / "spool") as spool:
        study = StudyBuilder(2)
        for k in range(3):
            StudyMachine(spool).store_instance(*study.ct(k), now=T0 + k)
        lost = study.ct_uids[2]
        with spool.transaction() as tx:
            tx._connection.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (lost,))

        report = StudyMachine(spool).recover(now=T0 + 10)

        assert report.reindexed_sop_instance_uids == (lost,)
        assert {r.sop_instance_uid for r in spool.study_instances(study.study_uid)} == set(study.ct_uids)
