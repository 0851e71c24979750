"""A scored study as a DICOM Comprehensive 3D SR (TID 1500), and back.

``build_risk_sr`` encodes one ``RiskResult`` with highdicom as an "Imaging
Measurement Report" that OHIF loads, Orthanc stores and ``dsr2html`` renders
for a radiologist to read top to bottom; ``read_risk_sr`` parses such an SR
back into plain values.  ``derive_object_uids`` makes every object's UIDs a
function of its inputs, so re-scoring the same CT series and SEG with the
same model yields the same objects (a PACS then replaces rather than adds).

Content tree (concepts in ``dicom_io.codes``; numbers rounded to the digits
that mean something: scores 3 decimals, PFS 0.1 %, features 4 significant)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")  TID 1500
      HAS CONCEPT MOD  Language = en-US
      HAS OBS CONTEXT  Observer Type = Device; the node and its version
      HAS CONCEPT MOD  Procedure reported = (25045-6, LN, "CT unspecified body region")
      CONTAINS         Image Library: the key-slice CT image only (the one the ROI SR outlines)
      CONTAINS         CONTAINER Imaging Measurements
        CONTAINS       CONTAINER Measurement Group  TID 1411, SEPARATE
          Tracking Identifier, Tracking Unique Identifier (UIDREF)
          TEXT  Summary (121111, DCM): plain-language result, demonstration notice (once)
          CODE  Progression risk group = High risk / Low risk (SCT)   [withheld: see below]
          CODE  Model applicability domain = within / outside / unknown
          TEXT  Applicability assessment: the rule and each offending feature
          CODE  Risk estimates withheld = Yes / No
          CODE  Lossy-compressed CT input = Yes                       [only when true]
          NUM   PFS at 6 / 12 months [UCUM %]                         [withheld]
          NUM   Integrated risk score, cut-off; Radiomics score, cut-off [1] [withheld]
          NUM   one contribution (coefficient x value) per model term [1]  [withheld]
          NUM   one per radiomics feature [1]
          CODE  Demonstration model; Clinical T / N / M stage, ECOG, LIPI, LIPI source
          TEXT  Intended use (the model's own statement, notice not repeated)
          Finding = Neoplasm, Finding Site = Lung, Algorithm Identification (TID 4019:
          model name, version, "sha256=<hex>"), Referenced Segment + Source Series

``build_key_slice_roi_sr`` writes a second TID 1500 SR (same series) for viewers
that draw ROIs (OHIF)::

    CONTAINER Imaging Measurement Report ... Image Library: the key slice
      CONTAINS  CONTAINER Measurement Group  TID 1410, SEPARATE
        Tracking Identifier "Tumour: High risk (DEMO)", Tracking UID,
        Finding, Finding Site, SCOORD POLYLINE tumour outline on the key CT image,
        NUM PFS at 6 / 12 months [%], "High progression risk (DEMO model), risk
        score" [withheld: "Outside applicability domain: features out of range"],
        Area [mm2] (OHIF's label lines are these NUMs and the finding site),
        CODE Progression risk group [withheld]

Withholding: when ``result.applicability`` is out of domain and
``report_out_of_domain`` is False, the risk group, the scores and cut-offs,
the PFS and the contributions are left out (the features stay: they show
why), the summary says "outside the model's applicability domain" and lists
the offending features, and "Risk estimates withheld" is Yes.  With the flag
True everything is reported and the verdict stays in the summary and codes.
A schema-v1 model gives "domain unknown".
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypedDict, TypeVar, Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from sclc_risk_node.dicom_io import codes
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.header_values import sanitised_header
from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSource, TumourStructure
from sclc_risk_node.dicom_io.key_slice import KeySlice, find_key_slice
from sclc_risk_node.scoring.clinical import ClinicalRecord, Lipi
from sclc_risk_node.scoring.types import (
    Applicability,
    DomainStatus,
    DomainViolation,
    ModelIdentity,
    RiskGroup,
    RiskResult,
)

SOFTWARE_NAME = "sclc-risk-node"
_K = TypeVar("_K")  # the key type of a code table (a stage, an ECOG grade, a risk group)
#: The series of the SRs (and their key-slice ROI SR) unless the caller gives another.
RESULT_SERIES_NUMBER = 9001

#: Stated once, in the summary at the top, of every object written with a demonstration model.
DEMONSTRATION_NOTICE = "demonstration model — not for clinical use"

#: UTF-8, so the em dash and any patient name survive.
SPECIFIC_CHARACTER_SET = "ISO_IR 192"

# Fixed forever: changing it changes every UID the node derives.
_UID_NAMESPACE = uuid.UUID("6f0d8a52-3c1e-5b7a-9e44-2a9c1d7b5e10")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA256_PARAMETER = "sha256="
_DEVICE_OBSERVER_UID = hd.UID.from_uuid(str(uuid.uuid5(_UID_NAMESPACE, "device-observer/" + SOFTWARE_NAME)))


def _software_version() -> str:
    try:
        return importlib.metadata.version(SOFTWARE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _derived_uid(role: str, *parts: str) -> hd.UID:
    # A separator that cannot occur in a UID or hex digest keeps ("1.2", "3") apart from ("1.23",).
    return hd.UID.from_uuid(str(uuid.uuid5(_UID_NAMESPACE, "\x1f".join((role, *parts)))))


def _normalised_sha256(model_sha256: str) -> str:
    digest = model_sha256.strip().lower()
    if not _SHA256_HEX.fullmatch(digest):
        raise ValueError(f"model sha256 must be 64 hex digits, got {model_sha256!r}")
    return digest


def derive_sr_uids(ct_series_uid: str, seg_sop_uid: str, model_sha256: str) -> tuple[hd.UID, hd.UID]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for these inputs, as 2.25.<uuid5> UIDs.

    The same CT series, SEG instance and model (sha256 of the model file, hex)
    always give the same UIDs; any other model gives different ones.
    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` is not used
    because it ignores ``entropy_srcs`` when ``prefix`` is None (random UID).
    """
    parts = (str(ct_series_uid), str(seg_sop_uid), _normalised_sha256(model_sha256))
    return _derived_uid("sr-series", *parts), _derived_uid("sr-instance", *parts)


def _tracking_uid(ct_series_uid: str, seg_sop_uid: str, segment_number: int) -> hd.UID:
    # Independent of the model, so one tumour keeps one tracking UID across model versions.
    return _derived_uid("tracking", str(ct_series_uid), str(seg_sop_uid), str(segment_number))


def derive_object_uids(kind: str, ct_series_uid: str, seg_sop_uid: str, model_sha256: str) -> tuple[hd.UID, hd.UID]:
    """(SeriesInstanceUID, SOPInstanceUID) of the node's ``kind`` object ("sr", "kos", "pdf", "sc") for these inputs.

    Derived like the SR's (``derive_sr_uids``, whose values are unchanged):
    the same inputs and model always give the same UIDs, so every object is
    stored once however often the study is scored or sent.
    """
    if kind == "sr":
        return derive_sr_uids(ct_series_uid, seg_sop_uid, model_sha256)
    parts = (str(ct_series_uid), str(seg_sop_uid), _normalised_sha256(model_sha256))
    return _derived_uid(f"{kind}-series", *parts), _derived_uid(f"{kind}-instance", *parts)


def _strip_notice(text: str) -> str:
    # A demonstration model's own statement often starts with the notice; the summary states it already.
    stripped = text.strip()
    if stripped.lower().startswith(DEMONSTRATION_NOTICE.lower()):
        stripped = stripped[len(DEMONSTRATION_NOTICE) :].lstrip(" .:;,-—")
    return stripped


def intended_use_text(model: ModelIdentity) -> str:
    """The intended-use TEXT: the model's own statement, without a leading demonstration notice.

    The notice is stated once per SR, at the top (``summary_text``).  A
    clinical model must state its intended use; a demonstration model that
    states nothing else gets "" (and no TEXT item).
    """
    if not model.demonstration:
        if not model.intended_use.strip():
            raise ValueError(
                f"model {model.name} {model.version} is not a demonstration model but states no intended use"
            )
        return model.intended_use.strip()
    return _strip_notice(model.intended_use)


def _algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[_SHA256_PARAMETER + _normalised_sha256(model.sha256)],
    )


def _lookup(table: Mapping[_K, Code], key: _K, field: str) -> Code:
    try:
        return table[key]
    except KeyError:
        allowed = ", ".join(str(k) for k in table)
        raise ValueError(f"cannot encode {field} {key!r} in the SR (allowed: {allowed})") from None


def _finite(value: float, field: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{field} is not finite ({value})")
    return value


# --- rounding: the digits that mean something -------------------------------------

#: Scores, cut-offs and contributions: linear predictors whose coefficients have ~3 significant digits.
SCORE_DECIMALS = 3
#: PFS in percent: 0.1 % is below any clinically meaningful difference.
PERCENT_DECIMALS = 1
#: Radiomics feature values: 4 significant digits, above pyradiomics' run-to-run noise.
FEATURE_SIGNIFICANT_DIGITS = 4


def rounded_score(value: float) -> float:
    return round(value, SCORE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def percent(probability: float) -> float:
    return round(100.0 * probability, PERCENT_DECIMALS) + 0.0


def rounded_feature(value: float) -> float:
    return float(f"{value:.{FEATURE_SIGNIFICANT_DIGITS}g}") + 0.0


def _checked_pfs(result: RiskResult) -> dict[int, float]:
    checked = {}
    for months, probability in sorted(result.pfs_probability.items()):
        _lookup(codes.PFS_PROBABILITY, months, "PFS horizon (months)")
        probability = _finite(probability, f"PFS probability at {months} months")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"PFS probability at {months} months must be in [0, 1], got {probability}")
        checked[months] = probability
    return checked


def withholds_estimates(result: RiskResult, report_out_of_domain: bool) -> bool:
    """True when the risk group, scores and PFS must not be reported (out of domain, flag off)."""
    return result.applicability.status is DomainStatus.OUT_OF_DOMAIN and not report_out_of_domain


# --- plain language ------------------------------------------------------------------


def _violation_text(violation: DomainViolation) -> str:
    z = "" if math.isnan(violation.z) else f", z = {violation.z:+.1f}"
    return f"{violation.name} = {violation.value:.4g} (accepted {violation.low:.4g} to {violation.high:.4g}{z})"


def applicability_text(applicability: Applicability) -> str:
    """The applicability verdict in words: the rule, and each offending feature with its bounds."""
    status = applicability.status
    if status is DomainStatus.UNKNOWN:
        text = "Applicability domain unknown: the model records no applicability domain."
    elif status is DomainStatus.IN_DOMAIN:
        text = "Within the model's applicability domain."
    else:
        offending = "; ".join(_violation_text(v) for v in applicability.violations) or "not stated"
        text = f"Outside the model's applicability domain: {offending}."
    if applicability.rule:
        text += f" Rule: {applicability.rule}"
    return text


def summary_text(result: RiskResult, *, report_out_of_domain: bool = False, lossy_compression: bool = False) -> str:
    """The short plain-language result that opens every object the node writes."""
    sentences = []
    if result.model.demonstration:
        sentences.append(f"Result of a {DEMONSTRATION_NOTICE}.")
    status = result.applicability.status
    if withholds_estimates(result, report_out_of_domain):
        offending = ", ".join(v.name for v in result.applicability.violations) or "not stated"
        sentences.append(
            "No risk group or progression-free survival is reported: the study is outside the model's "
            f"applicability domain (offending: {offending})."
        )
    else:
        group = RiskGroup(result.risk_group)
        relation = "above" if group is RiskGroup.HIGH else "at or below"
        sentences.append(
            f"{group.value.capitalize()} progression risk: integrated risk score "
            f"{rounded_score(result.risk_score):.3f} is {relation} the cut-off {rounded_score(result.risk_cutoff):.3f}."
        )
        pfs = _checked_pfs(result)
        if pfs:
            parts = ", ".join(f"{percent(p):.1f} % at {months} months" for months, p in pfs.items())
            sentences.append(f"Predicted progression-free survival: {parts}.")
        if status is DomainStatus.OUT_OF_DOMAIN:
            offending = ", ".join(v.name for v in result.applicability.violations) or "not stated"
            sentences.append(
                f"Caution: the study is outside the model's applicability domain (offending: {offending}); "
                "reported because the node is configured to report such studies."
            )
        elif status is DomainStatus.IN_DOMAIN:
            sentences.append("The study is within the model's applicability domain.")
        else:
            sentences.append("Applicability domain unknown (the model records none).")
    if lossy_compression:
        sentences.append("The CT was lossy-compressed; its features may differ from those of the original images.")
    return " ".join(sentences)


def risk_label(result: RiskResult, *, report_out_of_domain: bool = False) -> str:
    """A few words for a viewer's label: "High risk", or why there is none."""
    if withholds_estimates(result, report_out_of_domain):
        return "outside applicability domain"
    label = f"{RiskGroup(result.risk_group).value.capitalize()} risk"
    if result.applicability.status is DomainStatus.OUT_OF_DOMAIN:
        label += " (outside domain)"
    return label


# --- content items ----------------------------------------------------------------------


def _text(
    name: Code,
    value: str,
    relationship: hd.sr.RelationshipTypeValues = hd.sr.RelationshipTypeValues.CONTAINS,
) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=relationship)


def _num(concept: Code, value: float, unit: Code, full_name: str | None = None) -> hd.sr.Measurement:
    measurement = hd.sr.Measurement(name=concept, value=value, unit=unit)
    if full_name is not None and full_name != concept.meaning and not concept.meaning.endswith(full_name):
        # The CodeMeaning had to be shortened (64 characters); say the whole name once, beside the value.
        measurement[0].ContentSequence = [
            *measurement[0].get("ContentSequence", []),
            _text(codes.FULL_NAME, full_name, hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD),
        ]
    return measurement


def _estimate_measurements(result: RiskResult) -> list[hd.sr.Measurement]:
    """PFS, scores and contributions: what is withheld for an out-of-domain study."""
    measurements = [
        _num(codes.PFS_PROBABILITY[months], percent(p), codes.UNIT_PERCENT)
        for months, p in _checked_pfs(result).items()
    ]
    for concept, value in (
        (codes.RISK_SCORE, result.risk_score),
        (codes.RISK_CUTOFF, result.risk_cutoff),
        (codes.RADIOMICS_SCORE, result.radiomics_score),
        (codes.RADIOMICS_CUTOFF, result.radiomics_cutoff),
    ):
        measurements.append(_num(concept, rounded_score(_finite(value, concept.meaning)), codes.UNIT_ONE))
    for integrated, terms in ((True, result.integrated_terms), (False, result.radiomics_terms)):
        for term in terms:
            concept = codes.term_contribution_concept(term.name, integrated=integrated)
            value = rounded_score(_finite(term.contribution, f"contribution of {term.name}"))
            measurements.append(_num(concept, value, codes.UNIT_ONE, full_name=term.name))
    return measurements


def _feature_measurements(result: RiskResult) -> list[hd.sr.Measurement]:
    return [
        _num(codes.radiomics_feature_concept(name), rounded_feature(value), codes.UNIT_ONE, full_name=name)
        for name, value in result.features.values.items()
    ]


def _coded(name: Code, value: Code) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=name, value=value)


def _clinical_evaluations(result: RiskResult, clinical: ClinicalRecord) -> list[hd.sr.QualitativeEvaluation]:
    pairs = [
        (codes.DEMONSTRATION_MODEL, codes.YES if result.model.demonstration else codes.NO),
        (codes.T_STAGE, _lookup(codes.T_STAGE_VALUES, clinical.t_stage, "T stage")),
        (codes.N_STAGE, _lookup(codes.N_STAGE_VALUES, clinical.n_stage, "N stage")),
        (codes.M_STAGE, _lookup(codes.M_STAGE_VALUES, clinical.m_stage, "M stage")),
        (codes.ECOG_PERFORMANCE_STATUS, _lookup(codes.ECOG_VALUES, clinical.ecog, "ECOG")),
        (codes.LIPI, _lookup(codes.LIPI_VALUES, Lipi(clinical.lipi), "LIPI")),
        (codes.LIPI_SOURCE, _lookup(codes.LIPI_SOURCE_VALUES, clinical.lipi_source, "LIPI source")),
    ]
    return [_coded(name, value) for name, value in pairs]


def _referenced_segment(seg: hd.seg.Segmentation, segment_number: int, ct_series_uid: str) -> hd.sr.ReferencedSegment:
    """TID 1411 rows 7 and 12: the segment, and the CT series it was drawn on.

    Built directly rather than with ``ReferencedSegment.from_segmentation``:
    highdicom 0.28.2's from_segmentation looks for SegmentIdentificationSequence
    only per frame and fails (AttributeError) on highdicom's own single-segment
    SEGs, which keep it in the shared functional groups; and it would list every
    CT slice, where one Source Series item says the same.
    """
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    if segment_number not in numbers:
        raise ValueError(f"SEG {seg.SOPInstanceUID} has no segment {segment_number} (has {numbers})")
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(ct_series_uid),
    )


_GROUP_ORDER: dict[tuple[str, str], int] = {
    ("112039", "DCM"): 0,  # Tracking Identifier
    ("112040", "DCM"): 0,  # Tracking Unique Identifier
    (codes.SUMMARY.value, codes.SUMMARY.scheme_designator): 1,
    (codes.RISK_GROUP.value, codes.PRIVATE_SCHEME): 2,
    (codes.APPLICABILITY.value, codes.PRIVATE_SCHEME): 3,
    (codes.APPLICABILITY_DETAIL.value, codes.PRIVATE_SCHEME): 4,
    (codes.RESULTS_WITHHELD.value, codes.PRIVATE_SCHEME): 5,
    (codes.LOSSY_INPUT.value, codes.PRIVATE_SCHEME): 6,
    ("121071", "DCM"): 7,  # Finding
    ("363698007", "SCT"): 7,  # Finding Site
}
_NUM_ORDER = 8
_CODE_ORDER = 9
_INTENDED_USE_ORDER = 10
_LAST = 11  # algorithm identification, referenced segment, source series


def _readable_order(group_item: Dataset) -> None:
    """Reorder a measurement group's items so the result reads first and the references last.

    Only the order of siblings changes; the template's items and their
    relationships are the same, and parsers look items up by concept name.
    """

    def rank(item: Dataset) -> int:
        name = item.ConceptNameCodeSequence[0]
        key = (str(name.get("CodeValue", "")), str(name.CodingSchemeDesignator))
        if key in _GROUP_ORDER:
            return _GROUP_ORDER[key]
        if key == (codes.INTENDED_USE.value, codes.PRIVATE_SCHEME):
            return _INTENDED_USE_ORDER
        if item.ValueType == "NUM":
            return _NUM_ORDER
        if item.ValueType == "CODE" and key[1] == codes.PRIVATE_SCHEME:
            return _CODE_ORDER
        return _LAST

    items = list(group_item.ContentSequence)
    group_item.ContentSequence = sorted(items, key=rank)  # stable: NUMs keep their order


#: Type 2 Patient/Study attributes highdicom copies from the first evidence dataset.
_COPIED_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def document_header(ct: CtSeries) -> Dataset:
    """The CT's first header, made fit to copy into a new object.

    Patient/study values are sanitised (``dicom_io.header_values``) and the
    type 2 attributes highdicom reads as attributes exist (empty when the CT
    lacks them, which is legal).  The caller's header is not changed.
    """
    header = sanitised_header(ct.headers[0])
    for keyword in _COPIED_TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def device_observer(manufacturer: str, software_version: str) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.OBSERVER_TYPE_DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_DEVICE_OBSERVER_UID,
            name=SOFTWARE_NAME,
            manufacturer_name=manufacturer,
            model_name=f"{SOFTWARE_NAME} {software_version}",
        ),
    )


def software_version_or_installed(software_version: str | None) -> str:
    return software_version or _software_version()


def _volumetric_group(
    ct: CtSeries,
    segment: TumourSource,
    clinical: ClinicalRecord,
    result: RiskResult,
    *,
    report_out_of_domain: bool,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    model = result.model
    withheld = withholds_estimates(result, report_out_of_domain)
    evaluations = []
    if not withheld:
        evaluations.append(
            _coded(codes.RISK_GROUP, _lookup(codes.RISK_GROUP_VALUES, RiskGroup(result.risk_group).value, "risk group"))
        )
    evaluations.append(_coded(codes.APPLICABILITY, codes.APPLICABILITY_VALUES[result.applicability.status.value]))
    evaluations.append(_coded(codes.RESULTS_WITHHELD, codes.YES if withheld else codes.NO))
    if ct.lossy_compression:
        evaluations.append(_coded(codes.LOSSY_INPUT, codes.YES))
    evaluations.extend(_clinical_evaluations(result, clinical))
    measurements = ([] if withheld else _estimate_measurements(result)) + _feature_measurements(result)
    tracking = hd.sr.TrackingIdentifier(
        uid=_tracking_uid(ct.series_instance_uid, segment.sop_instance_uid, segment.segment_number),
        identifier=_tracking_text(segment, result, report_out_of_domain, "progression risk"),
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        **_roi_reference(segment, ct),
        finding_type=codes.FINDING_NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.FINDING_SITE_LUNG)],
        algorithm_id=_algorithm_identification(model),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    item = group[0]
    # SEPARATE: each item is its own statement, so renderers (dsr2html) keep every label.
    item.ContinuityOfContent = "SEPARATE"
    # highdicom's QualitativeEvaluation is CODE only; the summary, verdict and intended use are free text.
    texts = [
        _text(
            codes.SUMMARY,
            summary_text(result, report_out_of_domain=report_out_of_domain, lossy_compression=ct.lossy_compression),
        ),
        _text(codes.APPLICABILITY_DETAIL, applicability_text(result.applicability)),
    ]
    intended_use = intended_use_text(model)
    if intended_use:
        texts.append(_text(codes.INTENDED_USE, intended_use))
    item.ContentSequence.extend(texts)
    _readable_order(item)
    return group


def _roi_reference(segment: TumourSource, ct: CtSeries) -> dict[str, Any]:
    """TID 1411's ROI: the SEG segment (Referenced Segment), or an RTSTRUCT ROI's own contours.

    TID 1411 names its ROI by Referenced Segment (a SEG only), Image Region,
    Volume Surface or Region In Space.  For an RT Structure Set the contours
    that were scored go in as the Volume Surface (SCOORD3D POLYGONs in the
    RTSTRUCT's frame of reference, one per contour, each CT image they lie on
    as a Source Image for Segmentation), which TID 1500 readers (and
    PixelMed's 2022 validator, without a warning) know; Region In Space (DCM 130488, a COMPOSITE reference) is
    newer and not yet understood by that validator.  The RTSTRUCT instance
    itself is cited as evidence (Current Requested Procedure Evidence).
    """
    if isinstance(segment, TumourStructure):
        if len(segment.contours_mm) < 2:
            raise ValueError(
                f"RTSTRUCT {segment.sop_instance_uid} ROI '{segment.roi_name}' has {len(segment.contours_mm)} contour; "
                "a Volume Surface needs at least 2"
            )
        # The CT images the contours lie on (each contour is planar, on one slice: dicom_io.rtstruct).
        slices = sorted(
            {
                ct.image.TransformPhysicalPointToIndex(tuple(float(v) for v in contour[0]))[2]
                for contour in segment.contours_mm
            }
        )
        return {
            "referenced_volume_surface": hd.sr.VolumeSurface(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                # SCOORD3D POLYGON: the first point is repeated at the end (PS3.3 C.18.9.1.2).
                graphic_data=[np.vstack([contour, contour[:1]]) for contour in segment.contours_mm],
                frame_of_reference_uid=segment.frame_of_reference_uid,
                source_images=[
                    hd.sr.SourceImageForSegmentation(ct.headers[k].SOPClassUID, ct.headers[k].SOPInstanceUID)
                    for k in slices
                ],
            )
        }
    return {
        "referenced_segment": _referenced_segment(segment.segmentation, segment.segment_number, ct.series_instance_uid)
    }


def _source_dataset(segment: TumourSource) -> Dataset:
    """The SEG or RTSTRUCT instance, cited as evidence."""
    return segment.dataset if isinstance(segment, TumourStructure) else segment.segmentation


def _tracking_text(segment: TumourSource, result: RiskResult, report_out_of_domain: bool, what: str) -> str:
    # Readers that list measurements by name (dsr2html, PACS SR views) show it; keep it short (TEXT, UT).
    demo = " (DEMO)" if result.model.demonstration else ""
    return f"{segment.segment_label}: {what}{demo}"


class SrDocumentOptions(TypedDict, total=False):
    """Document attributes either SR builder takes as keyword arguments (the two SRs share a series).

    ``series_number`` defaults to ``RESULT_SERIES_NUMBER``, ``manufacturer`` to
    ``SOFTWARE_NAME``, ``software_version`` to the installed package version,
    ``content_datetime`` (local time) to now; the institution names are left out
    unless given.
    """

    series_number: int
    manufacturer: str
    software_version: str | None
    institution_name: str | None
    institutional_department_name: str | None
    content_datetime: _dt.datetime | None


def build_risk_sr(
    ct: CtSeries,
    segment: TumourSource,
    clinical: ClinicalRecord,
    result: RiskResult,
    *,
    report_out_of_domain: bool = False,
    instance_number: int = 1,
    **options: Unpack[SrDocumentOptions],
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Comprehensive 3D SR for one scored study.

    Patient and study attributes are copied from the CT (the first header),
    sanitised (``dicom_io.header_values``).  The SEG is cited as evidence and
    referenced by segment number (an RTSTRUCT is cited as evidence and its
    contours are the Volume Surface, see ``_roi_reference``); the Image Library holds one image, the key
    slice (``dicom_io.key_slice``), which ``build_key_slice_roi_sr`` outlines.
    ``report_out_of_domain`` decides whether an out-of-domain study's risk
    group and PFS are reported (see the module docstring).
    The document attributes (series number, manufacturer, software version,
    institution, content date/time) are ``SrDocumentOptions``.  The SR is COMPLETE,
    UNVERIFIED and PRELIMINARY: a machine result for a radiologist to read,
    not the definitive report.  Raises ``ValueError`` for a value the SR
    cannot represent (unknown stage, non-finite score, PFS horizon other
    than 6 or 12 months, malformed sha256) and ``DicomInputError`` for a CT
    header that cannot be copied (an over-length PatientID).
    """
    series_uid, sop_instance_uid = derive_sr_uids(ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256)
    header = document_header(ct)
    group = _volumetric_group(ct, segment, clinical, result, report_out_of_domain=report_out_of_domain)
    return _sr_document(
        [group],
        key_slice_header=find_key_slice(ct, segment.mask).header,
        evidence=[header, *ct.headers[1:], _source_dataset(segment)],
        result=result,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        options=options,
    )


def build_key_slice_roi_sr(
    ct: CtSeries,
    segment: TumourSource,
    result: RiskResult,
    key_slice: KeySlice,
    *,
    report_out_of_domain: bool = False,
    instance_number: int = 2,
    **options: Unpack[SrDocumentOptions],
) -> hd.sr.Comprehensive3DSR:
    """A second TID 1500 SR, in the risk SR's series: the tumour outline on the key slice (TID 1410).

    This is what OHIF draws: a planar ROI (SCOORD POLYLINE on the key CT
    image) labelled with the risk group and PFS.  It is a document of its
    own because a TID 1500 report holding both a 1410 and a 1411 group is
    valid DICOM but fails PixelMed's validator, which applies the 1410
    template to every measurement group once one group has an image region.
    UIDs: the SR's series UID, instance ``derive_object_uids("sr-roi", ...)``.
    """
    series_uid, _ = derive_sr_uids(ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256)
    _, sop_instance_uid = derive_object_uids(
        "sr-roi", ct.series_instance_uid, segment.sop_instance_uid, result.model.sha256
    )
    header = document_header(ct)
    group = _planar_group(ct, segment, result, key_slice, report_out_of_domain=report_out_of_domain)
    evidence = [header if h.SOPInstanceUID == header.SOPInstanceUID else h for h in (ct.headers[0], key_slice.header)]
    evidence = list({str(h.SOPInstanceUID): h for h in evidence}.values())
    return _sr_document(
        [group],
        key_slice_header=key_slice.header,
        evidence=evidence,
        result=result,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        options=options,
    )


def _sr_document(
    groups: Sequence[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ],
    *,
    key_slice_header: Dataset,
    evidence: list[Dataset],
    result: RiskResult,
    series_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    options: SrDocumentOptions,
) -> hd.sr.Comprehensive3DSR:
    software_version = software_version_or_installed(options.get("software_version"))
    manufacturer = options.get("manufacturer", SOFTWARE_NAME)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(manufacturer, software_version)
        ),
        procedure_reported=codes.PROCEDURE_REPORTED_CT,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept.from_code(codes.LANGUAGE_ENGLISH)
        ),
        # One image, the key slice: OHIF needs the library, a reader needs no list of every slice.
        referenced_images=[key_slice_header],
    )
    when = options.get("content_datetime") or _dt.datetime.now()
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=options.get("series_number", RESULT_SERIES_NUMBER),
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=software_version,
        institution_name=options.get("institution_name"),
        institutional_department_name=options.get("institutional_department_name"),
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(result.model),
        coding_schemes=[codes.private_coding_scheme()],
        specific_character_set=SPECIFIC_CHARACTER_SET,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )


def _planar_group(
    ct: CtSeries, segment: TumourSource, result: RiskResult, key_slice: KeySlice, *, report_out_of_domain: bool
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 on the key slice: the tumour outline, labelled with the result, for viewers that draw ROIs.

    OHIF v3 draws SCOORD groups only and labels them from the NUM items
    ("name: value unit", at most five lines with the finding site); it never
    shows CODE items or the Tracking Identifier.  So the risk group (and DEMO)
    is in the risk-score NUM's concept name (``codes.RISK_SCORE_WITH_GROUP``),
    and a withheld result has a NUM that says it is outside the domain.
    """
    if not key_slice.outlines_px:
        raise ValueError(f"no tumour outline on key slice {key_slice.index}")
    withheld = withholds_estimates(result, report_out_of_domain)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=key_slice.outlines_px[0],
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=key_slice.header.SOPClassUID,
            referenced_sop_instance_uid=key_slice.sop_instance_uid,
        ),
    )
    measurements = [hd.sr.Measurement(name=codes.AREA, value=round(key_slice.area_mm2, 1), unit=codes.UNIT_MM2)]
    evaluations = []
    if withheld:
        measurements.insert(
            0,
            hd.sr.Measurement(
                name=codes.OUT_OF_DOMAIN_FEATURE_COUNT, value=len(result.applicability.violations), unit=codes.UNIT_ONE
            ),
        )
    else:
        group_value = RiskGroup(result.risk_group).value
        measurements = [
            *(
                hd.sr.Measurement(name=codes.PFS_PROBABILITY[m], value=percent(p), unit=codes.UNIT_PERCENT)
                for m, p in _checked_pfs(result).items()
            ),
            hd.sr.Measurement(
                name=codes.RISK_SCORE_WITH_GROUP[group_value, result.model.demonstration],
                value=rounded_score(result.risk_score),
                unit=codes.UNIT_ONE,
            ),
            *measurements,
        ]
        evaluations.append(
            _coded(codes.RISK_GROUP, _lookup(codes.RISK_GROUP_VALUES, RiskGroup(result.risk_group).value, "risk group"))
        )
    tracking = hd.sr.TrackingIdentifier(
        uid=_derived_uid(
            "tracking-key-slice", ct.series_instance_uid, segment.sop_instance_uid, str(segment.segment_number)
        ),
        identifier=_tracking_text(
            segment, result, report_out_of_domain, risk_label(result, report_out_of_domain=report_out_of_domain)
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=codes.FINDING_NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.FINDING_SITE_LUNG)],
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    group[0].ContinuityOfContent = "SEPARATE"
    return group


def series_description(model: ModelIdentity) -> str:
    """SeriesDescription (LO, ≤64 characters): says DEMO for a demonstration model."""
    if model.demonstration:
        return "SCLC progression risk (DEMO, not for clinical use)"
    return "SCLC progression risk"


# --- reading ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrClinicalInputs:
    """The clinical inputs an SR says the model was given (values as in ``ClinicalRecord``)."""

    t_stage: str
    n_stage: str
    m_stage: str
    ecog: int
    lipi: Lipi
    lipi_source: str


@dataclass(frozen=True, slots=True)
class RiskSrContent:
    """What ``read_risk_sr`` finds in one of our SRs.

    Values are as written (rounded, see ``build_risk_sr``).  Scores,
    cut-offs and contributions are dimensionless; ``pfs_probability`` maps
    months to a probability in [0, 1] (the SR's percent / 100).  When
    ``estimates_withheld`` (an out-of-domain study) ``risk_group``, the
    scores and cut-offs are None and the PFS and contribution maps are
    empty.  ``features`` maps ``FeatureSpec.name`` to the recorded value.
    ``model.intended_use`` and ``intended_use_text`` are the model's own
    statement as written (without the demonstration notice, which is in
    ``summary``).
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    risk_group: RiskGroup | None
    radiomics_score: float | None
    radiomics_cutoff: float | None
    risk_score: float | None
    risk_cutoff: float | None
    pfs_probability: Mapping[int, float]
    radiomics_contributions: Mapping[str, float]
    integrated_contributions: Mapping[str, float]
    applicability: DomainStatus
    applicability_text: str
    estimates_withheld: bool
    lossy_compression: bool
    summary: str
    model: ModelIdentity
    intended_use_text: str
    clinical: SrClinicalInputs
    features: Mapping[str, float]
    tracking_uid: str
    referenced_seg_sop_instance_uid: str
    referenced_segment_number: int
    #: The CT image the planar ROI (tumour outline) is drawn on, if the SR has one.
    key_slice_sop_instance_uid: str | None = None


def _reverse(table: Mapping[_K, Code]) -> dict[tuple[str, str], _K]:
    return {(code.value, code.scheme_designator): key for key, code in table.items()}


def _full_name(item: Dataset, meaning: str, kind: str) -> str:
    names = _children_text(item, codes.FULL_NAME)
    return names[0] if names else codes.name_from_meaning(meaning, kind)


def read_risk_sr(dataset: Dataset) -> RiskSrContent:
    """Parse an SR written by ``build_risk_sr`` (e.g. as retrieved from a PACS).

    Raises ``DicomInputError`` naming the missing or unexpected item when the
    dataset is not such an SR.
    """
    sop_uid = str(dataset.get("SOPInstanceUID", "?"))

    def fail(problem: str) -> DicomInputError:
        return DicomInputError(f"SR {sop_uid}: {problem}")

    if dataset.get("SOPClassUID") != Comprehensive3DSRStorage:
        raise fail(f"SOP class {dataset.get('SOPClassUID')} is not Comprehensive 3D SR")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
    except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
        raise fail(f"not a TID 1500 measurement report ({exc})") from None
    groups = report.get_volumetric_roi_measurement_groups()
    if len(groups) != 1:
        raise fail(f"expected 1 volumetric ROI measurement group, found {len(groups)}")
    group = groups[0]

    numbers: dict[tuple[str, str], float] = {}
    pfs_probability: dict[int, float] = {}
    features: dict[str, float] = {}
    contributions: dict[str, dict[str, float]] = {"radiomics_term": {}, "integrated_term": {}}
    for measurement in group.get_measurements():
        concept = measurement.name
        kind = codes.named_concept_kind(concept)
        months = codes.pfs_horizon_months(concept)
        if kind is not None:
            full_name = _full_name(measurement[0], concept.meaning, kind)
            (features if kind == "feature" else contributions[kind])[full_name] = measurement.value
        elif months is not None:
            pfs_probability[months] = round(measurement.value / 100.0, PERCENT_DECIMALS + 2)
        else:
            numbers[(concept.value, concept.scheme_designator)] = measurement.value

    evaluations: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for evaluation in group.get_qualitative_evaluations():
        # highdicom 0.28 annotates QualitativeEvaluation.value as int | float; it is the CODE item's concept.
        value: object = evaluation.value
        if not isinstance(value, hd.sr.CodedConcept):
            raise fail(f"{evaluation.name.meaning!r} has no coded value")
        evaluations[(evaluation.name.value, evaluation.name.scheme_designator)] = value

    def coded_if_present(concept: Code, table: Mapping[_K, Code]) -> _K | None:
        value = evaluations.get((concept.value, concept.scheme_designator))
        if value is None:
            return None
        key = _reverse(table).get((value.value, value.scheme_designator))
        if key is None:
            raise fail(f"{concept.meaning!r} has unexpected value {value.meaning!r}")
        return key

    def coded(concept: Code, table: Mapping[_K, Code]) -> _K:
        key = coded_if_present(concept, table)
        if key is None:
            raise fail(f"no CODE {concept.meaning!r}")
        return key

    yes_no = {True: codes.YES, False: codes.NO}
    withheld = coded(codes.RESULTS_WITHHELD, yes_no)

    def number(concept: Code) -> float | None:
        value = numbers.get((concept.value, concept.scheme_designator))
        if value is None and not withheld:
            raise fail(f"no NUM {concept.meaning!r}")
        return value

    algorithm = _algorithm_of(group[0])
    if algorithm is None:
        raise fail("no algorithm identification (model name, version, sha256) in the measurement group")
    demonstration = coded(codes.DEMONSTRATION_MODEL, yes_no)
    intended_use = _text_item(group[0], codes.INTENDED_USE) or ""
    summary = _text_item(group[0], codes.SUMMARY)
    if summary is None:
        raise fail(f"no TEXT {codes.SUMMARY.meaning!r}")
    segment_items = hd.sr.utils.find_content_items(
        group[0], name=_REFERENCED_SEGMENT, value_type=hd.sr.ValueTypeValues.IMAGE
    )
    if len(segment_items) != 1:
        raise fail(f"expected 1 Referenced Segment, found {len(segment_items)}")
    referenced = hd.sr.ImageContentItem.from_dataset(segment_items[0])
    segment_numbers = referenced.referenced_segment_numbers or []
    if len(segment_numbers) != 1:
        raise fail(f"Referenced Segment names {len(segment_numbers)} segment numbers, expected 1")
    risk_group = (coded_if_present if withheld else coded)(codes.RISK_GROUP, codes.RISK_GROUP_VALUES)
    lossy = coded_if_present(codes.LOSSY_INPUT, yes_no)
    key_slice_uid = None
    for planar in report.get_planar_roi_measurement_groups():
        region = planar.roi
        if region is not None:
            key_slice_uid = (
                str(region.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                if "ReferencedSOPSequence" in region
                else None
            )
            if key_slice_uid is None:
                key_slice_uid = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    name, version, sha256 = algorithm
    return RiskSrContent(
        sop_instance_uid=sop_uid,
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        risk_group=RiskGroup(risk_group) if risk_group is not None else None,
        radiomics_score=number(codes.RADIOMICS_SCORE),
        radiomics_cutoff=number(codes.RADIOMICS_CUTOFF),
        risk_score=number(codes.RISK_SCORE),
        risk_cutoff=number(codes.RISK_CUTOFF),
        pfs_probability=MappingProxyType(dict(sorted(pfs_probability.items()))),
        radiomics_contributions=MappingProxyType(contributions["radiomics_term"]),
        integrated_contributions=MappingProxyType(contributions["integrated_term"]),
        applicability=DomainStatus(coded(codes.APPLICABILITY, codes.APPLICABILITY_VALUES)),
        applicability_text=_text_item(group[0], codes.APPLICABILITY_DETAIL) or "",
        estimates_withheld=withheld,
        lossy_compression=lossy is True,
        summary=summary,
        model=ModelIdentity(
            name=name,
            version=version,
            sha256=sha256,
            demonstration=demonstration,
            intended_use=intended_use,
        ),
        intended_use_text=intended_use,
        clinical=SrClinicalInputs(
            t_stage=coded(codes.T_STAGE, codes.T_STAGE_VALUES),
            n_stage=coded(codes.N_STAGE, codes.N_STAGE_VALUES),
            m_stage=coded(codes.M_STAGE, codes.M_STAGE_VALUES),
            ecog=coded(codes.ECOG_PERFORMANCE_STATUS, codes.ECOG_VALUES),
            lipi=coded(codes.LIPI, codes.LIPI_VALUES),
            lipi_source=coded(codes.LIPI_SOURCE, codes.LIPI_SOURCE_VALUES),
        ),
        features=MappingProxyType(features),
        tracking_uid=str(group.tracking_uid),
        referenced_seg_sop_instance_uid=str(referenced.referenced_sop_instance_uid),
        referenced_segment_number=int(segment_numbers[0]),
        key_slice_sop_instance_uid=key_slice_uid,
    )


_REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
_ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")


def _children_text(item: Dataset, concept: Code) -> list[str]:
    return [
        str(child.TextValue)
        for child in item.get("ContentSequence", [])
        if child.ValueType == "TEXT" and hd.sr.utils.get_coded_name(child) == concept
    ]


def _text_item(item: Dataset, concept: Code) -> str | None:
    values = _children_text(item, concept)
    return values[0] if values else None


def _algorithm_of(item: Dataset) -> tuple[str, str, str] | None:
    """(name, version, sha256) of the TID 4019 directly under ``item``, if any."""
    names = _children_text(item, _ALGORITHM_NAME)
    versions = _children_text(item, _ALGORITHM_VERSION)
    sha256 = [
        p.removeprefix(_SHA256_PARAMETER)
        for p in _children_text(item, _ALGORITHM_PARAMETERS)
        if p.startswith(_SHA256_PARAMETER)
    ]
    if not (names and versions and sha256):
        return None
    return names[0], versions[0], sha256[0]
