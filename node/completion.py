"""When a study is complete, or given up on: ``(snapshot, now, settings) -> decision | None``.  Pure.

Completion is judged from content, not from a fixed idle timer:

* **Images complete** when at least one SEG or RT Structure Set (RTSTRUCT,
  treated exactly like a SEG below: its ContourImageSequence instances are its
  references) is present, every SEG's
  references are satisfied (below), and no instance arrived for
  ``grace_s`` seconds (a short guard against judging a series mid-transfer).
  Every SEG must be satisfied, not just one, so a later SEG (a corrected
  segmentation) is never scored against a CT series that has not arrived.
* A SEG's references are satisfied when
    1. it lists referenced CT SOP instances (the normal case): every one of
       them is present, in any series of the study;
    2. it names only referenced series: each such series has at least
       `MIN_SERIES_INSTANCES` instances.  Without an instance list we cannot
       know the series' size, so the grace period after the last instance is
       what says "the series has stopped arriving";
    3. it names only a frame of reference: some image series in that frame
       of reference has at least `MIN_SERIES_INSTANCES` instances (same caveat);
    4. it references nothing: never; the study expires with that reason.
* **Ready** additionally needs a clinical record.  The images_complete event
  leads to waiting_for_clinical; the next evaluation (the caller loops) sees
  the record and emits clinical_attached.
* **Expired** when a study in receiving or waiting_for_clinical saw no
  activity (instance or state change) for ``study_expiry_s``; the reason
  lists what was missing.  Completion is checked before expiry, so a node
  that was down past the expiry time still completes a complete study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sclc_risk_node.node.records import StudySnapshot
from sclc_risk_node.node.states import StudyEvent, StudyState

#: A series of fewer instances is not a CT volume we could score.
MIN_SERIES_INSTANCES = 2

#: The states this module makes decisions for; others wait for workers, senders or people.
WATCHED_STATES = frozenset({StudyState.RECEIVING, StudyState.WAITING_FOR_CLINICAL})


class CompletionSettings(Protocol):
    """What completion reads from the config (``NodeConfig.completion`` fits)."""

    @property
    def grace_s(self) -> float: ...

    @property
    def study_expiry_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class CompletionDecision:
    """An event to apply to the study, and the reason recorded with it."""

    event: StudyEvent
    reason: str


def assess_images(snapshot: StudySnapshot) -> tuple[list[str], list[str]]:
    """(what is satisfied, what is missing) about the study's images; no gaps means complete."""
    if not snapshot.segmentations:
        return [], ["no SEG or RTSTRUCT received"]
    present = snapshot.image_sop_instance_uids
    series_sizes = {s.series_instance_uid: len(s.sop_instance_uids) for s in snapshot.image_series}
    satisfied: list[str] = []
    gaps: list[str] = []
    for seg in snapshot.segmentations:
        name = f"{seg.kind} {seg.sop_instance_uid}"
        if seg.referenced_sop_instance_uids:
            total = len(seg.referenced_sop_instance_uids)
            missing = sum(1 for uid in seg.referenced_sop_instance_uids if uid not in present)
            if missing:
                gaps.append(f"{name} references {total} CT instances, {missing} missing")
            else:
                satisfied.append(f"{name}: all {total} referenced CT instances present")
        elif seg.referenced_series_instance_uids:
            for series_uid in seg.referenced_series_instance_uids:
                count = series_sizes.get(series_uid, 0)
                if count < MIN_SERIES_INSTANCES:
                    gaps.append(
                        f"{name} references series {series_uid} (no instance list), which has {count} "
                        f"instance(s); need at least {MIN_SERIES_INSTANCES}"
                    )
                else:
                    satisfied.append(f"{name}: referenced series {series_uid} has {count} instances (no instance list)")
        elif seg.frame_of_reference_uid:
            counts = [
                len(s.sop_instance_uids)
                for s in snapshot.image_series
                if s.frame_of_reference_uid == seg.frame_of_reference_uid
            ]
            largest = max(counts, default=0)
            if largest < MIN_SERIES_INSTANCES:
                gaps.append(
                    f"{name} references only frame of reference {seg.frame_of_reference_uid}; no image series "
                    f"in it has {MIN_SERIES_INSTANCES} or more instances"
                )
            else:
                satisfied.append(f"{name}: a series in its frame of reference has {largest} instances")
        else:
            gaps.append(f"{name} references no CT series, instance or frame of reference")
    return satisfied, gaps


def evaluate(snapshot: StudySnapshot, now: float, settings: CompletionSettings) -> CompletionDecision | None:
    """The next lifecycle event completion calls for, or None (keep waiting / not ours to decide)."""
    study = snapshot.study
    idle_s = study.idle_s(now)
    expired = idle_s >= settings.study_expiry_s
    if study.state is StudyState.RECEIVING:
        satisfied, gaps = assess_images(snapshot)
        quiet_s = now - study.last_instance_at
        if not gaps and quiet_s >= settings.grace_s:
            return CompletionDecision(StudyEvent.IMAGES_COMPLETE, "; ".join(satisfied))
        if expired:
            missing = gaps or [f"images complete but an instance arrived {quiet_s:.0f} s ago"]
            if not snapshot.has_clinical_record:
                missing = [*missing, "no clinical record"]
            return CompletionDecision(
                StudyEvent.EXPIRED, f"nothing new for {idle_s:.0f} s; missing: " + "; ".join(missing)
            )
        return None
    if study.state is StudyState.WAITING_FOR_CLINICAL:
        if snapshot.has_clinical_record:
            return CompletionDecision(StudyEvent.CLINICAL_ATTACHED, f"clinical record {study.clinical_record_id}")
        if expired:
            return CompletionDecision(
                StudyEvent.EXPIRED, f"nothing new for {idle_s:.0f} s; missing: no clinical record (images complete)"
            )
    return None
