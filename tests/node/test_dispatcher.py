"""The scoring dispatcher with real worker processes: a worker killed under a live service (issue 10, item 2)."""

from __future__ import annotations

import json
import os
import signal
import time

import pydicom
import pytest

from sclc_risk_node.node.config import CompletionConfig
from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
from sclc_risk_node.node.records import InstanceHeader
from sclc_risk_node.node.scoring_job import default_model_path
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyEvent, StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.node.worker import ScoringDispatcher

pytestmark = pytest.mark.slow

STUDY_UID = DEMO_CLINICAL["study_instance_uid"]


@pytest.fixture
def ready_study(tmp_path):
    """The demo study stored in a real spool with its clinical record, and brought to ready."""
    demo = write_demo_study(tmp_path / "demo")
    spool = Spool.open(tmp_path / "spool", min_free_bytes=0)
    now = time.time()
    for path in [*sorted(demo.ct_dir.iterdir()), demo.seg_path]:
        header = InstanceHeader.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        StudyMachine(spool).store_instance(path.read_bytes(), header, now=now - 60, source='AE "TEST" at 127.0.0.1')
    StudyMachine(spool).add_clinical_record(
        json.dumps(DEMO_CLINICAL),
        accession_number=DEMO_CLINICAL.get("accession_number"),
        patient_id=DEMO_CLINICAL.get("patient_id"),
        study_instance_uid=STUDY_UID,
        now=now - 60,
    )
    machine = StudyMachine(spool)
    machine.advance_all(now=now, settings=CompletionConfig(grace_s=1.0, study_expiry_s=3600.0))
    assert spool.get_study(STUDY_UID).state is StudyState.READY
    yield spool, machine
    spool.close()


def test_a_killed_worker_sends_the_study_back_to_ready_and_counts_the_claim(ready_study):
    spool, machine = ready_study
    dispatcher = ScoringDispatcher(
        spool,
        machine,
        workers=1,
        lease_s=600,
        model_path=default_model_path(),
        destinations=[],
        segment_label=None,
        worker_id="host:1:live",
    )
    try:
        assert dispatcher.dispatch(now=time.time()) == 1
        deadline = time.monotonic() + 60
        while not dispatcher._pool._processes and time.monotonic() < deadline:  # the spawned worker
            time.sleep(0.05)
        [worker_pid] = list(dispatcher._pool._processes)
        os.kill(worker_pid, signal.SIGKILL)
        while dispatcher.in_flight and time.monotonic() < deadline:
            dispatcher.collect(now=time.time())
            time.sleep(0.05)
        record = spool.get_study(STUDY_UID)
        assert record.state is StudyState.READY, record.failure_reason  # was: failed at the first lost worker
        assert record.claim_attempts == 1
        last = spool.study_events(STUDY_UID)[-1]
        assert last.event is StudyEvent.WORKER_LOST and "worker process died" in last.reason
        # the pool is rebuilt: the next dispatch scores the study
        dispatcher.dispatch(now=time.time())
        while dispatcher.in_flight and time.monotonic() < deadline + 60:
            dispatcher.collect(now=time.time())
            time.sleep(0.1)
        assert spool.get_study(STUDY_UID).state is StudyState.SCORED
    finally:
        dispatcher.shutdown(wait=True)


def test_the_third_lost_worker_fails_the_study(ready_study):
    spool, machine = ready_study
    now = time.time()
    for attempt in range(1, 4):
        machine.claim(STUDY_UID, worker_id="host:2:live", now=now + attempt, lease_s=600)
        transition = machine.record_worker_lost(
            STUDY_UID, worker_id="host:2:live", reason="worker process died: x", now=now + attempt + 0.5
        )
    assert transition.to_state is StudyState.FAILED
    assert spool.get_study(STUDY_UID).failure_reason.startswith(
        "scoring lost its worker 3 times (killed or out of memory?)"
    )
