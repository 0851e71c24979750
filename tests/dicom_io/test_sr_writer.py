"""The risk SR: built from a real synthetic CT + highdicom SEG, written, validated and read back."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import html
import math
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from sclc_risk_node.dicom_io import codes
from sclc_risk_node.dicom_io.errors import DicomInputError
from sclc_risk_node.dicom_io.inputs import CtSeries, TumourSegment
from sclc_risk_node.dicom_io.sr_writer import (
    DEMONSTRATION_NOTICE,
    build_risk_sr,
    derive_sr_uids,
    read_risk_sr,
)
from sclc_risk_node.dicom_io.synthetic import (
    SyntheticPatient,
    build_tumour_seg,
    ct_datasets_from_image,
    synthetic_chest_phantom,
)
from sclc_risk_node.scoring.clinical import ClinicalRecord, Lipi
from sclc_risk_node.scoring.types import (
    DOMAIN_UNKNOWN,
    Applicability,
    DomainStatus,
    DomainViolation,
    FeatureVector,
    ModelIdentity,
    RiskGroup,
    RiskResult,
    TermContribution,
)

DSRDUMP = Path("/usr/bin/dsrdump")
DSR2HTML = Path("/usr/bin/dsr2html")
DCIODVFY = Path("/usr/bin/dciodvfy")
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")

SHA_A = "3f" * 32
SHA_B = "a0" * 32
LONG_FEATURE = "tumour.log-sigma-2-0-mm-3D_gldm_LargeDependenceHighGrayLevelEmphasis"  # 68 characters
WHEN = dt.datetime(2026, 1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def study():
    """A small synthetic CT (12 slices) with a non-ASCII patient name, and its tumour SEG."""
    image, mask = synthetic_chest_phantom(size=(40, 40, 12), tumour_radii_mm=(9.0, 8.0, 9.0))
    datasets = ct_datasets_from_image(image, SyntheticPatient(patient_name="Müller^Jörg"))
    seg = build_tumour_seg(datasets, mask)
    headers = []
    for ds in datasets:
        header = copy.deepcopy(ds)
        del header.PixelData
        headers.append(header)
    ct = CtSeries(
        image=image,
        headers=tuple(headers),
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
        source_paths=(),
    )
    segment = TumourSegment(mask=mask, segmentation=seg, segment_number=1, segment_label="Tumour")
    return ct, segment


def make_model(*, demonstration: bool = True, sha256: str = SHA_A) -> ModelIdentity:
    return ModelIdentity(
        name="zhao-integrated-cox",
        version="1.2.0",
        sha256=sha256,
        demonstration=demonstration,
        intended_use="Prognostic stratification of ES-SCLC before first-line chemo-immunotherapy",
    )


IN_DOMAIN = Applicability(DomainStatus.IN_DOMAIN, (), "every feature within the training range widened by 10 %")
OUT_OF_DOMAIN = Applicability(
    DomainStatus.OUT_OF_DOMAIN,
    (DomainViolation("ring.wavelet-LLH_glcm_Correlation", 0.123456789012345, 0.2, 0.9, -4.2),),
    "every feature within the training range widened by 10 %",
)


def make_result(
    *,
    risk_group: RiskGroup = RiskGroup.HIGH,
    model: ModelIdentity | None = None,
    applicability: Applicability = DOMAIN_UNKNOWN,
) -> RiskResult:
    risk_score = 1.2345678901234567 if risk_group is RiskGroup.HIGH else -0.7071067811865476
    features = FeatureVector(
        {
            "ring.wavelet-LLH_glcm_Correlation": 0.123456789012345,
            "tumour.original_firstorder_Skewness": -0.5,
            LONG_FEATURE: 1234.5,
        }
    )
    return RiskResult(
        radiomics_score=0.4142135623730951,
        radiomics_cutoff=0.1,
        risk_score=risk_score,
        risk_cutoff=0.3333333333333333,
        risk_group=risk_group,
        pfs_probability={6: 0.6180339887498949, 12: 0.2718281828459045},
        radiomics_terms=(
            TermContribution("ring.wavelet-LLH_glcm_Correlation", 1.1, 0.37),
            TermContribution(LONG_FEATURE, -0.25, 0.2),
        ),
        integrated_terms=(
            TermContribution("radiomics_score", 0.4142135623730951, 1.5),
            TermContribution("ecog", 1.0, 0.2222),
        ),
        features=features,
        model=model or make_model(),
        applicability=applicability,
    )


def make_clinical(**overrides) -> ClinicalRecord:
    fields = dict(
        t_stage="T3",
        n_stage="N2",
        m_stage="M1c",
        ecog=1,
        lipi=Lipi.INTERMEDIATE,
        lipi_source="given",
        patient_id="SYNTH-0001",
    )
    fields.update(overrides)
    return ClinicalRecord(**fields)


def write(sr, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def demo_high_sr_path(study, tmp_path_factory) -> Path:
    ct, segment = study
    sr = build_risk_sr(ct, segment, make_clinical(), make_result(), content_datetime=WHEN)
    return write(sr, tmp_path_factory.mktemp("sr") / "SR.dcm")


# --- round trip ---------------------------------------------------------------


@pytest.mark.parametrize("risk_group", [RiskGroup.HIGH, RiskGroup.LOW])
@pytest.mark.parametrize("demonstration", [True, False])
def test_read_back_gives_the_values_written(study, tmp_path, risk_group, demonstration):
    ct, segment = study
    model = make_model(demonstration=demonstration)
    result = make_result(risk_group=risk_group, model=model)
    clinical = make_clinical(t_stage="T4", n_stage="N0", m_stage="M1a", ecog=3, lipi=Lipi.POOR)
    path = write(build_risk_sr(ct, segment, clinical, result, content_datetime=WHEN), tmp_path / "SR.dcm")

    content = read_risk_sr(pydicom.dcmread(path))

    # Values come back as written: rounded to the digits that mean something.
    assert content.risk_group is risk_group
    assert content.radiomics_score == 0.414
    assert content.radiomics_cutoff == 0.1
    assert content.risk_score == round(result.risk_score, 3)
    assert content.risk_cutoff == 0.333
    assert dict(content.pfs_probability) == {6: 0.618, 12: 0.272}
    assert dict(content.features) == {
        "ring.wavelet-LLH_glcm_Correlation": 0.1235,
        "tumour.original_firstorder_Skewness": -0.5,
        LONG_FEATURE: 1234.0,
    }
    assert dict(content.radiomics_contributions) == {"ring.wavelet-LLH_glcm_Correlation": 0.407, LONG_FEATURE: -0.05}
    assert dict(content.integrated_contributions) == {"radiomics_score": 0.621, "ecog": 0.222}
    assert content.applicability is DomainStatus.UNKNOWN and content.estimates_withheld is False
    assert content.lossy_compression is False
    assert content.model == model
    assert content.clinical.t_stage == "T4"
    assert content.clinical.n_stage == "N0"
    assert content.clinical.m_stage == "M1a"
    assert content.clinical.ecog == 3
    assert content.clinical.lipi is Lipi.POOR
    assert content.clinical.lipi_source == "given"
    assert content.study_instance_uid == ct.study_instance_uid
    assert content.referenced_seg_sop_instance_uid == segment.segmentation.SOPInstanceUID
    assert content.referenced_segment_number == 1
    series_uid, sop_uid = derive_sr_uids(ct.series_instance_uid, segment.segmentation.SOPInstanceUID, model.sha256)
    assert (content.series_instance_uid, content.sop_instance_uid) == (series_uid, sop_uid)


def test_risk_group_is_coded_with_snomed_risk_concepts(study):
    ct, segment = study
    expected_codes = {RiskGroup.HIGH: ("15508007", "High risk"), RiskGroup.LOW: ("75976002", "Low risk")}
    for risk_group, expected in expected_codes.items():
        sr = build_risk_sr(ct, segment, make_clinical(), make_result(risk_group=risk_group))
        (item,) = [i for i in _group_items(sr) if i.ValueType == "CODE" and _name(i) == ("RISKGROUP", "99SCLCRN")]
        value = item.ConceptCodeSequence[0]
        assert (value.CodeValue, value.CodingSchemeDesignator, value.CodeMeaning) == (expected[0], "SCT", expected[1])


def test_measurements_carry_units_and_the_model_identity(study):
    ct, segment = study
    sr = build_risk_sr(ct, segment, make_clinical(), make_result())
    nums = {_name(i)[0]: i for i in _group_items(sr) if i.ValueType == "NUM"}
    units = {value: nums[value].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for value in nums}
    assert units["RADSCORE"] == units["RISKSCORE"] == units["RISKCUTOFF"] == units["RADCUTOFF"] == "1"
    assert units["PFSP6M"] == units["PFSP12M"] == "%"
    assert str(nums["PFSP6M"].MeasuredValueSequence[0].NumericValue) == "61.8"
    assert str(nums["RISKSCORE"].MeasuredValueSequence[0].NumericValue) == "1.235"
    pfs_12_meaning = nums["PFSP12M"].ConceptNameCodeSequence[0].CodeMeaning
    assert pfs_12_meaning == "Progression-free survival at 12 months"
    # The model is identified once, for the whole group (TID 4019 under TID 1411).
    algorithm = {
        (_name(child)[0], str(child.TextValue)) for child in _group_items(sr) if _name(child)[0].startswith("1110")
    }
    assert algorithm == {("111001", "zhao-integrated-cox"), ("111003", "1.2.0"), ("111002", f"sha256={SHA_A}")}
    long_feature = nums[codes.radiomics_feature_concept(LONG_FEATURE).value]
    assert "LongCodeValue" not in long_feature.ConceptNameCodeSequence[0]
    assert len(long_feature.ConceptNameCodeSequence[0].CodeMeaning) <= 64
    assert [str(c.TextValue) for c in long_feature.ContentSequence] == [LONG_FEATURE]
    contribution = nums[codes.term_contribution_concept("ecog", integrated=True).value]
    assert contribution.ConceptNameCodeSequence[0].CodeMeaning == "Risk contribution: ecog"
    assert str(contribution.MeasuredValueSequence[0].NumericValue) == "0.222"
    assert all(len(value) <= 16 for value in nums)


def test_document_header_comes_from_the_ct_and_declares_the_private_scheme(demo_high_sr_path, study):
    ct, segment = study
    sr = pydicom.dcmread(demo_high_sr_path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == "Müller^Jörg"
    assert sr.PatientID == ct.headers[0].PatientID
    assert sr.StudyInstanceUID == ct.study_instance_uid
    assert sr.AccessionNumber == ct.headers[0].AccessionNumber
    assert sr.SeriesNumber == 9001
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert (sr.ContentDate, sr.ContentTime) == ("20260102", "030405")
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == ["99SCLCRN"]
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    top_level = {_name(item) for item in sr.ContentSequence}
    assert ("111028", "DCM") in top_level  # Image Library, which OHIF needs
    assert ("121058", "DCM") in top_level  # Procedure reported
    group_items = {_name(item) for item in sr.ContentSequence[-1].ContentSequence[0].ContentSequence}
    assert ("112040", "DCM") in group_items  # Tracking Unique Identifier, which OHIF needs
    (source_series,) = [
        i for i in sr.ContentSequence[-1].ContentSequence[0].ContentSequence if _name(i) == ("121232", "DCM")
    ]
    assert source_series.UID == ct.series_instance_uid
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert segment.segmentation.SOPInstanceUID in evidence
    assert set(ct.sop_instance_uids) <= evidence


def test_ct_without_optional_patient_and_study_attributes_still_gives_an_sr(study, tmp_path):
    ct, segment = study
    absent = ("PatientSex", "PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
    headers = []
    for header in ct.headers:
        header = copy.deepcopy(header)
        for keyword in absent:
            delattr(header, keyword)
        headers.append(header)
    bare_ct = dataclasses.replace(ct, headers=tuple(headers))
    path = write(build_risk_sr(bare_ct, segment, make_clinical(), make_result()), tmp_path / "SR.dcm")
    sr = pydicom.dcmread(path)
    assert all(sr[keyword].value in ("", None) for keyword in absent)
    assert "PatientSex" not in bare_ct.headers[0]  # the caller's headers are not filled in place
    assert read_risk_sr(sr).risk_group is RiskGroup.HIGH


# --- demonstration vs clinical model -------------------------------------------


def test_demonstration_model_is_labelled_in_text_series_and_tracking_id(demo_high_sr_path):
    raw = demo_high_sr_path.read_bytes()
    assert raw.count(DEMONSTRATION_NOTICE.encode("utf-8")) == 1
    sr = pydicom.dcmread(demo_high_sr_path)
    content = read_risk_sr(sr)
    assert content.model.demonstration is True
    assert content.summary.startswith(f"Result of a {DEMONSTRATION_NOTICE}.")
    assert DEMONSTRATION_NOTICE not in content.intended_use_text
    assert "DEMO" in sr.SeriesDescription
    tracking = [i for i in sr.ContentSequence[-1].ContentSequence[0].ContentSequence if _name(i) == ("112039", "DCM")]
    assert "DEMO" in tracking[0].TextValue


def test_clinical_model_states_its_own_intended_use_without_demo_labels(study, tmp_path):
    ct, segment = study
    model = make_model(demonstration=False)
    path = write(build_risk_sr(ct, segment, make_clinical(), make_result(model=model)), tmp_path / "SR.dcm")
    sr = pydicom.dcmread(path)
    content = read_risk_sr(sr)
    assert content.model.demonstration is False
    assert content.intended_use_text == model.intended_use
    assert DEMONSTRATION_NOTICE.encode("utf-8") not in path.read_bytes()
    coded = {(_name(i)[0], i.ConceptCodeSequence[0].CodeMeaning) for i in _group_items(sr) if i.ValueType == "CODE"}
    assert ("DEMOMODEL", "No") in coded
    assert "DEMO" not in sr.SeriesDescription


def test_clinical_model_without_intended_use_is_refused(study):
    ct, segment = study
    model = dataclasses.replace(make_model(demonstration=False), intended_use=" ")
    with pytest.raises(ValueError, match="intended use"):
        build_risk_sr(ct, segment, make_clinical(), make_result(model=model))


# --- UIDs ---------------------------------------------------------------------


def test_uids_are_deterministic_and_follow_the_model_hash(study):
    ct, segment = study
    seg_uid = segment.segmentation.SOPInstanceUID
    first = derive_sr_uids(ct.series_instance_uid, seg_uid, SHA_A)
    assert first == derive_sr_uids(ct.series_instance_uid, seg_uid, SHA_A.upper())
    assert first[0] != first[1]
    for uid in first:
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
    other_model = derive_sr_uids(ct.series_instance_uid, seg_uid, SHA_B)
    assert set(first).isdisjoint(other_model)
    other_seg = derive_sr_uids(ct.series_instance_uid, seg_uid + ".1", SHA_A)
    assert set(first).isdisjoint(other_seg)

    again = [build_risk_sr(ct, segment, make_clinical(), make_result()) for _ in range(2)]
    assert again[0].SOPInstanceUID == again[1].SOPInstanceUID == first[1]
    assert again[0].SeriesInstanceUID == first[0]
    rescored = build_risk_sr(ct, segment, make_clinical(), make_result(model=make_model(sha256=SHA_B)))
    assert rescored.SOPInstanceUID == other_model[1] != first[1]


def test_malformed_model_hash_is_refused(study):
    ct, segment = study
    with pytest.raises(ValueError, match="sha256"):
        derive_sr_uids(ct.series_instance_uid, segment.segmentation.SOPInstanceUID, "not-a-hash")


# --- values the SR cannot carry ------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: dataclasses.replace(r, pfs_probability={24: 0.5}), "PFS horizon"),
        (lambda r: dataclasses.replace(r, pfs_probability={6: 1.5}), r"\[0, 1\]"),
        (lambda r: dataclasses.replace(r, risk_score=math.nan), "not finite"),
    ],
)
def test_unrepresentable_results_are_refused(study, change, message):
    ct, segment = study
    with pytest.raises(ValueError, match=message):
        build_risk_sr(ct, segment, make_clinical(), change(make_result()))


def test_missing_segment_number_is_refused(study):
    ct, segment = study
    with pytest.raises(ValueError, match="no segment 2"):
        build_risk_sr(ct, dataclasses.replace(segment, segment_number=2), make_clinical(), make_result())


def test_private_codes_are_unique_short_and_in_our_scheme():
    concepts = [
        codes.RISK_GROUP,
        codes.RADIOMICS_SCORE,
        codes.RADIOMICS_CUTOFF,
        codes.RISK_SCORE,
        codes.RISK_CUTOFF,
        codes.DEMONSTRATION_MODEL,
        codes.INTENDED_USE,
        codes.T_STAGE,
        codes.N_STAGE,
        codes.M_STAGE,
        codes.ECOG_PERFORMANCE_STATUS,
        codes.LIPI,
        codes.LIPI_SOURCE,
        *codes.PFS_PROBABILITY.values(),
        *codes.T_STAGE_VALUES.values(),
        *codes.N_STAGE_VALUES.values(),
        *codes.M_STAGE_VALUES.values(),
        *codes.ECOG_VALUES.values(),
        *codes.LIPI_VALUES.values(),
        *codes.LIPI_SOURCE_VALUES.values(),
    ]
    values = [c.value for c in concepts]
    assert len(values) == len(set(values))
    assert all(c.scheme_designator == codes.PRIVATE_SCHEME and len(c.value) <= 16 for c in concepts)
    assert all(len(c.meaning) <= 64 for c in concepts)
    assert set(codes.LIPI_VALUES) == set(Lipi)
    assert codes.pfs_horizon_months(codes.PFS_PROBABILITY[12]) == 12
    feature = codes.radiomics_feature_concept(LONG_FEATURE)
    assert codes.named_concept_kind(feature) == "feature" and len(feature.value) == 16
    assert feature != codes.radiomics_feature_concept(LONG_FEATURE + "x")
    assert codes.named_concept_kind(codes.term_contribution_concept("ecog", integrated=True)) == "integrated_term"
    assert codes.named_concept_kind(codes.term_contribution_concept("ecog", integrated=False)) == "radiomics_term"
    assert codes.named_concept_kind(codes.RISK_SCORE) is None


def test_reading_something_else_is_refused(study, demo_high_sr_path):
    ct, _ = study
    with pytest.raises(DicomInputError, match="not Comprehensive 3D SR"):
        read_risk_sr(ct.headers[0])
    sr = pydicom.dcmread(demo_high_sr_path)
    group = sr.ContentSequence[-1].ContentSequence[0]
    group.ContentSequence = [i for i in group.ContentSequence if _name(i) != ("RISKSCORE", "99SCLCRN")]
    with pytest.raises(DicomInputError, match="Integrated risk score"):
        read_risk_sr(sr)


# --- external validators and renderers ------------------------------------------


def _run(command: list, *, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout_s
    )


def _require(tool: Path) -> None:
    if not tool.exists():
        pytest.skip(f"{tool} is not installed")


def run_pixelmed_sr_validator(path) -> list[str]:
    """PixelMed's DicomSRValidator (IOD and template checks) on ``path``: its output lines.

    Skips the calling test where Java or PixelMed is not installed.  The JDK's XPath limits are
    lifted for PixelMed's template rules.
    """
    java = shutil.which("java")
    if java is None or not PIXELMED_JAR.exists():
        pytest.skip("java or PixelMed is not installed")
    run = _run(
        [
            java,
            "-Djdk.xml.xpathExprOpLimit=0",
            "-Djdk.xml.xpathExprGrpLimit=0",
            "-Djdk.xml.xpathTotalOpLimit=0",
            "-cp",
            PIXELMED_JAR,
            "com.pixelmed.validate.DicomSRValidator",
            path,
        ],
        timeout_s=300,
    )
    return (run.stdout + run.stderr).splitlines()


@pytest.mark.external
def test_dciodvfy_reports_no_errors(demo_high_sr_path):
    _require(DCIODVFY)
    run = _run([DCIODVFY, "-new", demo_high_sr_path])
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    # The only warnings: our private coding scheme is not a DICOM-defined designator.
    warnings = [line for line in lines if line.startswith("Warning")]
    assert warnings and all(line.endswith("Unrecognized defined term = <99SCLCRN>") for line in warnings)


@pytest.mark.external
def test_dsrdump_shows_the_risk_group_and_the_model(demo_high_sr_path):
    _require(DSRDUMP)
    run = _run([DSRDUMP, "-v", "+Pc", demo_high_sr_path])
    assert run.returncode == 0, run.stderr
    assert '(RISKGROUP,99SCLCRN,"Progression risk group")=(15508007,SCT,"High risk")' in run.stdout
    assert '"zhao-integrated-cox"' in run.stdout
    assert '"Result of a demonstration m...' in run.stdout  # dsrdump shortens long TEXT values
    assert '(TSTAGE,99SCLCRN,"Clinical T stage")=(T3,99SCLCRN,"T3")' in run.stdout


def _dsr2html_text(sr_path: Path, tmp_path: Path) -> str:
    """dsr2html's page as the text a reader sees (tags dropped, blank lines folded)."""
    out = tmp_path / "out.html"
    run = _run([DSR2HTML, sr_path, out])
    assert run.returncode == 0, run.stderr
    text = html.unescape(re.sub(r"<[^>]+>", "", out.read_text(encoding="utf-8")))
    return re.sub(r"\n\s*\n+", "\n", text)


@pytest.mark.external
def test_dsr2html_shows_each_value_under_its_label(demo_high_sr_path, tmp_path):
    _require(DSR2HTML)
    text = _dsr2html_text(demo_high_sr_path, tmp_path)
    # SEPARATE continuity: every item keeps its concept name as a label, the value on the next line.
    for label, value in [
        ("Summary:", f"Result of a {DEMONSTRATION_NOTICE}. High progression risk"),
        ("Progression risk group:", "High risk"),
        ("Model applicability domain:", "Applicability domain unknown"),
        ("Risk estimates withheld:", "No"),
        ("Progression-free survival at 6 months:", "61.8 %"),
        ("Progression-free survival at 12 months:", "27.2 %"),
        ("Integrated risk score:", "1.235 1"),
        ("Integrated risk score cut-off:", "0.333 1"),
        ("Risk contribution: radiomics_score:", "0.621 1"),
        ("Radiomics contribution: ring.wavelet-LLH_glcm_Correlation:", "0.407 1"),
        ("ring.wavelet-LLH_glcm_Correlation:", "0.1235 1"),
        ("Clinical M stage:", "M1c"),
        ("ECOG performance status:", "ECOG 1"),
        ("Lung Immune Prognostic Index:", "LIPI intermediate (1 factor)"),
        ("Intended use:", "Prognostic stratification of ES-SCLC"),
    ]:
        assert re.search(re.escape(label) + r"\n" + re.escape(value), text), f"{label} {value}"
    assert "zhao-integrated-cox" in text and f"sha256={SHA_A}" in text
    # Read top to bottom: the result first, the references last; a one-image library, not one line per slice.
    assert (
        text.index("Summary:")
        < text.index("Progression-free survival at 6 months:")
        < text.index("Referenced Segment:")
    )
    assert text.count("CT image") == 1
    assert text.count(DEMONSTRATION_NOTICE) == 1


#: What PixelMed's 2022 template tables (TID 1411 rows 1-14 plus TID 1502/1419) do not list: our
#: private concepts, the Summary TEXT, the "Full name" of a long feature, and the group-level TID 4019
#: (highdicom's algorithm_id of TID 1411, newer than PixelMed's table).  Warnings, not errors.
PIXELMED_ITEMS_NOT_IN_TEMPLATE = {
    'CODE (RISKGROUP,99SCLCRN,"Progression risk group")',
    'CODE (APPLICABILITY,99SCLCRN,"Model applicability domain")',
    'CODE (WITHHELD,99SCLCRN,"Risk estimates withheld")',
    'CODE (DEMOMODEL,99SCLCRN,"Demonstration model")',
    'CODE (TSTAGE,99SCLCRN,"Clinical T stage")',
    'CODE (NSTAGE,99SCLCRN,"Clinical N stage")',
    'CODE (MSTAGE,99SCLCRN,"Clinical M stage")',
    'CODE (ECOGPS,99SCLCRN,"ECOG performance status")',
    'CODE (LIPI,99SCLCRN,"Lung Immune Prognostic Index")',
    'CODE (LIPISRC,99SCLCRN,"LIPI source")',
    'TEXT (121111,DCM,"Summary")',
    'TEXT (APPLICDETAIL,99SCLCRN,"Applicability assessment")',
    'TEXT (FULLNAME,99SCLCRN,"Full name")',
    'TEXT (INTENDEDUSE,99SCLCRN,"Intended use")',
    'TEXT (111001,DCM,"Algorithm Name")',
    'TEXT (111002,DCM,"Algorithm Parameters")',
    'TEXT (111003,DCM,"Algorithm Version")',
}


@pytest.mark.external
@pytest.mark.slow
def test_pixelmed_finds_no_template_errors(demo_high_sr_path):
    lines = run_pixelmed_sr_validator(demo_high_sr_path)
    assert "IOD validation complete" in lines
    assert [line for line in lines if line.startswith("Error")] == []
    not_in_template = {
        re.search(r"/((?:CODE|TEXT|NUM) \([^)]*\)): Content Item not in template", line).group(1)
        for line in lines
        if line.endswith("Content Item not in template")
    }
    assert not_in_template == PIXELMED_ITEMS_NOT_IN_TEMPLATE
    other_warnings = [
        line for line in lines if line.startswith("Warning") and not line.endswith("Content Item not in template")
    ]
    # highdicom writes "Source Series for Segmentation"; PixelMed's table says "Source series for segmentation".
    assert len(other_warnings) == 1
    assert "(121232,DCM" in other_warnings[0] and "different code meaning" in other_warnings[0]


# --- highdicom parses what we write ------------------------------------------------


def test_highdicom_srread_parses_the_groups_back(demo_high_sr_path, study):
    _, segment = study
    sr = hd.sr.srread(demo_high_sr_path)
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    referenced = group.referenced_segment  # raised AttributeError with LongCodeValue feature codes
    assert referenced.referenced_sop_instance_uid == segment.segmentation.SOPInstanceUID
    assert referenced.referenced_segment_numbers == [1]
    names = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert names["Progression-free survival at 6 months"] == (61.8, "%")
    assert names["Risk contribution: ecog"] == (0.222, "1")
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations["Progression risk group"] == "High risk"
    assert evaluations["Model applicability domain"] == "Applicability domain unknown"


# --- applicability domain -------------------------------------------------------------


def _sr_for(study, tmp_path, result, **kwargs):
    ct, segment = study
    path = write(
        build_risk_sr(ct, segment, make_clinical(), result, content_datetime=WHEN, **kwargs), tmp_path / "SR.dcm"
    )
    return pydicom.dcmread(path), path


def test_in_domain_study_is_reported_with_its_verdict(study, tmp_path):
    sr, _ = _sr_for(study, tmp_path, make_result(applicability=IN_DOMAIN))
    content = read_risk_sr(sr)
    assert content.applicability is DomainStatus.IN_DOMAIN
    assert content.risk_group is RiskGroup.HIGH and content.estimates_withheld is False
    assert "within the model's applicability domain" in content.summary
    assert content.applicability_text.startswith("Within the model's applicability domain. Rule: every feature")


def test_out_of_domain_study_withholds_risk_group_and_pfs_by_default(study, tmp_path):
    sr, path = _sr_for(study, tmp_path, make_result(applicability=OUT_OF_DOMAIN))
    content = read_risk_sr(sr)
    assert content.applicability is DomainStatus.OUT_OF_DOMAIN
    assert content.estimates_withheld is True
    assert content.risk_group is None and content.risk_score is None and content.radiomics_score is None
    assert dict(content.pfs_probability) == {} and dict(content.integrated_contributions) == {}
    assert "outside the model's applicability domain (offending: ring.wavelet-LLH_glcm_Correlation)" in content.summary
    assert "ring.wavelet-LLH_glcm_Correlation = 0.1235 (accepted 0.2 to 0.9, z = -4.2)" in content.applicability_text
    assert content.features["ring.wavelet-LLH_glcm_Correlation"] == 0.1235  # the evidence stays
    coded = {_name(i)[0] for i in _group_items(sr) if i.ValueType == "CODE"}
    nums = {_name(i)[0] for i in _group_items(sr) if i.ValueType == "NUM"}
    assert "RISKGROUP" not in coded and not {"PFSP6M", "PFSP12M", "RISKSCORE", "RADSCORE"} & nums
    assert b"High risk" not in path.read_bytes()


@pytest.mark.external
def test_withheld_out_of_domain_sr_passes_dciodvfy(study, tmp_path):
    _require(DCIODVFY)
    _sr, path = _sr_for(study, tmp_path, make_result(applicability=OUT_OF_DOMAIN))
    run = _run([DCIODVFY, "-new", path])
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    assert all(line.endswith("Unrecognized defined term = <99SCLCRN>") for line in lines if line.startswith("Warning"))


def test_out_of_domain_study_is_reported_with_the_flag_when_configured(study, tmp_path):
    sr, _ = _sr_for(study, tmp_path, make_result(applicability=OUT_OF_DOMAIN), report_out_of_domain=True)
    content = read_risk_sr(sr)
    assert content.applicability is DomainStatus.OUT_OF_DOMAIN and content.estimates_withheld is False
    assert content.risk_group is RiskGroup.HIGH
    assert dict(content.pfs_probability) == {6: 0.618, 12: 0.272}
    assert "Caution: the study is outside the model's applicability domain" in content.summary


def test_schema_v1_model_says_domain_unknown(study, tmp_path):
    sr, _ = _sr_for(study, tmp_path, make_result(applicability=DOMAIN_UNKNOWN))
    content = read_risk_sr(sr)
    assert content.applicability is DomainStatus.UNKNOWN and content.risk_group is RiskGroup.HIGH
    assert "Applicability domain unknown" in content.summary


def test_lossy_compressed_ct_is_flagged(study, tmp_path):
    ct, segment = study
    lossy = dataclasses.replace(ct, lossy_compression=True)
    sr = pydicom.dcmread(write(build_risk_sr(lossy, segment, make_clinical(), make_result()), tmp_path / "SR.dcm"))
    content = read_risk_sr(sr)
    assert content.lossy_compression is True
    assert "The CT was lossy-compressed" in content.summary
    coded = {(_name(i)[0], i.ConceptCodeSequence[0].CodeMeaning) for i in _group_items(sr) if i.ValueType == "CODE"}
    assert ("LOSSYCT", "Yes") in coded
    assert read_risk_sr(pydicom.dcmread(_sr_for(study, tmp_path, make_result())[1])).lossy_compression is False


def test_shipped_model_intended_use_does_not_repeat_the_notice(study, tmp_path):
    model = dataclasses.replace(
        make_model(), intended_use="Demonstration model — not for clinical use. Fitted on a simulated cohort."
    )
    sr, path = _sr_for(study, tmp_path, make_result(model=model))
    assert path.read_bytes().lower().count(DEMONSTRATION_NOTICE.lower().encode("utf-8")) == 1
    assert read_risk_sr(sr).intended_use_text == "Fitted on a simulated cohort."


# --- header values copied from the CT (issue 10 item 5) --------------------------------


def _ct_with_header(study, tmp_path, **values):
    """The study's CT whose first header went through a file with the given raw values."""
    ct, _ = study
    header = copy.deepcopy(ct.headers[0])
    for keyword, value in values.items():
        header[keyword].value = value
    path = tmp_path / "ct0.dcm"
    header.save_as(path, enforce_file_format=True)
    reread = pydicom.dcmread(path)
    return dataclasses.replace(ct, headers=(reread, *ct.headers[1:]))


def test_invalid_utf8_and_overlong_patient_name_never_reach_the_sr(study, tmp_path):
    _, segment = study
    # Latin-1 bytes under ISO_IR 192 (invalid UTF-8), and 601 characters (PN allows 64 per group).
    raw_name = b"M\xfcller^J\xf6rg" + b"A" * 590
    assert len(raw_name) == 601
    ct = _ct_with_header(study, tmp_path, PatientName=raw_name, StudyDescription="x" * 80)
    path = write(build_risk_sr(ct, segment, make_clinical(), make_result()), tmp_path / "SR.dcm")
    raw = pydicom.dcmread(path)
    name_bytes = raw["PatientName"].value.original_string
    name = name_bytes.decode("utf-8")  # strict: raises on invalid UTF-8
    # pydicom falls back to another decoding (or "?"): either way the SR holds valid UTF-8.
    assert name.startswith(("Müller^Jörg", "M?ller^J?rg"))
    assert all(len(group) <= 64 for group in name.split("="))
    assert len(name) <= 64
    run = _run([DCIODVFY, "-new", path]) if DCIODVFY.exists() else None
    if run is not None:
        assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []


def test_overlong_patient_id_is_refused_not_shortened(study, tmp_path):
    _, segment = study
    ct = _ct_with_header(study, tmp_path, PatientID="P" * 200)
    with pytest.raises(DicomInputError, match="PatientID of the CT is 200 characters long; its VR LO allows 64"):
        build_risk_sr(ct, segment, make_clinical(), make_result())


# --- helpers ------------------------------------------------------------------


def _name(item) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    value = concept.get("CodeValue") or concept.get("LongCodeValue")
    return str(value), str(concept.CodingSchemeDesignator)


def _group_items(sr):
    imaging_measurements = [i for i in sr.ContentSequence if _name(i) == ("126010", "DCM")][0]
    return imaging_measurements.ContentSequence[0].ContentSequence
