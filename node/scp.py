"""The storage SCP: receives the chest CT series and the tumour SEG from the PACS.

`DicomReceiver` wraps one pynetdicom ``AE``.  It accepts

* Verification (C-ECHO), and
* C-STORE for CT Image Storage and Segmentation Storage only, in every transfer
  syntax the scoring core can decode (`decodable_transfer_syntaxes`).  Any
  other SOP class gets no presentation context (DCMTK's ``storescu`` sending
  MR Image Storage reports "No Acceptable Presentation Contexts").

Who may associate.  An association is refused with A-ASSOCIATE-RJ before any
presentation context is negotiated when

* the (Calling AE title, source IP) pair matches no `ScpConfig.allowed_callers`
  rule: `handle_requested`, bound to ``EVT_REQUESTED``, the hook pynetdicom
  gives for this (it skips its own negotiation once the handler has sent a
  reject; pydicom/pynetdicom#408).  The handler fails closed: if it raises, the
  association is still rejected (pynetdicom would otherwise log the error
  from a notification handler and go on to accept);
* ``check_called_ae`` is on and the Called AE title is not ours
  (pynetdicom's ``require_called_aet``: permanent, "called AE title not
  recognised");
* ``max_associations`` are already running (pynetdicom's
  ``maximum_associations``: transient, "local limit exceeded").

Every acceptance and rejection is logged with the calling AE title, the IP and
the reason (neither is PHI).

Receiving.  `handle_store` keeps the instance exactly as it arrived (the
encoded data set from the wire behind a file meta header written by
pynetdicom); it parses it only to check that it is whole and to read the
header fields the spool indexes, then hands the bytes to `Spool.store_instance`,
which fsyncs, renames and commits before it returns.  Only then is success
answered.  Each failure has its own status (`STATUS_*`, see `status_for_error`).

Handlers get their dependencies through pynetdicom's binding
(``(evt.EVT_C_STORE, handle_store, [spool, metrics, log, registry, clock])``), never from
module globals.  This module and ``outbox.py`` are the only importers of
pynetdicom.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Callable

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.config import ConfigError, ScpConfig
from node.errors import NodeError, NotPart10, UnsafeUid
from node.http_status import NodeMetrics
from node.logs import get_logger
from node.records import InstanceHeader, StoreOutcome
from node.spool import Spool
from scoring.errors import InputError

# --- DIMSE statuses (PS3.4 B.2.3 Storage, PS3.7 C.4.2 status classes) ----------------

STATUS_SUCCESS = 0x0000
#: "Refused: Out of Resources": spool below its free-space floor, database
#: locked, disk I/O trouble.  Senders retry these later.
STATUS_OUT_OF_RESOURCES = 0xA700
#: "Error: Data Set does not match SOP Class": the data set's SOP Class /
#: Instance UID differs from the C-STORE request, or its Modality does not fit
#: the SOP class (DCMTK's storescp answers the UID mismatch the same way).
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: "Error: Cannot understand": the data set cannot be parsed, is truncated, or
#: lacks (or has malformed) the UIDs that name its file.
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Still "cannot understand" class; the code pynetdicom itself answers when a
#: C-STORE handler raises.  Here: an unexpected error in our own code.
STATUS_PROCESSING_FAILURE = 0xC211

# --- A-ASSOCIATE-RJ parameters (PS3.8 9.3.4) ----------------------------------------

REJECT_PERMANENT = 0x01
REJECT_TRANSIENT = 0x02
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REJECT_NO_REASON = 0x01
REJECT_CALLING_AE_NOT_RECOGNISED = 0x03
REJECT_CALLED_AE_NOT_RECOGNISED = 0x07
REJECT_LOCAL_LIMIT_EXCEEDED = 0x02

_REJECT_REASONS = {
    (REJECT_SOURCE_SERVICE_USER, REJECT_NO_REASON): "no reason given",
    (REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED): "calling AE title not recognised",
    (REJECT_SOURCE_SERVICE_USER, REJECT_CALLED_AE_NOT_RECOGNISED): "called AE title not recognised",
    (REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION, REJECT_LOCAL_LIMIT_EXCEEDED): "too many associations",
}

# --- what we accept -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageClass:
    """A SOP class we store: its `NodeMetrics` label and the Modality its IOD requires."""

    uid: UID
    metrics_label: str
    modality: str


#: CT Image IOD: General Series Modality "CT"; Segmentation IOD: "SEG" (PS3.3 C.8.20.1).
STORAGE_CLASSES = {
    CTImageStorage: StorageClass(CTImageStorage, "ct", "CT"),
    SegmentationStorage: StorageClass(SegmentationStorage, "seg", "SEG"),
    # RT Structure Set IOD: RT Series Modality "RTSTRUCT" (PS3.3 C.8.8.1); the tumour contours instead of a SEG.
    RTStructureSetStorage: StorageClass(RTStructureSetStorage, "rtstruct", "RTSTRUCT"),
}

#: Uncompressed syntaxes first.  As acceptor, pynetdicom 3 picks the first
#: syntax of *this* list that the caller also proposed, so the order is our
#: preference: a caller offering both gets uncompressed.
CANDIDATE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, but pydicom reads it and old modalities still send it
    RLELossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    # Lossy: decodable, so accepted; a PACS that only holds the lossy copy can
    # still send it.  Whether a lossy CT may be scored is the scoring core's call
    # (LossyImageCompression is kept in the stored file).
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)


def decodable_transfer_syntaxes() -> tuple[UID, ...]:
    """The candidate syntaxes whose pixel data pydicom can decode with the installed plugins.

    The scoring core reads pixels through pydicom (``dicom_io.ct_series``,
    highdicom for the SEG), so "decodable here" is exactly "scoreable".  A
    missing plugin (e.g. no pylibjpeg-openjpeg) drops its syntaxes from
    negotiation instead of accepting files that would fail later.
    """
    return tuple(uid for uid in CANDIDATE_TRANSFER_SYNTAXES if get_decoder(uid).is_available)


# --- errors the handler maps to statuses ---------------------------------------------


class UnreadableInstance(NodeError, InputError):
    """The received data set cannot be parsed, or is truncated or structurally corrupt."""


class SopClassMismatch(NodeError, InputError):
    """The data set is not what its presentation context / C-STORE request says it is."""


def status_for_error(exc: BaseException) -> int:
    """The C-STORE status answering ``exc``; the one place errors become statuses."""
    if isinstance(exc, SopClassMismatch):
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, NotPart10):
        return STATUS_PROCESSING_FAILURE  # we built those bytes: a bug here, not the sender's fault
    if isinstance(exc, (UnreadableInstance, UnsafeUid)):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, NodeError) and exc.retryable:  # SpoolFull, SpoolBusy, SpoolIOError
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


# --- reading what arrived -------------------------------------------------------------

_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_received_dataset(encoded: bytes) -> Dataset:
    """Parse a received Part-10 byte string far enough to trust it; raise `UnreadableInstance`.

    pydicom is lenient: a data set cut short, or with bytes appended, still
    "reads".  So, after parsing (values stay raw bytes, nothing is converted):

    * every top-level element must hold the number of bytes its length field
      declares (a truncated value, or garbage read as an element, does not);
    * Pixel Data must be present (CT and SEG are images; pydicom silently
      drops an encapsulated Pixel Data whose sequence delimiter never came);
      an RT Structure Set has none, so it must instead hold the Structure Set
      ROI and ROI Contour sequences, with at least one item each;
    * native Pixel Data must be at least Rows × Columns × Samples × Bits × Frames
      long, and encapsulated Pixel Data must split into items.
    """
    try:
        dataset = pydicom.dcmread(BytesIO(encoded))
    except Exception as exc:  # noqa: BLE001 - pydicom raises anything from struct.error to KeyError
        raise UnreadableInstance(f"data set cannot be parsed ({type(exc).__name__})") from exc
    for element in dataset.elements():
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        received = len(element.value or b"")
        if received != element.length:
            raise UnreadableInstance(
                f"element {element.tag} declares {element.length} bytes but {received} arrived "
                "(truncated data set or trailing garbage)"
            )
    if dataset.get("SOPClassUID") == RTStructureSetStorage:
        _check_structure_set(dataset)
    else:
        _check_pixel_data(dataset)
    return dataset


def _check_structure_set(dataset: Dataset) -> None:
    for keyword in ("StructureSetROISequence", "ROIContourSequence"):
        try:
            items = dataset.get(keyword)
        except Exception as exc:  # noqa: BLE001 - a cut-off sequence fails on access
            raise UnreadableInstance(f"{keyword} cannot be parsed ({type(exc).__name__})") from exc
        if not items:
            raise UnreadableInstance(f"RT Structure Set without {keyword} items (truncated data set?)")


def _check_pixel_data(dataset: Dataset) -> None:
    raw = dataset.get_item("PixelData")
    if raw is None:
        raise UnreadableInstance("no Pixel Data (truncated data set?)")
    value = raw.value or b""
    transfer_syntax = UID(dataset.file_meta.TransferSyntaxUID)
    if transfer_syntax.is_encapsulated:
        try:
            buffer = BytesIO(value)
            parse_basic_offsets(buffer)
            fragments = sum(1 for _ in generate_fragments(buffer))
        except Exception as exc:  # noqa: BLE001 - malformed item tags or lengths
            raise UnreadableInstance(f"encapsulated Pixel Data is malformed ({type(exc).__name__})") from exc
        if fragments == 0:
            raise UnreadableInstance("encapsulated Pixel Data holds no fragments")
        return
    try:
        expected = get_expected_length(dataset, "bytes")
    except Exception as exc:  # noqa: BLE001 - missing/invalid Rows, Columns, BitsAllocated...
        raise UnreadableInstance(f"image pixel attributes are missing or invalid ({type(exc).__name__})") from exc
    if len(value) < expected:
        raise UnreadableInstance(f"Pixel Data is {len(value)} bytes, {expected} expected (truncated)")


def header_of(dataset: Dataset) -> InstanceHeader:
    """`InstanceHeader.from_dataset`, with decoding failures turned into `UnreadableInstance`.

    Values are converted here for the first time, so a corrupt value (say, in a
    SEG's reference sequences) surfaces now.  Only the exception type is kept:
    pydicom's messages may quote element values, which may be PHI.
    """
    try:
        return InstanceHeader.from_dataset(dataset)
    except UnsafeUid:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UnreadableInstance(f"header attributes cannot be decoded ({type(exc).__name__})") from exc


def check_matches_request(header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Raise `SopClassMismatch` unless the data set is the object the C-STORE request names."""
    storage_class = STORAGE_CLASSES.get(UID(sop_class_uid))
    if header.sop_class_uid != sop_class_uid:
        raise SopClassMismatch(
            f"data set SOP class {header.sop_class_uid or '(none)'} sent as {UID(sop_class_uid).name}"
        )
    if header.sop_instance_uid != str(sop_instance_uid).strip().rstrip("\0"):
        raise SopClassMismatch(
            f"data set SOP instance {header.sop_instance_uid} sent as {sop_instance_uid}"
        )
    if storage_class is not None and header.modality != storage_class.modality:
        raise SopClassMismatch(
            f"Modality {header.modality or '(none)'} in {storage_class.uid.name} "
            f"(the IOD requires {storage_class.modality})"
        )


# --- per-association bookkeeping ------------------------------------------------------


@dataclass(slots=True)
class _AssociationInfo:
    assoc_id: str
    calling_ae_title: str
    address: str
    outcomes: Counter = field(default_factory=Counter)


class AssociationRegistry:
    """Gives each association a short id for log lines and counts its C-STORE outcomes.

    Keyed weakly on pynetdicom's Association, so nothing outlives it.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._infos: weakref.WeakKeyDictionary[Any, _AssociationInfo] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def info(self, assoc: Any) -> _AssociationInfo:
        with self._lock:
            info = self._infos.get(assoc)
            if info is None:
                info = _AssociationInfo(
                    assoc_id=f"a{next(self._ids)}",
                    calling_ae_title=_calling_ae(assoc),
                    address=str(assoc.requestor.address or ""),
                )
                self._infos[assoc] = info
            return info


def _peer_fields(info: _AssociationInfo) -> dict[str, str]:
    return {"assoc_id": info.assoc_id, "calling_ae": info.calling_ae_title, "peer_ip": info.address}


# --- event handlers -------------------------------------------------------------------


def _emit(log: Any, level: str, event: str, **fields: Any) -> None:
    """Log from inside a handler; a failing log sink must not change a status or admit a caller."""
    try:
        getattr(log, level)(event, **fields)
    except Exception:  # noqa: BLE001 - e.g. stdout closed or a broken pipe to journald
        pass



def handle_requested(event: evt.Event, config: ScpConfig, registry: AssociationRegistry, log: Any) -> None:
    """EVT_REQUESTED: reject callers that match no allow-list rule (AE title + source IP).

    Fails closed: an error while checking rejects, and an error while
    rejecting aborts, since pynetdicom goes on to accept whenever this
    notification handler neither rejected nor aborted.
    """
    assoc = event.assoc
    try:
        info = registry.info(assoc)
        if config.caller_allowed(info.calling_ae_title, info.address):
            return
        _emit(
            log,
            "warning",
            "association_rejected",
            called_ae=_called_ae(assoc),
            reason="calling AE title and source address match no allowed_callers rule",
            result="permanent",
            **_peer_fields(info),
        )
    except Exception:  # noqa: BLE001
        _emit(log, "exception", "association_rejected", reason="caller check failed", result="permanent")
    try:
        assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED)
    except Exception:  # noqa: BLE001
        _emit(log, "exception", "association_reject_failed_aborting")
        assoc.abort()
        return
    # As pynetdicom does after its own rejections.  kill() waits until the DUL
    # thread has sent the A-ASSOCIATE-RJ and the peer has closed (bounded by
    # the 30 s ARTIM timer), then stops that thread.  Without it the reactor
    # closes the socket at once and the caller sees a dropped connection
    # instead of the rejection.
    assoc.kill()


def handle_rejected(event: evt.Event, registry: AssociationRegistry, log: Any) -> None:
    """EVT_REJECTED: log pynetdicom's own rejections (called AE title, association limit)."""
    assoc = event.assoc
    primitive = assoc.acceptor.primitive
    result = getattr(primitive, "result", None)
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    _emit(
        log,
        "warning",
        "association_rejected",
        called_ae=_called_ae(assoc),
        reason=_REJECT_REASONS.get((source, diagnostic), f"source {source}, diagnostic {diagnostic}"),
        result="transient" if result == REJECT_TRANSIENT else "permanent",
        **_peer_fields(registry.info(assoc)),
    )


def handle_accepted(event: evt.Event, registry: AssociationRegistry, log: Any) -> None:
    """EVT_ACCEPTED: log who is sending and which SOP classes we took."""
    assoc = event.assoc
    accepted = sorted({UID(cx.abstract_syntax).name for cx in assoc.accepted_contexts})
    refused = len(assoc.rejected_contexts)
    _emit(
        log,
        "info",
        "association_accepted",
        called_ae=_called_ae(assoc),
        accepted_sop_classes=accepted,
        refused_contexts=refused,
        **_peer_fields(registry.info(assoc)),
    )


def handle_closed(event: evt.Event, registry: AssociationRegistry, log: Any) -> None:
    """EVT_RELEASED / EVT_ABORTED: log how the association ended and what it brought."""
    info = registry.info(event.assoc)
    how = "released" if event.event == evt.EVT_RELEASED else "aborted"
    level = "info" if how == "released" else "warning"
    _emit(log, level, f"association_{how}", instances=dict(info.outcomes), **_peer_fields(info))


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: we are alive."""
    return STATUS_SUCCESS


def handle_store(
    event: evt.Event,
    spool: Spool,
    metrics: NodeMetrics | None,
    log: Any,
    registry: AssociationRegistry | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """EVT_C_STORE: store the instance durably as received, then answer; return the DIMSE status.

    Never raises: every failure is logged (UIDs and reasons, no PHI) and
    answered with its status (`status_for_error`).
    """
    request = event.request
    sop_class_uid = str(event.context.abstract_syntax)
    storage_class = STORAGE_CLASSES.get(UID(sop_class_uid))
    label = storage_class.metrics_label if storage_class else "other"
    info = registry.info(event.assoc) if registry is not None else None
    bound = log.bind(
        sop_uid=str(request.AffectedSOPInstanceUID or ""),
        sop_class=UID(sop_class_uid).name,
        transfer_syntax=UID(event.context.transfer_syntax).name,
        **(_peer_fields(info) if info else {}),
    )
    try:
        encoded = event.encoded_dataset()
        header = header_of(read_received_dataset(encoded))
        bound = bound.bind(study_uid=header.study_instance_uid, series_uid=header.series_instance_uid)
        check_matches_request(header, sop_class_uid, str(request.AffectedSOPInstanceUID or ""))
        outcome = spool.store_instance(encoded, header, now=clock())
    except Exception as exc:  # noqa: BLE001 - the boundary: every exception becomes a status
        status = status_for_error(exc)
        fields = dict(status=f"0x{status:04X}", error_type=type(exc).__name__)
        if status == STATUS_PROCESSING_FAILURE:
            _emit(bound, "exception", "instance_failed", **fields)
        else:
            _emit(bound, "warning", "instance_refused", reason=str(exc), **fields)
        _count(metrics, info, label, "rejected")
        return status
    counted = "stored" if outcome is StoreOutcome.STORED else "duplicate"
    _count(metrics, info, label, counted)
    _emit(bound, "debug", "instance_received", outcome=str(outcome), size_bytes=len(encoded))
    return STATUS_SUCCESS


def _count(metrics: NodeMetrics | None, info: _AssociationInfo | None, label: str, outcome: str) -> None:
    if info is not None:
        info.outcomes[outcome] += 1
    if metrics is not None:
        metrics.instance_received(label, outcome)


def _called_ae(assoc: Any) -> str:
    return str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()


def _calling_ae(assoc: Any) -> str:
    """The Calling AE title of the A-ASSOCIATE-RQ (pynetdicom copies it to the requestor only later)."""
    return str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()


# --- the receiver ---------------------------------------------------------------------


class DicomReceiver:
    """The node's storage SCP.  `start()` listens in background threads; `stop()` ends it.

    ``port`` is the bound port once started (so a config port of 0, "any free
    port", is usable in tests).
    """

    def __init__(
        self,
        config: ScpConfig,
        spool: Spool,
        metrics: NodeMetrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        log: Any = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.clock = clock
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self._log = log if log is not None else get_logger(stage="scp")
        self._registry = AssociationRegistry()
        self._ae: AE | None = None
        self._server: Any = None

    def build_ae(self) -> AE:
        """The configured pynetdicom AE (not listening yet)."""
        config = self.config
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.maximum_pdu_size = config.max_pdu_bytes
        ae.acse_timeout = config.acse_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        ae.network_timeout = config.network_timeout_s
        ae.require_called_aet = config.check_called_ae
        ae.require_calling_aet = []  # the allow-list pairs AE title with IP: handle_requested
        ae.add_supported_context(Verification)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, list(self.transfer_syntaxes))
        return ae

    def event_handlers(self) -> list[tuple]:
        registry, log = self._registry, self._log
        return [
            (evt.EVT_REQUESTED, handle_requested, [self.config, registry, log]),
            (evt.EVT_REJECTED, handle_rejected, [registry, log]),
            (evt.EVT_ACCEPTED, handle_accepted, [registry, log]),
            (evt.EVT_RELEASED, handle_closed, [registry, log]),
            (evt.EVT_ABORTED, handle_closed, [registry, log]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.spool, self.metrics, log, registry, self.clock]),
        ]

    def start(self) -> None:
        """Listen on ``bind_address:port``; a port that cannot be bound raises `ConfigError`."""
        if self._server is not None:
            return
        config = self.config
        ae = self.build_ae()
        ssl_context = config.tls.server_context() if config.tls.enabled else None
        try:
            server = ae.start_server(
                (config.bind_address, config.port),
                block=False,
                ssl_context=ssl_context,
                evt_handlers=self.event_handlers(),
            )
        except OSError as exc:
            where = f"{config.bind_address}:{config.port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError([f"scp.port: {where} is already in use"]) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError([f"scp.bind_address: {config.bind_address} is not an address of this machine"]) from None
            raise ConfigError([f"scp.port: cannot listen on {where}: {exc.strerror or exc}"]) from None
        self._ae, self._server = ae, server
        _emit(
            self._log,
            "info",
            "scp_listening",
            ae_title=config.ae_title,
            address=self.host,
            port=self.port,
            tls=ssl_context is not None,
            transfer_syntaxes=len(self.transfer_syntaxes),
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; give running associations ``grace_s`` to finish, then abort them.

        An instance whose C-STORE was cut off was either committed (the sender
        re-sends it: a duplicate, acknowledged again) or not stored at all.
        """
        server, ae = self._server, self._ae
        if server is None or ae is None:
            return
        self._server = self._ae = None
        server.shutdown()  # closes the listening socket; running associations go on
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=max(1.0, grace_s))
        _emit(self._log, "info", "scp_stopped", aborted_associations=len(remaining))

    @property
    def running(self) -> bool:
        server = self._server
        return server is not None and server.socket.fileno() != -1

    @property
    def active_associations(self) -> int:
        """Associations currently open (accepted, or still being negotiated or rejected)."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    @property
    def host(self) -> str:
        return self._server.server_address[0] if self._server is not None else self.config.bind_address

    @property
    def port(self) -> int:
        """The bound port while running, else the configured one."""
        return self._server.server_address[1] if self._server is not None else self.config.port

    def __enter__(self) -> "DicomReceiver":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
