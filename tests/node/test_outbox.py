"""The outbox against real peers on 127.0.0.1: DCMTK storescp, Orthanc and small pynetdicom SCPs.  No mocks.

Studies reach ``scored`` through the real `StudyMachine` (builders from
`test_spool`), with a real Comprehensive 3D SR built by highdicom on a tiny
synthetic CT.  The clock is injected (``now``, and a frozen ``monotonic``), so
backoff times are exact.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from structlog.testing import capture_logs

from sclc_risk_node.dicom_io.synthetic import SyntheticPatient, ct_datasets_from_image
from sclc_risk_node.node.config import DestinationConfig, NodeConfig, OutboxConfig, load_config
from sclc_risk_node.node.errors import InvalidTransition
from sclc_risk_node.node.metrics import NodeMetrics
from sclc_risk_node.node.outbox import (
    DeliveryOutcome,
    DeliveryResult,
    Outbox,
    SendTimeouts,
    backoff_s,
    describe_status,
    resend_study,
    send_sr,
)
from sclc_risk_node.node.states import OutboxState, StudyEvent, StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from tests.node.peers import LOOPBACK, free_port, peers  # noqa: F401 - `peers` is a fixture
from tests.node.test_spool import REPO_ROOT, T0, UID_ROOT, StudyBuilder, open_spool

NODE_AE = "SCLC_NODE"
PATIENT = SyntheticPatient()  # its ID and name must never reach a log line
#: Short enough that failure tests stay fast, long enough for a loaded CI machine.
TIMEOUTS = SendTimeouts(connect_s=2.0, acse_s=5.0, dimse_s=5.0, network_s=5.0)
NOW = T0 + 100  # every scored study below is queued at T0 + 20


# --- builders ----------------------------------------------------------------------------


def build_sr(study_uid: str, sr_uid: str) -> bytes:
    """A real TID 1500 Comprehensive 3D SR (one NUM measurement) on a 2-slice synthetic CT of the study."""
    image = sitk.GetImageFromArray(np.zeros((2, 8, 8), np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    patient = dataclasses.replace(PATIENT, study_instance_uid=study_uid)
    ct = ct_datasets_from_image(
        image, patient, series_instance_uid=f"{study_uid}.7", frame_of_reference_uid=f"{study_uid}.8"
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=f"{UID_ROOT}.77"),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=f"{sr_uid}.9", identifier="risk"),
        measurements=[
            hd.sr.Measurement(
                name=hd.sr.CodedConcept("RISK", "99SCLC", "Risk score"),
                value=1.25,
                unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ct[0])],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=ct,
        content=report[0],
        series_instance_uid=f"{sr_uid}.1",
        series_number=9001,
        sop_instance_uid=sr_uid,
        instance_number=1,
        manufacturer="sclc-risk-node tests",
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class ScoredStudy:
    study_uid: str
    sr_uid: str
    sr_bytes: bytes


def scored_study(spool, number: int, destinations=("PACS1",)) -> ScoredStudy:
    """A study driven to ``scored`` through the real machine, its real SR queued for ``destinations``."""
    study = StudyBuilder(number)
    machine = StudyMachine(spool)
    study.store_all(spool, now=T0)
    study.clinical(spool, now=T0 + 1)
    machine.apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=T0 + 10)  # clinical already there: ready
    machine.claim(study.study_uid, worker_id="w1", now=T0 + 11, lease_s=600)
    sr_uid = f"{study.study_uid}.3.1"
    sr_bytes = build_sr(study.study_uid, sr_uid)
    machine.record_scored(
        study.study_uid,
        worker_id="w1",
        sr_sop_instance_uid=sr_uid,
        sr_bytes=sr_bytes,
        destinations=destinations,
        now=T0 + 20,
    )
    assert spool.get_study(study.study_uid).state is StudyState.SCORED
    return ScoredStudy(study.study_uid, sr_uid, sr_bytes)


def destination(port: int, *, name: str = "PACS1", ae_title: str = "PACS1AE") -> DestinationConfig:
    return DestinationConfig(name=name, ae_title=ae_title, host=LOOPBACK, port=port)


def node_config(tmp_path: Path, destinations, *, max_attempts: int = 0) -> NodeConfig:
    base = load_config(environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    return dataclasses.replace(
        base,
        destinations=tuple(destinations),
        outbox=OutboxConfig(initial_backoff_s=30.0, max_backoff_s=3600.0, max_attempts=max_attempts),
    )


def metrics_for(spool, config: NodeConfig) -> NodeMetrics:
    return NodeMetrics(
        studies_by_state=lambda: {str(k): v for k, v in spool.counts_by_state().items()},
        outbox_depth=spool.outbox_depth,
        destinations=[d.name for d in config.destinations],
        process_metrics=False,
    )


def counter(metrics: NodeMetrics, name: str, destination_name: str) -> float:
    return metrics.registry.get_sample_value(name, {"destination": destination_name}) or 0.0


def make_outbox(spool, config: NodeConfig, metrics=None, **options) -> Outbox:
    options.setdefault("timeouts", TIMEOUTS)
    options.setdefault("jitter_fraction", 0.0)
    options.setdefault("monotonic", lambda: 0.0)  # the run's clock is exactly `now`
    return Outbox(spool, config, metrics, **options)


def same_dataset(received: pydicom.Dataset, sr_bytes: bytes) -> bool:
    """Element-by-element equality of the data sets (file meta excluded: the receiver writes its own)."""
    return received == pydicom.dcmread(io.BytesIO(sr_bytes))


@pytest.fixture
def spool(tmp_path):
    with open_spool(tmp_path / "spool") as opened:
        yield opened


class PynetdicomScp:
    """A small pynetdicom storage SCP on an ephemeral loopback port; the C-STORE handler decides the status."""

    def __init__(
        self,
        handler,
        *,
        ae_title="PACS1AE",
        sop_classes=(Comprehensive3DSRStorage,),
        require_calling=(),
        ssl_context=None,
    ):
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        if require_calling:
            self.ae.require_calling_aet = list(require_calling)
        for sop_class in sop_classes:
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = self.ae.start_server(
            (LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)], ssl_context=ssl_context
        )
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pynetdicom_scp():
    started: list[PynetdicomScp] = []

    def start(handler, **options) -> PynetdicomScp:
        scp = PynetdicomScp(handler, **options)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# --- pure: backoff, statuses, results ----------------------------------------------------


def test_backoff_doubles_from_the_initial_wait_and_stops_at_the_cap():
    waits = [backoff_s(n, initial_s=30, max_s=3600) for n in range(1, 10)]
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_s(100_000, initial_s=30, max_s=3600) == 3600  # retrying forever never overflows
    assert backoff_s(1, initial_s=30, max_s=3600, jitter=0.5) == 45
    assert backoff_s(8, initial_s=30, max_s=3600, jitter=0.99) == 3600  # jitter never passes the cap
    with pytest.raises(ValueError):
        backoff_s(0, initial_s=30, max_s=3600)


def test_statuses_are_described_with_the_standards_names():
    assert describe_status(0xA700) == "0xA700 (refused: out of resources)"
    assert describe_status(0xA7FE) == "0xA7FE (refused: out of resources)"
    assert describe_status(0xC123) == "0xC123 (error: cannot understand)"
    assert describe_status(0xB000) == "0xB000 (coercion of data elements)"
    assert describe_status(0x0122) == "0x0122 (refused: SOP class not supported)"
    assert describe_status(0xFF00) == "0xFF00 (pending)"
    assert describe_status(0x1234) == "0x1234 (unknown status)"


def test_a_result_is_delivered_exactly_when_it_has_no_error():
    assert DeliveryResult("P", DeliveryOutcome.STORED_WITH_WARNING, 0xB000, warning="w").delivered
    with pytest.raises(ValueError):
        DeliveryResult("P", DeliveryOutcome.REJECTED)
    with pytest.raises(ValueError):
        DeliveryResult("P", DeliveryOutcome.STORED, 0, error="x")


def test_the_hold_must_outlast_the_longest_attempt(spool, tmp_path):
    config = node_config(tmp_path, [destination(104)])
    with pytest.raises(ValueError, match="longest attempt"):
        Outbox(spool, config, timeouts=TIMEOUTS, hold_s=TIMEOUTS.longest_attempt_s)
    assert Outbox(spool, config, timeouts=TIMEOUTS).hold_s > TIMEOUTS.longest_attempt_s


# --- local failures: still attempts, still visible ------------------------------------------


def test_a_destination_missing_from_the_config_and_a_missing_sr_file_are_failed_attempts_with_jittered_backoff(
    spool, tmp_path
):
    gone = scored_study(spool, 1, destinations=("GONE",))
    lost = scored_study(spool, 2, destinations=("PACS1",))
    [lost_item] = spool.study_deliveries(lost.study_uid)
    lost_item.sr_path.unlink()
    config = node_config(tmp_path, [destination(free_port())])
    metrics = metrics_for(spool, config)
    outbox = make_outbox(spool, config, metrics, jitter_fraction=0.1, rng=random.Random(7))
    expected = random.Random(7)
    waits = [30 * (1 + 0.1 * expected.random()) for _ in range(2)]

    assert outbox.run_once(now=NOW) == 2
    [gone_item] = spool.study_deliveries(gone.study_uid)
    assert gone_item.state is OutboxState.PENDING and gone_item.attempts == 1
    assert gone_item.last_error.startswith("destination 'GONE' is not in the configuration")
    [lost_item] = spool.study_deliveries(lost.study_uid)
    assert lost_item.last_error == f"cannot read the SR file {lost.sr_uid}.dcm for PACS1: No such file or directory"
    assert sorted([gone_item.next_attempt_at, lost_item.next_attempt_at]) == pytest.approx(
        sorted(NOW + w for w in waits)
    )
    assert counter(metrics, "sclc_sr_delivery_failures_total", "PACS1") == 1
    assert spool.outbox_depth() == 2


# --- (1) storescp receives the SR ----------------------------------------------------------------


@pytest.mark.external
def test_storescp_receives_the_sr_and_the_study_becomes_delivered(spool, tmp_path, peers):
    scp = peers.storescp(tmp_path / "received", ae_title="PACS1AE")
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(scp.port)])
    metrics = metrics_for(spool, config)

    with capture_logs() as logs:
        assert make_outbox(spool, config, metrics).run_once(now=NOW) == 1

    [received] = scp.received_files()
    dataset = pydicom.dcmread(received)
    assert dataset.SOPInstanceUID == study.sr_uid and dataset.SOPClassUID == Comprehensive3DSRStorage
    assert same_dataset(dataset, study.sr_bytes)
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.attempts, item.delivered_at, item.last_error) == (OutboxState.DELIVERED, 0, NOW, None)
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.DELIVERED
    assert [e.event for e in spool.study_events(study.study_uid)][-1] is StudyEvent.DELIVERED
    assert spool.outbox_depth() == 0 and counter(metrics, "sclc_srs_delivered_total", "PACS1") == 1
    assert [entry["event"] for entry in logs if entry.get("stage") == "outbox"] == ["sr_delivered", "study_delivered"]
    for phi in (PATIENT.patient_id, PATIENT.patient_name, PATIENT.patient_birth_date, "PAT-1"):
        assert phi not in repr(logs)


# --- (2) PACS down, then up -------------------------------------------------------------------------


@pytest.mark.external
def test_pacs_down_backs_off_then_delivers_exactly_once_when_it_comes_up(spool, tmp_path, peers):
    port = free_port()
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(port)])
    metrics = metrics_for(spool, config)
    outbox = make_outbox(spool, config, metrics)

    assert outbox.run_once(now=NOW) == 1
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.attempts, item.next_attempt_at) == (OutboxState.PENDING, 1, NOW + 30)
    assert item.last_error == f"connection refused by PACS1 ({LOOPBACK}:{port})"
    assert spool.get_study(study.study_uid).state is StudyState.SCORED  # max_attempts 0: never gives up
    assert outbox.run_once(now=NOW + 29) == 0

    assert outbox.run_once(now=NOW + 30) == 1
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.attempts, item.next_attempt_at) == (2, NOW + 30 + 60)  # doubled
    assert counter(metrics, "sclc_sr_delivery_failures_total", "PACS1") == 2

    scp = peers.storescp(tmp_path / "received", port=port, ae_title="PACS1AE")
    assert outbox.run_once(now=NOW + 89) == 0  # still backing off, although the PACS is up
    assert scp.received_files() == []
    assert outbox.run_once(now=NOW + 90) == 1
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.delivered_at) == (OutboxState.DELIVERED, NOW + 90)
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED
    assert outbox.run_once(now=NOW + 100_000) == 0  # a confirmed delivery is never re-sent
    [received] = scp.received_files()
    assert pydicom.dcmread(received).SOPInstanceUID == study.sr_uid
    assert counter(metrics, "sclc_srs_delivered_total", "PACS1") == 1


@pytest.mark.external
def test_an_unreachable_destination_costs_one_attempt_per_run_and_does_not_hold_up_the_others(spool, tmp_path, peers):
    scp = peers.storescp(tmp_path / "received", ae_title="UPAE")
    down_port = free_port()
    down = [scored_study(spool, n, destinations=("DOWN",)) for n in (1, 2)]
    up = scored_study(spool, 3, destinations=("UP",))
    config = node_config(
        tmp_path, [destination(down_port, name="DOWN"), destination(scp.port, name="UP", ae_title="UPAE")]
    )
    assert make_outbox(spool, config).run_once(now=NOW) == 2
    attempts = sorted(spool.study_deliveries(s.study_uid)[0].attempts for s in down)
    assert attempts == [0, 1]  # the second waits for the next run instead of another refused connect
    assert spool.get_study(up.study_uid).state is StudyState.DELIVERED and len(scp.received_files()) == 1


# --- give up, stay visible, resend ----------------------------------------------------------------------


@pytest.mark.external
def test_after_max_attempts_the_study_fails_visibly_and_resend_delivers_it(spool, tmp_path, peers):
    port = free_port()
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(port)], max_attempts=2)
    outbox = make_outbox(spool, config)

    with pytest.raises(InvalidTransition, match="still in the outbox"):
        resend_study(spool, study.study_uid, now=NOW)  # nothing gave up yet
    assert outbox.run_once(now=NOW) == 1
    assert outbox.run_once(now=NOW + 30) == 1
    [item] = spool.study_deliveries(study.study_uid)
    refused = f"connection refused by PACS1 ({LOOPBACK}:{port})"
    assert (item.state, item.attempts, item.last_error) == (OutboxState.FAILED, 2, refused)
    record = spool.get_study(study.study_uid)
    assert record.state is StudyState.FAILED
    assert record.failure_reason == f"SR delivery to PACS1 gave up after 2 attempts: {refused}"
    assert spool.outbox_depth() == 1  # given up, not gone
    assert outbox.run_once(now=NOW + 100_000) == 0

    scp = peers.storescp(tmp_path / "received", port=port, ae_title="PACS1AE")
    transition = outbox.resend_study(study.study_uid, now=NOW + 200)
    assert (transition.from_state, transition.to_state) == (StudyState.FAILED, StudyState.SCORED)
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.attempts) == (OutboxState.PENDING, 0)
    assert outbox.run_once(now=NOW + 200) == 1
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED
    assert len(scp.received_files()) == 1


# --- (3) Orthanc as the PACS --------------------------------------------------------------------------------


@pytest.mark.external
def test_orthanc_stores_the_sr_keeps_it_across_a_restart_and_a_resend_does_not_duplicate_it(spool, tmp_path, peers):
    orthanc = peers.orthanc(
        tmp_path / "orthanc", ae_title="ORTHANC", modalities={"NODE": (NODE_AE, LOOPBACK, free_port())}
    )
    study = scored_study(spool, 1, destinations=("ORTHANC1",))
    config = node_config(tmp_path, [destination(orthanc.dicom_port, name="ORTHANC1", ae_title="ORTHANC")])
    outbox = make_outbox(spool, config)

    assert outbox.run_once(now=NOW) == 1
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED
    [instance_id] = orthanc.instances_with_sop_uid(study.sr_uid)
    assert orthanc.simplified_tags(instance_id)["SOPInstanceUID"] == study.sr_uid
    assert same_dataset(pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance_id))), study.sr_bytes)

    # The PACS goes away; the operator asks for the SR again (e.g. the PACS lost it).
    orthanc.stop()
    outbox.resend_study(study.study_uid, now=NOW + 10)
    assert outbox.run_once(now=NOW + 10) == 1
    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.attempts) == (OutboxState.PENDING, 1)
    assert item.last_error == f"connection refused by ORTHANC1 ({LOOPBACK}:{orthanc.dicom_port})"

    orthanc.start()  # same ports, same storage and index
    assert orthanc.instances_with_sop_uid(study.sr_uid) == [instance_id]
    assert outbox.run_once(now=NOW + 40) == 1
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED
    assert orthanc.instances_with_sop_uid(study.sr_uid) == [instance_id]  # sent twice, stored once
    assert orthanc.sop_instance_uids() == [study.sr_uid]


# --- (4) rejection, (5) failure statuses, timeouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "called_ae, require_calling, reason",
    [
        ("WRONG_AE", (), "called AE title not recognised (permanent)"),
        ("PACS1AE", ("SOMEONE_ELSE",), "calling AE title not recognised (permanent)"),
    ],
    ids=["called-ae", "calling-ae"],
)
def test_a_rejected_association_is_a_failed_attempt_naming_the_reason(
    spool, tmp_path, pynetdicom_scp, called_ae, require_calling, reason
):
    stored = []
    scp = pynetdicom_scp(lambda event: stored.append(event) or 0x0000, require_calling=require_calling)
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(scp.port, ae_title=called_ae)])

    assert make_outbox(spool, config).run_once(now=NOW) == 1
    [item] = spool.study_deliveries(study.study_uid)
    assert item.last_error == f"association rejected by PACS1 ({LOOPBACK}:{scp.port}): {reason}"
    assert (item.state, item.attempts, item.next_attempt_at) == (OutboxState.PENDING, 1, NOW + 30)
    assert stored == [] and spool.get_study(study.study_uid).state is StudyState.SCORED


@pytest.mark.parametrize(
    "status, delivered, text",
    [
        (0xA700, False, "returned C-STORE status 0xA700 (refused: out of resources)"),
        (0xA900, False, "returned C-STORE status 0xA900 (error: data set does not match SOP class)"),
        (0xC000, False, "returned C-STORE status 0xC000 (error: cannot understand)"),
        (0x0122, False, "returned C-STORE status 0x0122 (refused: SOP class not supported)"),
        (0xFE00, False, "returned C-STORE status 0xFE00 (cancelled)"),
        (0xB000, True, None),
        (0xB006, True, None),
        (0xB007, True, None),
    ],
    ids=lambda v: f"0x{v:04X}" if isinstance(v, int) and not isinstance(v, bool) else None,
)
def test_only_success_and_warning_statuses_deliver(spool, tmp_path, pynetdicom_scp, status, delivered, text):
    received = []

    def handle_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return status

    scp = pynetdicom_scp(handle_store)
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(scp.port)])
    with capture_logs() as logs:
        assert make_outbox(spool, config).run_once(now=NOW) == 1

    assert received == [study.sr_uid]
    [item] = spool.study_deliveries(study.study_uid)
    state = spool.get_study(study.study_uid).state
    if delivered:
        assert (item.state, state, item.last_error) == (OutboxState.DELIVERED, StudyState.DELIVERED, None)
        [warning] = [e for e in logs if e["event"] == "sr_delivered_with_warning"]
        assert warning["status"] == f"0x{status:04X}" and warning["log_level"] == "warning"
    else:
        assert (item.state, item.attempts, state) == (OutboxState.PENDING, 1, StudyState.SCORED)
        assert item.last_error == f"PACS1 ({LOOPBACK}:{scp.port}) {text}"


def test_no_response_within_the_dimse_timeout_is_a_failed_attempt(spool, tmp_path, pynetdicom_scp):
    release = threading.Event()
    scp = pynetdicom_scp(lambda event: release.wait(10) and 0x0000)
    study = scored_study(spool, 1)
    config = node_config(tmp_path, [destination(scp.port)])
    try:
        outbox = make_outbox(spool, config, timeouts=dataclasses.replace(TIMEOUTS, dimse_s=1.0))
        assert outbox.run_once(now=NOW) == 1
    finally:
        release.set()
    [item] = spool.study_deliveries(study.study_uid)
    assert item.last_error == f"no C-STORE response from PACS1 ({LOOPBACK}:{scp.port}) within 1 s"
    assert item.state is OutboxState.PENDING


def test_a_listener_that_never_answers_the_association_request_times_out(spool):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(1)  # the kernel completes the TCP handshake; nobody ever reads
        port = silent.getsockname()[1]
        study = scored_study(spool, 1)
        timeouts = dataclasses.replace(TIMEOUTS, acse_s=1.0)
        result = send_sr(destination(port), study.sr_bytes, calling_ae=NODE_AE, timeouts=timeouts)
    assert result.outcome is DeliveryOutcome.TIMEOUT
    assert result.error == f"no association response from PACS1 ({LOOPBACK}:{port}) within 1 s"


def test_bytes_that_are_not_dicom_are_a_local_error_and_nothing_is_sent():
    result = send_sr(destination(free_port()), b"not a DICOM file", calling_ae=NODE_AE, timeouts=TIMEOUTS)
    assert result.outcome is DeliveryOutcome.LOCAL_ERROR
    assert result.error == "the SR for PACS1 is not a usable DICOM file: pydicom cannot parse it (InvalidDicomError)"


def test_a_pacs_that_does_not_take_comprehensive_3d_sr_is_a_failed_attempt(spool, tmp_path, pynetdicom_scp):
    scp = pynetdicom_scp(lambda event: 0x0000, sop_classes=(CTImageStorage,))
    study = scored_study(spool, 1)
    result = send_sr(destination(scp.port), study.sr_bytes, calling_ae=NODE_AE, timeouts=TIMEOUTS)
    assert result.outcome is DeliveryOutcome.NO_CONTEXT and not result.delivered
    assert result.error.startswith(f"PACS1 ({LOOPBACK}:{scp.port}) does not accept Comprehensive 3D SR Storage")


# --- (6) a sender killed mid-send ---------------------------------------------------------------------------------

_SENDER = textwrap.dedent(
    """
    import dataclasses, sys
    from sclc_risk_node.node.config import DestinationConfig, OutboxConfig, load_config
    from sclc_risk_node.node.outbox import Outbox, SendTimeouts
    from sclc_risk_node.node.spool import Spool

    spool_dir, state_dir, port, now, hold_s = sys.argv[1:]
    config = dataclasses.replace(
        load_config(environ={"STATE_DIRECTORY": state_dir}),
        destinations=(DestinationConfig(name="PACS1", ae_title="PACS1AE", host="127.0.0.1", port=int(port)),),
        outbox=OutboxConfig(initial_backoff_s=30.0, max_backoff_s=3600.0, max_attempts=0),
    )
    spool = Spool.open(spool_dir, min_free_bytes=0)
    Outbox(spool, config, timeouts=SendTimeouts(connect_s=2, acse_s=5, dimse_s=60, network_s=60),
           hold_s=float(hold_s), monotonic=lambda: 0.0).run_once(now=float(now))
    """
)


@pytest.mark.external
def test_a_delivery_claimed_by_a_killed_sender_is_sent_after_its_hold_and_only_then(
    spool, tmp_path, peers, pynetdicom_scp
):
    arrived, release = threading.Event(), threading.Event()

    def never_answer(event):
        arrived.set()
        release.wait(30)
        return 0xA700

    hanging = pynetdicom_scp(never_answer)
    study = scored_study(spool, 1)
    hold_s = 300.0
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SENDER,
            str(spool.directory),
            str(tmp_path / "state"),
            str(hanging.port),
            str(NOW),
            str(hold_s),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert arrived.wait(30), sender.stderr.read().decode() if sender.poll() is not None else "sender never sent"
        os.kill(sender.pid, signal.SIGKILL)  # crash between the PACS receiving and answering
        sender.wait(10)
    finally:
        if sender.poll() is None:
            os.kill(sender.pid, signal.SIGKILL)
            sender.wait(10)
        release.set()
        sender.stderr.close()

    [item] = spool.study_deliveries(study.study_uid)
    assert (item.state, item.sending_until, item.attempts) == (OutboxState.SENDING, NOW + hold_s, 0)

    # The node restarts (a fresh spool connection and outbox); the PACS now works.
    scp = peers.storescp(tmp_path / "received", ae_title="PACS1AE")
    config = node_config(tmp_path, [destination(scp.port)])
    with open_spool(spool.directory) as restarted:
        outbox = make_outbox(restarted, config)
        assert outbox.run_once(now=NOW + hold_s - 1) == 0  # the dead sender's claim still holds
        assert scp.received_files() == []
        assert outbox.run_once(now=NOW + hold_s) == 1
        [item] = restarted.study_deliveries(study.study_uid)
        assert item.state is OutboxState.DELIVERED
        assert restarted.get_study(study.study_uid).state is StudyState.DELIVERED
        assert outbox.run_once(now=NOW + 10 * hold_s) == 0
    [received] = scp.received_files()
    assert pydicom.dcmread(received).SOPInstanceUID == study.sr_uid


@pytest.mark.skipif(not Path("/usr/bin/openssl").is_file(), reason="openssl not installed")
def test_tls_destination_receives_the_sr_and_an_untrusted_one_is_a_failed_attempt(spool, tmp_path, pynetdicom_scp):
    import ssl

    from sclc_risk_node.node.config import DestinationTlsConfig
    from tests.node.test_scp import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(cert), str(key))
    received = []

    def store(event):
        received.append(event.dataset)
        return 0x0000

    scp = pynetdicom_scp(store, ssl_context=server_context)
    trusted = dataclasses.replace(
        destination(scp.port), host="localhost", tls=DestinationTlsConfig(enabled=True, ca_file=cert)
    )
    study = scored_study(spool, 91)
    result = send_sr(trusted, study.sr_bytes, calling_ae="SCLC_NODE", timeouts=TIMEOUTS)
    assert result.delivered, result.error
    assert [str(ds.SOPInstanceUID) for ds in received] == [study.sr_uid]

    # The system trust store does not know our self-signed certificate: no SR may leave unencrypted or unverified.
    untrusted = dataclasses.replace(trusted, tls=DestinationTlsConfig(enabled=True))
    result = send_sr(untrusted, study.sr_bytes, calling_ae="SCLC_NODE", timeouts=TIMEOUTS)
    assert not result.delivered
    assert "PACS1" in result.error
    assert len(received) == 1


# --- (7) every object of a study: SR, KOS, PDF, SC ---------------------------------------------------------------

from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment  # noqa: E402
from sclc_risk_node.dicom_io.result_objects import OBJECT_KINDS, build_result_objects, object_kind  # noqa: E402
from sclc_risk_node.dicom_io.synthetic import build_tumour_seg, synthetic_chest_phantom  # noqa: E402
from sclc_risk_node.node.config import RESULT_OBJECT_KINDS, ConfigError  # noqa: E402
from tests.dicom_io.test_sr_writer import make_clinical, make_result  # noqa: E402


def result_objects_for(study_uid: str) -> dict[str, bytes]:
    """The real objects (risk SR, ROI SR, KOS, Encapsulated PDF, SC) of a small synthetic study with this UID."""
    image, mask = synthetic_chest_phantom(size=(32, 32, 8), tumour_radii_mm=(7.0, 6.0, 6.0))
    patient = dataclasses.replace(PATIENT, study_instance_uid=study_uid)
    datasets = ct_datasets_from_image(image, patient)
    seg = build_tumour_seg(datasets, mask)
    headers = []
    for ds in datasets:
        header = pydicom.Dataset(ds)
        del header.PixelData
        headers.append(header)
    ct = CtSeries(
        image=image,
        headers=tuple(headers),
        study_instance_uid=study_uid,
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
        source_paths=(),
    )
    segment = TumourSegment(mask=mask, segmentation=seg, segment_number=1, segment_label="Tumour")
    objects = build_result_objects(ct, segment, make_clinical(), make_result())
    encoded = {}
    for kind, ds in objects.items():
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded[kind] = buffer.getvalue()
    return encoded


@dataclasses.dataclass(frozen=True)
class ScoredWithObjects:
    study_uid: str
    uids: dict[str, str]  # name (sr, sr-roi, kos, pdf, sc) -> SOP Instance UID
    encoded: dict[str, bytes]


def scored_study_with_objects(spool, number: int, destinations, destination_objects=None) -> ScoredWithObjects:
    study = StudyBuilder(number)
    machine = StudyMachine(spool)
    study.store_all(spool, now=T0)
    study.clinical(spool, now=T0 + 1)
    machine.apply(study.study_uid, StudyEvent.IMAGES_COMPLETE, now=T0 + 10)
    machine.claim(study.study_uid, worker_id="w1", now=T0 + 11, lease_s=600)
    encoded = result_objects_for(study.study_uid)
    uids = {kind: str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for kind, data in encoded.items()}
    machine.record_scored(
        study.study_uid,
        worker_id="w1",
        sr_sop_instance_uid=uids["sr"],
        sr_bytes=encoded["sr"],
        destinations=destinations,
        now=T0 + 20,
        extra_objects=[(object_kind(name), uids[name], encoded[name]) for name in ("sr-roi", "kos", "pdf", "sc")],
        destination_objects=destination_objects,
    )
    return ScoredWithObjects(study.study_uid, uids, encoded)


def test_config_objects_default_to_all_four_and_unknown_ones_are_refused(tmp_path):
    assert RESULT_OBJECT_KINDS == OBJECT_KINDS
    assert destination(104).objects == ("sr", "kos", "pdf", "sc")
    path = tmp_path / "node.toml"
    path.write_text(
        '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "127.0.0.1"\nport = 104\nobjects = ["sr", "html"]\n'
    )
    with pytest.raises(
        ConfigError, match=r"destinations\[0\]\.objects: unknown object\(s\) 'html'; choose from sr, kos"
    ):
        load_config(path, environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    path.write_text('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "127.0.0.1"\nport = 104\nobjects = []\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.objects: is empty"):
        load_config(path, environ={"STATE_DIRECTORY": str(tmp_path / "state")})


def test_each_destination_gets_the_objects_it_is_configured_for(spool):
    study = scored_study_with_objects(
        spool, 1, ("PACS1", "VIEWER"), destination_objects={"PACS1": ("sr", "kos"), "VIEWER": ("pdf", "sc", "sr")}
    )
    queued = {(item.destination, item.sr_sop_instance_uid) for item in spool.study_deliveries(study.study_uid)}
    uids = study.uids
    assert queued == {
        ("PACS1", uids["sr"]),
        ("PACS1", uids["sr-roi"]),
        ("PACS1", uids["kos"]),
        ("VIEWER", uids["pdf"]),
        ("VIEWER", uids["sc"]),
        ("VIEWER", uids["sr"]),
        ("VIEWER", uids["sr-roi"]),
    }
    # Every object is in the spool, whoever takes it.
    for kind, uid in uids.items():
        path = spool.directory / spool.sr_relative_path(study.study_uid, uid)
        assert path.read_bytes() == study.encoded[kind]


def test_orthanc_gets_each_object_once_previews_the_sc_and_serves_the_pdf(spool, tmp_path, peers):
    orthanc = peers.orthanc(tmp_path / "orthanc", ae_title="ORTHANC")
    study = scored_study_with_objects(spool, 1, ("ORTHANC1",))
    config = node_config(tmp_path, [destination(orthanc.dicom_port, name="ORTHANC1", ae_title="ORTHANC")])
    assert make_outbox(spool, config).run_once(now=NOW) == 5
    assert spool.get_study(study.study_uid).state is StudyState.DELIVERED
    assert sorted(orthanc.sop_instance_uids()) == sorted(study.uids.values())

    [sc_id] = orthanc.instances_with_sop_uid(study.uids["sc"])
    preview = orthanc.get_bytes(f"/instances/{sc_id}/preview")
    assert preview.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(preview), format="png")
    assert pixels.shape[:2] == (1169, 827)
    assert np.allclose(pixels[20, 10, :3], [0xD6 / 255, 0x27 / 255, 0x28 / 255], atol=0.02)  # the DEMO banner

    [pdf_id] = orthanc.instances_with_sop_uid(study.uids["pdf"])
    pdf = orthanc.get_bytes(f"/instances/{pdf_id}/pdf")
    stored = pydicom.dcmread(io.BytesIO(study.encoded["pdf"]))
    assert pdf.startswith(b"%PDF-")
    assert pdf.rstrip(b"\x00") == bytes(stored.EncapsulatedDocument)[: stored.EncapsulatedDocumentLength]


_SLOW_SENDER = textwrap.dedent(
    """
    import dataclasses, sys, time
    import sclc_risk_node.node.outbox as outbox_module
    from sclc_risk_node.node.config import DestinationConfig, OutboxConfig, load_config
    from sclc_risk_node.node.outbox import Outbox, SendTimeouts
    from sclc_risk_node.node.spool import Spool

    real_send = outbox_module.send_sr

    def send_then_linger(*args, **kwargs):
        result = real_send(*args, **kwargs)
        time.sleep(2.0)  # the PACS has the object; the node has not recorded it yet
        return result

    outbox_module.send_sr = send_then_linger
    spool_dir, state_dir, port, now, hold_s = sys.argv[1:]
    config = dataclasses.replace(
        load_config(environ={"STATE_DIRECTORY": state_dir}),
        destinations=(DestinationConfig(name="ORTHANC1", ae_title="ORTHANC", host="127.0.0.1", port=int(port)),),
        outbox=OutboxConfig(initial_backoff_s=30.0, max_backoff_s=3600.0, max_attempts=0),
    )
    spool = Spool.open(spool_dir, min_free_bytes=0)
    Outbox(spool, config, timeouts=SendTimeouts(connect_s=2, acse_s=5, dimse_s=30, network_s=30),
           hold_s=float(hold_s), monotonic=lambda: 0.0).run_once(now=float(now))
    """
)


@pytest.mark.external
def test_a_restart_during_delivery_leaves_exactly_one_copy_of_each_object_in_orthanc(spool, tmp_path, peers):
    orthanc = peers.orthanc(tmp_path / "orthanc", ae_title="ORTHANC")
    study = scored_study_with_objects(spool, 1, ("ORTHANC1",))
    hold_s = 300.0
    sender = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_SENDER,
            str(spool.directory),
            str(tmp_path / "state"),
            str(orthanc.dicom_port),
            str(NOW),
            str(hold_s),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(600):
            if len(orthanc.sop_instance_uids()) >= 2 or sender.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert sender.poll() is None, sender.stderr.read().decode()
        os.kill(sender.pid, signal.SIGKILL)  # killed while the 2nd object is in Orthanc but not yet recorded
        sender.wait(10)
    finally:
        if sender.poll() is None:
            os.kill(sender.pid, signal.SIGKILL)
            sender.wait(10)
        sender.stderr.close()
    states = sorted(str(item.state) for item in spool.study_deliveries(study.study_uid))
    assert states == ["delivered", "pending", "pending", "pending", "sending"]
    assert len(orthanc.sop_instance_uids()) == 2

    config = node_config(tmp_path, [destination(orthanc.dicom_port, name="ORTHANC1", ae_title="ORTHANC")])
    with open_spool(spool.directory) as restarted:
        outbox = make_outbox(restarted, config)
        assert outbox.run_once(now=NOW + 1) == 3  # the three never tried; the claimed one waits for its hold
        assert outbox.run_once(now=NOW + hold_s) == 1  # sent again: Orthanc already has it
        assert {str(item.state) for item in restarted.study_deliveries(study.study_uid)} == {"delivered"}
        assert restarted.get_study(study.study_uid).state is StudyState.DELIVERED
        assert outbox.run_once(now=NOW + 10 * hold_s) == 0
    in_orthanc = orthanc.sop_instance_uids()
    assert sorted(in_orthanc) == sorted(study.uids.values())  # each of the five, once
    [orthanc_study] = orthanc.get("/studies")
    assert len(orthanc.get(f"/studies/{orthanc_study}/instances")) == 5


def test_a_scoring_worker_builds_every_object_from_real_files(tmp_path):
    """run_scoring_task on the bundled demo study (real pyradiomics, the shipped model): SR + the four others."""
    import json

    from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
    from sclc_risk_node.node.scoring_job import default_model_path
    from sclc_risk_node.node.worker import ScoringTask, run_scoring_task

    demo = write_demo_study(tmp_path / "demo")
    ct_series_uid = str(pydicom.dcmread(sorted(demo.ct_dir.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID)
    task = ScoringTask(
        study_instance_uid=DEMO_CLINICAL["study_instance_uid"],
        ct_series_dir=demo.ct_dir,
        ct_series_instance_uid=ct_series_uid,
        seg_path=demo.seg_path,
        clinical_json=json.dumps(DEMO_CLINICAL),
        model_path=default_model_path(),
        segment_label=None,
        extra_object_kinds=("sr", "kos", "pdf", "sc"),
    )
    outcome = run_scoring_task(task)
    assert outcome.error is None, outcome.error
    assert [kind for kind, _, _ in outcome.extra_objects] == ["sr", "kos", "pdf", "sc"]
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, _, data in outcome.extra_objects]
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [uid for _, uid, _ in outcome.extra_objects]
    risk_sr = pydicom.dcmread(io.BytesIO(outcome.sr_bytes))
    roi_sr, kos, pdf, sc = datasets
    assert {str(ds.StudyInstanceUID) for ds in (risk_sr, *datasets)} == {DEMO_CLINICAL["study_instance_uid"]}
    assert roi_sr.SeriesInstanceUID == risk_sr.SeriesInstanceUID and roi_sr.InstanceNumber == 2
    assert (kos.Modality, pdf.Modality, sc.Modality) == ("KO", "DOC", "OT")
    # One key slice for all: the ROI SR's outline, the KOS's key image and the page's source image.
    key_image = str(
        kos.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
    )
    assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == key_image
    assert str(pdf.SourceInstanceSequence[0].ReferencedSOPInstanceUID) == key_image
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(roi_sr).content)
    [planar] = report.get_planar_roi_measurement_groups()
    assert planar.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_image
    # Building again gives the same objects (deterministic UIDs; the PDF bytes have no creation date).
    again = run_scoring_task(task)
    assert [uid for _, uid, _ in again.extra_objects] == [uid for _, uid, _ in outcome.extra_objects]
