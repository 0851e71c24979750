"""The study lifecycle: the one place that changes a study's state.

Every change is `apply_event`: inside one write transaction it reads the
study's state, looks the (state, event) pair up in `node.states.TRANSITIONS`,
runs the guarded ``UPDATE studies ... WHERE state IN (<observed>) AND <guards>``
(compare-and-set: if anything changed the row meanwhile, or a guard fails,
it matches nothing) and inserts the ``study_events`` row.  Rowcount 0 raises
`InvalidTransition` (or `LeaseLost`), and the transaction rolls back whole.

Entering ``waiting_for_clinical`` with a clinical record already linked goes
straight on to ``ready`` in the same transaction (two event rows).

Guards beyond the state:

* ``scored`` / ``scoring_failed`` only from the worker holding the lease
  (``claimed_by``), so a worker whose lease was reclaimed cannot overwrite
  the outcome of the worker that took over;
* ``lease_expired`` only once ``lease_until`` has passed;
* ``service_restarted`` only for the claimant named (the instance that is
  gone), and it takes back the claim's count in ``claim_attempts``: a
  service that was killed is not a worker that died;
* ``retry`` / ``resend`` only while the study's files are not purged, and
  ``resend`` only when an SR exists.

This module runs SQL only through the `Transaction` it is handed (named
queries in ``queries.sql``); `node.spool` owns the connection.  `StudyMachine`
wraps the common operations, each in a transaction of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from sclc_risk_node.node import audit, completion
from sclc_risk_node.node.errors import InvalidTransition, LeaseLost, UnknownStudy
from sclc_risk_node.node.records import StudyRecord, Transition
from sclc_risk_node.node.states import (
    LEASE_HOLDER_EVENTS,
    REASON_REQUIRED,
    StudyEvent,
    StudyState,
    target_state,
)

if TYPE_CHECKING:  # spool imports this module; a runtime import would be circular
    from sclc_risk_node.node.spool import Spool, Transaction

#: A study whose worker lost its lease this many times is failed instead of
#: re-queued: it probably kills its worker (out of memory, a crashing decoder).
DEFAULT_MAX_CLAIM_ATTEMPTS = 3
#: Events that end one particular claim: they apply only while ``claimed_by`` is the worker_id given.
CLAIMANT_GUARDED_EVENTS = LEASE_HOLDER_EVENTS | {StudyEvent.WORKER_LOST, StudyEvent.SERVICE_RESTARTED}


def apply_event(
    tx: Transaction,
    study_uid: str,
    event: StudyEvent,
    *,
    now: float,
    reason: str | None = None,
    worker_id: str | None = None,
    lease_s: float | None = None,
) -> Transition:
    """Apply ``event`` to the study inside ``tx``; return the transition made.

    ``reason`` is required for events entering failed/expired.  ``claimed``
    needs ``worker_id`` and ``lease_s``; ``scored``/``scoring_failed`` need
    the ``worker_id`` that holds the lease.
    """
    event = StudyEvent(event)
    row = tx.one("study_by_uid", study_uid=study_uid)
    if row is None:
        raise UnknownStudy(f"no study {study_uid} in the spool")
    current = StudyState(row["state"])
    target = target_state(current, event)
    if target is None:
        raise InvalidTransition(
            f"study {study_uid}: event {event} does not apply in state {current}",
            study_uid=study_uid,
            state=str(current),
            event=str(event),
        )
    if target in REASON_REQUIRED and not reason:
        raise ValueError(f"event {event} leads to {target} and needs a reason")
    if event in LEASE_HOLDER_EVENTS and not worker_id:
        raise ValueError(f"event {event} needs the worker_id holding the lease")
    if event is StudyEvent.CLAIMED and (not worker_id or not lease_s or lease_s <= 0):
        raise ValueError("event claimed needs a worker_id and a positive lease_s")

    claims = target is StudyState.SCORING
    if event in CLAIMANT_GUARDED_EVENTS and not worker_id:
        raise ValueError(f"event {event} needs the worker_id of the claim it ends")
    # The claim that a service restart ended does not count toward max_claim_attempts.
    claim_increment = 1 if claims else (-1 if event is StudyEvent.SERVICE_RESTARTED else 0)
    claimant_guarded = event in CLAIMANT_GUARDED_EVENTS
    changed = tx.execute(
        "advance_study",
        study_uid=study_uid,
        from_states=json.dumps([str(current)]),
        to_state=str(target),
        now=now,
        failure_reason=reason if target in REASON_REQUIRED else None,
        claimed_by=worker_id if claims else None,
        lease_until=now + lease_s if claims else None,
        claim_increment=claim_increment,
        reset_claim_attempts=target is StudyState.RECEIVING,
        clears_purge=event is StudyEvent.INSTANCE_STORED,
        required_claimant=worker_id if claimant_guarded else None,
        lease_expired_by=now if event is StudyEvent.LEASE_EXPIRED else None,
        requires_files=event in (StudyEvent.RETRY, StudyEvent.RESEND),
        requires_sr=event is StudyEvent.RESEND,
    )
    if changed != 1:
        raise _guard_failure(row, current, event, worker_id, now)
    if event is StudyEvent.RESEND:
        # From delivered the operator asks for everything again; from failed only
        # what gave up is re-queued, so no destination receives the SR twice.
        resent = ["failed", "delivered"] if current is StudyState.DELIVERED else ["failed"]
        tx.execute("reset_deliveries_for_resend", study_uid=study_uid, states=json.dumps(resent), now=now)
    tx.execute(
        "insert_study_event",
        study_uid=study_uid,
        from_state=str(current),
        to_state=str(target),
        event=str(event),
        reason=reason,
        now=now,
    )
    transition = Transition(study_uid, current, target, event, reason, now)
    tx.applied.append(transition)
    if target is StudyState.WAITING_FOR_CLINICAL and row["clinical_record_id"] is not None:
        # The record came first: waiting for it would be waiting for nothing.  Keeping
        # "waiting_for_clinical implies no record" true makes the state mean what it says.
        apply_event(
            tx, study_uid, StudyEvent.CLINICAL_ATTACHED, now=now, reason=f"clinical record {row['clinical_record_id']}"
        )
    return transition


def _guard_failure(
    row: dict, current: StudyState, event: StudyEvent, worker_id: str | None, now: float
) -> InvalidTransition:
    study_uid = row["study_instance_uid"]
    context = dict(study_uid=study_uid, state=str(current), event=str(event))
    if event in CLAIMANT_GUARDED_EVENTS and row["claimed_by"] != worker_id:
        return LeaseLost(
            f"study {study_uid}: worker {worker_id} no longer holds the lease (held by {row['claimed_by']})", **context
        )
    if event is StudyEvent.LEASE_EXPIRED and row["lease_until"] is not None and row["lease_until"] > now:
        return InvalidTransition(f"study {study_uid}: lease runs until {row['lease_until']}, not expired", **context)
    if event in (StudyEvent.RETRY, StudyEvent.RESEND) and row["purged_at"] is not None:
        return InvalidTransition(
            f"study {study_uid}: files were purged at {row['purged_at']}; send the study again from PACS", **context
        )
    if event is StudyEvent.RESEND:
        return InvalidTransition(f"study {study_uid} has no SR to resend; use retry", **context)
    return InvalidTransition(f"study {study_uid}: {event} was pre-empted by a concurrent change", **context)


def scored_reason(
    sr_sop_instance_uid: str,
    applicability: str | None,
    withheld: bool,
    stage_seconds: Mapping[str, float] | None = None,
) -> str:
    """The ``scored`` event's reason.

    ``SR <uid>[; applicability <status>[; risk group and PFS withheld]][; stages read=1.234 ring=...]``
    """
    reason = f"SR {sr_sop_instance_uid}"
    if applicability:
        reason += f"; applicability {applicability}"
        if withheld:
            reason += f"; {WITHHELD_NOTE}"
    if stage_seconds:
        reason += "; stages " + " ".join(f"{stage}={seconds:.3f}" for stage, seconds in stage_seconds.items())
    return reason


def stage_seconds_from_reason(reason: str | None) -> dict[str, float]:
    """The per-stage seconds of a ``scored`` event's reason (empty when it has none)."""
    if not reason or "; stages " not in reason:
        return {}
    text = reason.split("; stages ", 1)[1].split(";", 1)[0]
    stages = {}
    for item in text.split():
        stage, _, seconds = item.partition("=")
        try:
            stages[stage] = float(seconds)
        except ValueError:
            continue
    return stages


#: The words `scored_reason` uses for a withheld result.
WITHHELD_NOTE = "risk group and PFS withheld"


def applicability_from_reason(reason: str | None) -> tuple[str | None, bool]:
    """(applicability status or None, withheld) from a ``scored`` event's reason."""
    if not reason or "; applicability " not in reason:
        return None, False
    status = reason.split("; applicability ", 1)[1].split(";", 1)[0].strip()
    return status, WITHHELD_NOTE in reason


class StudyMachine:
    """Lifecycle operations on a `Spool`, each one transaction."""

    def __init__(self, spool: Spool):
        self.spool = spool

    def apply(
        self,
        study_uid: str,
        event: StudyEvent,
        *,
        now: float,
        reason: str | None = None,
        worker_id: str | None = None,
        lease_s: float | None = None,
    ) -> Transition:
        with self.spool.transaction() as tx:
            return apply_event(tx, study_uid, event, now=now, reason=reason, worker_id=worker_id, lease_s=lease_s)

    # --- completion ---

    def advance(self, study_uid: str, *, now: float, settings: completion.CompletionSettings) -> list[Transition]:
        """Apply what completion decides for one study, repeatedly (images complete, then ready).

        Snapshot, decision and update share one write transaction, so an
        instance arriving meanwhile waits and is judged on the next pass.
        """
        with self.spool.transaction() as tx:
            for _ in range(len(StudyState)):  # each step changes state; a bound stops any cycle
                decision = completion.evaluate(self.spool.snapshot_in(tx, study_uid), now, settings)
                if decision is None:
                    break
                apply_event(tx, study_uid, decision.event, now=now, reason=decision.reason)
            return list(tx.applied)

    def advance_all(self, *, now: float, settings: completion.CompletionSettings) -> list[Transition]:
        """`advance` every study that completion watches (receiving, waiting_for_clinical)."""
        with self.spool.transaction(write=False) as tx:
            uids = [
                row["study_instance_uid"]
                for row in tx.all(
                    "studies_in_states_oldest_first",
                    states=json.dumps(sorted(map(str, completion.WATCHED_STATES))),
                    limit=-1,
                )
            ]
        transitions: list[Transition] = []
        for study_uid in uids:
            transitions += self.advance(study_uid, now=now, settings=settings)
        return transitions

    # --- scoring ---

    def claim(self, study_uid: str, *, worker_id: str, now: float, lease_s: float) -> StudyRecord:
        """Take a ready study for scoring until ``now + lease_s``; `InvalidTransition` if someone else did."""
        with self.spool.transaction() as tx:
            apply_event(
                tx,
                study_uid,
                StudyEvent.CLAIMED,
                now=now,
                worker_id=worker_id,
                lease_s=lease_s,
                reason=f"worker {worker_id}",
            )
            return StudyRecord.from_row(tx.one("study_by_uid", study_uid=study_uid))

    def claim_next(self, *, worker_id: str, now: float, lease_s: float) -> StudyRecord | None:
        """Claim the study that has been ready longest, or return None."""
        with self.spool.transaction() as tx:
            rows = tx.all("studies_in_states_oldest_first", states=json.dumps([str(StudyState.READY)]), limit=1)
            if not rows:
                return None
            study_uid = rows[0]["study_instance_uid"]
            apply_event(
                tx,
                study_uid,
                StudyEvent.CLAIMED,
                now=now,
                worker_id=worker_id,
                lease_s=lease_s,
                reason=f"worker {worker_id}",
            )
            return StudyRecord.from_row(tx.one("study_by_uid", study_uid=study_uid))

    def renew_lease(self, study_uid: str, *, worker_id: str, now: float, lease_s: float) -> None:
        """Heartbeat of a long scoring run.  `LeaseLost` if the study was reclaimed meanwhile."""
        with self.spool.transaction() as tx:
            if not tx.execute("renew_lease", study_uid=study_uid, worker_id=worker_id, lease_until=now + lease_s):
                raise LeaseLost(f"study {study_uid}: worker {worker_id} no longer holds the lease", study_uid=study_uid)

    def record_scored(
        self,
        study_uid: str,
        *,
        worker_id: str,
        sr_sop_instance_uid: str,
        sr_bytes: bytes,
        destinations: Sequence[str],
        now: float,
        applicability: str | None = None,
        withheld: bool = False,
        extra_objects: Sequence[tuple[str, str, bytes]] = (),
        destination_objects: Mapping[str, Sequence[str]] | None = None,
        stage_seconds: Mapping[str, float] | None = None,
    ) -> Transition:
        """Store the SR (and the study's other objects), then in one transaction: scoring -> scored
        and one outbox row per object and destination that takes it.

        ``applicability`` (a `scoring.types.DomainStatus` value) and ``withheld``
        go into the event's reason (`scored_reason`), where `sclc-node status` reads them;
        so does ``stage_seconds``, the time of each scoring stage.
        ``extra_objects`` are (kind, SOP Instance UID, Part-10 bytes) of the
        key-slice ROI SR, KOS, PDF and SC (`dicom_io.result_objects`);
        ``destination_objects`` maps a destination to the kinds it takes
        (None: every kind; the SR's kind is "sr").  The files are placed first
        (durably); if the transaction then fails the lease runs out, the study
        is scored again, and the deterministic UIDs find the same files: no
        second copy.
        """

        def takers(kind: str) -> list[str]:
            if destination_objects is None:
                return list(destinations)
            return [d for d in destinations if kind in destination_objects.get(d, ())]

        sr_file = self.spool.write_sr_file(study_uid, sr_sop_instance_uid, sr_bytes)
        extra_files = [(kind, uid, self.spool.write_sr_file(study_uid, uid, data)) for kind, uid, data in extra_objects]
        with self.spool.transaction() as tx:
            transition = apply_event(
                tx,
                study_uid,
                StudyEvent.SCORED,
                now=now,
                worker_id=worker_id,
                reason=scored_reason(sr_sop_instance_uid, applicability, withheld, stage_seconds),
            )
            self.spool.enqueue_sr_in(tx, study_uid, sr_sop_instance_uid, sr_file, takers("sr"), now=now)
            for kind, uid, object_file in extra_files:
                self.spool.enqueue_sr_in(tx, study_uid, uid, object_file, takers(kind), now=now)
        return transition

    def record_scoring_failed(self, study_uid: str, *, worker_id: str, reason: str, now: float) -> Transition:
        return self.apply(study_uid, StudyEvent.SCORING_FAILED, now=now, reason=reason, worker_id=worker_id)

    def record_worker_lost(
        self,
        study_uid: str,
        *,
        worker_id: str,
        reason: str,
        now: float,
        max_claim_attempts: int = DEFAULT_MAX_CLAIM_ATTEMPTS,
    ) -> Transition:
        """The worker process scoring the study died while the service lives: back to ready, or failed.

        This claim counted toward ``max_claim_attempts`` when it was made;
        once that many claims have lost their worker, the study probably
        kills its worker (out of memory, a crashing decoder) and fails.
        """
        with self.spool.transaction() as tx:
            row = tx.one("study_by_uid", study_uid=study_uid)
            if row is None:
                raise UnknownStudy(f"no study {study_uid} in the spool")
            if row["claim_attempts"] >= max_claim_attempts:
                return apply_event(
                    tx,
                    study_uid,
                    StudyEvent.SCORING_FAILED,
                    now=now,
                    worker_id=worker_id,
                    reason=f"scoring lost its worker {row['claim_attempts']} times (killed or out of memory?); "
                    f"last: {reason}",
                )
            return apply_event(tx, study_uid, StudyEvent.WORKER_LOST, now=now, worker_id=worker_id, reason=reason)

    def reclaim_stale_leases(
        self, *, now: float, max_claim_attempts: int = DEFAULT_MAX_CLAIM_ATTEMPTS
    ) -> list[Transition]:
        """Studies whose worker died (lease passed) go back to ready, or fail after ``max_claim_attempts``."""
        with self.spool.transaction() as tx:
            for row in tx.all("stale_leases", now=now):
                study_uid, worker = row["study_instance_uid"], row["claimed_by"]
                if row["claim_attempts"] >= max_claim_attempts:
                    apply_event(
                        tx,
                        study_uid,
                        StudyEvent.SCORING_FAILED,
                        now=now,
                        worker_id=worker,
                        reason=f"scoring lost its worker {row['claim_attempts']} times (killed or out of memory?)",
                    )
                else:
                    apply_event(
                        tx,
                        study_uid,
                        StudyEvent.LEASE_EXPIRED,
                        now=now,
                        reason=f"lease of worker {worker} ran out at {row['lease_until']}",
                    )
            return list(tx.applied)

    def reclaim_previous_instances(self, *, current_worker_id: str, now: float) -> list[Transition]:
        """At service start-up: every claim not made by ``current_worker_id`` goes back to ready at once.

        Only the process holding the service lock (`Spool.lock_service`) may
        call this: then no other instance is alive, so every other claim
        belongs to one that was killed or crashed.  Such a claim is released
        without waiting for its lease and without counting as a lost worker
        (``service_restarted``), so killing the service during scoring never
        fails a study, and scoring resumes within a dispatch interval.
        """
        with self.spool.transaction() as tx:
            for row in tx.all("scoring_claims"):
                if row["claimed_by"] == current_worker_id:
                    continue
                apply_event(
                    tx,
                    row["study_instance_uid"],
                    StudyEvent.SERVICE_RESTARTED,
                    now=now,
                    worker_id=row["claimed_by"],
                    reason=f"service instance {row['claimed_by']} is gone; claim released at start-up "
                    f"by {current_worker_id} (not counted as a worker failure)",
                )
            return list(tx.applied)

    # --- operator ---

    def retry(
        self,
        study_uid: str,
        *,
        now: float,
        reason: str = "operator retry",
        service_running: bool = False,
        who: str | None = None,
    ) -> Transition:
        """`sclc-node retry`: resend the SR if delivery is what failed, else start over.

        Resend (no re-scoring) for a delivered study and for a failed one whose
        failure was ``delivery_failed``; a study that failed scoring or expired
        goes back to receiving, where completion is judged again.

        A study in ``scoring`` is started over only when its claim is dead: no
        service runs (``service_running`` False, see `Spool.service_running`)
        or its lease has run out.  A running service's own claim is left alone
        (the service releases an earlier instance's claims itself at start-up).
        """
        with self.spool.transaction() as tx:
            row = tx.one("study_by_uid", study_uid=study_uid)
            if row is None:
                raise UnknownStudy(f"no study {study_uid} in the spool")
            state = StudyState(row["state"])
            if state is StudyState.SCORING and service_running and row["lease_until"] > now:
                raise InvalidTransition(
                    f"study {study_uid} is being scored by {row['claimed_by']} (lease until {row['lease_until']:.0f}); "
                    "the running service finishes it or releases it when its lease runs out",
                    study_uid=study_uid,
                    state=str(state),
                    event=str(StudyEvent.RETRY),
                )
            last_event = tx.all("study_events", study_uid=study_uid)[-1]["event"]
            resend = state is StudyState.DELIVERED or (
                state is StudyState.FAILED and last_event == StudyEvent.DELIVERY_FAILED
            )
            event = StudyEvent.RESEND if resend else StudyEvent.RETRY
            transition = apply_event(tx, study_uid, event, now=now, reason=reason)
            audit.record_in(
                tx,
                audit.AuditEvent(
                    audit.AuditEventType.RETRY,
                    who=who or "unknown operator",
                    at=now,
                    study_instance_uid=study_uid,
                    counts={"resend": int(resend)},
                ),
            )
            return transition
