"""The transition table itself: pure checks, no database."""

from __future__ import annotations

import itertools

import pytest

from sclc_risk_node.node.states import (
    CLINICAL_LINKABLE_STATES,
    FINISHED_STATES,
    LEASE_HOLDER_EVENTS,
    REASON_REQUIRED,
    TRANSITIONS,
    StudyEvent,
    StudyState,
    sources_of,
    target_state,
)

S, E = StudyState, StudyEvent


def test_the_happy_path_is_in_the_table():
    state = S.RECEIVING
    for event in (E.IMAGES_COMPLETE, E.CLINICAL_ATTACHED, E.CLAIMED, E.SCORED, E.DELIVERED):
        state = target_state(state, event)
    assert state is S.DELIVERED


def test_every_transition_changes_state():
    assert all(source is not target for (source, _), target in TRANSITIONS.items())


def test_every_state_is_reachable_from_receiving():
    reached, frontier = {S.RECEIVING}, [S.RECEIVING]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(S)


def test_no_state_is_a_dead_end():
    """Even delivered can be resent, failed/expired can be retried: an operator always has a way on."""
    assert {source for source, _ in TRANSITIONS} == set(S)


@pytest.mark.parametrize("state", [S.FAILED, S.EXPIRED])
def test_failed_and_expired_are_revived_by_new_input_and_by_retry(state):
    for event in (E.INSTANCE_STORED, E.CLINICAL_ATTACHED, E.RETRY):
        assert target_state(state, event) is S.RECEIVING


def test_studies_being_scored_or_done_ignore_new_instances():
    for state in (S.RECEIVING, S.SCORING, S.SCORED, S.DELIVERED):
        assert target_state(state, E.INSTANCE_STORED) is None


def test_ready_never_expires_and_only_scoring_holds_a_lease():
    assert sources_of(E.EXPIRED) == {S.RECEIVING, S.WAITING_FOR_CLINICAL}
    for event in (*LEASE_HOLDER_EVENTS, E.LEASE_EXPIRED):
        assert sources_of(event) == {S.SCORING}
    assert sources_of(E.CLAIMED) == {S.READY}


def test_resend_leads_back_to_scored_and_retry_to_receiving():
    assert {TRANSITIONS[(s, E.RESEND)] for s in sources_of(E.RESEND)} == {S.SCORED}
    assert {TRANSITIONS[(s, E.RETRY)] for s in sources_of(E.RETRY)} == {S.RECEIVING}


def test_states_entered_with_a_reason_are_failed_and_expired():
    assert REASON_REQUIRED == {S.FAILED, S.EXPIRED}
    assert {
        TRANSITIONS[(s, e)]
        for s, e in itertools.product(S, E)
        if (s, e) in TRANSITIONS and e in (E.SCORING_FAILED, E.DELIVERY_FAILED, E.EXPIRED)
    } == REASON_REQUIRED


def test_state_sets_are_consistent():
    assert FINISHED_STATES == {S.DELIVERED, S.FAILED, S.EXPIRED}
    assert not CLINICAL_LINKABLE_STATES & {S.SCORING, S.SCORED, S.DELIVERED}


def test_values_are_the_strings_stored_in_the_database():
    assert str(S.WAITING_FOR_CLINICAL) == "waiting_for_clinical"
    assert S("ready") is S.READY and E("lease_expired") is E.LEASE_EXPIRED


def test_table_cannot_be_modified():
    with pytest.raises(TypeError):
        TRANSITIONS[(S.DELIVERED, E.RETRY)] = S.RECEIVING  # type: ignore[index]
