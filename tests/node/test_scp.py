"""node.scp: the storage SCP on loopback, driven by real peers (DCMTK storescu/echoscu, pynetdicom SCU).

Every receiver writes into a real `Spool` under ``tmp_path``.  "Stored as
received" is checked on the data set bytes after the file meta group: the
preamble and file meta never travel over DIMSE (pynetdicom writes its own meta
for the stored file), while the data set bytes are exactly what the peer sent.
DCMTK's storescu sends a file in its own transfer syntax unchanged, so these
bytes must equal the source file's.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from sclc_risk_node.dicom_io.synthetic import build_tumour_seg, synthetic_chest_phantom, write_ct_series, write_datasets
from sclc_risk_node.node import scp
from sclc_risk_node.node.config import CallerRule, ConfigError, ScpConfig, ScpTlsConfig
from sclc_risk_node.node.errors import NotPart10, SpoolBusy, SpoolFull, SpoolIOError, UnsafeUid
from sclc_risk_node.node.metrics import NodeMetrics
from sclc_risk_node.node.records import InstanceRecord
from sclc_risk_node.node.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    DicomReceiver,
    SopClassMismatch,
    UnreadableInstance,
    read_received_dataset,
    status_for_error,
)
from sclc_risk_node.node.spool import Spool
from tests.node.dicom_tools import LOOPBACK, PROPOSE, echoscu, requires_dcmtk, storescu

NODE_AE = "SCLC_NODE"
PACS_AE = "PACS"
PATIENT_ID = "SYNTH-0001"  # dicom_io.synthetic.SyntheticPatient defaults: must never reach a log line
PATIENT_NAME = "Synthetic^Phantom"

# --- fixtures -------------------------------------------------------------------------


def scp_config(**overrides) -> ScpConfig:
    values = dict(
        ae_title=NODE_AE,
        bind_address=LOOPBACK,
        port=0,
        max_pdu_bytes=16384,
        max_associations=4,
        acse_timeout_s=5.0,
        dimse_timeout_s=10.0,
        network_timeout_s=10.0,
        check_called_ae=True,
        allowed_callers=(
            CallerRule(ae_title=PACS_AE, host="127.0.0.1"),
            CallerRule(ae_title="ECHOSCU", host="127.0.0.1"),
        ),
        tls=ScpTlsConfig(enabled=False, cert_file=None, key_file=None, ca_file=None, require_client_cert=False),
    )
    values.update(overrides)
    return ScpConfig(**values)


class Node:
    """A running receiver over a real spool, with its metrics."""

    def __init__(self, root: Path, config: ScpConfig, *, min_free_bytes: int = 0) -> None:
        self.spool = Spool.open(root / "spool", min_free_bytes=min_free_bytes)
        self.metrics = NodeMetrics(studies_by_state=dict, outbox_depth=lambda: 0, process_metrics=False)
        self.receiver = DicomReceiver(config, self.spool, self.metrics)
        self.receiver.start()

    @property
    def port(self) -> int:
        return self.receiver.port

    def received(self, sop_class: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sclc_instances_received_total", {"sop_class": sop_class, "outcome": outcome}
        )
        return value or 0.0

    def instances(self) -> dict[str, InstanceRecord]:
        """Every indexed instance, by SOP Instance UID."""
        return {
            record.sop_instance_uid: record
            for study in self.spool.list_studies(limit=-1)
            for record in self.spool.study_instances(study.study_instance_uid)
        }

    def stop(self) -> None:
        self.receiver.stop(grace_s=1.0)
        self.spool.close()


@pytest.fixture
def start_node(tmp_path):
    started: list[Node] = []

    def start(*, min_free_bytes: int = 0, **overrides) -> Node:
        node = Node(tmp_path / f"node{len(started)}", scp_config(**overrides), min_free_bytes=min_free_bytes)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def node(start_node) -> Node:
    return start_node()


class Phantom:
    """A small synthetic CT series (48×48×8) and its tumour SEG, as files; compressed copies on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.image, self.mask = synthetic_chest_phantom(size=(48, 48, 8))
        self.ct_datasets = write_ct_series(self.image, root / "ct")
        self.ct_dir = root / "ct"
        self.seg_dir = root / "seg"
        self.seg_dir.mkdir()
        self.seg = build_tumour_seg(self.ct_datasets, self.mask)
        self.seg_path = self.seg_dir / "seg.dcm"
        self.seg.save_as(self.seg_path)
        self._compressed: dict[str, Path] = {}

    @property
    def ct_files(self) -> list[Path]:
        return sorted(self.ct_dir.glob("*.dcm"))

    @property
    def ct_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.ct_datasets}

    def compressed_dir(self, transfer_syntax: str) -> Path:
        """The same series (same UIDs) re-encoded in ``transfer_syntax``."""
        if transfer_syntax not in self._compressed:
            folder = self.root / f"ct-{transfer_syntax}"
            write_datasets(self.ct_datasets, folder, transfer_syntax_uid=transfer_syntax)
            self._compressed[transfer_syntax] = folder
        return self._compressed[transfer_syntax]

    def variant(self, name: str, edit) -> Path:
        """A copy of the first CT slice with a new SOP Instance UID, edited by ``edit(ds)``; its path.

        The file meta is written as ``edit`` left it (pynetdicom's raw sending
        takes the C-STORE's SOP class and instance from it), not re-derived.
        """
        ds = pydicom.dcmread(self.ct_files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        edit(ds)
        path = self.root / "variants" / f"{name}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=False)
        return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Phantom:
    return Phantom(tmp_path_factory.mktemp("phantom"))


# --- helpers --------------------------------------------------------------------------


def dataset_bytes(part10: bytes) -> bytes:
    """The bytes after the file meta group (what travelled over DIMSE)."""
    assert part10[128:132] == b"DICM"
    tag, vr, length = struct.unpack("<I2sH", part10[132:140])
    assert (tag, vr, length) == (0x00000002, b"UL", 4), "file meta must start with its group length"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length :]


def scu(*, ae_title: str = PACS_AE, transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (CTImageStorage, SegmentationStorage):
        for transfer_syntax in transfer_syntaxes:  # one context each: the node, as acceptor, would pick its favourite
            ae.add_requested_context(sop_class, [transfer_syntax])
    ae.add_requested_context(Verification)
    return ae


def send(
    node: Node,
    items,
    *,
    ae_title: str = PACS_AE,
    raw_files: bool = False,
    monkeypatch=None,
    transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
) -> list[int]:
    """C-STORE each dataset or file over one pynetdicom association; the statuses.

    ``raw_files`` sends files byte for byte without parsing them (pynetdicom's
    chunked sending, enabled only for this call), so truncated and garbage
    payloads reach the SCP as they are.
    """
    if raw_files:
        monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = scu(ae_title=ae_title, transfer_syntaxes=transfer_syntaxes).associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()
        if raw_files:
            monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)


def rewrite(path: Path, new_path: Path, transform) -> Path:
    new_path.write_bytes(transform(path.read_bytes()))
    return new_path


# --- echo and the happy path -----------------------------------------------------------


@pytest.mark.external
@requires_dcmtk
def test_echoscu_succeeds(node):
    result = echoscu(LOOPBACK, node.port, called_ae=NODE_AE)
    assert result.ok, result.output


@pytest.mark.external
@requires_dcmtk
def test_storescu_ct_and_seg_are_indexed_and_stored_as_received(node, phantom):
    result = storescu(LOOPBACK, node.port, [phantom.ct_dir, phantom.seg_dir], called_ae=NODE_AE, calling_ae=PACS_AE)
    assert result.ok, result.output

    instances = node.instances()
    assert set(instances) == phantom.ct_uids | {str(phantom.seg.SOPInstanceUID)}
    sources = {p.stem: p for p in phantom.ct_files} | {str(phantom.seg.SOPInstanceUID): phantom.seg_path}
    for uid, record in instances.items():
        stored = record.path.read_bytes()
        assert dataset_bytes(stored) == dataset_bytes(sources[uid].read_bytes()), uid
        assert pydicom.dcmread(record.path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    seg = instances[str(phantom.seg.SOPInstanceUID)]
    assert seg.is_segmentation
    assert set(seg.referenced_sop_instance_uids) == phantom.ct_uids
    assert (node.received("ct", "stored"), node.received("seg", "stored")) == (8, 1)


@pytest.mark.external
@requires_dcmtk
@pytest.mark.parametrize(
    "transfer_syntax",
    [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian],
    ids=lambda uid: uid.name,
)
def test_compressed_series_is_stored_in_its_own_transfer_syntax(node, phantom, transfer_syntax):
    folder = phantom.compressed_dir(transfer_syntax)
    result = storescu(
        LOOPBACK, node.port, [folder], called_ae=NODE_AE, calling_ae=PACS_AE, propose=PROPOSE[transfer_syntax]
    )
    assert result.ok, result.output

    instances = node.instances()
    assert set(instances) == {p.stem for p in folder.glob("*.dcm")}  # pydicom's compress() gives new UIDs
    originals = {int(ds.InstanceNumber): ds.pixel_array for ds in phantom.ct_datasets}
    for uid, record in instances.items():
        assert dataset_bytes(record.path.read_bytes()) == dataset_bytes((folder / f"{uid}.dcm").read_bytes())
        stored = pydicom.dcmread(record.path)
        assert stored.file_meta.TransferSyntaxUID == transfer_syntax
        assert np.array_equal(stored.pixel_array, originals[int(stored.InstanceNumber)])


@pytest.mark.external
@requires_dcmtk
def test_sending_twice_is_idempotent(node, phantom):
    first = storescu(LOOPBACK, node.port, [phantom.ct_dir], called_ae=NODE_AE, calling_ae=PACS_AE)
    stamps = {uid: (r.path.stat().st_mtime_ns, r.sha256) for uid, r in node.instances().items()}
    second = storescu(LOOPBACK, node.port, [phantom.ct_dir], called_ae=NODE_AE, calling_ae=PACS_AE)

    assert first.ok and second.ok, second.output
    assert {uid: (r.path.stat().st_mtime_ns, r.sha256) for uid, r in node.instances().items()} == stamps
    assert (node.received("ct", "stored"), node.received("ct", "duplicate")) == (8, 8)


@pytest.mark.external
@requires_dcmtk
def test_ct_and_seg_on_concurrent_associations(node, phantom):
    # As Orthanc sends a study: one association per SOP class, at the same time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [
            pool.submit(storescu, LOOPBACK, node.port, [folder], called_ae=NODE_AE, calling_ae=PACS_AE)
            for folder in (phantom.ct_dir, phantom.seg_dir)
        ]
        results = [run.result() for run in runs]
    assert all(result.ok for result in results), [r.output for r in results]
    assert set(node.instances()) == phantom.ct_uids | {str(phantom.seg.SOPInstanceUID)}
    assert len(node.spool.list_studies()) == 1


# --- who may associate ----------------------------------------------------------------


@pytest.mark.external
@requires_dcmtk
def test_unknown_calling_ae_is_rejected_and_nothing_is_stored(node, phantom):
    with structlog.testing.capture_logs() as logs:
        result = storescu(LOOPBACK, node.port, [phantom.ct_dir], called_ae=NODE_AE, calling_ae="EVIL")

    assert not result.ok and result.association_rejected, result.output
    assert "Calling AE Title Not Recognized" in result.output
    assert node.instances() == {}
    rejected = [e for e in logs if e["event"] == "association_rejected"]
    assert rejected and rejected[0]["calling_ae"] == "EVIL" and rejected[0]["peer_ip"] == "127.0.0.1"


@pytest.mark.external
@requires_dcmtk
@pytest.mark.parametrize("check_called_ae", [True, False])
def test_wrong_called_ae_is_rejected_only_when_checked(start_node, check_called_ae):
    node = start_node(check_called_ae=check_called_ae)
    result = echoscu(LOOPBACK, node.port, called_ae="SOMEONE_ELSE")
    if check_called_ae:
        assert result.association_rejected and "Called AE Title Not Recognized" in result.output, result.output
    else:
        assert result.ok, result.output


def test_source_address_outside_the_allow_list_is_closed_at_accept_and_logged(start_node):
    node = start_node(allowed_callers=(CallerRule(ae_title=PACS_AE, host="127.0.0.1"),))
    with structlog.testing.capture_logs() as logs:
        outsider = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, bind_address=("127.0.0.2", 0))
    # Closed before any A-ASSOCIATE exchange: no A-ASSOCIATE-RJ, no association, no thread.
    assert not outsider.is_established and not outsider.is_rejected
    assert [(e["peer_ip"], e["reason"]) for e in logs if e["event"] == "peer_refused"] == [
        ("127.0.0.2", scp.REFUSED_ADDRESS)
    ]
    assert not [e for e in logs if e["event"].startswith("association_")]

    insider = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, bind_address=("127.0.0.1", 0))
    assert insider.is_established
    assert insider.send_c_echo().Status == STATUS_SUCCESS
    insider.release()


def test_a_failing_caller_check_rejects(start_node, monkeypatch):
    node = start_node()

    def broken(self, calling_ae_title, address):
        raise RuntimeError("allow-list unreadable")

    monkeypatch.setattr(ScpConfig, "caller_allowed", broken)
    assoc = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert assoc.is_rejected


def test_association_limit_rejects_transiently_until_one_ends(start_node):
    node = start_node(max_associations=1)
    first = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert first.is_established
    second = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert second.is_rejected
    assert (second.acceptor.primitive.result, second.acceptor.primitive.diagnostic) == (
        scp.REJECT_TRANSIENT,
        scp.REJECT_LOCAL_LIMIT_EXCEEDED,
    )
    first.release()
    deadline = time.monotonic() + 5
    while node.receiver.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    third = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert third.is_established
    third.release()


# --- unauthenticated connections cannot lock the PACS out ------------------------------

#: Far above max_associations (4 in these tests) and preassociation_per_ip (4 by default).
FLOOD_CONNECTIONS = 16
FLOODER_IP = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to lo: a second host on loopback
#: An A-ASSOCIATE-RQ PDU header announcing 64 KiB, then silence (a peer stalled mid-PDU).
STALLED_PDU = b"\x01\x00" + struct.pack(">I", 2**16) + b"\x00\x01"


def open_flood(port: int, *, silent: int = 0, opened_and_closed: int = 0, stalled: int = 0) -> list[socket.socket]:
    """TCP connections from FLOODER_IP to the node; the ones still open (the caller closes them)."""
    held = []
    for kind in ["closed"] * opened_and_closed + ["silent"] * silent + ["stalled"] * stalled:
        try:
            conn = socket.create_connection((LOOPBACK, port), timeout=5, source_address=(FLOODER_IP, 0))
        except OSError:
            continue  # the node may close or refuse it: that is the point
        if kind == "closed":
            conn.close()
            continue
        if kind == "stalled":
            try:
                conn.sendall(STALLED_PDU)
            except OSError:
                pass
        held.append(conn)
    return held


def pacs_round_trip(node: Node, dataset) -> float:
    """Seconds for the allowed PACS (127.0.0.1) to associate, C-ECHO, C-STORE ``dataset`` and release."""
    start = time.monotonic()
    assoc = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, bind_address=(LOOPBACK, 0))
    assert assoc.is_established, "the allowed PACS could not associate" + (
        f" (rejected: result {assoc.acceptor.primitive.result}, diagnostic {assoc.acceptor.primitive.diagnostic})"
        if assoc.is_rejected
        else ""
    )
    try:
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        assert assoc.send_c_store(dataset).Status == STATUS_SUCCESS
    finally:
        assoc.release()
    return time.monotonic() - start


def fresh_ct(phantom: Phantom, name: str):
    return pydicom.dcmread(phantom.variant(name, lambda ds: None))


def generous_bound_s(baseline_s: float) -> float:
    # Not a speed test (those live in benchmarks/): only "not held up by the
    # flood", which before the fix meant a rejection, or 30 s of acse_timeout.
    return max(10 * baseline_s, baseline_s + 3.0)


def test_silent_connections_from_an_unlisted_address_do_not_lock_out_the_pacs(start_node, phantom):
    # Reproduction (issue 10.1): a dozen connections that send nothing took every
    # association slot for acse_timeout (30 s) and left no log line.
    node = start_node(allowed_callers=(CallerRule(ae_title=PACS_AE, host=LOOPBACK),), acse_timeout_s=30.0)
    baseline_s = pacs_round_trip(node, fresh_ct(phantom, "baseline"))

    with structlog.testing.capture_logs() as logs:
        held = open_flood(node.port, opened_and_closed=FLOOD_CONNECTIONS // 2, silent=FLOOD_CONNECTIONS)
        try:
            during_s = pacs_round_trip(node, fresh_ct(phantom, "during"))
        finally:
            for conn in held:
                conn.close()

    assert during_s < generous_bound_s(baseline_s), (during_s, baseline_s)
    refused = [e for e in logs if e["event"] == "peer_refused"]
    assert refused and {(e["peer_ip"], e["reason"]) for e in refused} == {(FLOODER_IP, scp.REFUSED_ADDRESS)}
    assert len(refused) == 1  # rate-limited: one line per (address, reason) per refused_log_interval_s
    assert PATIENT_ID not in repr(logs)
    assert not [e for e in logs if e["event"] == "association_aborted"]  # the flood made no associations


def test_a_flood_from_an_allowed_network_is_held_to_its_per_address_budget(start_node, phantom):
    # The flooder's address passes the allow-list (the shipped default admits
    # 127.0.0.0/8), so only its pre-association budget stops it: silent and
    # stalled connections never count against max_associations (4 here).
    node = start_node(allowed_callers=(CallerRule(ae_title="*", host="127.0.0.0/8"),), acse_timeout_s=30.0)
    baseline_s = pacs_round_trip(node, fresh_ct(phantom, "baseline"))

    with structlog.testing.capture_logs() as logs:
        held = open_flood(
            node.port,
            opened_and_closed=FLOOD_CONNECTIONS // 2,
            silent=FLOOD_CONNECTIONS,
            stalled=FLOOD_CONNECTIONS // 2,
        )
        try:
            during_s = pacs_round_trip(node, fresh_ct(phantom, "during"))
            second_s = pacs_round_trip(node, fresh_ct(phantom, "during-2"))
        finally:
            for conn in held:
                conn.close()

    assert max(during_s, second_s) < generous_bound_s(baseline_s), (during_s, second_s, baseline_s)
    reasons = {e["reason"] for e in logs if e["event"] == "peer_refused" and e["peer_ip"] == FLOODER_IP}
    assert scp.REFUSED_PER_IP in reasons, reasons
    # The budget is handed back: every pending connection ends within preassociation_timeout_s.
    deadline = time.monotonic() + node.receiver.config.preassociation_timeout_s + 5
    while node.receiver.gate.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.receiver.gate.pending == 0
    assert len(node.instances()) == 3  # baseline, during, during-2


def test_a_peer_stalled_inside_its_association_request_is_dropped_after_the_preassociation_timeout(start_node):
    # pynetdicom reads a PDU with a blocking recv() until its declared length
    # has arrived; without a socket timeout this peer held two threads forever.
    node = start_node(allowed_callers=(CallerRule(ae_title="*", host="127.0.0.0/8"),))  # preassociation_timeout_s = 5
    with structlog.testing.capture_logs() as logs:
        [stalled] = open_flood(node.port, stalled=1)
        try:
            stalled.settimeout(20)
            start = time.monotonic()
            try:
                answer = stalled.recv(1024)
            except ConnectionResetError:
                answer = b""
            closed_after_s = time.monotonic() - start
        finally:
            stalled.close()
        assert answer == b""  # closed by the node, without an association
        assert closed_after_s < 5.0 + 5.0  # acse_timeout_s and network_timeout_s here are 5 and 10
        deadline = time.monotonic() + 5
        while (node.receiver.active_associations or node.receiver.gate.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert node.receiver.active_associations == 0 and node.receiver.gate.pending == 0
    assert [e["reason"] for e in logs if e["event"] == "peer_refused"] == [scp.REFUSED_NO_VALID_REQUEST]


@pytest.mark.external
@requires_dcmtk
def test_mr_image_storage_gets_no_presentation_context(node, phantom):
    def as_mr(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"

    result = storescu(LOOPBACK, node.port, [phantom.variant("mr", as_mr)], called_ae=NODE_AE, calling_ae=PACS_AE)
    assert not result.ok and result.no_presentation_context, result.output
    assert node.instances() == {}


# --- what arrives ---------------------------------------------------------------------


def test_corrupt_instances_get_cannot_understand_and_the_rest_is_stored(node, phantom, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    fresh = lambda name: phantom.variant(name, lambda ds: None)  # noqa: E731 - new SOP Instance UID each
    truncated = rewrite(fresh("t"), bad / "truncated.dcm", lambda b: b[:-1000])
    garbage = rewrite(fresh("g"), bad / "garbage.dcm", lambda b: b + bytes(range(256)))
    not_dicom = rewrite(fresh("n"), bad / "not-dicom.dcm", lambda b: b[:300] + b"\xff" * 16 + b"garbage" * 40)
    files = [truncated, *phantom.ct_files[:4], garbage, not_dicom, *phantom.ct_files[4:]]

    statuses = send(node, files, raw_files=True, monkeypatch=monkeypatch)

    assert statuses == [
        STATUS_CANNOT_UNDERSTAND,
        *[STATUS_SUCCESS] * 4,
        STATUS_CANNOT_UNDERSTAND,
        STATUS_CANNOT_UNDERSTAND,
        *[STATUS_SUCCESS] * 4,
    ]
    assert set(node.instances()) == phantom.ct_uids
    assert (node.received("ct", "stored"), node.received("ct", "rejected")) == (8, 3)


def test_short_pixel_data_is_refused(node, phantom):
    ds = pydicom.dcmread(phantom.variant("short", lambda ds: None))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert send(node, [ds]) == [STATUS_CANNOT_UNDERSTAND]
    assert node.instances() == {}


def test_unsafe_uid_is_refused(node, phantom, tmp_path, monkeypatch):
    # Same length as the UID it replaces, so the encoding stays valid; only the value is hostile.
    path = phantom.variant("unsafe", lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3.44444444"))
    hostile = rewrite(path, tmp_path / "hostile.dcm", lambda b: b.replace(b"1.2.3.44444444", b"1.2/../../etc/"))
    with structlog.testing.capture_logs() as logs:
        assert send(node, [hostile], raw_files=True, monkeypatch=monkeypatch) == [STATUS_CANNOT_UNDERSTAND]
    assert [e["error_type"] for e in logs if e["event"] == "instance_refused"] == ["UnsafeUid"]
    assert node.instances() == {}
    assert not list((node.spool.directory / "instances").rglob("*"))


def test_dataset_that_does_not_match_its_sop_class_gets_0xA900(node, phantom, tmp_path, monkeypatch):
    def ct_sent_as_seg(ds):
        ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage  # pynetdicom picks the context from the meta

    def mr_in_ct(ds):
        ds.Modality = "MR"

    def other_instance(ds):
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    files = [
        phantom.variant(name, edit)
        for name, edit in [("as-seg", ct_sent_as_seg), ("mr-in-ct", mr_in_ct), ("uid", other_instance)]
    ]
    statuses = send(node, files, raw_files=True, monkeypatch=monkeypatch)
    assert statuses == [STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS] * 3
    assert node.instances() == {}
    assert (node.received("seg", "rejected"), node.received("ct", "rejected")) == (1, 2)


# --- resource limits (issue 10.4) --------------------------------------------------------


def bytes_accepted(
    conn: socket.socket, header: bytes, *, chunk_bytes: int = 2**20, up_to_bytes: int = 96 * 2**20
) -> int:
    """Send ``header`` then zeros until the node stops reading or ``up_to_bytes`` went out; the bytes sent."""
    conn.settimeout(5)
    sent = 0
    chunk = bytes(chunk_bytes)
    try:
        conn.sendall(header)
        while sent < up_to_bytes:
            conn.sendall(chunk)
            sent += chunk_bytes
    except OSError:  # reset or broken pipe: the node closed the connection
        pass
    return sent


def test_an_oversized_association_request_is_not_read(start_node):
    # pynetdicom reads whatever length a PDU header announces (up to 4 GiB)
    # into memory; before association that was open to any allowed address.
    node = start_node(allowed_callers=(CallerRule(ae_title="*", host="127.0.0.0/8"),))
    with structlog.testing.capture_logs() as logs:
        conn = socket.create_connection((LOOPBACK, node.port), timeout=5, source_address=(FLOODER_IP, 0))
        try:
            sent = bytes_accepted(conn, b"\x01\x00" + struct.pack(">I", 512 * 2**20))
        finally:
            conn.close()
    assert sent < 32 * 2**20, f"the node went on reading: {sent} bytes"
    assert (FLOODER_IP, scp.REFUSED_PDU_TOO_LARGE) in {
        (e["peer_ip"], e["reason"]) for e in logs if e["event"] == "peer_refused"
    }


def test_a_pdu_beyond_the_announced_maximum_length_aborts_the_association(start_node):
    from tests.node.test_fuzz import associate_rq

    node = start_node(allowed_callers=(CallerRule(ae_title="*", host="127.0.0.0/8"),))  # max_pdu_bytes = 16384
    conn = socket.create_connection((LOOPBACK, node.port), timeout=5)
    try:
        conn.sendall(associate_rq(called=NODE_AE, calling=PACS_AE))
        assert conn.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        sent = bytes_accepted(conn, b"\x04\x00" + struct.pack(">I", 512 * 2**20))  # a P-DATA-TF of 512 MiB
    finally:
        conn.close()
    assert sent < 32 * 2**20, f"the node went on reading: {sent} bytes"
    assert send(node, []) == []  # and it still serves


BOMB_INFLATED_BYTES = 64 * 2**20


def deflated_with_padding(source: Path, target: Path, padding_bytes: int) -> Path:
    """``source`` (Explicit VR Little Endian) as a Deflated Explicit VR Little Endian file whose data set
    ends in a Data Set Trailing Padding (FFFC,FFFC) of ``padding_bytes`` zeros.

    Deflated in 1 MiB steps, so the test never holds the inflated data set:
    64 MiB of zeros become about 64 KB on the wire.
    """
    part10 = source.read_bytes()
    meta = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [compressor.compress(dataset_bytes(part10))]
    chunks.append(compressor.compress(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding_bytes)))
    step = bytes(2**20)
    for _ in range(padding_bytes // len(step)):
        chunks.append(compressor.compress(step))
    chunks.append(compressor.flush())
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    target.write_bytes(buffer.getvalue() + b"".join(chunks))
    return target


def test_a_dimse_message_beyond_the_instance_limits_is_not_gathered(start_node):
    # pynetdicom gathers a whole message in memory before any handler runs:
    # command fragments that never say "last" grew without bound.
    from tests.node.test_fuzz import associate_rq, p_data

    node = start_node(allowed_callers=(CallerRule(ae_title="*", host="127.0.0.0/8"),), max_decoded_bytes=2**20)
    # limit: max(max_decoded_bytes 1 MiB, max_inflated_bytes 32 MiB) + 16 MiB = 48 MiB
    fragment = p_data([(1, 0x01, bytes(16000))])  # command fragment, not the last
    conn = socket.create_connection((LOOPBACK, node.port), timeout=5)
    sent = 0
    with structlog.testing.capture_logs() as logs:
        try:
            conn.sendall(associate_rq(called=NODE_AE, calling=PACS_AE))
            assert conn.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            conn.settimeout(10)
            while sent < 128 * 2**20:
                conn.sendall(fragment * 64)
                sent += len(fragment) * 64
        except OSError:
            pass  # the node aborted
        finally:
            conn.close()
        deadline = time.monotonic() + 10
        while node.receiver.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sent < 80 * 2**20, f"the node went on reading: {sent} bytes"
    assert scp.REFUSED_MESSAGE_TOO_LARGE in {e["reason"] for e in logs if e["event"] == "peer_refused"}
    assert send(node, []) == []  # and it still serves


def test_a_deflate_bomb_is_refused_before_it_is_inflated(node, phantom, tmp_path, monkeypatch):
    # Reproduction (issue 10.4): a 132 KB deflated instance that inflates to
    # 64 MB raised the service's memory by 224 MB.  Now it is inflated in 1 MiB
    # steps against scp.max_inflated_bytes (32 MiB by default) and refused.
    bomb = deflated_with_padding(phantom.variant("bomb", lambda ds: None), tmp_path / "bomb.dcm", BOMB_INFLATED_BYTES)
    assert bomb.stat().st_size < 200_000
    ordinary = phantom.variant("after-bomb", lambda ds: None)
    syntaxes = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)

    with structlog.testing.capture_logs() as logs:
        tracemalloc.start()
        try:
            statuses = send(node, [bomb], raw_files=True, monkeypatch=monkeypatch, transfer_syntaxes=syntaxes)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        statuses += send(node, [ordinary], transfer_syntaxes=syntaxes)  # the node keeps serving

    assert statuses == [STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS]
    assert peak_bytes < 16 * 2**20, f"receiving the bomb allocated {peak_bytes / 2**20:.0f} MiB"
    assert set(node.instances()) == {pydicom.dcmread(ordinary).SOPInstanceUID}  # nothing stored for the bomb
    [refused] = [e for e in logs if e["event"] == "instance_refused"]
    assert refused["status"] == "0xA700" and "scp.max_inflated_bytes" in refused["reason"]


def test_a_header_announcing_a_huge_decoded_image_is_refused(node, phantom, tmp_path, monkeypatch):
    # RLE keeps the fragments small whatever Rows x Columns claim; decoding
    # 60000 x 60000 x 2 bytes (6.7 GiB) would happen in a scoring worker.
    ds = pydicom.dcmread(sorted(phantom.compressed_dir(RLELossless).glob("*.dcm"))[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 60000
    huge = tmp_path / "huge.dcm"
    ds.save_as(huge, enforce_file_format=True)
    syntaxes = (RLELossless, ExplicitVRLittleEndian)

    with structlog.testing.capture_logs() as logs:
        statuses = send(node, [huge], raw_files=True, monkeypatch=monkeypatch, transfer_syntaxes=syntaxes)
        statuses += send(node, phantom.ct_files[:1])

    assert statuses == [STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS]
    assert set(node.instances()) == {phantom.ct_files[0].stem}
    [refused] = [e for e in logs if e["event"] == "instance_refused"]
    assert refused["status"] == "0xA700" and "scp.max_decoded_bytes" in refused["reason"]
    assert "7200000000 bytes" in refused["reason"]


def test_instance_limits_come_from_the_config(start_node, phantom):
    node = start_node(max_decoded_bytes=2**20)
    assert node.receiver.limits == scp.InstanceLimits(max_decoded_bytes=2**20, max_inflated_bytes=32 * 2**20)
    assert send(node, phantom.ct_files[:1]) == [STATUS_SUCCESS]  # 48 x 48 x 2 bytes


def test_seg_without_referenced_series_sequence_is_stored(node, phantom):
    seg = pydicom.dcmread(phantom.seg_path)
    del seg.ReferencedSeriesSequence
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assert send(node, [seg]) == [STATUS_SUCCESS]
    record = node.instances()[str(seg.SOPInstanceUID)]
    assert record.is_segmentation and record.referenced_series_instance_uids == ()


def test_disk_guard_answers_out_of_resources(start_node, phantom):
    node = start_node(min_free_bytes=2**62)
    assert send(node, phantom.ct_files[:2]) == [STATUS_OUT_OF_RESOURCES] * 2
    assert node.instances() == {}
    assert node.received("ct", "rejected") == 2


@pytest.mark.external
@requires_dcmtk
def test_storescu_reports_out_of_resources(start_node, phantom):
    node = start_node(min_free_bytes=2**62)
    result = storescu(LOOPBACK, node.port, phantom.ct_files[:1], called_ae=NODE_AE, calling_ae=PACS_AE)
    # storescu exits 0 after a refused store; its verbose log carries the status.
    assert "Received Store Response (Refused: OutOfResources)" in result.output, result.output


def test_unexpected_error_answers_0xC211_and_the_association_goes_on(node, phantom, monkeypatch):
    real_store = node.receiver.machine.store_instance
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(node.receiver.machine, "store_instance", flaky)
    assert send(node, phantom.ct_files[:2]) == [STATUS_PROCESSING_FAILURE, STATUS_SUCCESS]
    assert len(node.instances()) == 1


def test_logs_name_uids_and_reasons_but_no_patient_identity(start_node, phantom, tmp_path, monkeypatch):
    with structlog.testing.capture_logs() as logs:
        node = start_node()
        bad = rewrite(phantom.variant("bad", lambda ds: None), tmp_path / "bad.dcm", lambda b: b[:-100])
        statuses = send(node, [phantom.ct_files[0], bad], raw_files=True, monkeypatch=monkeypatch)
        mr = phantom.variant("mr", lambda ds: setattr(ds, "Modality", "MR"))
        statuses += send(node, [mr])
    assert statuses == [STATUS_SUCCESS, STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS]
    text = repr(logs)
    assert PATIENT_ID not in text and PATIENT_NAME not in text and "19600101" not in text
    refused = [e for e in logs if e["event"] == "instance_refused"]
    assert [e["status"] for e in refused] == ["0xC000", "0xA900"]
    assert all(e["sop_uid"] and e["assoc_id"] and e["calling_ae"] == PACS_AE for e in refused)


class BrokenLog:
    """A log sink that fails on every call (say, stdout closed under us)."""

    def bind(self, **fields):
        return self

    def __getattr__(self, level):
        def fail(*args, **kwargs):
            raise ValueError("I/O operation on closed file")

        return fail


def test_a_failing_log_sink_changes_no_status_and_admits_no_one(tmp_path, phantom):
    spool = Spool.open(tmp_path / "spool", min_free_bytes=0)
    receiver = DicomReceiver(scp_config(), spool, log=BrokenLog())
    receiver.start()
    try:
        node = type("N", (), {"port": receiver.port})()
        assert send(node, phantom.ct_files[:1]) == [STATUS_SUCCESS]
        assert scu(ae_title="EVIL").associate(LOOPBACK, receiver.port, ae_title=NODE_AE).is_rejected
    finally:
        receiver.stop()
        spool.close()


# --- TLS and lifecycle ----------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "node.crt", directory / "node.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.skipif(not Path("/usr/bin/openssl").is_file(), reason="openssl not installed")
def test_tls_listener_answers_tls_callers_only(start_node, tmp_path):
    import ssl

    cert, key = self_signed_certificate(tmp_path)
    tls = ScpTlsConfig(enabled=True, cert_file=cert, key_file=key, ca_file=None, require_client_cert=False)
    node = start_node(tls=tls)
    client = ssl.create_default_context(cafile=str(cert))
    client.check_hostname = False
    secure = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, tls_args=(client, None))
    assert secure.is_established
    assert secure.send_c_echo().Status == STATUS_SUCCESS
    secure.release()
    plain = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert not plain.is_established
    again = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, tls_args=(client, None))
    assert again.is_established  # a failed handshake does not take the listener down
    again.release()


@pytest.mark.skipif(not Path("/usr/bin/openssl").is_file(), reason="openssl not installed")
def test_a_silent_connection_to_the_tls_port_does_not_block_other_callers(start_node, tmp_path):
    # pynetdicom does the TLS handshake in its one accepting thread: a peer that
    # connects and never sends a ClientHello blocked every later caller.
    import ssl

    cert, key = self_signed_certificate(tmp_path)
    tls = ScpTlsConfig(enabled=True, cert_file=cert, key_file=key, ca_file=None, require_client_cert=False)
    node = start_node(tls=tls)
    client = ssl.create_default_context(cafile=str(cert))
    client.check_hostname = False
    silent = socket.create_connection((LOOPBACK, node.port), timeout=5)
    try:
        time.sleep(0.2)  # let the node accept it first
        start = time.monotonic()
        assoc = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE, tls_args=(client, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == STATUS_SUCCESS
        assoc.release()
        assert time.monotonic() - start < 3.0  # not a speed test: a blocked accept loop never answers
    finally:
        silent.close()


def test_port_zero_binds_a_free_port_and_stop_aborts_lingering_associations(start_node):
    node = start_node()
    assert node.receiver.running and node.port > 0
    lingering = scu().associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert lingering.is_established
    node.receiver.stop(grace_s=0.2)
    assert not node.receiver.running
    lingering.join(timeout=5)
    assert lingering.is_aborted or not lingering.is_established
    node.receiver.stop()  # idempotent


def test_a_busy_port_names_the_config_key(start_node, tmp_path):
    node = start_node()
    spool = Spool.open(tmp_path / "other", min_free_bytes=0)
    with pytest.raises(ConfigError, match=r"scp\.port: .* already in use"):
        DicomReceiver(scp_config(port=node.port), spool).start()
    spool.close()


# --- pure units -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (SpoolFull("disk"), STATUS_OUT_OF_RESOURCES),
        (SpoolBusy("locked"), STATUS_OUT_OF_RESOURCES),
        (SpoolIOError("eio"), STATUS_OUT_OF_RESOURCES),
        (UnsafeUid("bad uid"), STATUS_CANNOT_UNDERSTAND),
        (UnreadableInstance("truncated"), STATUS_CANNOT_UNDERSTAND),
        (SopClassMismatch("MR in CT"), STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS),
        (NotPart10("our bug"), STATUS_PROCESSING_FAILURE),
        (RuntimeError("bug"), STATUS_PROCESSING_FAILURE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else f"0x{v:04X}",
)
def test_status_for_error(error, status):
    assert status_for_error(error) == status


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1000],  # native pixel data cut short
        lambda b: b + b"\x13\x37" * 50,  # garbage read as one more element
        lambda b: b[:500],  # cut inside the header
    ],
    ids=["truncated-pixels", "trailing-garbage", "truncated-header"],
)
def test_read_received_dataset_refuses_damaged_native_data(phantom, damage):
    encoded = phantom.ct_files[0].read_bytes()
    assert read_received_dataset(encoded).SOPInstanceUID == phantom.ct_files[0].stem
    with pytest.raises(UnreadableInstance):
        read_received_dataset(damage(encoded))


def test_read_received_dataset_refuses_truncated_encapsulated_pixel_data(phantom):
    encoded = sorted(phantom.compressed_dir(RLELossless).glob("*.dcm"))[0].read_bytes()
    read_received_dataset(encoded)
    with pytest.raises(UnreadableInstance, match="no Pixel Data"):
        read_received_dataset(encoded[:-300])


def test_negotiated_transfer_syntaxes_are_the_decodable_ones():
    syntaxes = scp.decodable_transfer_syntaxes()
    assert syntaxes[:2] == (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert {RLELossless, JPEGLSLossless, JPEG2000Lossless} <= set(syntaxes)
    assert all(pydicom.pixels.get_decoder(uid).is_available for uid in syntaxes)


def test_ipv6_listener_and_allow_list(start_node):
    node = start_node(bind_address="::1", allowed_callers=(CallerRule(ae_title=PACS_AE, host="::1"),))
    assoc = scu().associate("::1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == STATUS_SUCCESS
    assoc.release()
    assert scu(ae_title="OTHER").associate("::1", node.port, ae_title=NODE_AE).is_rejected


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def test_check_inflated_size_caps_corrupt_truncated_and_trailing_streams():
    stream = deflate(bytes(3 * 2**20))
    assert scp.check_inflated_size(stream, 3 * 2**20) == 3 * 2**20
    assert scp.check_inflated_size(stream + b"\0", 3 * 2**20) == 3 * 2**20  # PS3.5 A.5 even-length pad
    with pytest.raises(scp.InstanceTooLarge, match=r"more than 3145727 bytes \(scp.max_inflated_bytes"):
        scp.check_inflated_size(stream, 3 * 2**20 - 1)
    with pytest.raises(UnreadableInstance, match="truncated"):
        scp.check_inflated_size(stream[: len(stream) // 2], 2**30)
    with pytest.raises(UnreadableInstance, match="bytes follow the end"):
        scp.check_inflated_size(stream + b"garbage", 2**30)
    with pytest.raises(UnreadableInstance, match="corrupt"):
        scp.check_inflated_size(b"\xff" * 64, 2**30)


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (dict(Rows=512, Columns=512, BitsAllocated=16), 512 * 512 * 2),
        (dict(Rows=512, Columns=512, BitsAllocated=1, NumberOfFrames=600), 512 * 512 * 600),  # unpacked binary SEG
        (dict(Rows=64, Columns=64, BitsAllocated=8, SamplesPerPixel=3, NumberOfFrames=2), 64 * 64 * 3 * 2),
    ],
    ids=["ct-slice", "binary-seg", "rgb"],
)
def test_decoded_pixel_bytes(attributes, expected):
    ds = pydicom.Dataset()
    for name, value in attributes.items():
        setattr(ds, name, value)
    assert scp.decoded_pixel_bytes(ds) == expected


def test_decoded_pixel_bytes_names_missing_attributes():
    ds = pydicom.Dataset()
    ds.Rows = 512
    with pytest.raises(UnreadableInstance, match="image pixel attributes are missing"):
        scp.decoded_pixel_bytes(ds)


def test_refusal_log_is_rate_limited_per_address_and_reason():
    now = [1000.0]
    with structlog.testing.capture_logs() as logs:
        refusals = scp.RefusalLog(structlog.get_logger(), interval_s=60, max_keys=2, clock=lambda: now[0])
        for _ in range(50):
            refusals.refused("10.0.0.9", scp.REFUSED_ADDRESS)
        refusals.refused("10.0.0.8", scp.REFUSED_ADDRESS)
        now[0] += 61
        refusals.refused("10.0.0.9", scp.REFUSED_ADDRESS)
    assert [(e["peer_ip"], e["suppressed"]) for e in logs] == [("10.0.0.9", 0), ("10.0.0.8", 0), ("10.0.0.9", 49)]
    assert all(e["event"] == "peer_refused" and e["log_level"] == "warning" for e in logs)


def test_connection_gate_budgets_pending_connections_per_address_and_in_total():
    config = scp_config(
        allowed_callers=(CallerRule(ae_title="*", host="10.0.0.0/8"),), preassociation_per_ip=2, preassociation_total=3
    )
    with structlog.testing.capture_logs() as logs:
        gate = scp.ConnectionGate(config, structlog.get_logger())
        first, second = gate.open("10.0.0.1"), gate.open("::ffff:10.0.0.1")  # IPv4-mapped is the same address
        assert first and second and gate.open("10.0.0.1") is None
        third = gate.open("10.0.0.2")
        assert third and gate.open("10.0.0.3") is None
        assert gate.open("192.168.1.1") is None
        gate.release(first)
        gate.release(first)  # released once only
        assert gate.pending == 2
        assert gate.open("10.0.0.3") is not None
    assert [(e["peer_ip"], e["reason"]) for e in logs] == [
        ("10.0.0.1", scp.REFUSED_PER_IP),
        ("10.0.0.3", scp.REFUSED_TOTAL),
        ("192.168.1.1", scp.REFUSED_ADDRESS),
    ]
