"""Errors raised by the node service (spool, study lifecycle, outbox).

Every class derives from `NodeError`, itself a `scoring.errors.SclcNodeError`,
and says through ``retryable`` whether the same operation may succeed later.
Boundaries translate them: the SCP answers ``SpoolFull``/``SpoolBusy`` with
"out of resources" so the PACS re-sends, and ``UnsafeUid`` with a refusal; the
worker turns anything non-retryable into a ``failed`` study with the message
as its reason.
"""

from __future__ import annotations

from sclc_risk_node.scoring.errors import InputError, SclcNodeError


class NodeError(SclcNodeError):
    """Root of the node service's errors."""


class InvalidTransition(NodeError):
    """An event does not apply to the study (or outbox row) in its current state.

    Raised when the guarded ``UPDATE ... WHERE state = <observed>`` matched no
    row: the state differs from what the caller assumed, or a guard (lease
    holder, files still present, lease really expired) did not hold.
    """

    def __init__(
        self, message: str, *, study_uid: str | None = None, state: str | None = None, event: str | None = None
    ):
        super().__init__(message)
        self.study_uid = study_uid
        self.state = state
        self.event = event


class LeaseLost(InvalidTransition):
    """A worker tried to act on a study it no longer holds (its lease expired and was reclaimed)."""


class UnknownStudy(NodeError, LookupError):
    """No study with this Study Instance UID is in the spool."""


class UnsafeUid(NodeError, InputError):
    """A UID that would become part of a file name is not a well-formed DICOM UID.

    Only ``^[0-9]+(\\.[0-9]+)*$`` of at most 64 characters is accepted, so no
    ``/``, ``..`` or NUL can reach a path.
    """


class NotPart10(NodeError, InputError):
    """Bytes handed to the spool are not a DICOM Part-10 file (no preamble + ``DICM``)."""


class SpoolFull(NodeError):
    """The spool's file system is below its free-space floor (or reported ENOSPC)."""

    retryable = True


class SpoolBusy(NodeError):
    """The SQLite database stayed locked longer than the busy timeout."""

    retryable = True


class SpoolIOError(NodeError):
    """Writing, syncing or renaming a spool file failed (disk or permission trouble)."""

    retryable = True


class SpoolSchemaError(NodeError):
    """The database was written by a newer schema version than this code knows."""
