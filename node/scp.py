"""The storage SCP: receives the chest CT series and the tumour SEG from the PACS.

`DicomReceiver` wraps one pynetdicom ``AE``.  It accepts

* Verification (C-ECHO), and
* C-STORE for CT Image Storage and Segmentation Storage only, in every transfer
  syntax the scoring core can decode (`decodable_transfer_syntaxes`).  Any
  other SOP class gets no presentation context (DCMTK's ``storescu`` sending
  MR Image Storage reports "No Acceptable Presentation Contexts").

Who may connect.  Before an A-ASSOCIATE-RQ has been read a connection is
unauthenticated: `GatedAssociationServer` (pynetdicom's ``make_server`` hook)
closes it at TCP accept unless its source IP matches an ``allowed_callers``
host and is within its budget of pending connections, and gives it
``preassociation_timeout_s`` to deliver the request (`ConnectionGate`, see
the section "admission before the A-ASSOCIATE-RQ").  Such connections never
count against ``max_associations``; refusals are logged as ``peer_refused``,
rate-limited.

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
* ``max_associations`` admitted associations are already running
  (`ConnectionGate.admit`: transient, "local limit exceeded").

Every acceptance and rejection is logged with the calling AE title, the IP and
the reason (neither is PHI).

Receiving.  `handle_store` keeps the instance exactly as it arrived (the
encoded data set from the wire behind a file meta header written by
pynetdicom); it parses it only to check that it is whole and to read the
header fields the spool indexes, then hands the bytes to `StudyMachine.store_instance`,
which fsyncs, renames and commits before it returns.  Only then is success
answered.  Each failure has its own status (`STATUS_*`, see `status_for_error`).
Resource limits come first (`InstanceLimits`): a deflated data set is inflated
against a cap before pydicom inflates it whole, and the decoded pixel size the
header announces is bounded; beyond either, 0xA700.

Handlers get their dependencies through pynetdicom's binding
(``(evt.EVT_C_STORE, handle_store, [machine, metrics, log, registry, clock, limits])``), never from
module globals.  This module and ``outbox.py`` are the only importers of
pynetdicom.
"""

from __future__ import annotations

import errno
import itertools
import select
import socket
import ssl
import threading
import time
import weakref
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
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
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom makes these names at import
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from sclc_risk_node.node.audit import dicom_peer
from sclc_risk_node.node.config import ConfigError, ScpConfig
from sclc_risk_node.node.config import client_address as normalised_ip
from sclc_risk_node.node.errors import NodeError, NotPart10, UnsafeUid
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.metrics import NodeMetrics
from sclc_risk_node.node.records import InstanceHeader, StoreOutcome
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.study_machine import StudyMachine
from sclc_risk_node.scoring.errors import InputError

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

_REJECT_REASONS: dict[tuple[int | None, int | None], str] = {
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


class InstanceTooLarge(NodeError, InputError):
    """The instance would exceed a resource limit (`InstanceLimits`) once inflated or decoded.

    Not retryable: the same instance stays too large until the site raises the limit.
    """


def status_for_error(exc: BaseException) -> int:
    """The C-STORE status answering ``exc``; the one place errors become statuses."""
    if isinstance(exc, SopClassMismatch):
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InstanceTooLarge):
        return STATUS_OUT_OF_RESOURCES
    if isinstance(exc, NotPart10):
        return STATUS_PROCESSING_FAILURE  # we built those bytes: a bug here, not the sender's fault
    if isinstance(exc, (UnreadableInstance, UnsafeUid)):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, NodeError) and exc.retryable:  # SpoolFull, SpoolBusy, SpoolIOError
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


# --- reading what arrived -------------------------------------------------------------

_UNDEFINED_LENGTH = 0xFFFFFFFF
#: Inflate in steps of this many output bytes, so a deflate bomb never holds more than one step.
_INFLATE_STEP_BYTES = 1 << 20
_INFLATE_INPUT_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class InstanceLimits:
    """Per-instance resource limits (`ScpConfig.max_decoded_bytes`, ``max_inflated_bytes``)."""

    max_decoded_bytes: int = 256 * 2**20
    max_inflated_bytes: int = 32 * 2**20

    @classmethod
    def from_config(cls, config: ScpConfig) -> InstanceLimits:
        return cls(max_decoded_bytes=config.max_decoded_bytes, max_inflated_bytes=config.max_inflated_bytes)


def check_inflated_size(deflated: bytes | memoryview, max_inflated_bytes: int) -> int:
    """The inflated size of a raw deflate stream (PS3.5 A.5), inflated step by step and discarded.

    Raises `InstanceTooLarge` as soon as the output passes ``max_inflated_bytes``
    (so memory stays at one step however far the stream would inflate), and
    `UnreadableInstance` for a corrupt or truncated stream or bytes after its end.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(deflated)
    total = 0
    fed = 0  # input bytes handed to the inflater
    try:
        while fed < len(view) and not inflater.eof:
            pending: bytes | memoryview = view[fed : fed + _INFLATE_INPUT_BYTES]
            fed += len(pending)
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, _INFLATE_STEP_BYTES))
                if total > max_inflated_bytes:
                    raise InstanceTooLarge(
                        f"deflated data set inflates to more than {max_inflated_bytes} bytes "
                        f"(scp.max_inflated_bytes; {len(view)} bytes received)"
                    )
                pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise UnreadableInstance(f"deflated data set is corrupt ({exc})") from exc
    if not inflater.eof:
        raise UnreadableInstance("deflated data set is truncated (the deflate stream does not end)")
    trailing = bytes(inflater.unused_data[:2]) + bytes(view[fed : fed + 2])
    if trailing not in (b"", b"\0"):  # PS3.5 A.5: one null byte may pad the stream to even length
        raise UnreadableInstance("bytes follow the end of the deflated data set")
    return total


def decoded_pixel_bytes(dataset: Dataset) -> int:
    """Bytes of the decoded pixel array: Rows × Columns × frames × samples × ⌈BitsAllocated / 8⌉.

    1-bit (binary SEG) frames count one byte per pixel: highdicom and the
    scoring core unpack them to uint8.  Raises `UnreadableInstance` when an
    attribute is missing or not a number.
    """
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        samples = int(dataset.get("SamplesPerPixel") or 1)
        bits = int(dataset.BitsAllocated)
    except Exception as exc:  # noqa: BLE001 - missing, empty, or not a number
        raise UnreadableInstance(f"image pixel attributes are missing or invalid ({type(exc).__name__})") from exc
    if min(rows, columns, frames, samples, bits) < 1:
        raise UnreadableInstance(
            f"image pixel attributes out of range ({rows} rows, {columns} columns, {frames} frames, "
            f"{samples} samples, {bits} bits allocated)"
        )
    return rows * columns * frames * samples * ((bits + 7) // 8)


def _split_part10(encoded: bytes) -> tuple[UID, int]:
    """The transfer syntax and the offset of the data set in Part-10 bytes (file meta written by pynetdicom)."""
    buffer = BytesIO(encoded)
    try:
        read_preamble(buffer, False)
        # pydicom has no public reader for a file meta group from a buffer.
        meta = _read_file_meta_info(buffer)
        return UID(meta.TransferSyntaxUID), buffer.tell()
    except Exception as exc:  # noqa: BLE001 - our own meta header, so only a bug gets here
        raise UnreadableInstance(f"file meta information cannot be parsed ({type(exc).__name__})") from exc


def read_received_dataset(encoded: bytes, limits: InstanceLimits = InstanceLimits()) -> Dataset:
    """Parse a received Part-10 byte string far enough to trust it; raise `UnreadableInstance`.

    Resource limits first (`InstanceTooLarge`): a Deflated Explicit VR Little
    Endian data set is inflated with the ``limits.max_inflated_bytes`` cap before
    pydicom inflates it whole, and the decoded pixel size the header announces
    (`decoded_pixel_bytes`) must stay within ``limits.max_decoded_bytes``, so a
    small compressed instance cannot make the scoring workers allocate gigabytes.

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
    transfer_syntax, offset = _split_part10(encoded)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        check_inflated_size(memoryview(encoded)[offset:], limits.max_inflated_bytes)
    try:
        dataset = pydicom.dcmread(BytesIO(encoded))
    except Exception as exc:  # noqa: BLE001 - pydicom raises anything from struct.error to KeyError
        raise UnreadableInstance(f"data set cannot be parsed ({type(exc).__name__})") from exc
    if "PixelData" in dataset:  # its absence is reported below, after the length checks
        decoded = decoded_pixel_bytes(dataset)
        if decoded > limits.max_decoded_bytes:
            raise InstanceTooLarge(
                f"decoded pixel data would be {decoded} bytes ({dataset.Rows} rows × {dataset.Columns} columns × "
                f"{dataset.get('NumberOfFrames') or 1} frames), above scp.max_decoded_bytes ({limits.max_decoded_bytes})"
            )
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
        raise SopClassMismatch(f"data set SOP instance {header.sop_instance_uid} sent as {sop_instance_uid}")
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
    #: An A-ASSOCIATE-RQ arrived (EVT_REQUESTED ran).  Connections that end
    #: before that are logged by the `ConnectionGate`, rate-limited, not here.
    requested: bool = False


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


# --- admission before the A-ASSOCIATE-RQ ----------------------------------------------
#
# pynetdicom starts an acceptor thread per TCP connection and counts every live
# one against ``maximum_associations``, and it waits ``acse_timeout`` for the
# A-ASSOCIATE-RQ even after the peer has closed.  So a dozen connections that
# send nothing locked the PACS out for 30 s, with no log line.  Here, instead:
#
# * at TCP accept (`GatedAssociationServer.verify_request`, in the accepting
#   thread, before any thread or association exists) the source IP must match
#   an `allowed_callers` host, and the address must be within its budget of
#   pending connections (``preassociation_per_ip``, ``preassociation_total``);
# * a pending connection then has ``preassociation_timeout_s`` for the TLS
#   handshake and a complete A-ASSOCIATE-RQ (`GatedRequestHandler`); a peer that
#   connects and closes, or sends something else, is dropped without an
#   association;
# * only an A-ASSOCIATE-RQ that passes the allow-list (AE title + IP) is
#   admitted and counted against ``max_associations`` (`ConnectionGate.admit`).
#
# Every refusal before the A-ASSOCIATE-RQ is logged as ``peer_refused``
# (address and reason only), rate-limited per (address, reason).

#: PS3.8 9.3.1: the first byte of every PDU is its type; 0x01 is A-ASSOCIATE-RQ.
PDU_TYPE_A_ASSOCIATE_RQ = 0x01
#: Largest PDU read before the caller is admitted.  An A-ASSOCIATE-RQ proposing
#: all 128 presentation contexts with 20 transfer syntaxes each is under 200 KiB.
MAX_PREASSOCIATION_PDU_BYTES = 2**20
#: Slack over the Maximum Length we announce (PS3.8 D.1), for senders that count it loosely.
PDU_LENGTH_SLACK_BYTES = 1024
#: An encoded instance may exceed its decoded pixel data by its other attributes
#: (a SEG's per-frame functional groups are about 1 KiB a frame).
MESSAGE_HEADER_ALLOWANCE_BYTES = 16 * 2**20

REFUSED_ADDRESS = "source address matches no allowed_callers host"
REFUSED_PER_IP = "too many connections from this address awaiting association (scp.preassociation_per_ip)"
REFUSED_TOTAL = "too many connections awaiting association (scp.preassociation_total)"
REFUSED_TIMEOUT = "no A-ASSOCIATE-RQ within scp.preassociation_timeout_s"
REFUSED_NOT_ASSOCIATE_RQ = "first PDU is not an A-ASSOCIATE-RQ"
REFUSED_NO_VALID_REQUEST = "connection ended without a valid A-ASSOCIATE-RQ"
REFUSED_TLS = "TLS handshake failed"
REFUSED_PDU_TOO_LARGE = "PDU longer than the node accepts"
REFUSED_MESSAGE_TOO_LARGE = "DIMSE message longer than scp.max_decoded_bytes allows"
REFUSED_INTERNAL = "connection check failed"


class RefusalLog:
    """``peer_refused`` warnings: at most one per (address, reason) per ``interval_s``.

    The next line after a quiet spell carries ``suppressed``, the refusals of
    that kind not logged since the previous line.  At most ``max_keys`` kinds
    are remembered (least recently refused forgotten first), so a flood from
    many addresses costs bounded memory.
    """

    def __init__(
        self, log: Any, interval_s: float, *, max_keys: int = 1024, clock: Callable[[], float] = time.monotonic
    ):
        self._log = log
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._last: OrderedDict[tuple[str, str], list] = OrderedDict()  # key -> [logged_at, suppressed]

    def refused(self, peer_ip: str, reason: str) -> None:
        now = self._clock()
        key = (peer_ip, reason)
        with self._lock:
            entry = self._last.get(key)
            if entry is not None and now - entry[0] < self._interval_s:
                entry[1] += 1
                return
            suppressed = entry[1] if entry is not None else 0
            self._last[key] = [now, 0]
            self._last.move_to_end(key)
            while len(self._last) > self._max_keys:
                self._last.popitem(last=False)
        _emit(self._log, "warning", "peer_refused", peer_ip=peer_ip, reason=reason, suppressed=suppressed)


class PendingSlot:
    """One connection's place in the pre-association budget, released exactly once."""

    __slots__ = ("peer_ip", "released", "done")

    def __init__(self, peer_ip: str) -> None:
        self.peer_ip = peer_ip
        self.released = False
        self.done = threading.Event()


class ConnectionGate:
    """Budgets of pending connections per address and in total, and admission to ``max_associations``."""

    def __init__(self, config: ScpConfig, log: Any) -> None:
        self.config = config
        self.refusals = RefusalLog(log, config.refused_log_interval_s)
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._pending_total = 0
        self._slots: weakref.WeakKeyDictionary[Any, PendingSlot] = weakref.WeakKeyDictionary()
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()

    @staticmethod
    def peer_ip(address: Any) -> str:
        try:
            return str(normalised_ip(str(address)))
        except ValueError:
            return str(address)

    def open(self, address: Any) -> PendingSlot | None:
        """At TCP accept: a pending slot for a connection from ``address``, or None (refused and logged)."""
        peer_ip = self.peer_ip(address)
        reason = None
        if not self.config.address_allowed(peer_ip):
            reason = REFUSED_ADDRESS
        else:
            with self._lock:
                if self._pending[peer_ip] >= self.config.preassociation_per_ip:
                    reason = REFUSED_PER_IP
                elif self._pending_total >= self.config.preassociation_total:
                    reason = REFUSED_TOTAL
                else:
                    self._pending[peer_ip] += 1
                    self._pending_total += 1
                    return PendingSlot(peer_ip)
        self.refusals.refused(peer_ip, reason)
        return None

    def release(self, slot: PendingSlot) -> None:
        with self._lock:
            if slot.released:
                return
            slot.released = True
            self._pending[slot.peer_ip] -= 1
            if self._pending[slot.peer_ip] <= 0:
                del self._pending[slot.peer_ip]
            self._pending_total -= 1
        slot.done.set()

    def attach(self, assoc: Any, slot: PendingSlot) -> None:
        with self._lock:
            self._slots[assoc] = slot

    def requested(self, assoc: Any) -> None:
        """EVT_REQUESTED: the A-ASSOCIATE-RQ arrived, so the connection is no longer pending."""
        with self._lock:
            slot = self._slots.pop(assoc, None)
        if slot is not None:
            self.release(slot)

    def admit(self, assoc: Any) -> bool:
        """Count ``assoc`` against ``max_associations`` if there is room (allowed callers only)."""
        with self._lock:
            running = sum(1 for admitted in self._admitted if admitted.is_alive())
            if running >= self.config.max_associations:
                return False
            self._admitted.add(assoc)
            return True

    @property
    def pending(self) -> int:
        """Connections accepted that have not yet delivered their A-ASSOCIATE-RQ."""
        with self._lock:
            return self._pending_total


class GatedRequestHandler(RequestHandler):
    """pynetdicom's request handler, run only for a connection that got a `PendingSlot`.

    Runs in the connection's own thread: waits (bounded by
    ``preassociation_timeout_s``) for the TLS handshake and the first byte of
    an A-ASSOCIATE-RQ before creating the pynetdicom Association, then holds
    the slot until EVT_REQUESTED (or the association's end) releases it.
    """

    server: GatedAssociationServer

    def handle(self) -> None:
        server = self.server
        gate = server.gate
        slot = server.take_slot(self.request)
        if slot is None:
            server.shutdown_request(self.request)
            return
        config = gate.config
        deadline = time.monotonic() + config.preassociation_timeout_s
        try:
            connection = self._open_transport(slot, deadline)
            if connection is None:
                return
            self.request = connection
            assoc = self._create_association()
            _bound_pdu_length(assoc, gate, slot.peer_ip)
            # Bounds the wait for the rest of the A-ASSOCIATE-RQ (and the ARTIM
            # timer); handle_requested restores the configured timeouts.
            assoc.acse_timeout = max(0.1, deadline - time.monotonic())
            gate.attach(assoc, slot)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            _hold_until_requested(assoc, slot)
            if not slot.done.is_set():
                gate.refusals.refused(slot.peer_ip, REFUSED_NO_VALID_REQUEST)
        except Exception:  # noqa: BLE001 - never leave a socket or a slot behind
            gate.refusals.refused(slot.peer_ip, REFUSED_INTERNAL)
            server.shutdown_request(self.request)
        finally:
            gate.release(slot)

    def _open_transport(self, slot: PendingSlot, deadline: float) -> socket.socket | None:
        """The connection ready for pynetdicom (TLS done, an A-ASSOCIATE-RQ on its way), or None (closed)."""
        server, gate = self.server, self.server.gate
        raw: socket.socket = self.request
        connection: socket.socket = raw
        try:
            raw.settimeout(max(0.1, deadline - time.monotonic()))
            if server.ssl_context is not None:
                connection = server.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                try:
                    connection.do_handshake()
                except (ssl.SSLError, OSError):
                    gate.refusals.refused(slot.peer_ip, REFUSED_TLS)
                    server.shutdown_request(connection)
                    return None
                ready = connection.pending() > 0 or _readable(connection, deadline)
            else:
                ready = _readable(raw, deadline)
            if not ready:
                gate.refusals.refused(slot.peer_ip, REFUSED_TIMEOUT)
                server.shutdown_request(connection)
                return None
            if server.ssl_context is None:
                first = raw.recv(1, socket.MSG_PEEK)
                if not first:  # connected and left (a port probe): nothing to refuse
                    server.shutdown_request(raw)
                    return None
                if first[0] != PDU_TYPE_A_ASSOCIATE_RQ:
                    gate.refusals.refused(slot.peer_ip, REFUSED_NOT_ASSOCIATE_RQ)
                    server.shutdown_request(raw)
                    return None
            # pynetdicom reads a PDU with blocking recv() until its declared
            # length has arrived; without a timeout a peer that stalls inside a
            # PDU would hold its threads forever.  handle_requested lengthens
            # this to network_timeout_s once the caller is admitted.
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            return connection
        except OSError:
            server.shutdown_request(connection)
            return None


def _bound_pdu_length(assoc: Any, gate: ConnectionGate, peer_ip: str) -> None:
    """Refuse to read a PDU longer than the node accepts (pynetdicom reads any announced length).

    pynetdicom's DUL reads a PDU with one ``recv(length)`` for the length its
    header announces, up to 4 GiB, into memory, before anything checks it.
    Wrapping this association's socket ``recv`` lets such a request come back
    empty: the DUL then treats the PDU as cut short and closes the connection.
    The bound is `MAX_PREASSOCIATION_PDU_BYTES` until the caller is admitted,
    then ``max_pdu_bytes`` (our announced Maximum Length) plus slack, or no
    bound when that is 0 (unlimited).
    """
    transport = assoc.dul.socket
    read = transport.recv
    message_limit = max(gate.config.max_decoded_bytes, gate.config.max_inflated_bytes) + MESSAGE_HEADER_ALLOWANCE_BYTES
    assoc._sclc_message_bytes = 0

    def bounded_recv(nr_bytes: int) -> bytearray:
        limit = getattr(assoc, "_sclc_pdu_limit", MAX_PREASSOCIATION_PDU_BYTES)
        if limit and nr_bytes > limit:
            gate.refusals.refused(peer_ip, REFUSED_PDU_TOO_LARGE)
            return bytearray()
        # pynetdicom gathers a whole DIMSE message (command + data set) in
        # memory before any handler sees it; the handlers reset this count.
        assoc._sclc_message_bytes += nr_bytes
        if assoc._sclc_message_bytes > message_limit:
            gate.refusals.refused(peer_ip, REFUSED_MESSAGE_TOO_LARGE)
            return bytearray()
        return read(nr_bytes)

    transport.recv = bounded_recv


def _message_handled(assoc: Any) -> None:
    """A DIMSE message has been received whole: the next one starts its own byte count."""
    if assoc is not None:
        assoc._sclc_message_bytes = 0


def _hold_until_requested(assoc: Any, slot: PendingSlot) -> None:
    """Wait until the A-ASSOCIATE-RQ arrived (slot released) or the association thread ended.

    A connection that closes before its A-ASSOCIATE-RQ is complete makes
    pynetdicom's DUL close its socket (AA-5, or AA-1/AA-2 after an invalid
    PDU) but leaves the acceptor waiting
    out its ACSE timeout; None in its queue is what that wait returns on a
    timeout, so it ends now and the slot is free for the next connection.
    """
    woken = False
    while assoc.is_alive() and not slot.done.wait(0.02):
        if not woken and _transport_closed(assoc):
            assoc.dul.to_user_queue.put(None)
            woken = True


def _transport_closed(assoc: Any) -> bool:
    """The connection is gone, or pynetdicom's DUL thread has ended (it does so on a PDU it cannot decode)."""
    dul = assoc.dul
    if dul.ident is not None and not dul.is_alive():
        return True
    transport = getattr(dul, "socket", None)
    if transport is None:
        return False  # not set up yet
    connection = transport.socket
    return connection is None or connection.fileno() == -1


def _readable(connection: socket.socket, deadline: float) -> bool:
    try:
        ready, _, _ = select.select([connection], [], [], max(0.0, deadline - time.monotonic()))
    except (OSError, ValueError):
        return False
    return bool(ready)


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the `ConnectionGate` at TCP accept (see the section comment)."""

    daemon_threads = True  # a pending connection must not delay interpreter exit

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        gate: ConnectionGate,
    ) -> None:
        self.gate = gate
        self._slots: dict[Any, PendingSlot] = {}
        self._slots_lock = threading.Lock()
        super().__init__(
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GatedRequestHandler
        )

    def get_request(self) -> tuple[socket.socket, Any]:
        # Accept only.  pynetdicom would do the TLS handshake here, in the one
        # accepting thread, where a peer that never completes it blocks every
        # other caller; GatedRequestHandler does it in the connection's thread.
        if self.socket is None:
            raise OSError("the listening socket is closed")  # socketserver skips the request
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook between accept() and the connection's thread: the allow-list and the budgets."""
        try:
            slot = self.gate.open(client_address[0])
        except Exception:  # noqa: BLE001 - fail closed
            self.gate.refusals.refused(str(client_address[0]), REFUSED_INTERNAL)
            return False
        if slot is None:
            return False
        with self._slots_lock:
            self._slots[request] = slot
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            slot = self.take_slot(request)
            if slot is not None:
                self.gate.release(slot)
            raise

    def take_slot(self, request: Any) -> PendingSlot | None:
        with self._slots_lock:
            return self._slots.pop(request, None)


# --- event handlers -------------------------------------------------------------------


def _emit(log: Any, level: str, event: str, **fields: Any) -> None:
    """Log from inside a handler; a failing log sink must not change a status or admit a caller."""
    try:
        getattr(log, level)(event, **fields)
    except Exception:  # noqa: BLE001 - e.g. stdout closed or a broken pipe to journald
        pass


def handle_requested(
    event: evt.Event,
    config: ScpConfig,
    registry: AssociationRegistry,
    log: Any,
    gate: ConnectionGate | None = None,
) -> None:
    """EVT_REQUESTED: admit allowed callers (AE title + source IP) while ``max_associations`` has room.

    A caller matching no allow-list rule gets a permanent rejection ("calling
    AE title not recognised"); an allowed one beyond ``max_associations`` a
    transient one ("local limit exceeded").  Only admitted associations count
    (`ConnectionGate.admit`): connections still negotiating never do.

    Fails closed: an error while checking rejects, and an error while
    rejecting aborts, since pynetdicom goes on to accept whenever this
    notification handler neither rejected nor aborted.
    """
    assoc = event.assoc
    rejection = (REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED)
    try:
        info = registry.info(assoc)
        info.requested = True
        if gate is not None:
            gate.requested(assoc)
        if not config.caller_allowed(info.calling_ae_title, info.address):
            reason, result = "calling AE title and source address match no allowed_callers rule", "permanent"
        elif gate is not None and not gate.admit(assoc):
            reason, result = "too many associations", "transient"
            rejection = (REJECT_TRANSIENT, REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION, REJECT_LOCAL_LIMIT_EXCEEDED)
        else:
            _restore_timeouts(assoc, config)
            return
        _emit(
            log,
            "warning",
            "association_rejected",
            called_ae=_called_ae(assoc),
            reason=reason,
            result=result,
            **_peer_fields(info),
        )
    except Exception:  # noqa: BLE001
        _emit(log, "exception", "association_rejected", reason="caller check failed", result="permanent")
    try:
        assoc.acse.send_reject(*rejection)
    except Exception:  # noqa: BLE001
        _emit(log, "exception", "association_reject_failed_aborting")
        assoc.abort()
        return
    # As pynetdicom does after its own rejections.  kill() waits until the DUL
    # thread has sent the A-ASSOCIATE-RJ and the peer has closed (bounded by
    # the ARTIM timer), then stops that thread.  Without it the reactor
    # closes the socket at once and the caller sees a dropped connection
    # instead of the rejection.
    assoc.kill()


def _restore_timeouts(assoc: Any, config: ScpConfig) -> None:
    """An admitted association leaves the short pre-association deadline for the configured timeouts."""
    assoc.acse_timeout = config.acse_timeout_s
    assoc._sclc_pdu_limit = config.max_pdu_bytes + PDU_LENGTH_SLACK_BYTES if config.max_pdu_bytes else 0
    connection = getattr(assoc.dul.socket, "socket", None)
    if connection is not None:
        connection.settimeout(config.network_timeout_s)


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
    accepted = sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.accepted_contexts})
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
    if not info.requested:
        return  # never sent an A-ASSOCIATE-RQ: the ConnectionGate logs it, rate-limited
    how = "released" if event.event == evt.EVT_RELEASED else "aborted"
    level = "info" if how == "released" else "warning"
    _emit(log, level, f"association_{how}", instances=dict(info.outcomes), **_peer_fields(info))


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO: we are alive."""
    _message_handled(event.assoc)
    return STATUS_SUCCESS


def handle_store(
    event: evt.Event,
    machine: StudyMachine,
    metrics: NodeMetrics | None,
    log: Any,
    registry: AssociationRegistry | None = None,
    clock: Callable[[], float] = time.time,
    limits: InstanceLimits = InstanceLimits(),
) -> int:
    """EVT_C_STORE: store the instance durably as received, then answer; return the DIMSE status.

    Never raises: every failure is logged (UIDs and reasons, no PHI) and
    answered with its status (`status_for_error`).
    """
    _message_handled(event.assoc)
    request = event.request
    # EVT_C_STORE always carries a C-STORE request; pynetdicom types it as any DIMSE message.
    affected_sop_uid = str(request.AffectedSOPInstanceUID or "") if isinstance(request, C_STORE) else ""
    sop_class_uid = str(event.context.abstract_syntax)
    storage_class = STORAGE_CLASSES.get(UID(sop_class_uid))
    label = storage_class.metrics_label if storage_class else "other"
    info = registry.info(event.assoc) if registry is not None else None
    bound = log.bind(
        sop_uid=affected_sop_uid,
        sop_class=UID(sop_class_uid).name,
        transfer_syntax=UID(event.context.transfer_syntax).name,
        **(_peer_fields(info) if info else {}),
    )
    try:
        encoded = event.encoded_dataset()
        header = header_of(read_received_dataset(encoded, limits))
        bound = bound.bind(study_uid=header.study_instance_uid, series_uid=header.series_instance_uid)
        check_matches_request(header, sop_class_uid, affected_sop_uid)
        source = dicom_peer(info.calling_ae_title, info.address) if info else None  # the audit trail's "who"
        outcome = machine.store_instance(encoded, header, now=clock(), source=source)
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
        # Receiving files each instance under its study: a lifecycle step, so it goes through the machine.
        self.machine = StudyMachine(spool)
        self.metrics = metrics
        self.clock = clock
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        self._log = log if log is not None else get_logger(stage="scp")
        self._registry = AssociationRegistry()
        self.gate = ConnectionGate(config, self._log)
        self.limits = InstanceLimits.from_config(config)
        self._ae: AE | None = None
        self._server: Any = None

    def build_ae(self) -> AE:
        """The configured pynetdicom AE (not listening yet)."""
        config = self.config
        ae = AE(ae_title=config.ae_title)
        # The ConnectionGate enforces max_associations on admitted callers only;
        # pynetdicom's own count includes connections still negotiating, so it
        # gets room for those too and never is the limit that bites.
        ae.maximum_associations = config.max_associations + config.preassociation_total
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
            (evt.EVT_REQUESTED, handle_requested, [self.config, registry, log, self.gate]),
            (evt.EVT_REJECTED, handle_rejected, [registry, log]),
            (evt.EVT_ACCEPTED, handle_accepted, [registry, log]),
            (evt.EVT_RELEASED, handle_closed, [registry, log]),
            (evt.EVT_ABORTED, handle_closed, [registry, log]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.machine, self.metrics, log, registry, self.clock, self.limits]),
        ]

    def start(self) -> None:
        """Listen on ``bind_address:port``; a port that cannot be bound raises `ConfigError`."""
        if self._server is not None:
            return
        config = self.config
        ae = self.build_ae()
        ssl_context = config.tls.server_context() if config.tls.enabled else None
        try:
            # ae.start_server(block=False) without its fixed server class: ours
            # puts the ConnectionGate at TCP accept (pynetdicom's make_server hook).
            server = ae.make_server(
                (config.bind_address, config.port),
                ssl_context=ssl_context,
                evt_handlers=self.event_handlers(),
                server_class=GatedAssociationServer,
                gate=self.gate,
            )
        except OSError as exc:
            where = f"{config.bind_address}:{config.port}"
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError([f"scp.port: {where} is already in use"]) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    [f"scp.bind_address: {config.bind_address} is not an address of this machine"]
                ) from None
            raise ConfigError([f"scp.port: cannot listen on {where}: {exc.strerror or exc}"]) from None
        threading.Thread(
            target=server.serve_forever, name=f"AcceptorServer@{self.port_of(server)}", daemon=True
        ).start()
        ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
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

    @staticmethod
    def port_of(server: Any) -> int:
        return int(server.server_address[1])

    @property
    def host(self) -> str:
        return self._server.server_address[0] if self._server is not None else self.config.bind_address

    @property
    def port(self) -> int:
        """The bound port while running, else the configured one."""
        return self._server.server_address[1] if self._server is not None else self.config.port

    def __enter__(self) -> DicomReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
