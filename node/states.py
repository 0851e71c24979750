"""The study lifecycle as data: states, events and the one table that joins them.

Pure: no IO, no clock.  `node.study_machine` applies these transitions to the
database; this module only says which ones exist.

The happy path is

    receiving -images_complete-> waiting_for_clinical -clinical_attached-> ready
      -claimed-> scoring -scored-> scored -delivered-> delivered

and `TRANSITIONS` below is the complete list.

Rules that the table encodes (and `tests/node/test_states.py` checks):

* Only state *changes* are transitions.  An instance for a study that is
  already ``receiving`` just refreshes its last-instance time; an instance
  for a study being scored or already scored/delivered changes nothing (it is
  stored and logged as late; re-scoring a delivered study is a human decision).
* New input revives a study that was given up on: an instance or a clinical
  record for a ``failed`` or ``expired`` study sends it back to ``receiving``,
  where completion is judged afresh from what is on disk.
* ``retry`` (operator) also goes back to ``receiving``, never straight to
  ``ready``: completion re-checks that the inputs are still all there.
* ``resend`` (operator) re-queues an existing SR without re-scoring: from
  ``failed`` (a destination gave up) or ``delivered`` (send it again).
* A claim of a service instance that is gone (``service_restarted``) goes
  back to ``ready`` at once and does not count as a lost worker; only a worker
  process that died (``worker_lost``) or a lease that ran out while its
  service lived (``lease_expired``) does.  ``retry``
  also applies to ``scoring``, for a study left claimed when no service runs.
* ``ready`` never expires: it only waits for a worker, and receiving keeps
  going while scoring is down.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    """Instances are arriving; the SEG and the CT instances it references are not all here yet."""
    WAITING_FOR_CLINICAL = "waiting_for_clinical"
    """Images complete; no clinical record attached yet."""
    READY = "ready"
    """Images and clinical record complete; waiting for a worker to claim it."""
    SCORING = "scoring"
    """Claimed by a worker, whose lease ends at ``lease_until``."""
    SCORED = "scored"
    """The SR exists and is queued in the outbox for every destination."""
    DELIVERED = "delivered"
    """Every destination accepted the SR."""
    FAILED = "failed"
    """Scoring or delivery gave up; ``failure_reason`` says why."""
    EXPIRED = "expired"
    """Never became complete within ``study_expiry_s``; the reason lists what was missing."""


class StudyEvent(enum.StrEnum):
    INSTANCE_STORED = "instance_stored"
    IMAGES_COMPLETE = "images_complete"
    CLINICAL_ATTACHED = "clinical_attached"
    CLAIMED = "claimed"
    LEASE_EXPIRED = "lease_expired"
    WORKER_LOST = "worker_lost"
    """The worker process died under a live service (killed, out of memory): counts toward failure."""
    SERVICE_RESTARTED = "service_restarted"
    """The claim belonged to an earlier instance of the service (killed, crashed, restarted):
    released at start-up, and not counted as a worker failure."""
    SCORED = "scored"
    SCORING_FAILED = "scoring_failed"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    EXPIRED = "expired"
    RETRY = "retry"
    RESEND = "resend"


class OutboxState(enum.StrEnum):
    """One SR's delivery to one destination."""

    PENDING = "pending"
    """Waiting for ``next_attempt_at``."""
    SENDING = "sending"
    """A sender holds it until ``sending_until``; after that it is due again."""
    DELIVERED = "delivered"
    FAILED = "failed"
    """Gave up after the configured attempts; ``resend`` puts it back to pending."""


S, E = StudyState, StudyEvent

#: (state, event) -> new state.  Any pair not listed is an invalid transition.
TRANSITIONS: Mapping[tuple[StudyState, StudyEvent], StudyState] = MappingProxyType(
    {
        (S.RECEIVING, E.IMAGES_COMPLETE): S.WAITING_FOR_CLINICAL,
        (S.RECEIVING, E.EXPIRED): S.EXPIRED,
        (S.WAITING_FOR_CLINICAL, E.CLINICAL_ATTACHED): S.READY,
        (S.WAITING_FOR_CLINICAL, E.INSTANCE_STORED): S.RECEIVING,
        (S.WAITING_FOR_CLINICAL, E.EXPIRED): S.EXPIRED,
        (S.READY, E.CLAIMED): S.SCORING,
        (S.READY, E.INSTANCE_STORED): S.RECEIVING,
        (S.SCORING, E.SCORED): S.SCORED,
        (S.SCORING, E.SCORING_FAILED): S.FAILED,
        (S.SCORING, E.LEASE_EXPIRED): S.READY,
        (S.SCORING, E.SERVICE_RESTARTED): S.READY,
        (S.SCORING, E.WORKER_LOST): S.READY,
        (S.SCORING, E.RETRY): S.RECEIVING,
        (S.SCORED, E.DELIVERED): S.DELIVERED,
        (S.SCORED, E.DELIVERY_FAILED): S.FAILED,
        (S.DELIVERED, E.RESEND): S.SCORED,
        (S.FAILED, E.RETRY): S.RECEIVING,
        (S.FAILED, E.RESEND): S.SCORED,
        (S.FAILED, E.INSTANCE_STORED): S.RECEIVING,
        (S.FAILED, E.CLINICAL_ATTACHED): S.RECEIVING,
        (S.EXPIRED, E.RETRY): S.RECEIVING,
        (S.EXPIRED, E.INSTANCE_STORED): S.RECEIVING,
        (S.EXPIRED, E.CLINICAL_ATTACHED): S.RECEIVING,
    }
)
del S, E

#: States entered only with a reason (stored as ``failure_reason`` and in the event row).
REASON_REQUIRED: frozenset[StudyState] = frozenset({StudyState.FAILED, StudyState.EXPIRED})

#: States in which a study keeps no worker or sender busy and nothing more happens
#: without new input or an operator: retention may remove their files.
FINISHED_STATES: frozenset[StudyState] = frozenset({StudyState.DELIVERED, StudyState.FAILED, StudyState.EXPIRED})

#: States whose study may still change its clinical record link (scoring has not read it yet,
#: or will read it again after a revival).  Later records for scored studies stay unlinked.
CLINICAL_LINKABLE_STATES: frozenset[StudyState] = frozenset(
    {StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL, StudyState.READY, StudyState.FAILED, StudyState.EXPIRED}
)

#: Events that only the lease holder may apply.
LEASE_HOLDER_EVENTS: frozenset[StudyEvent] = frozenset({StudyEvent.SCORED, StudyEvent.SCORING_FAILED})


def target_state(state: StudyState, event: StudyEvent) -> StudyState | None:
    """The state ``event`` leads to from ``state``, or None when it does not apply."""
    return TRANSITIONS.get((StudyState(state), StudyEvent(event)))


def sources_of(event: StudyEvent) -> frozenset[StudyState]:
    """Every state from which ``event`` is a transition."""
    return frozenset(state for (state, each), _ in TRANSITIONS.items() if each == event)
