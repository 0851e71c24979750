"""Scoring in a bounded pool of worker processes.

The dispatcher (a scheduler job in the service process) claims ready studies
with a lease, hands each to a worker process, and records the outcome.  Only
the service process touches the database: a worker gets file paths and the
clinical record, and returns the SR bytes or a one-line reason.  A worker that
dies (killed, out of memory) simply never answers; its lease runs out and the
study is claimed again (`StudyMachine.reclaim_stale_leases`), which counts
toward ``max_claim_attempts``.  When the service itself dies, its claims are
released by the next instance at start-up and do not count
(`StudyMachine.reclaim_previous_instances`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import CTImageStorage, RTStructureSetStorage, SegmentationStorage

from sclc_risk_node.node.errors import InvalidTransition, NodeError
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import InstanceRecord
from sclc_risk_node.scoring.errors import InputError


@dataclass(frozen=True, slots=True)
class ScoringTask:
    """Everything a worker process needs, as plain picklable values."""

    study_instance_uid: str
    ct_series_dir: Path
    ct_series_instance_uid: str
    seg_path: Path
    clinical_json: str
    model_path: Path
    segment_label: str | None
    #: For an RTSTRUCT: the tumour ROI name pattern (`[scoring] rtstruct_roi_pattern`); None: the default.
    rtstruct_roi_pattern: str | None = None
    #: The objects to build beside the risk SR (`dicom_io.result_objects.OBJECT_KINDS`; "sr" adds the
    #: key-slice ROI SR).
    extra_object_kinds: tuple[str, ...] = ()
    allow_lossy_ct: bool = False
    #: Report an out-of-domain study's risk group and PFS (config `scoring.report_out_of_domain`).
    report_out_of_domain: bool = False


@dataclass(frozen=True, slots=True)
class ScoringOutcome:
    study_instance_uid: str
    seconds: float
    sr_sop_instance_uid: str | None = None
    sr_bytes: bytes | None = None
    result_json: str | None = None
    error: str | None = None
    #: (kind, SOP Instance UID, Part-10 bytes) of the key-slice ROI SR (kind "sr"), KOS, PDF and SC.
    extra_objects: tuple[tuple[str, str, bytes], ...] = ()
    #: Wall seconds per stage (read, ring, extract, model, sr; sr includes encoding the file).
    stage_seconds: dict[str, float] | None = None


class StudyInputsError(InputError):
    """The spool holds no usable CT + SEG pair for a study."""


def choose_inputs(instances: Sequence[InstanceRecord]) -> tuple[InstanceRecord, str, Path]:
    """The SEG or RTSTRUCT to score (the newest) and the CT series it belongs to: (seg, ct series UID, ct folder).

    The series is the one the SEG (RTSTRUCT) references; one that only shares
    the frame of reference is matched to the CT series in that frame.
    """
    segs = [i for i in instances if i.sop_class_uid in (SegmentationStorage, RTStructureSetStorage)]
    cts = [i for i in instances if i.sop_class_uid == CTImageStorage]
    if not segs:
        raise StudyInputsError("study has no SEG or RTSTRUCT")
    seg = max(segs, key=lambda i: (i.stored_at, i.sop_instance_uid))
    ct_series = {i.series_instance_uid for i in cts}
    candidates = [uid for uid in seg.referenced_series_instance_uids if uid in ct_series]
    if not candidates:
        candidates = sorted(
            {i.series_instance_uid for i in cts if i.frame_of_reference_uid == seg.frame_of_reference_uid}
        )
    if len(candidates) != 1:
        raise StudyInputsError(
            f"{'RTSTRUCT' if seg.sop_class_uid == RTStructureSetStorage else 'SEG'} {seg.sop_instance_uid} matches {len(candidates)} CT series in the study; expected exactly one"
        )
    series_uid = candidates[0]
    folder = next(i.path.parent for i in cts if i.series_instance_uid == series_uid)
    return seg, series_uid, folder


@functools.lru_cache(maxsize=4)
def _load_model(model_path: str, mtime_ns: int):
    from sclc_risk_node.node.scoring_job import load_model_file

    return load_model_file(Path(model_path))


def run_scoring_task(task: ScoringTask) -> ScoringOutcome:
    """Runs in a worker process.  Never raises for bad input: the reason comes back as text."""
    from sclc_risk_node.node.scoring_job import result_as_json, score_files
    from sclc_risk_node.scoring.clinical import clinical_record_from_mapping

    started = time.perf_counter()
    try:
        model = _load_model(str(task.model_path), task.model_path.stat().st_mtime_ns)
        clinical = clinical_record_from_mapping(json.loads(task.clinical_json))
        scored = score_files(
            task.ct_series_dir,
            task.seg_path,
            [clinical],
            model,
            series_instance_uid=task.ct_series_instance_uid,
            segment_label=task.segment_label,
            allow_lossy_ct=task.allow_lossy_ct,
            rtstruct_roi_pattern=task.rtstruct_roi_pattern,
            report_out_of_domain=task.report_out_of_domain,
        )
        encoding = time.perf_counter()
        sr_bytes = _part10_bytes(scored.sr)
        extra_objects = _extra_objects(scored, clinical, model, task)
        stage_seconds = dict(scored.stage_seconds)
        # "sr" covers every result object: the risk SR, the ROI SR, KOS, PDF and SC.
        stage_seconds["sr"] = stage_seconds.get("sr", 0.0) + time.perf_counter() - encoding
        return ScoringOutcome(
            task.study_instance_uid,
            time.perf_counter() - started,
            sr_sop_instance_uid=str(scored.sr.SOPInstanceUID),
            sr_bytes=sr_bytes,
            result_json=json.dumps(result_as_json(scored)),
            extra_objects=extra_objects,
            stage_seconds=stage_seconds,
        )
    except InputError as exc:
        return ScoringOutcome(task.study_instance_uid, time.perf_counter() - started, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug must fail one study, not the node
        return ScoringOutcome(
            task.study_instance_uid,
            time.perf_counter() - started,
            error=f"internal error while scoring: {type(exc).__name__}: {exc}",
        )


def _part10_bytes(dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _extra_objects(scored, clinical, model, task: ScoringTask) -> tuple[tuple[str, str, bytes], ...]:
    """The ROI SR / KOS / PDF / SC of a scored study, from the same key slice and result as its SR."""
    if not task.extra_object_kinds:
        return ()
    from sclc_risk_node.dicom_io.result_objects import build_result_objects, object_kind

    objects = build_result_objects(
        scored.ct,
        scored.segment,
        clinical,
        scored.result,
        kinds=task.extra_object_kinds,
        report_out_of_domain=task.report_out_of_domain,
        ring=model.extraction.ring,
        include_risk_sr=False,
    )
    return tuple((object_kind(name), str(ds.SOPInstanceUID), _part10_bytes(ds)) for name, ds in objects.items())


def _exit_when_orphaned(parent_pid: int, poll_s: float = 1.0) -> None:
    """A worker whose service was killed (-9) must not linger: it holds a CT volume and nobody will read its answer."""
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_initialiser(parent_pid: int, model_path: str | None = None) -> None:
    import threading

    from sclc_risk_node.node.logs import configure_logging

    configure_logging(os.environ.get("SCLC_NODE_LOG_LEVEL", "WARNING"))
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True, name="orphan-watch").start()
    _warm_up(model_path)


def _warm_up(model_path: str | None) -> None:
    """Pay once per worker process what every study would otherwise pay: imports and the model file.

    pyradiomics, SimpleITK, highdicom and pydicom's codecs take seconds to
    import; the model is parsed and its seal checked.  A model that cannot be
    loaded is not an error here: the study's task reports it.
    """
    import radiomics

    import sclc_risk_node.node.scoring_job  # noqa: F401 - pyradiomics, SimpleITK, highdicom, pydicom, the scoring package

    radiomics.getFeatureClasses()  # imports every feature class module
    if model_path:
        try:
            path = Path(model_path)
            _load_model(str(path), path.stat().st_mtime_ns)
        except Exception:  # noqa: BLE001 - reported per study by run_scoring_task
            pass


def _worker_ready() -> int:
    """A no-op task: submitted once per worker at pool start, so the processes (and their warm-up) start then."""
    return os.getpid()


#: `dicom_io.result_objects.OBJECT_KINDS`, without importing highdicom into the service process.
_ALL_OBJECT_KINDS = ("sr", "kos", "pdf", "sc")


def _kinds_to_build(
    destinations: Sequence[str], destination_objects: Mapping[str, Sequence[str]] | None
) -> tuple[str, ...]:
    """The kinds some destination takes; all of them when there is no destination (kept in the spool)."""
    if destination_objects is None or not destinations:
        return _ALL_OBJECT_KINDS
    wanted = {kind for name in destinations for kind in destination_objects.get(name, ())}
    return tuple(kind for kind in _ALL_OBJECT_KINDS if kind in wanted)


class ScoringDispatcher:
    """Claims ready studies up to the pool size, runs them in worker processes and records the outcome."""

    def __init__(
        self,
        spool,
        machine,
        *,
        workers: int,
        lease_s: float,
        model_path: Path,
        destinations: Sequence[str],
        segment_label: str | None,
        metrics=None,
        rtstruct_roi_pattern: str | None = None,
        destination_objects: Mapping[str, Sequence[str]] | None = None,
        worker_id: str | None = None,
        allow_lossy_ct: bool = False,
        report_out_of_domain: bool = False,
    ):
        self.spool = spool
        self.machine = machine
        self.workers = int(workers)
        self.lease_s = float(lease_s)
        self.model_path = Path(model_path)
        self.destinations = tuple(destinations)
        #: destination -> the object kinds it takes (config `destinations[].objects`); None: all.
        self.destination_objects = (
            {name: tuple(kinds) for name, kinds in destination_objects.items()}
            if destination_objects is not None
            else None
        )
        self.report_out_of_domain = bool(report_out_of_domain)
        self.extra_object_kinds = _kinds_to_build(self.destinations, self.destination_objects)
        self.segment_label = segment_label or None
        self.allow_lossy_ct = bool(allow_lossy_ct)
        self.rtstruct_roi_pattern = rtstruct_roi_pattern or None
        self.metrics = metrics
        # The service's instance id (`node.service.new_instance_id`): claims name the run, not
        # only host:pid, so a restart knows which claims are its predecessor's.
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight: dict[str, Future] = {}
        self._finished: queue.SimpleQueue[tuple[str, ScoringOutcome | BaseException]] = queue.SimpleQueue()
        self._log = get_logger(stage="scoring")
        #: Called (from the pool's thread) when a worker's outcome arrives, and after a study is
        #: recorded as scored: the service runs `dispatch` and the outbox at once (`run_soon`).
        self.on_outcome: Callable[[], None] | None = None
        self.on_scored: Callable[[], None] | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: workers must not inherit the service's threads, sockets or SQLite handles.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_initialiser,
                initargs=(os.getpid(), str(self.model_path)),
            )
            # The pool starts its processes on demand; ask for all of them now, so
            # the first study finds them warm.
            for _ in range(self.workers):
                self._pool.submit(_worker_ready)
        return self._pool

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def dispatch(self, *, now: float) -> int:
        """Record finished work, renew leases, reclaim dead workers' studies, and start new ones."""
        self._executor()  # workers start (and warm up) with the node, not with the first study
        self.collect(now=now)
        for study_uid in list(self._in_flight):
            try:
                self.machine.renew_lease(study_uid, worker_id=self.worker_id, now=now, lease_s=self.lease_s)
            except InvalidTransition:
                self._log.warning("lease_lost", study_uid=study_uid)
        self.machine.reclaim_stale_leases(now=now)
        started = 0
        while len(self._in_flight) < self.workers:
            study = self.machine.claim_next(worker_id=self.worker_id, now=now, lease_s=self.lease_s)
            if study is None:
                break
            self._start(study.study_instance_uid, now=now)
            started += 1
        return started

    def _start(self, study_uid: str, *, now: float) -> None:
        try:
            task = self._task_for(study_uid)
        except (InputError, NodeError) as exc:
            self.machine.record_scoring_failed(study_uid, worker_id=self.worker_id, reason=str(exc), now=now)
            return
        try:
            future = self._executor().submit(run_scoring_task, task)
        except BrokenProcessPool:
            self._pool = None
            future = self._executor().submit(run_scoring_task, task)
        self._in_flight[study_uid] = future
        future.add_done_callback(functools.partial(self._outcome_arrived, study_uid))
        self._log.info("scoring_started", study_uid=study_uid)

    def _outcome_arrived(self, study_uid: str, future: Future) -> None:
        self._finished.put((study_uid, future.exception() or future.result()))
        if self.on_outcome is not None:
            self.on_outcome()

    def _task_for(self, study_uid: str) -> ScoringTask:
        record_row = self.spool.clinical_record_for(study_uid)
        if record_row is None:
            raise StudyInputsError("study has no clinical record")
        seg, series_uid, folder = choose_inputs(self.spool.study_instances(study_uid))
        return ScoringTask(
            study_instance_uid=study_uid,
            ct_series_dir=folder,
            ct_series_instance_uid=series_uid,
            seg_path=seg.path,
            clinical_json=record_row.record_json,
            model_path=self.model_path,
            segment_label=self.segment_label,
            rtstruct_roi_pattern=self.rtstruct_roi_pattern,
            extra_object_kinds=self.extra_object_kinds,
            allow_lossy_ct=self.allow_lossy_ct,
            report_out_of_domain=self.report_out_of_domain,
        )

    def collect(self, *, now: float) -> int:
        """Record every outcome that has arrived; returns how many."""
        recorded = 0
        while True:
            try:
                study_uid, outcome = self._finished.get_nowait()
            except queue.Empty:
                return recorded
            self._in_flight.pop(study_uid, None)
            recorded += 1
            try:
                self._record(study_uid, outcome, now=now)
            except InvalidTransition as exc:
                # The lease ran out and someone else owns the study now; their result counts.
                self._log.warning("outcome_discarded", study_uid=study_uid, reason=str(exc))

    def _record(self, study_uid: str, outcome: ScoringOutcome | BaseException, *, now: float) -> None:
        if isinstance(outcome, BrokenProcessPool):
            # A worker process died (killed, out of memory) while we live: the study goes back to
            # ready and is tried again; the claim counts, and the third lost worker fails it.
            self._pool = None
            reason = f"worker process died: {outcome}"
            transition = self.machine.record_worker_lost(study_uid, worker_id=self.worker_id, reason=reason, now=now)
            self._log.warning("worker_lost", study_uid=study_uid, to_state=str(transition.to_state))
            return
        if isinstance(outcome, BaseException):
            # The worker could not run the task (e.g. it could not be pickled): a bug, fail the study.
            reason = f"worker process failed: {type(outcome).__name__}: {outcome}"
            self.machine.record_scoring_failed(study_uid, worker_id=self.worker_id, reason=reason, now=now)
            return
        if outcome.error:
            self.machine.record_scoring_failed(study_uid, worker_id=self.worker_id, reason=outcome.error, now=now)
            self._log.warning("scoring_failed", study_uid=study_uid, reason=outcome.error)
            return
        if outcome.result_json is None or outcome.sr_bytes is None or outcome.sr_sop_instance_uid is None:
            # `run_scoring_task` returns an error or a whole result; anything else is a bug in it.
            reason = "worker process returned neither a result nor an error"
            self.machine.record_scoring_failed(study_uid, worker_id=self.worker_id, reason=reason, now=now)
            return
        result = json.loads(outcome.result_json)
        applicability = result["applicability"]["status"]
        self.machine.record_scored(
            study_uid,
            worker_id=self.worker_id,
            sr_sop_instance_uid=outcome.sr_sop_instance_uid,
            sr_bytes=outcome.sr_bytes,
            destinations=self.destinations,
            now=now,
            applicability=applicability,
            withheld=result["withheld"],
            extra_objects=outcome.extra_objects,
            destination_objects=self.destination_objects,
            stage_seconds=outcome.stage_seconds,
        )
        if self.on_scored is not None:
            self.on_scored()
        if self.metrics is not None:
            self.metrics.scoring_finished(outcome.seconds, stages=outcome.stage_seconds)
            self.metrics.study_scored(applicability, withheld=result["withheld"])
        self._log.info(
            "study_scored",
            study_uid=study_uid,
            sr_uid=outcome.sr_sop_instance_uid,
            risk_group=result["risk_group"],
            applicability=applicability,
            model=result["model"]["name"],
            model_version=result["model"]["version"],
            seconds=round(outcome.seconds, 2),
            stage_seconds={stage: round(v, 3) for stage, v in (outcome.stage_seconds or {}).items()},
        )

    def shutdown(self, *, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
