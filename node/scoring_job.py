"""Score one study from files: the shared path of `sclc-node score` and the node's workers."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import pydicom

from sclc_risk_node.dicom_io.ct_series import read_ct_series
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSource
from sclc_risk_node.dicom_io.rtstruct import DEFAULT_ROI_NAME_PATTERN, RT_STRUCTURE_SET_STORAGE, read_tumour_rtstruct
from sclc_risk_node.dicom_io.seg import read_tumour_segment
from sclc_risk_node.dicom_io.sr_writer import build_risk_sr
from sclc_risk_node.models import shipped_model_path
from sclc_risk_node.node.logs import get_logger
from sclc_risk_node.scoring.clinical import ClinicalRecord
from sclc_risk_node.scoring.errors import InputError, ModelFileError
from sclc_risk_node.scoring.model import FrozenModel
from sclc_risk_node.scoring.pipeline import score_volume_timed
from sclc_risk_node.scoring.types import DomainStatus, RiskResult

DEMO_MODEL_FILENAME = "demo-integrated-cox-3.0.0.json"


def default_model_path() -> Path:
    """The shipped demonstration model (flagged `demonstration`; not for clinical use)."""
    return shipped_model_path(DEMO_MODEL_FILENAME)


def load_model_file(path: Path) -> FrozenModel:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"model file {path} cannot be read: {exc}") from None
    try:
        return FrozenModel.from_json(text)
    except ModelFileError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None


@dataclass(frozen=True)
class ScoredStudy:
    """One scored study.  ``report_out_of_domain`` is the policy it was reported under (config key)."""

    ct: CtSeries
    #: The tumour: a SEG segment, or an RTSTRUCT ROI (``segment.kind`` says which).
    segment: TumourSource
    result: RiskResult
    sr: hd.sr.Comprehensive3DSR
    scoring_seconds: float
    report_out_of_domain: bool = False
    #: Wall seconds per stage, in order: read (CT + SEG), ring (crop + ring), extract, model, sr (built).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def withheld(self) -> bool:
        """True when the risk group and PFS are withheld: out of the model's domain and the policy says so."""
        return self.result.applicability.status is DomainStatus.OUT_OF_DOMAIN and not self.report_out_of_domain


def select_record_for_study(records: Sequence[ClinicalRecord], ct: CtSeries) -> ClinicalRecord:
    """The one record that belongs to this CT study.

    A single record is taken if it names no other study; among several, the
    one whose study_instance_uid or accession_number matches is taken.
    """
    if len(records) == 1:
        check_record_matches_study(records[0], ct)
        return records[0]
    ct_accession = str(ct.headers[0].get("AccessionNumber", "") or "")
    matching = [
        r
        for r in records
        if r.study_instance_uid == ct.study_instance_uid or (ct_accession and r.accession_number == ct_accession)
    ]
    if len(matching) != 1:
        raise InputError(
            f"{len(records)} clinical records given and {len(matching)} match study "
            f"{ct.study_instance_uid} (by study_instance_uid or accession_number); expected exactly one"
        )
    check_record_matches_study(matching[0], ct)
    return matching[0]


def check_record_matches_study(clinical: ClinicalRecord, ct: CtSeries) -> None:
    """A clinical record that names a different study must never be scored against this one."""
    if clinical.study_instance_uid and clinical.study_instance_uid != ct.study_instance_uid:
        raise InputError(
            f"clinical record is for study {clinical.study_instance_uid}, "
            f"but the CT series belongs to study {ct.study_instance_uid}"
        )
    ct_accession = str(ct.headers[0].get("AccessionNumber", "") or "")
    if clinical.accession_number and ct_accession and clinical.accession_number != ct_accession:
        raise InputError("clinical record's accession_number differs from the CT's AccessionNumber")


def score_files(
    ct_dir: Path,
    seg_path: Path,
    clinical_records: Sequence[ClinicalRecord],
    model: FrozenModel,
    *,
    series_instance_uid: str | None = None,
    segment_label: str | None = None,
    allow_lossy_ct: bool = False,
    rtstruct_roi_pattern: str | None = None,
    rtstruct_roi_name: str | None = None,
    report_out_of_domain: bool = False,
    tumour_kind: str | None = None,
) -> ScoredStudy:
    """Read, score and build the SR.  ``seg_path`` is the tumour's DICOM SEG or RT Structure Set (told
    apart by SOP class, or as ``tumour_kind`` "SEG"/"RTSTRUCT" says, when given).
    ``report_out_of_domain`` is config ``scoring.report_out_of_domain``: False withholds the risk group
    and PFS of a study outside the model's applicability domain.  A lossy-compressed CT is refused
    unless ``allow_lossy_ct`` (config ``scoring.allow_lossy_ct``)."""
    started = time.perf_counter()
    ct = read_ct_series(Path(ct_dir), series_instance_uid, allow_lossy=allow_lossy_ct)
    clinical = select_record_for_study(clinical_records, ct)
    segment = read_tumour_source(
        Path(seg_path),
        ct,
        segment_label=segment_label,
        rtstruct_roi_pattern=rtstruct_roi_pattern,
        rtstruct_roi_name=rtstruct_roi_name,
        kind=tumour_kind,
    )
    read = time.perf_counter()
    result, stages = score_volume_timed(ct.image, segment.mask, clinical, model)
    sr_started = time.perf_counter()
    sr = build_risk_sr(ct, segment, clinical, result, report_out_of_domain=report_out_of_domain)
    finished = time.perf_counter()
    stage_seconds = {
        "read": read - started,
        "ring": stages.ring_s,
        "extract": stages.extract_s,
        "model": stages.model_s,
        "sr": finished - sr_started,
    }
    scored = ScoredStudy(ct, segment, result, sr, finished - started, report_out_of_domain, stage_seconds)
    _log_applicability(scored)
    return scored


def _log_applicability(scored: ScoredStudy) -> None:
    """One event per scored study: its domain verdict and the offending quantities (names, no PHI)."""
    applicability = scored.result.applicability
    log = get_logger(stage="scoring")
    fields = dict(
        study_uid=scored.ct.study_instance_uid,
        applicability=applicability.status.value,
        violations=[violation.name for violation in applicability.violations],
        withheld=scored.withheld,
        model=scored.result.model.name,
        model_version=scored.result.model.version,
    )
    if applicability.status is DomainStatus.OUT_OF_DOMAIN:
        log.warning("study_out_of_domain", **fields)
    else:
        log.info("study_applicability", **fields)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def applicability_as_json(scored: ScoredStudy) -> dict:
    """The ``applicability`` object of the JSON result (README, "JSON result")."""
    applicability = scored.result.applicability
    return {
        "status": applicability.status.value,
        "in_domain": applicability.in_domain,
        "rule": applicability.rule,
        "violations": [
            {
                "name": v.name,
                "value": v.value,
                "low": _finite_or_none(v.low),
                "high": _finite_or_none(v.high),
                "z": _finite_or_none(v.z),
            }
            for v in applicability.violations
        ],
    }


def read_tumour_source(
    path: Path,
    ct: CtSeries,
    *,
    segment_label: str | None = None,
    rtstruct_roi_pattern: str | None = None,
    rtstruct_roi_name: str | None = None,
    kind: str | None = None,
) -> TumourSource:
    """The tumour mask from a DICOM SEG (dicom_io.seg) or an RT Structure Set (dicom_io.rtstruct).

    ``kind`` ("SEG" or "RTSTRUCT") insists on one, so a file of the other kind is an error
    naming what it is; None goes by the file's SOP class.
    """
    if not path.is_file():
        raise DicomInputError(f"tumour file {path} (SEG or RTSTRUCT) does not exist")
    try:
        sop_class = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get("SOPClassUID")
    except Exception:  # noqa: BLE001 - the SEG reader names the problem
        sop_class = None
    if kind == "RTSTRUCT" or (kind is None and sop_class == RT_STRUCTURE_SET_STORAGE):
        return read_tumour_rtstruct(
            path, ct, roi_name=rtstruct_roi_name, roi_name_pattern=rtstruct_roi_pattern or DEFAULT_ROI_NAME_PATTERN
        )
    return read_tumour_segment(path, ct, segment_label=segment_label)


def result_as_json(scored: ScoredStudy) -> dict:
    """The documented JSON result of `sclc-node score --json` (also what workers hand back to the service)."""
    result = scored.result
    withheld = scored.withheld
    return {
        # Withheld (out of domain, scoring.report_out_of_domain false): the groups and PFS are null.
        "withheld": withheld,
        "applicability": applicability_as_json(scored),
        "risk_group": None if withheld else result.risk_group.value,
        "risk_score": result.risk_score,
        "risk_cutoff": result.risk_cutoff,
        "radiomics_score": result.radiomics_score,
        "radiomics_cutoff": result.radiomics_cutoff,
        "radiomics_group": None if withheld else result.radiomics_group.value,
        "pfs_probability": {
            str(months): None if withheld else p for months, p in sorted(result.pfs_probability.items())
        },
        "features": dict(result.features.values),
        "contributions": {
            "radiomics": {t.name: t.contribution for t in result.radiomics_terms},
            "integrated": {t.name: t.contribution for t in result.integrated_terms},
        },
        "model": {
            "name": result.model.name,
            "version": result.model.version,
            "sha256": result.model.sha256,
            "demonstration": result.model.demonstration,
            "intended_use": result.model.intended_use,
        },
        # True only when scoring.allow_lossy_ct let a lossy-compressed CT through (see dicom_io.ct_series).
        "lossy_compression": scored.ct.lossy_compression,
        "study_instance_uid": scored.ct.study_instance_uid,
        "ct_series_instance_uid": scored.ct.series_instance_uid,
        "seg_sop_instance_uid": scored.segment.sop_instance_uid if scored.segment.kind == "SEG" else None,
        # Where the tumour came from: a SEG segment or an RTSTRUCT ROI.
        "tumour_source": {
            "kind": scored.segment.kind,
            "sop_instance_uid": scored.segment.sop_instance_uid,
            "label": scored.segment.segment_label,
            "number": scored.segment.segment_number,
        },
        "sr_sop_instance_uid": str(scored.sr.SOPInstanceUID),
        "sr_series_instance_uid": str(scored.sr.SeriesInstanceUID),
        "scoring_seconds": round(scored.scoring_seconds, 3),
        "stage_seconds": {stage: round(seconds, 3) for stage, seconds in scored.stage_seconds.items()},
    }
