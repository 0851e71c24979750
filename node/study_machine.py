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

Everything that moves a study goes through here, including the operations
where a transition commits together with other rows: receiving an instance
(`StudyMachine.store_instance`: a new study, or ``instance_stored``) and
re-indexing one at start-up (`StudyMachine.recover`), linking a clinical
record (``clinical_attached``), and the outbox's results (``delivered``,
``delivery_failed``).

This module runs SQL only through the `Transaction` it is handed (named
queries in ``queries.sql``); `node.spool` owns the connection (through
`node.database`) and the files, and never imports this module.  `StudyMachine` wraps the common operations,
each in a transaction of its own.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sclc_risk_node.node import audit, completion, recovery
from sclc_risk_node.node.database import Transaction
from sclc_risk_node.node.errors import InvalidTransition, LeaseLost, UnknownStudy
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.node.records import (
    ClinicalRecordRow,
    InstanceHeader,
    OutboxItem,
    RecoveryReport,
    StoreOutcome,
    StudyRecord,
    Transition,
)
from sclc_risk_node.node.spool import Spool
from sclc_risk_node.node.states import (
    CLINICAL_LINKABLE_STATES,
    LEASE_HOLDER_EVENTS,
    REASON_REQUIRED,
    OutboxState,
    StudyEvent,
    StudyState,
    target_state,
)
from sclc_risk_node.scoring.errors import InputError

#: A study whose worker lost its lease this many times is failed instead of
#: re-queued: it probably kills its worker (out of memory, a crashing decoder).
DEFAULT_MAX_CLAIM_ATTEMPTS = 3
#: Events that end one particular claim: they apply only while ``claimed_by`` is the worker_id given.
CLAIMANT_GUARDED_EVENTS = LEASE_HOLDER_EVENTS | {StudyEvent.WORKER_LOST, StudyEvent.SERVICE_RESTARTED}
#: The audit trail's ``who`` for an instance that recovery (`node.recovery`) found on disk without its row.
RECOVERY_SOURCE = "spool recovery (a received file indexed at start-up)"


def _log() -> Any:
    # Looked up per call so configure_logging() applies.  The receiving and clinical-record
    # lines keep the "spool" stage they had before the lifecycle moved here.
    return get_logger(stage="spool")


def _states_json(states: Iterable[StudyState]) -> str:
    return json.dumps(sorted(str(s) for s in states))


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
    row = _study_row(tx, study_uid)
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
    lease_until: float | None = None
    if claims:
        if not lease_s or lease_s <= 0:  # only `claimed` enters scoring, and it was checked above
            raise ValueError(f"event {event} enters scoring and needs a positive lease_s")
        lease_until = now + lease_s
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
        lease_until=lease_until,
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
    row: Mapping[str, Any], current: StudyState, event: StudyEvent, worker_id: str | None, now: float
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


def _claim_in(tx: Transaction, study_uid: str, *, worker_id: str, now: float, lease_s: float) -> StudyRecord:
    apply_event(
        tx,
        study_uid,
        StudyEvent.CLAIMED,
        now=now,
        worker_id=worker_id,
        lease_s=lease_s,
        reason=f"worker {worker_id}",
    )
    return StudyRecord.from_row(_study_row(tx, study_uid))


def _study_row(tx: Transaction, study_uid: str) -> dict[str, Any]:
    row = tx.one("study_by_uid", study_uid=study_uid)
    if row is None:
        raise UnknownStudy(f"no study {study_uid} in the spool")
    return row


def instance_indexed(tx: Transaction, header: InstanceHeader, now: float, *, source: str | None) -> None:
    """A new instance's row was just written in ``tx``: create its study or judge it again.

    The spool calls this (as ``on_indexed``) inside the index row's transaction,
    so the instance, the study and the event rows commit together.
    """
    study_uid = header.study_instance_uid
    keys = dict(study_uid=study_uid, accession_number=header.accession_number, patient_id=header.patient_id)
    if tx.execute("create_study", now=now, **keys):
        # Creation is not a transition of the table (there is no "before"), but it is
        # history: the event row with from_state NULL says when and with what it began.
        created = Transition(
            study_uid,
            None,
            StudyState.RECEIVING,
            StudyEvent.INSTANCE_STORED,
            f"first instance {header.sop_instance_uid} ({header.modality or 'no modality'})",
            now,
        )
        tx.execute(
            "insert_study_event",
            study_uid=study_uid,
            from_state=None,
            to_state=str(created.to_state),
            event=str(created.event),
            reason=created.reason,
            now=now,
        )
        tx.applied.append(created)
    else:
        tx.execute("touch_study_for_instance", now=now, **keys)
        state = StudyState(_study_row(tx, study_uid)["state"])
        if target_state(state, StudyEvent.INSTANCE_STORED) is not None:
            apply_event(
                tx,
                study_uid,
                StudyEvent.INSTANCE_STORED,
                now=now,
                reason=f"new {header.modality or 'instance'} {header.sop_instance_uid}: completion is judged again",
            )
        elif state is not StudyState.RECEIVING:
            _log().warning(
                "instance_after_scoring_started",
                study_uid=study_uid,
                sop_uid=header.sop_instance_uid,
                state=str(state),
                note="stored, but the study is not re-scored automatically",
            )
    link_clinical_record(tx, study_uid, now=now)
    audit.record_in(
        tx,
        audit.AuditEvent(
            audit.AuditEventType.INSTANCES_RECEIVED,
            who=source or "unknown sender",
            at=now,
            study_instance_uid=study_uid,
            counts={"instances": 1},
        ),
    )


def link_clinical_record(tx: Transaction, study_uid: str, *, now: float) -> None:
    """Point the study at its newest matching clinical record; a waiting study becomes ready."""
    study = _study_row(tx, study_uid)
    match = tx.one(
        "newest_clinical_record_for_study",
        accession_number=study["accession_number"],
        patient_id=study["patient_id"],
        study_uid=study_uid,
    )
    if match is None:
        return
    linked = tx.execute(
        "link_clinical_record",
        study_uid=study_uid,
        record_id=match["id"],
        states=_states_json(CLINICAL_LINKABLE_STATES),
    )
    if not linked:
        return
    state = StudyState(study["state"])
    if target_state(state, StudyEvent.CLINICAL_ATTACHED) is not None:
        apply_event(tx, study_uid, StudyEvent.CLINICAL_ATTACHED, now=now, reason=f"clinical record {match['id']}")


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

    # --- receiving ---

    def store_instance(
        self, encoded_bytes: bytes, header: InstanceHeader, *, now: float, source: str | None = None
    ) -> StoreOutcome:
        """Durably store one received instance (a Part-10 file as received), index it and file it under its study.

        Returns only after the file is fsynced in place and its row committed
        (`Spool.place_instance`): acknowledge the C-STORE after this returns,
        never before.  A SOP Instance UID already stored is not written again
        (see `StoreOutcome`).  The first instance creates the study
        (``receiving``); a later one sends a waiting or expired study back to
        ``receiving``.  ``source`` is who sent it (`node.audit.dicom_peer`),
        for the audit event committed with the index row.
        """
        return self.spool.place_instance(
            encoded_bytes, header, now=now, on_indexed=functools.partial(instance_indexed, source=source)
        )

    def recover(self, *, now: float) -> RecoveryReport:
        """`node.recovery.recover` at start-up: an instance file found without its row is filed as if just received."""
        return recovery.recover(
            self.spool, now=now, on_indexed=functools.partial(instance_indexed, source=RECOVERY_SOURCE)
        )

    # --- clinical records ---

    def add_clinical_record(
        self,
        record_json: str,
        *,
        accession_number: str | None,
        patient_id: str | None,
        study_instance_uid: str | None,
        now: float,
        source: str | None = None,
    ) -> ClinicalRecordRow:
        """Store a validated clinical record (JSON text) and attach it to every study it matches.

        Matching: by accession number when the record and the study both have
        one; otherwise by patient ID and Study Instance UID together.  The
        newest matching record is the study's record, so sending a corrected
        record replaces the earlier one until scoring starts.  Studies that
        arrive later are matched when their first instance is indexed.
        """
        try:
            parsed = json.loads(record_json)
        except json.JSONDecodeError as exc:
            raise InputError(f"clinical record is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InputError("clinical record must be a JSON object")
        accession_number = (accession_number or "").strip() or None
        patient_id = (patient_id or "").strip() or None
        study_instance_uid = (study_instance_uid or "").strip() or None
        if accession_number is None and (patient_id is None or study_instance_uid is None):
            raise InputError("clinical record needs an accession number, or a patient ID and a study instance UID")
        with self.spool.transaction() as tx:
            record_id = tx.insert(
                "insert_clinical_record",
                record_json=record_json,
                accession_number=accession_number,
                patient_id=patient_id,
                study_uid=study_instance_uid,
                now=now,
            )
            for row in tx.all(
                "studies_matching_clinical_record",
                accession_number=accession_number,
                patient_id=patient_id,
                study_uid=study_instance_uid,
            ):
                link_clinical_record(tx, row["study_instance_uid"], now=now)
            stored = tx.row("clinical_record_by_id", record_id=record_id)
            linked = [r["study_instance_uid"] for r in tx.all("studies_linked_to_record", record_id=record_id)]
            for study_uid in linked or [None]:
                audit.record_in(
                    tx,
                    audit.AuditEvent(
                        audit.AuditEventType.RECORD_IMPORTED,
                        who=source or "unknown source",
                        at=now,
                        study_instance_uid=study_uid,
                        counts={"records": 1, "studies_attached": len(linked)},
                    ),
                )
        _log().info("clinical_record_stored", record_id=record_id)
        return ClinicalRecordRow.from_row(stored)

    def attach_clinical_records(self, *, now: float) -> list[Transition]:
        """Re-run matching for every study that can still take a record (a safety net for housekeeping)."""
        with self.spool.transaction() as tx:
            for row in tx.all("list_studies", states=_states_json(CLINICAL_LINKABLE_STATES), limit=-1):
                link_clinical_record(tx, row["study_instance_uid"], now=now)
            return list(tx.applied)

    # --- delivery ---

    def mark_delivered(self, item_id: int, *, now: float) -> Transition | None:
        """Record a successful C-STORE of the SR; the study becomes ``delivered`` when it was the last."""
        with self.spool.transaction() as tx:
            if not tx.execute("mark_delivery_delivered", item_id=item_id, now=now):
                raise InvalidTransition(f"outbox item {item_id} is not pending or sending")
            item = tx.row("outbox_item", item_id=item_id)
            study_uid = item["study_instance_uid"]
            audit.record_in(
                tx,
                audit.AuditEvent(
                    audit.AuditEventType.SR_SENT,
                    who="sclc-node outbox",
                    at=now,
                    study_instance_uid=study_uid,
                    destination=item["destination"],
                    counts={"sr": 1},
                ),
            )
            if tx.row("undelivered_count_for_study", study_uid=study_uid)["n"]:
                return None
            study = _study_row(tx, study_uid)
            if target_state(StudyState(study["state"]), StudyEvent.DELIVERED) is None:
                return None
            return apply_event(
                tx,
                study_uid,
                StudyEvent.DELIVERED,
                now=now,
                reason=f"SR {item['sr_sop_instance_uid']} accepted by every destination",
            )

    def mark_attempt_failed(
        self, item_id: int, *, now: float, error: str, backoff_s: float, max_attempts: int = 0
    ) -> OutboxItem:
        """Record a failed delivery attempt: retry after ``backoff_s``, or give up.

        ``max_attempts`` 0 retries forever.  Giving up marks the delivery
        ``failed`` and the study ``failed`` (reason names the destination and
        the error); `StudyMachine.retry` resends it.
        """
        with self.spool.transaction() as tx:
            item = tx.one("outbox_item", item_id=item_id)
            if item is None:
                raise InvalidTransition(f"no outbox item {item_id}")
            attempts = item["attempts"] + 1
            give_up = bool(max_attempts) and attempts >= max_attempts
            if not tx.execute(
                "mark_delivery_attempt_failed",
                item_id=item_id,
                state=str(OutboxState.FAILED if give_up else OutboxState.PENDING),
                next_attempt_at=now + backoff_s,
                error=error,
                now=now,
            ):
                raise InvalidTransition(f"outbox item {item_id} is not pending or sending")
            if give_up:
                study_uid = item["study_instance_uid"]
                audit.record_in(
                    tx,
                    audit.AuditEvent(
                        audit.AuditEventType.SR_SEND_GAVE_UP,
                        who="sclc-node outbox",
                        at=now,
                        study_instance_uid=study_uid,
                        destination=item["destination"],
                        counts={"sr": 1, "attempts": attempts},
                        outcome=audit.Outcome.SERIOUS_FAILURE,
                    ),
                )
                study = _study_row(tx, study_uid)
                if target_state(StudyState(study["state"]), StudyEvent.DELIVERY_FAILED) is not None:
                    apply_event(
                        tx,
                        study_uid,
                        StudyEvent.DELIVERY_FAILED,
                        now=now,
                        reason=f"SR delivery to {item['destination']} gave up after {attempts} attempts: {error}",
                    )
            row = tx.row("outbox_item", item_id=item_id)
        return OutboxItem.from_row(row, self.spool.directory)

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
            return _claim_in(tx, study_uid, worker_id=worker_id, now=now, lease_s=lease_s)

    def claim_next(self, *, worker_id: str, now: float, lease_s: float) -> StudyRecord | None:
        """Claim the study that has been ready longest, or return None."""
        with self.spool.transaction() as tx:
            rows = tx.all("studies_in_states_oldest_first", states=json.dumps([str(StudyState.READY)]), limit=1)
            if not rows:
                return None
            study_uid = rows[0]["study_instance_uid"]
            return _claim_in(tx, study_uid, worker_id=worker_id, now=now, lease_s=lease_s)

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
            row = _study_row(tx, study_uid)
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
            row = _study_row(tx, study_uid)
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
