"""A scored study as a DICOM Comprehensive 3D SR (TID 1500), and back.

``build_risk_sr`` encodes one ``RiskResult`` with highdicom as an "Imaging
Measurement Report" that OHIF loads and Orthanc stores; ``read_risk_sr``
parses such an SR back into plain values.  ``derive_sr_uids`` makes the SR's
UIDs a function of its inputs, so re-scoring the same CT series and SEG with
the same model yields the same SR (a PACS then replaces rather than adds it).

Content tree (concepts in ``dicom_io.codes``)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")  TID 1500
      HAS CONCEPT MOD  Language (121049, DCM) = en-US
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID/Name/
                       Manufacturer/Model Name (the node and its version)
      HAS CONCEPT MOD  Procedure reported = (25045-6, LN, "CT unspecified body region")
      CONTAINS         Image Library (the CT instances)
      CONTAINS         CONTAINER Imaging Measurements
        CONTAINS       CONTAINER Measurement Group  TID 1411
          Tracking Identifier (TEXT), Tracking Unique Identifier (UIDREF)
          Finding = (108369006, SCT, "Neoplasm")
          Finding Site = (39607008, SCT, "Lung")
          NUM Radiomics score, Radiomics score cut-off, Integrated risk score,
              Integrated risk score cut-off [UCUM 1]; PFS probability at
              6 / 12 months [UCUM {probability}]; each with Algorithm
              Identification (TID 4019): model name, version, "sha256=<hex>"
          NUM one per radiomics feature (code value "RF:<feature name>") [UCUM 1]
          CODE Progression risk group = High risk / Low risk (SCT)
          CODE Demonstration model = Yes / No (SCT)
          CODE Clinical T / N / M stage, ECOG performance status, LIPI, LIPI source
          TEXT Intended use
          IMAGE Referenced Segment, UIDREF Source Series for Segmentation (the CT)
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata
import math
import re
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io import codes
from dicom_io.errors import DicomInputError
from dicom_io.inputs import CtSeries, TumourSegment
from scoring.clinical import ClinicalRecord, Lipi
from scoring.types import ModelIdentity, RiskGroup, RiskResult

SOFTWARE_NAME = "sclc-risk-node"

#: Stated in the intended-use TEXT of every SR written with a demonstration model.
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


def intended_use_text(model: ModelIdentity) -> str:
    """The intended-use TEXT: the model's own statement, led by ``DEMONSTRATION_NOTICE`` for a demo model.

    The notice is always added for a demonstration model (even if the model
    already says so), so ``read_risk_sr`` can strip exactly one and give back
    the model's own statement.  A clinical model must state its intended use.
    """
    if not model.demonstration:
        if not model.intended_use.strip():
            raise ValueError(
                f"model {model.name} {model.version} is not a demonstration model but states no intended use"
            )
        return model.intended_use
    if model.intended_use:
        return f"{DEMONSTRATION_NOTICE}: {model.intended_use}"
    return DEMONSTRATION_NOTICE


def _model_intended_use(text: str, demonstration: bool) -> str:
    if demonstration and text.startswith(DEMONSTRATION_NOTICE):
        return text[len(DEMONSTRATION_NOTICE):].removeprefix(": ")
    return text


def _algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[_SHA256_PARAMETER + _normalised_sha256(model.sha256)],
    )


def _lookup(table: Mapping, key, field: str) -> Code:
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


def _measurements(result: RiskResult) -> list[hd.sr.Measurement]:
    model_outputs: list[tuple[Code, float, Code]] = [
        (codes.RADIOMICS_SCORE, result.radiomics_score, codes.UNIT_ONE),
        (codes.RADIOMICS_CUTOFF, result.radiomics_cutoff, codes.UNIT_ONE),
        (codes.RISK_SCORE, result.risk_score, codes.UNIT_ONE),
        (codes.RISK_CUTOFF, result.risk_cutoff, codes.UNIT_ONE),
    ]
    for months, probability in sorted(result.pfs_probability.items()):
        concept = _lookup(codes.PFS_PROBABILITY, months, "PFS horizon (months)")
        probability = _finite(probability, f"PFS probability at {months} months")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"PFS probability at {months} months must be in [0, 1], got {probability}")
        model_outputs.append((concept, probability, codes.UNIT_PROBABILITY))
    measurements = [
        hd.sr.Measurement(
            name=concept,
            value=_finite(value, concept.meaning),
            unit=unit,
            algorithm_id=_algorithm_identification(result.model),
        )
        for concept, value, unit in model_outputs
    ]
    measurements.extend(
        hd.sr.Measurement(
            name=codes.radiomics_feature_concept(name),
            value=value,
            unit=codes.UNIT_ONE,
        )
        for name, value in result.features.values.items()
    )
    return measurements


def _qualitative_evaluations(result: RiskResult, clinical: ClinicalRecord) -> list[hd.sr.QualitativeEvaluation]:
    pairs = [
        (codes.RISK_GROUP, _lookup(codes.RISK_GROUP_VALUES, RiskGroup(result.risk_group).value, "risk group")),
        (codes.DEMONSTRATION_MODEL, codes.YES if result.model.demonstration else codes.NO),
        (codes.T_STAGE, _lookup(codes.T_STAGE_VALUES, clinical.t_stage, "T stage")),
        (codes.N_STAGE, _lookup(codes.N_STAGE_VALUES, clinical.n_stage, "N stage")),
        (codes.M_STAGE, _lookup(codes.M_STAGE_VALUES, clinical.m_stage, "M stage")),
        (codes.ECOG_PERFORMANCE_STATUS, _lookup(codes.ECOG_VALUES, clinical.ecog, "ECOG")),
        (codes.LIPI, _lookup(codes.LIPI_VALUES, Lipi(clinical.lipi), "LIPI")),
        (codes.LIPI_SOURCE, _lookup(codes.LIPI_SOURCE_VALUES, clinical.lipi_source, "LIPI source")),
    ]
    return [hd.sr.QualitativeEvaluation(name=name, value=value) for name, value in pairs]


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


def _with_empty_type2(header: Dataset) -> Dataset:
    # highdicom reads these as attributes and raises if a (legal, type 2) attribute is absent.
    missing = [keyword for keyword in _COPIED_TYPE2_KEYWORDS if keyword not in header]
    if not missing:
        return header
    header = copy.deepcopy(header)
    for keyword in missing:
        setattr(header, keyword, "")
    return header


def series_description(model: ModelIdentity) -> str:
    """SeriesDescription (LO, ≤64 characters): says DEMO for a demonstration model."""
    if model.demonstration:
        return "SCLC progression risk (DEMO, not for clinical use)"
    return "SCLC progression risk"


def build_risk_sr(
    ct: CtSeries,
    segment: TumourSegment,
    clinical: ClinicalRecord,
    result: RiskResult,
    *,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = SOFTWARE_NAME,
    software_version: str | None = None,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    content_datetime: _dt.datetime | None = None,
    report_out_of_domain: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Comprehensive 3D SR for one scored study.

    Patient and study attributes are copied from the CT (the first header).
    The SEG is cited as evidence and referenced by segment number.
    ``software_version`` defaults to the installed package version;
    ``content_datetime`` (local time) defaults to now.  The SR is COMPLETE,
    UNVERIFIED and PRELIMINARY: a machine result for a radiologist to read,
    not the definitive report.  Raises ``ValueError`` for a value the SR
    cannot represent (unknown stage, non-finite score, PFS horizon other
    than 6 or 12 months, malformed sha256).
    """
    seg = segment.segmentation
    software_version = software_version or _software_version()
    model = result.model
    series_uid, sop_instance_uid = derive_sr_uids(ct.series_instance_uid, seg.SOPInstanceUID, model.sha256)

    observer = hd.sr.ObserverContext(
        observer_type=codes.OBSERVER_TYPE_DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_DEVICE_OBSERVER_UID,
            name=SOFTWARE_NAME,
            manufacturer_name=manufacturer,
            model_name=f"{SOFTWARE_NAME} {software_version}",
        ),
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=_tracking_uid(ct.series_instance_uid, seg.SOPInstanceUID, segment.segment_number),
        identifier=f"{segment.segment_label}: progression risk" + (" (DEMO)" if model.demonstration else ""),
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=_referenced_segment(seg, segment.segment_number, ct.series_instance_uid),
        finding_type=codes.FINDING_NEOPLASM,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.FINDING_SITE_LUNG)],
        measurements=_measurements(result),
        qualitative_evaluations=_qualitative_evaluations(result, clinical),
    )
    # highdicom's QualitativeEvaluation is CODE only, and the intended use is free text.
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.INTENDED_USE,
            value=intended_use_text(model),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED_CT,
        imaging_measurements=[group],
        title=codes.IMAGING_MEASUREMENT_REPORT,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept.from_code(codes.LANGUAGE_ENGLISH)
        ),
        referenced_images=list(ct.headers),
    )
    when = content_datetime or _dt.datetime.now()
    return hd.sr.Comprehensive3DSR(
        evidence=[_with_empty_type2(ct.headers[0]), *ct.headers[1:], seg],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=SOFTWARE_NAME,
        software_versions=software_version,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(model),
        coding_schemes=[codes.private_coding_scheme()],
        specific_character_set=SPECIFIC_CHARACTER_SET,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )


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

    Scores and cut-offs are dimensionless; ``pfs_probability`` maps months
    to a probability in [0, 1]; ``features`` maps ``FeatureSpec.name`` to the
    recorded value.  ``model.intended_use`` is the model's own statement;
    ``intended_use_text`` is the TEXT item as written (with the demonstration
    notice for a demonstration model).
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    risk_group: RiskGroup
    radiomics_score: float
    radiomics_cutoff: float
    risk_score: float
    risk_cutoff: float
    pfs_probability: Mapping[int, float]
    model: ModelIdentity
    intended_use_text: str
    clinical: SrClinicalInputs
    features: Mapping[str, float]
    tracking_uid: str
    referenced_seg_sop_instance_uid: str
    referenced_segment_number: int


def _reverse(table: Mapping) -> dict[tuple[str, str], object]:
    return {(code.value, code.scheme_designator): key for key, code in table.items()}


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
    algorithms: dict[tuple[str, str], tuple[str, str, str] | None] = {}
    for measurement in group.get_measurements():
        name = measurement.name
        feature_name = codes.radiomics_feature_name(name)
        months = codes.pfs_horizon_months(name)
        if feature_name is not None:
            features[feature_name] = measurement.value
        elif months is not None:
            pfs_probability[months] = measurement.value
        else:
            numbers[(name.value, name.scheme_designator)] = measurement.value
            algorithms[(name.value, name.scheme_designator)] = _algorithm_of(measurement[0])

    def number(concept: Code) -> float:
        try:
            return numbers[(concept.value, concept.scheme_designator)]
        except KeyError:
            raise fail(f"no NUM {concept.meaning!r}") from None

    evaluations = {
        (e.name.value, e.name.scheme_designator): e.value for e in group.get_qualitative_evaluations()
    }

    def coded(concept: Code, table: Mapping):
        value = evaluations.get((concept.value, concept.scheme_designator))
        if value is None:
            raise fail(f"no CODE {concept.meaning!r}")
        key = _reverse(table).get((value.value, value.scheme_designator))
        if key is None:
            raise fail(f"{concept.meaning!r} has unexpected value {value.meaning!r}")
        return key

    # The model is the algorithm that computed the integrated risk score.
    model_algorithm = algorithms.get((codes.RISK_SCORE.value, codes.RISK_SCORE.scheme_designator))
    if model_algorithm is None:
        raise fail(f"no algorithm identification on {codes.RISK_SCORE.meaning!r}")
    demonstration = coded(codes.DEMONSTRATION_MODEL, {True: codes.YES, False: codes.NO})
    text = _text_item(group[0], codes.INTENDED_USE)
    if text is None:
        raise fail(f"no TEXT {codes.INTENDED_USE.meaning!r}")
    segment_items = hd.sr.utils.find_content_items(
        group[0], name=_REFERENCED_SEGMENT, value_type=hd.sr.ValueTypeValues.IMAGE
    )
    if len(segment_items) != 1:
        raise fail(f"expected 1 Referenced Segment, found {len(segment_items)}")
    referenced = hd.sr.ImageContentItem.from_dataset(segment_items[0])
    segment_numbers = referenced.referenced_segment_numbers or []
    if len(segment_numbers) != 1:
        raise fail(f"Referenced Segment names {len(segment_numbers)} segment numbers, expected 1")
    name, version, sha256 = model_algorithm
    return RiskSrContent(
        sop_instance_uid=sop_uid,
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        risk_group=RiskGroup(coded(codes.RISK_GROUP, codes.RISK_GROUP_VALUES)),
        radiomics_score=number(codes.RADIOMICS_SCORE),
        radiomics_cutoff=number(codes.RADIOMICS_CUTOFF),
        risk_score=number(codes.RISK_SCORE),
        risk_cutoff=number(codes.RISK_CUTOFF),
        pfs_probability=MappingProxyType(dict(sorted(pfs_probability.items()))),
        model=ModelIdentity(
            name=name,
            version=version,
            sha256=sha256,
            demonstration=demonstration,
            intended_use=_model_intended_use(text, demonstration),
        ),
        intended_use_text=text,
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
