"""Frozen values the node's stages hand each other: no pydicom Dataset or sqlite row crosses a stage.

Times are float epoch seconds (UTC), the same ``now`` every API takes.
Patient IDs are carried where matching needs them but kept out of ``repr``,
so a logged record cannot leak one.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sclc_risk_node.node.errors import UnsafeUid
from sclc_risk_node.node.states import OutboxState, StudyEvent, StudyState

#: PS3.5 9.1: digits in dot-separated components; we also refuse the empty string.
#: Leading zeros are tolerated (they occur in the wild and are harmless in a path).
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_CHARS = 64

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def safe_uid(value: object, what: str) -> str:
    """``value`` as a UID that is safe in a file name, or `UnsafeUid`."""
    text = str(value).strip().rstrip("\0") if value is not None else ""
    if len(text) > UID_MAX_CHARS or not _UID_PATTERN.fullmatch(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UnsafeUid(f"{what} {shown!r} is not a DICOM UID (digits and dots, at most {UID_MAX_CHARS} characters)")
    return text


def _text_or_none(value: object) -> str | None:
    text = str(value).strip().rstrip("\0").strip() if value is not None else ""
    return text or None


def _uids(values: Iterable[object]) -> tuple[str, ...]:
    """Distinct non-empty UIDs in first-seen order."""
    seen: dict[str, None] = {}
    for value in values:
        text = _text_or_none(value)
        if text:
            seen.setdefault(text, None)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the spool needs to know about a received instance, read from its header.

    The three UIDs that form the file path are validated here (`safe_uid`);
    a constructed header is always safe to store.  For a SEG,
    ``referenced_series_instance_uids`` / ``referenced_sop_instance_uids``
    are the CT series and instances it was drawn on (see `from_dataset`).
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    referenced_series_instance_uids: tuple[str, ...] = ()
    referenced_sop_instance_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "study_instance_uid", safe_uid(self.study_instance_uid, "StudyInstanceUID"))
        set_(self, "series_instance_uid", safe_uid(self.series_instance_uid, "SeriesInstanceUID"))
        set_(self, "sop_instance_uid", safe_uid(self.sop_instance_uid, "SOPInstanceUID"))
        set_(self, "sop_class_uid", _text_or_none(self.sop_class_uid) or "")
        set_(self, "modality", (_text_or_none(self.modality) or "").upper())
        set_(self, "frame_of_reference_uid", _text_or_none(self.frame_of_reference_uid))
        set_(self, "accession_number", _text_or_none(self.accession_number))
        set_(self, "patient_id", _text_or_none(self.patient_id))
        set_(self, "referenced_series_instance_uids", _uids(self.referenced_series_instance_uids))
        set_(self, "referenced_sop_instance_uids", _uids(self.referenced_sop_instance_uids))

    @property
    def is_segmentation(self) -> bool:
        return self.modality == "SEG" or self.sop_class_uid == SEGMENTATION_STORAGE

    @property
    def is_rtstruct(self) -> bool:
        return self.sop_class_uid == RT_STRUCTURE_SET_STORAGE

    @property
    def is_tumour_source(self) -> bool:
        """A SEG or an RT Structure Set: an object drawn on CT instances, which completion waits for."""
        return self.is_segmentation or self.is_rtstruct

    @classmethod
    def from_dataset(cls, ds: Any) -> InstanceHeader:
        """Read a header from a pydicom Dataset (pixel data not needed).

        A SEG's references are collected from both places the standard puts
        them, since producers fill one or the other: the Common Instance
        Reference module (ReferencedSeriesSequence > ReferencedInstanceSequence)
        and each frame's Derivation Image > Source Image sequences (per-frame
        and shared functional groups).
        """
        header = cls(
            study_instance_uid=ds.get("StudyInstanceUID", ""),
            series_instance_uid=ds.get("SeriesInstanceUID", ""),
            sop_instance_uid=ds.get("SOPInstanceUID", ""),
            sop_class_uid=ds.get("SOPClassUID", ""),
            modality=ds.get("Modality", ""),
            frame_of_reference_uid=ds.get("FrameOfReferenceUID"),
            accession_number=ds.get("AccessionNumber"),
            patient_id=ds.get("PatientID"),
        )
        if header.is_rtstruct:
            return header._with_rtstruct_references(ds)
        if not header.is_segmentation:
            return header
        series: list[object] = []
        instances: list[object] = []
        for item in ds.get("ReferencedSeriesSequence") or ():
            series.append(item.get("SeriesInstanceUID"))
            instances.extend(
                ref.get("ReferencedSOPInstanceUID") for ref in item.get("ReferencedInstanceSequence") or ()
            )
        groups = list(ds.get("SharedFunctionalGroupsSequence") or ()) + list(
            ds.get("PerFrameFunctionalGroupsSequence") or ()
        )
        for group in groups:
            for derivation in group.get("DerivationImageSequence") or ():
                for source in derivation.get("SourceImageSequence") or ():
                    instances.append(source.get("ReferencedSOPInstanceUID"))
        return cls(
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            modality=header.modality,
            frame_of_reference_uid=header.frame_of_reference_uid,
            accession_number=header.accession_number,
            patient_id=header.patient_id,
            referenced_series_instance_uids=_uids(series),
            referenced_sop_instance_uids=_uids(instances),
        )

    def _with_rtstruct_references(self, ds: Any) -> InstanceHeader:
        frame_of_reference, series, instances = _rtstruct_references(ds)
        return InstanceHeader(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            modality=self.modality,
            frame_of_reference_uid=self.frame_of_reference_uid or frame_of_reference,
            accession_number=self.accession_number,
            patient_id=self.patient_id,
            referenced_series_instance_uids=_uids(series),
            referenced_sop_instance_uids=_uids(instances),
        )


def _rtstruct_references(ds: Any) -> tuple[str | None, list[object], list[object]]:
    """(frame of reference, series, instances) an RT Structure Set was drawn on.

    The frame of reference and series come from the Structure Set module's
    ReferencedFrameOfReferenceSequence > RTReferencedStudySequence >
    RTReferencedSeriesSequence (whose ContourImageSequence lists the CT
    instances); each contour's own ContourImageSequence adds the instances it
    was drawn on, since producers fill one or the other.
    """
    frames = list(ds.get("ReferencedFrameOfReferenceSequence") or ())
    frame_of_reference = next((f.get("FrameOfReferenceUID") for f in frames if f.get("FrameOfReferenceUID")), None)
    series: list[object] = []
    instances: list[object] = []
    for frame in frames:
        for study in frame.get("RTReferencedStudySequence") or ():
            for item in study.get("RTReferencedSeriesSequence") or ():
                series.append(item.get("SeriesInstanceUID"))
                instances.extend(ref.get("ReferencedSOPInstanceUID") for ref in item.get("ContourImageSequence") or ())
    for roi in ds.get("ROIContourSequence") or ():
        for contour in roi.get("ContourSequence") or ():
            instances.extend(ref.get("ReferencedSOPInstanceUID") for ref in contour.get("ContourImageSequence") or ())
    return frame_of_reference, series, instances


class StoreOutcome(enum.StrEnum):
    """What `StudyMachine.store_instance` did.  All three mean "safely on disk": acknowledge success."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    """Same SOP Instance UID, same bytes: nothing to do."""
    DUPLICATE_KEPT_FIRST = "duplicate_kept_first"
    """Same SOP Instance UID, different bytes (typically re-encoded in another transfer
    syntax by a PACS): the first copy stays, because it may already be judged complete
    or scored, and DICOM says one UID is one object."""


@dataclass(frozen=True, slots=True)
class StudyRecord:
    """One row of ``studies`` plus its live instance count."""

    study_instance_uid: str
    state: StudyState
    accession_number: str | None
    created_at: float
    last_instance_at: float
    state_changed_at: float
    failure_reason: str | None
    clinical_record_id: int | None
    claimed_by: str | None
    lease_until: float | None
    claim_attempts: int
    purged_at: float | None
    instance_count: int = 0
    patient_id: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StudyRecord:
        return cls(
            study_instance_uid=row["study_instance_uid"],
            state=StudyState(row["state"]),
            accession_number=row["accession_number"],
            created_at=row["created_at"],
            last_instance_at=row["last_instance_at"],
            state_changed_at=row["state_changed_at"],
            failure_reason=row["failure_reason"],
            clinical_record_id=row["clinical_record_id"],
            claimed_by=row["claimed_by"],
            lease_until=row["lease_until"],
            claim_attempts=row["claim_attempts"],
            purged_at=row["purged_at"],
            instance_count=row.get("instance_count") or 0,
            patient_id=row["patient_id"],
        )

    def age_s(self, now: float) -> float:
        return now - self.created_at

    def idle_s(self, now: float) -> float:
        """Seconds since anything happened to it (an instance or a state change)."""
        return now - max(self.last_instance_at, self.state_changed_at)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str | None
    referenced_series_instance_uids: tuple[str, ...]
    referenced_sop_instance_uids: tuple[str, ...]
    path: Path
    size_bytes: int
    sha256: str
    stored_at: float
    purged_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], root: Path) -> InstanceRecord:
        return cls(
            sop_instance_uid=row["sop_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            series_instance_uid=row["series_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            modality=row["modality"],
            frame_of_reference_uid=row["frame_of_reference_uid"],
            referenced_series_instance_uids=tuple(json.loads(row["referenced_series_json"])),
            referenced_sop_instance_uids=tuple(json.loads(row["referenced_instances_json"])),
            path=root / row["relative_path"],
            size_bytes=row["size_bytes"],
            sha256=row["sha256"],
            stored_at=row["stored_at"],
            purged_at=row["purged_at"],
        )

    @property
    def is_segmentation(self) -> bool:
        return self.modality == "SEG" or self.sop_class_uid == SEGMENTATION_STORAGE

    @property
    def is_rtstruct(self) -> bool:
        return self.sop_class_uid == RT_STRUCTURE_SET_STORAGE

    @property
    def is_tumour_source(self) -> bool:
        return self.is_segmentation or self.is_rtstruct


@dataclass(frozen=True, slots=True)
class SegmentationRefs:
    """What one received SEG (or RT Structure Set, ``kind`` "RTSTRUCT") says it was drawn on."""

    sop_instance_uid: str
    frame_of_reference_uid: str | None
    referenced_series_instance_uids: tuple[str, ...]
    referenced_sop_instance_uids: tuple[str, ...]
    kind: str = "SEG"


@dataclass(frozen=True, slots=True)
class ImageSeries:
    """The non-SEG instances of one series that are on disk."""

    series_instance_uid: str
    frame_of_reference_uid: str | None
    sop_instance_uids: frozenset[str]


@dataclass(frozen=True, slots=True)
class StudySnapshot:
    """Everything completion needs about one study, read in one transaction.

    Only instances whose files are present count (purged ones do not).
    """

    study: StudyRecord
    segmentations: tuple[SegmentationRefs, ...]
    image_series: tuple[ImageSeries, ...]

    @property
    def has_clinical_record(self) -> bool:
        return self.study.clinical_record_id is not None

    @property
    def image_sop_instance_uids(self) -> frozenset[str]:
        return frozenset().union(*(series.sop_instance_uids for series in self.image_series))


@dataclass(frozen=True, slots=True)
class Transition:
    """One applied state change, as written to ``study_events``."""

    study_instance_uid: str
    from_state: StudyState | None
    to_state: StudyState
    event: StudyEvent
    reason: str | None
    at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Transition:
        return cls(
            study_instance_uid=row["study_instance_uid"],
            from_state=StudyState(row["from_state"]) if row["from_state"] else None,
            to_state=StudyState(row["to_state"]),
            event=StudyEvent(row["event"]),
            reason=row["reason"],
            at=row["at"],
        )


@dataclass(frozen=True, slots=True)
class ClinicalRecordRow:
    """A stored clinical record: the validated JSON text and its match keys."""

    record_id: int
    record_json: str
    accession_number: str | None
    study_instance_uid: str | None
    received_at: float
    patient_id: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ClinicalRecordRow:
        return cls(
            record_id=row["id"],
            record_json=row["record_json"],
            accession_number=row["accession_number"],
            study_instance_uid=row["study_instance_uid"],
            received_at=row["received_at"],
            patient_id=row["patient_id"],
        )


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One SR's delivery to one destination."""

    item_id: int
    study_instance_uid: str
    sr_sop_instance_uid: str
    sr_path: Path
    destination: str
    state: OutboxState
    attempts: int
    next_attempt_at: float
    sending_until: float | None
    last_error: str | None
    delivered_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any], root: Path) -> OutboxItem:
        return cls(
            item_id=row["id"],
            study_instance_uid=row["study_instance_uid"],
            sr_sop_instance_uid=row["sr_sop_instance_uid"],
            sr_path=root / row["relative_path"],
            destination=row["destination"],
            state=OutboxState(row["state"]),
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            sending_until=row["sending_until"],
            last_error=row["last_error"],
            delivered_at=row["delivered_at"],
        )


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What `node.recovery.recover` found and did on startup."""

    temp_files_removed: int = 0
    reindexed_sop_instance_uids: tuple[str, ...] = ()
    purges_finished: int = 0
    losing_duplicates_removed: int = 0
    quarantined: tuple[Path, ...] = ()
    missing_files: tuple[str, ...] = ()
    """SOP Instance UIDs indexed as present whose file is gone (disk trouble or manual deletion)."""
