"""The audit trail: who sent what, and what was sent where (IHE ATNA style, DICOM PS3.15 A.5).

Where it lives, and why.  Events are rows of the ``audit_events`` table in the
node's one SQLite database, not a separate JSON-lines file:

* each event is inserted in the same transaction as the action it records
  (the instance's index row, the delivery's state change, the clinical
  record, the retry's transition), so after ``kill -9`` or power loss there
  is an event for exactly the actions that committed, never one without the
  other.  A separate file would need its own fsync ordering and could
  disagree with the database after a crash;
* it is append-only by construction: triggers abort any UPDATE or DELETE on
  the table, whoever runs it;
* it inherits the database's protection (0600, backups, WAL durability) and
  is queryable (`sclc-node audit`, or SQL).

Content.  No PHI beyond the Study Instance UID.  ``who`` is the active
participant: the calling AE title and IP address of a sender, the local user
(uid and name) who ran a command, the inbox for a dropped file (with a hash of
its name, since senders name files after patients).  ``destination`` is a
configured destination's name.  ``counts`` are numbers only.

Event types and their ATNA Event ID (DCM, PS3.16 CID 400) and action code:

=================== ============================================== ======
event               ATNA Event ID                                  action
=================== ============================================== ======
instances_received  DCM 110104 "DICOM Instances Transferred"       C
sr_sent             DCM 110104 "DICOM Instances Transferred"       R
sr_send_gave_up     DCM 110104 "DICOM Instances Transferred"       R, outcome 8
record_imported     DCM 110107 "Import"                            C
retry               DCM 110103 "DICOM Instances Accessed"          U
=================== ============================================== ======

Outcome indicator (PS3.15 A.5.3.1): 0 success, 4 minor failure, 8 serious
failure, 12 major failure.
"""

from __future__ import annotations

import enum
import json
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol


class Statements(Protocol):
    """What `record_in` needs of `node.database.Transaction`: named statements.

    A protocol rather than an import: the spool reads audit events back with
    `AuditEvent.from_row`, so importing the spool here would close a cycle.
    """

    def execute(self, name: str, **params: Any) -> int: ...


class AuditEventType(enum.StrEnum):
    INSTANCES_RECEIVED = "instances_received"
    SR_SENT = "sr_sent"
    SR_SEND_GAVE_UP = "sr_send_gave_up"
    RECORD_IMPORTED = "record_imported"
    RETRY = "retry"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.3.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


#: event -> (ATNA EventID as "DCM <code>", EventActionCode).
ATNA_CODES: Mapping[AuditEventType, tuple[str, str]] = MappingProxyType(
    {
        AuditEventType.INSTANCES_RECEIVED: ("DCM 110104", "C"),
        AuditEventType.SR_SENT: ("DCM 110104", "R"),
        AuditEventType.SR_SEND_GAVE_UP: ("DCM 110104", "R"),
        AuditEventType.RECORD_IMPORTED: ("DCM 110107", "C"),
        AuditEventType.RETRY: ("DCM 110103", "U"),
    }
)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event: AuditEventType
    who: str
    at: float
    study_instance_uid: str | None = None
    destination: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    outcome: Outcome = Outcome.SUCCESS

    def __post_init__(self) -> None:
        object.__setattr__(self, "event", AuditEventType(self.event))
        object.__setattr__(self, "outcome", Outcome(self.outcome))
        if not self.who:
            raise ValueError("an audit event needs a who")
        if any(not isinstance(v, int) or isinstance(v, bool) for v in self.counts.values()):
            raise ValueError("audit counts are integers only (no values from the data)")

    @property
    def atna_event_id(self) -> str:
        return ATNA_CODES[self.event][0]

    @property
    def action(self) -> str:
        return ATNA_CODES[self.event][1]

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditEvent:
        return cls(
            event=AuditEventType(row["event"]),
            who=row["who"],
            at=row["at"],
            study_instance_uid=row["study_instance_uid"],
            destination=row["destination"],
            counts=json.loads(row["counts_json"]),
            outcome=Outcome(row["outcome"]),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "event": str(self.event),
            "atna_event_id": self.atna_event_id,
            "action": self.action,
            "outcome": int(self.outcome),
            "who": self.who,
            "destination": self.destination,
            "study_instance_uid": self.study_instance_uid,
            "counts": dict(self.counts),
        }


def record_in(tx: Statements, event: AuditEvent) -> None:
    """Append ``event`` inside ``tx``: it commits or rolls back with the action it describes."""
    tx.execute(
        "insert_audit_event",
        at=event.at,
        event=str(event.event),
        atna_event_id=event.atna_event_id,
        action=event.action,
        outcome=int(event.outcome),
        who=event.who,
        destination=event.destination,
        study_uid=event.study_instance_uid,
        counts_json=json.dumps(dict(event.counts), sort_keys=True),
    )


def dicom_peer(calling_ae_title: str, address: str) -> str:
    """``who`` for a DICOM sender: ``AE "TITLE" at IP``."""
    return f'AE "{calling_ae_title}" at {address or "unknown address"}'


def local_user() -> str:
    """``who`` for a command run on this machine: ``local user NAME (uid N)``."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"local user {name} (uid {uid})"


def clinical_inbox(file_reference: str) -> str:
    """``who`` for a file dropped into the clinical inbox (the file name is hashed: it may name the patient)."""
    return f"clinical inbox (file {file_reference})"
