"""Sending the node's objects to the PACS: a C-STORE SCU (`send_sr`) and the retrying outbox (`Outbox`).

The objects of a scored study are the risk SR, the key-slice ROI SR, the Key
Object Selection, the Encapsulated PDF and the Secondary Capture
(`dicom_io.result_objects`); each destination takes the kinds its
``objects`` setting lists, and each (object, destination) pair is one row of
the outbox, delivered and recorded on its own.  Names here still say "SR"
(``send_sr``, ``sr_path``, log events ``sr_delivered``): they predate the
other objects and stay for compatibility; they mean "the object".

`send_sr` is one delivery attempt: associate with the destination (DICOM TLS
when configured), propose the object's own SOP class in explicit and implicit VR
little endian, C-STORE it, release.  It never raises for anything the network
or the peer does; the outcome comes back as a `DeliveryResult` whose
``error`` is one PHI-free line naming the destination, e.g.

    connection refused by PACS1 (127.0.0.1:4242)
    association rejected by PACS1 (127.0.0.1:4242): called AE title not recognised (permanent)
    PACS1 (127.0.0.1:4242) returned C-STORE status 0xA700 (refused: out of resources)

Only the SOP class the SR was built as is proposed.  Falling back to
Enhanced/Comprehensive SR would mean rewriting the SOP Class UID of an object
that already has its identity (and Comprehensive SR cannot hold SCOORD3D), so
a PACS that refuses Comprehensive 3D SR gets a clear failed attempt instead.

Which statuses deliver (PS3.4 B.2.3, PS3.7 C):

    0x0000 success                                   -> delivered
    0xB000 / 0xB006 / 0xB007, 0x0107, 0x0116 warning -> delivered, logged as a warning
    0xA7xx, 0xA9xx, 0xCxxx, 0x01xx/0x02xx failure    -> failed attempt, retried
    cancel / pending / unknown as the final status   -> failed attempt, retried
    no response (DIMSE timeout, abort)               -> failed attempt, retried

A warning status means the SCP *stored* the instance but coerced or
discarded elements (B000/B006) or found that it does not match the SOP class
(B007).  The object is in the archive under its UID, so re-sending would
change nothing: most senders treat it as success and so do we, with a
warning log line carrying the status so a site can follow it up.

`Outbox.run_once` takes the due rows (`Spool.due_deliveries`), claims each
just before sending it (`Spool.start_delivery` with a hold longer than the
longest possible attempt, so the claim of a sender killed mid-send expires
and the row becomes due again), sends, and records the outcome:
`StudyMachine.mark_delivered` (which moves the study to ``delivered`` once every
destination accepted) or `StudyMachine.mark_attempt_failed` with the backoff

    backoff_s = min(initial_backoff_s * 2**(attempts - 1) * (1 + jitter), max_backoff_s)

where ``attempts`` counts the attempt that just failed and ``jitter`` is
uniform in [0, jitter_fraction) from an injectable ``rng``.  After
``max_attempts`` (0 = never) the row is ``failed`` and the study ``failed``
with the destination and the last error as its reason; nothing is dropped:
the row keeps ``last_error`` and `resend_study` (``sclc-node retry``) puts it
back.  Once a destination could not be used in a run (connect failure,
rejection, SR class refused, timeout, abort) its other rows wait for the next
run instead of each spending a timeout now.

Exactly once, in practice.  A row is marked delivered in the same transaction
that records the PACS's success, and a delivered row is never due again: a
confirmed delivery is never re-sent automatically.  The one gap is a crash
(or a database error) between the PACS's success response and that commit:
the row stays ``sending``, its hold runs out, and the SR is sent again.  That
is harmless: the SR is the same file with the same SOP Instance UID
(deterministic UIDs, `dicom_io.sr_writer`), and a PACS de-duplicates by SOP
Instance UID (it keeps or overwrites the one instance; Orthanc, dcm4chee and
the usual archives do).  So the node sends *at least once* and the archive
holds the SR *exactly once*.

State lives only in SQLite (via `Spool`), so a restart resumes where the last
run stopped.  Only this module and ``node/scp.py`` import pynetdicom.
"""

from __future__ import annotations

import enum
import errno
import io
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.status import GENERAL_STATUS, code_to_category
from pynetdicom.status import STATUS_SUCCESS as CATEGORY_SUCCESS
from pynetdicom.status import STATUS_WARNING as CATEGORY_WARNING

from sclc_risk_node.node.errors import InvalidTransition, NodeError
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import OutboxItem, Transition
from sclc_risk_node.node.states import OutboxState, StudyEvent, StudyState
from sclc_risk_node.node.study_machine import StudyMachine

if TYPE_CHECKING:
    from sclc_risk_node.node.config import DestinationConfig, NodeConfig
    from sclc_risk_node.node.metrics import NodeMetrics
    from sclc_risk_node.node.spool import Spool

# --- DIMSE statuses (PS3.4 Table B.2-1, PS3.7 Annex C) -------------------------------

STATUS_STORED = 0x0000
STATUS_WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
STATUS_WARNING_ELEMENTS_DISCARDED = 0xB006
STATUS_WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
STATUS_WARNING_ATTRIBUTE_LIST_ERROR = 0x0107
STATUS_WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
STATUS_FAILURE_PROCESSING_FAILURE = 0x0110
STATUS_FAILURE_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_FAILURE_INVALID_OBJECT_INSTANCE = 0x0117
STATUS_FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_FAILURE_NOT_AUTHORISED = 0x0124
STATUS_FAILURE_DUPLICATE_INVOCATION = 0x0210
STATUS_FAILURE_UNRECOGNISED_OPERATION = 0x0211
STATUS_FAILURE_MISTYPED_ARGUMENT = 0x0212
STATUS_FAILURE_RESOURCE_LIMITATION = 0x0213
STATUS_CANCEL = 0xFE00
STATUS_PENDING = 0xFF00
STATUS_PENDING_WITH_WARNINGS = 0xFF01
#: Ranges: (first, last, text).  0xA7xx out of resources, 0xA9xx data set / SOP class mismatch, 0xCxxx cannot understand.
STATUS_FAILURE_RANGES = (
    (0xA700, 0xA7FF, "refused: out of resources"),
    (0xA900, 0xA9FF, "error: data set does not match SOP class"),
    (0xC000, 0xCFFF, "error: cannot understand"),
)

STATUS_TEXT = {
    STATUS_STORED: "success",
    STATUS_WARNING_COERCION_OF_DATA_ELEMENTS: "coercion of data elements",
    STATUS_WARNING_ELEMENTS_DISCARDED: "elements discarded",
    STATUS_WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "data set does not match SOP class",
    STATUS_WARNING_ATTRIBUTE_LIST_ERROR: "attribute list error",
    STATUS_WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE: "attribute value out of range",
    STATUS_FAILURE_PROCESSING_FAILURE: "processing failure",
    STATUS_FAILURE_DUPLICATE_SOP_INSTANCE: "duplicate SOP instance",
    STATUS_FAILURE_INVALID_OBJECT_INSTANCE: "invalid object instance",
    STATUS_FAILURE_SOP_CLASS_NOT_SUPPORTED: "refused: SOP class not supported",
    STATUS_FAILURE_NOT_AUTHORISED: "refused: not authorised",
    STATUS_FAILURE_DUPLICATE_INVOCATION: "duplicate invocation",
    STATUS_FAILURE_UNRECOGNISED_OPERATION: "unrecognised operation",
    STATUS_FAILURE_MISTYPED_ARGUMENT: "mistyped argument",
    STATUS_FAILURE_RESOURCE_LIMITATION: "resource limitation",
    STATUS_CANCEL: "cancelled",
    STATUS_PENDING: "pending",
    STATUS_PENDING_WITH_WARNINGS: "pending with warnings",
}


def describe_status(status: int) -> str:
    """``0xA700 (refused: out of resources)``: the code and the standard's name for it."""
    text = STATUS_TEXT.get(status)
    if text is None:
        text = next((t for first, last, t in STATUS_FAILURE_RANGES if first <= status <= last), None)
    if text is None:
        text = GENERAL_STATUS.get(status, ("", ""))[1].lower() or "unknown status"
    return f"0x{status:04X} ({text})"


# --- one attempt -------------------------------------------------------------------------


class DeliveryOutcome(enum.StrEnum):
    """How one C-STORE attempt ended."""

    STORED = "stored"
    """Status 0x0000."""
    STORED_WITH_WARNING = "stored_with_warning"
    """A warning status: the SCP stored the instance (with coercion or discarded elements)."""
    CONNECT_FAILED = "connect_failed"
    """No TCP (or TLS) connection: refused, unreachable, no answer, name not resolved, handshake failed."""
    REJECTED = "rejected"
    """A-ASSOCIATE-RJ (AE titles, busy, ...)."""
    NO_CONTEXT = "no_context"
    """Associated, but the SR's SOP class / transfer syntaxes were all refused."""
    TIMEOUT = "timeout"
    """No answer to the association request or to the C-STORE in time."""
    ABORTED = "aborted"
    """The peer (or the network) aborted the association."""
    FAILURE_STATUS = "failure_status"
    """The SCP answered the C-STORE with a failure (or otherwise non-storing) status."""
    LOCAL_ERROR = "local_error"
    """Nothing was sent: the SR file is missing or unreadable, TLS cannot be set up, or the destination is not configured."""


DELIVERED_OUTCOMES = frozenset({DeliveryOutcome.STORED, DeliveryOutcome.STORED_WITH_WARNING})
#: Outcomes that say the destination as a whole is not usable right now (not just this one SR):
#: `Outbox.run_once` leaves that destination's other rows for the next run.
DESTINATION_DOWN_OUTCOMES = frozenset(
    {
        DeliveryOutcome.CONNECT_FAILED,
        DeliveryOutcome.REJECTED,
        DeliveryOutcome.NO_CONTEXT,
        DeliveryOutcome.TIMEOUT,
        DeliveryOutcome.ABORTED,
    }
)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one `send_sr`.  ``error`` (failures) and ``warning`` are PHI-free single lines."""

    destination: str
    outcome: DeliveryOutcome
    status: int | None = None
    """The C-STORE response status, when one came back."""
    error: str | None = None
    warning: str | None = None
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        if self.delivered == (self.error is not None):
            raise ValueError("a delivered result has no error; a failed one must say why")

    @property
    def delivered(self) -> bool:
        """Whether the destination holds the SR now (success or warning status)."""
        return self.outcome in DELIVERED_OUTCOMES


@dataclass(frozen=True, slots=True)
class SendTimeouts:
    """Seconds `send_sr` waits at each step (pynetdicom's AE timeouts)."""

    connect_s: float = 10.0
    """TCP connect (and TLS handshake)."""
    acse_s: float = 30.0
    """Association accept/reject, and the release reply."""
    dimse_s: float = 60.0
    """The C-STORE response (the PACS may write to slow storage before answering)."""
    network_s: float = 60.0
    """Silence on an established association."""

    def __post_init__(self) -> None:
        for name in ("connect_s", "acse_s", "dimse_s", "network_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SendTimeouts.{name} must be a positive number of seconds, not {value!r}")

    @property
    def longest_attempt_s(self) -> float:
        """An upper bound on one `send_sr`: connect, associate, store, release."""
        return self.connect_s + self.acse_s + self.dimse_s + self.acse_s


def _address(destination: DestinationConfig) -> str:
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    return f"{destination.name} ({host}:{destination.port})"


class _PynetdicomMessages(logging.Handler):
    """Collects pynetdicom's log records of one association's threads.

    pynetdicom keeps the reason for a failed connect (the OSError) and an ACSE
    timeout only in its log; this handler lets `send_sr` name them.  Records
    are filtered afterwards to the association's own threads, so concurrent
    sends do not see each other's messages.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[int | None, str]] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.records.append((record.thread, record.getMessage()))

    def messages(self, thread_ids: set[int | None]) -> list[str]:
        with self._guard:
            return [message for thread, message in self.records if thread in thread_ids]


_TCP_ERROR_PREFIX = "TCP Initialisation Error: "


def _connect_error(destination: DestinationConfig, messages: list[str], timeouts: SendTimeouts) -> str:
    where = _address(destination)
    reason = next((m.removeprefix(_TCP_ERROR_PREFIX) for m in messages if m.startswith(_TCP_ERROR_PREFIX)), "")
    lowered = reason.lower()
    if "refused" in lowered or f"[errno {errno.ECONNREFUSED}]" in lowered:
        return f"connection refused by {where}"
    if "timed out" in lowered:
        return f"no answer from {where} within {timeouts.connect_s:g} s (TCP connect)"
    if "ssl" in lowered or "certificate" in lowered or "tls" in lowered:
        return f"TLS handshake with {where} failed: {reason}"
    if (
        "name or service not known" in lowered
        or "temporary failure in name resolution" in lowered
        or "[errno -" in lowered
    ):
        return f"cannot resolve the host of {where}: {reason}"
    if reason:
        return f"cannot connect to {where}: {reason}"
    return f"cannot connect to {where}"


def _rejection_error(destination: DestinationConfig, rejection: Any) -> str:
    """From the A-ASSOCIATE (reject) primitive or the A-ASSOCIATE-RJ PDU: both have ``result`` and ``reason_str``."""
    try:
        reason = str(rejection.reason_str)
        permanence = {1: "permanent", 2: "transient"}.get(rejection.result, "")
    except Exception:  # noqa: BLE001 - a malformed rejection still is a rejection
        reason, permanence = "", ""
    text = f"association rejected by {_address(destination)}"
    if reason and not reason.startswith("("):
        text += ": " + reason[:1].lower() + reason[1:]
    if permanence:
        text += f" ({permanence})"
    return text


class _UnusableSr(ValueError):
    """The SR bytes lack what a C-STORE needs (the message names only the missing attribute)."""


def _read_sr(sr_bytes: bytes) -> pydicom.Dataset:
    try:
        dataset = pydicom.dcmread(io.BytesIO(sr_bytes))
    except Exception as exc:  # noqa: BLE001 - pydicom's messages may quote values; keep only the type
        raise _UnusableSr(f"pydicom cannot parse it ({type(exc).__name__})") from exc
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in dataset:
            raise _UnusableSr(f"it has no {keyword}")
    if "TransferSyntaxUID" not in getattr(dataset, "file_meta", {}):
        raise _UnusableSr("it has no transfer syntax in its file meta information")
    return dataset


def send_sr(
    destination: DestinationConfig,
    sr_bytes: bytes,
    *,
    calling_ae: str,
    timeouts: SendTimeouts = SendTimeouts(),
) -> DeliveryResult:
    """One C-STORE of the Part-10 SR ``sr_bytes`` to ``destination``, as ``calling_ae``.

    Never raises for peer or network trouble: every way it can end is a
    `DeliveryOutcome` in the result, with a PHI-free ``error`` when not delivered.
    """
    started = time.monotonic()
    name = destination.name

    def result(
        outcome: DeliveryOutcome, *, status: int | None = None, error: str | None = None, warning: str | None = None
    ) -> DeliveryResult:
        return DeliveryResult(name, outcome, status, error, warning, round(time.monotonic() - started, 3))

    try:
        dataset = _read_sr(sr_bytes)
    except _UnusableSr as exc:
        return result(DeliveryOutcome.LOCAL_ERROR, error=f"the SR for {name} is not a usable DICOM file: {exc}")
    sop_class = UID(dataset.SOPClassUID)
    own_syntax = UID(dataset.file_meta.TransferSyntaxUID)
    transfer_syntaxes = list(dict.fromkeys([own_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))

    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.add_requested_context(sop_class, transfer_syntaxes)
    try:
        tls_args = (destination.tls.client_context(), destination.host) if destination.tls.enabled else None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: certificate files changed since startup
        return result(DeliveryOutcome.LOCAL_ERROR, error=f"cannot set up TLS for {_address(destination)}: {exc}")

    connected = threading.Event()
    # pynetdicom can hand the ACSE the transport-closed abort ahead of an A-ASSOCIATE-RJ it
    # has already decoded (a peer that closes right after rejecting, on a loaded machine);
    # watching the decoded PDUs reports the rejection whatever the queue order.
    rejections: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu)

    capture = _PynetdicomMessages()
    pynetdicom_logger = logging.getLogger("pynetdicom")
    pynetdicom_logger.addHandler(capture)
    try:
        try:
            assoc = ae.associate(
                destination.host,
                destination.port,
                ae_title=destination.ae_title,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.set()), (evt.EVT_PDU_RECV, on_pdu)],
            )
        except Exception as exc:  # noqa: BLE001 - a host name that does not resolve, an unusable SSL context
            error = _connect_error(destination, [_TCP_ERROR_PREFIX + str(exc)], timeouts)
            return result(DeliveryOutcome.CONNECT_FAILED, error=error)
        # Association thread (ACSE), DUL thread (connect), this thread (DIMSE waits in send_c_store).
        threads = {assoc.ident, getattr(assoc.dul, "ident", None), threading.get_ident()}
        if not assoc.is_established:
            messages = capture.messages(threads)
            if assoc.is_rejected or rejections:
                rejection = assoc.acceptor.primitive if assoc.is_rejected else rejections[0]
                return result(DeliveryOutcome.REJECTED, error=_rejection_error(destination, rejection))
            if not connected.is_set():
                return result(DeliveryOutcome.CONNECT_FAILED, error=_connect_error(destination, messages, timeouts))
            answer = assoc.acceptor.primitive
            if answer is not None and getattr(answer, "result", None) == 0 and not assoc.accepted_contexts:
                return result(
                    DeliveryOutcome.NO_CONTEXT,
                    error=f"{_address(destination)} does not accept {sop_class.name} "
                    f"(presentation context rejected for {', '.join(ts.name for ts in transfer_syntaxes)})",
                )
            if any("ACSE timeout" in m for m in messages):
                return result(
                    DeliveryOutcome.TIMEOUT,
                    error=f"no association response from {_address(destination)} within {timeouts.acse_s:g} s",
                )
            if any(m.startswith("Unknown PDU type") for m in messages):
                return result(
                    DeliveryOutcome.ABORTED,
                    error=f"{_address(destination)} did not answer as a DICOM peer "
                    "(unexpected reply to the association request; wrong port?)",
                )
            return result(
                DeliveryOutcome.ABORTED,
                error=f"association with {_address(destination)} aborted before it was accepted",
            )

        send_error: str | None
        try:
            response = assoc.send_c_store(dataset)
        except Exception as exc:  # noqa: BLE001 - encoding trouble or a connection lost mid-send
            response = None
            # Only the exception's type: an encoding error may quote a value of the SR (patient name).
            send_error = f"sending the SR to {_address(destination)} failed ({type(exc).__name__})"
        else:
            send_error = None
        finally:
            if assoc.is_established:
                assoc.release()  # the store is settled by now; a failed release changes nothing
            else:
                assoc.abort()
    finally:
        pynetdicom_logger.removeHandler(capture)

    if send_error is not None:
        return result(DeliveryOutcome.ABORTED, error=send_error)
    if response is None or "Status" not in response:
        messages = capture.messages(threads)
        if any("DIMSE timeout" in m for m in messages):
            return result(
                DeliveryOutcome.TIMEOUT,
                error=f"no C-STORE response from {_address(destination)} within {timeouts.dimse_s:g} s",
            )
        if any("Network timeout" in m for m in messages):
            return result(
                DeliveryOutcome.TIMEOUT,
                error=f"{_address(destination)} went silent for {timeouts.network_s:g} s during the C-STORE",
            )
        return result(
            DeliveryOutcome.ABORTED, error=f"association with {_address(destination)} ended without a C-STORE response"
        )
    status = int(response.Status)
    category = code_to_category(status)
    if category == CATEGORY_SUCCESS:
        return result(DeliveryOutcome.STORED, status=status)
    if category == CATEGORY_WARNING:
        return result(
            DeliveryOutcome.STORED_WITH_WARNING,
            status=status,
            warning=f"{_address(destination)} stored the SR with warning status {describe_status(status)}",
        )
    return result(
        DeliveryOutcome.FAILURE_STATUS,
        status=status,
        error=f"{_address(destination)} returned C-STORE status {describe_status(status)}",
    )


# --- backoff ---------------------------------------------------------------------------


def backoff_s(attempts: int, *, initial_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 = the first).

    ``min(initial_s * 2**(attempts - 1) * (1 + jitter), max_s)``; ``jitter``
    is the random fraction, in [0, 1).
    """
    if attempts < 1:
        raise ValueError(f"attempts counts from 1, not {attempts}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    doublings = min(attempts - 1, 64)  # 2**64 * anything positive is past any sane cap; no float overflow
    return min(initial_s * 2.0**doublings * (1.0 + jitter), max_s)


# --- the outbox -------------------------------------------------------------------------

#: Added to the longest possible attempt to get the claim's hold.
HOLD_MARGIN_S = 60.0


class Outbox:
    """Delivers queued SRs to the configured destinations; call `run_once` periodically.

    ``config`` is the `NodeConfig` (``destinations``, ``outbox``, and
    ``scp.ae_title`` as our calling AE title).  ``rng`` supplies the jitter
    (``random()`` in [0, 1)); ``monotonic`` measures time spent inside a run,
    which is added to ``now`` for every claim and record after the first.
    Inject both for deterministic tests.
    """

    def __init__(
        self,
        spool: Spool,
        config: NodeConfig,
        metrics: NodeMetrics | None = None,
        log: Any = None,
        *,
        timeouts: SendTimeouts = SendTimeouts(),
        hold_s: float | None = None,
        batch_size: int = 100,
        jitter_fraction: float = 0.1,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= jitter_fraction < 1.0:
            raise ValueError(f"jitter_fraction must be in [0, 1), not {jitter_fraction}")
        self.spool = spool
        # A delivery's result can finish the study (delivered, or failed when it gives up).
        self.machine = StudyMachine(spool)
        self.config = config
        self.metrics = metrics
        self.log = log if log is not None else get_logger(stage="outbox")
        self.timeouts = timeouts
        self.hold_s = float(hold_s) if hold_s is not None else timeouts.longest_attempt_s + HOLD_MARGIN_S
        if self.hold_s <= timeouts.longest_attempt_s:
            raise ValueError(
                f"hold_s {self.hold_s:g} must exceed the longest attempt ({timeouts.longest_attempt_s:g} s), "
                "or a slow send could be taken over and sent twice"
            )
        self.batch_size = batch_size
        self.jitter_fraction = jitter_fraction
        self.rng = rng if rng is not None else random.Random()
        self.monotonic = monotonic
        self.destinations = {d.name: d for d in config.destinations}

    # --- sending ---

    def run_once(self, *, now: float) -> int:
        """Attempt every due delivery once; return how many were attempted (claimed, then delivered or failed).

        Peer and network trouble never raises (it is a failed attempt); spool
        errors (database locked, disk) do, leaving any claimed row to expire.
        """
        started = self.monotonic()

        def clock() -> float:
            return now + max(0.0, self.monotonic() - started)

        attempted = 0
        unreachable: set[str] = set()
        for item in self.spool.due_deliveries(now=now, limit=self.batch_size):
            if item.destination in unreachable:
                continue  # it stays due; the next run tries again (one timeout per destination per run)
            try:
                claimed = self.spool.start_delivery(item.item_id, now=clock(), hold_s=self.hold_s)
            except InvalidTransition:
                continue  # another sender took it, or it changed since we looked
            attempted += 1
            result = self._attempt(claimed)
            self._record(claimed, result, now=clock())
            if result.outcome in DESTINATION_DOWN_OUTCOMES:
                unreachable.add(item.destination)
        return attempted

    def _attempt(self, item: OutboxItem) -> DeliveryResult:
        destination = self.destinations.get(item.destination)
        if destination is None:
            return DeliveryResult(
                item.destination,
                DeliveryOutcome.LOCAL_ERROR,
                error=f"destination {item.destination!r} is not in the configuration "
                "(add it back to [[destinations]]; its deliveries keep waiting until then)",
            )
        try:
            sr_bytes = item.sr_path.read_bytes()
        except OSError as exc:
            return DeliveryResult(
                item.destination,
                DeliveryOutcome.LOCAL_ERROR,
                error=f"cannot read the SR file {item.sr_path.name} for {item.destination}: {exc.strerror or exc}",
            )
        return send_sr(destination, sr_bytes, calling_ae=self.config.scp.ae_title, timeouts=self.timeouts)

    def _record(self, item: OutboxItem, result: DeliveryResult, *, now: float) -> None:
        context = dict(
            study_uid=item.study_instance_uid,
            sr_uid=item.sr_sop_instance_uid,
            destination=item.destination,
            attempt=item.attempts + 1,
            outcome=str(result.outcome),
            status=f"0x{result.status:04X}" if result.status is not None else None,
            elapsed_s=result.elapsed_s,
        )
        if result.delivered:
            try:
                transition = self.machine.mark_delivered(item.item_id, now=now)
            except InvalidTransition as exc:
                # Someone else settled the row meanwhile (our hold ran out); the PACS has the SR either way.
                self.log.warning("sr_delivered_row_already_settled", error=str(exc), **context)
                return
            except NodeError as exc:
                # The PACS has it but we could not record it: the hold runs out and the same SR
                # (same SOP Instance UID) is sent again, which the PACS de-duplicates.
                self.log.error("sr_delivered_not_recorded", error=str(exc), **context)
                raise
            if result.warning:
                self.log.warning("sr_delivered_with_warning", warning=result.warning, **context)
            else:
                self.log.info("sr_delivered", **context)
            if transition is not None:
                self.log.info(
                    "study_delivered", study_uid=item.study_instance_uid, study_state=str(transition.to_state)
                )
            if self.metrics is not None:
                self.metrics.sr_delivered(item.destination)
            return

        settings = self.config.outbox
        wait_s = backoff_s(
            item.attempts + 1,
            initial_s=settings.initial_backoff_s,
            max_s=settings.max_backoff_s,
            jitter=self.jitter_fraction * self.rng.random(),
        )
        try:
            after = self.machine.mark_attempt_failed(
                item.item_id, now=now, error=str(result.error), backoff_s=wait_s, max_attempts=settings.max_attempts
            )
        except InvalidTransition as exc:
            self.log.warning("sr_delivery_row_already_settled", error=str(exc), failure=result.error, **context)
            return
        if self.metrics is not None:
            self.metrics.sr_delivery_failed(item.destination)
        if after.state is OutboxState.FAILED:
            self.log.error("sr_delivery_gave_up", error=result.error, max_attempts=settings.max_attempts, **context)
        else:
            self.log.warning(
                "sr_delivery_failed",
                error=result.error,
                backoff_s=round(wait_s, 3),
                next_attempt_at=after.next_attempt_at,
                **context,
            )

    # --- operator ---

    def resend_study(self, study_uid: str, *, now: float, reason: str = "operator resend") -> Transition:
        """Queue a study's SR again; see `resend_study`."""
        return resend_study(self.spool, study_uid, now=now, reason=reason)


def resend_study(spool: Spool, study_uid: str, *, now: float, reason: str = "operator resend") -> Transition:
    """Put a study's SR back in the outbox without re-scoring (the machine's ``resend`` event).

    From ``failed`` (a destination gave up) only the deliveries that gave up
    are re-queued; from ``delivered`` every destination gets it again (a PACS
    that lost it).  Raises `InvalidTransition` otherwise: while the study is
    still ``scored`` its deliveries are queued already and the message says
    when each is next tried.  `StudyMachine.retry` (``sclc-node retry``)
    chooses this for studies whose delivery failed and re-scoring otherwise.
    """
    try:
        return StudyMachine(spool).apply(study_uid, StudyEvent.RESEND, now=now, reason=reason)
    except InvalidTransition as exc:
        if exc.state != StudyState.SCORED:
            raise
        waiting = [
            f"{item.destination}: {item.state}, attempt {item.attempts + 1} at {item.next_attempt_at:.0f}"
            + (f", last error: {item.last_error}" if item.last_error else "")
            for item in spool.study_deliveries(study_uid)
            if item.state is not OutboxState.DELIVERED
        ]
        raise InvalidTransition(
            f"study {study_uid} is still in the outbox; nothing to resend ({'; '.join(waiting) or 'no deliveries'})",
            study_uid=study_uid,
            state=exc.state,
            event=exc.event,
        ) from exc
