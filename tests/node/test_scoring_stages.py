"""Scoring stage times (read, ring, extract, model, sr) reach the JSON result, the study's status and
/metrics; worker processes import and load the model once, at pool start.  Real scoring, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
from sclc_risk_node.node.scoring_job import default_model_path
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import (
    StudyMachine,
    applicability_from_reason,
    scored_reason,
    stage_seconds_from_reason,
)
from sclc_risk_node.node.worker import ScoringTask, run_scoring_task
from tests.node.test_spool import ct_instance
from tests.node.test_study_machine import T0, drive_to

STAGES = ["read", "ring", "extract", "model", "sr"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_study(tmp_path_factory.mktemp("demo"))


def test_the_worker_reports_every_stage(demo):
    from sclc_risk_node.node.demo_study import DEMO_PATIENT

    task = ScoringTask(
        study_instance_uid=DEMO_PATIENT.study_instance_uid,
        ct_series_dir=demo.ct_dir,
        ct_series_instance_uid=None,
        seg_path=demo.seg_path,
        clinical_json=json.dumps(DEMO_CLINICAL),
        model_path=default_model_path(),
        segment_label=None,
    )
    outcome = run_scoring_task(task)
    assert outcome.error is None
    assert list(outcome.stage_seconds) == STAGES
    assert all(seconds > 0 for seconds in outcome.stage_seconds.values())
    assert sum(outcome.stage_seconds.values()) <= outcome.seconds
    result = json.loads(outcome.result_json)
    assert list(result["stage_seconds"]) == STAGES
    # The JSON's sr stage is building the SR; the worker's also counts encoding it.
    assert outcome.stage_seconds["sr"] >= result["stage_seconds"]["sr"] - 0.001


def test_stage_seconds_round_trip_through_the_scored_reason():
    stages = {"read": 1.2345, "ring": 0.2, "extract": 2.5, "model": 0.004, "sr": 0.31}
    reason = scored_reason("1.2.3", "out_of_domain", True, stages)
    assert reason == (
        "SR 1.2.3; applicability out_of_domain; risk group and PFS withheld; "
        "stages read=1.234 ring=0.200 extract=2.500 model=0.004 sr=0.310"
    )
    assert applicability_from_reason(reason) == ("out_of_domain", True)
    assert stage_seconds_from_reason(reason) == {"read": 1.234, "ring": 0.2, "extract": 2.5, "model": 0.004, "sr": 0.31}
    assert stage_seconds_from_reason(scored_reason("1.2.3", None, False)) == {}
    assert stage_seconds_from_reason(None) == {}


def test_status_json_shows_the_stage_split(tmp_path):
    config_path = tmp_path / "node.toml"
    config_path.write_text(
        f'[spool]\ndirectory = "{tmp_path}/spool"\ndatabase = "{tmp_path}/node.sqlite3"\n'
        f'[clinical]\ninbox_directory = "{tmp_path}/inbox"\n'
    )
    from sclc_risk_node.node.config import load_config

    config = load_config(config_path)
    config.prepare_directories()
    stages = {"read": 0.5, "ring": 0.25, "extract": 1.5, "model": 0.01, "sr": 0.125}
    with Spool.open(config.spool.directory, database=config.spool.database, min_free_bytes=0) as spool:
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
            applicability="in_domain",
            stage_seconds=stages,
        )
    run = [sys.executable, "-m", "sclc_risk_node.node.cli", "status", "--config", str(config_path)]
    rows = json.loads(subprocess.run(run + ["--json"], capture_output=True, text=True, check=True).stdout)["studies"]
    assert rows[0]["stage_seconds"] == stages
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "scoring: read 0.50 s, ring 0.25 s, extract 1.50 s, model 0.01 s, sr 0.12 s" in text


def test_the_worker_initialiser_imports_and_loads_the_model_once():
    # Run in a fresh interpreter: this process has imported everything already.
    code = (
        "import os, sys, time\n"
        "from sclc_risk_node.node.worker import _worker_initialiser, _load_model\n"
        "from sclc_risk_node.models import shipped_model_path\n"
        "path = shipped_model_path('demo-integrated-cox-2.0.0.json')\n"
        "assert 'radiomics' not in sys.modules\n"
        "_worker_initialiser(os.getppid(), str(path))\n"
        "assert 'radiomics' in sys.modules and 'highdicom' in sys.modules\n"
        "info = _load_model.cache_info()\n"
        "assert (info.misses, info.currsize) == (1, 1), info\n"
        "_load_model(str(path), path.stat().st_mtime_ns)\n"
        "assert _load_model.cache_info().hits == 1\n"
        "_worker_initialiser(os.getppid(), '/nonexistent/model.json')  # reported per study, not here\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_workers_start_warm_with_the_dispatcher(tmp_path):
    from sclc_risk_node.node.worker import ScoringDispatcher

    with Spool.open(tmp_path / "spool", min_free_bytes=0) as spool:
        dispatcher = ScoringDispatcher(
            spool,
            StudyMachine(spool),
            workers=1,
            lease_s=60,
            model_path=default_model_path(),
            destinations=[],
            segment_label=None,
        )
        try:
            assert dispatcher.dispatch(now=time.time()) == 0  # no study: the pool starts anyway
            pool = dispatcher._pool
            assert pool is not None
            # The warm-up task ran in a live worker process, after its initialiser.
            pid = pool.submit(os.getpid).result(timeout=120)
            assert pid != os.getpid()
        finally:
            dispatcher.shutdown()


def test_a_finished_stage_runs_the_next_job_at_once(tmp_path):
    """ready -> dispatch, outcome -> record, scored -> outbox: no wait for the next tick (issue 9)."""
    import functools
    import threading

    from sclc_risk_node.node.service import JobIntervals
    from tests.node.test_service import make_service

    service = make_service(tmp_path)
    service.intervals = JobIntervals(completion_s=3600, dispatch_s=3600, outbox_s=3600)
    runs = {"dispatch_scoring": threading.Semaphore(0), "deliver": threading.Semaphore(0)}
    for name, ran in runs.items():
        job = getattr(service, name)
        setattr(service, name, functools.wraps(job)(lambda job=job, ran=ran: (job(), ran.release())))
    service.start()
    try:
        for ran in runs.values():
            assert ran.acquire(timeout=60)  # the run at start
        service.dispatcher.on_scored()
        assert runs["deliver"].acquire(timeout=10)
        service.dispatcher.on_outcome()
        assert runs["dispatch_scoring"].acquire(timeout=10)
        assert not runs["deliver"].acquire(timeout=1)  # only what was asked for
    finally:
        service.stop()
