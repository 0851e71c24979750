"""`sclc-node serve`: the long-running node.

One process holds the DICOM receiver, the HTTP status endpoint and an
apscheduler scheduler whose periodic jobs move studies along: completion
check, clinical inbox, scoring dispatch, outbox, retention clean-up and disk
guard.  Scoring itself runs in a bounded pool of worker processes.  Every
piece of state is in the spool's SQLite database, so a restart (even after
kill -9) resumes where the last run stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from apscheduler.executors.pool import ThreadPoolExecutor as SchedulerThreadPool
from apscheduler.schedulers.background import BackgroundScheduler

from sclc_risk_node.node import retention
from sclc_risk_node.node.clinical_inbox import ClinicalInbox
from sclc_risk_node.node.config import NodeConfig
from sclc_risk_node.node.fhir_lookup import FhirLookup
from sclc_risk_node.node.http_status import HealthReport, HttpStatusServer, start_http_server
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.metrics import NodeMetrics
from sclc_risk_node.node.outbox import Outbox
from sclc_risk_node.node.scoring_job import default_model_path, load_model_file
from sclc_risk_node.node.scp import DicomReceiver
from sclc_risk_node.node.spool import Spool, free_bytes
from sclc_risk_node.node.states import StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.node.worker import ScoringDispatcher


@dataclass(frozen=True, slots=True)
class JobIntervals:
    """Seconds between runs of each periodic job."""

    completion_s: float = 1.0
    dispatch_s: float = 1.0
    outbox_s: float = 2.0
    retention_s: float = 300.0
    disk_guard_s: float = 30.0
    watchdog_s: float = 10.0
    #: How often waiting studies are considered for a FHIR lookup (each study at most once per
    #: `[fhir] retry_interval_s`).
    fhir_s: float = 5.0


def sd_notify(message: str) -> bool:
    """Send a systemd notification (READY=1, WATCHDOG=1, STOPPING=1); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


def new_instance_id() -> str:
    """This run of the service: host, PID and a random part (PIDs repeat across restarts and reboots).

    Scoring claims carry it (``claimed_by``), so a restart can tell the
    claims of an instance that is gone from those of a worker that died.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class NodeService:
    """Wires the parts together; `start()` returns once the node accepts associations."""

    def __init__(self, config: NodeConfig, *, intervals: JobIntervals = JobIntervals()):
        self.config = config
        self.intervals = intervals
        self.log = get_logger(stage="service")
        self.model_path = config.scoring.model_file or default_model_path()
        # Refuse to start on a tampered or incompatible model rather than fail every study later.
        self.model = load_model_file(self.model_path)
        config.prepare_directories()
        self.spool = Spool.open(
            config.spool.directory, database=config.spool.database, min_free_bytes=config.spool.min_free_bytes
        )
        self.machine = StudyMachine(self.spool)
        self.instance_id = new_instance_id()
        self.metrics = NodeMetrics(
            studies_by_state=lambda: {str(k): v for k, v in self.spool.counts_by_state().items()},
            outbox_depth=self.spool.outbox_depth,
            study_states=[str(s) for s in StudyState],
            destinations=[d.name for d in config.destinations],
        )
        self.receiver = DicomReceiver(config.scp, self.spool, self.metrics)
        self.inbox = ClinicalInbox(config.clinical.inbox_directory, self.spool, fhir=config.fhir)
        self.fhir_lookup = FhirLookup(self.spool, config.fhir) if config.fhir.enabled else None
        self.dispatcher = ScoringDispatcher(
            self.spool,
            self.machine,
            workers=config.scoring.workers,
            lease_s=config.scoring.lease_s,
            model_path=self.model_path,
            destinations=[d.name for d in config.destinations],
            segment_label=config.scoring.segment_label,
            metrics=self.metrics,
            rtstruct_roi_pattern=config.scoring.rtstruct_roi_pattern,
            destination_objects={d.name: d.objects for d in config.destinations},
            worker_id=self.instance_id,
            allow_lossy_ct=config.scoring.allow_lossy_ct,
            report_out_of_domain=config.scoring.report_out_of_domain,
        )
        # A finished scoring run is recorded, and a new SR sent, at once rather than at the next tick.
        self.dispatcher.on_outcome = lambda: self.run_soon("dispatch_scoring")
        self.dispatcher.on_scored = lambda: self.run_soon("deliver")
        self.outbox = Outbox(self.spool, config, self.metrics)
        self.scheduler = BackgroundScheduler(
            executors={"default": SchedulerThreadPool(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        self.http: HttpStatusServer | None = None
        self._stopped = threading.Event()
        self._disk_low = False

    # --- jobs: each takes the clock once and does one thing ---

    def check_completion(self) -> None:
        transitions = self.machine.advance_all(now=time.time(), settings=self.config.completion)
        if any(t.to_state is StudyState.READY for t in transitions):
            self.run_soon("dispatch_scoring")

    def scan_clinical_inbox(self) -> None:
        self.inbox.scan(now=time.time())

    def look_up_fhir(self) -> None:
        # Its own job (and scheduler thread): a slow FHIR server delays nothing else.
        if self.fhir_lookup is not None:
            self.fhir_lookup.run_once(now=time.time())

    def dispatch_scoring(self) -> None:
        self.dispatcher.dispatch(now=time.time())

    def deliver(self) -> None:
        self.outbox.run_once(now=time.time())

    def clean_up(self) -> None:
        now = time.time()
        delivered_states = {StudyState.DELIVERED}
        if not self.config.destinations:
            delivered_states.add(StudyState.SCORED)  # nothing to send: scored is the end of the line
        due = retention.studies_due_for_cleanup(
            self.spool, now=now, retention_s=self.config.spool.retention_after_delivery_s, states=delivered_states
        ) + retention.studies_due_for_cleanup(
            self.spool,
            now=now,
            retention_s=self.config.spool.retention_failed_s,
            states={StudyState.FAILED, StudyState.EXPIRED},
        )
        for study in due:
            removed = retention.remove_study_files(self.spool, study.study_instance_uid, now=now)
            self.log.info("study_files_removed", study_uid=study.study_instance_uid, files=removed)
        retention.expire_unmatched_clinical_records(
            self.spool, now=now, retention_s=self.config.clinical.unmatched_record_retention_s
        )
        removed = self.inbox.remove_old_files(
            now=now,
            accepted_retention_s=self.config.spool.retention_after_delivery_s,
            rejected_retention_s=self.config.spool.retention_failed_s,
        )
        if removed:
            self.log.info("clinical_files_removed", files=removed)

    def guard_disk(self) -> None:
        free = free_bytes(self.config.spool.directory)
        low = free < self.config.spool.min_free_bytes
        if low != self._disk_low:
            (self.log.warning if low else self.log.info)(
                "disk_guard",
                free_bytes=free,
                min_free_bytes=self.config.spool.min_free_bytes,
                refusing_storage=low,
            )
        self._disk_low = low

    def watchdog(self) -> None:
        sd_notify("WATCHDOG=1")

    def run_soon(self, job_id: str) -> None:
        """Run a periodic job now rather than at its next tick: the previous stage has work for it.

        A study otherwise waits up to one interval at each hand-over (ready ->
        dispatch, outcome -> record, scored -> outbox); issue 9 measured ~3 s.
        """
        try:
            self.scheduler.modify_job(job_id, next_run_time=_now_datetime())
        except Exception:  # noqa: BLE001 - not started yet or shutting down: the interval still runs it
            pass

    def health(self) -> HealthReport:
        checks = {
            "scheduler": self.scheduler.running,
            "dicom_receiver": self.receiver.running,
            "disk": not self._disk_low,
        }
        try:
            self.spool.counts_by_state()
            checks["database"] = True
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            checks["database"] = False
        return HealthReport(healthy=all(checks.values()), checks=checks)

    # --- lifecycle ---

    def start(self) -> None:
        self.spool.lock_service(self.instance_id)
        report = self.machine.recover(now=time.time())
        self.log.info("spool_recovered", **_report_fields(report))
        self.resume_previous_instance_work()
        self.guard_disk()
        jobs = (
            (self.check_completion, self.intervals.completion_s),
            (self.scan_clinical_inbox, self.config.clinical.poll_interval_s),
            (self.dispatch_scoring, self.intervals.dispatch_s),
            (self.deliver, self.intervals.outbox_s),
            (self.clean_up, self.intervals.retention_s),
            (self.guard_disk, self.intervals.disk_guard_s),
            (self.watchdog, self.intervals.watchdog_s),
        ) + (((self.look_up_fhir, self.intervals.fhir_s),) if self.fhir_lookup is not None else ())
        for job, seconds in jobs:
            self.scheduler.add_job(job, "interval", seconds=seconds, id=job.__name__, next_run_time=_now_datetime())
        self.scheduler.start()
        self.receiver.start()
        self.http = start_http_server(self.config.http, self.metrics, self.health)
        identity = self.model.identity
        self.log.info(
            "node_started",
            ae_title=self.config.scp.ae_title,
            dicom_address=f"{self.config.scp.bind_address}:{self.receiver.port}",
            http_url=self.http.url if self.http else None,
            model=identity.name,
            model_version=identity.version,
            model_sha256=identity.sha256,
            demonstration_model=identity.demonstration,
            destinations=[d.name for d in self.config.destinations],
        )
        if identity.demonstration:
            self.log.warning("demonstration_model", message="demonstration model — not for clinical use")
        sd_notify("READY=1")

    def resume_previous_instance_work(self) -> None:
        """Claims and delivery holds of the instance before us are dead (we hold the service lock): free them now.

        Without this a restart waited out ``scoring.lease_s`` and the outbox
        hold before anything resumed, and each restart during scoring counted
        as a lost worker, failing the study after three.
        """
        now = time.time()
        released = self.machine.reclaim_previous_instances(current_worker_id=self.instance_id, now=now)
        holds = self.spool.release_delivery_holds(now=now)
        if released or holds:
            self.log.info(
                "previous_instance_work_released",
                studies=[t.study_instance_uid for t in released],
                delivery_holds=holds,
            )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        sd_notify("STOPPING=1")
        self.receiver.stop()  # no new instances while we wind down
        self.scheduler.shutdown(wait=True)
        self.dispatcher.shutdown(wait=False)  # in-flight studies keep their lease and are re-run after restart
        if self.http:
            self.http.stop()
        self.spool.unlock_service()
        self.spool.close()
        self.log.info("node_stopped")

    def run_forever(self) -> None:
        stop_requested = threading.Event()

        def request_stop(signum, _frame):
            self.log.info("stop_requested", signal=signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        try:
            stop_requested.wait()
        finally:
            self.stop()


def _now_datetime():
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def _report_fields(report) -> dict:
    fields = getattr(report, "__dataclass_fields__", None)
    if not fields:
        return {}
    values = {}
    for name in fields:
        value = getattr(report, name)
        values[name] = len(value) if isinstance(value, (list, tuple, set)) else value
    return values


def open_spool_for_cli(config: NodeConfig) -> Spool:
    """The spool for `status`, `retry` and `clinical import`, sharing the running node's database."""
    config.prepare_directories()
    return Spool.open(config.spool.directory, database=config.spool.database, min_free_bytes=0)
