"""The study lifecycle on a real spool: every (state, event) pair, leases, concurrency, operator actions."""

from __future__ import annotations

import itertools
import threading

import pytest

from sclc_risk_node.node.config import CompletionConfig
from sclc_risk_node.node.errors import InvalidTransition, LeaseLost, UnknownStudy
from sclc_risk_node.node.retention import remove_study_files
from sclc_risk_node.node.states import TRANSITIONS, OutboxState, StudyEvent, StudyState
from sclc_risk_node.node.study_machine import StudyMachine
from tests.node.test_spool import T0, StudyBuilder, ct_instance, open_spool

S, E = StudyState, StudyEvent
SETTINGS = CompletionConfig(grace_s=5.0, study_expiry_s=3600.0)
LATER = T0 + 1000  # past every lease and hold the drivers below set up
_study_numbers = itertools.count(1000)


def drive_to(spool, state: StudyState) -> StudyBuilder:
    """A new study brought to ``state`` through the real API only."""
    machine = StudyMachine(spool)
    study = StudyBuilder(next(_study_numbers))
    uid = study.study_uid
    study.store_all(spool, now=T0)
    if state is S.RECEIVING:
        return study
    if state is S.EXPIRED:
        machine.apply(uid, E.EXPIRED, now=T0 + 1, reason="no clinical record")
        return study
    machine.apply(uid, E.IMAGES_COMPLETE, now=T0 + 1)
    if state is S.WAITING_FOR_CLINICAL:
        return study
    study.clinical(spool, now=T0 + 2)
    if state is S.READY:
        return study
    machine.claim(uid, worker_id="w1", now=T0 + 3, lease_s=60)
    if state is S.SCORING:
        return study
    sr_bytes, _ = ct_instance(uid, f"{uid}.3", f"{uid}.3.1")
    machine.record_scored(
        uid, worker_id="w1", sr_sop_instance_uid=f"{uid}.3.1", sr_bytes=sr_bytes, destinations=["pacs"], now=T0 + 4
    )
    if state is S.SCORED:
        return study
    [item] = spool.study_deliveries(uid)
    if state is S.FAILED:
        StudyMachine(spool).mark_attempt_failed(item.item_id, now=T0 + 5, error="refused", backoff_s=1, max_attempts=1)
    else:
        StudyMachine(spool).mark_delivered(item.item_id, now=T0 + 5)
    assert spool.get_study(uid).state is state
    return study


@pytest.fixture(scope="module")
def shared_spool(tmp_path_factory):
    with open_spool(tmp_path_factory.mktemp("machine") / "spool") as spool:
        yield spool


@pytest.fixture
def spool(tmp_path):
    with open_spool(tmp_path / "spool") as opened:
        yield opened


@pytest.mark.parametrize("state, event", list(itertools.product(StudyState, StudyEvent)), ids=lambda v: str(v))
def test_every_state_event_pair(shared_spool, state, event):
    study = drive_to(shared_spool, state)
    history = shared_spool.study_events(study.study_uid)
    machine = StudyMachine(shared_spool)
    expected = TRANSITIONS.get((state, event))
    kwargs = dict(now=LATER, reason="test reason", worker_id="w1", lease_s=60)

    if expected is None:
        with pytest.raises(InvalidTransition) as caught:
            machine.apply(study.study_uid, event, **kwargs)
        assert (caught.value.state, caught.value.event) == (str(state), str(event))
        assert shared_spool.get_study(study.study_uid).state is state
        assert shared_spool.study_events(study.study_uid) == history
        return

    transition = machine.apply(study.study_uid, event, **kwargs)
    assert (transition.from_state, transition.to_state, transition.event) == (state, expected, event)
    record = shared_spool.get_study(study.study_uid)
    assert record.state is expected and record.state_changed_at == LATER
    assert shared_spool.study_events(study.study_uid) == [*history, transition]
    assert (record.failure_reason is not None) == (expected in (S.FAILED, S.EXPIRED))
    assert (record.claimed_by is not None) == (expected is S.SCORING)


def test_unknown_study_is_reported_as_such(spool):
    with pytest.raises(UnknownStudy):
        StudyMachine(spool).apply("1.2.3", E.RETRY, now=T0)


def test_failure_and_expiry_need_a_reason(spool):
    study = drive_to(spool, S.RECEIVING)
    with pytest.raises(ValueError, match="needs a reason"):
        StudyMachine(spool).apply(study.study_uid, E.EXPIRED, now=T0 + 1)


# --- concurrency ---------------------------------------------------------------------


def test_two_connections_claiming_the_same_ready_study_exactly_one_wins(tmp_path):
    directory = tmp_path / "spool"
    with open_spool(directory) as setup:
        studies = [drive_to(setup, S.READY) for _ in range(10)]
    spools = [open_spool(directory), open_spool(directory)]  # two connections, as two processes would have
    try:
        for study in studies:
            barrier = threading.Barrier(2)
            outcome: dict[str, str] = {}

            def claim(index: int) -> None:
                barrier.wait()
                try:
                    StudyMachine(spools[index]).claim(study.study_uid, worker_id=f"w{index}", now=T0 + 10, lease_s=60)
                    outcome[f"w{index}"] = "won"
                except InvalidTransition:
                    outcome[f"w{index}"] = "lost"

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(outcome.values()) == ["lost", "won"]
            [winner] = [w for w, result in outcome.items() if result == "won"]
            record = spools[0].get_study(study.study_uid)
            assert record.state is S.SCORING and record.claimed_by == winner and record.claim_attempts == 1
            assert [e.event for e in spools[1].study_events(study.study_uid)].count(E.CLAIMED) == 1
    finally:
        for each in spools:
            each.close()


def test_workers_racing_on_claim_next_take_each_study_once(tmp_path):
    directory = tmp_path / "spool"
    with open_spool(directory) as setup:
        expected = {drive_to(setup, S.READY).study_uid for _ in range(12)}
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(worker_id: str) -> None:
        with open_spool(directory) as own:
            machine = StudyMachine(own)
            while (study := machine.claim_next(worker_id=worker_id, now=T0 + 10, lease_s=60)) is not None:
                with lock:
                    claimed.append((study.study_instance_uid, worker_id))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(uid for uid, _ in claimed) == sorted(expected)


# --- leases --------------------------------------------------------------------------


def test_an_expired_lease_makes_the_study_claimable_again_and_fences_the_old_worker(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.SCORING)  # w1, lease until T0 + 63
    uid = study.study_uid
    assert machine.reclaim_stale_leases(now=T0 + 62) == []

    [transition] = machine.reclaim_stale_leases(now=T0 + 63)
    assert (transition.event, transition.to_state) == (E.LEASE_EXPIRED, S.READY)
    assert transition.reason == f"lease of worker w1 ran out at {T0 + 63}"
    machine.claim(uid, worker_id="w2", now=T0 + 64, lease_s=60)

    with pytest.raises(LeaseLost):
        machine.record_scoring_failed(uid, worker_id="w1", reason="too late", now=T0 + 65)
    with pytest.raises(LeaseLost):
        machine.renew_lease(uid, worker_id="w1", now=T0 + 65, lease_s=60)
    machine.renew_lease(uid, worker_id="w2", now=T0 + 100, lease_s=60)
    assert spool.get_study(uid).lease_until == T0 + 160
    assert machine.reclaim_stale_leases(now=T0 + 150) == []


def test_a_stale_worker_cannot_record_a_result(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.SCORING)
    machine.reclaim_stale_leases(now=LATER)
    machine.claim(study.study_uid, worker_id="w2", now=LATER, lease_s=60)
    sr_bytes, _ = ct_instance(study.study_uid, f"{study.study_uid}.3", f"{study.study_uid}.3.1")
    with pytest.raises(LeaseLost):
        machine.record_scored(
            study.study_uid,
            worker_id="w1",
            sr_sop_instance_uid=f"{study.study_uid}.3.1",
            sr_bytes=sr_bytes,
            destinations=["pacs"],
            now=LATER + 1,
        )
    assert spool.study_deliveries(study.study_uid) == []  # rolled back with the transition
    assert spool.get_study(study.study_uid).claimed_by == "w2"


def test_a_study_that_keeps_losing_its_worker_fails_instead_of_looping(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.READY)
    now = T0 + 10
    for attempt in range(3):
        machine.claim(study.study_uid, worker_id=f"w{attempt}", now=now, lease_s=60)
        now += 61
        [transition] = machine.reclaim_stale_leases(now=now, max_claim_attempts=3)
    assert transition.to_state is S.FAILED
    assert (
        spool.get_study(study.study_uid).failure_reason == "scoring lost its worker 3 times (killed or out of memory?)"
    )


def test_claims_of_a_service_instance_that_is_gone_are_released_at_start_up_and_do_not_count(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.READY)
    now = T0 + 10
    for restart in range(5):  # more restarts than max_claim_attempts
        machine.claim(study.study_uid, worker_id=f"host:1:run{restart}", now=now, lease_s=900)
        now += 1  # the service is killed; the next one starts a second later, long before the lease ends
        [transition] = machine.reclaim_previous_instances(current_worker_id=f"host:1:run{restart + 1}", now=now)
        assert (transition.event, transition.to_state) == (E.SERVICE_RESTARTED, S.READY)
        assert "not counted as a worker failure" in transition.reason
    record = spool.get_study(study.study_uid)
    assert record.state is S.READY and record.claim_attempts == 0 and record.claimed_by is None
    assert machine.reclaim_stale_leases(now=now + 10_000) == []  # nothing left claimed


def test_start_up_reclaim_keeps_the_current_instances_own_claims(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.READY)
    machine.claim(study.study_uid, worker_id="host:2:me", now=T0 + 10, lease_s=900)
    assert machine.reclaim_previous_instances(current_worker_id="host:2:me", now=T0 + 11) == []
    assert spool.get_study(study.study_uid).state is S.SCORING


def test_a_worker_that_died_under_a_live_service_still_counts(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.READY)
    machine.claim(study.study_uid, worker_id="host:3:a", now=T0 + 10, lease_s=60)
    machine.reclaim_previous_instances(current_worker_id="host:3:b", now=T0 + 11)  # a restart: not counted
    machine.claim(study.study_uid, worker_id="host:3:b", now=T0 + 12, lease_s=60)
    [transition] = machine.reclaim_stale_leases(now=T0 + 80)  # b lives, its worker did not answer
    assert transition.event is E.LEASE_EXPIRED
    assert spool.get_study(study.study_uid).claim_attempts == 1


def test_retry_of_a_study_left_in_scoring_needs_a_dead_claim(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.SCORING)  # lease until T0 + 63
    with pytest.raises(InvalidTransition, match="being scored by w1"):
        machine.retry(study.study_uid, now=T0 + 10, service_running=True)
    transition = machine.retry(study.study_uid, now=T0 + 10, service_running=False)
    assert (transition.from_state, transition.to_state) == (S.SCORING, S.RECEIVING)
    record = spool.get_study(study.study_uid)
    assert record.claimed_by is None and record.claim_attempts == 0


def test_only_one_service_may_hold_a_spool(spool, tmp_path):
    from sclc_risk_node.node.errors import SpoolBusy
    from sclc_risk_node.node.spool import Spool

    assert not spool.service_running()
    spool.lock_service("host:4:first")
    try:
        with Spool.open(spool.directory, database=spool.database, min_free_bytes=0) as other:
            assert other.service_running()
            with pytest.raises(SpoolBusy, match="already served by host:4:first"):
                other.lock_service("host:4:second")
    finally:
        spool.unlock_service()
    with Spool.open(spool.directory, database=spool.database, min_free_bytes=0) as other:
        assert not other.service_running()


# --- scoring results ---------------------------------------------------------------------


def test_record_scored_queues_the_sr_in_the_same_transaction(spool):
    study = drive_to(spool, S.SCORED)
    record = spool.get_study(study.study_uid)
    assert record.state is S.SCORED and record.claimed_by is None and record.lease_until is None
    [item] = spool.study_deliveries(study.study_uid)
    assert item.state is OutboxState.PENDING and item.sr_path.is_file()


# --- completion driven through the machine ---------------------------------------------


def test_the_lifecycle_from_first_instance_to_ready(spool):
    machine = StudyMachine(spool)
    study = StudyBuilder(1)
    uid = study.study_uid
    StudyMachine(spool).store_instance(*study.ct(0), now=T0)
    StudyMachine(spool).store_instance(*study.seg(), now=T0 + 1)
    StudyMachine(spool).store_instance(*study.ct(1), now=T0 + 2)
    assert machine.advance(uid, now=T0 + 100, settings=SETTINGS) == []  # one referenced CT still missing

    StudyMachine(spool).store_instance(*study.ct(2), now=T0 + 200)
    assert machine.advance(uid, now=T0 + 204, settings=SETTINGS) == []  # within the grace period
    [complete] = machine.advance(uid, now=T0 + 205, settings=SETTINGS)
    assert complete.to_state is S.WAITING_FOR_CLINICAL
    assert complete.reason == f"SEG {study.seg_uid}: all 3 referenced CT instances present"

    study.clinical(spool, now=T0 + 300)
    assert [(e.from_state, e.to_state, e.event) for e in spool.study_events(uid)] == [
        (None, S.RECEIVING, E.INSTANCE_STORED),
        (S.RECEIVING, S.WAITING_FOR_CLINICAL, E.IMAGES_COMPLETE),
        (S.WAITING_FOR_CLINICAL, S.READY, E.CLINICAL_ATTACHED),
    ]


def test_a_clinical_record_that_came_first_makes_images_complete_lead_straight_to_ready(spool):
    study = StudyBuilder(1)
    study.clinical(spool, now=T0)
    study.store_all(spool, now=T0 + 1)
    transitions = StudyMachine(spool).advance(study.study_uid, now=T0 + 10, settings=SETTINGS)
    assert [t.to_state for t in transitions] == [S.WAITING_FOR_CLINICAL, S.READY]
    assert spool.get_study(study.study_uid).state is S.READY


def test_advance_all_completes_and_expires_with_reasons(spool):
    machine = StudyMachine(spool)
    complete = StudyBuilder(1)
    complete.store_all(spool, now=T0)
    incomplete = StudyBuilder(2)
    StudyMachine(spool).store_instance(*incomplete.seg(), now=T0)
    StudyMachine(spool).store_instance(*incomplete.ct(0), now=T0)

    transitions = machine.advance_all(now=T0 + 3600, settings=SETTINGS)

    assert {(t.study_instance_uid, t.to_state) for t in transitions} == {
        (complete.study_uid, S.WAITING_FOR_CLINICAL),
        (incomplete.study_uid, S.EXPIRED),
    }
    assert spool.get_study(incomplete.study_uid).failure_reason == (
        f"nothing new for 3600 s; missing: SEG {incomplete.seg_uid} references 3 CT instances, 2 missing; no clinical record"
    )
    assert machine.advance_all(now=T0 + 3601, settings=SETTINGS) == []


# --- operator ------------------------------------------------------------------------------


def test_retry_after_a_scoring_failure_starts_over_from_receiving(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.SCORING)
    machine.record_scoring_failed(study.study_uid, worker_id="w1", reason="empty tumour mask", now=T0 + 10)
    transition = machine.retry(study.study_uid, now=T0 + 20)
    assert (transition.event, transition.to_state) == (E.RETRY, S.RECEIVING)
    record = spool.get_study(study.study_uid)
    assert record.failure_reason is None and record.claim_attempts == 0
    assert [t.to_state for t in machine.advance(study.study_uid, now=T0 + 21, settings=SETTINGS)] == [
        S.WAITING_FOR_CLINICAL,
        S.READY,
    ]


def test_retry_after_a_delivery_failure_resends_only_what_gave_up(spool):
    machine = StudyMachine(spool)
    study = drive_to(spool, S.SCORING)
    sr_bytes, _ = ct_instance(study.study_uid, f"{study.study_uid}.3", f"{study.study_uid}.3.1")
    machine.record_scored(
        study.study_uid,
        worker_id="w1",
        sr_sop_instance_uid=f"{study.study_uid}.3.1",
        sr_bytes=sr_bytes,
        destinations=["pacs-a", "pacs-b"],
        now=T0 + 10,
    )
    a, b = spool.study_deliveries(study.study_uid)
    StudyMachine(spool).mark_delivered(a.item_id, now=T0 + 11)
    StudyMachine(spool).mark_attempt_failed(b.item_id, now=T0 + 12, error="refused", backoff_s=1, max_attempts=1)
    assert spool.get_study(study.study_uid).state is S.FAILED

    transition = machine.retry(study.study_uid, now=T0 + 20)

    assert (transition.event, transition.to_state) == (E.RESEND, S.SCORED)
    states = {item.destination: (item.state, item.attempts) for item in spool.study_deliveries(study.study_uid)}
    assert states == {"pacs-a": (OutboxState.DELIVERED, 0), "pacs-b": (OutboxState.PENDING, 0)}
    StudyMachine(spool).mark_delivered(b.item_id, now=T0 + 21)
    assert spool.get_study(study.study_uid).state is S.DELIVERED


def test_retry_of_a_delivered_study_sends_its_sr_again(spool):
    study = drive_to(spool, S.DELIVERED)
    transition = StudyMachine(spool).retry(study.study_uid, now=T0 + 20)
    assert (transition.event, transition.to_state) == (E.RESEND, S.SCORED)
    assert [i.state for i in spool.study_deliveries(study.study_uid)] == [OutboxState.PENDING]


def test_retry_refuses_a_purged_study(spool):
    study = drive_to(spool, S.EXPIRED)
    remove_study_files(spool, study.study_uid, now=T0 + 10)
    with pytest.raises(InvalidTransition, match="purged"):
        StudyMachine(spool).retry(study.study_uid, now=T0 + 20)


def test_retry_of_a_study_in_progress_is_refused(spool):
    study = drive_to(spool, S.RECEIVING)
    with pytest.raises(InvalidTransition):
        StudyMachine(spool).retry(study.study_uid, now=T0 + 20)


def test_resend_without_an_sr_is_refused(spool):
    study = drive_to(spool, S.SCORING)
    StudyMachine(spool).record_scoring_failed(study.study_uid, worker_id="w1", reason="empty mask", now=T0 + 10)
    with pytest.raises(InvalidTransition, match="no SR"):
        StudyMachine(spool).apply(study.study_uid, E.RESEND, now=T0 + 20)
