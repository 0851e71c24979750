"""Content-aware completion: pure decisions over hand-built snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sclc_risk_node.node.completion import MIN_SERIES_INSTANCES, CompletionDecision, assess_images, evaluate
from sclc_risk_node.node.config import CompletionConfig
from sclc_risk_node.node.records import ImageSeries, SegmentationRefs, StudyRecord, StudySnapshot
from sclc_risk_node.node.states import StudyEvent, StudyState

T0 = 1_767_225_600.0
SETTINGS = CompletionConfig(grace_s=5.0, study_expiry_s=3600.0)
FOR = "1.2.3.900"
CT_SERIES = "1.2.3.1"
CT_UIDS = tuple(f"{CT_SERIES}.{k}" for k in range(1, 13))


def study(
    state=StudyState.RECEIVING, *, last_instance_at=T0, state_changed_at=T0, clinical_record_id=None
) -> StudyRecord:
    return StudyRecord(
        study_instance_uid="1.2.3",
        state=state,
        accession_number="ACC",
        created_at=T0 - 100,
        last_instance_at=last_instance_at,
        state_changed_at=state_changed_at,
        failure_reason=None,
        clinical_record_id=clinical_record_id,
        claimed_by=None,
        lease_until=None,
        claim_attempts=0,
        purged_at=None,
    )


def seg(*, sops=CT_UIDS, series=(CT_SERIES,), frame_of_reference=FOR, uid="1.2.3.2.1") -> SegmentationRefs:
    return SegmentationRefs(uid, frame_of_reference, tuple(series), tuple(sops))


def snapshot(*, record=None, segs=(), present=CT_UIDS, series_uid=CT_SERIES, frame_of_reference=FOR) -> StudySnapshot:
    image_series = (ImageSeries(series_uid, frame_of_reference, frozenset(present)),) if present else ()
    return StudySnapshot(study=record or study(), segmentations=tuple(segs), image_series=image_series)


def test_complete_images_after_the_grace_period_are_images_complete():
    decision = evaluate(snapshot(segs=[seg()]), T0 + 5, SETTINGS)
    assert decision == CompletionDecision(
        StudyEvent.IMAGES_COMPLETE, "SEG 1.2.3.2.1: all 12 referenced CT instances present"
    )


def test_nothing_happens_within_the_grace_period():
    assert evaluate(snapshot(segs=[seg()]), T0 + 4.9, SETTINGS) is None


def test_no_fixed_idle_timer_a_complete_study_does_not_wait_for_minutes():
    assert evaluate(snapshot(segs=[seg()]), T0 + SETTINGS.grace_s, SETTINGS).event is StudyEvent.IMAGES_COMPLETE


def test_missing_referenced_instances_keep_it_receiving_whatever_the_quiet_time():
    assert evaluate(snapshot(segs=[seg()], present=CT_UIDS[:9]), T0 + 3000, SETTINGS) is None
    assert assess_images(snapshot(segs=[seg()], present=CT_UIDS[:9]))[1] == [
        "SEG 1.2.3.2.1 references 12 CT instances, 3 missing"
    ]


def test_ct_without_seg_is_not_complete():
    assert evaluate(snapshot(), T0 + 1000, SETTINGS) is None
    assert assess_images(snapshot()) == ([], ["no SEG or RTSTRUCT received"])


def test_every_seg_must_be_satisfied():
    second = seg(uid="1.2.3.2.2", sops=(*CT_UIDS, "1.2.3.9.1"))
    assert evaluate(snapshot(segs=[seg(), second]), T0 + 10, SETTINGS) is None


def test_referenced_instances_may_sit_in_any_series_of_the_study():
    records = StudySnapshot(
        study=study(),
        segmentations=(seg(),),
        image_series=(
            ImageSeries(CT_SERIES, FOR, frozenset(CT_UIDS[:6])),
            ImageSeries("1.2.3.7", FOR, frozenset(CT_UIDS[6:])),
        ),
    )
    assert evaluate(records, T0 + 10, SETTINGS).event is StudyEvent.IMAGES_COMPLETE


@pytest.mark.parametrize("count, complete", [(1, False), (MIN_SERIES_INSTANCES, True), (40, True)])
def test_seg_naming_only_a_series_needs_enough_instances_in_it(count, complete):
    decision = evaluate(snapshot(segs=[seg(sops=())], present=CT_UIDS[:count]), T0 + 10, SETTINGS)
    assert (decision is not None and decision.event is StudyEvent.IMAGES_COMPLETE) is complete


def test_seg_naming_only_a_series_that_is_absent_says_so():
    gaps = assess_images(snapshot(segs=[seg(sops=(), series=("1.2.3.8",))]))[1]
    assert gaps == [
        "SEG 1.2.3.2.1 references series 1.2.3.8 (no instance list), which has 0 instance(s); need at least 2"
    ]


def test_seg_naming_only_a_frame_of_reference_uses_the_series_in_it():
    only_for = seg(sops=(), series=())
    assert evaluate(snapshot(segs=[only_for]), T0 + 10, SETTINGS).event is StudyEvent.IMAGES_COMPLETE
    assert evaluate(snapshot(segs=[only_for], frame_of_reference="1.2.3.901"), T0 + 10, SETTINGS) is None


def test_seg_referencing_nothing_never_completes_and_expires_saying_why():
    empty = seg(sops=(), series=(), frame_of_reference=None)
    assert evaluate(snapshot(segs=[empty]), T0 + 10, SETTINGS) is None
    decision = evaluate(snapshot(segs=[empty]), T0 + 3600, SETTINGS)
    assert decision.event is StudyEvent.EXPIRED
    assert "SEG 1.2.3.2.1 references no CT series, instance or frame of reference" in decision.reason


def test_expiry_reason_lists_everything_missing():
    decision = evaluate(snapshot(segs=[seg()], present=CT_UIDS[:9]), T0 + 3600, SETTINGS)
    assert decision == CompletionDecision(
        StudyEvent.EXPIRED,
        "nothing new for 3600 s; missing: SEG 1.2.3.2.1 references 12 CT instances, 3 missing; no clinical record",
    )
    assert (
        evaluate(snapshot(), T0 + 3600, SETTINGS).reason
        == "nothing new for 3600 s; missing: no SEG or RTSTRUCT received; no clinical record"
    )


def test_expiry_counts_from_the_last_activity_not_from_the_first_instance():
    revived = study(last_instance_at=T0, state_changed_at=T0 + 3000)  # e.g. retried by an operator
    assert evaluate(snapshot(record=revived), T0 + 3600, SETTINGS) is None
    assert evaluate(snapshot(record=revived), T0 + 6600, SETTINGS).event is StudyEvent.EXPIRED


def test_a_complete_study_completes_even_after_the_expiry_time():
    """The node was down for hours: what arrived is complete, so it is not thrown away."""
    assert evaluate(snapshot(segs=[seg()]), T0 + 10 * 3600, SETTINGS).event is StudyEvent.IMAGES_COMPLETE


def test_waiting_for_clinical_becomes_ready_once_a_record_is_there():
    waiting = study(StudyState.WAITING_FOR_CLINICAL, clinical_record_id=None)
    assert evaluate(snapshot(record=waiting, segs=[seg()]), T0 + 10, SETTINGS) is None
    with_record = replace(waiting, clinical_record_id=7)
    assert evaluate(snapshot(record=with_record, segs=[seg()]), T0 + 10, SETTINGS) == CompletionDecision(
        StudyEvent.CLINICAL_ATTACHED, "clinical record 7"
    )


def test_waiting_for_clinical_expires_with_that_reason():
    waiting = study(StudyState.WAITING_FOR_CLINICAL)
    decision = evaluate(snapshot(record=waiting, segs=[seg()]), T0 + 3600, SETTINGS)
    assert decision.event is StudyEvent.EXPIRED and decision.reason.endswith("no clinical record (images complete)")


@pytest.mark.parametrize(
    "state", [s for s in StudyState if s not in (StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL)]
)
def test_other_states_are_not_completions_business(state):
    assert evaluate(snapshot(record=study(state), segs=[seg()]), T0 + 10**6, SETTINGS) is None
