"""Score one study from files: the shared path of `sclc-node score` and the node's workers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import highdicom as hd

from dicom_io.ct_series import read_ct_series
from dicom_io.errors import DicomInputError
from dicom_io.inputs import CtSeries, TumourSegment
from dicom_io.seg import read_tumour_segment
from dicom_io.sr_writer import build_risk_sr
from node.logs import get_logger
from scoring.clinical import ClinicalRecord
from scoring.errors import InputError, ModelFileError
from scoring.model import FrozenModel
from scoring.pipeline import score_volume
from scoring.types import DomainStatus, RiskResult
from sclc_risk_node_models import shipped_model_path

DEMO_MODEL_FILENAME = "demo-integrated-cox-2.0.0.json"


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
    segment: TumourSegment
    result: RiskResult
    sr: hd.sr.Comprehensive3DSR
    scoring_seconds: float
    report_out_of_domain: bool = False

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
        if r.study_instance_uid == ct.study_instance_uid
        or (ct_accession and r.accession_number == ct_accession)
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
    report_out_of_domain: bool = False,
) -> ScoredStudy:
    """Read, score and build the SR.  ``report_out_of_domain`` is config ``scoring.report_out_of_domain``:
    False withholds the risk group and PFS of a study outside the model's applicability domain."""
    started = time.perf_counter()
    ct = read_ct_series(Path(ct_dir), series_instance_uid)
    clinical = select_record_for_study(clinical_records, ct)
    if not Path(seg_path).is_file():
        raise DicomInputError(f"SEG file {seg_path} does not exist")
    segment = read_tumour_segment(Path(seg_path), ct, segment_label=segment_label)
    result = score_volume(ct.image, segment.mask, clinical, model)
    sr = build_risk_sr(ct, segment, clinical, result, report_out_of_domain=report_out_of_domain)
    scored = ScoredStudy(ct, segment, result, sr, time.perf_counter() - started, report_out_of_domain)
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
            {"name": v.name, "value": v.value, "low": _finite_or_none(v.low), "high": _finite_or_none(v.high),
             "z": _finite_or_none(v.z)}
            for v in applicability.violations
        ],
    }


def result_as_json(scored: "ScoredStudy") -> dict:
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
        "study_instance_uid": scored.ct.study_instance_uid,
        "ct_series_instance_uid": scored.ct.series_instance_uid,
        "seg_sop_instance_uid": str(scored.segment.segmentation.SOPInstanceUID),
        "sr_sop_instance_uid": str(scored.sr.SOPInstanceUID),
        "sr_series_instance_uid": str(scored.sr.SeriesInstanceUID),
        "scoring_seconds": round(scored.scoring_seconds, 3),
    }
